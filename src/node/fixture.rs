//! What the node's unit tests share: a `file://` store with generations in it, a state dir laid
//! out as the node lays it out, and the spec of a private cache in that store. Each owner's
//! tests (base cache, view store, committer, the façade) build on these.

use std::path::{Path, PathBuf};

use crate::engine::{self, CommitOptions, Engine, Store};
use crate::spec::{CommitOn, Mode, Policy, VolumeSpec};

/// The URL of the store under `tmp` (`tmp/store`).
pub(super) fn store_url(tmp: &Path) -> String {
    format!("file://{}", tmp.join("store").display())
}

/// Commits the next generation of `key` into the store under `tmp`: one file `f` holding
/// `content`, committed as the CLI would (its own state dir, `tmp/cli`).
pub(super) async fn commit(tmp: &Path, key: &str, content: &str) {
    let src = tmp.join("src").join(key);
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), content).unwrap();
    Engine::new(Store::open(&store_url(tmp)).unwrap(), "ci", tmp.join("cli"))
        .unwrap()
        .commit(key, &src, &CommitOptions::default())
        .await
        .unwrap();
}

/// The node's state dir under `tmp` with the directories the node makes at start, and the
/// node's engine for scope `ci` of the store under `tmp`.
pub(super) fn state(tmp: &Path) -> (PathBuf, Engine) {
    let state = tmp.join("state");
    for d in ["engine", "bases", "views", "trash"] {
        std::fs::create_dir_all(state.join(d)).unwrap();
    }
    let url = store_url(tmp);
    let engine = Engine::new(Store::open(&url).unwrap(), "ci", state.join("engine")).unwrap();
    (state, engine)
}

/// A private cache `ci/<key>` of the store under `tmp` that commits on success.
pub(super) fn spec(tmp: &Path, key: &str) -> VolumeSpec {
    VolumeSpec {
        store: store_url(tmp),
        scope: "ci".into(),
        key: key.into(),
        restore_keys: vec![],
        mode: Mode::Private,
        policy: Policy::PullPush,
        commit_on: CommitOn::Success,
        merge: engine::Merge::Replace,
        budget: None,
    }
}

//! Committing a pod's view from an overlayfs upper dir (what the node plugin does): real
//! overlay mounts (the tests run as root), changes made through the mounted view, the commit
//! reads only the upper dir, and a restore elsewhere equals the view byte for byte.

use std::path::Path;
use std::process::Command;

mod common;

use cachevol::engine::{CommitOptions, CommitOutcome, Engine, Store};

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

fn mount_overlay(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> bool {
    for d in [upper, work, merged] {
        std::fs::create_dir_all(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},metacopy=off,redirect_dir=off,index=off",
        lower.display(),
        upper.display(),
        work.display()
    );
    Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(merged)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test]
async fn a_view_is_committed_from_its_upper_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = Store::open(&format!("file://{}", t.join("store").display())).unwrap();
    let engine = Engine::new(store, "default", t.join("state")).unwrap();

    // Generation 1, restored as the node's base.
    let src = t.join("src");
    sh(&format!(
        "mkdir -p {0}/keep {0}/gone {0}/replace && echo a > {0}/keep/a && echo b > {0}/gone/b \
         && echo c > {0}/replace/c && echo top > {0}/file && head -c 3000000 /dev/urandom > {0}/big \
         && ln -s keep/a {0}/link",
        src.display()
    ));
    let opts = CommitOptions::default();
    engine.commit("k", &src, &opts).await.unwrap();
    let base = t.join("base");
    engine.restore("k", &[], &base).await.unwrap();

    let (upper, work, merged) = (t.join("upper"), t.join("work"), t.join("merged"));
    if !mount_overlay(&base, &upper, &work, &merged) {
        common::required::<()>(
            "a_view_is_committed_from_its_upper_dir",
            None,
            "overlayfs cannot be mounted here",
            common::Provider::CiRun(".ci/run runs the tests as root on a kernel with overlayfs"),
        );
        return;
    }

    // Nothing changed: unchanged, nothing uploaded, nothing read.
    let (r, tree) = engine
        .commit_overlay("k", &base, &upper, &opts)
        .await
        .unwrap();
    assert_eq!(
        r.outcome,
        CommitOutcome::Unchanged {
            generation: Some(1)
        }
    );
    assert_eq!((r.uploaded, r.files_read), (0, 0));
    assert!(tree.is_none());

    // A pod's work: modify, add, delete a dir, replace a dir with a file, touch the big file's
    // metadata only, a new symlink.
    let m = merged.display();
    sh(&format!(
        "echo changed >> {m}/keep/a && mkdir -p {m}/new/deep && echo n > {m}/new/deep/n \
         && rm -rf {m}/gone && rm -rf {m}/replace && echo now-a-file > {m}/replace \
         && chmod 600 {m}/file && ln -s ../file {m}/new/l"
    ));
    let expected = common::find_listing(&merged);
    sh(&format!("umount {m}"));

    let (r, tree) = engine
        .commit_overlay("k", &base, &upper, &opts)
        .await
        .unwrap();
    assert_eq!(r.outcome, CommitOutcome::Committed { generation: 2 });
    assert_eq!(
        r.files_read, 4,
        "only the upper dir's files are read: {r:?}"
    );
    assert!(
        r.uploaded < 100_000,
        "the 3 MB file was not uploaded again: {r:?}"
    );
    let tree = tree.unwrap();
    assert!(tree.entries.iter().all(|e| !e.path.starts_with("gone")));

    let out = t.join("restored");
    engine.restore("k", &[], &out).await.unwrap();
    assert_eq!(common::find_listing(&out), expected);
}

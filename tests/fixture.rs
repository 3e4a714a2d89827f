//! A real cache, byte for byte: the npm fixture of ../shared/bench/make-fixtures.sh (an npm
//! cache and an installed node_modules with .bin symlinks) round-trips through a file:// store
//! with contents, modes, symlinks and mtimes intact, and an unchanged commit uploads nothing.
//! `CACHEVOL_FIXTURE_DIR` names the fixture directory (.ci/run builds one); without it the
//! test is skipped, except under CI where it fails.

mod common;

use std::path::PathBuf;

use cachevol::engine::{CommitOptions, CommitOutcome, RestoreSource};
use common::*;

/// The fixture directory, or None (the test `test` skips) when `CACHEVOL_FIXTURE_DIR` is unset
/// outside CI ([`required`]).
fn fixture_dir(test: &str) -> Option<PathBuf> {
    let dir = required(
        test,
        env_nonempty("CACHEVOL_FIXTURE_DIR"),
        "CACHEVOL_FIXTURE_DIR is not set",
        Provider::CiRun(".ci/run builds the npm fixture (make-fixtures.sh OUT npm) and sets it"),
    )?;
    Some(PathBuf::from(dir))
}

async fn round_trip(name: &str) {
    let Some(fixtures) = fixture_dir(name) else {
        return;
    };
    let src = fixtures.join(name);
    assert!(src.is_dir(), "{} is missing", src.display());
    let original = tree(&src);
    let files = original
        .values()
        .filter(|n| matches!(n, Node::File { .. }))
        .count();
    assert!(
        files > 1000,
        "{name} looks too small to be the real fixture: {files} files"
    );

    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(&tmp.path().join("store"));
    let e = engine(&url, "default", &tmp.path().join("state"));
    let c = e
        .commit(name, &src, &CommitOptions::default())
        .await
        .unwrap();
    assert_eq!(c.outcome, CommitOutcome::Committed { generation: 1 });
    assert_eq!(c.files as usize, files);

    let dst = tmp.path().join("restored").join(name);
    let reader = engine(&url, "default", &tmp.path().join("state-reader"));
    let r = reader.restore(name, &[], &dst).await.unwrap();
    assert_eq!(
        r.source,
        RestoreSource::Key {
            key: name.into(),
            generation: 1
        }
    );
    assert_tree_maps_equal(&original, &tree(&dst), name);
    // The fixture itself was not touched by the commit.
    assert_tree_maps_equal(&original, &tree(&src), "source after commit");

    // A CI job that changed nothing commits nothing.
    let u = reader
        .commit(name, &dst, &CommitOptions::default())
        .await
        .unwrap();
    assert_eq!(
        u.outcome,
        CommitOutcome::Unchanged {
            generation: Some(1)
        }
    );
    assert_eq!(u.uploaded, 0);
    reader.verify(name, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_node_modules_round_trips_byte_for_byte() {
    round_trip("node_modules").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_cache_round_trips_byte_for_byte() {
    round_trip("npm-cache").await;
}

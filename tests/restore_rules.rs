//! What a restore keeps and removes in a directory that is not empty (docs/cli.md, "What a
//! restore keeps and removes").

mod common;

use cachevol::engine::CommitOptions;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_removes_only_what_cachevol_put_there() {
    let tmp = tempfile::tempdir().unwrap();
    let e = engine(
        &file_url(&tmp.path().join("store")),
        "default",
        &tmp.path().join("state"),
    );
    // A directory of the user's, never restored: two misses keep it as it was, and its commit
    // is the key's first generation.
    let d = tmp.path().join("d");
    write(&d.join("mine/f.txt"), b"the user's\n");
    e.restore("pip", &[], &d).await.unwrap();
    e.restore("pip", &[], &d).await.unwrap();
    assert_eq!(
        std::fs::read(d.join("mine/f.txt")).unwrap(),
        b"the user's\n"
    );
    let r = e
        .commit("pip", &d, &CommitOptions::default())
        .await
        .unwrap();
    assert_eq!(r.files, 1);
    assert!(e.load_generation("pip", 1).await.is_ok());

    // A hit, then a file of the user's beside the snapshot's, then a miss of another key: the
    // snapshot's files go, the user's stays, a directory holding it too.
    let d2 = tmp.path().join("d2");
    e.restore("pip", &[], &d2).await.unwrap();
    write(&d2.join("mine/added.txt"), b"added\n");
    write(&d2.join("other.txt"), b"other\n");
    e.restore("nothing-yet", &[], &d2).await.unwrap();
    assert!(!d2.join("mine/f.txt").exists());
    assert_eq!(
        std::fs::read(d2.join("mine/added.txt")).unwrap(),
        b"added\n"
    );
    assert_eq!(std::fs::read(d2.join("other.txt")).unwrap(), b"other\n");

    // A hit into a directory restored before: exactly the snapshot (what was added is gone).
    e.restore("pip", &[], &d2).await.unwrap();
    assert_eq!(listing(&d2), listing(&d));
}

//! Concurrent commits to one key (replace and union) and fencing on every store (the
//! scenarios of tests/common/store_suite.rs, each on file://, the S3 server and Azurite), and
//! the size budget.

mod common;

use cachevol::engine::{CommitOptions, CommitOutcome, Error};
use common::*;

on_every_store!(race_replace, race_union, fencing);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_budget_uploads_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(&tmp.path().join("store"));
    let e = engine(&url, "default", &tmp.path().join("state"));
    let dir = tmp.path().join("dir");
    write(&dir.join("small.txt"), b"0123456789");
    e.commit("k", &dir, &CommitOptions::default())
        .await
        .unwrap();
    let before = store_listing(&url).await;

    write(&dir.join("big.bin"), &noise(7, 2 << 20));
    let size = 10 + (2 << 20);
    let err = e
        .commit(
            "k",
            &dir,
            &CommitOptions {
                budget: Some(1 << 20),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    match &err {
        Error::OverBudget {
            key,
            size: s,
            budget,
        } => {
            assert_eq!((key.as_str(), *s, *budget), ("k", size, 1 << 20))
        }
        other => panic!("expected OverBudget, got {other:?}"),
    }
    assert!(err.to_string().contains("budget"), "{err}");
    assert_eq!(before, store_listing(&url).await, "nothing was uploaded");
    assert_eq!(e.generations("k").await.unwrap(), vec![1]);

    // At or under the budget the same commit goes through.
    let ok = e
        .commit(
            "k",
            &dir,
            &CommitOptions {
                budget: Some(size),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(ok.outcome, CommitOutcome::Committed { generation: 2 });
}

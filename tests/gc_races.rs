//! GC racing commits for real: a commit that reuses the packs of an old generation (which GC
//! drops by keep-last) and uploads packs of its own runs at the same time as GC, with the grace
//! period at 0 (on every store: tests/common/store_suite.rs) and at its default with packs made
//! old (file://, where a pack's age can be set). Whatever the timing, a commit that reports
//! success must have produced a generation that restores; a commit may fail instead, saying why.

mod common;

use cachevol::engine::GcPolicy;
use common::store_suite::{gc_check, gc_round, GcTally, GC_ROUNDS};
use common::*;

on_every_store!(gc_with_zero_grace_never_breaks_a_commit);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_with_default_grace_and_old_packs_never_breaks_a_commit_file_store() {
    let mut t = GcTally::default();
    for n in 0..GC_ROUNDS {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        let url = file_url(&store);
        gc_round(&url, Some(&store), GcPolicy::default().grace, n, &mut t).await;
    }
    gc_check("file://, grace 1h, packs 2h old", &t);
}

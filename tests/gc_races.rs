//! GC racing commits for real: a commit that reuses the packs of an old generation (which GC
//! drops by keep-last) and uploads packs of its own runs at the same time as GC, with the grace
//! period at 0 and at its default with packs made old. Whatever the timing, a commit that
//! reports success must have produced a generation that restores; a commit may fail instead,
//! saying why.

mod common;

use std::path::Path;
use std::time::Duration;

use cachevol::engine::{CommitOptions, CommitOutcome, GcPolicy, RestoreSource};
use common::*;

#[derive(Debug, Default)]
struct Tally {
    rounds: usize,
    /// Commits that reported success and whose generation restores the committed tree.
    good: usize,
    /// Commits that failed with an error (allowed: they said why).
    refused: Vec<String>,
    /// Commits that reported success but whose generation does not restore.
    broken: Vec<String>,
}

/// Makes every pack of the scope look two hours old (file:// only), so the default grace
/// period protects none of them.
fn age_packs(store: &Path) {
    let old = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
        - 7200 * 1_000_000_000;
    let packs = store.join("default/packs");
    for d in std::fs::read_dir(&packs).unwrap() {
        for p in std::fs::read_dir(d.unwrap().path()).unwrap() {
            set_mtime(&p.unwrap().path(), old);
        }
    }
}

async fn round(url: &str, local: Option<&Path>, grace: Duration, n: usize, t: &mut Tally) {
    let tmp = tempfile::tempdir().unwrap();
    let e = engine(url, "default", &tmp.path().join("state"));
    let seed = 1000 * n as u64;
    // Generation 1: the tree the racing commit is based on; its packs are its own.
    let dir = tmp.path().join("dir");
    write(&dir.join("a/stable.bin"), &noise(seed + 1, 300_000));
    write(&dir.join("b.txt"), format!("round {n}\n").as_bytes());
    let c = e
        .commit("k", &dir, &CommitOptions::default())
        .await
        .unwrap();
    assert_eq!(c.outcome, CommitOutcome::Committed { generation: 1 });
    // Generations 2..=4 from another machine: nothing in common with generation 1.
    let other = tmp.path().join("other");
    let e2 = engine(url, "default", &tmp.path().join("state-2"));
    for g in 2..=4u64 {
        write(&other.join("v.bin"), &noise(seed + 10 + g, 200_000));
        let c = e2
            .commit("k", &other, &CommitOptions::default())
            .await
            .unwrap();
        assert_eq!(c.outcome, CommitOutcome::Committed { generation: g });
    }
    if let Some(store) = local {
        age_packs(store);
    }
    // The commit reuses generation 1's packs and uploads a few of its own; GC (keep-last 3)
    // drops generation 1 while it runs.
    write(&dir.join("new.bin"), &noise(seed + 5, 3 << 20));
    write(
        &dir.join("b.txt"),
        format!("round {n}, changed\n").as_bytes(),
    );
    let gc_policy = GcPolicy {
        keep_last: 3,
        ttl: None,
        scope_budget: None,
        grace,
        dry_run: false,
    };
    let delay = Duration::from_millis((n as u64 * 13) % 90);
    let opts = CommitOptions::default();
    let (committed, gc) = tokio::join!(e.commit("k", &dir, &opts), async {
        tokio::time::sleep(delay).await;
        e2.gc(&gc_policy).await
    });
    gc.unwrap();
    t.rounds += 1;
    let generation = match committed {
        Ok(r) => match r.outcome {
            CommitOutcome::Committed { generation } => generation,
            other => panic!("round {n}: {other:?}"),
        },
        Err(err) => {
            t.refused.push(format!("round {n}: {err}"));
            return;
        }
    };
    // A successful commit's generation restores the committed tree, even after another GC.
    e2.gc(&gc_policy).await.unwrap();
    let back = tmp.path().join("back");
    let e3 = engine(url, "default", &tmp.path().join("state-3"));
    let source = RestoreSource::Key {
        key: "k".into(),
        generation,
    };
    let restored = match e3.restore_source(source, &back).await {
        Ok(_) if tree(&back) == tree(&dir) => e3
            .verify("k", Some(generation))
            .await
            .err()
            .map(|e| format!("verify: {e}")),
        Ok(_) => Some("restored tree differs".to_string()),
        Err(err) => Some(err.to_string()),
    };
    match restored {
        None => t.good += 1,
        Some(why) => t
            .broken
            .push(format!("round {n}: generation {generation}: {why}")),
    }
}

fn check(what: &str, t: &Tally) {
    eprintln!(
        "{what}: {} rounds, {} good, {} refused, {} broken",
        t.rounds,
        t.good,
        t.refused.len(),
        t.broken.len()
    );
    for r in &t.refused {
        eprintln!("  refused {r}");
    }
    assert!(
        t.broken.is_empty(),
        "{what}: commits reported success but their generation does not restore: {:#?}",
        t.broken
    );
    assert!(
        t.good * 2 >= t.rounds,
        "{what}: most commits should succeed: {t:#?}"
    );
}

const ROUNDS: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_with_zero_grace_never_breaks_a_commit_file_store() {
    let mut t = Tally::default();
    for n in 0..ROUNDS {
        let tmp = tempfile::tempdir().unwrap();
        let url = file_url(&tmp.path().join("store"));
        round(&url, None, Duration::ZERO, n, &mut t).await;
    }
    check("file://, grace 0s", &t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_with_default_grace_and_old_packs_never_breaks_a_commit_file_store() {
    let mut t = Tally::default();
    for n in 0..ROUNDS {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        let url = file_url(&store);
        round(&url, Some(&store), GcPolicy::default().grace, n, &mut t).await;
    }
    check("file://, grace 1h, packs 2h old", &t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_with_zero_grace_never_breaks_a_commit_s3_store() {
    let Some(base) = s3_url("gc-races") else {
        return;
    };
    let mut t = Tally::default();
    for n in 0..ROUNDS {
        round(&format!("{base}/{n}"), None, Duration::ZERO, n, &mut t).await;
    }
    check("S3, grace 0s", &t);
}

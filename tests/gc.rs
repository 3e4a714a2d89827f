//! Retention and garbage collection: keep the last N generations, drop keys unused for a TTL,
//! evict least recently used keys past a scope budget, keep young unreferenced packs for a
//! grace period, delete nothing in a dry run, and never delete what a kept generation needs.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cachevol::engine::{CommitOptions, CommitOutcome, Engine, GcPolicy, RestoreSource};
use common::*;

const DAY: i64 = 86_400 * 1_000_000_000;

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// Makes every generation object of `key` look `age_days` old (what GC sees as its last write).
fn backdate(store: &Path, key: &str, age_days: i64) {
    let dir = store.join("default/manifests").join(key);
    for item in std::fs::read_dir(&dir).unwrap() {
        set_mtime(&item.unwrap().path(), now_ns() - age_days * DAY);
    }
}

fn policy() -> GcPolicy {
    GcPolicy {
        keep_last: 100,
        ttl: None,
        scope_budget: None,
        grace: Duration::ZERO,
        dry_run: false,
    }
}

async fn commit(e: &Engine, key: &str, dir: &Path) -> u64 {
    match e
        .commit(key, dir, &CommitOptions::default())
        .await
        .unwrap()
        .outcome
    {
        CommitOutcome::Committed { generation } => generation,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_last_and_grace() {
    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(&tmp.path().join("store"));
    let e = engine(&url, "default", &tmp.path().join("state"));
    let dir = tmp.path().join("dir");
    write(&dir.join("stable.bin"), &noise(1, 400_000));
    for i in 1..=5u64 {
        write(&dir.join("v.bin"), &noise(100 + i, 300_000));
        assert_eq!(commit(&e, "k", &dir).await, i);
    }
    let mut refs = Vec::new();
    for g in 1..=5 {
        refs.push(referenced_packs(&e, "k", g).await);
    }
    let live: BTreeSet<String> = refs[3].union(&refs[4]).cloned().collect();
    let all = packs_in(&store_listing(&url).await, "default");
    let garbage: BTreeSet<String> = all.difference(&live).cloned().collect();
    assert!(
        !garbage.is_empty(),
        "old generations had packs of their own"
    );

    // Generations beyond the last 2 go; their packs are young, so they stay for now.
    let r = e
        .gc(&GcPolicy {
            keep_last: 2,
            grace: Duration::from_secs(3600),
            ..policy()
        })
        .await
        .unwrap();
    assert_eq!(r.generations_deleted, 3, "{r:?}");
    assert_eq!(e.generations("k").await.unwrap(), vec![4, 5]);
    assert_eq!(r.packs_deleted, 0, "{r:?}");
    assert_eq!(r.packs_young, garbage.len(), "{r:?}");
    assert_eq!(packs_in(&store_listing(&url).await, "default"), all);

    // Past the grace period they go, and only they.
    let r = e
        .gc(&GcPolicy {
            keep_last: 2,
            ..policy()
        })
        .await
        .unwrap();
    assert_eq!(r.generations_deleted, 0, "{r:?}");
    assert_eq!(r.packs_deleted, garbage.len(), "{r:?}");
    assert_eq!(r.packs_kept, live.len(), "{r:?}");
    assert_eq!(packs_in(&store_listing(&url).await, "default"), live);
    e.verify("k", Some(4)).await.unwrap();
    e.verify("k", Some(5)).await.unwrap();
    let check = tmp.path().join("check");
    engine(&url, "default", &tmp.path().join("state2"))
        .restore("k", &[], &check)
        .await
        .unwrap();
    assert_trees_equal(&dir, &check);

    // The newest generation is never deleted, even with keep_last 0.
    let r = e
        .gc(&GcPolicy {
            keep_last: 0,
            ..policy()
        })
        .await
        .unwrap();
    assert_eq!(r.generations_deleted, 1);
    assert_eq!(e.generations("k").await.unwrap(), vec![5]);
    e.verify("k", Some(5)).await.unwrap();

    // A commit from a directory whose base packs were collected re-uploads what is missing.
    write(&dir.join("new.txt"), b"after gc\n");
    assert_eq!(commit(&e, "k", &dir).await, 6);
    e.verify("k", Some(6)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_drops_unused_keys_but_not_recently_restored_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let url = file_url(&store);
    let e = engine(&url, "default", &tmp.path().join("state"));
    for (key, seed) in [("restored", 1), ("stale", 2), ("fresh", 3)] {
        let dir = tmp.path().join(key);
        write(&dir.join("data.bin"), &noise(seed, 200_000));
        commit(&e, key, &dir).await;
    }
    let stale_packs = referenced_packs(&e, "stale", 1).await;
    backdate(&store, "restored", 3);
    backdate(&store, "stale", 3);
    // "restored" was written long ago but restored just now: it is in use.
    e.restore("restored", &[], &tmp.path().join("r1"))
        .await
        .unwrap();

    let r = e
        .gc(&GcPolicy {
            ttl: Some(Duration::from_secs(86_400)),
            ..policy()
        })
        .await
        .unwrap();
    assert_eq!(r.keys_expired, vec!["stale".to_string()], "{r:?}");
    assert_eq!(r.generations_deleted, 1);
    assert!(e.generations("stale").await.unwrap().is_empty());
    assert!(!store.join("default/heads/stale").exists());
    let r2 = e
        .restore("stale", &[], &tmp.path().join("s"))
        .await
        .unwrap();
    assert_eq!(r2.source, RestoreSource::Miss);
    // Its packs went with it; the other keys are whole.
    let packs = packs_in(&store_listing(&url).await, "default");
    assert!(packs.is_disjoint(&stale_packs), "{r:?}");
    for key in ["restored", "fresh"] {
        e.verify(key, None).await.unwrap();
        let check = tmp.path().join(format!("check-{key}"));
        engine(&url, "default", &tmp.path().join("state2"))
            .restore(key, &[], &check)
            .await
            .unwrap();
        assert_trees_equal(&tmp.path().join(key), &check);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_with_real_time_passing() {
    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(&tmp.path().join("store"));
    let e = engine(&url, "default", &tmp.path().join("state"));
    let old = tmp.path().join("old");
    write(&old.join("f"), b"old\n");
    commit(&e, "old", &old).await;
    // Real time passes until the store's clock puts "old" past the TTL as gc counts it (whole
    // seconds since its newest manifest object was written), not for a guessed while.
    let ttl = Duration::from_secs(2);
    let written = std::fs::read_dir(tmp.path().join("store/default/manifests/old"))
        .unwrap()
        .map(|e| {
            let modified = e.unwrap().metadata().unwrap().modified().unwrap();
            modified.duration_since(UNIX_EPOCH).unwrap().as_secs()
        })
        .max()
        .expect("old has a generation");
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while now() - written <= ttl.as_secs() {
        assert!(Instant::now() < deadline, "the clock does not move");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new = tmp.path().join("new");
    write(&new.join("f"), b"new\n");
    commit(&e, "new", &new).await;
    let r = e
        .gc(&GcPolicy {
            ttl: Some(ttl),
            ..policy()
        })
        .await
        .unwrap();
    assert_eq!(r.keys_expired, vec!["old".to_string()], "{r:?}");
    assert_eq!(e.generations("new").await.unwrap(), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_budget_evicts_least_recently_used_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let url = file_url(&store);
    let e = engine(&url, "default", &tmp.path().join("state"));
    for (key, seed) in [("k1", 1), ("k2", 2), ("k3", 3)] {
        let dir = tmp.path().join(key);
        write(&dir.join("data.bin"), &noise(seed, 1 << 20));
        commit(&e, key, &dir).await;
    }
    // Written long ago in the order k1, k2, k3; then k1 is restored (used) now. Least recently
    // used first: k2, k3, k1 — not the alphabetical or the commit order.
    backdate(&store, "k1", 3);
    backdate(&store, "k2", 2);
    backdate(&store, "k3", 1);
    e.restore("k1", &[], &tmp.path().join("r1")).await.unwrap();

    // A budget over the total evicts nothing.
    let r = e
        .gc(&GcPolicy {
            scope_budget: Some(4 << 20),
            ..policy()
        })
        .await
        .unwrap();
    assert!(r.keys_evicted.is_empty(), "{r:?}");

    // Room for two of the three: the least recently used goes.
    let r = e
        .gc(&GcPolicy {
            scope_budget: Some(5 << 19),
            ..policy()
        })
        .await
        .unwrap();
    assert_eq!(r.keys_evicted, vec!["k2".to_string()], "{r:?}");
    assert!(e.generations("k2").await.unwrap().is_empty());
    e.verify("k1", None).await.unwrap();
    e.verify("k3", None).await.unwrap();
    let stored: u64 = store_listing(&url)
        .await
        .iter()
        .filter(|(k, _)| k.contains("/packs/"))
        .map(|(_, s)| s)
        .sum();
    assert!(
        stored <= 5 << 19,
        "packs hold {stored} bytes after eviction"
    );

    // Room for one: k3 goes next, the recently used k1 stays.
    let r = e
        .gc(&GcPolicy {
            scope_budget: Some(3 << 19),
            ..policy()
        })
        .await
        .unwrap();
    assert_eq!(r.keys_evicted, vec!["k3".to_string()], "{r:?}");
    let check = tmp.path().join("check");
    engine(&url, "default", &tmp.path().join("state2"))
        .restore("k1", &[], &check)
        .await
        .unwrap();
    assert_trees_equal(&tmp.path().join("k1"), &check);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packs_shared_with_a_surviving_key_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let url = file_url(&store);
    let e = engine(&url, "default", &tmp.path().join("state"));
    let main = tmp.path().join("main");
    write(&main.join("big.bin"), &noise(1, 2 << 20));
    commit(&e, "main", &main).await;
    // A branch cache restored from main shares main's packs.
    let branch = tmp.path().join("branch");
    e.restore("branch", &["main".into()], &branch)
        .await
        .unwrap();
    write(&branch.join("extra.txt"), b"branch\n");
    let c = e
        .commit("branch", &branch, &CommitOptions::default())
        .await
        .unwrap();
    assert!(c.uploaded < 100_000, "{c:?}");
    // main expires (its last use was the branch's fallback restore: made old here); its data
    // lives on in the branch.
    backdate(&store, "main", 10);
    let used = store.join("default/used/main");
    assert!(used.exists(), "a fallback restore counts as a use of main");
    std::fs::write(&used, (now_ns() / 1_000_000_000 - 10 * 86_400).to_string()).unwrap();
    let r = e
        .gc(&GcPolicy {
            ttl: Some(Duration::from_secs(86_400)),
            ..policy()
        })
        .await
        .unwrap();
    assert_eq!(r.keys_expired, vec!["main".to_string()], "{r:?}");
    e.verify("branch", None).await.unwrap();
    let check = tmp.path().join("check");
    engine(&url, "default", &tmp.path().join("state2"))
        .restore("branch", &[], &check)
        .await
        .unwrap();
    assert_trees_equal(&branch, &check);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_deletes_nothing_and_reports_what_a_real_run_does() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let url = file_url(&store);
    let e = engine(&url, "default", &tmp.path().join("state"));
    let dir = tmp.path().join("dir");
    for i in 1..=3u64 {
        write(&dir.join("v.bin"), &noise(i, 200_000));
        commit(&e, "k", &dir).await;
    }
    let old = tmp.path().join("old");
    write(&old.join("f.bin"), &noise(9, 100_000));
    commit(&e, "old", &old).await;
    backdate(&store, "old", 5);
    let p = GcPolicy {
        keep_last: 1,
        ttl: Some(Duration::from_secs(86_400)),
        dry_run: true,
        ..policy()
    };

    let before = listing(&store);
    let dry = e.gc(&p).await.unwrap();
    assert!(dry.dry_run);
    assert_eq!(before, listing(&store), "a dry run changes nothing");
    assert_eq!(dry.keys_expired, vec!["old".to_string()]);
    assert_eq!(dry.generations_deleted, 3);
    assert!(dry.packs_deleted > 0 && dry.bytes_freed > 0, "{dry:?}");
    assert_eq!(e.generations("k").await.unwrap(), vec![1, 2, 3]);
    assert_eq!(e.generations("old").await.unwrap(), vec![1]);

    let real = e
        .gc(&GcPolicy {
            dry_run: false,
            ..p
        })
        .await
        .unwrap();
    assert!(!real.dry_run);
    assert_eq!(real.keys_expired, dry.keys_expired);
    assert_eq!(real.generations_deleted, dry.generations_deleted);
    assert_eq!(real.packs_deleted, dry.packs_deleted);
    assert_eq!(real.bytes_freed, dry.bytes_freed);
    let after = listing(&store);
    let freed: u64 = before
        .iter()
        .filter(|(k, _)| !after.contains_key(*k) && k.to_string_lossy().contains("packs/"))
        .map(|(_, s)| s)
        .sum();
    assert_eq!(freed, real.bytes_freed);
    assert_eq!(e.generations("k").await.unwrap(), vec![3]);
    e.verify("k", None).await.unwrap();
}

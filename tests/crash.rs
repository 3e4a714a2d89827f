//! Crash safety: the `cachevol` binary killed in the middle of a commit (after its packs are
//! uploaded, then after its generation object is created) never leaves the cache unreadable,
//! and GC then removes the garbage and nothing a kept generation references.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use cachevol::engine::{GcPolicy, RestoreSource};
use common::*;

fn cachevol(url: &str, state: &Path, args: &[&str], fault: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachevol"));
    cmd.arg("--store")
        .arg(url)
        .arg("--state-dir")
        .arg(state)
        .arg("--quiet")
        .args(args)
        .env_remove("CACHEVOL_FAULT");
    if let Some(f) = fault {
        cmd.env("CACHEVOL_FAULT", f);
    }
    cmd.output().expect("run cachevol")
}

fn assert_aborted(out: &std::process::Output, point: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "cachevol should have aborted at {point}: {:?}\n{stderr}",
        out.status
    );
    assert!(stderr.contains(point), "{stderr}");
}

fn head_hint(store: &Path, key: &str) -> u64 {
    let data = std::fs::read(store.join("default/heads").join(key)).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&data).unwrap();
    v["generation"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_commits_leave_the_cache_readable_and_gc_collects_their_garbage() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let url = file_url(&store);
    let state = tmp.path().join("state");
    let dir = tmp.path().join("work");
    write(&dir.join("a.txt"), b"generation one\n");
    write(&dir.join("data/one.bin"), &noise(1, 1 << 20));

    let out = cachevol(&url, &state, &["commit", "k", dir.to_str().unwrap()], None);
    assert!(out.status.success(), "{out:?}");
    let gen1 = tree(&dir);
    let e = engine(&url, "default", &tmp.path().join("state-check"));
    assert_eq!(e.generations("k").await.unwrap(), vec![1]);
    let packs0 = packs_in(&store_listing(&url).await, "default");

    // 1. Killed after uploading its packs, before the generation object.
    write(&dir.join("a.txt"), b"attempt one\n");
    write(&dir.join("data/crash1.bin"), &noise(11, 3 << 20));
    let out = cachevol(
        &url,
        &state,
        &["commit", "k", dir.to_str().unwrap()],
        Some("after-packs"),
    );
    assert_aborted(&out, "after-packs");
    let packs1 = packs_in(&store_listing(&url).await, "default");
    let orphans: BTreeSet<String> = packs1.difference(&packs0).cloned().collect();
    assert!(
        !orphans.is_empty(),
        "the killed commit had uploaded packs before it died"
    );
    assert_eq!(e.generations("k").await.unwrap(), vec![1]);
    assert_eq!(e.newest("k").await.unwrap(), Some(1));
    let check = tmp.path().join("check1");
    let r = e.restore("k", &[], &check).await.unwrap();
    assert_eq!(
        r.source,
        RestoreSource::Key {
            key: "k".into(),
            generation: 1
        }
    );
    assert_tree_maps_equal(
        &gen1,
        &tree(&check),
        "generation 1 after a crash after packs",
    );

    // 2. Killed after creating the generation object, before moving the head hint.
    std::fs::remove_file(dir.join("data/crash1.bin")).unwrap();
    write(&dir.join("a.txt"), b"generation two\n");
    write(&dir.join("data/two.bin"), &noise(12, 2 << 20));
    let gen2 = tree(&dir);
    let out = cachevol(
        &url,
        &state,
        &["commit", "k", dir.to_str().unwrap()],
        Some("after-manifest"),
    );
    assert_aborted(&out, "after-manifest");
    assert_eq!(e.generations("k").await.unwrap(), vec![1, 2]);
    assert_eq!(head_hint(&store, "k"), 1, "the head hint was not moved");
    assert_eq!(
        e.newest("k").await.unwrap(),
        Some(2),
        "the complete generation is found although the hint lags"
    );
    let check = tmp.path().join("check2");
    let r = e.restore("k", &[], &check).await.unwrap();
    assert_eq!(
        r.source,
        RestoreSource::Key {
            key: "k".into(),
            generation: 2
        }
    );
    assert_tree_maps_equal(
        &gen2,
        &tree(&check),
        "generation 2 written before the crash",
    );
    // Through the binary too.
    let check = tmp.path().join("check2-cli");
    let out = cachevol(
        &url,
        &tmp.path().join("state-cli"),
        &["restore", "k", check.to_str().unwrap()],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    assert_tree_maps_equal(&gen2, &tree(&check), "generation 2 restored by the CLI");
    // The previous generation is intact as well.
    e.verify("k", Some(1)).await.unwrap();
    e.verify("k", Some(2)).await.unwrap();

    // 3. GC: what the first crash uploaded is garbage, but only once past the grace period.
    let mut live = referenced_packs(&e, "k", 1).await;
    live.extend(referenced_packs(&e, "k", 2).await);
    let garbage: BTreeSet<String> = orphans.difference(&live).cloned().collect();
    assert!(
        !garbage.is_empty(),
        "the first crash left packs no generation references"
    );
    let before_gc = store_listing(&url).await;
    let young = e
        .gc(&GcPolicy {
            keep_last: 3,
            ttl: None,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(young.packs_deleted, 0, "{young:?}");
    assert_eq!(young.packs_young, garbage.len(), "{young:?}");
    assert_eq!(
        before_gc,
        store_listing(&url).await,
        "young garbage is kept"
    );

    // The killed commits' in-flight markers protect what they uploaded until they go stale
    // (15 minutes without a rewrite): make them that old.
    let inflight = std::path::Path::new(url.trim_start_matches("file://")).join("default/inflight");
    let stale = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
        - 20 * 60 * 1_000_000_000;
    for m in std::fs::read_dir(&inflight).unwrap() {
        set_mtime(&m.unwrap().path(), stale);
    }
    let out = cachevol(
        &url,
        &state,
        &["gc", "--grace", "0s", "--keep-last", "3"],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let after = packs_in(&store_listing(&url).await, "default");
    assert_eq!(
        after, live,
        "GC leaves exactly the packs kept generations reference"
    );
    assert!(after.is_disjoint(&garbage));
    e.verify("k", Some(1)).await.unwrap();
    e.verify("k", Some(2)).await.unwrap();
    let check = tmp.path().join("check3");
    e.restore("k", &[], &check).await.unwrap();
    assert_tree_maps_equal(&gen2, &tree(&check), "generation 2 after GC");

    // The writer that crashed can commit again; its next commit builds on the store as it is.
    write(&dir.join("a.txt"), b"generation three\n");
    let out = cachevol(&url, &state, &["commit", "k", dir.to_str().unwrap()], None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(e.newest("k").await.unwrap(), Some(3));
    let check = tmp.path().join("check4");
    e.restore("k", &[], &check).await.unwrap();
    assert_trees_equal(&dir, &check);
    e.verify("k", Some(3)).await.unwrap();
}

//! One suite for every object store: the tests that read the same on each backend (a round trip
//! of a tree with everything a cache holds, an incremental second commit, restores that read
//! only part of a pack, racing commits), each taking the store URL of the test that calls it.
//! tests/azure.rs and tests/gcs.rs call them with their backend's URL.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use cachevol::engine::{CommitOptions, CommitOutcome, RestoreSource};
use object_store::{ObjectStoreExt, PutPayload};

use super::*;

pub async fn round_trip(url: String) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    // Nested and empty dirs, empty files, a 12 MiB file of several chunks, symlinks (relative,
    // absolute, dangling), modes 0755/0600/0444 and a 0555 dir, nanosecond mtimes.
    make_rich_tree(&src, 21);
    let before = tree(&src);

    let writer = engine(&url, "default", &tmp.path().join("state-writer"));
    let report = writer
        .commit("rich", &src, &CommitOptions::default())
        .await
        .unwrap();
    assert_eq!(report.outcome, CommitOutcome::Committed { generation: 1 });
    assert!(report.uploaded > 12 << 20, "{report:?}");
    assert_tree_maps_equal(&before, &tree(&src), "source after commit");

    // Another machine restores into a fresh directory.
    let dst = tmp.path().join("elsewhere/dst");
    let reader = engine(&url, "default", &tmp.path().join("state-reader"));
    let r = reader.restore("rich", &[], &dst).await.unwrap();
    assert_eq!(
        r.source,
        RestoreSource::Key {
            key: "rich".into(),
            generation: 1
        }
    );
    assert_eq!(r.files, 50, "{r:?}");
    assert!(r.downloaded > 12 << 20, "{r:?}");
    assert_trees_equal(&src, &dst);

    // Again over the restored tree: idempotent.
    reader.restore("rich", &[], &dst).await.unwrap();
    assert_trees_equal(&src, &dst);

    // Every pack and chunk of the generation checks out as stored in Azure.
    reader.verify("rich", None).await.unwrap();
}

pub async fn second_commit_uploads_only_the_change(url: String) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_rich_tree(&src, 22);
    let opts = CommitOptions::default();
    let first = engine(&url, "default", &tmp.path().join("state-a"))
        .commit("main", &src, &opts)
        .await
        .unwrap();
    assert_eq!(first.outcome, CommitOutcome::Committed { generation: 1 });

    // A job elsewhere restores, commits unchanged (nothing happens), changes one small file.
    let e = engine(&url, "default", &tmp.path().join("state-b"));
    let work = tmp.path().join("work");
    e.restore("main", &[], &work).await.unwrap();
    let unchanged = e.commit("main", &work, &opts).await.unwrap();
    assert_eq!(
        unchanged.outcome,
        CommitOutcome::Unchanged {
            generation: Some(1)
        }
    );
    assert_eq!(unchanged.uploaded, 0);

    std::fs::write(work.join("many/f007.json"), b"{\"changed\":true}").unwrap();
    let listing_before = store_listing(&url).await;
    let second = e.commit("main", &work, &opts).await.unwrap();
    assert_eq!(second.outcome, CommitOutcome::Committed { generation: 2 });
    assert_eq!(second.files_read, 1, "only the changed file is read");
    assert!(second.uploaded > 0);
    assert!(
        second.uploaded * 50 < first.uploaded,
        "a one-file change uploads little: {} vs {}",
        second.uploaded,
        first.uploaded
    );
    let listing_after = store_listing(&url).await;
    let new_bytes: u64 = listing_after
        .iter()
        .filter(|(k, _)| !listing_before.contains_key(*k) && !k.contains("/heads/"))
        .map(|(_, s)| s)
        .sum();
    assert!(
        new_bytes * 50 < first.uploaded,
        "the store grew by {new_bytes} bytes after a one-file change"
    );

    // Committing again writes nothing new.
    let again = e.commit("main", &work, &opts).await.unwrap();
    assert_eq!(
        again.outcome,
        CommitOutcome::Unchanged {
            generation: Some(2)
        }
    );
    assert_eq!(
        listing_after.keys().collect::<Vec<_>>(),
        store_listing(&url).await.keys().collect::<Vec<_>>(),
        "an unchanged commit writes nothing"
    );

    let fresh = tmp.path().join("fresh");
    engine(&url, "default", &tmp.path().join("state-c"))
        .restore("main", &[], &fresh)
        .await
        .unwrap();
    assert_trees_equal(&work, &fresh);
}

/// Ranged GETs: the store's own `get_range` at the start, middle and end of an object, and a
/// restore of a generation that needs only a small part of its packs.
pub async fn restore_reads_part_of_a_pack(url: String) {
    let store = open(&url);
    let (raw, prefix) = raw_store(&url);
    let data = Bytes::from(noise(7, 3 << 20));
    let loc = prefix.clone().join("ranged");
    raw.put(&loc, PutPayload::from_bytes(data.clone()))
        .await
        .unwrap();
    let len = data.len() as u64;
    for range in [0..1, 0..4096, 1_000_000..1_500_001, len - 10..len, 0..len] {
        let got = store.get_range(&loc, range.clone()).await.unwrap();
        assert_eq!(
            got,
            data.slice(range.start as usize..range.end as usize),
            "{range:?}"
        );
    }
    assert!(
        store.get_range(&loc, len - 10..len + 10).await.is_err(),
        "a range past the end is an error, not silently short data"
    );

    // Generation 1: a large incompressible file plus small files, in packs of about 8 MiB.
    // Generation 2 drops the large file: its small files sit in packs mostly holding the large
    // file's chunks, so a fresh restore must fetch only their byte ranges.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src.join("big.bin"), &noise(8, 12 << 20));
    for i in 0..20 {
        write(
            &src.join(format!("small/s{i:02}.txt")),
            format!("small file {i}\n").repeat(i + 1).as_bytes(),
        );
    }
    let e = engine(&url, "default", &tmp.path().join("state-a"));
    e.commit("k", &src, &CommitOptions::default())
        .await
        .unwrap();
    std::fs::remove_file(src.join("big.bin")).unwrap();
    let c = e
        .commit("k", &src, &CommitOptions::default())
        .await
        .unwrap();
    assert_eq!(c.outcome, CommitOutcome::Committed { generation: 2 });

    let listing = store_listing(&url).await;
    let referenced = referenced_packs(&e, "k", 2).await;
    let referenced_bytes: u64 = listing
        .iter()
        .filter(|(k, _)| referenced.iter().any(|p| k.ends_with(p.as_str())))
        .map(|(_, s)| s)
        .sum();
    assert!(
        referenced_bytes > 4 << 20,
        "generation 2's packs hold the large file's chunks too: {referenced_bytes} bytes"
    );

    let dst = tmp.path().join("dst");
    let r = engine(&url, "default", &tmp.path().join("state-b"))
        .restore("k", &[], &dst)
        .await
        .unwrap();
    assert_trees_equal(&src, &dst);
    assert!(
        r.downloaded < 1 << 20,
        "only the small files' frames are fetched: {} of {referenced_bytes} bytes",
        r.downloaded
    );
}

/// Commits racing on one key each get their own generation, and the head hint (a
/// compare-and-swap) ends on the newest.
pub async fn concurrent_commits_get_distinct_generations(url: String) {
    const WRITERS: usize = 4;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let base = root.join("base");
    write(&base.join("shared.txt"), b"base\n");
    write(&base.join("big.bin"), &noise(31, 600_000));
    let e0 = engine(&url, "default", &root.join("state-0"));
    e0.commit("race", &base, &CommitOptions::default())
        .await
        .unwrap();

    let mut jobs = Vec::new();
    for i in 0..WRITERS {
        let e = engine(&url, "default", &root.join(format!("state-w{i}")));
        let dir = root.join(format!("w{i}"));
        e.restore("race", &[], &dir).await.unwrap();
        write(&dir.join("shared.txt"), format!("writer {i}\n").as_bytes());
        write(
            &dir.join(format!("own-{i}.bin")),
            &noise(40 + i as u64, 100_000),
        );
        jobs.push((e, dir));
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for (i, (e, dir)) in jobs.into_iter().enumerate() {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let opts = CommitOptions {
                writer: format!("writer-{i}"),
                ..Default::default()
            };
            barrier.wait().await;
            (i, e.commit("race", &dir, &opts).await)
        }));
    }
    let mut by_generation = std::collections::BTreeMap::new();
    for t in tasks {
        let (i, report) = t.await.unwrap();
        let report = report.unwrap_or_else(|e| panic!("writer {i}: {e}"));
        let CommitOutcome::Committed { generation } = report.outcome else {
            panic!("writer {i} did not commit: {report:?}");
        };
        assert!(
            by_generation.insert(generation, i).is_none(),
            "two writers report generation {generation}"
        );
    }
    let reported: BTreeSet<u64> = by_generation.keys().copied().collect();
    assert_eq!(reported, (2..=WRITERS as u64 + 1).collect());
    assert_eq!(
        e0.generations("race").await.unwrap(),
        (1..=WRITERS as u64 + 1).collect::<Vec<_>>()
    );
    for (g, i) in &by_generation {
        let gen = e0.show("race", Some(*g)).await.unwrap();
        assert_eq!(gen.provenance.writer, format!("writer-{i}"));
    }
    let (raw, prefix) = raw_store(&url);
    let head = raw
        .get(&prefix.join("default").join("heads").join("race"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let head: serde_json::Value = serde_json::from_slice(&head).unwrap();
    assert_eq!(head["generation"], WRITERS as u64 + 1, "head hint: {head}");

    // The newest generation is the last writer's tree, whole.
    let newest = *by_generation.keys().last().unwrap();
    let dst = root.join("newest");
    engine(&url, "default", &root.join("state-check"))
        .restore("race", &[], &dst)
        .await
        .unwrap();
    assert_trees_equal(&root.join(format!("w{}", by_generation[&newest])), &dst);
}

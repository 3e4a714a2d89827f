//! One suite for every object store: the tests that read the same on each backend (a round
//! trip of a tree with everything a cache holds, incremental commits and restore-key fallback,
//! scope isolation, restores that read only part of a pack, racing commits with replace and
//! union, fencing, GC racing commits), each taking the store URL of the test that calls it.
//! [`on_every_store!`](crate::on_every_store) runs a scenario on file://, the S3 server and
//! Azurite (tests/roundtrip.rs, tests/races.rs, tests/gc_races.rs); tests/gcs.rs calls some of
//! them on a real bucket.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cachevol::engine::{
    CommitOptions, CommitOutcome, Engine, Error, GcPolicy, Merge, RestoreSource,
};
use object_store::{ObjectStoreExt, PutPayload};

use super::*;

/// One test per backend for each named scenario of this suite: `on_every_store!(round_trip)`
/// makes a module `round_trip` with the tests `file` (a file:// store in a temp dir, always
/// runs), `s3` (`CACHEVOL_TEST_S3_URL`) and `azure` (`CACHEVOL_TEST_AZ_URL`); the last two
/// are skipped with a message when their server is not configured, and fail when `CI` is set.
#[macro_export]
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn file() {
                let tmp = tempfile::tempdir().unwrap();
                let url = $crate::common::file_url(&tmp.path().join("store"));
                $crate::common::store_suite::$name(&url).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn s3() {
                let Some(url) = $crate::common::s3_url(stringify!($name)) else {
                    return;
                };
                $crate::common::store_suite::$name(&url).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn azure() {
                let Some(url) = $crate::common::az_url(stringify!($name)) else {
                    return;
                };
                $crate::common::store_suite::$name(&url).await;
            }
        }
    )*};
}

/// A tree with everything a cache holds, committed on one machine and restored on another
/// (again over the restored tree, and over a tree with stale content), then verified.
pub async fn round_trip(url: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_rich_tree(&src, 1);
    let before = tree(&src);

    let writer = engine(url, "default", &tmp.path().join("state-writer"));
    let report = writer
        .commit("rich", &src, &CommitOptions::default())
        .await
        .unwrap();
    assert_eq!(report.outcome, CommitOutcome::Committed { generation: 1 });
    assert!(
        report.uploaded > 12 << 20,
        "the first commit uploads the incompressible 12 MiB file: {report:?}"
    );
    assert!(
        report.new_chunks >= 10,
        "the large file is cut into several chunks: {report:?}"
    );
    // Committing never alters the source tree.
    assert_tree_maps_equal(&before, &tree(&src), "source after commit");

    // Another machine (fresh state dir) restores into a fresh directory.
    let dst = tmp.path().join("elsewhere/dst");
    let reader = engine(url, "default", &tmp.path().join("state-reader"));
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

    // Restore records nothing inside the cache directory: the trees are equal, no extra files.
    // Restoring the same generation again over the restored tree is idempotent.
    let r2 = reader.restore("rich", &[], &dst).await.unwrap();
    assert_eq!(r2.source, r.source);
    assert_trees_equal(&src, &dst);

    // Restoring over a directory with stale content replaces what the snapshot has.
    std::fs::write(dst.join("a/b/c/deep.txt"), b"stale").unwrap();
    std::fs::remove_file(dst.join("rel-link")).unwrap();
    std::fs::write(dst.join("rel-link"), b"a file where a link was").unwrap();
    reader.restore("rich", &[], &dst).await.unwrap();
    assert_trees_equal(&src, &dst);

    // Every pack and chunk of the generation checks out as stored.
    reader.verify("rich", None).await.unwrap();
}

/// A second commit after a one-file change reads and uploads only that file; an unchanged
/// commit writes nothing; a branch key falls back to `main` by restore key and then has its own
/// snapshot; a key with nothing anywhere is a miss.
pub async fn incremental(url: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_rich_tree(&src, 2);
    let opts = CommitOptions::default();

    let first = engine(url, "default", &tmp.path().join("state-a"))
        .commit("main", &src, &opts)
        .await
        .unwrap();
    assert_eq!(first.outcome, CommitOutcome::Committed { generation: 1 });

    // A CI job elsewhere: restore, change one small file, commit.
    let e = engine(url, "default", &tmp.path().join("state-b"));
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
    assert_eq!(unchanged.files_read, 0, "an untouched tree is not read");

    std::fs::write(work.join("many/f007.json"), b"{\"changed\":true}").unwrap();
    let listing_before = store_listing(url).await;
    let second = e.commit("main", &work, &opts).await.unwrap();
    assert_eq!(second.outcome, CommitOutcome::Committed { generation: 2 });
    assert_eq!(
        second.files_read, 1,
        "only the changed file is read: {second:?}"
    );
    assert!(
        second.uploaded * 50 < first.uploaded,
        "a one-file change uploads little: {} vs first commit {}",
        second.uploaded,
        first.uploaded
    );
    assert!(second.uploaded > 0);
    let listing_after = store_listing(url).await;
    let new_bytes: u64 = listing_after
        .iter()
        .filter(|(k, _)| !listing_before.contains_key(*k) && !k.contains("/heads/"))
        .map(|(_, s)| s)
        .sum();
    assert!(
        new_bytes * 50 < first.uploaded,
        "the store grew by {new_bytes} bytes after a one-file change"
    );

    // Unchanged after committing: nothing uploaded, nothing new in the store.
    let again = e.commit("main", &work, &opts).await.unwrap();
    assert_eq!(
        again.outcome,
        CommitOutcome::Unchanged {
            generation: Some(2)
        }
    );
    assert_eq!(again.uploaded, 0);
    let listing_again = store_listing(url).await;
    assert_eq!(
        listing_after.keys().collect::<Vec<_>>(),
        listing_again.keys().collect::<Vec<_>>(),
        "an unchanged commit writes nothing"
    );

    // The change is what a fresh restore sees.
    let fresh = tmp.path().join("fresh");
    engine(url, "default", &tmp.path().join("state-c"))
        .restore("main", &[], &fresh)
        .await
        .unwrap();
    assert_trees_equal(&work, &fresh);

    // A branch cache: its key is empty, it falls back to `main`, and its commit goes to its own
    // key while uploading only what differs (chunks are shared within the scope).
    let branch = tmp.path().join("branch");
    let eb = engine(url, "default", &tmp.path().join("state-d"));
    let r = eb
        .restore("feature-x", &["nope".into(), "main".into()], &branch)
        .await
        .unwrap();
    assert_eq!(
        r.source,
        RestoreSource::RestoreKey {
            key: "main".into(),
            generation: 2
        }
    );
    assert_trees_equal(&work, &branch);
    write(&branch.join("a/new-in-branch.txt"), b"branch only\n");
    let c = eb.commit("feature-x", &branch, &opts).await.unwrap();
    assert_eq!(c.outcome, CommitOutcome::Committed { generation: 1 });
    assert!(
        c.uploaded * 50 < first.uploaded,
        "a branch commit restored from main uploads only the difference: {} bytes",
        c.uploaded
    );
    assert_eq!(eb.generations("feature-x").await.unwrap(), vec![1]);
    assert_eq!(eb.generations("main").await.unwrap(), vec![1, 2]);

    // Now the key has its own snapshot: it no longer falls back.
    let again = tmp.path().join("branch2");
    let r = eb
        .restore("feature-x", &["main".into()], &again)
        .await
        .unwrap();
    assert_eq!(
        r.source,
        RestoreSource::Key {
            key: "feature-x".into(),
            generation: 1
        }
    );
    assert_trees_equal(&branch, &again);
    // And main did not get the branch's file.
    let m = tmp.path().join("main2");
    eb.restore("main", &[], &m).await.unwrap();
    assert!(!m.join("a/new-in-branch.txt").exists());
    assert_trees_equal(&work, &m);

    // Nothing anywhere: a miss, the directory starts empty, and committing it uploads nothing.
    let empty = tmp.path().join("empty");
    let r = eb.restore("never", &["none".into()], &empty).await.unwrap();
    assert_eq!(r.source, RestoreSource::Miss);
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    let c = eb.commit("never", &empty, &opts).await.unwrap();
    assert_eq!(c.outcome, CommitOutcome::Unchanged { generation: None });
    assert_eq!(c.uploaded, 0);
}

/// Scopes share nothing: the same key in another scope is a miss, the same content is uploaded
/// again, and wiping one scope's objects leaves the others whole.
pub async fn scopes_isolate(url: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let a_src = tmp.path().join("a-src");
    let b_src = tmp.path().join("b-src");
    make_rich_tree(&a_src, 10);
    write(&b_src.join("only-b.txt"), b"team b\n");
    let a = engine(url, "team-a", &tmp.path().join("state"));
    let b = engine(url, "team-b", &tmp.path().join("state"));

    a.commit("npm", &a_src, &CommitOptions::default())
        .await
        .unwrap();
    // Same key, other scope: nothing there.
    let b_dst = tmp.path().join("b-dst");
    let r = b.restore("npm", &[], &b_dst).await.unwrap();
    assert_eq!(r.source, RestoreSource::Miss);
    assert_eq!(std::fs::read_dir(&b_dst).unwrap().count(), 0);
    assert_eq!(b.newest("npm").await.unwrap(), None);
    assert!(b.list_keys().await.unwrap().is_empty());

    b.commit("npm", &b_src, &CommitOptions::default())
        .await
        .unwrap();
    let a_dst = tmp.path().join("a-dst");
    a.restore("npm", &[], &a_dst).await.unwrap();
    assert_trees_equal(&a_src, &a_dst);
    assert!(!a_dst.join("only-b.txt").exists());
    let b_dst2 = tmp.path().join("b-dst2");
    b.restore("npm", &[], &b_dst2).await.unwrap();
    assert_trees_equal(&b_src, &b_dst2);

    // Scopes share no data: the same content committed in another scope is uploaded again,
    // and wiping one scope's data leaves the other intact.
    let c = engine(url, "team-c", &tmp.path().join("state"));
    let rep = c
        .commit("npm", &a_src, &CommitOptions::default())
        .await
        .unwrap();
    assert!(rep.uploaded > 12 << 20, "{rep:?}");
    let (raw, prefix) = raw_store(url);
    {
        use futures::TryStreamExt;
        use object_store::{ObjectStore, ObjectStoreExt};
        let all: Vec<_> = raw
            .list(Some(&prefix.clone().join("team-a")))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .unwrap();
        assert!(!all.is_empty());
        for loc in all {
            raw.delete(&loc).await.unwrap();
        }
    }
    let c_dst = tmp.path().join("c-dst");
    c.restore("npm", &[], &c_dst).await.unwrap();
    assert_trees_equal(&a_src, &c_dst);
    c.verify("npm", None).await.unwrap();
}

/// Ranged GETs: the store's own `get_range` at the start, middle and end of an object, and a
/// restore of a generation that needs only a small part of its packs.
pub async fn restore_reads_part_of_a_pack(url: &str) {
    let store = open(url);
    let (raw, prefix) = raw_store(url);
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
    let e = engine(url, "default", &tmp.path().join("state-a"));
    e.commit("k", &src, &CommitOptions::default())
        .await
        .unwrap();
    std::fs::remove_file(src.join("big.bin")).unwrap();
    let c = e
        .commit("k", &src, &CommitOptions::default())
        .await
        .unwrap();
    assert_eq!(c.outcome, CommitOutcome::Committed { generation: 2 });

    let listing = store_listing(url).await;
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
    let r = engine(url, "default", &tmp.path().join("state-b"))
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

const WRITERS: usize = 8;

fn base_tree(dir: &Path) {
    write(&dir.join("shared.txt"), b"base\n");
    write(&dir.join("base/keep.txt"), b"kept by everyone\n");
    write(
        &dir.join("base/remove-me.txt"),
        b"some writers delete this\n",
    );
    write(&dir.join("base/big.bin"), &noise(99, 600_000));
}

/// Each writer changes the shared file, adds files of its own, and every other writer deletes
/// a base file.
fn writer_changes(dir: &Path, i: usize) {
    write(
        &dir.join("shared.txt"),
        format!("writer {i}\n").repeat(i + 1).as_bytes(),
    );
    for j in 0..5 {
        write(
            &dir.join(format!("own-{i}/file-{j}.txt")),
            format!("writer {i} file {j}\n").as_bytes(),
        );
    }
    write(
        &dir.join(format!("unique-{i}.bin")),
        &noise(1000 + i as u64, 200_000),
    );
    if i.is_multiple_of(2) {
        std::fs::remove_file(dir.join("base/remove-me.txt")).unwrap();
    }
}

struct Race {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    url: String,
    /// Each writer's tree as it was committed, and the generation its commit reported.
    writers: Vec<(BTreeMap<PathBuf, Node>, u64)>,
}

async fn race(url: &str, merge: Merge) -> Race {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let base = root.join("base");
    base_tree(&base);
    let e0 = engine(url, "default", &root.join("state-0"));
    let c = e0
        .commit("race", &base, &CommitOptions::default())
        .await
        .unwrap();
    assert_eq!(c.outcome, CommitOutcome::Committed { generation: 1 });

    // Every writer restores generation 1 on its own "machine" and changes its copy.
    let mut jobs = Vec::new();
    for i in 0..WRITERS {
        let e = engine(url, "default", &root.join(format!("state-w{i}")));
        let dir = root.join(format!("w{i}"));
        let r = e.restore("race", &[], &dir).await.unwrap();
        assert_eq!(
            r.source,
            cachevol::engine::RestoreSource::Key {
                key: "race".into(),
                generation: 1
            }
        );
        writer_changes(&dir, i);
        jobs.push((e, dir));
    }

    // All commit at once.
    let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for (i, (e, dir)) in jobs.into_iter().enumerate() {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let opts = CommitOptions {
                merge,
                writer: format!("writer-{i}"),
                ..Default::default()
            };
            barrier.wait().await;
            let report = e.commit("race", &dir, &opts).await;
            (i, dir, report)
        }));
    }
    let mut writers = vec![(BTreeMap::new(), 0); WRITERS];
    for t in tasks {
        let (i, dir, report) = t.await.unwrap();
        let report = report.unwrap_or_else(|e| panic!("writer {i}: {e}"));
        let CommitOutcome::Committed { generation } = report.outcome else {
            panic!("writer {i} did not commit: {report:?}");
        };
        writers[i] = (tree(&dir), generation);
    }

    // Every commit got its own generation: exactly N new ones, none lost, none shared.
    let reported: BTreeSet<u64> = writers.iter().map(|(_, g)| *g).collect();
    let expected: BTreeSet<u64> = (2..=WRITERS as u64 + 1).collect();
    assert_eq!(reported, expected, "each writer reports its own generation");
    assert_eq!(
        e0.generations("race").await.unwrap(),
        (1..=WRITERS as u64 + 1).collect::<Vec<_>>()
    );
    assert_eq!(e0.newest("race").await.unwrap(), Some(WRITERS as u64 + 1));
    for g in 2..=WRITERS as u64 + 1 {
        let gen = e0.show("race", Some(g)).await.unwrap();
        let w = writers.iter().position(|(_, wg)| *wg == g).unwrap();
        assert_eq!(gen.provenance.writer, format!("writer-{w}"));
        let base = gen.provenance.base.expect("provenance names the base");
        assert_eq!((base.key.as_str(), base.generation), ("race", 1));
    }
    let store = open(url);
    if store.has_conditional_update() {
        // Where the store can compare-and-swap, the head hint ends on the last generation.
        let (raw, prefix) = raw_store(url);
        use object_store::ObjectStoreExt;
        let head = raw
            .get(&prefix.join("default").join("heads").join("race"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let head: serde_json::Value = serde_json::from_slice(&head).unwrap();
        assert_eq!(head["generation"], WRITERS as u64 + 1, "head hint: {head}");
    }
    Race {
        _tmp: tmp,
        root,
        url: url.to_string(),
        writers,
    }
}

/// Restores generation `g` of "race" (by rolling back to it, then restoring the newest).
async fn restore_generation(e: &Engine, g: u64, dir: &Path) -> BTreeMap<PathBuf, Node> {
    let newest = e.rollback("race", g, "test").await.unwrap();
    let r = e.restore("race", &[], dir).await.unwrap();
    assert_eq!(
        r.source,
        cachevol::engine::RestoreSource::Key {
            key: "race".into(),
            generation: newest
        }
    );
    tree(dir)
}

/// Writers racing on one key with `merge: replace`: each gets its own generation (the head
/// hint, a compare-and-swap where the store has one, ends on the newest), and every generation
/// is exactly the tree of the writer that reported it.
pub async fn race_replace(url: &str) {
    let r = race(url, Merge::Replace).await;
    // Last writer wins whole: every generation is exactly one writer's complete tree, the one
    // that reported it, never a mix.
    let e = engine(&r.url, "default", &r.root.join("state-check"));
    let mut newest_tree = None;
    for g in 2..=WRITERS as u64 + 1 {
        let dir = r.root.join(format!("check-{g}"));
        let restored = restore_generation(&e, g, &dir).await;
        let (expected, _) = r.writers.iter().find(|(_, wg)| *wg == g).unwrap();
        assert_tree_maps_equal(expected, &restored, &format!("generation {g}"));
        if g == WRITERS as u64 + 1 {
            newest_tree = Some(restored);
        }
    }
    // The newest is the last writer's tree: only its own files, not the others'.
    let newest_tree = newest_tree.unwrap();
    let own: Vec<_> = newest_tree
        .keys()
        .filter(|p| p.to_string_lossy().starts_with("unique-"))
        .collect();
    assert_eq!(own.len(), 1, "replace keeps one writer's files: {own:?}");
}

/// Writers racing on one key with `merge: union`: the newest generation holds every writer's
/// own files, and nothing else.
pub async fn race_union(url: &str) {
    let r = race(url, Merge::Union).await;
    let e = engine(&r.url, "default", &r.root.join("state-check"));
    let dir = r.root.join("union");
    let rep = e.restore("race", &[], &dir).await.unwrap();
    assert_eq!(
        rep.source,
        cachevol::engine::RestoreSource::Key {
            key: "race".into(),
            generation: WRITERS as u64 + 1
        }
    );
    let merged = tree(&dir);
    // Every writer's own files are in the newest generation, with their content and metadata.
    for (i, (t, _)) in r.writers.iter().enumerate() {
        for (p, node) in t {
            let s = p.to_string_lossy();
            if s.starts_with(&format!("own-{i}")) || s == format!("unique-{i}.bin") {
                assert_eq!(
                    merged.get(p),
                    Some(node),
                    "writer {i}'s {s} is missing or different in the union"
                );
            }
        }
    }
    // Files all writers kept are there; the shared file is one writer's version.
    for p in ["base/keep.txt", "base/big.bin"] {
        assert_eq!(merged.get(Path::new(p)), r.writers[0].0.get(Path::new(p)));
    }
    let shared = merged.get(Path::new("shared.txt")).unwrap();
    assert!(
        r.writers
            .iter()
            .any(|(t, _)| t.get(Path::new("shared.txt")) == Some(shared)),
        "shared.txt is one writer's version: {shared:?}"
    );
    // Nothing but the writers' entries.
    for p in merged.keys() {
        assert!(
            r.writers.iter().any(|(t, _)| t.contains_key(p)),
            "{} came from nowhere",
            p.display()
        );
    }
    assert_eq!(
        merged
            .keys()
            .filter(|p| p.to_string_lossy().starts_with("unique-"))
            .count(),
        WRITERS
    );
    e.verify("race", None).await.unwrap();
}

/// A fenced commit based on a generation that is no longer the newest is refused before it
/// uploads anything, also on retry; without fencing it takes the next generation.
pub async fn fencing(url: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    base_tree(&base);
    let e0 = engine(url, "default", &tmp.path().join("state-0"));
    e0.commit("locked", &base, &CommitOptions::default())
        .await
        .unwrap();
    write(&base.join("second.txt"), b"gen 2\n");
    e0.commit("locked", &base, &CommitOptions::default())
        .await
        .unwrap();

    let ea = engine(url, "default", &tmp.path().join("state-a"));
    let eb = engine(url, "default", &tmp.path().join("state-b"));
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ea.restore("locked", &[], &a).await.unwrap();
    eb.restore("locked", &[], &b).await.unwrap();
    write(&a.join("from-a.txt"), b"a\n");
    write(&b.join("from-b.txt"), &noise(5, 300_000));
    let fenced = CommitOptions {
        fence: true,
        ..Default::default()
    };

    let ca = ea.commit("locked", &a, &fenced).await.unwrap();
    assert_eq!(ca.outcome, CommitOutcome::Committed { generation: 3 });
    let head_before = store_listing(url)
        .await
        .into_iter()
        .collect::<BTreeMap<_, _>>();

    let err = eb.commit("locked", &b, &fenced).await.unwrap_err();
    match &err {
        Error::Fenced {
            key,
            restored,
            taken,
        } => {
            assert_eq!((key.as_str(), *restored, *taken), ("locked", 2, 3));
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert!(err.to_string().contains("fenced"), "{err}");
    // Nothing moved and nothing was uploaded: generations, head, last-use records and packs
    // are as before (the refusal comes before any upload).
    let head_after = store_listing(url)
        .await
        .into_iter()
        .collect::<BTreeMap<_, _>>();
    assert_eq!(head_before, head_after);
    assert_eq!(e0.generations("locked").await.unwrap(), vec![1, 2, 3]);
    // The refused writer stays refused on retry: it cannot sneak in as generation 4.
    assert!(matches!(
        eb.commit("locked", &b, &fenced).await,
        Err(Error::Fenced { .. })
    ));
    assert_eq!(e0.newest("locked").await.unwrap(), Some(3));
    let check = tmp.path().join("check");
    engine(url, "default", &tmp.path().join("state-c"))
        .restore("locked", &[], &check)
        .await
        .unwrap();
    assert_trees_equal(&a, &check);

    // Without fencing, the same writer takes the next free generation (replace).
    let cb = eb
        .commit("locked", &b, &CommitOptions::default())
        .await
        .unwrap();
    assert_eq!(cb.outcome, CommitOutcome::Committed { generation: 4 });
}

#[derive(Debug, Default)]
pub struct GcTally {
    pub rounds: usize,
    /// Commits that reported success and whose generation restores the committed tree.
    pub good: usize,
    /// Commits that failed with an error (allowed: they said why).
    pub refused: Vec<String>,
    /// Commits that reported success but whose generation does not restore.
    pub broken: Vec<String>,
}

/// Makes every pack of the scope look two hours old (file:// only), so the default grace
/// period protects none of them.
pub fn age_packs(store: &Path) {
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

/// One round of GC racing a commit on the store at `url` (a prefix of its own): `local` is
/// the store's directory when it is a file:// store whose packs are to be made old first.
pub async fn gc_round(url: &str, local: Option<&Path>, grace: Duration, n: usize, t: &mut GcTally) {
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

/// Asserts no commit that reported success lost its generation, and most succeeded.
pub fn gc_check(what: &str, t: &GcTally) {
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

/// Rounds of [`gc_round`] per run of [`gc_with_zero_grace_never_breaks_a_commit`].
pub const GC_ROUNDS: usize = 12;

/// GC with no grace period races a commit that reuses the packs of the generation GC drops:
/// a commit that reports success must have produced a generation that restores.
pub async fn gc_with_zero_grace_never_breaks_a_commit(url: &str) {
    let mut t = GcTally::default();
    for n in 0..GC_ROUNDS {
        gc_round(&format!("{url}/{n}"), None, Duration::ZERO, n, &mut t).await;
    }
    gc_check(&format!("{url}, grace 0s"), &t);
}

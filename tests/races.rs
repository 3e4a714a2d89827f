//! Concurrent commits to one key (replace and union), fencing, and the size budget.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cachevol::engine::{CommitOptions, CommitOutcome, Engine, Error, Merge};
use common::*;

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

async fn race_replace(url: &str) {
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

async fn race_union(url: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replace_file_store() {
    let tmp = tempfile::tempdir().unwrap();
    race_replace(&file_url(&tmp.path().join("store"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_union_file_store() {
    let tmp = tempfile::tempdir().unwrap();
    race_union(&file_url(&tmp.path().join("store"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replace_s3_store() {
    let Some(url) = s3_url("race-replace") else {
        return;
    };
    race_replace(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_union_s3_store() {
    let Some(url) = s3_url("race-union") else {
        return;
    };
    race_union(&url).await;
}

async fn fencing(url: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_file_store() {
    let tmp = tempfile::tempdir().unwrap();
    fencing(&file_url(&tmp.path().join("store"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_s3_store() {
    let Some(url) = s3_url("fencing") else {
        return;
    };
    fencing(&url).await;
}

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

//! Round trips on file:// and S3, incremental commits, restore-key fallback, and scope isolation.

mod common;

use cachevol::engine::{CommitOptions, CommitOutcome, RestoreSource};
use common::*;

async fn round_trip(url: &str) {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_trip_file_store() {
    let tmp = tempfile::tempdir().unwrap();
    round_trip(&file_url(&tmp.path().join("store"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_trip_s3_store() {
    let Some(url) = s3_url("round-trip") else {
        return;
    };
    round_trip(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn setuid_and_setgid_bits_are_not_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(&tmp.path().join("store"));
    let src = tmp.path().join("src");
    write(&src.join("suid"), b"#!/bin/sh\n");
    chmod(&src.join("suid"), 0o4755);
    std::fs::create_dir(src.join("sgid-dir")).unwrap();
    chmod(&src.join("sgid-dir"), 0o2775);
    let e = engine(&url, "default", &tmp.path().join("state"));
    e.commit("k", &src, &CommitOptions::default())
        .await
        .unwrap();
    let dst = tmp.path().join("dst");
    e.restore("k", &[], &dst).await.unwrap();
    let t = tree(&dst);
    match &t[std::path::Path::new("suid")] {
        Node::File { mode, .. } => assert_eq!(*mode, 0o755),
        other => panic!("{other:?}"),
    }
    match &t[std::path::Path::new("sgid-dir")] {
        Node::Dir { mode, .. } => assert_eq!(*mode, 0o775),
        other => panic!("{other:?}"),
    }
}

async fn incremental(url: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incremental_file_store() {
    let tmp = tempfile::tempdir().unwrap();
    incremental(&file_url(&tmp.path().join("store"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incremental_s3_store() {
    let Some(url) = s3_url("incremental") else {
        return;
    };
    incremental(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletions_and_kind_changes_are_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(&tmp.path().join("store"));
    let e = engine(&url, "default", &tmp.path().join("state"));
    let src = tmp.path().join("src");
    make_rich_tree(&src, 3);
    e.commit("k", &src, &CommitOptions::default())
        .await
        .unwrap();
    std::fs::remove_file(src.join("many/f001.json")).unwrap();
    std::fs::remove_dir_all(src.join("a/b")).unwrap();
    write(&src.join("a/b"), b"now a file\n");
    std::fs::remove_file(src.join("empty")).unwrap();
    std::fs::create_dir(src.join("empty")).unwrap();
    let c = e
        .commit("k", &src, &CommitOptions::default())
        .await
        .unwrap();
    assert_eq!(c.outcome, CommitOutcome::Committed { generation: 2 });
    let dst = tmp.path().join("dst");
    engine(&url, "default", &tmp.path().join("state2"))
        .restore("k", &[], &dst)
        .await
        .unwrap();
    assert_trees_equal(&src, &dst);
}

async fn scopes_isolate(url: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scopes_isolate_file_store() {
    let tmp = tempfile::tempdir().unwrap();
    scopes_isolate(&file_url(&tmp.path().join("store"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scopes_isolate_s3_store() {
    let Some(url) = s3_url("scopes") else {
        return;
    };
    scopes_isolate(&url).await;
}

/// Every kind of change an unchanged commit must not miss: it compares the tree with the
/// record by stat alone, so each change is made so that as little as possible of the stat moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_change_is_seen_by_stat() {
    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(&tmp.path().join("store"));
    let e = engine(&url, "default", &tmp.path().join("state"));
    let src = tmp.path().join("src");
    make_rich_tree(&src, 5);
    let opts = CommitOptions::default();
    e.commit("k", &src, &opts).await.unwrap();
    type Change = Box<dyn Fn(&std::path::Path)>;
    let changes: Vec<(&str, Change)> = vec![
        (
            "the same size and mtime, new content (ctime moves)",
            Box::new(|d| {
                let p = d.join("many/f003.json");
                let md = std::fs::metadata(&p).unwrap();
                let mut data = std::fs::read(&p).unwrap();
                data[0] = b'[';
                std::fs::write(&p, &data).unwrap();
                let f = std::fs::File::options().write(true).open(&p).unwrap();
                f.set_modified(md.modified().unwrap()).unwrap();
            }),
        ),
        (
            "a file replaced by another (new inode)",
            Box::new(|d| {
                let p = d.join("many/f004.json");
                let copy = d.join("many/f004.tmp");
                std::fs::copy(&p, &copy).unwrap();
                std::fs::write(&copy, b"{\"i\":4,\"seed\":6}").unwrap();
                std::fs::rename(&copy, &p).unwrap();
            }),
        ),
        (
            "a file's mode",
            Box::new(|d| chmod(&d.join("README"), 0o600)),
        ),
        (
            "a directory's mode",
            Box::new(|d| chmod(&d.join("a/empty-dir"), 0o700)),
        ),
        (
            "a symlink's target, same length",
            Box::new(|d| {
                std::fs::remove_file(d.join("dangling")).unwrap();
                std::os::unix::fs::symlink("does/not/exisT", d.join("dangling")).unwrap();
            }),
        ),
        (
            "an empty file added",
            Box::new(|d| write(&d.join("a/b/new-empty"), b"")),
        ),
        (
            "an empty file removed",
            Box::new(|d| std::fs::remove_file(d.join("a/b/c/empty")).unwrap()),
        ),
        (
            "an empty directory added",
            Box::new(|d| std::fs::create_dir(d.join("a/b/new-dir")).unwrap()),
        ),
        (
            "an empty directory removed",
            Box::new(|d| std::fs::remove_dir(d.join("a/empty-dir")).unwrap()),
        ),
        (
            "a file became a directory",
            Box::new(|d| {
                std::fs::remove_file(d.join("empty")).unwrap();
                std::fs::create_dir(d.join("empty")).unwrap();
            }),
        ),
    ];
    for (generation, (what, change)) in (2..).zip(&changes) {
        change(&src);
        let c = e.commit("k", &src, &opts).await.unwrap();
        assert_eq!(
            c.outcome,
            CommitOutcome::Committed { generation },
            "{what}: not seen"
        );
        let again = e.commit("k", &src, &opts).await.unwrap();
        assert_eq!(
            again.outcome,
            CommitOutcome::Unchanged {
                generation: Some(generation)
            },
            "{what}: seen again after its commit"
        );
        assert_eq!(again.files_read, 0, "{what}");
    }
    let dst = tmp.path().join("dst");
    engine(&url, "default", &tmp.path().join("state2"))
        .restore("k", &[], &dst)
        .await
        .unwrap();
    assert_trees_equal(&src, &dst);
}

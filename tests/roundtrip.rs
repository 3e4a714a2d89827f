//! Round trips, incremental commits, restore-key fallback, scope isolation and ranged restores
//! on every store (the scenarios of tests/common/store_suite.rs, each on file://, the S3 server
//! and Azurite), and what only the engine's file handling decides (setuid bits, deletions and
//! kind changes, changes seen by stat) on file://.

mod common;

use cachevol::engine::{CommitOptions, CommitOutcome};
use common::*;

on_every_store!(
    round_trip,
    incremental,
    scopes_isolate,
    restore_reads_part_of_a_pack
);

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

//! Trees past version 1's manifest limit (about 130,000 entries): the paged manifest of format
//! version 2 commits them, restores them, and a small change re-uploads a few pages of the
//! manifest, not all of it.

mod common;

use std::path::Path;

use cachevol::engine::{format, CommitOptions};
use common::*;

/// `dirs` directories of 100 files, each file a few distinct bytes (so each has its own chunk,
/// as in a real cache).
fn make_tree(root: &Path, dirs: usize) {
    for d in 0..dirs {
        let dir = root.join(format!("pkg-{d:05}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(dir.join(format!("module-{f:03}.js")), format!("{d}/{f}\n")).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_of_200_000_entries_commits_restores_and_recommits_a_few_pages() {
    // In RAM where there is one: 400,000 files and directories on a disk that was just cleaned
    // up after can take minutes to create, and the test is about the format, not the disk.
    let shm = std::path::Path::new("/dev/shm");
    let tmp = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let src = tmp.path().join("src");
    let dirs = 2_000;
    make_tree(&src, dirs);
    let entries = dirs * 101;
    let url = file_url(&tmp.path().join("store"));
    let e = engine(&url, "default", &tmp.path().join("state"));
    let started = std::time::Instant::now();
    let first = e
        .commit("big", &src, &CommitOptions::default())
        .await
        .unwrap();
    eprintln!(
        "commit of {entries} entries: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(first.files as usize, dirs * 100);

    let g = e.load_generation("big", 1).await.unwrap();
    assert_eq!(g.version(), format::FORMAT_VERSION);
    // Version 1 would have needed about 290 bytes an entry, over its 32 MiB limit here.
    let per_entry = g.manifest_len / entries as u64;
    eprintln!(
        "manifest: {} pages, {} bytes raw, {per_entry} bytes an entry",
        g.pages.len(),
        g.manifest_len
    );
    assert!(per_entry < 100, "{per_entry} bytes an entry");
    assert!(
        g.manifest_len > 0 && g.pages.len() > 100,
        "{} pages",
        g.pages.len()
    );

    // A fresh engine (nothing local) restores every entry.
    let out = tmp.path().join("out");
    let fresh = engine(&url, "default", &tmp.path().join("state2"));
    let report = fresh.restore("big", &[], &out).await.unwrap();
    assert_eq!(report.files as usize, dirs * 100);
    assert_eq!(listing(&src), listing(&out));
    assert_eq!(
        std::fs::read(out.join("pkg-01234/module-056.js")).unwrap(),
        b"1234/56\n"
    );

    // One changed file: its chunk and the page or two around its entry are new, the other
    // pages are the first generation's.
    std::fs::write(src.join("pkg-01000/module-050.js"), b"changed\n").unwrap();
    let second = e
        .commit("big", &src, &CommitOptions::default())
        .await
        .unwrap();
    let g2 = e.load_generation("big", 2).await.unwrap();
    let old: std::collections::HashSet<_> = g.manifest.iter().map(|r| r.h).collect();
    let new_pages = g2.manifest.iter().filter(|r| !old.contains(&r.h)).count();
    eprintln!(
        "second commit: {} new chunks, {} bytes uploaded, {new_pages} new pages of {}",
        second.new_chunks,
        second.uploaded,
        g2.pages.len()
    );
    assert!(new_pages <= 2, "{new_pages} new pages");
    assert!(
        second.uploaded < g.manifest_len / 20,
        "uploaded {} bytes for one changed file",
        second.uploaded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_generation_restores_and_the_next_commit_is_version_2() {
    use cachevol::engine::format::{
        compress_chunk, encode_entries, Digest, Entry, Generation, Kind, PackBuilder, Provenance,
        Totals,
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let put_pack = |chunks: &[&[u8]]| {
        let mut b = PackBuilder::new();
        for raw in chunks {
            b.push(Digest::of(raw), raw.len() as u32, &compress_chunk(raw));
        }
        let (id, bytes, refs) = b.finish();
        let hex = id.to_hex();
        write(
            &store.join("default/packs").join(&hex[..2]).join(&hex),
            &bytes,
        );
        refs
    };
    // Generation 1 as cachevol wrote it before format version 2: JSON lines in one chunk.
    let data = b"written by an older cachevol\n";
    let entries = vec![
        Entry {
            path: "old".into(),
            kind: Kind::Dir,
            mode: 0o755,
            size: 0,
            mtime: 0,
            target: None,
            chunks: vec![],
        },
        Entry {
            path: "old/file.txt".into(),
            kind: Kind::File,
            mode: 0o644,
            size: data.len() as u64,
            mtime: 1_700_000_000_000_000_000,
            target: None,
            chunks: put_pack(&[data]),
        },
    ];
    let stream = encode_entries(&entries);
    let g = Generation {
        key: "legacy".into(),
        generation: 1,
        provenance: Provenance::default(),
        totals: Totals::of(&entries),
        manifest_hash: Digest::of(&stream),
        manifest_len: stream.len() as u64,
        manifest: put_pack(&[&stream]),
        pages: vec![],
    };
    assert_eq!(g.version(), 1);
    write(
        &store
            .join("default/manifests/legacy")
            .join(format!("{:020}", 1)),
        &g.encode(),
    );

    let e = engine(&file_url(&store), "default", &tmp.path().join("state"));
    let dir = tmp.path().join("work");
    e.restore("legacy", &[], &dir).await.unwrap();
    assert_eq!(std::fs::read(dir.join("old/file.txt")).unwrap(), data);
    write(&dir.join("new.txt"), b"added\n");
    e.commit("legacy", &dir, &CommitOptions::default())
        .await
        .unwrap();
    let g2 = e.load_generation("legacy", 2).await.unwrap();
    assert_eq!(g2.version(), 2);
    let out = tmp.path().join("out");
    engine(&file_url(&store), "default", &tmp.path().join("state2"))
        .restore("legacy", &[], &out)
        .await
        .unwrap();
    assert_eq!(listing(&dir), listing(&out));
}

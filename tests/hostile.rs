//! Hostile and corrupt snapshots, handcrafted in a file:// store with the format module: each
//! restore is refused with an error that names the problem, and nothing outside the target
//! directory is touched. Also: symlinks planted in the target are never written through.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cachevol::engine::format::{
    compress_chunk, encode_entries, ChunkRef, Digest, Entry, Generation, Kind, PackBuilder,
    Provenance, Totals,
};
use cachevol::engine::{format, pages};
use cachevol::engine::{CommitOptions, Engine, Error};
use common::*;

/// A store with a sibling "canary" directory that must never change.
struct Lab {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    store: PathBuf,
    canary: PathBuf,
    engine: Engine,
}

impl Lab {
    fn new() -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let store = root.join("store");
        let canary = root.join("work/canary");
        std::fs::create_dir_all(root.join("state")).unwrap();
        write(&canary.join("precious.txt"), b"leave me alone\n");
        std::fs::create_dir_all(canary.join("sub")).unwrap();
        let engine = engine(&file_url(&store), "default", &root.join("state"));
        Lab {
            _tmp: tmp,
            root,
            store,
            canary,
            engine,
        }
    }

    /// Writes a pack holding `chunks` (raw data, and the digest to claim for it).
    fn pack(&self, chunks: &[(&[u8], Digest)]) -> (PathBuf, Vec<ChunkRef>) {
        let mut b = PackBuilder::new();
        for (raw, claimed) in chunks {
            b.push(*claimed, raw.len() as u32, &compress_chunk(raw));
        }
        let (id, bytes, refs) = b.finish();
        let hex = id.to_hex();
        let path = self.store.join("default/packs").join(&hex[..2]).join(&hex);
        write(&path, &bytes);
        (path, refs)
    }

    /// Writes generation `gen` of `key` whose manifest stream is `stream`; returns its path.
    fn generation(&self, key: &str, gen: u64, stream: &[u8]) -> PathBuf {
        let (_, refs) = self.pack(&[(stream, Digest::of(stream))]);
        let g = Generation {
            key: key.into(),
            generation: gen,
            provenance: Provenance {
                time: 0,
                writer: "mallory".into(),
                ..Default::default()
            },
            totals: Totals::default(),
            manifest_hash: Digest::of(stream),
            manifest_len: stream.len() as u64,
            manifest: refs,
            pages: vec![],
        };
        self.put_generation(&g)
    }

    /// Stores `g` where the engine looks for it; returns its path.
    fn put_generation(&self, g: &Generation) -> PathBuf {
        let path = self
            .store
            .join("default/manifests")
            .join(&g.key)
            .join(format!("{:020}", g.generation));
        write(&path, &g.encode());
        path
    }

    /// A file entry whose data lives in a fresh pack.
    fn file(&self, path: &str, data: &[u8]) -> Entry {
        let (_, chunks) = self.pack(&[(data, Digest::of(data))]);
        Entry {
            path: path.into(),
            kind: Kind::File,
            mode: 0o644,
            size: data.len() as u64,
            mtime: 1_700_000_000_000_000_000,
            target: None,
            chunks,
        }
    }

    fn target(&self, name: &str) -> PathBuf {
        let t = self.root.join("work").join(name);
        std::fs::create_dir_all(&t).unwrap();
        t
    }

    fn work_names(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.root.join("work"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Restores `key` into a fresh target, expecting a refusal that mentions `want`; checks
    /// that nothing outside the target changed.
    async fn refused(&self, key: &str, want: &[&str]) -> Error {
        let target = self.target(&format!("target-{key}"));
        let canary_before = tree(&self.canary);
        let names_before = self.work_names();
        let root_before: BTreeSet<_> = std::fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let err = self
            .engine
            .restore(key, &[], &target)
            .await
            .expect_err("a hostile snapshot must be refused");
        let text = err.to_string();
        for w in want {
            assert!(
                text.contains(w),
                "error for {key} should mention {w:?}: {text}"
            );
        }
        assert!(
            matches!(
                err,
                Error::Corrupt { .. } | Error::UnsupportedVersion { .. }
            ),
            "{key}: a bad snapshot is a data error, not {err:?}"
        );
        assert!(!err.is_store_unavailable(), "{key}: {err:?}");
        assert_tree_maps_equal(&canary_before, &tree(&self.canary), "canary");
        assert_eq!(
            names_before,
            self.work_names(),
            "{key}: new entries beside the target"
        );
        let root_after: BTreeSet<_> = std::fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            root_before, root_after,
            "{key}: new entries above the target"
        );
        err
    }
}

fn line(e: &Entry) -> Vec<u8> {
    encode_entries(std::slice::from_ref(e))
}

fn dir_entry(path: &str) -> Entry {
    Entry {
        path: path.into(),
        kind: Kind::Dir,
        mode: 0o755,
        size: 0,
        mtime: 1_700_000_000_000_000_000,
        target: None,
        chunks: vec![],
    }
}

fn symlink_entry(path: &str, target: &str) -> Entry {
    Entry {
        path: path.into(),
        kind: Kind::Symlink,
        mode: 0o777,
        size: 0,
        mtime: 1_700_000_000_000_000_000,
        target: Some(target.into()),
        chunks: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handcrafted_snapshots_restore_when_valid() {
    // The crafting helpers make snapshots cachevol accepts: the refusals below are about the
    // hostile part only.
    let lab = Lab::new();
    let f = lab.file("dir/ok.txt", b"fine\n");
    let mut stream = line(&dir_entry("dir"));
    stream.extend(line(&f));
    stream.extend(line(&symlink_entry("link", "dir/ok.txt")));
    lab.generation("valid", 1, &stream);
    let target = lab.target("valid");
    lab.engine.restore("valid", &[], &target).await.unwrap();
    assert_eq!(std::fs::read(target.join("dir/ok.txt")).unwrap(), b"fine\n");
    assert_eq!(
        std::fs::read_link(target.join("link")).unwrap(),
        Path::new("dir/ok.txt")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_paths_are_refused() {
    let lab = Lab::new();
    let abs = lab.canary.join("pwned");
    let f = lab.file(abs.to_str().unwrap(), b"owned\n");
    lab.generation("abs", 1, &line(&f));
    lab.refused("abs", &["absolute path"]).await;
    assert!(!abs.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_dot_paths_are_refused() {
    let lab = Lab::new();
    let f = lab.file("../canary/pwned", b"owned\n");
    lab.generation("dotdot", 1, &line(&f));
    lab.refused("dotdot", &["'..'", "../canary/pwned"]).await;
    // Hidden deeper in a legitimate-looking path as well.
    let mut stream = line(&dir_entry("a"));
    stream.extend(line(&lab.file("a/../../pwned2", b"owned\n")));
    lab.generation("dotdot2", 1, &stream);
    lab.refused("dotdot2", &["'..'"]).await;
    assert!(!lab.root.join("pwned2").exists());
    assert!(!lab.canary.join("pwned").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_through_symlinks_are_refused() {
    let lab = Lab::new();
    let link = symlink_entry("link", lab.canary.to_str().unwrap());
    let mut stream = line(&link);
    stream.extend(line(&lab.file("link/pwned", b"owned\n")));
    lab.generation("through-link", 1, &stream);
    lab.refused(
        "through-link",
        &["link/pwned", "not a directory of the snapshot"],
    )
    .await;
    // A relative link to the parent, then a directory under it.
    let mut stream = line(&symlink_entry("up", ".."));
    stream.extend(line(&dir_entry("up/canary2")));
    lab.generation("through-link2", 1, &stream);
    lab.refused("through-link2", &["not a directory of the snapshot"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_nodes_are_refused() {
    let lab = Lab::new();
    let mut stream = line(&dir_entry("dev"));
    stream.extend_from_slice(
        br#"{"path":"dev/null","kind":"chardev","mode":438,"size":0,"mtime":0,"rdev":259}"#,
    );
    stream.push(b'\n');
    lab.generation("chardev", 1, &stream);
    lab.refused("chardev", &["chardev"]).await;
    let mut stream = Vec::new();
    stream.extend_from_slice(br#"{"path":"sda","kind":"blockdev","mode":432,"mtime":0}"#);
    stream.push(b'\n');
    lab.generation("blockdev", 1, &stream);
    lab.refused("blockdev", &["blockdev"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_that_do_not_match_their_digest_are_refused() {
    let lab = Lab::new();
    let real = b"what the pack really holds\n";
    let claimed = b"what the manifest promised!\n";
    let (_, chunks) = lab.pack(&[(real.as_slice(), Digest::of(claimed))]);
    let f = Entry {
        path: "f.txt".into(),
        kind: Kind::File,
        mode: 0o644,
        size: real.len() as u64,
        mtime: 0,
        target: None,
        chunks,
    };
    lab.generation("bad-digest", 1, &line(&f));
    lab.refused("bad-digest", &["does not match its digest"])
        .await;
    // The altered data never becomes a file a build could pick up.
    let target = lab.root.join("work/target-bad-digest");
    assert!(
        std::fs::read(target.join("f.txt")).map_or(true, |d| d != real),
        "unverified data was written"
    );

    // A manifest altered after the fact is refused too (its digest is in the generation).
    let ok = lab.file("ok.txt", b"ok\n");
    let stream = line(&ok);
    let (_, refs) = lab.pack(&[(stream.as_slice(), Digest::of(&stream))]);
    let g = Generation {
        key: "bad-manifest".into(),
        generation: 1,
        provenance: Provenance::default(),
        totals: Totals::default(),
        manifest_hash: Digest::of(b"some other manifest"),
        manifest_len: stream.len() as u64,
        manifest: refs,
        pages: vec![],
    };
    write(
        &lab.store
            .join("default/manifests/bad-manifest")
            .join(format!("{:020}", 1)),
        &g.encode(),
    );
    lab.refused("bad-manifest", &["manifest does not match its digest"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_packs_are_refused() {
    let lab = Lab::new();
    let data = noise(3, 1 << 20);
    let (pack, chunks) = lab.pack(&[
        (&data[..1 << 19], Digest::of(&data[..1 << 19])),
        (&data[1 << 19..], Digest::of(&data[1 << 19..])),
    ]);
    let f = Entry {
        path: "big.bin".into(),
        kind: Kind::File,
        mode: 0o644,
        size: data.len() as u64,
        mtime: 0,
        target: None,
        chunks,
    };
    let mut stream = line(&lab.file("a-small.txt", b"small\n"));
    stream.extend(line(&f));
    lab.generation("truncated", 1, &stream);
    // Whole, it restores.
    let ok = lab.target("truncated-ok");
    lab.engine.restore("truncated", &[], &ok).await.unwrap();
    assert_eq!(std::fs::read(ok.join("big.bin")).unwrap(), data);
    // Cut short on disk, it is refused.
    let len = std::fs::metadata(&pack).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.set_len(len - len / 3).unwrap();
    drop(f);
    lab.refused("truncated", &["truncated"]).await;
    let target = lab.root.join("work/target-truncated");
    assert!(
        std::fs::read(target.join("big.bin")).map_or(true, |d| d != data),
        "a file from a truncated pack cannot be complete"
    );
    // And verify says so too.
    let err = lab.engine.verify("truncated", None).await.unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

/// One bad chunk among many packs: the restore fails, and once it has returned the target is
/// empty and stays empty (no writer of another pack goes on writing after the failure). The
/// files sit at the top of the target, so a late writer would leave them there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_leaves_nothing_behind() {
    let lab = Lab::new();
    let mut entries = Vec::new();
    for p in 0..8u64 {
        // A pack of 64 files; one small chunk of one pack is bad.
        let data: Vec<Vec<u8>> = (0..64)
            .map(|f| noise(p * 100 + f, if p == 0 { 512 } else { 64 << 10 }))
            .collect();
        let claims: Vec<(&[u8], Digest)> = data
            .iter()
            .enumerate()
            .map(|(f, raw)| {
                let claimed = if p == 0 && f == 0 {
                    Digest::of(b"something else")
                } else {
                    Digest::of(raw)
                };
                (raw.as_slice(), claimed)
            })
            .collect();
        let (_, refs) = lab.pack(&claims);
        for (f, r) in refs.into_iter().enumerate() {
            entries.push(Entry {
                path: format!("p{p}-f{f:02}"),
                kind: Kind::File,
                mode: 0o644,
                size: r.n as u64,
                mtime: 0,
                target: None,
                chunks: vec![r],
            });
        }
    }
    let stream = encode_entries(&entries);
    lab.generation("one-bad-chunk", 1, &stream);
    lab.refused("one-bad-chunk", &["does not match its digest"])
        .await;
    let target = lab.root.join("work/target-one-bad-chunk");
    for _ in 0..5 {
        let left: Vec<_> = std::fs::read_dir(&target)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "a failed restore left {left:?}");
        tokio::time::sleep(std::time::Duration::from_millis(40)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_format_versions_are_refused() {
    let lab = Lab::new();
    let stream = line(&lab.file("f.txt", b"from the future\n"));
    let path = lab.generation("future", 1, &stream);
    let mut data = std::fs::read(&path).unwrap();
    data[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&path, &data).unwrap();
    let err = lab
        .refused("future", &["format version 99", "upgrade cachevol"])
        .await;
    assert!(matches!(
        err,
        Error::UnsupportedVersion {
            found: 99,
            supported: 2,
            ..
        }
    ));
    // Garbage where a generation should be.
    write(
        &lab.store
            .join("default/manifests/garbage")
            .join(format!("{:020}", 1)),
        b"<html>not a snapshot</html>",
    );
    lab.refused("garbage", &["bad magic"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setuid_bits_in_a_snapshot_are_stripped() {
    let lab = Lab::new();
    let mut f = lab.file("suid", b"#!/bin/sh\n");
    f.mode = 0o6755;
    lab.generation("suid", 1, &line(&f));
    let target = lab.target("suid");
    lab.engine.restore("suid", &[], &target).await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(target.join("suid"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
}

/// The target already holds symlinks where the snapshot has a directory and a file: restore
/// replaces the links and never writes through them.
async fn planted_symlinks(warm: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(&tmp.path().join("store"));
    let src = tmp.path().join("src");
    write(&src.join("a/f"), b"from the snapshot\n");
    write(&src.join("b"), b"file b from the snapshot\n");
    write(&src.join("c/d/e"), &noise(4, 3 << 20)); // several chunks
    let e = engine(&url, "default", &tmp.path().join("state"));
    e.commit("k", &src, &CommitOptions::default())
        .await
        .unwrap();

    let outside = tmp.path().join("outside");
    write(&outside.join("f"), b"outside, original\n");
    write(&outside.join("b-target"), b"outside b, original\n");
    write(&outside.join("e"), b"outside e, original\n");
    std::fs::create_dir_all(outside.join("d")).unwrap();
    let outside_before = tree(&outside);

    let target = tmp.path().join("target");
    if warm {
        // A directory cachevol restored before, then tampered with.
        e.restore("k", &[], &target).await.unwrap();
        std::fs::remove_dir_all(target.join("a")).unwrap();
        std::fs::remove_file(target.join("b")).unwrap();
        std::fs::remove_file(target.join("c/d/e")).unwrap();
        std::fs::remove_dir_all(target.join("c/d")).unwrap();
    } else {
        std::fs::create_dir_all(target.join("c")).unwrap();
    }
    std::os::unix::fs::symlink(&outside, target.join("a")).unwrap();
    std::os::unix::fs::symlink(outside.join("b-target"), target.join("b")).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("c/d")).unwrap();

    e.restore("k", &[], &target).await.unwrap();
    assert_tree_maps_equal(&outside_before, &tree(&outside), "the outside directory");
    assert_trees_equal(&src, &target);
    assert!(std::fs::symlink_metadata(target.join("a"))
        .unwrap()
        .is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_never_writes_through_planted_symlinks() {
    planted_symlinks(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_restore_never_writes_through_planted_symlinks() {
    planted_symlinks(true).await;
}

/// What one run of the `cachevol` binary did: exit code, stderr, and its peak RSS in MiB from
/// `wait4`. Linux counts the spawning process's own peak into a child's at exec, so these tests
/// never hold big buffers themselves: data is made, hashed and compared in small blocks.
struct Run {
    code: i32,
    stderr: String,
    peak_mib: u64,
}

/// The most memory any command may take, whatever the snapshot declares (DESIGN §3).
const RSS_LIMIT_MIB: u64 = 128;

/// `len` zero bytes whose last byte is `last`, as a reader.
fn zeros_ending(len: u64, last: u8) -> impl std::io::Read {
    use std::io::Read;
    std::io::repeat(0)
        .take(len - 1)
        .chain(std::io::Cursor::new([last]))
}

impl Lab {
    /// Writes a pack holding one chunk read from `raw` (compressed and hashed as a stream);
    /// returns the chunk's ref.
    fn streamed_pack(&self, len: u64, last: u8) -> ChunkRef {
        let frame = zstd::stream::encode_all(zeros_ending(len, last), 3).unwrap();
        let mut h = blake3::Hasher::new();
        h.update_reader(zeros_ending(len, last)).unwrap();
        let mut b = PackBuilder::new();
        b.push(Digest(*h.finalize().as_bytes()), len as u32, &frame);
        let (id, bytes, refs) = b.finish();
        let hex = id.to_hex();
        write(
            &self.store.join("default/packs").join(&hex[..2]).join(&hex),
            &bytes,
        );
        refs.into_iter().next().unwrap()
    }

    // Reaped with wait4, which std's wait would not give the rusage of.
    #[allow(clippy::zombie_processes)]
    fn cli(&self, args: &[&str]) -> Run {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_cachevol"))
            .arg("--store")
            .arg(file_url(&self.store))
            .arg("--state-dir")
            .arg(self.root.join("state-cli"))
            .arg("--quiet")
            .args(args)
            .env_remove("CACHEVOL_STORE")
            .env_remove("CACHEVOL_SCOPE")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.unwrap(), &mut stderr).unwrap();
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid value to be filled in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: pid is our child, not yet reaped; both pointers are valid for the call.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(rc, pid, "wait4");
        assert!(libc::WIFEXITED(status), "{args:?} was killed: {stderr}");
        Run {
            code: libc::WEXITSTATUS(status),
            stderr,
            peak_mib: usage.ru_maxrss as u64 / 1024,
        }
    }

    /// Runs restore, verify and show of `key` and checks each exits with `code` in bounded
    /// memory; returns the peaks.
    fn bounded(&self, key: &str, code: i32, want: &str) -> Vec<u64> {
        let target = self.target(&format!("cli-{key}"));
        let runs = [
            vec!["restore", key, target.to_str().unwrap()],
            vec!["verify", key],
            vec!["show", key],
        ];
        let mut peaks = Vec::new();
        for args in runs {
            let run = self.cli(&args);
            eprintln!("{args:?}: exit {}, peak RSS {} MiB", run.code, run.peak_mib);
            assert_eq!(run.code, code, "{args:?}: {}", run.stderr);
            assert!(run.stderr.contains(want), "{args:?}: {}", run.stderr);
            assert!(
                run.peak_mib <= RSS_LIMIT_MIB,
                "{args:?} took {} MiB (limit {RSS_LIMIT_MIB} MiB)",
                run.peak_mib
            );
            peaks.push(run.peak_mib);
        }
        peaks
    }
}

fn file_of(path: &str, chunks: Vec<ChunkRef>) -> Entry {
    Entry {
        path: path.into(),
        kind: Kind::File,
        mode: 0o644,
        size: chunks.iter().map(|c| c.n as u64).sum(),
        mtime: 1_700_000_000_000_000_000,
        target: None,
        chunks,
    }
}

/// Whether `path` holds `len` zero bytes, but for its last byte `last`.
fn holds_zeros(path: &Path, len: u64, last: u8) -> bool {
    let mut f = std::fs::File::open(path).unwrap();
    let mut want = zeros_ending(len, last);
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = std::io::Read::read(&mut f, &mut a).unwrap();
        if n == 0 {
            return std::io::Read::read(&mut want, &mut b).unwrap() == 0;
        }
        std::io::Read::read_exact(&mut want, &mut b[..n]).unwrap();
        if a[..n] != b[..n] {
            return false;
        }
    }
}

#[test]
fn a_chunk_referenced_many_times_costs_bounded_memory() {
    // The issue's snapshot: a tiny generation object and a 2 KB pack holding one 64 MiB chunk of
    // zeros that the manifest lists 48 times (3 GiB of "manifest").
    let lab = Lab::new();
    let zeros = lab.streamed_pack(64 << 20, 0);
    let g = Generation {
        key: "zeros".into(),
        generation: 1,
        provenance: Provenance::default(),
        totals: Totals::default(),
        manifest_hash: Digest::of(b"whatever: the length alone is refused"),
        manifest_len: 48 * (64 << 20),
        manifest: vec![zeros.clone(); 48],
        pages: vec![],
    };
    let obj = lab
        .store
        .join("default/manifests/zeros")
        .join(format!("{:020}", 1));
    write(&obj, &g.encode());
    assert!(std::fs::metadata(&obj).unwrap().len() < 1024);
    lab.bounded("zeros", 5, "manifest");

    // The same chunk as file data, 4 times in one file, and six 64 MiB chunks that differ in
    // their last byte, alone in six files of six packs (read at once): restored, verified,
    // shown.
    let mut stream = line(&file_of("big", vec![zeros; 4]));
    for i in 0..6u8 {
        let r = lab.streamed_pack(64 << 20, i + 1);
        stream.extend(line(&file_of(&format!("f{i}"), vec![r])));
    }
    lab.generation("zero-files", 1, &stream);
    lab.bounded("zero-files", 0, "");
    let target = lab.root.join("work/cli-zero-files");
    assert!(holds_zeros(&target.join("big"), 4 << 26, 0));
    for i in 0..6u8 {
        assert!(holds_zeros(&target.join(format!("f{i}")), 64 << 20, i + 1));
    }
}

#[test]
fn verify_reads_a_huge_pack_in_bounded_memory() {
    // A 2 GiB pack (sparse on disk) whose only chunk is at its start: verify hashes it whole to
    // check its id, and must not hold it in memory to do so.
    let lab = Lab::new();
    let data = b"a small file in a huge pack\n";
    let mut b = PackBuilder::new();
    b.push(Digest::of(data), data.len() as u32, &compress_chunk(data));
    let (_, bytes, refs) = b.finish();
    let tmp = lab.root.join("pack.tmp");
    write(&tmp, &bytes);
    let f = std::fs::OpenOptions::new().write(true).open(&tmp).unwrap();
    f.set_len(2 << 30).unwrap();
    drop(f);
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(std::fs::File::open(&tmp).unwrap())
        .unwrap();
    let id = Digest(*hasher.finalize().as_bytes());
    let hex = id.to_hex();
    let path = lab.store.join("default/packs").join(&hex[..2]).join(&hex);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let chunks = refs.into_iter().map(|r| ChunkRef { p: id, ..r }).collect();
    lab.generation("huge-pack", 1, &line(&file_of("f", chunks)));
    lab.bounded("huge-pack", 0, "");
    assert_eq!(
        std::fs::read(lab.root.join("work/cli-huge-pack/f")).unwrap(),
        data.as_slice()
    );
}

#[test]
fn a_legitimate_file_of_zeros_restores_in_bounded_memory() {
    // Committed by cachevol itself: 384 MiB of zeros is one 2 MiB chunk referenced 192 times.
    let lab = Lab::new();
    let src = lab.target("zeros-src");
    let f = std::fs::File::create(src.join("zeros.img")).unwrap();
    f.set_len(384 << 20).unwrap();
    drop(f);
    let commit = lab.cli(&["commit", "zeros", src.to_str().unwrap()]);
    assert_eq!(commit.code, 0, "{}", commit.stderr);
    let peaks = lab.bounded("zeros", 0, "");
    eprintln!(
        "commit {} MiB, restore/verify/show {peaks:?} MiB",
        commit.peak_mib
    );
    let out = lab.root.join("work/cli-zeros/zeros.img");
    assert!(holds_zeros(&out, 384 << 20, 0));
}

#[test]
fn a_generation_number_that_cannot_be_followed_blocks_nothing_for_good() {
    let lab = Lab::new();
    let src = lab.target("src");
    write(&src.join("a.txt"), b"one\n");
    for key in ["k", "k2"] {
        let dir = lab.target(&format!("src-{key}"));
        write(&dir.join("a.txt"), b"one\n");
        let c = lab.cli(&["commit", key, dir.to_str().unwrap()]);
        assert_eq!(c.code, 0, "{}", c.stderr);
        // Planted by a writer of the scope: a valid-looking object at the last u64.
        let f = lab.file("evil.txt", b"hostile\n");
        lab.generation(key, u64::MAX, &line(&f));
        // Without a head hint (none yet, or a commit that crashed before moving it) the
        // listing is the truth.
        std::fs::remove_file(lab.store.join("default/heads").join(key)).unwrap();
    }
    let out = lab.target("out");
    for args in [
        vec!["restore", "k", out.to_str().unwrap()],
        vec!["show", "k"],
        vec!["show", "k", "--generation", "18446744073709551615"],
        vec!["verify", "k"],
        vec!["commit", "k", src.to_str().unwrap()],
    ] {
        let run = lab.cli(&args);
        assert_eq!(run.code, 5, "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("\"k\"") && run.stderr.contains("18446744073709551615"),
            "{args:?} should name the key and the number: {}",
            run.stderr
        );
    }
    assert!(!out.join("evil.txt").exists());

    // Wipe frees the key; rollback frees another and keeps its history.
    assert_eq!(lab.cli(&["wipe", "k", "--yes"]).code, 0);
    let c = lab.cli(&["commit", "k", src.to_str().unwrap()]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    let r = lab.cli(&["rollback", "k2", "--to", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    write(&src.join("b.txt"), b"two\n");
    let c = lab.cli(&["commit", "k2", src.to_str().unwrap()]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    for key in ["k", "k2"] {
        let dir = lab.target(&format!("out-{key}"));
        let run = lab.cli(&["restore", key, dir.to_str().unwrap()]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"one\n");
        assert!(!dir.join("evil.txt").exists());
    }
    assert!(lab.root.join("work/out-k2/b.txt").exists());
}

#[test]
fn impossible_offsets_and_paths_are_invalid_snapshots_for_every_command() {
    let lab = Lab::new();
    let mut far = lab.file("far.txt", b"far away\n");
    far.chunks[0].o = u64::MAX - 4;
    lab.generation("far", 1, &line(&far));
    let deep = format!("{}/x", ["d"; 2100].join("/"));
    let mut stream = Vec::new();
    for i in 1..=2100 {
        stream.extend(line(&dir_entry(&["d"; 2100][..i].join("/"))));
    }
    stream.extend(line(&lab.file(&deep, b"deep\n")));
    lab.generation("deep", 1, &stream);
    lab.generation(
        "long-name",
        1,
        &line(&lab.file(&"n".repeat(256), b"long\n")),
    );
    for (key, want) in [
        ("far", "impossible location"),
        ("deep", "PATH_MAX"),
        ("long-name", "255 bytes"),
    ] {
        let target = lab.target(&format!("out-{key}"));
        for args in [
            vec!["restore", key, target.to_str().unwrap()],
            vec!["verify", key],
            vec!["show", key],
        ] {
            let run = lab.cli(&args);
            assert_eq!(run.code, 5, "{args:?}: {}", run.stderr);
            assert!(run.stderr.contains(want), "{args:?}: {}", run.stderr);
        }
    }
}

/// `cachevol --store URL ARGS` with the state in `state`: exit code and stderr.
fn cli_at(url: &str, state: &Path, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cachevol"))
        .arg("--store")
        .arg(url)
        .arg("--state-dir")
        .arg(state)
        .arg("--quiet")
        .args(args)
        .env_remove("CACHEVOL_STORE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_bucket_is_one_configuration_error_for_every_command() {
    let stores = [
        common::s3_url("missing-bucket").map(|u| ("no-such-bucket-cv", u)),
        common::az_url("missing-container").map(|u| ("no-such-container-cv", u)),
    ];
    for (bucket, url) in stores.into_iter().flatten() {
        // The same endpoint and credentials, another bucket name.
        let mut url = url::Url::parse(&url).unwrap();
        url.set_host(Some(bucket)).unwrap();
        let url = url.to_string();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        write(&dir.join("a.txt"), b"a\n");
        let d = dir.to_str().unwrap();
        for args in [
            vec!["commit", "k", d],
            vec!["ls"],
            vec!["restore", "k", d],
            vec!["show", "k"],
        ] {
            let (code, err) = cli_at(&url, &tmp.path().join("state"), &args);
            assert_eq!(code, 2, "{url} {args:?}: {err}");
            assert!(
                err.contains(&format!("bucket {bucket:?} does not exist")),
                "{args:?}: {err}"
            );
            assert!(
                !err.contains("<?xml") && !err.contains("<Code>"),
                "{args:?}: {err}"
            );
        }
        // `run` goes on without the cache, and its warning says why.
        let (code, err) = cli_at(
            &url,
            &tmp.path().join("state"),
            &["run", "--cache", &format!("k={d}"), "--", "true"],
        );
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains(&format!("bucket {bucket:?} does not exist")),
            "{err}"
        );
        assert!(!err.contains("<?xml"), "{err}");
    }
}

impl Lab {
    /// Writes generation `gen` of `key` in format version 2, its pages as `pages` encodes
    /// `entries` (so a test can alter them), all pages in one pack; returns its path.
    fn paged(
        &self,
        key: &str,
        gen: u64,
        entries: &[Entry],
        alter: impl FnOnce(&mut Vec<pages::Page>),
    ) -> PathBuf {
        let mut pages = pages::encode_pages(entries).unwrap();
        alter(&mut pages);
        let chunks: Vec<(&[u8], Digest)> = pages
            .iter()
            .map(|p| (&p.raw[..], Digest::of(&p.raw)))
            .collect();
        let (_, refs) = self.pack(&chunks);
        let g = Generation {
            key: key.into(),
            generation: gen,
            provenance: Provenance::default(),
            totals: Totals::of(entries),
            manifest_hash: Generation::pages_hash(&refs),
            manifest_len: pages.iter().map(|p| p.raw.len() as u64).sum(),
            manifest: refs,
            pages: pages.iter().map(|p| p.info.clone()).collect(),
        };
        self.put_generation(&g)
    }
}

/// A tree of `n` files (each its own chunk of one shared pack) in directories of 100.
fn many_files(lab: &Lab, n: usize) -> Vec<Entry> {
    let data = b"the same small file\n";
    let one = lab.file("x", data).chunks;
    let mut entries = Vec::new();
    for d in 0..n.div_ceil(100) {
        entries.push(dir_entry(&format!("d{d:05}")));
        for f in 0..100.min(n - d * 100) {
            entries.push(file_of(&format!("d{d:05}/f{f:03}"), one.clone()));
        }
    }
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_snapshots_are_validated_like_any_other() {
    let lab = Lab::new();
    // Valid: restores.
    let f = lab.file("dir/ok.txt", b"fine\n");
    let valid = vec![dir_entry("dir"), f, symlink_entry("link", "dir/ok.txt")];
    lab.paged("valid", 1, &valid, |_| {});
    let target = lab.target("valid");
    lab.engine.restore("valid", &[], &target).await.unwrap();
    assert_eq!(std::fs::read(target.join("dir/ok.txt")).unwrap(), b"fine\n");

    // The tree checks of version 1 apply to what pages hold.
    let bad_trees: Vec<(&str, Vec<Entry>, &str)> = vec![
        ("abs", vec![dir_entry("/etc")], "absolute"),
        ("dotdot", vec![dir_entry("a"), dir_entry("a/../b")], "'..'"),
        (
            "through-link",
            vec![symlink_entry("a", "/etc"), dir_entry("a/x")],
            "not a directory",
        ),
        ("orphan", vec![dir_entry("x/y")], "not a directory"),
    ];
    for (key, entries, want) in bad_trees {
        lab.paged(key, 1, &entries, |_| {});
        lab.refused(key, &[want]).await;
    }

    // Pages that lie about themselves.
    let tree = many_files(&lab, 3000);
    lab.paged("count", 1, &tree, |p| {
        p[1].info.n -= 1;
        p[2].info.n += 1;
    });
    lab.refused("count", &["more entries than"]).await;
    lab.paged("first", 1, &tree, |p| p[1].info.first = "d00007/zzz".into());
    lab.refused("first", &["first entry"]).await;
    lab.paged("swapped", 1, &tree, |p| p.swap(1, 2));
    lab.refused("swapped", &["out of order"]).await;
    lab.paged("missing", 1, &tree, |p| {
        p.remove(1);
    });
    lab.refused("missing", &["totals"]).await;
    lab.paged("garbage", 1, &tree, |p| p[2].raw.truncate(40));
    lab.refused("garbage", &["manifest page", "packs in a page"])
        .await;
    // The same page twice: the second copy's first path cannot also be the next page's.
    lab.paged("twice", 1, &tree, |p| {
        let dup = pages::Page {
            raw: p[1].raw.clone(),
            info: p[1].info.clone(),
        };
        p.insert(2, dup);
    });
    lab.refused("twice", &["out of order"]).await;
}

#[test]
fn a_paged_generation_over_the_limits_is_refused_before_its_pages_are_read() {
    let lab = Lab::new();
    let tree = many_files(&lab, 1000);
    // A page table declaring more entries than the format allows, in pages that each claim the
    // most a page may hold: refused from the generation object alone (exit 5, bounded memory).
    let per = pages::MAX_PAGE_ENTRIES;
    let count = (format::MAX_ENTRIES / per as u64 + 1) as usize;
    lab.paged("too-many", 1, &tree, |p| {
        let one = p.remove(0);
        *p = (0..count)
            .map(|i| pages::Page {
                raw: one.raw.clone(),
                info: pages::PageInfo {
                    n: per,
                    first: format!("p{i:06}"),
                },
            })
            .collect();
    });
    lab.bounded("too-many", 5, "over the format's limit");
    // Pages that leave entries out of what the generation's totals count.
    lab.paged("fewer", 1, &tree, |p| p[0].info.n -= 1);
    lab.bounded("fewer", 5, "totals count");
    // One page longer than a page may be.
    lab.paged("long-page", 1, &tree, |p| {
        p[0].raw.resize(pages::MAX_PAGE_LEN as usize + 1, 0)
    });
    lab.bounded("long-page", 5, "over the format's limits");
}

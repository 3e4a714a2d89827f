//! Lazy bases with real FUSE mounts (the tests run as root; they skip, saying why, where
//! `/dev/fuse` cannot be opened or the mount is refused): a committed tree served from its
//! manifest, file data fetched only when read, an overlay view over it as a pod would have,
//! hydration into a local copy that equals the tree, and a corrupt chunk that fails the read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;

use cachevol::engine::{CommitOptions, CommitOutcome, Engine, Entry, Kind};
use cachevol::node::lazy::{self, Attrs, LazyFs, LazyMount};
use common::Provider;

struct Setup {
    // Dropped last: mounts below it are gone by then.
    tmp: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    engine: Engine,
    src: PathBuf,
    entries: Vec<Entry>,
}

/// A tree of a few hundred files (nested directories, symbolic links, empty files and
/// directories, a 12 MiB and a 5 MiB file, assorted modes and mtimes) committed into a
/// file:// store.
fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let src = tmp.path().join("src");
    common::make_rich_tree(&src, 7);
    for p in 0..20 {
        for f in 0..15 {
            let len = (p * 37 + f * 1013) % 9000;
            common::write(
                &src.join(format!("pkgs/p{p:02}/lib/f{f:02}.js")),
                &common::noise(p as u64 * 100 + f as u64, len),
            );
        }
    }
    common::write(
        &src.join("deep/1/2/3/4/5/6/7/leaf.txt"),
        b"the deepest file\n",
    );
    // One wide directory: its listing takes several readdir requests.
    for i in 0..600 {
        common::write(
            &src.join(format!("wide/entry-{i:04}")),
            i.to_string().as_bytes(),
        );
    }
    common::write(&src.join("five.bin"), &common::noise(5, 5 << 20));
    let engine = common::engine(
        &common::file_url(&tmp.path().join("store")),
        "default",
        &tmp.path().join("state"),
    );
    let entries = rt.block_on(async {
        let r = engine
            .commit("k", &src, &CommitOptions::default())
            .await
            .unwrap();
        let CommitOutcome::Committed { generation } = r.outcome else {
            panic!("{:?}", r.outcome)
        };
        let g = engine.load_generation("k", generation).await.unwrap();
        engine.load_entries(&g).await.unwrap()
    });
    assert!(entries.len() > 300, "{} entries", entries.len());
    Setup {
        tmp,
        rt,
        engine,
        src,
        entries,
    }
}

impl Setup {
    fn dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A lazy tree of the committed generation with its copy and journal under `name`.
    fn lazy(&self, name: &str, group: Option<u32>) -> LazyFs {
        LazyFs::new(
            self.engine.clone(),
            self.entries.clone(),
            &self.dir(name).join("local"),
            &self.dir(name).join("journal"),
            Attrs {
                group,
                root_mode: 0o755,
                root_mtime: 1_700_000_000_000_000_000,
            },
            self.rt.handle().clone(),
        )
        .unwrap()
    }

    /// `fs` mounted at `<name>/mnt`; None (the test is skipped) where FUSE cannot be mounted.
    fn mount(&self, fs: &LazyFs, name: &str, test: &str) -> Option<LazyMount> {
        let target = self.dir(name).join("mnt");
        std::fs::create_dir_all(&target).unwrap();
        let found = match lazy::mount(fs.clone(), &target) {
            Ok(m) => Some(m),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                eprintln!("{test}: FUSE mount refused: {e}");
                None
            }
            Err(e) => panic!("mount the lazy tree at {}: {e}", target.display()),
        };
        common::required(
            test,
            found,
            "/dev/fuse cannot be opened or a FUSE mount is refused",
            Provider::CiRun(".ci/run runs the tests as root on a kernel with /dev/fuse"),
        )
    }

    fn size(&self, path: &str) -> u64 {
        self.entries.iter().find(|e| e.path == path).unwrap().size
    }
}

/// An overlay mounted for a test, unmounted when it ends however it ends.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(lower: &Path, dir: &Path) -> Overlay {
        let (upper, work, view) = (dir.join("upper"), dir.join("work"), dir.join("view"));
        for d in [&upper, &work, &view] {
            std::fs::create_dir_all(d).unwrap();
        }
        cachevol::node::mount::overlay(&[lower.to_path_buf()], &upper, &work, &view, None)
            .unwrap_or_else(|e| panic!("overlay over the lazy tree: {e}"));
        Overlay(view)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = cachevol::node::mount::unmount(&self.0);
    }
}

/// The tree without its file contents read: what stat and readlink say (no fetch).
fn metadata(root: &Path) -> BTreeMap<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for item in std::fs::read_dir(root.join(&rel)).unwrap() {
            let r = rel.join(item.unwrap().file_name());
            let md = std::fs::symlink_metadata(root.join(&r)).unwrap();
            let what = if md.is_symlink() {
                format!("link {:?}", std::fs::read_link(root.join(&r)).unwrap())
            } else if md.is_dir() {
                stack.push(r.clone());
                "dir".to_string()
            } else {
                format!("file {}", md.size())
            };
            let line = format!(
                "{what} mode {:o} mtime {}.{:09}",
                md.mode() & 0o7777,
                md.mtime(),
                md.mtime_nsec()
            );
            out.insert(r, line);
        }
    }
    out
}

fn uids_gids(root: &Path) -> std::collections::BTreeSet<(u32, u32)> {
    let out = std::process::Command::new("find")
        .arg(root)
        .args(["-printf", "%U %G\n"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (u, g) = l.split_once(' ').unwrap();
            (u.parse().unwrap(), g.parse().unwrap())
        })
        .collect()
}

#[test]
fn the_lazy_tree_is_the_committed_tree_and_reads_fetch_only_their_file() {
    let test = "the_lazy_tree_is_the_committed_tree_and_reads_fetch_only_their_file";
    let s = setup();
    let started = std::time::Instant::now();
    let fs = s.lazy("a", None);
    let Some(m) = s.mount(&fs, "a", test) else {
        return;
    };
    let mounted = started.elapsed();
    let mnt = m.target().to_path_buf();

    // Names, kinds, modes, sizes, mtimes and link targets, from the manifest alone.
    assert_eq!(metadata(&mnt), metadata(&s.src));
    assert_eq!(uids_gids(&mnt), [(0, 0)].into());
    let st = fs.stats();
    assert_eq!(
        (st.files_local, st.bytes_on_demand, st.bytes_downloaded),
        (0, 0, 0),
        "listing and stat fetch nothing"
    );
    let files = s.entries.iter().filter(|e| e.kind == Kind::File).count() as u64;
    assert_eq!(st.files, files);

    // The first read of a deep file fetches that file and nothing else.
    let deep = "deep/1/2/3/4/5/6/7/leaf.txt";
    let started = std::time::Instant::now();
    assert_eq!(
        std::fs::read(mnt.join(deep)).unwrap(),
        b"the deepest file\n"
    );
    eprintln!(
        "{test}: {} entries mounted in {} ms; the first read of a deep file took {} ms",
        s.entries.len(),
        mounted.as_millis(),
        started.elapsed().as_millis()
    );
    let st = fs.stats();
    assert_eq!((st.files_local, st.bytes_on_demand), (1, s.size(deep)));
    assert!(fs.local_root().join(deep).is_file());
    // A big file read in the middle: fetched whole, served right.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(mnt.join("five.bin")).unwrap();
        let mut buf = vec![0u8; 100_000];
        f.read_exact_at(&mut buf, 3 << 20).unwrap();
        let want = common::noise(5, 5 << 20);
        assert_eq!(buf, want[3 << 20..(3 << 20) + 100_000]);
    }
    let st = fs.stats();
    assert_eq!(st.files_local, 2);
    assert_eq!(st.bytes_on_demand, s.size(deep) + (5 << 20));

    // Every content, and everything else, equal to the source.
    common::assert_tree_maps_equal(&common::tree(&s.src), &common::tree(&mnt), "lazy tree");
    assert_eq!(common::find_listing(&mnt), common::find_listing(&s.src));
    let st = fs.stats();
    // The kernel never asks to read an empty file.
    let nonempty = s
        .entries
        .iter()
        .filter(|e| e.kind == Kind::File && e.size > 0)
        .count() as u64;
    assert!(nonempty < files);
    assert_eq!(st.files_local, nonempty, "every file read is local");
    assert_eq!(st.bytes_prefetched, 0, "no hydration was started");
    m.unmount().unwrap();
    // What demand reads fetched is journaled: a restart fetches none of it again.
    s.rt.block_on(fs.flush());
    assert_eq!(s.lazy("a", None).stats().files_local, nonempty);
    assert!(
        !cachevol::node::mount::is_mount_point(&mnt).unwrap(),
        "unmounted"
    );
}

#[test]
fn an_overlay_view_over_the_lazy_tree_takes_writes_and_leaves_it_unchanged() {
    let test = "an_overlay_view_over_the_lazy_tree_takes_writes_and_leaves_it_unchanged";
    let s = setup();
    let fs = s.lazy("b", None);
    let Some(m) = s.mount(&fs, "b", test) else {
        return;
    };
    let ov = Overlay::mount(m.target(), &s.dir("b"));
    let view = ov.0.clone();

    // A pod's work: a new file, an append to a file not yet local (a copy-up, which reads
    // the whole lower file), a deleted file and a deleted directory.
    common::write(&view.join("new.txt"), b"made by the pod\n");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(view.join("a/log.txt"))
            .unwrap();
        f.write_all(b"one more line\n").unwrap();
    }
    std::fs::remove_file(view.join("README")).unwrap();
    std::fs::remove_dir_all(view.join("many")).unwrap();
    let st = fs.stats();
    assert_eq!(
        (st.files_local, st.bytes_on_demand),
        (1, s.size("a/log.txt")),
        "the copy-up fetched the file it copied, and only that"
    );

    // The view is the source with the same changes.
    let expected = s.dir("expected");
    cachevol::node::mount::copy_tree(&s.src, &expected).unwrap();
    common::write(&expected.join("new.txt"), b"made by the pod\n");
    let mut log = std::fs::read(s.src.join("a/log.txt")).unwrap();
    log.extend_from_slice(b"one more line\n");
    std::fs::write(expected.join("a/log.txt"), &log).unwrap();
    std::fs::remove_file(expected.join("README")).unwrap();
    std::fs::remove_dir_all(expected.join("many")).unwrap();
    assert_eq!(common::find_listing(&view), common::find_listing(&expected));

    // The changes are in the upper dir (a whiteout for each deletion); the lazy tree, and so
    // the base, is as committed.
    let upper = s.dir("b").join("upper");
    assert_eq!(std::fs::read(upper.join("a/log.txt")).unwrap(), log);
    for gone in ["README", "many"] {
        use std::os::unix::fs::FileTypeExt;
        let md = std::fs::symlink_metadata(upper.join(gone)).unwrap();
        assert!(md.file_type().is_char_device(), "{gone} is a whiteout");
    }
    common::assert_tree_maps_equal(
        &common::tree(&s.src),
        &common::tree(m.target()),
        "lazy tree under a view",
    );
    // Unmounting the tree under a live view (which holds a mount of its own) leaves it
    // served: the view goes on reading it, files not yet local included, until it goes.
    let lower = m.target().to_path_buf();
    m.unmount().unwrap();
    assert!(!cachevol::node::mount::is_mount_point(&lower).unwrap());
    assert_eq!(
        std::fs::read(view.join("big.bin")).unwrap(),
        std::fs::read(s.src.join("big.bin")).unwrap()
    );
    drop(ov);
}

#[test]
fn hydration_makes_the_local_copy_the_tree_and_a_restart_keeps_it() {
    let test = "hydration_makes_the_local_copy_the_tree_and_a_restart_keeps_it";
    let s = setup();
    let fs = s.lazy("c", None);
    let Some(m) = s.mount(&fs, "c", test) else {
        return;
    };
    let mnt = m.target().to_path_buf();
    let source = common::tree(&s.src);
    let total: u64 = s.entries.iter().map(|e| e.size).sum();
    let files = s.entries.iter().filter(|e| e.kind == Kind::File).count() as u64;

    // Readers of one file at once while hydration runs: one fetch serves them all.
    let started = std::time::Instant::now();
    let hydration = fs.hydrate();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let p = mnt.join("five.bin");
            std::thread::spawn(move || std::fs::read(p).unwrap())
        })
        .collect();
    let want = common::noise(5, 5 << 20);
    for r in readers {
        assert!(r.join().unwrap() == want, "five.bin read through the mount");
    }
    s.rt.block_on(async { tokio::time::timeout(Duration::from_secs(120), fs.hydrated()).await })
        .expect("hydration ends within two minutes")
        .unwrap();
    eprintln!(
        "{test}: {files} files, {total} bytes local in {} ms",
        started.elapsed().as_millis()
    );
    s.rt.block_on(hydration).unwrap();
    let st = fs.stats();
    assert_eq!((st.files_local, st.files), (files, files));
    assert_eq!(
        st.bytes_on_demand + st.bytes_prefetched,
        total,
        "every byte fetched once: {st:?}"
    );
    assert_eq!(st.fetch_failures, 0);
    // The copy is the tree: modes, mtimes, links, empty directories, contents.
    common::assert_tree_maps_equal(&source, &common::tree(fs.local_root()), "local copy");
    // And the mount still serves it.
    common::assert_tree_maps_equal(&source, &common::tree(&mnt), "lazy tree");
    m.unmount().unwrap();

    // A restart: the journal says every file is local, so nothing is fetched again.
    let again = s.lazy("c", None);
    let st = again.stats();
    assert_eq!((st.files_local, st.bytes_downloaded), (files, 0));
    let Some(m) = s.mount(&again, "c", test) else {
        return;
    };
    common::assert_tree_maps_equal(&source, &common::tree(m.target()), "after a restart");
    assert_eq!(again.stats().bytes_downloaded, 0, "served from the copy");
    m.unmount().unwrap();
}

#[test]
fn a_corrupt_chunk_fails_the_read_and_serves_nothing() {
    let test = "a_corrupt_chunk_fails_the_read_and_serves_nothing";
    let s = setup();
    // The pack that holds the second chunk of five.bin, one byte of that chunk flipped.
    let five = s.entries.iter().find(|e| e.path == "five.bin").unwrap();
    let bad = &five.chunks[1];
    let pack = walk_files(&s.dir("store"))
        .into_iter()
        .find(|p| p.file_name().unwrap().to_str() == Some(bad.p.to_hex().as_str()))
        .expect("the pack file");
    let mut data = std::fs::read(&pack).unwrap();
    data[(bad.o + bad.c as u64 / 2) as usize] ^= 0x55;
    std::fs::write(&pack, data).unwrap();

    let fs = s.lazy("d", None);
    let Some(m) = s.mount(&fs, "d", test) else {
        return;
    };
    let err = std::fs::read(m.target().join("five.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let st = fs.stats();
    assert_eq!(st.files_local, 0);
    assert!(st.fetch_failures >= 1);
    // Another file still reads; the bad one fails again (it is never taken as local).
    assert_eq!(
        std::fs::read(m.target().join("a/b/c/deep.txt")).unwrap(),
        b"deep content\n"
    );
    assert!(std::fs::read(m.target().join("five.bin")).is_err());
    m.unmount().unwrap();
}

#[test]
fn a_group_gets_the_modes_and_group_of_a_tree_base() {
    let test = "a_group_gets_the_modes_and_group_of_a_tree_base";
    let s = setup();
    let fs = s.lazy("e", Some(4321));
    let Some(m) = s.mount(&fs, "e", test) else {
        return;
    };
    // What grant_group makes of a restored tree, entry by entry.
    let restored = s.dir("restored");
    s.rt.block_on(s.engine.restore("k", &[], &restored))
        .unwrap();
    cachevol::node::grant_group(&restored, 4321).unwrap();
    assert_eq!(metadata(m.target()), metadata(&restored));
    assert_eq!(uids_gids(m.target()), [(0, 4321)].into());
    m.unmount().unwrap();
}

fn walk_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn after_hydration_reads_through_the_view_pass_through_to_the_local_copy() {
    use std::os::unix::fs::FileExt;
    let test = "after_hydration_reads_through_the_view_pass_through_to_the_local_copy";
    let s = setup();
    let fs = s.lazy("f", None);
    let Some(m) = s.mount(&fs, "f", test) else {
        return;
    };
    let passthrough = common::required(
        test,
        fs.passthrough().then_some(()),
        "the kernel offers no FUSE passthrough",
        Provider::CiRun(".ci/run runs on Linux 6.9 or later with CONFIG_FUSE_PASSTHROUGH"),
    );
    if passthrough.is_none() {
        return;
    }
    let want = common::noise(5, 5 << 20);
    let mut buf = vec![0u8; 4096];

    // Opened before it was local: through the page cache. A second open while the first is
    // still open must be one too (the kernel refuses to mix the two on one inode), and both
    // read right.
    let first = std::fs::File::open(m.target().join("five.bin")).unwrap();
    first.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, want[1 << 20..(1 << 20) + 4096]);
    let second = std::fs::File::open(m.target().join("five.bin")).unwrap();
    second.read_exact_at(&mut buf, 2 << 20).unwrap();
    assert_eq!(buf, want[2 << 20..(2 << 20) + 4096]);
    first.read_exact_at(&mut buf, 4 << 20).unwrap();
    assert_eq!(buf, want[4 << 20..(4 << 20) + 4096]);
    assert_eq!(fs.stats().passthrough_opens, 0);
    drop((first, second));

    s.rt.block_on(async {
        fs.hydrate();
        tokio::time::timeout(Duration::from_secs(120), fs.hydrated()).await
    })
    .expect("hydration ends within two minutes")
    .unwrap();
    let ov = Overlay::mount(m.target(), &s.dir("f"));
    let before = fs.stats();
    // Never read through the mount before: without passthrough its pages would come here.
    let big = std::fs::read(ov.0.join("big.bin")).unwrap();
    assert!(
        big == std::fs::read(s.src.join("big.bin")).unwrap(),
        "big.bin through the view"
    );
    let after = fs.stats();
    assert_eq!(after.passthrough_opens, before.passthrough_opens + 1);
    assert_eq!(after.reads, before.reads, "no READ came to the server");
    // Once its cached opens are closed, five.bin opens with passthrough too.
    let third = std::fs::File::open(m.target().join("five.bin")).unwrap();
    third.read_exact_at(&mut buf, 3 << 20).unwrap();
    assert_eq!(buf, want[3 << 20..(3 << 20) + 4096]);
    assert_eq!(fs.stats().passthrough_opens, after.passthrough_opens + 1);
    drop(third);
    // Everything through the view, and no READ for any of it.
    common::assert_tree_maps_equal(&common::tree(&s.src), &common::tree(&ov.0), "the view");
    assert_eq!(fs.stats().reads, before.reads, "every file passed through");
    drop(ov);
    m.unmount().unwrap();
}

#[test]
fn a_read_waiting_for_the_store_holds_up_no_other_request() {
    let test = "a_read_waiting_for_the_store_holds_up_no_other_request";
    let s = setup();
    // five.bin's first pack becomes a FIFO: a read of it blocks in open(2) until a writer
    // comes, as a store that does not answer would.
    let five = s.entries.iter().find(|e| e.path == "five.bin").unwrap();
    let stuck = five.chunks[0].p;
    let pack = walk_files(&s.dir("store"))
        .into_iter()
        .find(|p| p.file_name().unwrap().to_str() == Some(stuck.to_hex().as_str()))
        .expect("the pack file");
    // The real pack waits beside it; the FIFO has a second name to be opened by later.
    let real = pack.with_extension("real");
    std::fs::rename(&pack, &real).unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(&pack)
        .status()
        .unwrap();
    assert!(st.success());
    let fifo_link = pack.with_extension("fifo");
    std::fs::hard_link(&pack, &fifo_link).unwrap();
    // A file none of whose chunks are in that pack.
    let other = s
        .entries
        .iter()
        .find(|e| e.kind == Kind::File && e.size > 0 && e.chunks.iter().all(|c| c.p != stuck))
        .expect("a file in another pack");

    // However the test ends, the blocked read is let go (the runtime waits for it).
    let fifo = Unblock(fifo_link);

    let fs = s.lazy("g", None);
    let Some(m) = s.mount(&fs, "g", test) else {
        return;
    };
    let mnt = m.target().to_path_buf();
    // Two reads of different parts of the file (the same pages would wait for each other in
    // the kernel and never both come here).
    let readers: Vec<_> = [0u64, 4 << 20]
        .into_iter()
        .map(|at: u64| {
            let p = mnt.join("five.bin");
            std::thread::spawn(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; 4096];
                std::fs::File::open(p)?.read_exact_at(&mut buf, at)?;
                Ok::<_, std::io::Error>(buf)
            })
        })
        .collect();
    // Both readers are waiting (the one fetch, and the read that waits for it).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while fs.stats().reads_waited < 2 {
        assert!(std::time::Instant::now() < deadline, "{:?}", fs.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Meanwhile every name, attribute and link, and another file's data, are served.
    assert_eq!(metadata(&mnt), metadata(&s.src));
    assert_eq!(
        std::fs::read(mnt.join(&other.path)).unwrap(),
        std::fs::read(s.src.join(&other.path)).unwrap()
    );
    assert!(
        readers.iter().all(|r| !r.is_finished()),
        "the readers of five.bin still wait"
    );
    // The store comes back (the real pack in place), then the blocked request fails: that
    // fetch fails both reads at once. The kernel may read again, which then fetches the file
    // from the real pack. Either way a reader gets the right bytes or EIO, never others.
    std::fs::rename(&real, &pack).unwrap();
    assert!(
        fifo.release(Duration::from_secs(30)),
        "the fetch opened the pack"
    );
    let want = common::noise(5, 5 << 20);
    for (r, at) in readers.into_iter().zip([0usize, 4 << 20]) {
        match r.join().unwrap() {
            Ok(buf) => assert!(buf == want[at..at + 4096], "five.bin at {at}"),
            Err(err) => assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}"),
        }
    }
    assert_eq!(fs.stats().fetch_failures, 1, "one fetch for both readers");
    assert_eq!(std::fs::read(mnt.join("five.bin")).unwrap(), want);
    m.unmount().unwrap();
}

/// A FIFO standing for a pack: [`Unblock::release`] lets go a reader blocked opening it.
struct Unblock(PathBuf);

impl Unblock {
    /// Opens the FIFO for writing once a reader waits on it (within `wait`) and closes it at
    /// once: the reader reads nothing. False if no reader came.
    fn release(&self, wait: Duration) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        let deadline = std::time::Instant::now() + wait;
        loop {
            // Without a reader, a non-blocking open for writing fails (ENXIO).
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.0);
            if opened.is_ok() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Unblock {
    fn drop(&mut self) {
        self.release(Duration::ZERO);
    }
}

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
use common::{Node, Provider};

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
    let fs = s.lazy("a", None);
    let Some(m) = s.mount(&fs, "a", test) else {
        return;
    };
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
    assert_eq!(
        std::fs::read(mnt.join(deep)).unwrap(),
        b"the deepest file\n"
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
    assert!(
        !cachevol::node::mount::is_mount_point(&mnt).unwrap(),
        "unmounted"
    );
}

//! Restoring a generation as an EROFS image: the image, mounted by the kernel (loop, read-only;
//! the tests run as root), shows exactly the tree a restore into a directory gives — entries,
//! kinds, modes, owners, mtimes, sizes, bytes, symlink targets — with a pod's fsGroup applied
//! as the node applies it to a group base; a snapshot with a bad chunk is refused as by a
//! restore and leaves no image behind.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use cachevol::engine::{CommitOptions, Engine, ImageOptions, RestoreSource};
use common::*;

/// A read-only mount of an image, unmounted (and its loop device freed) when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts `image` at `at`, or None when this machine cannot (not root, no erofs, no loop):
/// the test `test` is then skipped, except under CI where it fails ([`required`]).
fn mount(test: &str, image: &Path, at: &Path) -> Option<Mounted> {
    std::fs::create_dir_all(at).unwrap();
    let out = Command::new("mount")
        .args(["-t", "erofs", "-o", "ro,loop"])
        .arg(image)
        .arg(at)
        .output()
        .unwrap();
    if out.status.success() {
        return Some(Mounted(at.to_path_buf()));
    }
    let why = String::from_utf8_lossy(&out.stderr).to_string();
    let root = rustix::process::geteuid().is_root();
    if !root || why.contains("unknown filesystem type") {
        return required(
            test,
            None,
            &format!("cannot mount an erofs image here: {why}"),
            Provider::CiRun(".ci/run runs the tests as root on a kernel with erofs and loop"),
        );
    }
    panic!("mounting {} failed: {why}", image.display());
}

/// Owner and group of every entry below `root`, and of `root` itself (at "").
fn owners(root: &Path) -> BTreeMap<PathBuf, (u32, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let md = std::fs::symlink_metadata(root.join(&rel)).unwrap();
        out.insert(rel.clone(), (md.uid(), md.gid()));
        if md.is_dir() {
            for item in std::fs::read_dir(root.join(&rel)).unwrap() {
                stack.push(rel.join(item.unwrap().file_name()));
            }
        }
    }
    out
}

/// Everything an image must hold besides the rich tree: an empty dir, a directory of thousands
/// of names (several directory blocks), names of 255 bytes, a deep path, files around the block
/// size and the inline limit, many files sharing one mtime (compact inodes), long symlinks.
fn make_image_tree(root: &Path) {
    make_rich_tree(root, 15);
    std::fs::create_dir_all(root.join("void")).unwrap();
    for i in 0..3000 {
        write(
            &root.join(format!("wide/entry-{i:05}")),
            format!("{i}").as_bytes(),
        );
    }
    let long = "L".repeat(255);
    write(
        &root.join(&long).join(format!("{}.txt", "n".repeat(251))),
        b"long names\n",
    );
    let deep: PathBuf = (0..60).map(|i| format!("d{i}")).collect();
    write(&root.join(&deep).join("bottom"), b"at the bottom\n");
    for (name, len) in [
        ("block", 4096usize),
        ("two-blocks", 8192),
        ("block-and-one", 4097),
        ("inline-max", 4096 - 32),
        ("inline-max-ext", 4096 - 64),
        ("over-inline", 4096 - 20),
        ("odd", 1_234_567),
        ("one", 1),
    ] {
        write(&root.join("sizes").join(name), &noise(len as u64, len));
    }
    std::os::unix::fs::symlink("t".repeat(2000), root.join("link-2000")).unwrap();
    std::os::unix::fs::symlink("u".repeat(4090), root.join("link-4090")).unwrap();
    // A thousand files with one mtime (npm packs files so): compact inodes.
    for i in 0..1000 {
        let p = root.join(format!("same/f{i}"));
        write(&p, format!("same {i}").as_bytes());
        set_mtime(&p, 499_162_500_000_000_000);
    }
    for d in ["wide", "same", "sizes", &long, "void"] {
        set_mtime(&root.join(d), 1_700_000_000_987_654_321);
    }
    set_mtime(&root.join("d0"), 1_700_000_001_000_000_000);
}

struct Lab {
    _tmp: tempfile::TempDir,
    t: PathBuf,
    engine: Engine,
}

impl Lab {
    async fn new(build: impl FnOnce(&Path)) -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().to_path_buf();
        let url = file_url(&t.join("store"));
        let engine = engine(&url, "default", &t.join("state"));
        let src = t.join("src");
        build(&src);
        engine
            .commit("k", &src, &CommitOptions::default())
            .await
            .unwrap();
        Lab {
            _tmp: tmp,
            t,
            engine,
        }
    }

    fn source(&self) -> RestoreSource {
        RestoreSource::Key {
            key: "k".into(),
            generation: 1,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounted_image_is_the_restored_tree() {
    let lab = Lab::new(make_image_tree).await;
    let t = &lab.t;
    lab.engine
        .restore_source(lab.source(), &t.join("tree"))
        .await
        .unwrap();
    let img = t.join("gen.erofs");
    let r = lab
        .engine
        .restore_image(lab.source(), &img, ImageOptions::default())
        .await
        .unwrap();
    assert_eq!(r.image_bytes, std::fs::metadata(&img).unwrap().len());
    assert_eq!(r.image_bytes % 4096, 0);
    let Some(_m) = mount("a_mounted_image_is_the_restored_tree", &img, &t.join("mnt")) else {
        return;
    };
    assert_trees_equal(&t.join("tree"), &t.join("mnt"));
    assert_eq!(owners(&t.join("tree")), owners(&t.join("mnt")));
    let (tree_root, mnt_root) = (
        std::fs::metadata(t.join("tree")).unwrap(),
        std::fs::metadata(t.join("mnt")).unwrap(),
    );
    assert_eq!(tree_root.mode(), mnt_root.mode());
    // The names of a wide directory are all there and found by lookup.
    let wide = std::fs::read_dir(t.join("mnt/wide")).unwrap().count();
    assert_eq!(wide, 3000);
    assert_eq!(
        std::fs::read(t.join("mnt/wide/entry-02999")).unwrap(),
        b"2999"
    );
    // Nothing but the image is left next to it.
    let names: Vec<_> = std::fs::read_dir(t)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("erofs"))
        .collect();
    assert_eq!(names, ["gen.erofs"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_image_is_the_group_base() {
    let lab = Lab::new(|src| make_rich_tree(src, 3)).await;
    let t = &lab.t;
    let gid = 4321;
    let tree = t.join("tree");
    lab.engine
        .restore_source(lab.source(), &tree)
        .await
        .unwrap();
    cachevol::node::grant_group(&tree, gid).unwrap();
    let img = t.join("g.erofs");
    lab.engine
        .restore_image(
            lab.source(),
            &img,
            ImageOptions {
                group: Some(gid),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let Some(_m) = mount("a_group_image_is_the_group_base", &img, &t.join("mnt")) else {
        return;
    };
    assert_trees_equal(&tree, &t.join("mnt"));
    let o = owners(&t.join("mnt"));
    assert!(o.values().all(|&(_, g)| g == gid), "{o:?}");
    assert_eq!(owners(&tree), o);
    assert_eq!(
        std::fs::metadata(&tree).unwrap().mode(),
        std::fs::metadata(t.join("mnt")).unwrap().mode()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_an_empty_image() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let engine = engine(&file_url(&t.join("store")), "default", &t.join("state"));
    let img = t.join("empty.erofs");
    engine
        .restore_image(RestoreSource::Miss, &img, ImageOptions::default())
        .await
        .unwrap();
    let Some(_m) = mount("a_miss_is_an_empty_image", &img, &t.join("mnt")) else {
        return;
    };
    assert_eq!(std::fs::read_dir(t.join("mnt")).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_chunk_is_refused_and_leaves_no_image() {
    let lab = Lab::new(|src| make_rich_tree(src, 9)).await;
    let t = &lab.t;
    let url = file_url(&t.join("store"));
    let bad = corrupt_largest_pack(&url).await;
    let img = t.join("out/bad.erofs");
    std::fs::create_dir_all(t.join("out")).unwrap();
    let err = lab
        .engine
        .restore_image(lab.source(), &img, ImageOptions::default())
        .await
        .unwrap_err();
    assert_eq!(cachevol::cli::exit_code(&err), 5, "{err}");
    assert!(err.to_string().contains(&bad), "{err}");
    let left: Vec<_> = std::fs::read_dir(t.join("out")).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let tree_err = lab
        .engine
        .restore_source(lab.source(), &t.join("tree"))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), tree_err.to_string());
    let listing = store_listing(&url).await;
    assert!(
        listing
            .keys()
            .any(|k| k.contains("quarantine") && k.ends_with(&bad)),
        "the bad pack is quarantined: {listing:#?}"
    );
}

//! The base cache: the trees of restored or committed generations a node keeps, one directory
//! per store, scope, key, generation and group
//! (`bases/@<store id>/<scope>/<key>/<generation>/tree`), never modified in place. Which
//! generations are local and in which form (an EROFS image, or a tree of files), restores into
//! them (once, however many pods ask at once), the committed tree kept as the next base, and
//! eviction past the node's budget.
//!
//! [`Bases`] owns that state and nothing else: it knows no view, record or pod. What it needs of
//! the views (which bases they read, so that eviction spares them; a finished view's upper dir)
//! its callers hand it. A new base form (the lazy base) is one more arm here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::report::{EvictionReason, Report};
use super::{blocking, hash_id, io, lock_of, IoError, Mounter, Result, Trash};
use crate::engine::{self, Engine, RestoreSource};
use crate::spec::{Policy, VolumeSpec};

/// How a base was written out on the node: as one EROFS image mounted read-only (a fresh
/// node's restore writes one file instead of every file of the tree), or as a tree of files
/// (where the kernel cannot mount images, and for empty bases).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseForm {
    Image,
    Tree,
}

impl BaseForm {
    pub fn label(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Tree => "tree",
        }
    }
}

/// In a generation's directory: the image of an image base, where it is mounted, and the
/// trees committed on top of it on this node (overlay layers, oldest first: `0000`, ...).
/// `tree` is then a read-only mount of the image (bind) or of the layers over it (overlay).
const IMAGE: &str = "image.erofs";
const IMAGE_MOUNT: &str = "image";
const LAYERS: &str = "layers";
/// Beside an image: the boot it was written in (`/proc/sys/kernel/random/boot_id`), and a
/// marker written once the image is on disk (fsync, off the pod's critical path). An image
/// that a reboot interrupted before that may be torn: it is written again, never mounted.
const IMAGE_BOOT: &str = "image.boot";
const IMAGE_SYNCED: &str = "image.synced";
/// Layers an image base may collect before a commit no longer stacks on it (the next pod
/// then writes a fresh image of the newest generation): each layer is one more lookup per
/// path for the kernel.
const MAX_LAYERS: usize = 16;

/// The node's bases.
pub(super) struct Bases {
    /// `<state dir>/bases`.
    root: PathBuf,
    trash: Trash,
    /// Bytes of bases kept; least recently used bases no view reads are evicted past it.
    budget: Option<u64>,
    /// Write fresh bases as images (`--base-images`)...
    images: bool,
    /// ...unless the kernel refused to mount one: bases are trees from then on.
    images_refused: AtomicBool,
    /// One lock per base directory: pods asking at once share one download.
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    mounter: Arc<dyn Mounter>,
    /// Told of each eviction: the one sign an operator has that the budget is too small for
    /// the caches the node's pods use (they restore cold again).
    report: Arc<dyn Report>,
}

/// A finished view, as the base cache sees it after its commit: the base it read, its pods'
/// group, its upper dir (what they wrote), and whether another view still reads that base
/// (asked under the base's lock).
pub(super) struct Finished<'a> {
    pub(super) base: &'a Path,
    pub(super) group: Option<u32>,
    pub(super) upper: &'a Path,
    pub(super) others_read_base: &'a (dyn Fn() -> bool + Sync),
}

/// A base a publish got.
pub(super) struct Base {
    pub(super) dir: PathBuf,
    /// How this publish's restore wrote the base (None: it was already on the node).
    pub(super) form: Option<BaseForm>,
    pub(super) source: RestoreSource,
    pub(super) warm: bool,
    pub(super) degraded: Option<String>,
    pub(super) bytes: u64,
    pub(super) downloaded: u64,
}

impl Bases {
    pub(super) fn new(
        root: PathBuf,
        trash: Trash,
        budget: Option<u64>,
        images: bool,
        mounter: Arc<dyn Mounter>,
        report: Arc<dyn Report>,
    ) -> Bases {
        Bases {
            root,
            trash,
            budget,
            images,
            images_refused: AtomicBool::new(false),
            locks: Mutex::default(),
            mounter,
            report,
        }
    }

    /// Bases of earlier versions (`bases/<scope>/...`, without the store) are never used again:
    /// which store they came from is not in their path. Those no view uses go to the trash (the
    /// next pod restores its cache again); a view over one still commits from it (its record
    /// names the directory), and its committed tree becomes a base of the new layout.
    /// `used`: the base directories views read.
    pub(super) fn drop_unkeyed(&self, used: &[PathBuf]) {
        for e in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = e.path();
            if is_store_dir(&dir) || used.iter().any(|u| u.starts_with(&dir)) {
                continue;
            }
            match self.trash.put(&dir) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "dropped bases of an earlier layout")
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not drop bases of an earlier layout")
                }
            }
        }
    }

    /// Where the bases of the engine's store and scope live: `bases/@<store id>/<scope>`.
    /// Bases of two stores never share a directory, even with the same scope, key and
    /// generation (two StorageClasses, or an inline volume beside a PV).
    fn root_of(&self, engine: &Engine) -> PathBuf {
        self.root
            .join(store_dir(engine.store().display_url()))
            .join(engine.scope())
    }

    /// The tree of generation `generation` of `key` (None: the empty base), as a base for
    /// pods of fsGroup `group`: each group has bases of its own, writable by it.
    fn tree(
        &self,
        engine: &Engine,
        key: &str,
        generation: Option<u64>,
        group: Option<u32>,
    ) -> PathBuf {
        let mut name = match generation {
            Some(g) => format!("{g:020}"),
            None => "_empty".to_string(),
        };
        if let Some(g) = group {
            name.push_str(&format!("-g{g}"));
        }
        let root = self.root_of(engine);
        match generation {
            Some(_) => root.join(key).join(name).join("tree"),
            None => root.join(name).join("tree"),
        }
    }

    /// The base of a volume: the newest generation of its key (else of a restore key) on the
    /// node, downloaded if missing — once, however many pods ask at once. A store that cannot
    /// be reached degrades to the newest base the node has for the key, else to an empty one.
    /// `used` says which base directories views read (asked after a restore, for eviction).
    pub(super) async fn ensure(
        &self,
        engine: &Engine,
        spec: &VolumeSpec,
        group: Option<u32>,
        used: impl Fn() -> Vec<PathBuf>,
    ) -> Result<Base> {
        let source = if spec.policy == Policy::Push {
            Ok(RestoreSource::Miss)
        } else {
            engine.resolve(&spec.key, &spec.restore_keys).await
        };
        let (source, degraded) = match source {
            Ok(s) => (s, None),
            Err(e) if e.is_store_unavailable() => {
                let why = format!("store unreachable: {e}");
                match self.local(&spec.key, engine, group).into_iter().next() {
                    Some((generation, _)) => (
                        RestoreSource::Key {
                            key: spec.key.clone(),
                            generation,
                        },
                        Some(format!("{why}; using the node's generation {generation}")),
                    ),
                    None => (RestoreSource::Miss, Some(format!("{why}; starting empty"))),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let dir = match &source {
            RestoreSource::Key { key, generation }
            | RestoreSource::RestoreKey { key, generation } => {
                self.tree(engine, key, Some(*generation), group)
            }
            RestoreSource::Miss => self.tree(engine, &spec.key, None, group),
        };
        let lock = lock_of(&self.locks, &dir);
        let _guard = lock.lock().await;
        let mut warm = engine.has_record(&dir);
        if warm {
            if let Err(e) = self.mount(&dir).await {
                // An image base the kernel no longer mounts (rebooted into another kernel, or
                // the image is damaged): written out again below.
                tracing::warn!(base = %dir.display(), error = %e, "cannot mount a base image; restoring it again");
                self.unmount(&dir);
                engine.forget(&dir);
                let gen_dir = dir.parent().unwrap_or(&dir);
                let _ = std::fs::remove_file(gen_dir.join(IMAGE));
                warm = false;
            }
        }
        let (mut bytes, mut downloaded) = (0, 0);
        let mut form = None;
        if !warm {
            if let Some(other) = engine.foreign_record(&dir) {
                // Never reuse (or restore over) another store's or scope's tree.
                return Err(engine::Error::Unsupported {
                    path: dir,
                    why: format!("this base holds a snapshot of {other}"),
                }
                .into());
            }
            std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
            match self.restore_image(engine, &source, &dir, group).await {
                Ok(Some(r)) => {
                    (bytes, downloaded) = (r.bytes, r.downloaded);
                    form = Some(BaseForm::Image);
                    self.evict(used()).await;
                }
                Ok(None) => {}
                Err(e) => {
                    self.unmount(&dir);
                    let _ = std::fs::remove_dir_all(dir.parent().unwrap_or(&dir));
                    return Err(e);
                }
            }
        }
        if !warm && form.is_none() {
            form = Some(BaseForm::Tree);
            let restored = match engine.restore_source(source.clone(), &dir).await {
                Ok(r) => match group {
                    Some(g) => {
                        let d = dir.clone();
                        blocking(move || grant_group(&d, g))
                            .await
                            .map(|_| r)
                            .map_err(|e| IoError::new("set the group of", &dir, e).into())
                    }
                    None => Ok(r),
                },
                Err(e) => Err(e.into()),
            };
            match restored {
                Ok(r) => (bytes, downloaded) = (r.bytes, r.downloaded),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(dir.parent().unwrap_or(&dir));
                    return Err(e);
                }
            }
            self.evict(used()).await;
        }
        touch(&dir);
        Ok(Base {
            dir,
            form,
            source,
            warm,
            degraded,
            bytes,
            downloaded,
        })
    }

    /// Writes generation `source` as an image base at `tree`'s directory and mounts it. None
    /// when images are off or the kernel refused to mount one (then images stay off for this
    /// process: the caller writes a tree instead). Empty bases are always trees.
    async fn restore_image(
        &self,
        engine: &Engine,
        source: &RestoreSource,
        tree: &Path,
        group: Option<u32>,
    ) -> Result<Option<engine::ImageReport>> {
        if !self.images_on() || *source == RestoreSource::Miss {
            return Ok(None);
        }
        let gen_dir = tree.parent().expect("tree has a parent");
        let opts = engine::ImageOptions {
            group,
            record: Some(tree.to_path_buf()),
        };
        let report = engine
            .restore_image(source.clone(), &gen_dir.join(IMAGE), opts)
            .await?;
        let _ = std::fs::remove_file(gen_dir.join(IMAGE_SYNCED));
        std::fs::write(gen_dir.join(IMAGE_BOOT), boot_id())
            .map_err(io("write", &gen_dir.join(IMAGE_BOOT)))?;
        match self.mount(tree).await {
            Ok(()) => {
                sync_in_background(gen_dir.to_path_buf());
                Ok(Some(report))
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "the kernel does not mount EROFS images here (file-backed EROFS needs \
                     Linux 6.12); bases are written as trees of files from now on"
                );
                self.images_off();
                self.unmount(tree);
                engine.forget(tree);
                let _ = std::fs::remove_file(gen_dir.join(IMAGE));
                Ok(None)
            }
        }
    }

    /// Mounts base `tree` when it is an image base that is not mounted (just written, or after
    /// a reboot): its image, then `tree` over it (a bind mount, or a read-only overlay of the
    /// layers committed on this node over the image). Tree bases need nothing.
    pub(super) async fn mount(&self, tree: &Path) -> Result<()> {
        let gen_dir = tree.parent().expect("tree has a parent").to_path_buf();
        if !gen_dir.join(IMAGE).exists() {
            return Ok(());
        }
        let image = gen_dir.join(IMAGE_MOUNT);
        let mounted = self
            .mounter
            .mount_points()
            .map_err(io("read the mount table", tree))?;
        if !mounted.contains(&image) {
            if !durable(&gen_dir) {
                return Err(IoError::other(
                    "mount",
                    gen_dir.join(IMAGE),
                    "the node restarted before this image reached the disk: it may be torn",
                )
                .into());
            }
            std::fs::create_dir_all(&image).map_err(io("create", &image))?;
            self.mounter
                .erofs(&gen_dir.join(IMAGE), &image)
                .map_err(io("mount the image", &gen_dir.join(IMAGE)))?;
        }
        if !mounted.iter().any(|m| m == tree) {
            std::fs::create_dir_all(tree).map_err(io("create", tree))?;
            let mut lower = layers(&gen_dir);
            if lower.is_empty() {
                self.mounter.bind(&image, tree, true)
            } else {
                lower.push(image);
                self.mounter.overlay_read_only(&lower, tree)
            }
            .map_err(io("mount", tree))?;
        }
        Ok(())
    }

    /// Whether base `tree` is an image base (its tree is then a mount while in use).
    pub(super) fn is_image(&self, tree: &Path) -> bool {
        tree.parent().is_some_and(|g| g.join(IMAGE).exists())
    }

    /// Unmounts an image base's mounts (before it is moved or deleted); nothing for trees.
    pub(super) fn unmount(&self, tree: &Path) {
        let gen_dir = tree.parent().expect("tree has a parent");
        for m in [tree.to_path_buf(), gen_dir.join(IMAGE_MOUNT)] {
            if self.mounter.is_mount_point(&m).unwrap_or(false) {
                if let Err(e) = self.mounter.unmount(&m) {
                    tracing::warn!(mount = %m.display(), error = %e, "cannot unmount a base");
                }
            }
        }
    }

    /// Whether fresh bases are written as images: asked for, and not refused by the kernel.
    fn images_on(&self) -> bool {
        self.images && !self.images_refused.load(Ordering::Relaxed)
    }

    fn images_off(&self) {
        self.images_refused.store(true, Ordering::Relaxed);
    }

    /// The generations of `spec.key` the node has complete bases of for `group`, newest first.
    fn local(&self, key: &str, engine: &Engine, group: Option<u32>) -> Vec<(u64, PathBuf)> {
        let root = self.root_of(engine).join(key);
        let suffix = group.map(|g| format!("-g{g}")).unwrap_or_default();
        let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().into_string().ok()?;
                let g: u64 = name.strip_suffix(suffix.as_str())?.parse().ok()?;
                let tree = e.path().join("tree");
                engine.has_record(&tree).then_some((g, tree))
            })
            .collect();
        out.sort_by_key(|b| std::cmp::Reverse(b.0));
        out
    }

    /// After a commit of generation `generation` of `key` from the view `finished`: the
    /// committed tree becomes a base without a download — the old base is moved (when no other
    /// view uses it) or hard-linked, and the view's upper dir is moved in.
    pub(super) async fn advance(
        &self,
        engine: &Engine,
        key: &str,
        generation: u64,
        finished: Finished<'_>,
        tree: &engine::CommittedTree,
    ) -> Result<()> {
        let Finished {
            base: old,
            group,
            upper,
            others_read_base,
        } = finished;
        let new = self.tree(engine, key, Some(generation), group);
        let lock = lock_of(&self.locks, &new);
        let _guard = lock.lock().await;
        if engine.has_record(&new) {
            return Ok(());
        }
        let parent = new.parent().expect("tree has a parent");
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        let upper = upper.to_path_buf();
        let in_use = others_read_base();
        let old_lock = lock_of(&self.locks, &old.to_path_buf());
        let _old_guard = old_lock.lock().await;
        let old_gen = old.parent().expect("tree has a parent");
        if old_gen.join(IMAGE).exists() {
            if in_use || layers(old_gen).len() >= MAX_LAYERS {
                // Left for the next pod to write a fresh image of the new generation (a
                // restore, but of one file): another view still reads this base, or it has
                // collected enough layers.
                return Ok(());
            }
            return self
                .stack_layer(engine, group, old, &new, &upper, tree)
                .await;
        }
        let empty_base = old
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("_empty"));
        if in_use || empty_base {
            let (from, to) = (old.to_path_buf(), new.clone());
            blocking(move || engine::overlay::link_tree(&from, &to)).await?;
        } else {
            std::fs::rename(old, &new).map_err(io("move", old))?;
            let _ = std::fs::remove_dir(old.parent().unwrap_or(old));
        }
        if let Some(g) = group {
            // What the pods wrote joins the group's base: writable by the next pod too.
            let u = upper.clone();
            blocking(move || grant_group(&u, g))
                .await
                .map_err(io("set the group of", &upper))?;
        }
        let (u, to) = (upper.clone(), new.clone());
        blocking(move || engine::overlay::apply_to_dir(&u, &to)).await?;
        engine.record_tree(&new, tree)?;
        touch(&new);
        Ok(())
    }

    /// Makes the committed tree the base of the new generation `new` on top of the image base
    /// `old`: the image and its layers move to the new generation's directory, and the view's
    /// upper dir becomes the top layer (its whiteouts and opaque directories hide what the
    /// pods deleted). Nothing is copied.
    async fn stack_layer(
        &self,
        engine: &Engine,
        group: Option<u32>,
        old: &Path,
        new: &Path,
        upper: &Path,
        tree: &engine::CommittedTree,
    ) -> Result<()> {
        let (old_gen, new_gen) = (
            old.parent().expect("tree has a parent"),
            new.parent().expect("tree has a parent"),
        );
        if let Some(g) = group {
            let u = upper.to_path_buf();
            blocking(move || grant_group(&u, g))
                .await
                .map_err(io("set the group of", upper))?;
        }
        let u = upper.to_path_buf();
        blocking(move || layer_of_upper(&u))
            .await
            .map_err(io("prepare a layer from", upper))?;
        self.unmount(old);
        let move_in = |from: PathBuf, to: PathBuf| -> Result<()> {
            Ok(std::fs::rename(&from, &to).map_err(io("move", &from))?)
        };
        let moved = (|| {
            for f in [IMAGE, IMAGE_BOOT, IMAGE_SYNCED] {
                if old_gen.join(f).exists() {
                    move_in(old_gen.join(f), new_gen.join(f))?;
                }
            }
            let layer_dir = new_gen.join(LAYERS);
            if old_gen.join(LAYERS).exists() {
                move_in(old_gen.join(LAYERS), layer_dir.clone())?;
            } else {
                std::fs::create_dir_all(&layer_dir).map_err(io("create", &layer_dir))?;
            }
            let n = layers(new_gen).len();
            move_in(upper.to_path_buf(), layer_dir.join(format!("{n:04}")))
        })();
        if moved.is_err() {
            // Half moved: neither generation's directory is a base any more. Both are
            // forgotten, and the next pod writes a fresh image.
            engine.forget(old);
            let _ = self.trash.put(new_gen);
        }
        let _ = self.trash.put(old_gen);
        moved?;
        std::fs::create_dir_all(new).map_err(io("create", new))?;
        self.mount(new).await?;
        engine.record_tree(new, tree)?;
        touch(new);
        Ok(())
    }

    /// Bytes of the node's bases (walks every base tree: call it now and then, not per
    /// request).
    pub(super) async fn bytes(&self) -> u64 {
        let root = self.root.clone();
        let bases = blocking(move || sized_bases(&root)).await;
        bases.iter().map(|b| b.1).sum()
    }

    pub(super) fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// Evicts least recently used bases no view uses (`used`: the base directories views
    /// read) while the node keeps more than its budget.
    async fn evict(&self, used: Vec<PathBuf>) {
        let Some(budget) = self.budget else {
            return;
        };
        let root = self.root.clone();
        let mut bases = blocking(move || sized_bases(&root)).await;
        let mut total: u64 = bases.iter().map(|b| b.1).sum();
        bases.sort();
        for (_, size, tree) in bases {
            if total <= budget {
                break;
            }
            if used.contains(&tree) {
                continue;
            }
            let lock = lock_of(&self.locks, &tree);
            let Ok(_g) = lock.try_lock() else {
                continue;
            };
            let gen_dir = tree.parent().expect("tree has a parent").to_path_buf();
            self.unmount(&tree);
            if self.trash.put(&gen_dir).is_ok() {
                tracing::info!(base = %tree.display(), bytes = size, "evicted base");
                self.report.base_evicted(EvictionReason::Budget);
                total -= size;
            }
        }
    }
}

/// Every base tree under `root` (the node's `bases/`): when it was last used and its bytes.
fn sized_bases(root: &Path) -> Vec<(std::time::SystemTime, u64, PathBuf)> {
    let mut bases: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
    let subdirs = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    let mut trees = Vec::new();
    for store in subdirs(root) {
        if !is_store_dir(&store) {
            continue;
        }
        for scope in subdirs(&store) {
            for key in subdirs(&scope) {
                if key
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("_empty"))
                {
                    trees.push(key.join("tree"));
                } else {
                    trees.extend(subdirs(&key).into_iter().map(|g| g.join("tree")));
                }
            }
        }
    }
    for tree in trees {
        if !tree.exists() {
            continue;
        }
        // When it was last used: see `touch`.
        let Ok(md) = std::fs::metadata(tree.parent().expect("tree has a parent")) else {
            continue;
        };
        // An image base: its image and layers (walking the mounted tree would count the image's
        // content, and read every inode of it).
        let gen_dir = tree.parent().expect("tree has a parent");
        let size = match std::fs::metadata(gen_dir.join(IMAGE)) {
            Ok(image) => image.len() + tree_bytes(&gen_dir.join(LAYERS)),
            Err(_) => tree_bytes(&tree),
        };
        bases.push((md.modified().unwrap_or(std::time::UNIX_EPOCH), size, tree));
    }
    bases
}

/// Makes the tree at `root` writable by group `gid` (a pod's fsGroup): every entry's group
/// becomes `gid`; directories get group rwx and setgid (new entries inherit the group), files
/// group rw (and x where the owner has it). Symbolic links only change group.
pub fn grant_group(root: &Path, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p)?;
        std::os::unix::fs::lchown(&p, None, Some(gid))?;
        let ft = md.file_type();
        if ft.is_symlink() {
            continue;
        }
        let mode = md.permissions().mode() & 0o7777;
        let want = if ft.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
            engine::format::widen_for_group(mode, engine::Kind::Dir) | 0o2000
        } else {
            engine::format::widen_for_group(mode, engine::Kind::File)
        };
        if want != mode {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(want))?;
        }
    }
    Ok(())
}

/// The directory of one store's bases: `@` (never part of a scope name) and a short hash of
/// the store's URL without credentials.
fn store_dir(display_url: &str) -> String {
    format!("@{}", &hash_id(&[display_url])[..16])
}

fn is_store_dir(dir: &Path) -> bool {
    dir.file_name()
        .is_some_and(|n| n.as_encoded_bytes().starts_with(b"@"))
}

/// Marks base `tree` as just used: the mtime of its generation's directory orders eviction
/// (`tree` itself may be a read-only mount).
fn touch(tree: &Path) {
    let dir = tree.parent().expect("tree has a parent");
    let _ = std::fs::File::open(dir).and_then(|f| f.set_modified(std::time::SystemTime::now()));
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for item in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if let Ok(md) = item.metadata() {
                if md.is_dir() {
                    stack.push(item.path());
                } else {
                    total += md.len();
                }
            }
        }
    }
    total
}

/// The layers of an image base's generation directory, top (newest) first.
fn layers(gen_dir: &Path) -> Vec<PathBuf> {
    let mut l: Vec<PathBuf> = std::fs::read_dir(gen_dir.join(LAYERS))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    l.sort();
    l.reverse();
    l
}

/// Makes a finished view's upper dir a layer that shows exactly what was committed: the
/// commit marker and what a snapshot cannot hold (sockets, FIFOs, devices other than
/// whiteouts) are removed, as the commit left them out.
fn layer_of_upper(upper: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let marker = upper.join(engine::MARKER);
    match marker.symlink_metadata() {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(&marker)?,
        Ok(_) => std::fs::remove_file(&marker)?,
        Err(_) => {}
    }
    let mut stack = vec![upper.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let md = e.path().symlink_metadata()?;
            let ft = md.file_type();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_fifo()
                || ft.is_socket()
                || ft.is_block_device()
                || (ft.is_char_device() && md.rdev() != 0)
            {
                std::fs::remove_file(e.path())?;
            }
        }
    }
    Ok(())
}

/// This boot's id (empty where the kernel does not say).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Whether the image of `gen_dir` can be trusted to be whole: it reached the disk, or it was
/// written in this boot (so the page cache still holds whatever the disk does not).
fn durable(gen_dir: &Path) -> bool {
    gen_dir.join(IMAGE_SYNCED).exists()
        || std::fs::read_to_string(gen_dir.join(IMAGE_BOOT))
            .is_ok_and(|b| !b.is_empty() && b == boot_id())
}

/// Flushes a new image to disk off the pod's critical path, then marks it durable.
fn sync_in_background(gen_dir: PathBuf) {
    std::thread::spawn(move || {
        let synced = std::fs::File::open(gen_dir.join(IMAGE))
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::write(gen_dir.join(IMAGE_SYNCED), ""))
            .and_then(|()| std::fs::File::open(&gen_dir)?.sync_all());
        if let Err(e) = synced {
            // Moved by a commit meanwhile, or evicted: its new place is synced then.
            tracing::debug!(dir = %gen_dir.display(), error = %e, "could not mark a base image durable");
        }
    });
}

/// The base cache alone, through the fake mounter: no view, record or pod, only what its callers
/// hand it. The store is a `file://` directory.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::CommitOptions;
    use crate::node::fixture;
    use crate::node::mount::fake::{Fake, Mount};

    struct Cache {
        tmp: tempfile::TempDir,
        engine: Engine,
        mounts: Arc<Fake>,
        bases: Bases,
        evictions: Arc<Evictions>,
    }

    /// Counts the evictions the base cache reports, by reason.
    #[derive(Default)]
    struct Evictions(Mutex<Vec<EvictionReason>>);

    impl Report for Evictions {
        fn base_evicted(&self, reason: EvictionReason) {
            self.0.lock().unwrap().push(reason);
        }
    }

    impl Evictions {
        fn seen(&self) -> Vec<EvictionReason> {
            self.0.lock().unwrap().clone()
        }
    }

    /// A base cache whose store holds generation 1 of `ci/npm` and of `ci/pip` (one file each,
    /// 300 bytes).
    async fn cache(mounts: Fake, budget: Option<u64>, images: bool) -> Cache {
        let tmp = tempfile::tempdir().unwrap();
        for key in ["npm", "pip"] {
            fixture::commit(tmp.path(), key, &key.repeat(100)).await;
        }
        let (state, engine) = fixture::state(tmp.path());
        let mounts = Arc::new(mounts);
        let evictions = Arc::new(Evictions::default());
        let bases = Bases::new(
            state.join("bases"),
            Trash(state.join("trash")),
            budget,
            images,
            mounts.clone(),
            evictions.clone(),
        );
        Cache {
            tmp,
            engine,
            mounts,
            bases,
            evictions,
        }
    }

    fn spec(c: &Cache, key: &str) -> VolumeSpec {
        fixture::spec(c.tmp.path(), key)
    }

    fn none_used() -> Vec<PathBuf> {
        Vec::new()
    }

    /// The base of `key` for `group`, no view reading any base.
    async fn ensure(c: &Cache, key: &str, group: Option<u32>) -> Base {
        c.bases
            .ensure(&c.engine, &spec(c, key), group, none_used)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_base_is_restored_once_then_warm_in_the_same_directory() {
        let c = cache(Fake::default(), None, false).await;
        let first = ensure(&c, "npm", None).await;
        assert!(!first.warm);
        assert_eq!(first.form, Some(BaseForm::Tree));
        assert_eq!(
            std::fs::read_to_string(first.dir.join("f")).unwrap(),
            "npm".repeat(100)
        );
        let again = ensure(&c, "npm", None).await;
        assert!(again.warm);
        assert_eq!(again.form, None, "nothing written the second time");
        assert_eq!(again.dir, first.dir);
        assert_eq!(c.bases.bytes().await, 300);
        assert!(
            c.mounts.table.lock().unwrap().is_empty(),
            "a tree base needs no mount"
        );
    }

    #[tokio::test]
    async fn each_group_gets_a_base_of_its_own() {
        let c = cache(Fake::default(), None, false).await;
        let plain = ensure(&c, "npm", None).await;
        let grouped = ensure(&c, "npm", Some(2000)).await;
        assert_ne!(plain.dir, grouped.dir);
        assert!(!grouped.warm);
    }

    #[tokio::test]
    async fn past_the_budget_the_least_recently_used_base_no_view_reads_is_evicted() {
        // Room for one base of 300 bytes.
        let c = cache(Fake::default(), Some(400), false).await;
        let npm = ensure(&c, "npm", None).await;
        // A view reads npm's base: restoring pip leaves it, over budget.
        let read = vec![npm.dir.clone()];
        let pip = c
            .bases
            .ensure(&c.engine, &spec(&c, "pip"), None, || read.clone())
            .await
            .unwrap();
        assert!(
            npm.dir.join("f").exists(),
            "a base a view reads is never evicted"
        );
        assert_eq!(c.bases.bytes().await, 600);
        assert_eq!(c.evictions.seen(), [], "over budget, nothing evicted yet");
        // No view reads it any more: the next restore evicts it (pip was used last).
        std::fs::remove_dir_all(pip.dir.parent().unwrap()).unwrap();
        c.engine.forget(&pip.dir);
        ensure(&c, "pip", None).await;
        assert!(!npm.dir.exists(), "evicted");
        assert_eq!(c.bases.bytes().await, 300);
        assert_eq!(c.evictions.seen(), [EvictionReason::Budget]);
        // Within the budget, a restore evicts nothing more.
        ensure(&c, "pip", None).await;
        assert_eq!(c.evictions.seen(), [EvictionReason::Budget]);
    }

    #[tokio::test]
    async fn a_fresh_base_is_an_image_unless_the_kernel_refuses_then_trees_from_then_on() {
        let c = cache(Fake::default(), None, true).await;
        let b = ensure(&c, "npm", None).await;
        assert_eq!(b.form, Some(BaseForm::Image));
        assert!(c.bases.is_image(&b.dir));
        let gen_dir = b.dir.parent().unwrap();
        assert_eq!(
            c.mounts.at(&b.dir),
            Some(Mount::Bind {
                source: gen_dir.join(IMAGE_MOUNT),
                read_only: true
            })
        );
        c.bases.unmount(&b.dir);
        assert!(
            c.mounts.table.lock().unwrap().is_empty(),
            "both mounts gone"
        );

        let c = cache(
            Fake {
                refuse_erofs: true,
                ..Default::default()
            },
            None,
            true,
        )
        .await;
        for key in ["npm", "pip"] {
            let b = ensure(&c, key, None).await;
            assert_eq!(b.form, Some(BaseForm::Tree), "{key}");
            assert!(!c.bases.is_image(&b.dir));
        }
    }

    #[tokio::test]
    async fn a_committed_tree_becomes_the_next_base_without_a_download() {
        let c = cache(Fake::default(), None, false).await;
        let old = ensure(&c, "npm", None).await;
        // What a view's pods wrote, in its upper dir, committed as generation 2.
        let upper = c.tmp.path().join("upper");
        std::fs::create_dir_all(&upper).unwrap();
        std::fs::write(upper.join("g"), "new").unwrap();
        let (report, tree) = c
            .engine
            .commit_overlay("npm", &old.dir, &upper, &CommitOptions::default())
            .await
            .unwrap();
        assert!(matches!(
            report.outcome,
            engine::CommitOutcome::Committed { generation: 2 }
        ));
        let finished = Finished {
            base: &old.dir,
            group: None,
            upper: &upper,
            others_read_base: &|| false,
        };
        c.bases
            .advance(&c.engine, "npm", 2, finished, &tree.unwrap())
            .await
            .unwrap();
        assert!(
            !old.dir.exists(),
            "the old base was moved, no other view read it"
        );
        let next = ensure(&c, "npm", None).await;
        assert!(next.warm, "generation 2 is local");
        assert_eq!(std::fs::read_to_string(next.dir.join("g")).unwrap(), "new");
        assert_eq!(
            std::fs::read_to_string(next.dir.join("f")).unwrap(),
            "npm".repeat(100)
        );
    }
}

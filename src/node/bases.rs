//! Bases: the trees of restored or committed generations a node keeps, one directory per
//! store, scope, key, generation and group (`bases/@<store id>/<scope>/<key>/<generation>/tree`),
//! never modified in place. Restores into them (once, however many pods ask at once), the
//! committed tree kept as the next base, and eviction past the node's budget.

use std::path::{Path, PathBuf};

use super::{blocking, hash_id, io, IoError, Result, ViewRecord, Volumes};
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

impl Volumes {
    /// Bases of earlier versions (`bases/<scope>/...`, without the store) are never used again:
    /// which store they came from is not in their path. Those no view uses go to the trash (the
    /// next pod restores its cache again); a view over one still commits from it (its record
    /// names the directory), and its committed tree becomes a base of the new layout.
    pub(super) fn drop_unkeyed_bases(&self) {
        let root = self.cfg.state_dir.join("bases");
        let used: Vec<PathBuf> = self.views().into_iter().map(|v| v.base_dir).collect();
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let dir = e.path();
            if is_store_dir(&dir) || used.iter().any(|u| u.starts_with(&dir)) {
                continue;
            }
            match self.trash(&dir) {
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
    fn base_root(&self, engine: &Engine) -> PathBuf {
        self.cfg
            .state_dir
            .join("bases")
            .join(store_dir(engine.store().display_url()))
            .join(engine.scope())
    }

    /// The tree of generation `generation` of `key` (None: the empty base), as a base for
    /// pods of fsGroup `group`: each group has bases of its own, writable by it.
    fn base_tree(
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
        let root = self.base_root(engine);
        match generation {
            Some(_) => root.join(key).join(name).join("tree"),
            None => root.join(name).join("tree"),
        }
    }

    /// The base of a volume: the newest generation of its key (else of a restore key) on the
    /// node, downloaded if missing — once, however many pods ask at once. A store that cannot
    /// be reached degrades to the newest base the node has for the key, else to an empty one.
    pub(super) async fn ensure_base(&self, spec: &VolumeSpec, group: Option<u32>) -> Result<Base> {
        let engine = self.engine(spec)?;
        let source = if spec.policy == Policy::Push {
            Ok(RestoreSource::Miss)
        } else {
            engine.resolve(&spec.key, &spec.restore_keys).await
        };
        let (source, degraded) = match source {
            Ok(s) => (s, None),
            Err(e) if e.is_store_unavailable() => {
                let why = format!("store unreachable: {e}");
                match self
                    .local_bases(&spec.key, &engine, group)
                    .into_iter()
                    .next()
                {
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
                self.base_tree(&engine, key, Some(*generation), group)
            }
            RestoreSource::Miss => self.base_tree(&engine, &spec.key, None, group),
        };
        let lock = Self::lock_of(&self.base_locks, &dir);
        let _guard = lock.lock().await;
        let mut warm = engine.has_record(&dir);
        if warm {
            if let Err(e) = self.mount_base(&dir).await {
                // An image base the kernel no longer mounts (rebooted into another kernel, or
                // the image is damaged): written out again below.
                tracing::warn!(base = %dir.display(), error = %e, "cannot mount a base image; restoring it again");
                self.unmount_base(&dir);
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
            match self.restore_image(&engine, &source, &dir, group).await {
                Ok(Some(r)) => {
                    (bytes, downloaded) = (r.bytes, r.downloaded);
                    form = Some(BaseForm::Image);
                    self.evict_bases().await;
                }
                Ok(None) => {}
                Err(e) => {
                    self.unmount_base(&dir);
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
            self.evict_bases().await;
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
        match self.mount_base(tree).await {
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
                self.unmount_base(tree);
                engine.forget(tree);
                let _ = std::fs::remove_file(gen_dir.join(IMAGE));
                Ok(None)
            }
        }
    }

    /// Mounts base `tree` when it is an image base that is not mounted (just written, or after
    /// a reboot): its image, then `tree` over it (a bind mount, or a read-only overlay of the
    /// layers committed on this node over the image). Tree bases need nothing.
    pub(super) async fn mount_base(&self, tree: &Path) -> Result<()> {
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
    pub(super) fn is_image_base(&self, tree: &Path) -> bool {
        tree.parent().is_some_and(|g| g.join(IMAGE).exists())
    }

    /// Unmounts an image base's mounts (before it is moved or deleted); nothing for trees.
    pub(super) fn unmount_base(&self, tree: &Path) {
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
        self.cfg.base_images
            && !self
                .images_refused
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn images_off(&self) {
        self.images_refused
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The generations of `spec.key` the node has complete bases of for `group`, newest first.
    fn local_bases(&self, key: &str, engine: &Engine, group: Option<u32>) -> Vec<(u64, PathBuf)> {
        let root = self.base_root(engine).join(key);
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

    /// After a commit of generation `generation` from a view over `record.base_dir`: the
    /// committed tree becomes a base without a download — the old base is moved (when no other
    /// view uses it) or hard-linked, and the view's upper dir is moved in.
    pub(super) async fn advance_base(
        &self,
        engine: &Engine,
        spec: &VolumeSpec,
        record: &ViewRecord,
        generation: u64,
        tree: &engine::CommittedTree,
    ) -> Result<()> {
        let new = self.base_tree(engine, &spec.key, Some(generation), record.group);
        let lock = Self::lock_of(&self.base_locks, &new);
        let _guard = lock.lock().await;
        if engine.has_record(&new) {
            return Ok(());
        }
        let parent = new.parent().expect("tree has a parent");
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        let upper = self.view_dir(&record.id).join("upper");
        let old = &record.base_dir;
        let in_use = self
            .views()
            .iter()
            .any(|v| v.id != record.id && &v.base_dir == old);
        let old_lock = Self::lock_of(&self.base_locks, old);
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
                .stack_layer(engine, record, old, &new, &upper, tree)
                .await;
        }
        let empty_base = old
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("_empty"));
        if in_use || empty_base {
            let (from, to) = (old.clone(), new.clone());
            blocking(move || engine::overlay::link_tree(&from, &to)).await?;
        } else {
            std::fs::rename(old, &new).map_err(io("move", old))?;
            let _ = std::fs::remove_dir(old.parent().unwrap_or(old));
        }
        if let Some(g) = record.group {
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
        record: &ViewRecord,
        old: &Path,
        new: &Path,
        upper: &Path,
        tree: &engine::CommittedTree,
    ) -> Result<()> {
        let (old_gen, new_gen) = (
            old.parent().expect("tree has a parent"),
            new.parent().expect("tree has a parent"),
        );
        if let Some(g) = record.group {
            let u = upper.to_path_buf();
            blocking(move || grant_group(&u, g))
                .await
                .map_err(io("set the group of", upper))?;
        }
        let u = upper.to_path_buf();
        blocking(move || layer_of_upper(&u))
            .await
            .map_err(io("prepare a layer from", upper))?;
        self.unmount_base(old);
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
            let _ = self.trash(new_gen);
        }
        let _ = self.trash(old_gen);
        moved?;
        std::fs::create_dir_all(new).map_err(io("create", new))?;
        self.mount_base(new).await?;
        engine.record_tree(new, tree)?;
        touch(new);
        Ok(())
    }

    /// The node's gauges: bytes of its bases (walks every base tree: call it now and then, not
    /// per request), its views and how long the oldest pending commit has waited.
    pub async fn gauges(&self) -> super::NodeGauges {
        let root = self.cfg.state_dir.join("bases");
        let bases = blocking(move || sized_bases(&root)).await;
        let now = super::unix_now();
        let views = self.views();
        let pending: Vec<&super::ViewRecord> = views
            .iter()
            .filter(|v| v.state == super::ViewState::Pending)
            .collect();
        super::NodeGauges {
            base_bytes: bases.iter().map(|b| b.1).sum(),
            base_budget: self.cfg.base_budget,
            active_views: views.len() - pending.len(),
            pending_views: pending.len(),
            oldest_pending_secs: pending
                .iter()
                .filter_map(|v| v.pending_since)
                .min()
                .map(|t| now.saturating_sub(t) as f64)
                .unwrap_or(0.0),
        }
    }

    /// Samples [`Volumes::gauges`] and reports them.
    pub async fn report_gauges(&self) {
        let g = self.gauges().await;
        self.report.node_gauges(&g);
    }

    /// Evicts least recently used bases no view uses while the node keeps more than its budget.
    async fn evict_bases(&self) {
        let Some(budget) = self.cfg.base_budget else {
            return;
        };
        let used: Vec<PathBuf> = self.views().into_iter().map(|v| v.base_dir).collect();
        let root = self.cfg.state_dir.join("bases");
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
            let lock = Self::lock_of(&self.base_locks, &tree);
            let Ok(_g) = lock.try_lock() else {
                continue;
            };
            let gen_dir = tree.parent().expect("tree has a parent").to_path_buf();
            self.unmount_base(&tree);
            if self.trash(&gen_dir).is_ok() {
                tracing::info!(base = %tree.display(), bytes = size, "evicted base");
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

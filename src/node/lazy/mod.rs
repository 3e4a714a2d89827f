//! A lazy base: a generation's tree served read-only over FUSE straight from its manifest, so a
//! pod on a node with no base can start before any file data is local (issue 23). Every name,
//! mode, size and link target is known at mount time; a read of a file that is not local yet
//! fetches that file's chunks (ranged, coalesced, verified: [`Engine::fetch_file`]) into the
//! base's local copy and is then answered from it. Background hydration fetches the rest, in
//! manifest order, behind the demand reads; once every file is local the copy is an ordinary
//! tree base. A pod sees the lazy tree as the lower layer of its usual overlay view: the tree
//! never changes under the overlay, because fetching writes the copy, not the mount.
//!
//! Why `fuser` (0.18, without its libfuse feature) rather than fuse-backend-rs, fuse3 or
//! polyfuse (docs/lazy-bases-plan.md §1 has the comparison):
//! - Of these it is the one with the kernel's own passthrough (protocol 7.40: the
//!   backing-open ioctl and an open reply naming a backing file), which is the point of the
//!   design: once a file is local, its reads should not come to this process at all. The
//!   passthrough fuse-backend-rs knows is a different, out-of-tree kernel extension.
//! - It needs no libfuse and no fusermount: this module opens `/dev/fuse`, mounts it with
//!   rustix as the node already mounts overlay and EROFS, and hands the descriptor to
//!   `Session::from_fd`. The same descriptor can later be handed to a holder process.
//! - What it lacks is taking over a connection that is already initialized (its sessions
//!   always wait for the one INIT the kernel sends; fuser issue #753), which a node-plugin
//!   restart needs. The tree here is read-only and its inode numbers are a pure function of
//!   the manifest ([`tree`]), so what a successor must restore is small: the negotiated
//!   INIT parameters and the passthrough backing ids.
//!
//! Requests are read by one fuser thread and answered in memory (lookup, getattr, readdir,
//! readlink, statfs); reads go to the tokio runtime, so a read waiting for the store never
//! holds up the lookups of other pods.

mod local;
mod tree;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{
    Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tokio::sync::watch;

use crate::engine::{self, Engine, Entry, Kind};

pub use local::{Hydration, Stats};
pub use tree::Attrs;

use tree::{Tree, ROOT};

/// How long the kernel may keep names and attributes: the tree never changes, so as long as
/// it likes (a year, well within what the kernel can count).
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// The lazy tree of one generation and its local copy. Cheap to clone: clones share the tree,
/// the copy and the counters (the session owns one, the node keeps another to ask it).
#[derive(Clone)]
pub struct LazyFs {
    inner: Arc<Inner>,
}

struct Inner {
    tree: Tree,
    local: Arc<local::Local>,
    runtime: tokio::runtime::Handle,
    /// The kernel agreed to passthrough at INIT: opens are counted per inode from then on.
    passthrough: AtomicBool,
    /// Passthrough still works here (a backing file on a stacked file system, for one, is
    /// refused with ELOOP): cleared at the first refusal, and files are then served by reads.
    passthrough_usable: AtomicBool,
    opens: Mutex<HashMap<u64, Opens>>,
}

/// The open files of one inode. The kernel puts an inode in one I/O mode at a time: while it
/// has opens through the page cache, an open with passthrough fails, and the other way round.
/// So a file is opened with passthrough only when it is local and has no cached opens, and
/// all its passthrough opens share one backing id, closed with the last of them.
#[derive(Default)]
struct Opens {
    cached: u32,
    passthrough: u32,
    backing: Option<fuser::BackingId>,
}

/// The file handles of opens: which kind each is, for its release.
const CACHED: FileHandle = FileHandle(0);
const PASSTHROUGH: FileHandle = FileHandle(1);

impl LazyFs {
    /// The tree of `entries` (a generation's, as [`Engine::load_entries`] returns them: they
    /// are validated here, as for an image) with its local copy at `local` and the journal of
    /// the files already there at `journal`. Reads and hydration run on `runtime`.
    pub fn new(
        engine: Engine,
        mut entries: Vec<Entry>,
        local: &Path,
        journal: &Path,
        attrs: Attrs,
        runtime: tokio::runtime::Handle,
    ) -> engine::Result<LazyFs> {
        engine::format::validate_tree(&format!("lazy base {}", local.display()), &mut entries)?;
        let copy = local::Local::open(engine, &entries, local, journal)
            .map_err(engine::io("open the local copy", local))?;
        Ok(LazyFs {
            inner: Arc::new(Inner {
                tree: Tree::new(entries, attrs),
                local: Arc::new(copy),
                runtime,
                passthrough: AtomicBool::new(false),
                passthrough_usable: AtomicBool::new(true),
                opens: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Starts background hydration: every file not yet local, in manifest order, a few at a
    /// time and none while a read waits for the store. [`LazyFs::hydrated`] says when it ends.
    pub fn hydrate(&self) -> tokio::task::JoinHandle<()> {
        let local = self.inner.local.clone();
        let entries = self.inner.tree.entries.clone();
        self.inner.runtime.spawn(local.hydrate(entries))
    }

    /// Where hydration is, as it changes.
    pub fn hydration(&self) -> watch::Receiver<Hydration> {
        self.inner.local.hydration.subscribe()
    }

    /// Waits until hydration ends: Ok once the copy is a complete tree (a later step makes it
    /// an ordinary tree base), the error of the file that stopped it otherwise.
    pub async fn hydrated(&self) -> Result<(), String> {
        let mut rx = self.hydration();
        let h = rx
            .wait_for(|h| !matches!(h, Hydration::Running { .. }))
            .await
            .map_err(|_| "the lazy base is gone".to_string())?
            .clone();
        match h {
            Hydration::Complete => Ok(()),
            Hydration::Failed(e) => Err(e),
            Hydration::Running { .. } => unreachable!("waited for the end"),
        }
    }

    /// Journals every file written so far, after one sync of the file system: a server that
    /// stops cleanly calls it, so that its successor fetches none of them again.
    pub async fn flush(&self) {
        self.inner.local.flush().await
    }

    /// The counters so far (bytes on demand and prefetched, reads that waited, files local).
    pub fn stats(&self) -> Stats {
        self.inner.local.stats()
    }

    /// Whether files that are local are opened with FUSE passthrough (their reads then go
    /// from the kernel to the local file without coming here): the kernel agreed at INIT and
    /// no backing file was refused since.
    pub fn passthrough(&self) -> bool {
        self.inner.passthrough.load(Ordering::Relaxed)
            && self.inner.passthrough_usable.load(Ordering::Relaxed)
    }

    /// Opens local file `e` (inode `ino`) with passthrough if it can, counting the open; None:
    /// open it through the page cache (also counted, when passthrough is on).
    fn open_passthrough(&self, ino: u64, e: &Entry, reply: &ReplyOpen) -> Option<()> {
        let inner = &self.inner;
        if !inner.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        let mut opens = inner.opens.lock().expect("not poisoned");
        let o = opens.entry(ino).or_default();
        let usable = inner.passthrough_usable.load(Ordering::Relaxed);
        if o.cached == 0 && usable && o.backing.is_none() {
            let backing =
                std::fs::File::open(inner.local.path(e)).and_then(|f| reply.open_backing(&f));
            match backing {
                Ok(id) => o.backing = Some(id),
                Err(err) => {
                    tracing::warn!(
                        local = %inner.local.root.display(),
                        error = %err,
                        "lazy base: the kernel refused a local file for passthrough; its files are served by reads instead"
                    );
                    inner.passthrough_usable.store(false, Ordering::Relaxed);
                }
            }
        }
        if o.cached == 0 && o.backing.is_some() {
            o.passthrough += 1;
            inner
                .local
                .counters
                .passthrough_opens
                .fetch_add(1, Ordering::Relaxed);
            return Some(());
        }
        o.cached += 1;
        None
    }

    /// The local copy's root.
    pub fn local_root(&self) -> &Path {
        &self.inner.local.root
    }

    fn file(&self, ino: INodeNo) -> Result<(usize, &Entry), Errno> {
        match self.inner.tree.entry(ino.0) {
            Some((i, e)) if e.kind == Kind::File => Ok((i, e)),
            Some((_, e)) if e.kind == Kind::Dir => Err(Errno::EISDIR),
            Some(_) => Err(Errno::EINVAL),
            None if ino.0 == ROOT => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// The entries of directory `ino` as readdir lists them from position `offset` on: `.`,
    /// `..`, then the children in name order; each with its position, inode, type and name.
    fn listing(
        &self,
        ino: INodeNo,
        offset: u64,
    ) -> Result<impl Iterator<Item = (u64, u64, Kind, &str)>, Errno> {
        let t = &self.inner.tree;
        let kids = t.children(ino.0).ok_or(Errno::ENOTDIR)?;
        let dots = [(ino.0, Kind::Dir, "."), (t.parent(ino.0), Kind::Dir, "..")];
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        let kids = kids.get(skip.saturating_sub(2)..).unwrap_or_default();
        let entries = kids.iter().map(move |&i| {
            let e = &t.entries[i as usize];
            (2 + i as u64, e.kind, Tree::name(e))
        });
        let first = offset.max(2);
        Ok(dots
            .into_iter()
            .enumerate()
            .skip(skip)
            .map(|(k, (ino, kind, name))| (k as u64, ino, kind, name))
            .chain(
                entries
                    .enumerate()
                    .map(move |(k, (ino, kind, name))| (first + k as u64, ino, kind, name)),
            ))
    }
}

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Attributes come with the listing (one request for `ls -l` of a directory), and
        // link targets may stay in the page cache: neither ever changes.
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            let _ = config.add_capabilities(flag);
        }
        // Passthrough with a stacking depth of 1: the backing files sit on the node's own
        // file system (depth 0) and an overlay view can still be mounted over this tree
        // (depth 2, the kernel's limit).
        if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.inner.passthrough.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let t = &self.inner.tree;
        match t
            .lookup(parent.0, name.as_encoded_bytes())
            .and_then(|ino| t.attr(ino))
        {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None if t.children(parent.0).is_none() => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inner.tree.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inner.tree.entry(ino.0) {
            Some((_, e)) if e.kind == Kind::Symlink => {
                reply.data(e.target.as_deref().unwrap_or_default().as_bytes())
            }
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let (i, e) = match self.file(ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // Asked once: a file that turns local meanwhile must still count as a cached open.
        let local = self.inner.local.is_local(i);
        if local && self.open_passthrough(ino.0, e, &reply).is_some() {
            let opens = self.inner.opens.lock().expect("not poisoned");
            let id = opens[&ino.0].backing.as_ref().expect("opened with one");
            return reply.opened_passthrough(PASSTHROUGH, FopenFlags::empty(), id);
        }
        if !local && self.inner.passthrough.load(Ordering::Relaxed) {
            let mut opens = self.inner.opens.lock().expect("not poisoned");
            opens.entry(ino.0).or_default().cached += 1;
        }
        // The content never changes: what the page cache holds stays valid across opens.
        reply.opened(CACHED, FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let i = match self.file(ino) {
            Ok((i, _)) => i,
            Err(e) => return reply.error(e),
        };
        let inner = self.inner.clone();
        inner.local.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.runtime.spawn(async move {
            let entries = inner.tree.entries.clone();
            if let Err(e) = inner.local.ensure(&entries, i, true).await {
                // Loud, never wrong: nothing unverified is served, the read fails.
                tracing::warn!(file = entries[i].path, error = %e, "lazy base: a read failed");
                return reply.error(Errno::EIO);
            }
            let local = inner.local.clone();
            let read = tokio::task::spawn_blocking(move || local.read(&entries[i], offset, size))
                .await
                .expect("a read does not panic");
            match read {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    tracing::warn!(error = %e, "lazy base: reading the local copy failed");
                    reply.error(Errno::EIO)
                }
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if self.inner.passthrough.load(Ordering::Relaxed) {
            let mut opens = self.inner.opens.lock().expect("not poisoned");
            if let Some(o) = opens.get_mut(&ino.0) {
                if fh == PASSTHROUGH {
                    o.passthrough = o.passthrough.saturating_sub(1);
                    if o.passthrough == 0 {
                        // Closes the backing id: the kernel keeps its own reference while
                        // the file is open, and no open of the inode needs it any more.
                        o.backing = None;
                    }
                } else {
                    o.cached = o.cached.saturating_sub(1);
                }
                if o.cached == 0 && o.passthrough == 0 {
                    opens.remove(&ino.0);
                }
            }
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inner.tree.children(ino.0) {
            // A listing never changes either: the kernel may cache it.
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_CACHE_DIR),
            None => reply.error(Errno::ENOTDIR),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let list = match self.listing(ino, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        for (k, child, kind, name) in list {
            if reply.add(INodeNo(child), k + 1, Tree::file_type(kind), name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let list = match self.listing(ino, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        let t = &self.inner.tree;
        for (k, child, _, name) in list {
            let attr = t.attr(child).expect("a listed inode exists");
            if reply.add(INodeNo(child), k + 1, name, &TTL, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let t = &self.inner.tree;
        let files = t.entries.len() as u64 + 1;
        reply.statfs(t.bytes.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096);
    }

    // No extended attributes: ENOSYS once, and the kernel stops asking (an overlay over the
    // tree then reads "none", which is what the snapshot holds).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }
}

/// A mounted lazy tree: its mount point and the thread that serves it.
pub struct LazyMount {
    target: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

/// Mounts `fs` read-only at `target`: opens `/dev/fuse`, mounts it with mount(2) (`fd=` names
/// the descriptor; `default_permissions` lets the kernel check modes, as on any tree; no
/// `allow_other`: only root, and an overlay mounted by root, reaches it), then answers the
/// kernel's INIT and serves on a thread of its own. A missing `/dev/fuse` or a refused mount
/// is an error of kind NotFound or PermissionDenied: the caller falls back to another base.
pub fn mount(fs: LazyFs, target: &Path) -> io::Result<LazyMount> {
    use rustix::fs::{Mode, OFlags};
    use rustix::mount::MountFlags;
    let fd = rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
    let data = std::ffi::CString::new(format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions",
        fd.as_raw_fd(),
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    ))
    .expect("no NUL in numbers");
    rustix::mount::mount(
        "cachevol",
        target,
        "fuse.cachevol",
        MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        data.as_c_str(),
    )?;
    // The kernel's access check is the one that counts (no allow_other); fuser's own filter
    // by uid would only refuse what the kernel already let through.
    let session = fuser::Session::from_fd(fs, fd, fuser::SessionACL::All, fuser::Config::default())
        .and_then(fuser::Session::spawn);
    match session {
        Ok(session) => Ok(LazyMount {
            target: target.to_path_buf(),
            session: Some(session),
        }),
        Err(e) => {
            let _ = crate::node::mount::unmount(target);
            Err(e)
        }
    }
}

impl LazyMount {
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts the tree and waits (a second at most) for the serving thread to end. An
    /// overlay view over the tree holds a mount of its own, so unmounting succeeds while a
    /// view still reads it: the tree is then served until the last view goes, and the thread
    /// is not waited for.
    pub fn unmount(mut self) -> io::Result<()> {
        crate::node::mount::unmount(&self.target)?;
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while !session.guard.is_finished() {
            if std::time::Instant::now() >= deadline {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        session.join()
    }
}

impl Drop for LazyMount {
    fn drop(&mut self) {
        // Never left mounted by accident; the thread ends when the kernel closes the
        // connection (at once unless a user keeps it busy).
        if self.session.is_some() {
            let _ = crate::node::mount::unmount(&self.target);
        }
    }
}

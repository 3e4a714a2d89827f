//! The lazy base's local copy: a staging tree at the snapshot's own paths, filled file by file
//! (on demand, or by hydration in manifest order), so that once every file is there it is an
//! ordinary tree base. A file is served from the copy as soon as its verified bytes are
//! written; it is recorded in the journal beside the tree only after a sync of the file system
//! made them durable, in batches (one sync per file would cost more than fetching a small
//! file). A restarted server trusts the journal, never a file's mere presence (a crash can
//! leave a file half written), and fetches again what the journal does not name.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio::sync::watch;

use crate::engine::{Engine, Entry, Kind};

/// Files journaled per sync of the file system, at most (hydration of many small files).
const JOURNAL_BATCH: usize = 256;

/// How a fetch of one file ended, as every reader waiting for it sees it.
type Outcome = Result<(), Arc<str>>;

/// Where hydration is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hydration {
    /// Files still to fetch.
    Running { left: u64 },
    /// Every file is local and the copy is an ordinary tree.
    Complete,
    /// A file could not be fetched (its error): the copy stays partial; reads of the other
    /// files go on.
    Failed(String),
}

/// Counts a metric can be made of; every one only grows.
#[derive(Default, Debug)]
pub struct Counters {
    /// Verified bytes fetched because a read asked for them.
    pub bytes_on_demand: AtomicU64,
    /// Verified bytes fetched by background hydration.
    pub bytes_prefetched: AtomicU64,
    /// Compressed bytes read from the store, both ways.
    pub bytes_downloaded: AtomicU64,
    /// Reads that found their file not local and waited for a fetch (their own or another's).
    pub reads_waited: AtomicU64,
    /// Files that became local.
    pub files_fetched: AtomicU64,
    /// Fetches that failed (a corrupt chunk, a store that did not answer).
    pub fetch_failures: AtomicU64,
    /// Opens of a local file with passthrough: the kernel reads the local file itself and
    /// no READ of that open comes to this process.
    pub passthrough_opens: AtomicU64,
    /// READ requests that came to this process.
    pub reads: AtomicU64,
}

/// A copy of [`Counters`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub bytes_on_demand: u64,
    pub bytes_prefetched: u64,
    pub bytes_downloaded: u64,
    pub reads_waited: u64,
    pub files_fetched: u64,
    pub fetch_failures: u64,
    pub passthrough_opens: u64,
    pub reads: u64,
    pub files_local: u64,
    pub files: u64,
}

pub(super) struct Local {
    engine: Engine,
    pub root: PathBuf,
    journal: Mutex<File>,
    /// Files written since the last sync, not yet journaled.
    pending: Mutex<Vec<usize>>,
    /// Held by the one flush running: a flush that follows waits, so that when it returns
    /// everything pending before it is journaled.
    flushing: tokio::sync::Mutex<()>,
    /// Per entry: its file is complete in the copy.
    local: Vec<AtomicBool>,
    files: usize,
    local_files: AtomicUsize,
    /// Fetches in progress, by entry: every reader of that file waits for the one fetch.
    inflight: Mutex<HashMap<usize, watch::Receiver<Option<Outcome>>>>,
    /// Demand fetches in progress: hydration starts no new file while there is one.
    demand: watch::Sender<usize>,
    pub hydration: watch::Sender<Hydration>,
    pub counters: Counters,
}

impl Local {
    /// The copy at `root` (created if missing) with its journal at `journal`: files the
    /// journal names and that are on disk at their size count as local. The journal starts
    /// with the tree's fingerprint: one written for another tree (a directory reused for
    /// another generation) names nothing and is started again.
    pub fn open(
        engine: Engine,
        entries: &[Entry],
        root: &Path,
        journal: &Path,
    ) -> std::io::Result<Local> {
        std::fs::create_dir_all(root)?;
        let local: Vec<AtomicBool> = entries.iter().map(|_| AtomicBool::new(false)).collect();
        let text = match std::fs::read_to_string(journal) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let header = format!("tree {}\n", fingerprint(entries));
        let ours = text.starts_with(&header);
        // A torn last line (a crash in the middle of an append) names nothing.
        let body = text.get(header.len()..).filter(|_| ours).unwrap_or("");
        let complete_lines = body.rsplit_once('\n').map_or("", |(done, _)| done);
        for line in complete_lines.lines() {
            let Some(e) = line
                .parse::<usize>()
                .ok()
                .and_then(|i| entries.get(i).map(|e| (i, e)))
            else {
                continue;
            };
            let (i, e) = e;
            let on_disk = std::fs::symlink_metadata(root.join(&e.path))
                .is_ok_and(|m| m.is_file() && m.len() == e.size);
            if e.kind == Kind::File && on_disk {
                local[i].store(true, Ordering::Relaxed);
            }
        }
        let journal = if ours {
            std::fs::OpenOptions::new().append(true).open(journal)?
        } else {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(journal)?;
            f.write_all(header.as_bytes())?;
            f.sync_data()?;
            f
        };
        let files = entries.iter().filter(|e| e.kind == Kind::File).count();
        let local_files = local.iter().filter(|l| l.load(Ordering::Relaxed)).count();
        let left = (files - local_files) as u64;
        Ok(Local {
            engine,
            root: root.to_path_buf(),
            journal: Mutex::new(journal),
            pending: Mutex::new(Vec::new()),
            flushing: tokio::sync::Mutex::new(()),
            local,
            files,
            local_files: AtomicUsize::new(local_files),
            inflight: Mutex::new(HashMap::new()),
            demand: watch::channel(0).0,
            hydration: watch::channel(Hydration::Running { left }).0,
            counters: Counters::default(),
        })
    }

    pub fn is_local(&self, i: usize) -> bool {
        self.local[i].load(Ordering::Acquire)
    }

    pub fn path(&self, e: &Entry) -> PathBuf {
        self.root.join(&e.path)
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            bytes_on_demand: get(&c.bytes_on_demand),
            bytes_prefetched: get(&c.bytes_prefetched),
            bytes_downloaded: get(&c.bytes_downloaded),
            reads_waited: get(&c.reads_waited),
            files_fetched: get(&c.files_fetched),
            fetch_failures: get(&c.fetch_failures),
            passthrough_opens: get(&c.passthrough_opens),
            reads: get(&c.reads),
            files_local: self.local_files.load(Ordering::Relaxed) as u64,
            files: self.files as u64,
        }
    }

    /// Makes file `i` local if it is not: fetches it, or waits for the fetch already running.
    /// `demand`: a read waits for it (it goes before hydration, and counts as on demand).
    pub async fn ensure(
        self: &Arc<Self>,
        entries: &Arc<Vec<Entry>>,
        i: usize,
        demand: bool,
    ) -> Outcome {
        if self.is_local(i) {
            return Ok(());
        }
        let (mut rx, tx) = {
            let mut inflight = self.inflight.lock().expect("not poisoned");
            if self.is_local(i) {
                return Ok(());
            }
            match inflight.get(&i) {
                Some(rx) => (rx.clone(), None),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(i, rx.clone());
                    (rx, Some(tx))
                }
            }
        };
        if demand {
            self.counters.reads_waited.fetch_add(1, Ordering::Relaxed);
        }
        let Some(tx) = tx else {
            // Another read or hydration is fetching it: its outcome is this read's.
            return match rx.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.clone().expect("waited for it"),
                Err(_) => Err("the fetch of this file was abandoned".into()),
            };
        };
        // This task fetches; whatever happens to it, the waiters hear of it and the next read
        // of a failed file tries again.
        struct Done<'a>(&'a Local, usize);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0
                    .inflight
                    .lock()
                    .expect("not poisoned")
                    .remove(&self.1);
            }
        }
        let _done = Done(self, i);
        let this = self.clone();
        let entries = entries.clone();
        if demand {
            self.demand.send_modify(|n| *n += 1);
        }
        // A task of its own: a read whose request is abandoned does not abandon the fetch the
        // other readers wait for.
        let outcome = tokio::spawn(async move { this.fetch(&entries[i], i, demand).await })
            .await
            .unwrap_or_else(|e| Err(format!("the fetch of this file failed: {e}").into()));
        if demand {
            self.demand.send_modify(|n| *n -= 1);
        }
        if outcome.is_err() {
            self.counters.fetch_failures.fetch_add(1, Ordering::Relaxed);
        }
        let _ = tx.send(Some(outcome.clone()));
        outcome
    }

    /// Makes the files written so far durable (one sync of the file system) and journals
    /// them. A failure is only logged: those files are served all the same, and fetched again
    /// after a restart.
    pub async fn flush(self: &Arc<Self>) {
        let _one = self.flushing.lock().await;
        let batch = std::mem::take(&mut *self.pending.lock().expect("not poisoned"));
        if batch.is_empty() {
            return;
        }
        let this = self.clone();
        let done = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            rustix::fs::syncfs(File::open(&this.root)?)?;
            let mut lines = String::with_capacity(batch.len() * 8);
            for i in batch {
                lines.push_str(&format!("{i}\n"));
            }
            let mut j = this.journal.lock().expect("not poisoned");
            j.write_all(lines.as_bytes())
        })
        .await
        .expect("does not panic");
        if let Err(e) = done {
            tracing::warn!(
                local = %self.root.display(),
                error = %e,
                "lazy base: files of the local copy could not be journaled; a restart fetches them again"
            );
        }
    }

    async fn fetch(self: &Arc<Self>, e: &Entry, i: usize, demand: bool) -> Outcome {
        let path = self.path(e);
        let size = e.size;
        let file = tokio::task::spawn_blocking({
            let path = path.clone();
            move || -> std::io::Result<File> {
                std::fs::create_dir_all(path.parent().expect("an entry has a parent"))?;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&path)?;
                f.set_len(size)?;
                Ok(f)
            }
        })
        .await
        .expect("does not panic")
        .map_err(|err| describe(e, "create", &err))?;
        let file = Arc::new(file);
        let got = self
            .engine
            .fetch_file(e, None, file.clone())
            .await
            .map_err(|err| Arc::<str>::from(err.to_string()))?;
        let (mode, mtime) = (e.mode, e.mtime);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            file.set_times(std::fs::FileTimes::new().set_modified(super::tree::time(mtime)))
        })
        .await
        .expect("does not panic")
        .map_err(|err| describe(e, "finish", &err))?;
        self.local[i].store(true, Ordering::Release);
        let batch = {
            let mut pending = self.pending.lock().expect("not poisoned");
            pending.push(i);
            pending.len()
        };
        // Off the read's path: a demand read is answered while its file is made durable.
        if demand || batch >= JOURNAL_BATCH {
            let this = self.clone();
            tokio::spawn(async move { this.flush().await });
        }
        let left = self.files - 1 - self.local_files.fetch_add(1, Ordering::AcqRel);
        let c = &self.counters;
        c.files_fetched.fetch_add(1, Ordering::Relaxed);
        c.bytes_downloaded
            .fetch_add(got.downloaded, Ordering::Relaxed);
        let bytes = if demand {
            &c.bytes_on_demand
        } else {
            &c.bytes_prefetched
        };
        bytes.fetch_add(got.bytes, Ordering::Relaxed);
        self.hydration.send_if_modified(|h| match h {
            Hydration::Running { left: l } => {
                *l = left as u64;
                true
            }
            _ => false,
        });
        Ok(())
    }

    /// Fetches every file not yet local, in manifest order, a few at once and none while a
    /// demand fetch runs; then completes the copy (directories, links, modes and times) and
    /// reports [`Hydration::Complete`]. A file that fails ends hydration with
    /// [`Hydration::Failed`]; demand reads go on.
    pub async fn hydrate(self: Arc<Self>, entries: Arc<Vec<Entry>>) {
        let files: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].kind == Kind::File && !self.is_local(i))
            .collect();
        let failed: Mutex<Option<String>> = Mutex::new(None);
        futures::stream::iter(files)
            .for_each_concurrent(crate::engine::io_concurrency(), |i| {
                let (this, entries, failed) = (self.clone(), entries.clone(), &failed);
                async move {
                    if failed.lock().expect("not poisoned").is_some() {
                        return;
                    }
                    let mut demand = this.demand.subscribe();
                    let _ = demand.wait_for(|n| *n == 0).await;
                    if let Err(e) = this.ensure(&entries, i, false).await {
                        failed
                            .lock()
                            .expect("not poisoned")
                            .get_or_insert(e.to_string());
                    }
                }
            })
            .await;
        self.flush().await;
        if let Some(e) = failed.into_inner().expect("not poisoned") {
            tracing::warn!(error = %e, "lazy base: hydration stopped");
            self.hydration.send_replace(Hydration::Failed(e));
            return;
        }
        let root = self.root.clone();
        let done = tokio::task::spawn_blocking(move || complete(&root, &entries))
            .await
            .expect("does not panic");
        match done {
            Ok(()) => {
                self.hydration.send_replace(Hydration::Complete);
            }
            Err(e) => {
                let e = format!("completing the local copy at {}: {e}", self.root.display());
                tracing::warn!(error = %e, "lazy base: hydration stopped");
                self.hydration.send_replace(Hydration::Failed(e));
            }
        }
    }

    /// Reads up to `size` bytes at `offset` of local file `e`.
    pub fn read(&self, e: &Entry, offset: u64, size: u32) -> std::io::Result<Vec<u8>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.path(e))?;
        let want = (size as u64).min(e.size.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match f.read_at(&mut buf[got..], offset + got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(got);
        Ok(buf)
    }
}

/// What identifies a tree for its journal: a hash of every entry's path, kind, size and
/// chunks, in order (the journal names entries by position).
pub(super) fn fingerprint(entries: &[Entry]) -> String {
    let mut h = blake3::Hasher::new();
    for e in entries {
        h.update(e.path.as_bytes());
        h.update(&[0, e.kind as u8]);
        h.update(&e.size.to_le_bytes());
        for c in &e.chunks {
            h.update(c.h.to_hex().as_bytes());
        }
    }
    h.finalize().to_hex().to_string()
}

fn describe(e: &Entry, what: &str, err: &std::io::Error) -> Arc<str> {
    format!("{what} the local copy of {:?}: {err}", e.path).into()
}

/// Makes the copy at `root`, whose files are all there, the tree `entries` describe: every
/// directory (empty ones too) and symbolic link, directory modes and every mtime, then one
/// sync of the file system. Runs again harmlessly after a restart.
fn complete(root: &Path, entries: &[Entry]) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};
    use std::os::unix::fs::PermissionsExt;
    for e in entries {
        let p = root.join(&e.path);
        match e.kind {
            Kind::Dir => std::fs::create_dir_all(&p)?,
            Kind::Symlink => {
                let target = e.target.as_deref().unwrap_or_default();
                match std::fs::read_link(&p) {
                    Ok(t) if t.as_os_str() == target => {}
                    Ok(_) => {
                        std::fs::remove_file(&p)?;
                        std::os::unix::fs::symlink(target, &p)?;
                    }
                    Err(_) => std::os::unix::fs::symlink(target, &p)?,
                }
            }
            Kind::File => {}
        }
    }
    // Children before parents (the reverse of path order), so that setting a directory's
    // mtime comes after every change inside it.
    for e in entries.iter().rev() {
        let p = root.join(&e.path);
        if e.kind == Kind::Dir {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(e.mode))?;
        }
        let t = Timespec {
            tv_sec: e.mtime.div_euclid(1_000_000_000),
            tv_nsec: e.mtime.rem_euclid(1_000_000_000) as _,
        };
        let times = Timestamps {
            last_access: t,
            last_modification: t,
        };
        rustix::fs::utimensat(CWD, &p, &times, AtFlags::SYMLINK_NOFOLLOW)?;
    }
    let dir = File::open(root)?;
    rustix::fs::syncfs(&dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> Entry {
        Entry {
            path: path.into(),
            kind: Kind::File,
            mode: 0o644,
            size,
            mtime: 0,
            target: None,
            chunks: Vec::new(),
        }
    }

    #[test]
    fn only_journaled_files_of_the_right_size_are_local_after_a_restart() {
        let t = tempfile::tempdir().unwrap();
        let store = crate::engine::Store::open(&format!("file://{}", t.path().join("s").display()))
            .unwrap();
        let engine = Engine::new(store, "default", t.path().join("state")).unwrap();
        let entries = vec![
            file("a", 3),
            file("b", 3),
            file("c", 3),
            file("d", 3),
            file("e", 3),
        ];
        let root = t.path().join("copy");
        std::fs::create_dir_all(&root).unwrap();
        for (name, data) in [("a", "aaa"), ("b", "bb"), ("d", "ddd"), ("e", "eee")] {
            std::fs::write(root.join(name), data).unwrap();
        }
        // b was cut short, c is gone, d was never journaled, e's line was torn by a crash;
        // a line of garbage and a number past the end name nothing.
        let journal = t.path().join("journal");
        let header = format!("tree {}\n", fingerprint(&entries));
        std::fs::write(&journal, format!("{header}0\n1\n2\nnot a number\n99\n4")).unwrap();
        let local = Local::open(engine.clone(), &entries, &root, &journal).unwrap();
        let is: Vec<bool> = (0..entries.len()).map(|i| local.is_local(i)).collect();
        assert_eq!(is, [true, false, false, false, false]);
        let st = local.stats();
        assert_eq!((st.files_local, st.files), (1, 5));
        assert_eq!(*local.hydration.borrow(), Hydration::Running { left: 4 });
        drop(local);

        // The journal of another tree (here: one more file) names nothing, and is replaced.
        let mut other = entries.clone();
        other.push(file("f", 3));
        let local = Local::open(engine, &other, &root, &journal).unwrap();
        assert_eq!(local.stats().files_local, 0);
        let text = std::fs::read_to_string(&journal).unwrap();
        assert_eq!(text, format!("tree {}\n", fingerprint(&other)));
    }
}

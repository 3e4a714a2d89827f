//! Restore: the newest generation of a key (else of the first restore key that has one, else
//! nothing) materialized into a directory. Packs are fetched in parallel with ranged reads, every
//! chunk is verified before a byte of it is written, and nothing is ever written through a
//! symlink or outside the directory. The record of what was restored goes to the state dir.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::error::{io, Error, IoError, Result};
use super::format::{BaseRef, ChunkRef, Digest, Entry, Generation, Kind};
use super::localstate::{self, DirState, Header, Stat};
use super::{io_concurrency, names, par, Each, Engine, ReadCtl, Sink};

/// Where a restore's content came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "level", rename_all = "kebab-case")]
pub enum RestoreSource {
    /// The key itself had a snapshot.
    Key { key: String, generation: u64 },
    /// The key had none; a restore key had.
    RestoreKey { key: String, generation: u64 },
    /// Nothing to restore: the directory starts empty.
    Miss,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    pub source: RestoreSource,
    pub files: u64,
    pub bytes: u64,
    /// Compressed bytes fetched from the store.
    pub downloaded: u64,
    pub seconds: f64,
}

impl Engine {
    /// Restores into `dir` (created if missing; existing entries that the snapshot also has are
    /// replaced, others are left as they are, as `tar -x` would).
    pub async fn restore(
        &self,
        key: &str,
        restore_keys: &[String],
        dir: &Path,
    ) -> Result<RestoreReport> {
        names::key(key)?;
        for k in restore_keys {
            names::key(k)?;
        }
        let source = self.resolve(key, restore_keys).await?;
        self.restore_source(source, dir).await
    }

    /// What a restore of `key` would bring now: its newest generation; else, for each restore
    /// key in order, the newest generation of the key of that exact name, else of the most
    /// recently committed key that starts with it (as actions/cache matches `restore-keys`);
    /// else nothing.
    pub async fn resolve(&self, key: &str, restore_keys: &[String]) -> Result<RestoreSource> {
        if let Some(generation) = self.newest(key).await? {
            return Ok(RestoreSource::Key {
                key: key.to_string(),
                generation,
            });
        }
        let mut keys: Option<Vec<String>> = None;
        for k in restore_keys {
            if let Some(generation) = self.newest(k).await? {
                return Ok(RestoreSource::RestoreKey {
                    key: k.clone(),
                    generation,
                });
            }
            if keys.is_none() {
                keys = Some(self.store.list_dirs(&self.layout.manifests()).await?);
            }
            let candidates: Vec<String> = keys
                .iter()
                .flatten()
                .filter(|c| c.starts_with(k.as_str()) && *c != k && names::key(c).is_ok())
                .cloned()
                .collect();
            if let Some((key, generation)) = self.most_recent(candidates).await? {
                return Ok(RestoreSource::RestoreKey { key, generation });
            }
        }
        Ok(RestoreSource::Miss)
    }

    /// Of `keys`, the one whose newest generation was written last (by the store's clock; on a
    /// tie the greater name), with that generation.
    async fn most_recent(&self, keys: Vec<String>) -> Result<Option<(String, u64)>> {
        let newest: Vec<Option<(_, String, u64)>> = futures::stream::iter(keys)
            .map(|k: String| async move {
                let metas = self.store.list(&self.layout.generations(&k)).await?;
                let newest = metas
                    .iter()
                    .filter_map(|m| super::store::parse_generation(&m.location).map(|g| (g, m)))
                    .max_by_key(|(g, _)| *g);
                Ok::<_, Error>(match newest {
                    // A key no generation could follow is no candidate (its own restores
                    // say why); neither is an empty one.
                    Some((g, m)) if g <= super::format::MAX_GENERATION => {
                        Some((m.last_modified, k, g))
                    }
                    _ => None,
                })
            })
            .buffered(8)
            .try_collect()
            .await?;
        Ok(newest
            .into_iter()
            .flatten()
            .max()
            .map(|(_, key, generation)| (key, generation)))
    }

    /// Restores exactly `source` (a generation, or nothing) into `dir`.
    pub async fn restore_source(&self, source: RestoreSource, dir: &Path) -> Result<RestoreReport> {
        let started = Instant::now();
        let found = match &source {
            RestoreSource::Key { key, generation } => Some((0, key.clone(), *generation)),
            RestoreSource::RestoreKey { key, generation } => Some((1, key.clone(), *generation)),
            RestoreSource::Miss => None,
        };
        if let Some((_, k, _)) = &found {
            names::key(k)?;
        }
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let dir = localstate::canonical(dir)?;
        let mut previous =
            DirState::load(&self.state_dir, &dir, self.store.display_url(), &self.scope);
        if DirState::restore_interrupted(&self.state_dir, &dir) {
            // A restore was killed half way: what the directory holds is no snapshot.
            tracing::warn!(dir = %dir.display(), "the last restore into this directory did not finish; restoring it whole");
            previous = None;
            DirState::remove(&self.state_dir, &dir);
            let d = dir.clone();
            tokio::task::spawn_blocking(move || empty_dir(&d))
                .await
                .expect("empty_dir does not panic")?;
        }
        DirState::begin_restore(&self.state_dir, &dir)?;
        let Some((level, from_key, generation)) = found else {
            if let Some(prev) = previous {
                let d = dir.clone();
                tokio::task::spawn_blocking(move || remove_recorded(&d, &prev))
                    .await
                    .expect("remove_recorded does not panic")?;
            }
            DirState {
                header: self.header(&dir, None, vec![]),
                entries: vec![],
                stats: vec![],
            }
            .save(&self.state_dir)?;
            return Ok(RestoreReport {
                source: RestoreSource::Miss,
                files: 0,
                bytes: 0,
                downloaded: 0,
                seconds: started.elapsed().as_secs_f64(),
            });
        };

        let (g, entries) = match self.load_tree(&from_key, generation).await {
            Ok(v) => v,
            Err(e) => {
                // Nothing was touched: the directory still holds what it held.
                DirState::end_restore(&self.state_dir, &dir);
                return Err(e);
            }
        };
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "restore: manifest loaded"
        );
        let entries = Arc::new(entries);
        let touch = self.touch_used(&from_key);
        let (written, _) = futures::join!(self.write_tree(&dir, previous, entries.clone()), touch);
        let (stats, downloaded) = match written {
            Ok(w) => w,
            Err(e) => {
                // Part of the new tree and part of the old one is no snapshot at all: a pod must
                // never see it, and a later commit must never publish it. Start empty instead.
                let d = dir.clone();
                let _ = tokio::task::spawn_blocking(move || empty_dir(&d)).await;
                DirState::remove(&self.state_dir, &dir);
                self.quarantine_from(&e).await;
                return Err(e);
            }
        };
        DirState {
            header: self.header(
                &dir,
                Some(BaseRef {
                    key: from_key.clone(),
                    generation,
                }),
                g.manifest.clone(),
            ),
            entries: Arc::try_unwrap(entries).unwrap_or_else(|shared| (*shared).clone()),
            stats,
        }
        .save(&self.state_dir)?;
        let source = if level == 0 {
            RestoreSource::Key {
                key: from_key,
                generation,
            }
        } else {
            RestoreSource::RestoreKey {
                key: from_key,
                generation,
            }
        };
        Ok(RestoreReport {
            source,
            files: g.totals.files,
            bytes: g.totals.bytes,
            downloaded,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The generation object and the validated tree of `key`'s generation `generation`,
    /// markers left out; a corrupt pack found on the way is quarantined.
    pub(super) async fn load_tree(
        &self,
        key: &str,
        generation: u64,
    ) -> Result<(Generation, Vec<Entry>)> {
        let loaded = match self.load_generation(key, generation).await {
            Ok(g) => self.load_entries(&g).await.map(|mut e| {
                // A marker in a snapshot (written by hand or by an older version) is never
                // restored: a marker must come from the run that commits.
                e.retain(|x| !super::is_marker(&x.path));
                (g, e)
            }),
            Err(e) => Err(e),
        };
        if let Err(e) = &loaded {
            self.quarantine_from(e).await;
        }
        loaded
    }

    pub(crate) fn header(
        &self,
        dir: &Path,
        base: Option<BaseRef>,
        manifest: Vec<ChunkRef>,
    ) -> Header {
        Header {
            store: self.store.display_url().to_string(),
            scope: self.scope.clone(),
            dir: dir.to_path_buf(),
            base,
            manifest,
        }
    }

    /// Records that `key` was used now, for TTL and LRU retention. Best effort: a read-only
    /// credential or a flaky store must not fail a restore.
    pub(super) async fn touch_used(&self, key: &str) {
        let body = Bytes::from(super::now_unix().to_string());
        if let Err(e) = self.store.put(&self.layout.used(key), body).await {
            tracing::debug!(cache.key = key, error = %e, "could not record last use");
        }
    }

    /// Brings `dir` to `entries`: a directory that still holds what cachevol last put there
    /// (`previous`) is only brought up to date, anything else is written whole.
    async fn write_tree(
        &self,
        dir: &Path,
        previous: Option<DirState>,
        entries: Arc<Vec<Entry>>,
    ) -> Result<(Vec<Option<Stat>>, u64)> {
        let present = match previous {
            Some(prev) => {
                let (d, e) = (dir.to_path_buf(), entries.clone());
                tokio::task::spawn_blocking(move || reconcile(&d, &prev, &e))
                    .await
                    .expect("reconcile does not panic")?
            }
            None => vec![None; entries.len()],
        };
        self.materialize(dir, entries, present).await
    }

    /// Writes `entries` under `dir` except those `present`; returns each entry's stat after
    /// writing and the number of compressed bytes fetched.
    async fn materialize(
        &self,
        dir: &Path,
        entries: Arc<Vec<Entry>>,
        present: Vec<Option<Present>>,
    ) -> Result<(Vec<Option<Stat>>, u64)> {
        let total: u64 = entries
            .iter()
            .zip(&present)
            .filter(|(_, p)| p.is_none())
            .map(|(e, _)| e.size)
            .sum();
        self.progress.start("restore", total);
        self.progress.files(
            entries
                .iter()
                .zip(&present)
                .filter(|(e, p)| p.is_none() && e.kind == Kind::File && !e.chunks.is_empty())
                .count() as u64,
        );

        let plan = plan_chunks(&self.layout, &entries, |i| present[i].is_some())?;
        let remaining = entries
            .iter()
            .map(|e| AtomicU32::new(e.chunks.len() as u32))
            .collect();

        let shared = Arc::new(Writer {
            root: dir.to_path_buf(),
            entries: entries.clone(),
            remaining,
            stats: Mutex::new(present.iter().map(|p| p.and_then(|p| p.0)).collect()),
            present: present.iter().map(Option::is_some).collect(),
            umask: current_umask(),
            failed: Arc::new(AtomicBool::new(false)),
        });
        // The tree's directories are made while the first packs are read: a pack's chunks are
        // written once the directories are there. Every task is awaited, even after a failure,
        // so nothing writes into the directory once the restore has returned (the failure path
        // empties it); after a failure the rest stop early.
        let t0 = Instant::now();
        let (prepared, ready) = tokio::sync::watch::channel(false);
        let w = shared.clone();
        let prepare = async move {
            let res = tokio::task::spawn_blocking(move || w.noting_failure(w.prepare()))
                .await
                .expect("prepare does not panic");
            tracing::debug!(ms = t0.elapsed().as_millis() as u64, "restore: prepared");
            let _ = prepared.send(true);
            res
        };
        let (writer, progress) = (shared.clone(), self.progress.clone());
        let deliver = Arc::new(Each(move |need: &Need, at, data: &[u8]| {
            writer.write_chunk(need, at, data, progress.as_ref())
        }));
        let write = self.fetch_chunks(plan, ready, shared.failed.clone(), deliver);
        let (prepared, written) = futures::join!(prepare, write);
        prepared?;
        let downloaded = written?;

        tracing::debug!(
            ms = t0.elapsed().as_millis() as u64,
            "restore: files written"
        );
        let w = shared.clone();
        tokio::task::spawn_blocking(move || w.finish_dirs())
            .await
            .expect("finish does not panic")?;
        tracing::debug!(
            ms = t0.elapsed().as_millis() as u64,
            "restore: directories finished"
        );
        self.progress.finish();
        let stats = std::mem::take(&mut *shared.stats.lock().expect("not poisoned"));
        Ok((stats, downloaded))
    }

    /// Fetches every chunk of `plan`, packs in parallel, and hands each verified chunk's data
    /// to `deliver` (on blocking threads, once `ready` is true): the one stream of verified chunk
    /// bytes that a tree restore writes into files and an image restore into an image. Every
    /// pack's task is awaited, even after a failure (noted in `failed`, which stops the rest
    /// early), so nothing is delivered once this returns. Returns the compressed bytes fetched.
    pub(super) async fn fetch_chunks<S: Sink<Need>>(
        &self,
        plan: Plan,
        ready: tokio::sync::watch::Receiver<bool>,
        failed: Arc<AtomicBool>,
        deliver: Arc<S>,
    ) -> Result<u64> {
        let fetched = futures::stream::iter(plan)
            .map(|(pack, needs)| {
                self.fetch_pack(pack, needs, ready.clone(), failed.clone(), deliver.clone())
            })
            .buffer_unordered(io_concurrency())
            .collect::<Vec<Result<u64>>>()
            .await;
        let mut downloaded = 0;
        for f in fetched {
            downloaded += f?;
        }
        Ok(downloaded)
    }

    /// [`Engine::fetch_chunks`] of one pack. Does nothing once another task has failed.
    async fn fetch_pack<S: Sink<Need>>(
        &self,
        pack: Digest,
        needs: HashMap<u64, Need>,
        prepared: tokio::sync::watch::Receiver<bool>,
        failed: Arc<AtomicBool>,
        deliver: Arc<S>,
    ) -> Result<u64> {
        if failed.load(Ordering::Relaxed) {
            return Ok(0);
        }
        let mut needs: Vec<Need> = needs.into_values().collect();
        needs.sort_unstable_by_key(|n| n.r.o);
        // A failed preparation is noted in `failed`: the reader then stops at once.
        let ctl = ReadCtl {
            ready: Some(prepared),
            stop: Some(failed.clone()),
        };
        let res = self.read_chunks(pack, needs, |n| &n.r, ctl, deliver).await;
        if res.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        res
    }
}

/// Which chunk goes where, by pack and offset in the pack.
pub(super) type Plan = HashMap<Digest, HashMap<u64, Need>>;

/// Plans the chunks of the files of `entries` that `skip` does not leave out: each distinct
/// chunk (a pack and an offset) once, with every place it is used. Two refs of one frame that
/// differ are refused.
pub(super) fn plan_chunks(
    layout: &super::store::Layout,
    entries: &[Entry],
    skip: impl Fn(usize) -> bool,
) -> Result<Plan> {
    let mut by_pack: Plan = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        if skip(i) {
            continue;
        }
        let mut offset = 0u64;
        for c in &e.chunks {
            let need = by_pack
                .entry(c.p)
                .or_default()
                .entry(c.o)
                .or_insert_with(|| Need {
                    r: c.clone(),
                    targets: Vec::new(),
                });
            if need.r != *c {
                return Err(super::one_chunk_per_offset(layout, c));
            }
            need.targets.push((i, offset));
            offset += c.n as u64;
        }
    }
    Ok(by_pack)
}

pub(super) struct Need {
    pub r: ChunkRef,
    /// (entry index, offset in the file)
    pub targets: Vec<(usize, u64)>,
}

/// The blocking side of a restore: creates the tree and writes chunks into files.
struct Writer {
    root: PathBuf,
    entries: Arc<Vec<Entry>>,
    remaining: Vec<AtomicU32>,
    stats: Mutex<Vec<Option<Stat>>>,
    /// Entries already in place (warm restore): not written again.
    present: Vec<bool>,
    /// The process umask, which applies to every file we create.
    umask: u32,
    /// Set at the first failure: the other tasks stop early.
    failed: Arc<AtomicBool>,
}

/// Removes everything inside `dir`, keeping `dir` itself (it may be a mount point).
fn empty_dir(dir: &Path) -> Result<()> {
    for item in std::fs::read_dir(dir).map_err(io("read directory", dir))? {
        let item = item.map_err(io("read directory", dir))?;
        clear(&item.path())?;
    }
    Ok(())
}

/// An entry already in place, with its file stat (None for directories and symlinks).
#[derive(Clone, Copy)]
struct Present(Option<Stat>);

/// Brings a directory that cachevol restored or committed before (`prev`) toward `entries`:
/// removes what the new tree does not have, and tells which entries are already in place —
/// files whose content and `stat` are unchanged since the record, symlinks with the same target,
/// directories. Everything else is (re)written by the restore.
fn reconcile(dir: &Path, prev: &DirState, entries: &[Entry]) -> Result<Vec<Option<Present>>> {
    let scanned = super::scan::scan(dir)?;
    let wanted: HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.as_str(), i))
        .collect();
    let recorded: HashMap<&str, usize> = prev
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.as_str(), i))
        .collect();
    let mut present = vec![None; entries.len()];
    let mut removed_dirs: Vec<String> = Vec::new();
    for s in &scanned {
        // Inside a directory already removed whole.
        if removed_dirs.last().is_some_and(|d| {
            s.path.starts_with(d.as_str()) && s.path.as_bytes().get(d.len()) == Some(&b'/')
        }) {
            continue;
        }
        let Some(&i) = wanted.get(s.path.as_str()) else {
            clear(&dir.join(&s.path))?;
            if s.kind == Kind::Dir {
                removed_dirs.push(s.path.clone());
            }
            continue;
        };
        let e = &entries[i];
        present[i] = match (s.kind, e.kind) {
            (Kind::Dir, Kind::Dir) => Some(Present(None)),
            (Kind::Symlink, Kind::Symlink) if s.target == e.target => Some(Present(None)),
            (Kind::File, Kind::File) => recorded.get(s.path.as_str()).and_then(|&r| {
                (prev.stats[r] == Some(s.stat)
                    && prev.entries[r].same_content(e)
                    && s.mode == e.mode)
                    .then_some(Present(Some(s.stat)))
            }),
            _ => None,
        };
    }
    Ok(present)
}

/// A miss into a directory cachevol restored or committed before: what that record says
/// cachevol put there is removed (files and links, then directories once empty), and nothing
/// else. A miss never deletes what cachevol did not write: after a first miss that kept a
/// directory's files as they were, a second one must not delete them.
fn remove_recorded(dir: &Path, prev: &DirState) -> Result<()> {
    let recorded: HashMap<&str, Kind> = prev
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e.kind))
        .collect();
    if recorded.is_empty() {
        return Ok(());
    }
    let mut scanned = super::scan::scan(dir)?;
    // Children before their parents: a path sorts after each of its prefixes.
    scanned.sort_unstable_by(|a, b| b.path.cmp(&a.path));
    for s in &scanned {
        if recorded.get(s.path.as_str()) != Some(&s.kind) {
            continue;
        }
        let path = dir.join(&s.path);
        let res = match s.kind {
            // Kept when it holds what cachevol did not put there.
            Kind::Dir => match std::fs::remove_dir(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => Ok(()),
                r => r,
            },
            // The scan never follows a link: this removes the link, never its target.
            Kind::File | Kind::Symlink => std::fs::remove_file(&path),
        };
        match res {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove", &path)(e).into());
            }
            _ => {}
        }
    }
    Ok(())
}

/// The process umask, read without changing it (`umask(2)` can only set it); all bits set
/// when unknown, so every file gets an explicit `fchmod`.
pub(super) fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Umask:"))?;
            u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
        })
        .unwrap_or(0o7777)
}

/// Removes whatever is at `path` (file, symlink or tree) so the snapshot's entry can take its
/// place. Never follows a symlink.
pub(crate) fn clear(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(IoError::new("stat", path, e).into()),
        Ok(md) if md.is_dir() => Ok(std::fs::remove_dir_all(path).map_err(io("remove", path))?),
        Ok(_) => Ok(std::fs::remove_file(path).map_err(io("remove", path))?),
    }
}

/// Access and modification time both `ns` (Unix nanoseconds), for `utimensat`/`futimens`.
pub(crate) fn timestamps(ns: i64) -> rustix::fs::Timestamps {
    let t = rustix::fs::Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    };
    rustix::fs::Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn stat_of(md: &std::fs::Metadata) -> Stat {
    use std::os::unix::fs::MetadataExt;
    Stat {
        ino: md.ino(),
        size: md.size(),
        mtime: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        ctime: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
    }
}

impl Writer {
    fn path(&self, i: usize) -> PathBuf {
        self.root.join(&self.entries[i].path)
    }

    /// Creates a file of the snapshot, replacing whatever was at its path. `O_EXCL` and
    /// `O_NOFOLLOW`: an existing file, symlink or hard link planted at the path is removed, never
    /// written through. Created with its final mode, so most files need no `fchmod`.
    fn create(&self, path: &Path, mode: u32) -> Result<std::fs::File> {
        let open = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
        };
        match open() {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                clear(path)?;
                Ok(open().map_err(io("create", path))?)
            }
            Err(e) => Err(IoError::new("create", path, e).into()),
        }
    }

    /// The mode a file is created with: its final mode when the umask leaves that intact;
    /// owner read-write otherwise, and `seal` sets the final mode.
    fn create_mode(&self, i: usize) -> u32 {
        let mode = self.entries[i].mode;
        if self.entries[i].chunks.len() <= 1 && mode & !self.umask == mode {
            mode
        } else {
            0o600
        }
    }

    /// Sets mode and mtime of a completely written file and records its stat.
    fn seal(&self, i: usize, f: &std::fs::File, path: &Path) -> Result<()> {
        let e = &self.entries[i];
        let chmod = self.create_mode(i) != e.mode;
        let set = || {
            if chmod {
                rustix::fs::fchmod(f, rustix::fs::Mode::from_raw_mode(e.mode))?;
            }
            rustix::fs::futimens(f, &timestamps(e.mtime))
        };
        set().map_err(|errno| IoError::new("set times of", path, errno.into()))?;
        let md = f.metadata().map_err(io("stat", path))?;
        self.stats.lock().expect("not poisoned")[i] = Some(stat_of(&md));
        Ok(())
    }

    /// Passes a step's result on, first telling the other tasks to stop if it failed.
    fn noting_failure(&self, res: Result<()>) -> Result<()> {
        if res.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        res
    }

    /// Creates directories and symlinks, empty files, and the files that span several chunks
    /// (at their full size, so chunks can land in any order). Directories are made a level at a
    /// time, each level on every core (a level needs only the one above); then the rest.
    fn prepare(&self) -> Result<()> {
        let todo = |i: usize| !self.present[i];
        let others: Vec<usize> = (0..self.entries.len())
            .filter(|&i| todo(i))
            .filter(|&i| match self.entries[i].kind {
                Kind::Dir => false,
                Kind::File => self.entries[i].chunks.len() != 1,
                Kind::Symlink => true,
            })
            .collect();
        for level in &self.levels(|i, e| e.kind == Kind::Dir && todo(i)) {
            par::each(level, |&i| self.make_dir(i))?;
        }
        par::each(&others, |&i| self.prepare_entry(i))
    }

    /// The entries that `pick` takes, by depth: those at the top first.
    fn levels(&self, pick: impl Fn(usize, &Entry) -> bool) -> Vec<Vec<usize>> {
        let mut levels: Vec<Vec<usize>> = Vec::new();
        for (i, e) in self.entries.iter().enumerate().filter(|(i, e)| pick(*i, e)) {
            let depth = e.path.bytes().filter(|&b| b == b'/').count();
            if levels.len() <= depth {
                levels.resize_with(depth + 1, Vec::new);
            }
            levels[depth].push(i);
        }
        levels
    }

    fn make_dir(&self, i: usize) -> Result<()> {
        let path = self.path(i);
        match std::fs::create_dir(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                let md = std::fs::symlink_metadata(&path).map_err(io("stat", &path))?;
                if !md.is_dir() {
                    clear(&path)?;
                    std::fs::create_dir(&path).map_err(io("create", &path))?;
                }
                Ok(())
            }
            Err(err) => Err(IoError::new("create", &path, err).into()),
        }
    }

    /// A symlink, an empty file, or a file of several chunks at its full size.
    fn prepare_entry(&self, i: usize) -> Result<()> {
        let e = &self.entries[i];
        let path = self.path(i);
        match e.kind {
            Kind::Symlink => {
                let target = e.target.as_deref().expect("validated");
                clear(&path)?;
                Ok(std::os::unix::fs::symlink(target, &path).map_err(io("symlink", &path))?)
            }
            Kind::File if e.chunks.is_empty() => {
                let f = self.create(&path, self.create_mode(i))?;
                self.seal(i, &f, &path)
            }
            Kind::File => {
                let f = self.create(&path, self.create_mode(i))?;
                Ok(f.set_len(e.size).map_err(io("allocate", &path))?)
            }
            Kind::Dir => unreachable!("directories are made level by level"),
        }
    }

    /// Writes `data`, verified bytes of one chunk starting `at` bytes into it (the whole chunk,
    /// or a block of a streamed one), to every place the chunk is used.
    fn write_chunk(
        &self,
        need: &Need,
        at: u64,
        data: &[u8],
        progress: &dyn super::Progress,
    ) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let last = at + data.len() as u64 == need.r.n as u64;
        let reopen = |path: &Path| {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
                .map_err(io("open", path))
        };
        for &(i, offset) in &need.targets {
            let path = self.path(i);
            if self.entries[i].chunks.len() == 1 {
                // The file is this chunk: created by its first block, sealed after its last.
                let mut f = if at == 0 {
                    self.create(&path, self.create_mode(i))?
                } else {
                    reopen(&path)?
                };
                if at == 0 {
                    std::io::Write::write_all(&mut f, data).map_err(io("write", &path))?;
                } else {
                    f.write_all_at(data, at).map_err(io("write", &path))?;
                }
                if last {
                    self.seal(i, &f, &path)?;
                    progress.file_done();
                }
            } else {
                let f = reopen(&path)?;
                f.write_all_at(data, offset + at)
                    .map_err(io("write", &path))?;
                if last && self.remaining[i].fetch_sub(1, Ordering::AcqRel) == 1 {
                    self.seal(i, &f, &path)?;
                    progress.file_done();
                }
            }
            progress.advance(data.len() as u64);
        }
        Ok(())
    }

    /// Directory modes and mtimes last, deepest level first (each level on every core): writing
    /// into a directory changes its mtime, and a read-only directory could not be filled.
    /// Symlink mtimes too.
    fn finish_dirs(&self) -> Result<()> {
        for level in self.levels(|_, e| e.kind != Kind::File).iter().rev() {
            par::each(level, |&i| self.finish_entry(i))?;
        }
        Ok(())
    }

    fn finish_entry(&self, i: usize) -> Result<()> {
        let e = &self.entries[i];
        let path = self.path(i);
        if e.kind == Kind::Dir {
            // A failure shows in the check after restore; the times are what must be set.
            let _ = rustix::fs::chmod(&path, rustix::fs::Mode::from_raw_mode(e.mode));
        }
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &path,
            &timestamps(e.mtime),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|errno| IoError::new("set times of", &path, errno.into()).into())
    }
}

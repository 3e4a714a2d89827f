//! Commit: a directory's content becomes the next generation of a key. Changes are found against
//! the restored base by `stat` alone (size, mtime, ctime, inode); only files that may have
//! changed are read and hashed; only chunks the scope does not already have are compressed and
//! uploaded. Order: packs, then the generation object (create-only), then the head hint. A crash
//! anywhere leaves the previous generation readable; what it uploaded is garbage for GC.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio::task::JoinSet;

use super::cancel::NoReturn;
use super::error::{Error, IoError, Result};
use super::format::{
    self, BaseRef, ChunkRef, Digest, Entry, Generation, Kind, PackBuilder, Provenance, Totals,
};
use super::localstate::{self, DirState, Stat};
use super::overlay::{self, remove_under};
use super::pages::{self, PageInfo};
use super::protect::InFlight;
use super::scan::{self, Scanned};
use super::{io_concurrency, names, Engine, PACK_TARGET};

/// Content-defined chunking of file data: files below the minimum are one chunk.
const CDC_MIN: u32 = 128 << 10;
const CDC_AVG: u32 = 512 << 10;
const CDC_MAX: u32 = 2 << 20;
/// Files up to this size are read whole; larger ones are streamed through the chunker.
const READ_WHOLE: u64 = 8 << 20;
const MAX_ATTEMPTS: u32 = 64;

/// What happens when another writer created the generation this commit wanted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Merge {
    /// Last writer wins whole: this commit takes the next free generation.
    #[default]
    Replace,
    /// This commit's changes are merged file by file into the newer head, then retried.
    Union,
}

#[derive(Clone, Debug)]
pub struct CommitOptions {
    pub merge: Merge,
    /// Only the generation right after the restored one may be created (a lock holder's
    /// commit): if it is taken, the commit is refused with `Error::Fenced`.
    pub fence: bool,
    /// Refuse the commit when the tree is larger than this many bytes.
    pub budget: Option<u64>,
    pub writer: String,
    pub note: Option<String>,
    /// The tree's modes were widened for a group (see [`format::widen_for_group`]; the node
    /// does it for a pod's fsGroup): an entry whose mode is exactly its base entry's mode
    /// widened is committed with the base's mode, so the widening never reaches a snapshot.
    /// A mode the pod set itself to anything else is committed as it is.
    pub group_widened: bool,
}

impl Default for CommitOptions {
    fn default() -> Self {
        CommitOptions {
            merge: Merge::Replace,
            fence: false,
            budget: None,
            writer: super::default_writer(),
            note: None,
            group_widened: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "outcome")]
pub enum CommitOutcome {
    /// A new generation was written.
    Committed { generation: u64 },
    /// The directory equals its base: nothing was uploaded.
    Unchanged { generation: Option<u64> },
}

#[derive(Clone, Debug, Serialize)]
pub struct CommitReport {
    #[serde(flatten)]
    pub outcome: CommitOutcome,
    pub key: String,
    pub files: u64,
    pub bytes: u64,
    /// Files read and hashed because they may have changed.
    pub files_read: u64,
    /// Bytes written to the store: packs, generation object, head.
    pub uploaded: u64,
    pub new_chunks: u64,
    /// How many times another writer's generation was merged in (union).
    pub merged: u32,
    pub seconds: f64,
    /// The restore key the tree was restored from, when this commit made a generation of
    /// `key` from it (the first generation of `key`, even when nothing changed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_key: Option<String>,
}

impl CommitReport {
    /// An unchanged commit of `key`: nothing read, nothing uploaded.
    pub fn unchanged(
        key: &str,
        generation: Option<u64>,
        files: u64,
        bytes: u64,
        started: Instant,
    ) -> CommitReport {
        CommitReport {
            outcome: CommitOutcome::Unchanged { generation },
            key: key.to_string(),
            files,
            bytes,
            files_read: 0,
            uploaded: 0,
            new_chunks: 0,
            merged: 0,
            seconds: started.elapsed().as_secs_f64(),
            restore_key: None,
        }
    }
}

/// What a commit is made of, however the changes were found.
struct Plan {
    /// Where the files to read are (the cache dir, or an overlay upper dir).
    read_root: PathBuf,
    /// Where a file to read that `read_root` lacks is (an overlay's base).
    fallback_root: Option<PathBuf>,
    /// The generation the tree started from, if known.
    base: Option<BaseRef>,
    base_manifest: Vec<ChunkRef>,
    base_entries: Option<Vec<Entry>>,
    /// The new tree; files in `to_read` have no chunks yet.
    entries: Vec<Entry>,
    to_read: Vec<usize>,
    /// Per entry, the stat to record for the directory (None where not tracked).
    stats: Vec<Option<Stat>>,
}

struct Done {
    report: CommitReport,
    record: Option<CommittedTree>,
}

/// What every phase of one commit reads.
struct Commit<'a> {
    key: &'a str,
    opts: &'a CommitOptions,
    started: Instant,
    /// The generation of `key` the tree was restored from, if it was restored from `key`.
    same_key_base: Option<u64>,
    /// The key the tree was restored from, when it is another key (a restore key).
    restore_key: Option<String>,
    /// The bytes of the tree's files.
    total_bytes: u64,
}

impl Commit<'_> {
    /// The report of a commit that writes no generation (before anything new was packed).
    fn unchanged(&self, entries: &[Entry]) -> CommitReport {
        CommitReport::unchanged(
            self.key,
            self.same_key_base,
            count_files(entries),
            self.total_bytes,
            self.started,
        )
    }
}

/// What [`Engine::write_generation`] writes: the packed tree (`ours`) and what it came from.
struct Written<'a> {
    read_root: &'a Path,
    base: &'a Option<BaseRef>,
    base_entries: Option<&'a [Entry]>,
    base_manifest: &'a [ChunkRef],
    known: &'a HashMap<Digest, ChunkRef>,
    ours: &'a [Entry],
}

/// A generation written: its number, its manifest, how many union merges it took.
struct Generated {
    generation: u64,
    manifest: Vec<ChunkRef>,
    merged: u32,
    /// The generation exists: a cancel request no longer stops this commit, which moves the
    /// head and reports it as committed.
    _no_return: NoReturn,
}

fn count_files(entries: &[Entry]) -> u64 {
    entries.iter().filter(|e| e.kind == Kind::File).count() as u64
}

fn file_bytes(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .filter(|e| e.kind == Kind::File)
        .map(|e| e.size)
        .sum()
}

/// A tree as committed (or found unchanged): what a directory or a node base now holds.
#[derive(Clone, Debug)]
pub struct CommittedTree {
    pub base: Option<BaseRef>,
    pub manifest: Vec<ChunkRef>,
    pub entries: Vec<Entry>,
    stats: Vec<Option<Stat>>,
}

/// A file's content as chunk digests and lengths, before the chunks' locations are known.
type Digests = Vec<(Digest, u32)>;

/// Crash points for tests of crash safety (`CACHEVOL_FAULT=after-packs|after-manifest`): the
/// process aborts there, as a kill -9 would. Only with the `fault-injection` feature.
#[cfg(feature = "fault-injection")]
fn fault(point: &str) {
    if std::env::var("CACHEVOL_FAULT").as_deref() == Ok(point) {
        eprintln!("cachevol: CACHEVOL_FAULT={point}: aborting");
        std::process::abort();
    }
}

/// Without the feature a crash point is nothing: no environment read, no string in the binary.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
fn fault(_point: &str) {}

/// `CACHEVOL_FAULT=slow-upload`: every pack upload waits 3 s first, so tests can signal a
/// commit in the middle of its upload (tests/signals.rs). Only with the `fault-injection`
/// feature.
#[cfg(feature = "fault-injection")]
async fn fault_slow_upload() {
    if std::env::var("CACHEVOL_FAULT").as_deref() == Ok("slow-upload") {
        eprintln!("cachevol: CACHEVOL_FAULT=slow-upload: uploading a pack slowly");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
async fn fault_slow_upload() {}

impl Engine {
    pub async fn commit(
        &self,
        key: &str,
        dir: &Path,
        opts: &CommitOptions,
    ) -> Result<CommitReport> {
        let started = Instant::now();
        names::key(key)?;
        let dir = localstate::canonical(dir)?;
        if DirState::restore_interrupted(&self.state_dir, &dir) {
            return Err(Error::Unsupported {
                path: dir,
                why: "the last restore into it did not finish, so it holds no snapshot; restore it again before committing".into(),
            });
        }
        // The walk and the reading of the record are independent: they run at once.
        let scan_dir = dir.clone();
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = seen.clone();
        let mut scanning =
            tokio::task::spawn_blocking(move || scan::scan_counting(&scan_dir, &counter));
        let state = DirState::load(&self.state_dir, &dir, self.store.display_url(), &self.scope);
        // A long walk (a cold tree of a million files) tells how far it got, once a second.
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.tick().await;
        let mut scanned = loop {
            tokio::select! {
                r = &mut scanning => break r.expect("scan does not panic")?,
                // Nothing is written before the plan: a cancelled walk leaves nothing.
                e = self.cancel.requested(key) => return Err(e),
                _ = tick.tick() => self.progress.scanning(seen.load(std::sync::atomic::Ordering::Relaxed)),
            }
        };
        if let (true, Some(st)) = (opts.group_widened, &state) {
            let base = base_modes(&st.entries);
            for s in scanned.iter_mut() {
                s.mode = unwidened(&base, &s.path, s.kind, s.mode);
            }
        }

        // The common case, nothing changed since the record: answer without building a tree.
        // A tree restored from a restore key is committed even unchanged (below), so the next
        // run finds its own key.
        if let Some(st) = state
            .as_ref()
            .filter(|st| unchanged(st, &scanned) && !from_other_key(st.header.base.as_ref(), key))
        {
            let total_bytes: u64 = scanned
                .iter()
                .filter(|s| s.kind == Kind::File)
                .map(|s| s.stat.size)
                .sum();
            check_budget(key, total_bytes, opts)?;
            let generation = st
                .header
                .base
                .as_ref()
                .filter(|b| b.key == key)
                .map(|b| b.generation);
            let files = scanned.iter().filter(|s| s.kind == Kind::File).count() as u64;
            return Ok(CommitReport::unchanged(
                key,
                generation,
                files,
                total_bytes,
                started,
            ));
        }

        // Pair each scanned entry with its base entry; unchanged files keep their chunks.
        let base_index: HashMap<&str, usize> = state
            .as_ref()
            .map(|s| {
                s.entries
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (e.path.as_str(), i))
                    .collect()
            })
            .unwrap_or_default();
        let mut entries: Vec<Entry> = Vec::with_capacity(scanned.len());
        let mut to_read: Vec<usize> = Vec::new();
        for (i, s) in scanned.iter().enumerate() {
            let reuse = state.as_ref().and_then(|st| {
                let &b = base_index.get(s.path.as_str())?;
                let be = &st.entries[b];
                (s.kind == Kind::File && be.kind == Kind::File && st.stats[b] == Some(s.stat))
                    .then(|| be.chunks.clone())
            });
            if s.kind == Kind::File && reuse.is_none() {
                to_read.push(i);
            }
            entries.push(entry_of(s, reuse.unwrap_or_default()));
        }
        let stats = scanned
            .iter()
            .map(|s| (s.kind == Kind::File).then_some(s.stat))
            .collect();
        let plan = Plan {
            read_root: dir.clone(),
            fallback_root: None,
            base: state.as_ref().and_then(|s| s.header.base.clone()),
            base_manifest: state
                .as_ref()
                .map(|s| s.header.manifest.clone())
                .unwrap_or_default(),
            base_entries: state.map(|s| s.entries),
            entries,
            to_read,
            stats,
        };
        let done = self.commit_plan(key, plan, opts, started).await?;
        if let Some(record) = done.record {
            self.save_state(
                &dir,
                record.base,
                record.manifest,
                &record.entries,
                record.stats,
            )?;
        }
        Ok(done.report)
    }

    /// Commits what the node's overlay view of a pod changed: `upper` is the overlayfs upper
    /// dir over `base_dir`, a tree cachevol restored or committed (it has a record). Only the
    /// upper dir is walked and only its files are read: the cost is the size of the change,
    /// not of the cache. Returns the report and the committed tree (when a generation was
    /// written or the content is unchanged) for the node to keep as its next base.
    pub async fn commit_overlay(
        &self,
        key: &str,
        base_dir: &Path,
        upper: &Path,
        opts: &CommitOptions,
    ) -> Result<(CommitReport, Option<CommittedTree>)> {
        let started = Instant::now();
        names::key(key)?;
        let base_dir = localstate::canonical(base_dir)?;
        let state = DirState::load(
            &self.state_dir,
            &base_dir,
            self.store.display_url(),
            &self.scope,
        )
        .ok_or_else(|| Error::Unsupported {
            path: base_dir.clone(),
            why: "this base has no record of the snapshot it holds".into(),
        })?;
        let up = upper.to_path_buf();
        let changes = tokio::task::spawn_blocking(move || overlay::changes(&up))
            .await
            .expect("walk does not panic")?;
        let (mut entries, to_read) = overlay::apply(&state.entries, changes);
        if opts.group_widened {
            let base = base_modes(&state.entries);
            for e in entries.iter_mut() {
                e.mode = unwidened(&base, &e.path, e.kind, e.mode);
            }
        }
        let stats = vec![None; entries.len()];
        let plan = Plan {
            read_root: upper.to_path_buf(),
            fallback_root: Some(base_dir.clone()),
            base: state.header.base.clone(),
            base_manifest: state.header.manifest.clone(),
            base_entries: Some(state.entries),
            entries,
            to_read,
            stats,
        };
        let done = self.commit_plan(key, plan, opts, started).await?;
        Ok((done.report, done.record))
    }

    /// Records `entries` as the tree held by `dir` (a base the node assembled from layers), so
    /// later overlay commits can diff against it.
    pub fn record_tree(&self, dir: &Path, tree: &CommittedTree) -> Result<()> {
        let dir = localstate::canonical(dir)?;
        self.save_state(
            &dir,
            tree.base.clone(),
            tree.manifest.clone(),
            &tree.entries,
            vec![None; tree.entries.len()],
        )
    }

    /// The part of a commit shared by every way of finding changes: budget, dedup against
    /// what the scope has, chunking and packing, the generation, the head. Each phase is a
    /// method below, in the order they run.
    async fn commit_plan(
        &self,
        key: &str,
        plan: Plan,
        opts: &CommitOptions,
        started: Instant,
    ) -> Result<Done> {
        let total_bytes = file_bytes(&plan.entries);
        check_budget(key, total_bytes, opts)?;
        let c = Commit {
            key,
            opts,
            started,
            same_key_base: plan
                .base
                .as_ref()
                .filter(|b| b.key == key)
                .map(|b| b.generation),
            // Restored from a restore key, the tree still becomes a generation of `key` (the
            // chunks and the manifest are the restore key's: only the generation is written).
            restore_key: plan
                .base
                .as_ref()
                .filter(|b| from_other_key(Some(b), key))
                .map(|b| b.key.clone()),
            total_bytes,
        };
        // A tree equal to what was restored (even an empty miss) is unchanged: nothing uploads.
        if plan.to_read.is_empty()
            && c.restore_key.is_none()
            && same_tree(plan.base_entries.as_deref(), &plan.entries)
        {
            return Ok(Done {
                report: c.unchanged(&plan.entries),
                record: None,
            });
        }
        let known = self.known_chunks(key, &plan).await?;
        if opts.fence {
            self.check_fence(&c).await?;
        }
        // Name the packs this commit reuses in its in-flight marker, then check them: GC keeps
        // what a fresh marker names.
        let reused: HashSet<Digest> = known
            .values()
            .chain(&plan.base_manifest)
            .map(|r| r.p)
            .collect();
        // Checked before the marker is written: a commit asked to stop leaves nothing.
        self.cancel.check(key)?;
        let inflight = self.begin_inflight(key, reused.iter().copied()).await?;
        // A cancel request drops the commit at its next await (its uploads are aborted; packs
        // already written are garbage for GC, after its grace) unless it passed its point of
        // no return (`write_generation`); either way the marker is removed here, not left
        // to go stale.
        let res = tokio::select! {
            biased;
            r = self.commit_protected(&c, plan, known, &reused, &inflight) => r,
            e = self.cancel.requested(key) => Err(e),
        };
        inflight.end().await;
        res
    }

    /// Phase 1, what the scope already has: the base's chunks, and (without a known base) the
    /// key's newest generation's. Their chunks are not uploaded again.
    async fn known_chunks(&self, key: &str, plan: &Plan) -> Result<HashMap<Digest, ChunkRef>> {
        let mut known: HashMap<Digest, ChunkRef> = HashMap::new();
        for r in plan
            .base_entries
            .as_deref()
            .unwrap_or_default()
            .iter()
            .flat_map(|e| &e.chunks)
            .chain(&plan.base_manifest)
        {
            known.entry(r.h).or_insert_with(|| r.clone());
        }
        if plan.base.is_none() {
            if let Some(n) = self.newest(key).await? {
                let g = self.load_generation(key, n).await?;
                for e in self.load_entries(&g).await? {
                    for r in e.chunks {
                        known.entry(r.h).or_insert(r);
                    }
                }
            }
        }
        Ok(known)
    }

    /// Phase 2, a fenced commit only: it may only create the generation after the one it
    /// restored. If that is taken already, it is refused before anything is uploaded.
    async fn check_fence(&self, c: &Commit<'_>) -> Result<()> {
        let restored = c.same_key_base.unwrap_or(0);
        let wanted = self.next_generation(c.key, restored)?;
        if self
            .store
            .head(&self.layout.generation(c.key, wanted))
            .await?
            .is_some()
        {
            return Err(Error::Fenced {
                key: c.key.to_string(),
                restored,
                taken: wanted,
            });
        }
        Ok(())
    }

    /// The phases that run while the in-flight marker names the packs this commit reuses:
    /// drop unusable packs, chunk and pack, write the generation, advance the head.
    async fn commit_protected(
        &self,
        c: &Commit<'_>,
        plan: Plan,
        mut known: HashMap<Digest, ChunkRef>,
        reused: &HashSet<Digest>,
        inflight: &InFlight,
    ) -> Result<Done> {
        let Plan {
            read_root,
            fallback_root,
            base,
            mut base_manifest,
            base_entries,
            mut entries,
            mut to_read,
            stats,
        } = plan;
        let base_entries = base_entries.as_deref();
        self.drop_unusable_packs(
            c.key,
            reused,
            &mut known,
            &mut base_manifest,
            &mut entries,
            &mut to_read,
        )
        .await?;
        let mut packer = Packer::new(self);
        let (entries, stats, files_read) = self
            .chunk_and_pack(
                &read_root,
                fallback_root.as_deref(),
                entries,
                stats,
                &to_read,
                &known,
                &mut packer,
            )
            .await?;
        if c.restore_key.is_none() && same_tree(base_entries, &entries) {
            // Touched but identical: nothing new was packed, no generation is written.
            return Ok(Done {
                report: CommitReport {
                    files_read,
                    uploaded: packer.uploaded,
                    new_chunks: packer.new_chunks,
                    ..c.unchanged(&entries)
                },
                record: Some(CommittedTree {
                    base,
                    manifest: base_manifest,
                    entries,
                    stats,
                }),
            });
        }
        fault("after-packs");
        let w = self
            .write_generation(
                c,
                Written {
                    read_root: &read_root,
                    base: &base,
                    base_entries,
                    base_manifest: &base_manifest,
                    known: &known,
                    ours: &entries,
                },
                &mut packer,
                inflight,
            )
            .await?;
        fault("after-manifest");
        self.advance_head(c.key, w.generation).await?;

        // The record describes the directory (ours), with the generation it is now part of
        // (for a union commit, that generation holds more than the directory does).
        Ok(Done {
            report: CommitReport {
                outcome: CommitOutcome::Committed {
                    generation: w.generation,
                },
                key: c.key.to_string(),
                files: count_files(&entries),
                bytes: c.total_bytes,
                files_read,
                uploaded: packer.uploaded,
                new_chunks: packer.new_chunks,
                merged: w.merged,
                seconds: c.started.elapsed().as_secs_f64(),
                restore_key: c.restore_key.clone(),
            },
            record: Some(CommittedTree {
                base: Some(BaseRef {
                    key: c.key.to_string(),
                    generation: w.generation,
                }),
                manifest: w.manifest,
                entries,
                stats,
            }),
        })
    }

    /// Phase 3, packs this commit must not reuse: those a running GC has doomed, those
    /// quarantined (found corrupt) and those gone. Their chunks are forgotten and the files
    /// that had chunks in them are read again.
    async fn drop_unusable_packs(
        &self,
        key: &str,
        reused: &HashSet<Digest>,
        known: &mut HashMap<Digest, ChunkRef>,
        base_manifest: &mut Vec<ChunkRef>,
        entries: &mut [Entry],
        to_read: &mut Vec<usize>,
    ) -> Result<()> {
        let unusable = self.unusable_packs(reused).await?;
        if unusable.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            cache.key = key,
            packs = unusable.len(),
            "packs of the base are quarantined, being collected or gone; their chunks will be uploaded again"
        );
        known.retain(|_, r| !unusable.contains(&r.p));
        base_manifest.retain(|r| !unusable.contains(&r.p));
        for (i, e) in entries.iter_mut().enumerate() {
            if e.kind == Kind::File && e.chunks.iter().any(|r| unusable.contains(&r.p)) {
                e.chunks.clear();
                to_read.push(i);
            }
        }
        to_read.sort_unstable();
        to_read.dedup();
        Ok(())
    }

    /// Phase 4, chunk and pack: reads, chunks, hashes and compresses the files in `to_read`,
    /// packs and uploads the chunks the scope lacks, and fills in every chunk reference.
    /// Files that vanished while being read are left out. Returns the tree, its stats and how
    /// many files were read.
    #[allow(clippy::too_many_arguments)]
    async fn chunk_and_pack(
        &self,
        read_root: &Path,
        fallback_root: Option<&Path>,
        mut entries: Vec<Entry>,
        stats: Vec<Option<Stat>>,
        to_read: &[usize],
        known: &HashMap<Digest, ChunkRef>,
        packer: &mut Packer<'_>,
    ) -> Result<(Vec<Entry>, Vec<Option<Stat>>, u64)> {
        let jobs: Vec<(usize, PathBuf, u64)> = to_read
            .iter()
            .map(|&i| {
                let p = read_root.join(&entries[i].path);
                // An overlay commit re-reads a file it did not change from the base under it.
                let p = match fallback_root {
                    Some(b) if std::fs::symlink_metadata(&p).is_err() => b.join(&entries[i].path),
                    _ => p,
                };
                (i, p, entries[i].size)
            })
            .collect();
        self.progress
            .start("commit", jobs.iter().map(|j| j.2).sum());
        self.progress.files(jobs.len() as u64);
        let (digests, vanished) = self.chunk_files(jobs, known, packer).await?;
        let files_read = digests.len() as u64;
        for (i, d) in digests {
            entries[i].size = d.iter().map(|(_, n)| *n as u64).sum();
            entries[i].chunks = d
                .into_iter()
                .map(|(h, n)| ChunkRef {
                    h,
                    p: Digest([0; 32]),
                    o: 0,
                    c: 0,
                    n,
                })
                .collect();
        }
        let (mut entries, stats): (Vec<Entry>, Vec<Option<Stat>>) = entries
            .into_iter()
            .zip(stats)
            .enumerate()
            .filter(|(i, _)| !vanished.contains(i))
            .map(|(_, pair)| pair)
            .unzip();
        let new_refs = packer.finish_data().await?;
        for e in entries.iter_mut() {
            for r in e.chunks.iter_mut() {
                if r.c == 0 {
                    *r = new_refs
                        .get(&r.h)
                        .or_else(|| known.get(&r.h))
                        .cloned()
                        .expect("every chunk was packed or known");
                }
            }
        }
        self.progress.finish();
        Ok((entries, stats, files_read))
    }

    /// Phase 5, the generation: its manifest is packed and it is created only if nobody else
    /// has it. On a collision, replace takes the next number, union merges into the newer head
    /// (also before the first try when the head moved since the restore), a fenced commit is
    /// refused; after [`MAX_ATTEMPTS`] it gives up.
    async fn write_generation(
        &self,
        c: &Commit<'_>,
        t: Written<'_>,
        packer: &mut Packer<'_>,
        inflight: &InFlight,
    ) -> Result<Generated> {
        let (key, opts) = (c.key, c.opts);
        let mut target = match (opts.fence, c.same_key_base) {
            (true, b) => self.next_generation(key, b.unwrap_or(0))?,
            (false, b) => {
                let newest = self.newest(key).await?.unwrap_or(0);
                self.next_generation(key, newest.max(b.unwrap_or(0)))?
            }
        };
        let changed: HashSet<String> = changed_paths(t.base_entries, t.ours);
        let mut entries = t.ours.to_vec();
        let mut merged = 0;
        // Union: a generation newer than the one this tree was restored from is a conflict as
        // much as a lost create is, so our changes are merged into it before the first attempt.
        if opts.merge == Merge::Union
            && !opts.fence
            && target > 1
            && Some(target - 1) != c.same_key_base
        {
            let theirs = self.load_generation(key, target - 1).await?;
            let theirs = self.load_entries(&theirs).await?;
            entries = union(&theirs, t.ours, &changed);
            merged += 1;
            self.rely_on_merged(inflight, key, target - 1, &entries)
                .await?;
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let manifest = self
                .pack_manifest(t.read_root, &entries, t.known, t.base_manifest, packer)
                .await?;
            let manifest_refs = manifest.refs.clone();
            let g = Generation {
                key: key.to_string(),
                generation: target,
                provenance: Provenance {
                    time: super::now_unix(),
                    writer: opts.writer.clone(),
                    base: t.base.clone(),
                    note: opts.note.clone(),
                },
                totals: Totals::of(&entries),
                manifest_hash: manifest.hash,
                manifest_len: manifest.len,
                manifest: manifest.refs,
                pages: manifest.pages,
            };
            let body = Bytes::from(g.encode());
            let len = body.len() as u64;
            inflight.check_fresh(key)?;
            // A create, once started, may land even if its future is dropped (a local store
            // writes on a blocking thread): from here a cancel request waits for the commit,
            // which then reports what it created.
            let no_return = self.cancel.no_return(key)?;
            if self
                .store
                .put_create(&self.layout.generation(key, target), body)
                .await?
            {
                packer.uploaded += len;
                return Ok(Generated {
                    generation: target,
                    manifest: manifest_refs,
                    merged,
                    _no_return: no_return,
                });
            }
            // Lost the race for this number: nothing of ours was created, we may stop again.
            drop(no_return);
            let taken = self.newest(key).await?.unwrap_or(target).max(target);
            if opts.fence {
                return Err(Error::Fenced {
                    key: key.to_string(),
                    restored: c.same_key_base.unwrap_or(0),
                    taken: target,
                });
            }
            if attempts >= MAX_ATTEMPTS {
                return Err(Error::TooManyConflicts {
                    key: key.to_string(),
                    attempts,
                });
            }
            if opts.merge == Merge::Union {
                let theirs = self.load_generation(key, taken).await?;
                let theirs = self.load_entries(&theirs).await?;
                entries = union(&theirs, t.ours, &changed);
                merged += 1;
                self.rely_on_merged(inflight, key, taken, &entries).await?;
            }
            target = self.next_generation(key, taken)?;
            // Spread colliding writers apart a little.
            let jitter = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as u64 % 20);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
        }
    }

    /// After a union merge: names the packs the merged tree references in the marker, then
    /// checks them; a merged generation whose packs GC is collecting refuses the commit.
    async fn rely_on_merged(
        &self,
        inflight: &InFlight,
        key: &str,
        theirs: u64,
        entries: &[Entry],
    ) -> Result<()> {
        let packs: HashSet<Digest> = entries
            .iter()
            .flat_map(|e| &e.chunks)
            .filter(|r| r.c != 0)
            .map(|r| r.p)
            .collect();
        inflight.rely(packs.iter().copied()).await?;
        let bad = self.unusable_packs(&packs).await?;
        if !bad.is_empty() {
            return Err(Error::PacksGone {
                key: key.to_string(),
                why: format!(
                    "generation {theirs}, merged into it, needs {} packs that are being collected, quarantined or gone",
                    bad.len()
                ),
            });
        }
        Ok(())
    }

    fn save_state(
        &self,
        dir: &Path,
        base: Option<BaseRef>,
        manifest: Vec<ChunkRef>,
        entries: &[Entry],
        stats: Vec<Option<Stat>>,
    ) -> Result<()> {
        DirState {
            header: self.header(dir, base, manifest),
            entries: entries.to_vec(),
            stats,
        }
        .save(&self.state_dir)
    }

    /// Chunks the files `to_read` on worker threads; new chunks go to the packer as they come.
    /// Returns each file's digests, and the files that vanished since the scan.
    async fn chunk_files(
        &self,
        jobs: Vec<(usize, PathBuf, u64)>,
        known: &HashMap<Digest, ChunkRef>,
        packer: &mut Packer<'_>,
    ) -> Result<(HashMap<usize, Digests>, HashSet<usize>)> {
        let paths: HashMap<usize, PathBuf> = jobs.iter().map(|(i, p, _)| (*i, p.clone())).collect();
        let jobs = Arc::new(jobs);
        let known: Arc<HashSet<Digest>> = Arc::new(known.keys().copied().collect());
        let claimed: Arc<Mutex<HashSet<Digest>>> = Arc::default();
        let next = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Msg>(16);
        let workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(8);
        let mut handles = Vec::new();
        for _ in 0..workers {
            let (jobs, known, claimed, next, tx) = (
                jobs.clone(),
                known.clone(),
                claimed.clone(),
                next.clone(),
                tx.clone(),
            );
            handles.push(tokio::task::spawn_blocking(move || loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                let Some((i, path, size)) = jobs.get(j) else {
                    return;
                };
                let res = chunk_file(path, *size, &mut |digest, raw| {
                    let new = !known.contains(&digest)
                        && claimed.lock().expect("not poisoned").insert(digest);
                    let data = new.then(|| format::compress_chunk(raw));
                    tx.blocking_send(Msg::Chunk {
                        file: *i,
                        digest,
                        n: raw.len() as u32,
                        data,
                    })
                    .is_ok()
                });
                if tx
                    .blocking_send(Msg::Done {
                        file: *i,
                        result: res,
                    })
                    .is_err()
                {
                    return;
                }
            }));
        }
        drop(tx);
        let mut digests: HashMap<usize, Digests> = HashMap::new();
        let mut vanished = HashSet::new();
        let mut failure = None;
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Chunk {
                    file,
                    digest,
                    n,
                    data,
                } => {
                    digests.entry(file).or_default().push((digest, n));
                    if let Some(data) = data {
                        packer.add(digest, n, data).await?;
                    }
                    self.progress.advance(n as u64);
                }
                Msg::Done { file, result } => match result {
                    Ok(()) => {
                        digests.entry(file).or_default();
                        self.progress.file_done();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        digests.remove(&file);
                        vanished.insert(file);
                    }
                    Err(e) => {
                        failure.get_or_insert(IoError::new("read", &paths[&file], e).into());
                        rx.close();
                    }
                },
            }
        }
        for h in handles {
            h.await.expect("chunk worker does not panic");
        }
        match failure {
            Some(e) => Err(e),
            None => Ok((digests, vanished)),
        }
    }

    /// Encodes the manifest as pages (format version 2), packs the pages the base (or the
    /// store, as far as this commit knows) does not have, and returns the generation's manifest
    /// chunks, page table, digest and length.
    async fn pack_manifest(
        &self,
        dir: &Path,
        entries: &[Entry],
        known: &HashMap<Digest, ChunkRef>,
        base_manifest: &[ChunkRef],
        packer: &mut Packer<'_>,
    ) -> Result<Manifest> {
        // Restore refuses such a manifest (its memory is bounded): never say "committed" for a
        // generation that cannot be restored.
        let refuse = |why: String| Error::Unsupported {
            path: dir.to_path_buf(),
            why,
        };
        if entries.len() as u64 > format::MAX_ENTRIES {
            return Err(refuse(format!(
                "a tree of {} entries is over the format's limit of {} entries: split it into several caches",
                entries.len(),
                format::MAX_ENTRIES
            )));
        }
        let pages = pages::encode_pages(entries).map_err(refuse)?;
        let mut reusable: HashMap<Digest, ChunkRef> =
            base_manifest.iter().map(|r| (r.h, r.clone())).collect();
        for (h, r) in known {
            reusable.entry(*h).or_insert_with(|| r.clone());
        }
        let mut order = Vec::with_capacity(pages.len());
        let mut infos = Vec::with_capacity(pages.len());
        let mut len = 0u64;
        for page in pages {
            let h = Digest::of(&page.raw);
            if !reusable.contains_key(&h) && !packer.has(&h) {
                packer
                    .add(h, page.raw.len() as u32, format::compress_chunk(&page.raw))
                    .await?;
            }
            len += page.raw.len() as u64;
            order.push(h);
            infos.push(page.info);
        }
        let new_refs = packer.finish_data().await?;
        let refs: Vec<ChunkRef> = order
            .into_iter()
            .map(|h| {
                new_refs
                    .get(&h)
                    .or_else(|| reusable.get(&h))
                    .cloned()
                    .expect("every manifest page was packed or known")
            })
            .collect();
        Ok(Manifest {
            hash: Generation::pages_hash(&refs),
            len,
            refs,
            pages: infos,
        })
    }
}

/// A manifest packed for a generation.
struct Manifest {
    refs: Vec<ChunkRef>,
    pages: Vec<PageInfo>,
    hash: Digest,
    len: u64,
}

enum Msg {
    Chunk {
        file: usize,
        digest: Digest,
        n: u32,
        data: Option<Vec<u8>>,
    },
    Done {
        file: usize,
        result: std::io::Result<()>,
    },
}

/// Splits one file into chunks, calling `emit(digest, raw)` for each in order; `emit` returns
/// false to stop early.
fn chunk_file(
    path: &Path,
    size: u64,
    emit: &mut dyn FnMut(Digest, &[u8]) -> bool,
) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    if size <= READ_WHOLE {
        let mut buf = Vec::with_capacity(size as usize);
        f.read_to_end(&mut buf)?;
        if buf.len() < CDC_MIN as usize {
            if !buf.is_empty() {
                emit(Digest::of(&buf), &buf);
            }
            return Ok(());
        }
        for c in fastcdc::v2020::FastCDC::new(&buf, CDC_MIN, CDC_AVG, CDC_MAX) {
            let raw = &buf[c.offset..c.offset + c.length];
            if !emit(Digest::of(raw), raw) {
                break;
            }
        }
        return Ok(());
    }
    for c in fastcdc::v2020::StreamCDC::new(f, CDC_MIN, CDC_AVG, CDC_MAX) {
        let c = c.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            other => std::io::Error::other(other.to_string()),
        })?;
        if !emit(Digest::of(&c.data), &c.data) {
            break;
        }
    }
    Ok(())
}

fn entry_of(s: &Scanned, chunks: Vec<ChunkRef>) -> Entry {
    Entry {
        path: s.path.clone(),
        kind: s.kind,
        mode: s.mode,
        size: if s.kind == Kind::File { s.stat.size } else { 0 },
        mtime: s.stat.mtime,
        target: s.target.clone(),
        chunks,
    }
}

/// Each base entry's kind and mode, by path.
fn base_modes(base: &[Entry]) -> HashMap<&str, (Kind, u32)> {
    base.iter()
        .map(|e| (e.path.as_str(), (e.kind, e.mode)))
        .collect()
}

/// The mode to commit for an entry found with `mode` in a tree widened for a group: its base
/// entry's mode when `mode` is exactly that mode widened, else `mode` (a new entry, or a mode
/// the pod changed itself).
fn unwidened(base: &HashMap<&str, (Kind, u32)>, path: &str, kind: Kind, mode: u32) -> u32 {
    match base.get(path) {
        Some(&(k, m)) if k == kind && format::widen_for_group(m, kind) == mode => m,
        _ => mode,
    }
}

fn check_budget(key: &str, total_bytes: u64, opts: &CommitOptions) -> Result<()> {
    match opts.budget {
        Some(budget) if total_bytes > budget => Err(Error::OverBudget {
            key: key.to_string(),
            size: total_bytes,
            budget,
        }),
        _ => Ok(()),
    }
}

/// Whether the scanned tree is exactly the recorded one: the same paths, and for each the same
/// kind, mode and link target, the same mtime (but for directories), and for files the same
/// stat (size, mtime, ctime, inode). It is what `same_tree` would find of the tree built from
/// the scan with every file's chunks reused, without building it.
fn unchanged(state: &DirState, scanned: &[Scanned]) -> bool {
    state.entries.len() == scanned.len()
        && state
            .entries
            .iter()
            .zip(&state.stats)
            .zip(scanned)
            .all(|((e, st), s)| {
                let size = if s.kind == Kind::File { s.stat.size } else { 0 };
                e.path == s.path
                    && e.kind == s.kind
                    && e.mode == s.mode
                    && e.size == size
                    && e.target == s.target
                    && (e.kind == Kind::Dir || e.mtime == s.stat.mtime)
                    && (e.kind != Kind::File || *st == Some(s.stat))
            })
}

/// Whether `entries` has the same content as the recorded base tree.
/// Whether a tree restored as `base` came from another key than `key` (a restore key).
fn from_other_key(base: Option<&BaseRef>, key: &str) -> bool {
    base.is_some_and(|b| b.key != key)
}

fn same_tree(base: Option<&[Entry]>, entries: &[Entry]) -> bool {
    let Some(base) = base else {
        return false;
    };
    base.len() == entries.len() && base.iter().zip(entries).all(|(a, b)| a.same_content(b))
}

/// Paths whose entry differs from the base (or that the base lacks).
fn changed_paths(base: Option<&[Entry]>, entries: &[Entry]) -> HashSet<String> {
    let base: HashMap<&str, &Entry> = base
        .map(|b| b.iter().map(|e| (e.path.as_str(), e)).collect())
        .unwrap_or_default();
    entries
        .iter()
        .filter(|e| base.get(e.path.as_str()).is_none_or(|b| !b.same_content(e)))
        .map(|e| e.path.clone())
        .collect()
}

/// Merges our tree into theirs file by file: their entries, then every entry we changed or
/// that they lack (ours is the later commit). Where a file and a directory collide, ours wins
/// and what of theirs stood in its way goes. Deletions are not merged: it is a union.
fn union(theirs: &[Entry], ours: &[Entry], changed: &HashSet<String>) -> Vec<Entry> {
    let mut tree: BTreeMap<String, Entry> =
        theirs.iter().map(|e| (e.path.clone(), e.clone())).collect();
    let ours_by_path: HashMap<&str, &Entry> = ours.iter().map(|e| (e.path.as_str(), e)).collect();
    for e in ours {
        if !changed.contains(&e.path) && tree.contains_key(&e.path) {
            continue;
        }
        // Every ancestor must be a directory: take ours where theirs has something else.
        let mut p = e.path.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            if tree.get(parent).is_none_or(|t| t.kind != Kind::Dir) {
                let d = ours_by_path[parent];
                remove_under(&mut tree, parent);
                tree.insert(parent.to_string(), d.clone());
            }
            p = parent;
        }
        if e.kind != Kind::Dir {
            remove_under(&mut tree, &e.path);
        }
        tree.insert(e.path.clone(), e.clone());
    }
    tree.into_values().collect()
}

/// Builds packs from new chunks and uploads them a few at a time while chunking goes on.
struct Packer<'a> {
    engine: &'a Engine,
    current: PackBuilder,
    pending: Vec<Digest>,
    refs: HashMap<Digest, ChunkRef>,
    uploads: JoinSet<Result<(Vec<ChunkRef>, u64)>>,
    uploaded: u64,
    new_chunks: u64,
}

impl<'a> Packer<'a> {
    fn new(engine: &'a Engine) -> Packer<'a> {
        Packer {
            engine,
            current: PackBuilder::new(),
            pending: Vec::new(),
            refs: HashMap::new(),
            uploads: JoinSet::new(),
            uploaded: 0,
            new_chunks: 0,
        }
    }

    fn has(&self, h: &Digest) -> bool {
        self.refs.contains_key(h) || self.pending.contains(h)
    }

    async fn add(&mut self, digest: Digest, n: u32, compressed: Vec<u8>) -> Result<()> {
        self.current.push(digest, n, &compressed);
        self.pending.push(digest);
        self.new_chunks += 1;
        if self.current.len() >= PACK_TARGET {
            self.seal().await?;
        }
        Ok(())
    }

    /// Closes the current pack and starts its upload, waiting if too many are in flight.
    async fn seal(&mut self) -> Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        self.pending.clear();
        let (id, data, refs) = std::mem::take(&mut self.current).finish();
        while self.uploads.len() >= io_concurrency().min(4) {
            self.collect_one().await?;
        }
        let store = self.engine.store.clone();
        let loc = self.engine.layout.pack(&id.to_hex());
        self.uploads.spawn(async move {
            fault_slow_upload().await;
            let len = data.len() as u64;
            let created = store.put_create(&loc, Bytes::from(data)).await?;
            Ok((refs, if created { len } else { 0 }))
        });
        Ok(())
    }

    async fn collect_one(&mut self) -> Result<()> {
        if let Some(done) = self.uploads.join_next().await {
            let (refs, len) = done.expect("upload task does not panic")?;
            self.uploaded += len;
            for r in refs {
                self.refs.insert(r.h, r);
            }
        }
        Ok(())
    }

    /// Seals and uploads everything added so far; returns the refs of every chunk packed.
    async fn finish_data(&mut self) -> Result<HashMap<Digest, ChunkRef>> {
        self.seal().await?;
        while !self.uploads.is_empty() {
            self.collect_one().await?;
        }
        Ok(self.refs.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: Kind, tag: u8) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o644,
            size: 0,
            mtime: tag as i64,
            target: (kind == Kind::Symlink).then(|| "t".into()),
            chunks: vec![],
        }
    }

    #[test]
    fn union_keeps_both_sides_and_prefers_our_changes() {
        let theirs = vec![
            e("a", Kind::File, 1),
            e("b", Kind::File, 1),
            e("d", Kind::Dir, 1),
            e("d/x", Kind::File, 1),
        ];
        let ours = vec![
            e("a", Kind::File, 1),
            e("b", Kind::File, 2),
            e("c", Kind::File, 2),
            e("d", Kind::File, 2),
        ];
        let changed: HashSet<String> = ["b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let m = union(&theirs, &ours, &changed);
        let got: Vec<(&str, i64)> = m.iter().map(|e| (e.path.as_str(), e.mtime)).collect();
        assert_eq!(got, vec![("a", 1), ("b", 2), ("c", 2), ("d", 2)]);
        let mut m = m;
        format::validate_tree("t", &mut m).unwrap();
    }

    #[test]
    fn union_replaces_their_file_where_we_have_a_directory() {
        let theirs = vec![e("d", Kind::File, 1)];
        let ours = vec![e("d", Kind::Dir, 2), e("d/y", Kind::File, 2)];
        let changed: HashSet<String> = ["d/y"].iter().map(|s| s.to_string()).collect();
        let mut m = union(&theirs, &ours, &changed);
        format::validate_tree("t", &mut m).unwrap();
        assert_eq!(m.len(), 2);
    }
}

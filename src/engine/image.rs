//! Restore into an image: a generation written as one read-only EROFS file system image (see
//! [`super::erofs`]) instead of a tree of files, so a node can mount it (loop, read-only) as the
//! lower layer of a pod's overlay without creating a file per entry. The same verified chunk
//! stream as a tree restore, the same validation; the image is written under a temporary name
//! next to `image` and renamed into place only when complete.

use std::io::IoSlice;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::erofs::{Attrs, Image};
use super::error::{io, Error, IoError, Result};
use super::format::{BaseRef, Entry, Kind};
use super::localstate::{self, DirState};
use super::restore::{current_umask, plan_chunks, Need, RestoreSource};
use super::{names, Engine, Progress, Sink};

/// How an image restore sets ownership, and where the image will be seen.
#[derive(Clone, Debug, Default)]
pub struct ImageOptions {
    /// A pod's fsGroup: every inode gets this group, directories group rwx and setgid, files
    /// group rw (and x where the owner has it), as the node's group bases get.
    pub group: Option<u32>,
    /// The directory the image will be mounted at: once the image is in place, it gets the
    /// record a tree restore into it would get (the generation and its tree), so a commit
    /// over it reads only what changed.
    pub record: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageReport {
    pub source: RestoreSource,
    pub files: u64,
    pub bytes: u64,
    /// Compressed bytes fetched from the store.
    pub downloaded: u64,
    /// The image's length.
    pub image_bytes: u64,
    pub seconds: f64,
}

impl Engine {
    /// Writes exactly `source` (a generation, or nothing: an image of an empty directory) as an
    /// EROFS image at `image`, with the content a tree restore of it gives: the same entries,
    /// modes, mtimes and bytes, owned by this process's user and group (or `opts.group`). A
    /// snapshot that fails verification is refused as by a restore, and no image is left.
    pub async fn restore_image(
        &self,
        source: RestoreSource,
        image: &Path,
        opts: ImageOptions,
    ) -> Result<ImageReport> {
        let started = Instant::now();
        let found = match &source {
            RestoreSource::Key { key, generation }
            | RestoreSource::RestoreKey { key, generation } => Some((key.clone(), *generation)),
            RestoreSource::Miss => None,
        };
        let (g, entries) = match &found {
            Some((key, generation)) => {
                names::key(key)?;
                let (g, e) = self.load_tree(key, *generation).await?;
                (Some(g), e)
            }
            None => (None, Vec::new()),
        };
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "image: manifest loaded"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let attrs = Attrs {
            uid: rustix::process::geteuid().as_raw(),
            gid: opts
                .group
                .unwrap_or_else(|| rustix::process::getegid().as_raw()),
            widen: opts.group.is_some(),
            root_mode: 0o777 & !current_umask(),
            root_mtime: now,
        };
        let entries = Arc::new(entries);
        let plan = Arc::new(Image::plan(&entries, attrs)?);
        let temp = partial_name(image);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)
            .map_err(io("create", &temp))?;
        let file = Arc::new(file);
        let written = async {
            file.set_len(plan.image_len())
                .map_err(io("allocate", &temp))?;
            let downloaded = self
                .write_image(&file, &temp, plan.clone(), entries.clone())
                .await?;
            Ok::<_, Error>(downloaded)
        };
        let touch = async {
            if let Some((key, _)) = &found {
                self.touch_used(key).await;
            }
        };
        let (written, _) = futures::join!(written, touch);
        let downloaded = match written {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                self.quarantine_from(&e).await;
                return Err(e);
            }
        };
        drop(file);
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "image: data written"
        );
        if let Err(e) = std::fs::rename(&temp, image) {
            let _ = std::fs::remove_file(&temp);
            return Err(IoError::new("rename into place", image, e).into());
        }
        if let Some(dir) = &opts.record {
            let dir = localstate::canonical(dir)?;
            let base = found.map(|(key, generation)| BaseRef { key, generation });
            let manifest = g.as_ref().map(|g| g.manifest.clone()).unwrap_or_default();
            let entries = Arc::try_unwrap(entries).unwrap_or_else(|shared| (*shared).clone());
            let stats = vec![None; entries.len()];
            DirState {
                header: self.header(&dir, base, manifest),
                entries,
                stats,
            }
            .save(&self.state_dir)?;
            tracing::debug!(
                ms = started.elapsed().as_millis() as u64,
                "image: record saved"
            );
        }
        let totals = g.map(|g| g.totals).unwrap_or_default();
        Ok(ImageReport {
            source,
            files: totals.files,
            bytes: totals.bytes,
            downloaded,
            image_bytes: plan.image_len(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Writes the metadata of `plan` and, as verified chunks arrive (once the metadata is
    /// written: it holds the inline tails of files), every file's bytes at its place.
    async fn write_image(
        &self,
        file: &Arc<std::fs::File>,
        path: &Path,
        plan: Arc<Image>,
        entries: Arc<Vec<Entry>>,
    ) -> Result<u64> {
        let chunks = plan_chunks(&self.layout, &entries, |_| false)?;
        let total: u64 = entries.iter().map(|e| e.size).sum();
        self.progress.start("restore", total);
        self.progress.files(
            entries
                .iter()
                .filter(|e| e.kind == Kind::File && !e.chunks.is_empty())
                .count() as u64,
        );
        let failed = Arc::new(AtomicBool::new(false));
        // Chunks are fetched, decompressed and verified while the metadata is written; only
        // a write into the metadata area (the inline tails of small files) waits for it.
        let gate = Arc::new(MetadataGate::default());
        let (_always, ready) = tokio::sync::watch::channel(true);
        let metadata = {
            let (file, plan, entries) = (file.clone(), plan.clone(), entries.clone());
            let (path, failed, gate) = (path.to_path_buf(), failed.clone(), gate.clone());
            async move {
                let t0 = Instant::now();
                let res = tokio::task::spawn_blocking(move || {
                    plan.write_metadata(&entries, |at, data| {
                        Ok(file.write_all_at(data, at).map_err(io("write", &path))?)
                    })
                })
                .await
                .expect("writing metadata does not panic");
                if res.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                tracing::debug!(
                    ms = t0.elapsed().as_millis() as u64,
                    "image: metadata written"
                );
                gate.open();
                res
            }
        };
        let remaining: Arc<Vec<AtomicU32>> = Arc::new(
            entries
                .iter()
                .map(|e| AtomicU32::new(e.chunks.len() as u32))
                .collect(),
        );
        let deliver = Arc::new(ImageSink {
            file: file.clone(),
            path: path.to_path_buf(),
            plan,
            entries,
            failed: failed.clone(),
            progress: self.progress.clone(),
            remaining,
            gate,
        });
        let fetch = self.fetch_chunks(chunks, ready, failed, deliver);
        let (metadata, fetched) = futures::join!(metadata, fetch);
        metadata?;
        let downloaded = fetched?;
        self.progress.finish();
        Ok(downloaded)
    }
}

/// Pieces of file data this large are written as they come: copying them costs about what
/// the write call it saves costs.
const DIRECT: usize = 64 << 10;
/// Smaller pieces are held until a run holds this much, then written in offset order.
const RUN: usize = 1 << 20;
/// Two pieces with at most this much metadata or padding (and no file data) between them are
/// written in one call, the gap filled with what [`Image::write_metadata`] wrote there.
const MAX_GAP: u64 = 16 << 10;
/// Buffers one vectored write takes at most (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Writes verified chunks into the image. Chunks arrive in a pack's order, which is about the
/// tree's order as the commit read it (its workers take files in order): the pieces of one
/// batch mostly land near each other, the inline tails of small files one inode apart in the
/// metadata, the blocks of files side by side after it. Each batch holds its small pieces (up
/// to [`RUN`] bytes) and writes them sorted by offset, the pieces with only metadata or padding
/// between them in one vectored call: on a tree of small files an order of magnitude fewer
/// calls than one or two per file. A file whose chunk another pack holds (a duplicate) still
/// ends a run: its bytes are written by that pack's batch.
struct ImageSink {
    file: Arc<std::fs::File>,
    path: PathBuf,
    plan: Arc<Image>,
    entries: Arc<Vec<Entry>>,
    failed: Arc<AtomicBool>,
    progress: Arc<dyn Progress>,
    /// Chunks each file still waits for.
    remaining: Arc<Vec<AtomicU32>>,
    /// Opens once the metadata is written.
    gate: Arc<MetadataGate>,
}

/// Writes into the metadata area wait for the metadata writer, which writes zeros where the
/// inline tails go: a tail written before would be lost. Writes elsewhere (file blocks) go
/// at once.
#[derive(Default)]
struct MetadataGate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl MetadataGate {
    /// Lets every waiting and later write through (also after a failed metadata write: the
    /// writers then see `failed`).
    fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.opened.notify_all();
    }

    /// Whether a write may go on: one into the metadata area first waits for the gate; none
    /// goes on once the restore failed.
    fn pass(&self, into_metadata: bool, failed: &AtomicBool) -> bool {
        if into_metadata {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            while !*open {
                open = self.opened.wait(open).unwrap_or_else(|p| p.into_inner());
            }
        }
        !failed.load(Ordering::Relaxed)
    }
}

/// A batch's small pieces not written yet: (image offset, start in `bytes`, length).
#[derive(Default)]
struct Run {
    pieces: Vec<(u64, usize, usize)>,
    bytes: Vec<u8>,
}

/// A part of a write: bytes of a piece (in [`Run::bytes`]) or of a filled gap.
enum Part {
    Piece(std::ops::Range<usize>),
    Gap(std::ops::Range<usize>),
}

/// Writes buffers, one after another, at an image offset.
type Out<'a> = dyn FnMut(u64, &[IoSlice<'_>]) -> Result<()> + 'a;

impl Run {
    /// Takes `piece`, image bytes at `to`, writing what the run holds first if it would not
    /// fit.
    fn put(
        &mut self,
        plan: &Image,
        entries: &[Entry],
        to: u64,
        piece: &[u8],
        out: &mut Out,
    ) -> Result<()> {
        if piece.len() >= DIRECT {
            return out(to, &[IoSlice::new(piece)]);
        }
        if self.bytes.len() + piece.len() > RUN {
            self.flush(plan, entries, out)?;
        }
        if self.bytes.capacity() == 0 {
            self.bytes.reserve_exact(RUN);
        }
        self.pieces.push((to, self.bytes.len(), piece.len()));
        self.bytes.extend_from_slice(piece);
        Ok(())
    }

    /// Writes the pieces in offset order, those with only metadata or padding between them
    /// together, the gaps filled.
    fn flush(&mut self, plan: &Image, entries: &[Entry], out: &mut Out) -> Result<()> {
        if self.pieces.is_empty() {
            return Ok(());
        }
        self.pieces.sort_unstable_by_key(|p| p.0);
        // Each write: its offset and its parts.
        let mut writes: Vec<(u64, Vec<Part>)> = Vec::new();
        let mut gaps: Vec<u8> = Vec::new();
        let mut end = 0u64;
        for &(to, start, len) in &self.pieces {
            let gap_from = gaps.len();
            let joined = !writes.is_empty()
                && to >= end
                && to - end <= MAX_GAP
                && plan.fill_gap(entries, end, to, &mut gaps);
            let parts = match writes.last_mut() {
                Some((_, parts)) if joined => parts,
                _ => {
                    writes.push((to, Vec::new()));
                    &mut writes.last_mut().expect("just pushed").1
                }
            };
            if gaps.len() > gap_from {
                parts.push(Part::Gap(gap_from..gaps.len()));
            }
            parts.push(Part::Piece(start..start + len));
            end = to + len as u64;
        }
        for (at, parts) in &writes {
            let slices: Vec<IoSlice<'_>> = parts
                .iter()
                .map(|part| match part {
                    Part::Piece(r) => IoSlice::new(&self.bytes[r.clone()]),
                    Part::Gap(r) => IoSlice::new(&gaps[r.clone()]),
                })
                .collect();
            let mut at = *at;
            for group in slices.chunks(IOV_MAX) {
                out(at, group)?;
                at += group.iter().map(|s| s.len() as u64).sum::<u64>();
            }
        }
        self.pieces.clear();
        self.bytes.clear();
        Ok(())
    }
}

impl ImageSink {
    /// Writes `bufs` one after another from `at`, with as few calls as the kernel allows.
    fn write(&self, mut at: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if !self.gate.pass(at < self.plan.meta_end(), &self.failed) {
            return Ok(());
        }
        let mut bufs: Vec<IoSlice<'_>> = bufs.to_vec();
        let mut bufs = &mut bufs[..];
        while !bufs.is_empty() {
            let n = match rustix::io::pwritev(&*self.file, bufs, at) {
                Ok(0) => {
                    return Err(IoError::new(
                        "write",
                        &self.path,
                        std::io::ErrorKind::WriteZero.into(),
                    )
                    .into())
                }
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(IoError::new("write", &self.path, e.into()).into()),
            };
            at += n as u64;
            IoSlice::advance_slices(&mut bufs, n);
        }
        Ok(())
    }
}

impl Sink<Need> for ImageSink {
    type Batch = Run;

    fn batch(&self) -> Run {
        Run::default()
    }

    fn put(&self, run: &mut Run, need: &Need, at: u64, data: &[u8]) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let last = at + data.len() as u64 == need.r.n as u64;
        for &(i, offset) in &need.targets {
            for (to, range) in self.plan.file_ranges(i, offset + at, data.len() as u64) {
                if !range.is_empty() {
                    let part = &data[range.start as usize..range.end as usize];
                    run.put(&self.plan, &self.entries, to, part, &mut |at, bufs| {
                        self.write(at, bufs)
                    })?;
                }
            }
            self.progress.advance(data.len() as u64);
            if last && self.remaining[i].fetch_sub(1, Ordering::AcqRel) == 1 {
                self.progress.file_done();
            }
        }
        Ok(())
    }

    fn finish(&self, mut run: Run) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        run.flush(&self.plan, &self.entries, &mut |at, bufs| {
            self.write(at, bufs)
        })
    }
}

/// The temporary name an image is written under: next to it, hidden, unique to the process.
fn partial_name(image: &Path) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    image.with_file_name(format!(".{name}.partial-{}", super::protect::unique_id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: String, kind: Kind, size: u64, target: Option<&str>) -> Entry {
        Entry {
            path,
            kind,
            mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
            size,
            mtime: 7,
            target: target.map(str::to_string),
            chunks: vec![],
        }
    }

    /// A tree of small files with a few directories, symlinks and larger files among them.
    fn tree() -> Vec<Entry> {
        let mut entries = vec![entry("d".into(), Kind::Dir, 0, None)];
        for i in 0..3000u64 {
            let size = match i % 10 {
                0 => 0,
                1 => 4096 + 300 + i,
                2 => 3 * 4096,
                3 => 70_000 + i,
                _ => 50 + (i * 37) % 3000,
            };
            entries.push(entry(format!("d/f{i:05}"), Kind::File, size, None));
            if i % 50 == 7 {
                entries.push(entry(format!("d/f{i:05}d"), Kind::Dir, 0, None));
                entries.push(entry(format!("d/f{i:05}l"), Kind::Symlink, 0, Some("../x")));
            }
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        entries
    }

    fn content(i: usize, size: u64) -> Vec<u8> {
        (0..size)
            .map(|k| (k as usize * 31 + i * 7 + 1) as u8)
            .collect()
    }

    use super::super::erofs::tests::attrs;

    /// The pieces `file_ranges` gives for the files `which`, each file in chunks of 40 KiB, in
    /// about tree order.
    fn pieces(
        plan: &Image,
        entries: &[Entry],
        which: impl Fn(usize) -> bool,
    ) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        // Two workers chunked the tree, taking files in turn: neighbours come in either order.
        let mut order: Vec<usize> = (0..entries.len()).collect();
        for pair in order.chunks_mut(2) {
            pair.reverse();
        }
        for i in order {
            let e = &entries[i];
            if e.kind != Kind::File || !which(i) {
                continue;
            }
            let data = content(i, e.size);
            for start in (0..e.size).step_by(40 << 10) {
                let chunk = &data[start as usize..e.size.min(start + (40 << 10)) as usize];
                for (to, r) in plan.file_ranges(i, start, chunk.len() as u64) {
                    if !r.is_empty() {
                        out.push((to, chunk[r.start as usize..r.end as usize].to_vec()));
                    }
                }
            }
        }
        out
    }

    fn with_metadata(plan: &Image, entries: &[Entry]) -> Vec<u8> {
        let mut image = vec![0u8; plan.image_len() as usize];
        plan.write_metadata(entries, |at, data| {
            image[at as usize..at as usize + data.len()].copy_from_slice(data);
            Ok(())
        })
        .unwrap();
        image
    }

    /// Writes `pieces` as one batch does; returns the number of writes.
    fn batch(
        plan: &Image,
        entries: &[Entry],
        pieces: &[(u64, Vec<u8>)],
        image: &mut [u8],
    ) -> usize {
        let mut writes = 0;
        let mut out = |mut at: u64, bufs: &[IoSlice<'_>]| {
            for data in bufs {
                image[at as usize..at as usize + data.len()].copy_from_slice(data);
                at += data.len() as u64;
            }
            writes += 1;
            Ok(())
        };
        let mut run = Run::default();
        for (to, piece) in pieces {
            run.put(plan, entries, *to, piece, &mut out).unwrap();
        }
        run.flush(plan, entries, &mut out).unwrap();
        writes
    }

    /// The chunks of a pack come in tree order: the inline tails of small files, the inodes
    /// between them, and the blocks of files side by side reach the image in a few large
    /// writes, and the image is byte for byte the one piece-by-piece writes make.
    #[test]
    fn a_batch_in_tree_order_is_written_in_few_large_writes() {
        let entries = tree();
        let plan = Image::plan(&entries, attrs()).unwrap();
        let all = pieces(&plan, &entries, |_| true);
        let mut want = with_metadata(&plan, &entries);
        for (to, piece) in &all {
            want[*to as usize..*to as usize + piece.len()].copy_from_slice(piece);
        }
        let mut got = with_metadata(&plan, &entries);
        let writes = batch(&plan, &entries, &all, &mut got);
        assert!(got == want, "the image differs from piece-by-piece writes");
        let direct = all.iter().filter(|(_, p)| p.len() >= DIRECT).count();
        assert!(
            writes - direct <= (all.len() - direct) / 10,
            "{writes} writes for {} pieces ({direct} large)",
            all.len()
        );
    }

    /// A tail (in the metadata area) waits until the metadata is written, which would zero it;
    /// file blocks and the writes of a failed restore do not wait.
    #[test]
    fn writes_into_the_metadata_area_wait_for_the_metadata() {
        let gate = Arc::new(MetadataGate::default());
        let failed = Arc::new(AtomicBool::new(false));
        assert!(gate.pass(false, &failed), "file blocks go at once");
        let (tx, rx) = std::sync::mpsc::channel();
        let tail = {
            let (gate, failed) = (gate.clone(), failed.clone());
            std::thread::spawn(move || tx.send(gate.pass(true, &failed)).unwrap())
        };
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "a tail was written before the metadata"
        );
        gate.open();
        assert!(rx.recv().unwrap());
        tail.join().unwrap();
        failed.store(true, Ordering::Relaxed);
        assert!(
            !gate.pass(true, &failed),
            "nothing is written after a failure"
        );
    }

    /// Two batches that hold alternate files (two packs read at once): neither overwrites the
    /// other's data with the gaps it fills, whichever writes first.
    #[test]
    fn batches_do_not_overwrite_each_others_files() {
        let entries = tree();
        let plan = Image::plan(&entries, attrs()).unwrap();
        let mut want = with_metadata(&plan, &entries);
        for (to, piece) in pieces(&plan, &entries, |_| true) {
            want[to as usize..to as usize + piece.len()].copy_from_slice(&piece);
        }
        let one = pieces(&plan, &entries, |i| i % 3 != 0);
        let two = pieces(&plan, &entries, |i| i % 3 == 0);
        for (first, second) in [(&one, &two), (&two, &one)] {
            let mut got = with_metadata(&plan, &entries);
            batch(&plan, &entries, first, &mut got);
            batch(&plan, &entries, second, &mut got);
            let differ = (0..got.len()).find(|&k| got[k] != want[k]);
            assert_eq!(differ, None, "first byte that differs");
        }
    }
}

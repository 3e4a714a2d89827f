//! The snapshot engine: turns a directory into an immutable, deduplicated snapshot of a cache in
//! object storage, and the newest snapshot back into a directory. It knows nothing of gRPC or
//! Kubernetes; the CLI, the CSI driver and the cluster agents are adapters around it.

pub mod error;
pub mod format;
pub mod names;
pub mod store;

mod cancel;
mod commit;
pub mod erofs;
mod fetch;
mod gc;
mod image;
mod inspect;
mod localstate;
pub mod overlay;
pub mod pages;
mod par;
mod protect;
mod restore;
mod scan;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

/// The file a job creates at the root of its cache to say "commit this" (`commit-on: marker`).
/// It is never part of a snapshot: walks and overlay diffs skip it, restores never write it, so
/// a marker can only come from the run that made it.
pub const MARKER: &str = ".cachevol-commit";

/// Whether `path` (relative to a cache's root) is the marker or inside it.
pub fn is_marker(path: &str) -> bool {
    path.strip_prefix(MARKER)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

pub use cancel::Cancel;
pub use commit::{CommitOptions, CommitOutcome, CommitReport, CommittedTree, Merge};
pub use error::{io, Error, IoError, Result};
pub use fetch::Fetched;
pub use format::{Entry, Generation, Kind, Provenance};
pub use gc::{GcPolicy, GcReport};
pub use image::{ImageOptions, ImageReport};
pub use inspect::{KeyInfo, VerifyReport};
pub use localstate::write_atomic;
pub use restore::{RestoreReport, RestoreSource};
pub use store::Store;

use format::{ChunkRef, Digest, Head};
use store::Layout;

/// Packs are closed at about this size: few, large requests on restore.
pub(crate) const PACK_TARGET: usize = 8 << 20;
/// How many packs are fetched or uploaded at once.
pub(crate) fn io_concurrency() -> usize {
    std::env::var("CACHEVOL_IO_CONCURRENCY")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(6)
}

/// Receives progress of long operations; the CLI draws bars with it, the node plugin ignores it.
pub trait Progress: Send + Sync {
    /// A new phase ("restore", "commit") with the number of bytes it will process.
    fn start(&self, _phase: &str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    /// The phase will also write (restore) or read (commit) this many files.
    fn files(&self, _total_files: u64) {}
    /// One more of those files is done.
    fn file_done(&self) {}
    fn finish(&self) {}
    /// A directory walk still running has found this many entries (about once a second).
    fn scanning(&self, _entries: u64) {}
}

/// Progress that goes nowhere.
pub struct Quiet;
impl Progress for Quiet {}

/// The engine bound to one store and one scope.
#[derive(Clone)]
pub struct Engine {
    store: Store,
    scope: String,
    layout: Layout,
    state_dir: PathBuf,
    progress: Arc<dyn Progress>,
    /// Asked to stop commits (the CLI's signals); never asked unless `with_cancel` shared it.
    cancel: Cancel,
}

impl Engine {
    /// `state_dir` holds the records of what was restored where (never inside the cache dirs).
    pub fn new(store: Store, scope: &str, state_dir: impl Into<PathBuf>) -> Result<Engine> {
        let layout = store.layout(scope)?;
        Ok(Engine {
            store,
            scope: scope.to_string(),
            layout,
            state_dir: state_dir.into(),
            progress: Arc::new(Quiet),
            cancel: Cancel::default(),
        })
    }

    pub fn with_progress(mut self, progress: Arc<dyn Progress>) -> Engine {
        self.progress = progress;
        self
    }

    /// Commits of this engine stop (with [`Error::Cancelled`]) when `cancel` is requested,
    /// unless they reached their point of no return (see [`Cancel`]).
    pub fn with_cancel(mut self, cancel: Cancel) -> Engine {
        self.cancel = cancel;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Every generation of `key` present in the store, oldest first. A generation number
    /// beyond [`format::MAX_GENERATION`] is an invalid snapshot: no generation could follow it.
    pub async fn generations(&self, key: &str) -> Result<Vec<u64>> {
        let gens = self.generation_objects(key).await?;
        if let Some(&bad) = gens.iter().find(|g| **g > format::MAX_GENERATION) {
            return Err(Error::corrupt(
                self.layout.generation(key, bad).to_string(),
                format!(
                    "cache {key:?} has generation number {bad}, beyond the largest cachevol can follow ({}): no commit could come after it; `cachevol wipe {key} --yes` or `cachevol rollback {key} --to N` removes it",
                    format::MAX_GENERATION
                ),
            ));
        }
        Ok(gens)
    }

    /// The numbers of every generation object of `key`, valid or not, oldest first.
    pub(crate) async fn generation_objects(&self, key: &str) -> Result<Vec<u64>> {
        names::key(key)?;
        let mut gens: Vec<u64> = self
            .store
            .list(&self.layout.generations(key))
            .await?
            .iter()
            .filter_map(|m| store::parse_generation(&m.location))
            .collect();
        gens.sort_unstable();
        Ok(gens)
    }

    /// The newest generation of `key`. The head object is only a hint: the generation after it
    /// is probed, and if it exists (a commit crashed before moving the head, or the head lost a
    /// race) the generations are listed.
    pub async fn newest(&self, key: &str) -> Result<Option<u64>> {
        names::key(key)?;
        let hint = self.read_head(key).await?.map(|(h, _)| h.generation);
        if let Some(h) = hint.filter(|h| *h < format::MAX_GENERATION) {
            let next = self.store.head(&self.layout.generation(key, h + 1)).await?;
            let current = self.store.head(&self.layout.generation(key, h)).await?;
            if next.is_none() && current.is_some() {
                return Ok(Some(h));
            }
        }
        Ok(self.generations(key).await?.last().copied())
    }

    /// The generation after `newest` of `key`, or an invalid snapshot if there can be none.
    pub(crate) fn next_generation(&self, key: &str, newest: u64) -> Result<u64> {
        newest
            .checked_add(1)
            .filter(|n| *n <= format::MAX_GENERATION)
            .ok_or_else(|| {
                Error::corrupt(
                    self.layout.generation(key, newest).to_string(),
                    format!(
                        "cache {key:?} is at generation {newest}: no generation can follow it; `cachevol wipe {key} --yes` or `cachevol rollback {key} --to N` gets it going again"
                    ),
                )
            })
    }

    async fn read_head(&self, key: &str) -> Result<Option<(Head, object_store::UpdateVersion)>> {
        let loc = self.layout.head(key);
        match self.store.get(&loc).await? {
            None => Ok(None),
            // A damaged hint is ignored: the generations are the truth.
            Some((data, v)) => Ok(serde_json::from_slice::<Head>(&data).ok().map(|h| (h, v))),
        }
    }

    /// Moves the head hint forward to `generation` unless it already names a newer one.
    async fn advance_head(&self, key: &str, generation: u64) -> Result<()> {
        let loc = self.layout.head(key);
        let body = Bytes::from(
            serde_json::to_vec(&Head {
                generation,
                time: now_unix(),
            })
            .expect("head serializes"),
        );
        for _ in 0..20 {
            let current = self.read_head(key).await?;
            if matches!(&current, Some((h, _)) if h.generation >= generation) {
                return Ok(());
            }
            if self
                .store
                .put_swap(&loc, body.clone(), current.map(|(_, v)| v))
                .await?
            {
                return Ok(());
            }
        }
        // The hint stays behind; readers find the newest generation by probing anyway.
        tracing::warn!(
            cache.key = key,
            "head hint not moved after 20 conflicting attempts"
        );
        Ok(())
    }

    /// Reads and checks one generation object.
    pub async fn load_generation(&self, key: &str, generation: u64) -> Result<Generation> {
        names::key(key)?;
        if generation > format::MAX_GENERATION {
            // The listing names the problem and the way out.
            self.generations(key).await?;
            return Err(Error::NoSuchGeneration {
                key: key.to_string(),
                generation,
            });
        }
        let loc = self.layout.generation(key, generation);
        let (data, _) = self
            .store
            .get(&loc)
            .await?
            .ok_or_else(|| Error::NoSuchGeneration {
                key: key.to_string(),
                generation,
            })?;
        let g = Generation::decode(loc.as_ref(), &data)?;
        if g.key != key || g.generation != generation {
            return Err(Error::corrupt(
                loc.to_string(),
                format!(
                    "object claims to be {:?} generation {}",
                    g.key, g.generation
                ),
            ));
        }
        Ok(g)
    }

    /// Fetches, verifies and parses the manifest of a generation: its entries, validated as a
    /// tree and sorted by path, whatever the generation's format version.
    pub async fn load_entries(&self, g: &Generation) -> Result<Vec<Entry>> {
        if g.version() >= 2 {
            return self.load_pages(g).await;
        }
        self.load_stream(g).await
    }

    /// A version 2 manifest: every page fetched (several packs at once, each pack's pages in
    /// coalesced ranged reads), verified and decoded on its own as it arrives, so memory is the
    /// entries plus the pages in flight, never the whole encoded manifest.
    async fn load_pages(&self, g: &Generation) -> Result<Vec<Entry>> {
        let location = format!("{}/{}#manifest", g.key, g.generation);
        // The generation's decode checked the page table: one page per chunk, within the
        // format's limits.
        let by_pack = self.manifest_reads(g.manifest.iter().enumerate().map(|(i, r)| (r, i)))?;
        let infos = Arc::new(g.pages.clone());
        let decoded: Arc<std::sync::Mutex<Vec<Option<Vec<Entry>>>>> =
            Arc::new(std::sync::Mutex::new(vec![None; infos.len()]));
        // A page comes whole unless its frame is long enough to be streamed: then its verified
        // pieces are put together here first.
        let partial = Arc::new(std::sync::Mutex::new(
            HashMap::<(Digest, u64), Vec<u8>>::new(),
        ));
        let (out, loc) = (decoded.clone(), location.clone());
        self.read_manifest(by_pack, move |(r, places), at, data| {
            let whole;
            let raw = if at == 0 && data.len() == r.n as usize {
                data
            } else {
                let mut parts = partial.lock().expect("not poisoned");
                let buf = parts.entry((r.p, r.o)).or_default();
                buf.extend_from_slice(data);
                if buf.len() < r.n as usize {
                    return Ok(());
                }
                whole = parts.remove(&(r.p, r.o)).expect("just filled");
                &whole[..]
            };
            for &i in places {
                let entries = pages::decode_page(&loc, &infos[i], raw)?;
                out.lock().expect("not poisoned")[i] = Some(entries);
            }
            Ok(())
        })
        .await?;
        let decoded = Arc::try_unwrap(decoded)
            .expect("every reader is done")
            .into_inner()
            .expect("not poisoned");
        let total: usize = g.pages.iter().map(|p| p.n as usize).sum();
        let mut entries: Vec<Entry> = Vec::with_capacity(total);
        for (i, page) in decoded.into_iter().enumerate() {
            let page = page.ok_or_else(|| {
                Error::corrupt(&location, format!("manifest page {i} was not read"))
            })?;
            // Each page is in order and the pages' first paths are: what is left to check is
            // that a page ends before the next one begins.
            if let (Some(last), Some(first)) = (entries.last(), page.first()) {
                if pages::dir_cmp(&last.path, &first.path) != std::cmp::Ordering::Less {
                    return Err(Error::corrupt(
                        &location,
                        format!("manifest page {i} overlaps the page before it"),
                    ));
                }
            }
            entries.extend(page);
        }
        entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        format::validate_tree(&location, &mut entries)?;
        if format::Totals::of(&entries) != g.totals {
            return Err(Error::corrupt(
                &location,
                "the manifest does not hold what the generation's totals say",
            ));
        }
        Ok(entries)
    }

    /// A version 1 manifest: the stream is assembled in one buffer of the declared length
    /// (bounded by the format), each distinct chunk decompressed once and copied to every place
    /// it is used.
    async fn load_stream(&self, g: &Generation) -> Result<Vec<Entry>> {
        let location = format!("{}/{}#manifest", g.key, g.generation);
        let len = usize::try_from(g.manifest_len)
            .ok()
            .filter(|n| *n as u64 <= format::MAX_MANIFEST_LEN)
            .ok_or_else(|| Error::corrupt(&location, "manifest is over the format's limit"))?;
        // Where each distinct chunk goes in the stream.
        let mut at = 0usize;
        let by_pack = self.manifest_reads(g.manifest.iter().map(|r| {
            let place = at;
            at += r.n as usize;
            (r, place)
        }))?;
        if at != len {
            return Err(Error::corrupt(
                location,
                "manifest chunk lengths do not add up to the manifest length",
            ));
        }
        let stream = Arc::new(std::sync::Mutex::new(vec![0u8; len]));
        let out = stream.clone();
        self.read_manifest(by_pack, move |(_, places), at, data| {
            let mut s = out.lock().expect("not poisoned");
            for &p in places {
                let from = p + at as usize;
                s[from..from + data.len()].copy_from_slice(data);
            }
            Ok(())
        })
        .await?;
        let stream = Arc::try_unwrap(stream)
            .expect("every reader is done")
            .into_inner()
            .expect("not poisoned");
        if Digest::of(&stream) != g.manifest_hash {
            return Err(Error::corrupt(
                location,
                "manifest does not match its digest",
            ));
        }
        format::decode_entries(&location, &stream)
    }

    /// A manifest's distinct chunks grouped by pack and offset, each with the places it fills
    /// (stream offsets in version 1, page indexes in version 2); two different chunks claiming
    /// one frame are refused.
    fn manifest_reads<'a>(
        &self,
        chunks: impl Iterator<Item = (&'a ChunkRef, usize)>,
    ) -> Result<ManifestReads> {
        let mut by_pack: ManifestReads = HashMap::new();
        for (r, place) in chunks {
            let (known, places) = by_pack
                .entry(r.p)
                .or_default()
                .entry(r.o)
                .or_insert_with(|| (r.clone(), Vec::new()));
            if known != r {
                return Err(one_chunk_per_offset(&self.layout, r));
            }
            places.push(place);
        }
        Ok(by_pack)
    }

    /// Reads every chunk of `by_pack` (several packs at once), handing each verified piece to
    /// `put` as [`Engine::read_chunks`] does.
    async fn read_manifest(
        &self,
        by_pack: ManifestReads,
        put: impl Fn(&(ChunkRef, Vec<usize>), u64, &[u8]) -> Result<()> + Send + Sync + 'static,
    ) -> Result<()> {
        let put = Arc::new(Each(put));
        futures::stream::iter(by_pack)
            .map(|(pack, needs)| {
                let put = put.clone();
                async move {
                    let mut needs: Vec<_> = needs.into_values().collect();
                    needs.sort_by_key(|(r, _)| r.o);
                    self.read_chunks(pack, needs, |(r, _)| r, ReadCtl::default(), put)
                        .await
                }
            })
            .buffer_unordered(io_concurrency())
            .try_collect::<Vec<u64>>()
            .await?;
        Ok(())
    }

    /// Reads, decompresses and verifies the chunks `items` name, all in `pack` and sorted by
    /// offset (one item per offset), handing each verified chunk's data to `deliver` on a
    /// blocking thread: whole (`(0, bytes)`) for an ordinary chunk, in blocks (`(offset in the
    /// chunk, bytes)`) for a streamed one, after the whole chunk was verified. Memory: ranges of
    /// at most [`MAX_WINDOW`] bytes, each held under the process's [`reserve`]d budget. Returns
    /// the compressed bytes fetched.
    pub(crate) async fn read_chunks<T: Send + Sync + 'static, S: Sink<T>>(
        &self,
        pack: Digest,
        items: Vec<T>,
        chunk: fn(&T) -> &ChunkRef,
        ctl: ReadCtl,
        deliver: Arc<S>,
    ) -> Result<u64> {
        let loc = self.layout.pack(&pack.to_hex());
        let location: Arc<str> = loc.to_string().into();
        let ReadCtl { mut ready, stop } = ctl;
        let stopped = move || stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed));
        let mut fetched = 0;
        for read in plan_reads(items, chunk) {
            if stopped() {
                break;
            }
            let (location, deliver, stopped) = (location.clone(), deliver.clone(), stopped.clone());
            match read {
                Read::Window { range, items } => {
                    let max_raw = items.iter().map(|t| chunk(t).n as u64).max().unwrap_or(0);
                    let _budget = reserve(range.end - range.start + max_raw).await;
                    let data = self.read_pack_range(&loc, range.clone()).await?;
                    fetched += items.iter().map(|t| chunk(t).c as u64).sum::<u64>();
                    if let Some(r) = &mut ready {
                        // The sender's failure is noted in `stop`.
                        let _ = r.wait_for(|done| *done).await;
                    }
                    tokio::task::spawn_blocking(move || {
                        let mut raw = Vec::new();
                        let mut batch = deliver.batch();
                        for t in &items {
                            if stopped() {
                                break;
                            }
                            let r = chunk(t);
                            let from = (r.o - range.start) as usize;
                            let frame = &data[from..from + r.c as usize];
                            format::open_chunk_into(&location, r, frame, &mut raw)?;
                            deliver.put(&mut batch, t, 0, &raw)?;
                        }
                        deliver.finish(batch)
                    })
                    .await
                    .expect("a chunk reader does not panic")?;
                }
                Read::Streamed(t) => {
                    let _budget = reserve(format::STREAM_CHUNK_COST).await;
                    if let Some(r) = &mut ready {
                        let _ = r.wait_for(|done| *done).await;
                    }
                    let (store, loc) = (self.store.clone(), loc.clone());
                    let handle = tokio::runtime::Handle::current();
                    fetched += 2 * chunk(&t).c as u64;
                    tokio::task::spawn_blocking(move || {
                        let r = chunk(&t);
                        // Verified whole first, then decompressed again block by block.
                        stream_from_store(&store, &handle, &loc, &location, r, |_, _| Ok(()))?;
                        if stopped() {
                            return Ok(());
                        }
                        let mut batch = deliver.batch();
                        stream_from_store(&store, &handle, &loc, &location, r, |at, block| {
                            deliver.put(&mut batch, &t, at, block)
                        })?;
                        deliver.finish(batch)
                    })
                    .await
                    .expect("a chunk stream does not panic")?;
                }
            }
        }
        Ok(fetched)
    }

    /// A range of a pack; a missing or short pack is a corrupt snapshot.
    pub(crate) async fn read_pack_range(
        &self,
        loc: &object_store::path::Path,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        read_pack_range(&self.store, loc, range).await
    }
}

async fn read_pack_range(
    store: &Store,
    loc: &object_store::path::Path,
    range: std::ops::Range<u64>,
) -> Result<Bytes> {
    store.get_range(loc, range).await.map_err(|e| match e {
        Error::Store {
            source: object_store::Error::NotFound { .. },
            ..
        } => Error::corrupt(loc.to_string(), "pack is missing from the store"),
        Error::Store { ref source, .. } if source.to_string().contains("Range") => {
            Error::corrupt(loc.to_string(), format!("pack is truncated: {source}"))
        }
        other => other,
    })
}

/// The error for two chunk refs that name one frame of a pack but differ (digest or lengths):
/// one of them lies, and the data of one must never be taken for the other.
/// A manifest's chunks to read: per pack, per frame offset, the chunk and the places it fills.
type ManifestReads = HashMap<Digest, HashMap<u64, (ChunkRef, Vec<usize>)>>;

pub(crate) fn one_chunk_per_offset(layout: &Layout, r: &ChunkRef) -> Error {
    Error::corrupt(
        layout.pack(&r.p.to_hex()).to_string(),
        format!(
            "two different chunks claim the frame at offset {} (one is {})",
            r.o, r.h
        ),
    )
}

/// [`format::stream_chunk`] over ranged reads of the pack: a store failure is reported as such,
/// not as a chunk that does not decompress. Runs on a blocking thread.
fn stream_from_store(
    store: &Store,
    handle: &tokio::runtime::Handle,
    loc: &object_store::path::Path,
    location: &str,
    r: &ChunkRef,
    sink: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut reader = PackReader {
        store,
        handle,
        loc,
        pos: r.o,
        end: r.o + r.c as u64,
        buf: Bytes::new(),
        failed: None,
    };
    let res = format::stream_chunk(location, r, &mut reader, sink);
    match reader.failed.take() {
        Some(e) => Err(e),
        None => res,
    }
}

/// Reads a byte range of a pack in blocks of 1 MiB, from a blocking thread.
struct PackReader<'a> {
    store: &'a Store,
    handle: &'a tokio::runtime::Handle,
    loc: &'a object_store::path::Path,
    pos: u64,
    end: u64,
    buf: Bytes,
    failed: Option<Error>,
}

impl std::io::Read for PackReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            if self.pos >= self.end {
                return Ok(0);
            }
            let next = (self.pos + (1 << 20)).min(self.end);
            match self
                .handle
                .block_on(read_pack_range(self.store, self.loc, self.pos..next))
            {
                Ok(b) => self.buf = b,
                Err(e) => {
                    let text = e.to_string();
                    self.failed = Some(e);
                    return Err(std::io::Error::other(text));
                }
            }
            self.pos = next;
        }
        let k = out.len().min(self.buf.len());
        out[..k].copy_from_slice(&self.buf[..k]);
        bytes::Buf::advance(&mut self.buf, k);
        Ok(k)
    }
}

/// Where [`Engine::read_chunks`] hands verified chunk data. Each read (a window of a pack, or one
/// streamed chunk) gets its own batch, used on one blocking thread, in the pack's order, and
/// finished once that read has delivered everything: a sink may hold data back in its batch
/// (to write it in fewer, larger pieces) until [`Sink::finish`]. A batch whose read fails is
/// dropped unfinished.
pub(crate) trait Sink<T>: Send + Sync + 'static {
    type Batch: Send;
    fn batch(&self) -> Self::Batch;
    /// `data` is the verified data of `item`'s chunk at offset `at` in the chunk.
    fn put(&self, batch: &mut Self::Batch, item: &T, at: u64, data: &[u8]) -> Result<()>;
    fn finish(&self, batch: Self::Batch) -> Result<()>;
}

/// A [`Sink`] that handles each piece at once, with nothing to finish.
pub(crate) struct Each<F>(pub F);

impl<T, F> Sink<T> for Each<F>
where
    F: Fn(&T, u64, &[u8]) -> Result<()> + Send + Sync + 'static,
{
    type Batch = ();
    fn batch(&self) {}
    fn put(&self, _: &mut (), item: &T, at: u64, data: &[u8]) -> Result<()> {
        (self.0)(item, at, data)
    }
    fn finish(&self, _: ()) -> Result<()> {
        Ok(())
    }
}

/// How a reader of chunks waits and stops: `ready` turns true when the data may be delivered,
/// `stop` is set when another task failed and the rest is not wanted.
#[derive(Default)]
pub(crate) struct ReadCtl {
    pub ready: Option<tokio::sync::watch::Receiver<bool>>,
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// Compressed bytes read in one request at most: a whole pack as commit writes them (8 MiB and
/// the chunk that closed it), never more, whatever a hostile pack or manifest declares.
pub(crate) const MAX_WINDOW: u64 = 12 << 20;
/// Nearby frames are read in one request if the gap between them is at most this.
const GAP: u64 = 256 << 10;

/// One read of a pack: a range holding ordinary chunks, or a chunk too big for memory.
pub(crate) enum Read<T> {
    Window {
        range: std::ops::Range<u64>,
        items: Vec<T>,
    },
    Streamed(T),
}

/// Groups chunks (sorted by offset, one item per offset) into few ranged reads: nearby frames
/// together while the range stays within [`MAX_WINDOW`], streamed chunks alone.
pub(crate) fn plan_reads<T>(items: Vec<T>, chunk: fn(&T) -> &ChunkRef) -> Vec<Read<T>> {
    let mut out: Vec<Read<T>> = Vec::new();
    let mut current: Option<(std::ops::Range<u64>, Vec<T>)> = None;
    for t in items {
        let r = chunk(&t);
        if format::is_streamed(r) {
            out.push(Read::Streamed(t));
            continue;
        }
        let (start, end) = (r.o, r.o + r.c as u64);
        match &mut current {
            Some((range, group))
                if start <= range.end + GAP && end.max(range.end) - range.start <= MAX_WINDOW =>
            {
                range.end = range.end.max(end);
                group.push(t);
            }
            _ => {
                if let Some((range, items)) = current.take() {
                    out.push(Read::Window { range, items });
                }
                current = Some((start..end, vec![t]));
            }
        }
    }
    if let Some((range, items)) = current {
        out.push(Read::Window { range, items });
    }
    out
}

/// The memory all reads of chunk data in this process may hold at once: a restore, a verify and
/// the node plugin's concurrent restores share it, so a hostile snapshot cannot make the process
/// hold more than this (plus the manifest) however many packs or references it declares.
const MEMORY_BUDGET_KIB: usize = 64 << 10;
static MEMORY: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MEMORY_BUDGET_KIB);

/// Waits until `bytes` of the budget are free (all of it, for more than the budget).
pub(crate) async fn reserve(bytes: u64) -> tokio::sync::SemaphorePermit<'static> {
    let kib = bytes.div_ceil(1024).min(MEMORY_BUDGET_KIB as u64) as u32;
    MEMORY
        .acquire_many(kib)
        .await
        .expect("the budget is never closed")
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// This machine's (or pod's) host name, as the kernel has it; None when it cannot be read. The
/// one reading of it: writer ids, unique ids and the controller's Lease identity all name the
/// host the same way.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
}

/// A default writer id for provenance: `user@host`. The user is `$USER` or `$LOGNAME`, else
/// the name of the process's uid in /etc/passwd (CI containers often set neither), else `uidN`.
pub fn default_writer() -> String {
    let uid = rustix::process::getuid().as_raw();
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
            passwd_name(&passwd, uid)
        })
        .unwrap_or_else(|| format!("uid{uid}"));
    let host = hostname().unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

/// The name of `uid` in the text of an /etc/passwd (`name:password:uid:...` lines).
fn passwd_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        (fields.next()?.parse::<u32>().ok()? == uid && !name.is_empty()).then(|| name.to_string())
    })
}

impl Engine {
    /// Forgets what was restored into `dir` (after a failed restore left it in an unknown
    /// state): its next commit is a full one, deduplicated against the store.
    pub fn forget(&self, dir: &std::path::Path) {
        if let Ok(dir) = localstate::canonical(dir) {
            localstate::DirState::remove(&self.state_dir, &dir);
        }
    }
}

impl Engine {
    /// Whether `dir` holds a complete tree that cachevol restored, committed or recorded.
    pub fn has_record(&self, dir: &std::path::Path) -> bool {
        let Ok(dir) = localstate::canonical(dir) else {
            return false;
        };
        !localstate::DirState::restore_interrupted(&self.state_dir, &dir)
            && localstate::DirState::load_header(
                &self.state_dir,
                &dir,
                self.store.display_url(),
                &self.scope,
            )
            .is_some()
    }

    /// When `dir` holds a tree recorded for another store or scope than this engine's: which
    /// one (redacted URL and scope). Such a directory is never restored over nor committed
    /// from by this engine: its content is another tenant's.
    pub fn foreign_record(&self, dir: &std::path::Path) -> Option<String> {
        let dir = localstate::canonical(dir).ok()?;
        let h = localstate::DirState::load_any_header(&self.state_dir, &dir)?;
        (h.dir == dir && (h.store != self.store.display_url() || h.scope != self.scope))
            .then(|| format!("store {} scope {}", h.store, h.scope))
    }

    /// Records `copy`, a plain copy of the recorded tree `base` (the copy fallback of node
    /// views), with the stat of each copied file, so its commit reads only what changes.
    pub fn adopt_copy(&self, base: &std::path::Path, copy: &std::path::Path) -> Result<()> {
        let (base, copy) = (localstate::canonical(base)?, localstate::canonical(copy)?);
        let state = localstate::DirState::load(
            &self.state_dir,
            &base,
            self.store.display_url(),
            &self.scope,
        )
        .ok_or_else(|| Error::Unsupported {
            path: base.clone(),
            why: "this base has no record of the snapshot it holds".into(),
        })?;
        let scanned: std::collections::HashMap<String, localstate::Stat> = scan::scan(&copy)?
            .into_iter()
            .filter(|s| s.kind == Kind::File)
            .map(|s| (s.path, s.stat))
            .collect();
        let stats = state
            .entries
            .iter()
            .map(|e| {
                scanned
                    .get(&e.path)
                    .filter(|st| e.kind == Kind::File && st.size == e.size && st.mtime == e.mtime)
                    .copied()
            })
            .collect();
        localstate::DirState {
            header: self.header(
                &copy,
                state.header.base.clone(),
                state.header.manifest.clone(),
            ),
            entries: state.entries,
            stats,
        }
        .save(&self.state_dir)
    }
}

#[cfg(test)]
mod writer_tests {
    #[test]
    fn the_passwd_entry_names_the_user() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\n# comment\nbuilder:x:1001:1001::/home/b:/bin/sh\n";
        assert_eq!(super::passwd_name(passwd, 1001).as_deref(), Some("builder"));
        assert_eq!(super::passwd_name(passwd, 0).as_deref(), Some("root"));
        assert_eq!(super::passwd_name(passwd, 42), None);
    }
}

//! The snapshot engine: turns a directory into an immutable, deduplicated snapshot of a cache in
//! object storage, and the newest snapshot back into a directory. It knows nothing of gRPC or
//! Kubernetes; the CLI, the CSI driver and the cluster agents are adapters around it.

pub mod error;
pub mod format;
pub mod names;
pub mod store;

mod commit;
mod gc;
mod inspect;
mod localstate;
pub mod overlay;
mod par;
mod protect;
mod restore;
mod scan;

use std::collections::HashMap;
use std::path::PathBuf;
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

pub use commit::{CommitOptions, CommitOutcome, CommitReport, CommittedTree, Merge};
pub use error::{Error, Result};
pub use format::{Entry, Generation, Kind, Provenance};
pub use gc::{GcPolicy, GcReport};
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
    fn finish(&self) {}
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
        })
    }

    pub fn with_progress(mut self, progress: Arc<dyn Progress>) -> Engine {
        self.progress = progress;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Every generation of `key` present in the store, oldest first.
    pub async fn generations(&self, key: &str) -> Result<Vec<u64>> {
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
        if let Some(h) = hint {
            let next = self.store.head(&self.layout.generation(key, h + 1)).await?;
            let current = self.store.head(&self.layout.generation(key, h)).await?;
            if next.is_none() && current.is_some() {
                return Ok(Some(h));
            }
        }
        Ok(self.generations(key).await?.last().copied())
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

    /// Fetches, verifies and parses the manifest of a generation.
    pub async fn load_entries(&self, g: &Generation) -> Result<Vec<Entry>> {
        let location = format!("{}/{}#manifest", g.key, g.generation);
        let chunks = self.fetch_chunks(&g.manifest).await?;
        let mut stream = Vec::with_capacity(g.manifest_len as usize);
        for c in chunks {
            stream.extend_from_slice(&c);
        }
        if Digest::of(&stream) != g.manifest_hash {
            return Err(Error::corrupt(
                location,
                "manifest does not match its digest",
            ));
        }
        format::decode_entries(&location, &stream)
    }

    /// Fetches the given chunks (any packs, any order), verified, in the order asked.
    async fn fetch_chunks(&self, refs: &[ChunkRef]) -> Result<Vec<Vec<u8>>> {
        let mut by_pack: HashMap<Digest, Vec<ChunkRef>> = HashMap::new();
        for r in refs {
            by_pack.entry(r.p).or_default().push(r.clone());
        }
        let fetched: Vec<Vec<(ChunkRef, Bytes)>> = futures::stream::iter(by_pack)
            .map(|(pack, needs)| async move { self.read_frames(pack, needs).await })
            .buffer_unordered(io_concurrency())
            .try_collect()
            .await?;
        let mut raw: HashMap<(Digest, u64), Vec<u8>> = HashMap::new();
        for (r, frame) in fetched.into_iter().flatten() {
            let loc = self.layout.pack(&r.p.to_hex()).to_string();
            let data = format::open_chunk(&loc, &r, &frame)?;
            raw.insert((r.p, r.o), data);
        }
        Ok(refs
            .iter()
            .map(|r| {
                raw.get(&(r.p, r.o))
                    .cloned()
                    .expect("every ref was fetched")
            })
            .collect())
    }

    /// Reads the compressed frames of `needs` from one pack, coalescing nearby ranges so a pack
    /// is read in few requests, and the whole of it when most of it is wanted.
    async fn read_frames(
        &self,
        pack: Digest,
        mut needs: Vec<ChunkRef>,
    ) -> Result<Vec<(ChunkRef, Bytes)>> {
        const GAP: u64 = 256 << 10;
        let loc = self.layout.pack(&pack.to_hex());
        needs.sort_by_key(|r| r.o);
        needs.dedup_by_key(|r| r.o);
        let mut out = Vec::with_capacity(needs.len());
        let mut i = 0;
        while i < needs.len() {
            let start = needs[i].o;
            let mut end = start + needs[i].c as u64;
            let mut j = i + 1;
            while j < needs.len() && needs[j].o <= end + GAP {
                end = end.max(needs[j].o + needs[j].c as u64);
                j += 1;
            }
            let data = self
                .store
                .get_range(&loc, start..end)
                .await
                .map_err(|e| match e {
                    Error::Store {
                        source: object_store::Error::NotFound { .. },
                        ..
                    } => Error::corrupt(loc.to_string(), "pack is missing from the store"),
                    Error::Store { ref source, .. } if source.to_string().contains("Range") => {
                        Error::corrupt(loc.to_string(), format!("pack is truncated: {source}"))
                    }
                    other => other,
                })?;
            for r in &needs[i..j] {
                let from = (r.o - start) as usize;
                out.push((r.clone(), data.slice(from..from + r.c as usize)));
            }
            i = j;
        }
        Ok(out)
    }
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A default writer id for provenance: `user@host`.
pub fn default_writer() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        // SAFETY: getuid has no preconditions and cannot fail.
        .unwrap_or_else(|_| format!("uid{}", unsafe { libc::getuid() }));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
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

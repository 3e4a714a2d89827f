//! Looking at caches: the keys of a scope with their newest generation, one generation's files
//! and provenance, a full verification (fetch and hash everything), and rollback (a new
//! generation whose tree is an older one's).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::error::{Error, Result};
use super::format::{ChunkRef, Digest, Generation, Provenance};
use super::{io_concurrency, names, Each, Engine, ReadCtl};

#[derive(Clone, Debug, Serialize)]
pub struct KeyInfo {
    pub key: String,
    pub newest: u64,
    pub generations: usize,
    pub files: u64,
    pub bytes: u64,
    pub written: i64,
    pub writer: String,
    /// Unix seconds of the last restore, when recorded.
    pub last_used: Option<i64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub key: String,
    pub generation: u64,
    pub packs: usize,
    pub chunks: usize,
    pub bytes: u64,
    pub seconds: f64,
}

impl Engine {
    /// The keys of this scope, each with its newest generation's summary.
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let keys = self.store.list_dirs(&self.layout.manifests()).await?;
        let infos: Vec<Option<KeyInfo>> = futures::stream::iter(keys)
            .map(|key| async move {
                let gens = self.generations(&key).await?;
                let Some(&newest) = gens.last() else {
                    return Ok(None);
                };
                let g = self.load_generation(&key, newest).await?;
                let last_used = self.last_used(&key).await?;
                Ok::<_, Error>(Some(KeyInfo {
                    key,
                    newest,
                    generations: gens.len(),
                    files: g.totals.files,
                    bytes: g.totals.bytes,
                    written: g.provenance.time,
                    writer: g.provenance.writer,
                    last_used,
                }))
            })
            .buffered(8)
            .try_collect()
            .await?;
        Ok(infos.into_iter().flatten().collect())
    }

    pub(crate) async fn last_used(&self, key: &str) -> Result<Option<i64>> {
        Ok(self
            .store
            .get(&self.layout.used(key))
            .await?
            .and_then(|(b, _)| std::str::from_utf8(&b).ok()?.trim().parse().ok()))
    }

    /// A generation (the newest when `generation` is None).
    pub async fn show(&self, key: &str, generation: Option<u64>) -> Result<Generation> {
        let generation = match generation {
            Some(g) => g,
            None => self.newest(key).await?.ok_or_else(|| Error::NoSuchKey {
                scope: self.scope.clone(),
                key: key.to_string(),
            })?,
        };
        self.load_generation(key, generation).await
    }

    /// Fetches every pack a generation references, checks each pack against its id and every
    /// chunk against its digest.
    pub async fn verify(&self, key: &str, generation: Option<u64>) -> Result<VerifyReport> {
        let res = self.verify_all(key, generation).await;
        if let Err(e) = &res {
            self.quarantine_from(e).await;
        }
        res
    }

    async fn verify_all(&self, key: &str, generation: Option<u64>) -> Result<VerifyReport> {
        let started = Instant::now();
        let g = self.show(key, generation).await?;
        let entries = self.load_entries(&g).await?;
        let mut by_pack: HashMap<Digest, HashMap<u64, ChunkRef>> = HashMap::new();
        for r in entries.iter().flat_map(|e| &e.chunks).chain(&g.manifest) {
            let slot = by_pack.entry(r.p).or_default().entry(r.o);
            let known = slot.or_insert_with(|| r.clone());
            if known != r {
                return Err(super::one_chunk_per_offset(&self.layout, r));
            }
        }
        let packs = by_pack.len();
        let (chunks, bytes) = futures::stream::iter(by_pack)
            .map(|(pack, refs)| async move {
                let mut refs: Vec<ChunkRef> = refs.into_values().collect();
                refs.sort_unstable_by_key(|r| r.o);
                let counted = (refs.len(), refs.iter().map(|r| r.n as u64).sum::<u64>());
                self.check_pack(pack).await?;
                self.read_chunks(
                    pack,
                    refs,
                    |r| r,
                    ReadCtl::default(),
                    Arc::new(Each(|_: &ChunkRef, _, _: &[u8]| Ok(()))),
                )
                .await?;
                Ok::<_, Error>(counted)
            })
            .buffer_unordered(io_concurrency())
            .try_fold((0usize, 0u64), |(c, b), (c2, b2)| async move {
                Ok((c + c2, b + b2))
            })
            .await?;
        Ok(VerifyReport {
            key: key.to_string(),
            generation: g.generation,
            packs,
            chunks,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Makes generation `to`'s tree the newest again, as a new generation: history is kept, and
    /// the packs it needs must still be in the store.
    pub async fn rollback(&self, key: &str, to: u64, writer: &str) -> Result<u64> {
        names::key(key)?;
        // Generation objects no generation could follow block the key: rolling back is the
        // operator's way out, so they go first.
        for bad in self.generation_objects(key).await? {
            if bad > super::format::MAX_GENERATION {
                tracing::warn!(
                    cache.key = key,
                    generation = bad,
                    "deleting a generation object whose number cannot be followed"
                );
                self.store.delete(&self.layout.generation(key, bad)).await?;
            }
        }
        if self
            .read_head(key)
            .await?
            .is_some_and(|(h, _)| h.generation > super::format::MAX_GENERATION)
        {
            self.store.delete(&self.layout.head(key)).await?;
        }
        let old = self.load_generation(key, to).await?;
        let entries = self.load_entries(&old).await?;
        let packs: HashSet<Digest> = entries
            .iter()
            .flat_map(|e| &e.chunks)
            .chain(&old.manifest)
            .map(|r| r.p)
            .collect();
        for p in packs {
            if self
                .store
                .head(&self.layout.pack(&p.to_hex()))
                .await?
                .is_none()
            {
                return Err(Error::corrupt(
                    self.layout.pack(&p.to_hex()).to_string(),
                    format!(
                        "generation {to} can no longer be restored: a pack it needs was collected"
                    ),
                ));
            }
        }
        for _ in 0..64 {
            let next = self.next_generation(key, self.newest(key).await?.unwrap_or(0))?;
            let g = Generation {
                generation: next,
                provenance: Provenance {
                    time: super::now_unix(),
                    writer: writer.to_string(),
                    base: Some(super::format::BaseRef {
                        key: key.to_string(),
                        generation: to,
                    }),
                    note: Some(format!("rollback to generation {to}")),
                },
                ..old.clone()
            };
            if self
                .store
                .put_create(&self.layout.generation(key, next), Bytes::from(g.encode()))
                .await?
            {
                self.advance_head(key, next).await?;
                return Ok(next);
            }
        }
        Err(Error::TooManyConflicts {
            key: key.to_string(),
            attempts: 64,
        })
    }
}

impl Engine {
    /// Checks a whole pack against its id and its magic, reading it in bounded ranges: a pack
    /// of any size is checked in the memory of one range.
    async fn check_pack(&self, id: Digest) -> Result<()> {
        const RANGE: u64 = 8 << 20;
        let loc = self.layout.pack(&id.to_hex());
        let missing = || Error::corrupt(loc.to_string(), "pack is missing from the store");
        let size = self.store.head(&loc).await?.ok_or_else(missing)?.size;
        let mut hasher = blake3::Hasher::new();
        let mut at = 0;
        while at < size {
            let end = (at + RANGE).min(size);
            let _budget = super::reserve(end - at).await;
            let data = self.read_pack_range(&loc, at..end).await?;
            if at == 0 && (data.len() < 8 || &data[..8] != super::format::PACK_MAGIC) {
                return Err(Error::corrupt(
                    loc.to_string(),
                    "not a cachevol pack (bad magic)",
                ));
            }
            hasher.update(&data);
            at = end;
        }
        if Digest(*hasher.finalize().as_bytes()) != id {
            return Err(Error::corrupt(
                loc.to_string(),
                "pack does not match its id (altered or truncated)",
            ));
        }
        Ok(())
    }
}

//! Fetching one file of a snapshot on demand: the chunks of one [`Entry`] (all of them, or a
//! range), read with the restore's reader (ranged, coalesced reads of each pack, several packs
//! at once, every chunk verified before it is handed on) and written at their offsets into a
//! local file. A lazy base fills its local copy with this, file by file, as reads ask.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use futures::StreamExt;

use super::error::{Error, Result};
use super::format::{ChunkRef, Digest, Entry, Kind};
use super::{io_concurrency, Each, Engine, ReadCtl};

/// What one [`Engine::fetch_file`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Verified raw bytes written into the local file.
    pub bytes: u64,
    /// Compressed bytes read from the store.
    pub downloaded: u64,
}

/// One distinct frame of a pack and every offset of the file that holds its data (a file may
/// repeat a chunk).
struct Place {
    r: ChunkRef,
    at: Vec<u64>,
}

impl Engine {
    /// Fetches the chunks of file `entry` whose indices are in `chunks` (all of them if None)
    /// and writes each at its offset in the file into `out`, which the caller opened for
    /// writing (its length is left alone: set it to `entry.size` first for a sparse copy).
    /// Only verified bytes are written: a chunk that does not decompress or does not match its
    /// digest fails the fetch with an error that names the chunk, the pack and the file, and
    /// the other reads stop. Chunks verified before the failure may have been written; they
    /// are the right bytes, but the file as a whole is not complete and must not be used as
    /// such.
    pub async fn fetch_file(
        &self,
        entry: &Entry,
        chunks: Option<std::ops::Range<usize>>,
        out: Arc<File>,
    ) -> Result<Fetched> {
        if entry.kind != Kind::File {
            return Err(Error::Unsupported {
                path: entry.path.clone().into(),
                why: "only a regular file has chunks to fetch".into(),
            });
        }
        let range = chunks.unwrap_or(0..entry.chunks.len());
        if range.start > range.end || range.end > entry.chunks.len() {
            return Err(Error::Unsupported {
                path: entry.path.clone().into(),
                why: format!(
                    "chunks {range:?} asked of a file of {} chunks",
                    entry.chunks.len()
                ),
            });
        }
        let mut by_pack: HashMap<Digest, HashMap<u64, Place>> = HashMap::new();
        let mut offset = 0u64;
        let mut bytes = 0u64;
        for (i, r) in entry.chunks.iter().enumerate() {
            if range.contains(&i) {
                let place = by_pack
                    .entry(r.p)
                    .or_default()
                    .entry(r.o)
                    .or_insert_with(|| Place {
                        r: r.clone(),
                        at: Vec::new(),
                    });
                if place.r != *r {
                    return Err(super::one_chunk_per_offset(&self.layout, r));
                }
                place.at.push(offset);
                bytes += r.n as u64;
            }
            offset += r.n as u64;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let results = futures::stream::iter(by_pack)
            .map(|(pack, places)| {
                let (out, stop, path) = (out.clone(), stop.clone(), entry.path.clone());
                async move {
                    let mut places: Vec<Place> = places.into_values().collect();
                    places.sort_unstable_by_key(|p| p.r.o);
                    let ctl = ReadCtl {
                        ready: None,
                        stop: Some(stop.clone()),
                    };
                    let sink = Each(move |p: &Place, at: u64, data: &[u8]| {
                        for &file_offset in &p.at {
                            let to = file_offset + at;
                            out.write_all_at(data, to)
                                .map_err(super::io("write the local copy of", &path))?;
                        }
                        Ok(())
                    });
                    let res = self
                        .read_chunks(pack, places, |p| &p.r, ctl, Arc::new(sink))
                        .await;
                    if res.is_err() {
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    res
                }
            })
            .buffer_unordered(io_concurrency())
            .collect::<Vec<Result<u64>>>()
            .await;
        let mut downloaded = 0;
        for r in results {
            downloaded += r.map_err(|e| in_file(e, &entry.path))?;
        }
        Ok(Fetched { bytes, downloaded })
    }
}

/// `e` with the file it happened in, for a corrupt chunk: the pack's name alone does not tell
/// an operator which file of the cache could not be served.
fn in_file(e: Error, path: &str) -> Error {
    match e {
        Error::Corrupt { location, why } => Error::Corrupt {
            location,
            why: format!("{why} (a chunk of file {path:?})"),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::engine::{CommitOptions, CommitOutcome, Store};

    /// Bytes that do not compress and hold no long run of zeros (so a hole in a copy shows).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    /// A store with one generation of a tree holding `files`, and that generation's entries.
    async fn committed(t: &Path, files: &[(&str, Vec<u8>)]) -> (Engine, Vec<Entry>) {
        let dir = t.join("tree");
        for (name, data) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        let store = Store::open(&format!("file://{}", t.join("store").display())).unwrap();
        let engine = Engine::new(store, "default", t.join("state")).unwrap();
        let report = engine
            .commit("k", &dir, &CommitOptions::default())
            .await
            .unwrap();
        let CommitOutcome::Committed { generation } = report.outcome else {
            panic!("{:?}", report.outcome)
        };
        let g = engine.load_generation("k", generation).await.unwrap();
        let entries = engine.load_entries(&g).await.unwrap();
        (engine, entries)
    }

    fn entry<'a>(entries: &'a [Entry], path: &str) -> &'a Entry {
        entries.iter().find(|e| e.path == path).unwrap()
    }

    fn sparse(path: &Path, len: u64) -> Arc<File> {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        f.set_len(len).unwrap();
        Arc::new(f)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetched_file_is_its_source() {
        let t = tempfile::tempdir().unwrap();
        let big = noise(1, 5 << 20);
        // The same 300 KB twice: one frame written at two offsets.
        let mut twice = noise(2, 300_000);
        twice.extend_from_within(..);
        let (engine, entries) = committed(
            t.path(),
            &[
                ("big.bin", big.clone()),
                ("twice.bin", twice.clone()),
                ("empty", Vec::new()),
            ],
        )
        .await;
        let e = entry(&entries, "big.bin");
        assert!(e.chunks.len() > 2, "{} chunks", e.chunks.len());
        let out = t.path().join("big.copy");
        let r = engine
            .fetch_file(e, None, sparse(&out, e.size))
            .await
            .unwrap();
        assert_eq!(r.bytes, big.len() as u64);
        assert!(r.downloaded > 0);
        assert_eq!(std::fs::read(&out).unwrap(), big);

        let e = entry(&entries, "empty");
        let out = t.path().join("empty.copy");
        let r = engine.fetch_file(e, None, sparse(&out, 0)).await.unwrap();
        assert_eq!(r, Fetched::default());

        // A range: only those chunks' bytes are written, the rest stays a hole.
        let e = entry(&entries, "big.bin");
        let out = t.path().join("part.copy");
        let r = engine
            .fetch_file(e, Some(1..2), sparse(&out, e.size))
            .await
            .unwrap();
        let from = e.chunks[0].n as usize;
        let to = from + e.chunks[1].n as usize;
        assert_eq!(r.bytes, (to - from) as u64);
        let got = std::fs::read(&out).unwrap();
        assert_eq!(&got[from..to], &big[from..to]);
        assert!(got[..from].iter().chain(&got[to..]).all(|b| *b == 0));

        let e = entry(&entries, "twice.bin");
        let out = t.path().join("twice.copy");
        engine
            .fetch_file(e, None, sparse(&out, e.size))
            .await
            .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), twice);
        // Out of range is refused, not clamped.
        assert!(engine
            .fetch_file(e, Some(0..e.chunks.len() + 1), sparse(&out, e.size))
            .await
            .is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_chunk_is_named_and_never_written() {
        let t = tempfile::tempdir().unwrap();
        let big = noise(3, 4 << 20);
        let (engine, entries) = committed(t.path(), &[("deep/big.bin", big.clone())]).await;
        let e = entry(&entries, "deep/big.bin").clone();
        assert!(e.chunks.len() > 2, "{} chunks", e.chunks.len());
        // One byte of the second chunk's frame flipped, in the pack file itself.
        let bad = &e.chunks[1];
        let pack = t
            .path()
            .join("store")
            .join(engine.layout.pack(&bad.p.to_hex()).as_ref());
        let mut data = std::fs::read(&pack).unwrap();
        data[(bad.o + bad.c as u64 / 2) as usize] ^= 0x55;
        std::fs::write(&pack, data).unwrap();

        let out = t.path().join("copy");
        let err = engine
            .fetch_file(&e, None, sparse(&out, e.size))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Corrupt { .. }), "{text}");
        assert!(text.contains(&bad.h.to_string()), "{text}");
        assert!(text.contains("deep/big.bin"), "{text}");
        // Every chunk's range holds its source bytes or nothing; the bad one holds nothing.
        let got = std::fs::read(&out).unwrap();
        let mut at = 0usize;
        for (i, r) in e.chunks.iter().enumerate() {
            let span = at..at + r.n as usize;
            let written = &got[span.clone()];
            if i == 1 {
                assert!(written.iter().all(|b| *b == 0), "chunk 1 was written");
            } else {
                assert!(
                    written == &big[span.clone()] || written.iter().all(|b| *b == 0),
                    "chunk {i} holds wrong bytes"
                );
            }
            at = span.end;
        }
    }
}

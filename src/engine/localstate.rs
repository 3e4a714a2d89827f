//! What was restored where: a record per cache directory, kept in the state dir (never inside
//! the cache dir), so a commit can find changes by `stat` alone and knows the generation it
//! started from. Written atomically: temp file, fsync, rename, fsync of the directory.
//!
//! A record is `CVSTATE` and a version byte (2), the header as JSON behind its little-endian
//! u32 length, then a zstd frame holding the tree in a compact binary form: the distinct pack
//! ids once, then per entry its path (as the length of the prefix shared with the previous
//! path and the rest), kind, mode, size, mtime, stat, link target and chunk refs (pack ids by
//! index). Reading it costs a fraction of parsing JSON with hex digests, which an unchanged
//! commit of a large tree would otherwise spend most of its time on. Version 1 records (zstd
//! JSON: header, stats and manifest lines) are still read.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{io, Result};
use super::format::{self, BaseRef, ChunkRef, Digest, Entry, Kind};

/// What `stat` said of a restored or committed file; equal stats mean unchanged content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub ino: u64,
    pub size: u64,
    pub mtime: i64,
    pub ctime: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Header {
    pub store: String,
    pub scope: String,
    pub dir: PathBuf,
    /// The generation the directory's content came from (or was committed as).
    pub base: Option<BaseRef>,
    /// The manifest chunks of that generation, reused when the manifest changes little.
    pub manifest: Vec<ChunkRef>,
}

/// The record of one directory: its header, the tree as last restored or committed, and the
/// stat of each file entry at that time (`None` for directories and symlinks).
pub struct DirState {
    pub header: Header,
    pub entries: Vec<Entry>,
    pub stats: Vec<Option<Stat>>,
}

fn record_path(state_dir: &Path, dir: &Path) -> PathBuf {
    let id = blake3::hash(dir.as_os_str().as_encoded_bytes()).to_hex();
    state_dir.join("dirs").join(format!("{}.state", &id[..32]))
}

fn marker_path(state_dir: &Path, dir: &Path) -> PathBuf {
    record_path(state_dir, dir).with_extension("restoring")
}

/// The canonical form of a cache dir, so `./x` and `/abs/x` share one record.
pub fn canonical(dir: &Path) -> Result<PathBuf> {
    Ok(std::fs::canonicalize(dir).map_err(io("resolve", dir))?)
}

impl DirState {
    /// Loads the record of `dir` if it was made for this store and scope.
    pub fn load(state_dir: &Path, dir: &Path, store: &str, scope: &str) -> Option<DirState> {
        let path = record_path(state_dir, dir);
        let data = std::fs::read(&path).ok()?;
        let parsed = Self::decode(&data);
        match parsed {
            Some(s)
                if s.header.store == store && s.header.scope == scope && s.header.dir == dir =>
            {
                Some(s)
            }
            Some(_) => None,
            None => {
                tracing::warn!(path = %path.display(), "ignoring unreadable state record");
                None
            }
        }
    }

    /// Only the header of the record of `dir`, if it was made for this store and scope: reads
    /// and decompresses just the first line, not the tree.
    pub fn load_header(state_dir: &Path, dir: &Path, store: &str, scope: &str) -> Option<Header> {
        Self::load_any_header(state_dir, dir)
            .filter(|h| h.store == store && h.scope == scope && h.dir == dir)
    }

    /// The header of the record of `dir`, whatever store and scope it was made for.
    pub fn load_any_header(state_dir: &Path, dir: &Path) -> Option<Header> {
        use std::io::{BufRead, Read};
        let mut f = std::fs::File::open(record_path(state_dir, dir)).ok()?;
        let mut start = [0u8; RECORD_MAGIC.len() + 4];
        f.read_exact(&mut start).ok()?;
        let h: Header = if let Some(len) = start.strip_prefix(RECORD_MAGIC) {
            let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
            if len > MAX_HEADER {
                return None;
            }
            let mut json = vec![0u8; len];
            f.read_exact(&mut json).ok()?;
            serde_json::from_slice(&json).ok()?
        } else {
            use std::io::Seek;
            f.rewind().ok()?;
            let mut r = std::io::BufReader::new(zstd::stream::read::Decoder::new(f).ok()?);
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).ok()?;
            serde_json::from_slice(&line).ok()?
        };
        Some(h)
    }

    fn decode(data: &[u8]) -> Option<DirState> {
        if let Some(rest) = data.strip_prefix(RECORD_MAGIC) {
            return decode_binary(rest);
        }
        Self::decode_json(data)
    }

    /// A version 1 record: zstd JSON lines (header, stats, then the entries as a manifest).
    fn decode_json(data: &[u8]) -> Option<DirState> {
        let raw = zstd::stream::decode_all(data).ok()?;
        let mut parts = raw.splitn(3, |b| *b == b'\n');
        let header: Header = serde_json::from_slice(parts.next()?).ok()?;
        let stats: Vec<Option<Stat>> = serde_json::from_slice(parts.next()?).ok()?;
        let entries = format::decode_entries("state record", parts.next()?).ok()?;
        (stats.len() == entries.len()).then_some(DirState {
            header,
            entries,
            stats,
        })
    }

    pub fn remove(state_dir: &Path, dir: &Path) {
        let _ = std::fs::remove_file(record_path(state_dir, dir));
        let _ = std::fs::remove_file(marker_path(state_dir, dir));
    }

    /// Marks `dir` as being restored: until the new record is saved, its content is neither the
    /// old tree nor the new one. Survives a crash; `save` and `remove` clear it.
    pub fn begin_restore(state_dir: &Path, dir: &Path) -> Result<()> {
        write_atomic(
            &marker_path(state_dir, dir),
            dir.as_os_str().as_encoded_bytes(),
        )
    }

    /// Clears the mark of a restore that ended before touching the directory.
    pub fn end_restore(state_dir: &Path, dir: &Path) {
        let _ = std::fs::remove_file(marker_path(state_dir, dir));
    }

    /// Whether a restore into `dir` started and never finished.
    pub fn restore_interrupted(state_dir: &Path, dir: &Path) -> bool {
        marker_path(state_dir, dir).exists()
    }

    pub fn save(&self, state_dir: &Path) -> Result<()> {
        let path = record_path(state_dir, &self.header.dir);
        write_atomic(&path, &self.encode())?;
        let _ = std::fs::remove_file(marker_path(state_dir, &self.header.dir));
        Ok(())
    }
}

const RECORD_MAGIC: &[u8; 8] = b"CVSTATE\x02";
/// A header holds a few manifest chunk refs; anything near this is no header.
const MAX_HEADER: usize = 16 << 20;
const KIND_FILE: u8 = 0;
const KIND_DIR: u8 = 1;
const KIND_SYMLINK: u8 = 2;
const HAS_STAT: u8 = 1;
const HAS_TARGET: u8 = 2;

impl DirState {
    fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).expect("header serializes");
        let mut out = Vec::with_capacity(RECORD_MAGIC.len() + 4 + header.len());
        out.extend_from_slice(RECORD_MAGIC);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);

        let mut packs: HashMap<Digest, u32> = HashMap::new();
        let mut pack_list: Vec<Digest> = Vec::new();
        for c in self.entries.iter().flat_map(|e| &e.chunks) {
            packs.entry(c.p).or_insert_with(|| {
                pack_list.push(c.p);
                pack_list.len() as u32 - 1
            });
        }
        let mut raw = Vec::with_capacity(self.entries.len() * 100 + pack_list.len() * 32);
        raw.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        raw.extend_from_slice(&(pack_list.len() as u32).to_le_bytes());
        for p in &pack_list {
            raw.extend_from_slice(&p.0);
        }
        let mut prev: &[u8] = &[];
        for (e, st) in self.entries.iter().zip(&self.stats) {
            let path = e.path.as_bytes();
            let mut shared = prev
                .iter()
                .zip(path)
                .take(u16::MAX as usize)
                .take_while(|(a, b)| a == b)
                .count();
            // Both parts must stay UTF-8: never split a character ("é" and "ê" share a byte).
            while !e.path.is_char_boundary(shared) {
                shared -= 1;
            }
            let rest = &path[shared..];
            raw.extend_from_slice(&(shared as u16).to_le_bytes());
            raw.extend_from_slice(&(rest.len() as u32).to_le_bytes());
            raw.extend_from_slice(rest);
            prev = path;
            raw.push(match e.kind {
                Kind::File => KIND_FILE,
                Kind::Dir => KIND_DIR,
                Kind::Symlink => KIND_SYMLINK,
            });
            let flags = if st.is_some() { HAS_STAT } else { 0 }
                | if e.target.is_some() { HAS_TARGET } else { 0 };
            raw.push(flags);
            raw.extend_from_slice(&e.mode.to_le_bytes());
            raw.extend_from_slice(&e.size.to_le_bytes());
            raw.extend_from_slice(&e.mtime.to_le_bytes());
            if let Some(st) = st {
                raw.extend_from_slice(&st.ino.to_le_bytes());
                raw.extend_from_slice(&st.size.to_le_bytes());
                raw.extend_from_slice(&st.mtime.to_le_bytes());
                raw.extend_from_slice(&st.ctime.to_le_bytes());
            }
            if let Some(t) = &e.target {
                raw.extend_from_slice(&(t.len() as u32).to_le_bytes());
                raw.extend_from_slice(t.as_bytes());
            }
            raw.extend_from_slice(&(e.chunks.len() as u32).to_le_bytes());
            for c in &e.chunks {
                raw.extend_from_slice(&c.h.0);
                raw.extend_from_slice(&packs[&c.p].to_le_bytes());
                raw.extend_from_slice(&c.o.to_le_bytes());
                raw.extend_from_slice(&c.c.to_le_bytes());
                raw.extend_from_slice(&c.n.to_le_bytes());
            }
        }
        out.extend_from_slice(&zstd::bulk::compress(&raw, 1).expect("zstd compresses in memory"));
        out
    }
}

/// Reads a version 2 record after its magic. Every length is checked against what is left, so
/// a damaged record is refused (`None`), never trusted; the tree is validated like a manifest.
fn decode_binary(data: &[u8]) -> Option<DirState> {
    let mut r = Reader(data);
    let len = r.u32()? as usize;
    if len > MAX_HEADER {
        return None;
    }
    let header: Header = serde_json::from_slice(r.take(len)?).ok()?;
    let raw = zstd::stream::decode_all(r.0).ok()?;
    let mut r = Reader(&raw);
    let n = r.u64()?;
    // Each entry takes at least 27 bytes: refuse counts the data cannot hold before allocating.
    if n > (raw.len() / 27) as u64 {
        return None;
    }
    let n = n as usize;
    let npacks = r.u32()? as usize;
    let packs: Vec<Digest> = (0..npacks).map(|_| r.digest()).collect::<Option<_>>()?;
    let mut entries: Vec<Entry> = Vec::with_capacity(n);
    let mut stats: Vec<Option<Stat>> = Vec::with_capacity(n);
    for _ in 0..n {
        let shared = r.u16()? as usize;
        let rest_len = r.u32()? as usize;
        let rest = r.take(rest_len)?;
        let prev = entries.last().map_or("", |e: &Entry| e.path.as_str());
        let mut path = String::with_capacity(shared + rest.len());
        path.push_str(prev.get(..shared)?);
        path.push_str(std::str::from_utf8(rest).ok()?);
        let kind = match r.u8()? {
            KIND_FILE => Kind::File,
            KIND_DIR => Kind::Dir,
            KIND_SYMLINK => Kind::Symlink,
            _ => return None,
        };
        let flags = r.u8()?;
        let mode = r.u32()?;
        let size = r.u64()?;
        let mtime = r.i64()?;
        let stat = if flags & HAS_STAT != 0 {
            Some(Stat {
                ino: r.u64()?,
                size: r.u64()?,
                mtime: r.i64()?,
                ctime: r.i64()?,
            })
        } else {
            None
        };
        let target = if flags & HAS_TARGET != 0 {
            let len = r.u32()? as usize;
            Some(std::str::from_utf8(r.take(len)?).ok()?.to_string())
        } else {
            None
        };
        let nchunks = r.u32()? as usize;
        // 52 bytes a chunk ref.
        if nchunks > r.0.len() / 52 {
            return None;
        }
        let mut chunks = Vec::with_capacity(nchunks);
        for _ in 0..nchunks {
            let h = r.digest()?;
            let p = *packs.get(r.u32()? as usize)?;
            chunks.push(ChunkRef {
                h,
                p,
                o: r.u64()?,
                c: r.u32()?,
                n: r.u32()?,
            });
        }
        entries.push(Entry {
            path,
            kind,
            mode,
            size,
            mtime,
            target,
            chunks,
        });
        stats.push(stat);
    }
    if !r.0.is_empty() {
        return None;
    }
    format::validate_tree("state record", &mut entries).ok()?;
    Some(DirState {
        header,
        entries,
        stats,
    })
}

/// Little-endian fields off the front of a byte slice; `None` when too few bytes are left.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.array()?))
    }
    fn digest(&mut self) -> Option<Digest> {
        Some(Digest(self.array()?))
    }
}

/// Writes a file so that a crash leaves either the old or the new content, never a mix.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().expect("state files live in a directory");
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(data).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io("rename", path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o755,
            size: 0,
            mtime: 7,
            target: None,
            chunks: vec![],
        }
    }

    fn sample() -> DirState {
        let chunk = |h: u8, p: u8, n: u32| ChunkRef {
            h: Digest([h; 32]),
            p: Digest([p; 32]),
            o: 8 + h as u64,
            c: 3,
            n,
        };
        let mut file = entry("a/b.rs", Kind::File);
        file.size = 30;
        file.chunks = vec![chunk(1, 9, 10), chunk(2, 8, 20)];
        let mut other = entry("a/c", Kind::File);
        other.size = 5;
        other.mode = 0o1644;
        other.chunks = vec![chunk(3, 9, 5)];
        let mut link = entry("a/d", Kind::Symlink);
        link.target = Some("b.rs".into());
        link.mtime = -3;
        let empty = entry("é", Kind::File);
        let next = entry("ê", Kind::File);
        let stat = |ino: u64, size: u64| Stat {
            ino,
            size,
            mtime: 1,
            ctime: i64::MAX,
        };
        DirState {
            header: Header {
                store: "file:///s".into(),
                scope: "default".into(),
                dir: "/x".into(),
                base: Some(BaseRef {
                    key: "k".into(),
                    generation: 4,
                }),
                manifest: vec![chunk(5, 8, 100)],
            },
            entries: vec![entry("a", Kind::Dir), file, other, link, empty, next],
            stats: vec![None, Some(stat(1, 30)), Some(stat(2, 5)), None, None, None],
        }
    }

    fn same(a: &DirState, b: &DirState) {
        assert_eq!(a.entries, b.entries);
        assert_eq!(a.stats, b.stats);
        assert_eq!(a.header.base, b.header.base);
        assert_eq!(a.header.manifest, b.header.manifest);
        assert_eq!(
            (&a.header.store, &a.header.scope, &a.header.dir),
            (&b.header.store, &b.header.scope, &b.header.dir)
        );
    }

    #[test]
    fn binary_record_round_trips() {
        let s = sample();
        let data = s.encode();
        assert!(data.starts_with(RECORD_MAGIC));
        same(&DirState::decode(&data).expect("decodes"), &s);
    }

    #[test]
    fn json_records_are_still_read() {
        let s = sample();
        let mut raw = serde_json::to_vec(&s.header).unwrap();
        raw.push(b'\n');
        serde_json::to_writer(&mut raw, &s.stats).unwrap();
        raw.push(b'\n');
        raw.extend_from_slice(&format::encode_entries(&s.entries));
        let data = zstd::bulk::compress(&raw, 1).unwrap();
        same(&DirState::decode(&data).expect("decodes"), &s);

        let dir = std::env::temp_dir().join(format!("cachevol-ls-{}", std::process::id()));
        let path = record_path(&dir, &s.header.dir);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &data).unwrap();
        let h = DirState::load_header(&dir, &s.header.dir, "file:///s", "default").unwrap();
        assert_eq!(h.base, s.header.base);
        s.save(&dir).unwrap();
        let h = DirState::load_header(&dir, &s.header.dir, "file:///s", "default").unwrap();
        assert_eq!(h.manifest, s.header.manifest);
        assert!(DirState::load_header(&dir, &s.header.dir, "file:///s", "other").is_none());
        let loaded = DirState::load(&dir, &s.header.dir, "file:///s", "default").unwrap();
        same(&loaded, &s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn damaged_binary_records_are_refused() {
        let data = sample().encode();
        for cut in [9, 12, 40, data.len() - 1] {
            assert!(DirState::decode(&data[..cut]).is_none(), "cut at {cut}");
        }
        // A tree that is no valid tree (a path through a symlink) is refused too.
        let mut s = sample();
        s.entries[3].path = "a/c0".into();
        s.entries[4].path = "a/c0/x".into();
        assert!(DirState::decode(&s.encode()).is_none());
    }
}

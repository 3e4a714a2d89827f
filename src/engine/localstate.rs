//! What was restored where: a record per cache directory, kept in the state dir (never inside
//! the cache dir), so a commit can find changes by `stat` alone and knows the generation it
//! started from. Written atomically: temp file, fsync, rename, fsync of the directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::format::{self, BaseRef, ChunkRef, Entry};

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
    std::fs::canonicalize(dir).map_err(Error::io("resolve", dir))
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
        use std::io::BufRead;
        let f = std::fs::File::open(record_path(state_dir, dir)).ok()?;
        let mut r = std::io::BufReader::new(zstd::stream::read::Decoder::new(f).ok()?);
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).ok()?;
        let h: Header = serde_json::from_slice(&line).ok()?;
        (h.store == store && h.scope == scope && h.dir == dir).then_some(h)
    }

    fn decode(data: &[u8]) -> Option<DirState> {
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
        let mut raw = serde_json::to_vec(&self.header).expect("header serializes");
        raw.push(b'\n');
        serde_json::to_writer(&mut raw, &self.stats).expect("stats serialize");
        raw.push(b'\n');
        raw.extend_from_slice(&format::encode_entries(&self.entries));
        let data = zstd::bulk::compress(&raw, 1).expect("zstd compresses in memory");
        write_atomic(&path, &data)?;
        let _ = std::fs::remove_file(marker_path(state_dir, &self.header.dir));
        Ok(())
    }
}

/// Writes a file so that a crash leaves either the old or the new content, never a mix.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().expect("state files live in a directory");
    std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(Error::io("create", &tmp))?;
    f.write_all(data).map_err(Error::io("write", &tmp))?;
    f.sync_all().map_err(Error::io("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(Error::io("rename", path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

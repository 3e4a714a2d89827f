//! The on-store format, version 2 (and the version 1 it still reads): chunk digests, packs,
//! manifests and generation objects, their encodings, and the validation every one of them
//! passes on read. Anything here that a newer cachevol changes must bump `FORMAT_VERSION` and
//! keep reading the older versions.
//!
//! - A **pack** is `CVPACK01` followed by zstd frames, one per chunk, back to back. Chunk refs
//!   name the pack, the frame's offset and length, and the chunk's BLAKE3 digest and raw length;
//!   every chunk is verified against its digest after decompression.
//! - A **manifest** is the list of entries of one tree. Since version 2 it is a sequence of
//!   binary *pages* in directory order, each page one chunk in a pack, cut where the content
//!   says ([`super::pages`]): a small change to a large tree uploads only the pages around the
//!   change, and a reader can fetch the pages of one directory alone. In version 1 it was one
//!   JSON object per line, sorted by path, content-defined-chunked into packs; a generation of
//!   version 1 is still read.
//! - A **generation object** is `CVGEN\0\0\0`, a little-endian u32 format version, the BLAKE3
//!   digest of the body, then the zstd-compressed JSON body: provenance, totals, the refs of
//!   the manifest's chunks and, since version 2, the page table (each page's entry count and
//!   first path). A generation without pages (an empty tree) is written as version 1, which
//!   every cachevol reads. It is created with a create-only put at a name that depends only on
//!   the key and the generation number, so two writers of one generation collide.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::pages::{self, PageInfo};

pub const FORMAT_VERSION: u32 = 2;
pub const PACK_MAGIC: &[u8; 8] = b"CVPACK01";
pub const GEN_MAGIC: &[u8; 8] = b"CVGEN\0\0\0";
/// Refuse absurd inputs before allocating for them.
pub const MAX_CHUNK_LEN: u32 = 64 << 20;
pub const MAX_GENERATION_OBJECT: usize = 64 << 20;
/// The largest generation number cachevol writes or follows (19 nines: every number fits the
/// 20-digit object name, and the next one can always be computed). A store object with a larger
/// number blocks its key: it is an invalid snapshot until `wipe` or `rollback` removes it.
pub const MAX_GENERATION: u64 = 9_999_999_999_999_999_999;
/// The longest manifest stream a version 1 generation may declare (about 130,000 entries): that
/// manifest is held and parsed in memory as one piece, so this bounds a restore's memory whatever
/// a generation claims. Version 2 bounds each page instead ([`super::pages::MAX_PAGE_LEN`]).
pub const MAX_MANIFEST_LEN: u64 = 32 << 20;
/// The most entries a generation (version 2) may declare: a restore holds every entry in memory
/// (about 200 bytes each), so this bounds its memory whatever the pages claim. Commit refuses a
/// larger tree.
pub const MAX_ENTRIES: u64 = 2 << 20;
/// Chunks longer than this (raw or compressed) are never held whole in memory: they are streamed
/// from the store, decompressed in small blocks and verified before anything is written. Commit
/// writes chunks of at most 2 MiB, so only hostile or foreign snapshots take this path.
pub const STREAM_CHUNK_OVER: u32 = 4 << 20;
/// The largest zstd window a streamed chunk may ask for (8 MiB): a frame's header could ask the
/// decoder for gigabytes. cachevol compresses at level 3 (a 2 MiB window at most).
const STREAM_WINDOW_LOG: u32 = 23;
/// Memory a streamed chunk needs at most: the decoder's window and its buffers.
pub const STREAM_CHUNK_COST: u64 = (1 << STREAM_WINDOW_LOG) + (2 << 20);
/// The longest path of an entry (Linux PATH_MAX, counting the terminating NUL) and the longest
/// name in it (NAME_MAX): longer ones could never be restored.
pub const MAX_PATH_LEN: usize = 4095;
pub const MAX_NAME_LEN: usize = 255;

/// A BLAKE3 digest, written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(data: &[u8]) -> Digest {
        Digest(*blake3::hash(data).as_bytes())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Option<Digest> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Digest(out))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut buf = [0u8; 64];
        hex::encode_to_slice(self.0, &mut buf).expect("64 bytes");
        s.serialize_str(std::str::from_utf8(&buf).expect("hex is ascii"))
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Digest;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("64 hex digits")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Digest, E> {
                Digest::from_hex(v).ok_or_else(|| E::custom("a digest must be 64 hex digits"))
            }
        }
        d.deserialize_str(V)
    }
}

/// Where one chunk lives: the pack, the byte range of its zstd frame, and what it must hash to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// BLAKE3 of the raw chunk.
    pub h: Digest,
    /// The pack's id (BLAKE3 of the whole pack object).
    pub p: Digest,
    /// Offset of the compressed frame in the pack.
    pub o: u64,
    /// Compressed length.
    pub c: u32,
    /// Raw length.
    pub n: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// One entry of a tree. Paths are relative, `/`-separated, UTF-8, without `.` or `..`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    /// Permission bits; setuid and setgid are never stored or restored.
    pub mode: u32,
    #[serde(default)]
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkRef>,
}

/// The mode bits cachevol keeps: permissions and the sticky bit; never setuid or setgid.
pub const MODE_MASK: u32 = 0o1777;

/// `mode` made usable by its group, as the node does for a pod's fsGroup: directories get group
/// rwx, files group rw, and x where the owner has it. Symbolic links have no mode of their own.
pub fn widen_for_group(mode: u32, kind: Kind) -> u32 {
    match kind {
        Kind::Dir => mode | 0o070,
        Kind::File if mode & 0o100 != 0 => mode | 0o070,
        Kind::File => mode | 0o060,
        Kind::Symlink => mode,
    }
}

impl Entry {
    /// Whether `other` is the same content and metadata (chunk locations may differ).
    pub fn same_content(&self, other: &Entry) -> bool {
        self.path == other.path
            && self.kind == other.kind
            && self.mode == other.mode
            && self.size == other.size
            && self.target == other.target
            && (self.kind == Kind::Dir || self.mtime == other.mtime)
            && self.chunks.len() == other.chunks.len()
            && self
                .chunks
                .iter()
                .zip(&other.chunks)
                .all(|(a, b)| a.h == b.h && a.n == b.n)
    }
}

/// Who wrote a generation, from what, and what it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// Unix seconds.
    pub time: i64,
    /// Free text: a pod, a host, a user.
    pub writer: String,
    /// The generation this tree was restored from, if any (possibly of another key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    pub key: String,
    pub generation: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Sum of file sizes.
    pub bytes: u64,
}

impl Totals {
    pub fn of(entries: &[Entry]) -> Totals {
        let mut t = Totals::default();
        for e in entries {
            match e.kind {
                Kind::File => {
                    t.files += 1;
                    t.bytes += e.size;
                }
                Kind::Dir => t.dirs += 1,
                Kind::Symlink => t.symlinks += 1,
            }
        }
        t
    }
}

/// The body of a generation object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub key: String,
    pub generation: u64,
    pub provenance: Provenance,
    pub totals: Totals,
    /// Version 1: BLAKE3 of the whole manifest stream. Version 2: BLAKE3 of the pages' digests,
    /// in order (32 bytes each), so that the page table is checked without fetching a page.
    pub manifest_hash: Digest,
    /// The manifest's raw length (the sum of its chunks' raw lengths).
    pub manifest_len: u64,
    /// The manifest's chunks, in order: the stream's in version 1, one page each in version 2.
    pub manifest: Vec<ChunkRef>,
    /// Version 2: one per chunk of `manifest`, sorted in directory order by first path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pages: Vec<PageInfo>,
}

impl Generation {
    /// The format version this generation is written in: 2 when its manifest is paged, 1 for
    /// the JSON manifest of older generations and for an empty tree (no manifest at all).
    pub fn version(&self) -> u32 {
        if self.pages.is_empty() {
            1
        } else {
            FORMAT_VERSION
        }
    }

    /// `manifest_hash` of a version 2 generation: the digest of its pages' digests.
    pub fn pages_hash(manifest: &[ChunkRef]) -> Digest {
        let mut h = blake3::Hasher::new();
        for r in manifest {
            h.update(&r.h.0);
        }
        Digest(*h.finalize().as_bytes())
    }

    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("generation serializes");
        let body = zstd::bulk::compress(&json, 3).expect("zstd compresses in memory");
        let mut out = Vec::with_capacity(body.len() + 44);
        out.extend_from_slice(GEN_MAGIC);
        out.extend_from_slice(&self.version().to_le_bytes());
        out.extend_from_slice(&Digest::of(&body).0);
        out.extend_from_slice(&body);
        out
    }

    /// Decodes and checks a generation object read from `location`.
    pub fn decode(location: &str, data: &[u8]) -> Result<Generation> {
        let bad = |why: &str| Error::corrupt(location, why);
        if data.len() < 44 || &data[..8] != GEN_MAGIC {
            return Err(bad("not a cachevol generation object (bad magic)"));
        }
        let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
        if !(1..=FORMAT_VERSION).contains(&version) {
            return Err(Error::UnsupportedVersion {
                location: location.to_string(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let body = &data[44..];
        if Digest::of(body).0[..] != data[12..44] {
            return Err(bad(
                "generation object does not match its digest (truncated or altered)",
            ));
        }
        let json = zstd::bulk::decompress(body, MAX_GENERATION_OBJECT)
            .map_err(|e| bad(&format!("generation body does not decompress: {e}")))?;
        let g: Generation = serde_json::from_slice(&json)
            .map_err(|e| bad(&format!("generation body is not valid: {e}")))?;
        if g.version() != version {
            return Err(bad(&format!(
                "a version {version} generation {} a page table",
                if version == 1 { "with" } else { "without" }
            )));
        }
        if version == 1 && g.manifest_len > MAX_MANIFEST_LEN {
            return Err(bad(&format!(
                "manifest of {} bytes is over the format's limit of {MAX_MANIFEST_LEN} bytes",
                g.manifest_len
            )));
        }
        if version >= 2 {
            check_page_table(location, &g)?;
        }
        if g.manifest.iter().map(|c| c.n as u64).sum::<u64>() != g.manifest_len {
            return Err(bad(
                "manifest chunk lengths do not add up to the manifest length",
            ));
        }
        for c in &g.manifest {
            check_chunk_ref(location, c)?;
        }
        Ok(g)
    }
}

/// Checks a version 2 generation's page table against its manifest before any page is fetched:
/// one page per chunk, each within the page limits, the entries within [`MAX_ENTRIES`], first
/// paths valid and in directory order, and the pages' digest.
fn check_page_table(location: &str, g: &Generation) -> Result<()> {
    let bad = |why: String| Error::corrupt(location, why);
    if g.pages.len() != g.manifest.len() {
        return Err(bad(format!(
            "{} manifest pages but {} manifest chunks",
            g.pages.len(),
            g.manifest.len()
        )));
    }
    let mut total = 0u64;
    for (i, (p, r)) in g.pages.iter().zip(&g.manifest).enumerate() {
        if p.n == 0 || p.n > pages::MAX_PAGE_ENTRIES || r.n > pages::MAX_PAGE_LEN {
            return Err(bad(format!(
                "manifest page {i} declares {} entries in {} bytes, over the format's limits ({} entries, {} bytes)",
                p.n,
                r.n,
                pages::MAX_PAGE_ENTRIES,
                pages::MAX_PAGE_LEN
            )));
        }
        check_path(&p.first).map_err(|w| bad(format!("manifest page {i}: {w}")))?;
        if i > 0 && pages::dir_cmp(&g.pages[i - 1].first, &p.first) != std::cmp::Ordering::Less {
            return Err(bad(format!("manifest page {i} is out of order")));
        }
        total += p.n as u64;
    }
    if total > MAX_ENTRIES {
        return Err(bad(format!(
            "{total} entries, over the format's limit of {MAX_ENTRIES}"
        )));
    }
    let t = &g.totals;
    if t.files
        .checked_add(t.dirs)
        .and_then(|n| n.checked_add(t.symlinks))
        != Some(total)
    {
        return Err(bad(format!(
            "manifest pages hold {total} entries but the generation's totals count {} files, {} directories and {} symlinks",
            t.files, t.dirs, t.symlinks
        )));
    }
    if Generation::pages_hash(&g.manifest) != g.manifest_hash {
        return Err(bad(
            "manifest pages do not match the manifest's digest".into()
        ));
    }
    Ok(())
}

/// The head hint: names the newest generation of a key. Never trusted over the generations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub generation: u64,
    pub time: i64,
}

/// The longest zstd frame a chunk of `n` raw bytes can have (zstd's compress bound).
pub fn max_frame_len(n: u32) -> u64 {
    zstd::zstd_safe::compress_bound(n as usize) as u64
}

/// Checks a chunk ref's declared sizes against the format's limits before anything is allocated
/// or read for it: raw length within [`MAX_CHUNK_LEN`], a frame no longer than zstd can make of
/// that raw length, and a frame that lies in a pack a file system or a store can address.
fn check_chunk_ref(location: &str, c: &ChunkRef) -> Result<()> {
    let end = c.o.checked_add(c.c as u64);
    if c.n == 0
        || c.n > MAX_CHUNK_LEN
        || c.c == 0
        || c.c as u64 > max_frame_len(c.n)
        || c.o < PACK_MAGIC.len() as u64
        || end.is_none_or(|end| end > i64::MAX as u64)
    {
        return Err(Error::corrupt(
            location,
            format!("chunk {:?} has an impossible location or size", c.h),
        ));
    }
    Ok(())
}

/// Serializes entries (already sorted by path) as the manifest stream.
pub fn encode_entries(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 160);
    for e in entries {
        serde_json::to_writer(&mut out, e).expect("entry serializes");
        out.push(b'\n');
    }
    out
}

/// Parses a manifest stream and validates the tree it describes: every path relative and
/// normal, sorted and unique, every parent a directory of the tree (never a symlink, so no entry
/// is reached through a link), sizes consistent with chunks, no special files, no setuid/setgid.
pub fn decode_entries(location: &str, stream: &[u8]) -> Result<Vec<Entry>> {
    // A manifest of a big tree is megabytes of JSON: its lines are parsed on every core, in
    // parts that each start at a line.
    let lines: Vec<&[u8]> = stream.split(|b| *b == b'\n').collect();
    let parts = super::par::map_parts(&lines, |part, first| {
        let mut entries = Vec::with_capacity(part.len());
        for (i, line) in part.iter().enumerate() {
            if line.is_empty() {
                continue;
            }
            let e: Entry = serde_json::from_slice(line).map_err(|e| {
                Error::corrupt(location, format!("manifest line {}: {e}", first + i + 1))
            })?;
            entries.push(e);
        }
        Ok::<_, Error>(entries)
    });
    let mut entries = Vec::with_capacity(lines.len());
    for part in parts {
        entries.extend(part?);
    }
    validate_tree(location, &mut entries)?;
    Ok(entries)
}

/// Checks one path: relative, `/`-separated, no empty, `.` or `..` components, no NUL.
pub fn check_path(path: &str) -> std::result::Result<(), &'static str> {
    if path.is_empty() {
        return Err("empty path");
    }
    if path.starts_with('/') {
        return Err("absolute path");
    }
    if path.contains('\0') {
        return Err("NUL in path");
    }
    if path.len() > MAX_PATH_LEN {
        return Err("path longer than PATH_MAX (4095 bytes)");
    }
    for part in path.split('/') {
        match part {
            "" => return Err("empty path component"),
            "." | ".." => return Err("'.' or '..' in path"),
            _ if part.len() > MAX_NAME_LEN => return Err("a name longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

pub fn validate_tree(location: &str, entries: &mut [Entry]) -> Result<()> {
    let mut dirs: HashSet<&str> = HashSet::new();
    let mut prev: Option<&str> = None;
    for e in entries.iter_mut() {
        e.mode &= MODE_MASK;
    }
    for e in entries.iter() {
        let bad = |why: String| Error::corrupt(location, format!("entry {:?}: {why}", e.path));
        check_path(&e.path).map_err(|w| bad(w.to_string()))?;
        if let Some(p) = prev {
            if p >= e.path.as_str() {
                return Err(bad("entries are not sorted or not unique".into()));
            }
        }
        prev = Some(&e.path);
        if let Some((parent, _)) = e.path.rsplit_once('/') {
            if !dirs.contains(parent) {
                return Err(bad(format!(
                    "its parent {parent:?} is not a directory of the snapshot (a path through a symlink or a missing directory)"
                )));
            }
        }
        match e.kind {
            Kind::Dir => {
                if e.size != 0 || !e.chunks.is_empty() || e.target.is_some() {
                    return Err(bad("a directory with content".into()));
                }
                dirs.insert(&e.path);
            }
            Kind::Symlink => {
                let t = e.target.as_deref().unwrap_or("");
                if t.is_empty()
                    || t.len() > MAX_PATH_LEN
                    || t.contains('\0')
                    || !e.chunks.is_empty()
                {
                    return Err(bad("a symlink without a valid target".into()));
                }
            }
            Kind::File => {
                if e.target.is_some() {
                    return Err(bad("a file with a link target".into()));
                }
                let sum: u64 = e.chunks.iter().map(|c| c.n as u64).sum();
                if sum != e.size {
                    return Err(bad(format!(
                        "size {} but its chunks hold {sum} bytes",
                        e.size
                    )));
                }
                for c in &e.chunks {
                    check_chunk_ref(location, c)?;
                }
            }
        }
    }
    Ok(())
}

/// Appends chunks to a pack being built.
pub struct PackBuilder {
    buf: Vec<u8>,
    chunks: Vec<(Digest, u64, u32, u32)>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PackBuilder {
    pub fn new() -> PackBuilder {
        let mut buf = Vec::with_capacity(9 << 20);
        buf.extend_from_slice(PACK_MAGIC);
        // A salt no chunk refers to: two packs are never one object, so a commit never finds a
        // pack it built already in the store (where GC may be about to delete it).
        buf.extend_from_slice(&Digest::of(super::protect::unique_id().as_bytes()).0[..16]);
        PackBuilder {
            buf,
            chunks: Vec::new(),
        }
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
    /// Adds an already compressed chunk.
    pub fn push(&mut self, digest: Digest, raw_len: u32, compressed: &[u8]) {
        let offset = self.buf.len() as u64;
        self.buf.extend_from_slice(compressed);
        self.chunks
            .push((digest, offset, compressed.len() as u32, raw_len));
    }
    /// The pack's bytes, its id, and a ref for each chunk in it.
    pub fn finish(self) -> (Digest, Vec<u8>, Vec<ChunkRef>) {
        let id = Digest::of(&self.buf);
        let refs = self
            .chunks
            .into_iter()
            .map(|(h, o, c, n)| ChunkRef { h, p: id, o, c, n })
            .collect();
        (id, self.buf, refs)
    }
}

thread_local! {
    // Contexts are reused per thread: creating one per chunk costs more than a small chunk.
    static DECOMPRESSOR: std::cell::RefCell<zstd::bulk::Decompressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().expect("zstd context"));
    static COMPRESSOR: std::cell::RefCell<zstd::bulk::Compressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(3).expect("zstd context"));
}

/// Decompresses one chunk's frame and checks it against its ref.
pub fn open_chunk(location: &str, r: &ChunkRef, frame: &[u8]) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    open_chunk_into(location, r, frame, &mut raw)?;
    Ok(raw)
}

/// [`open_chunk`] into a buffer the caller reuses: a restore decompresses hundreds of megabytes,
/// and fresh buffers for each chunk cost page faults. The buffer never grows past the chunk's
/// declared length: a frame that decompresses to more is refused.
pub fn open_chunk_into(
    location: &str,
    r: &ChunkRef,
    frame: &[u8],
    raw: &mut Vec<u8>,
) -> Result<()> {
    raw.clear();
    raw.reserve(r.n as usize);
    DECOMPRESSOR
        .with(|d| d.borrow_mut().decompress_to_buffer(frame, raw))
        .map_err(|e| {
            Error::corrupt(
                location,
                format!("chunk {} at offset {} does not decompress: {e}", r.h, r.o),
            )
        })?;
    verify_chunk(location, r, raw.len() as u64, &Digest::of(raw))
}

/// The one place where a chunk's content is checked against its ref: `len` bytes that hash to
/// `digest` were decompressed from the frame `r` names.
pub fn verify_chunk(location: &str, r: &ChunkRef, len: u64, digest: &Digest) -> Result<()> {
    if len != r.n as u64 || *digest != r.h {
        return Err(Error::corrupt(
            location,
            format!("chunk {} at offset {} does not match its digest", r.h, r.o),
        ));
    }
    Ok(())
}

/// Decompresses one chunk's frame from `frame` in small blocks, handing each block and its
/// offset in the chunk to `sink`, then checks the whole against the ref ([`verify_chunk`]).
/// Memory stays at [`STREAM_CHUNK_COST`] whatever the frame declares; output past the declared
/// raw length is refused at once. `sink` sees unverified data: callers verify in a first pass
/// with a sink that keeps nothing, then write in a second.
pub fn stream_chunk(
    location: &str,
    r: &ChunkRef,
    frame: impl std::io::Read,
    mut sink: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    use std::io::Read;
    let bad = |e: std::io::Error| {
        Error::corrupt(
            location,
            format!("chunk {} at offset {} does not decompress: {e}", r.h, r.o),
        )
    };
    let mut dec = zstd::stream::read::Decoder::new(frame).map_err(bad)?;
    dec.window_log_max(STREAM_WINDOW_LOG).map_err(bad)?;
    let mut dec = dec.single_frame();
    let mut buf = vec![0u8; 1 << 20];
    let mut hasher = blake3::Hasher::new();
    let mut pos = 0u64;
    loop {
        let k = match dec.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(bad(e)),
        };
        if pos + k as u64 > r.n as u64 {
            return Err(Error::corrupt(
                location,
                format!(
                    "chunk {} at offset {} decompresses to more than its {} bytes",
                    r.h, r.o, r.n
                ),
            ));
        }
        hasher.update(&buf[..k]);
        sink(pos, &buf[..k])?;
        pos += k as u64;
    }
    verify_chunk(location, r, pos, &Digest(*hasher.finalize().as_bytes()))
}

/// Whether a chunk is too big to hold in memory and is streamed instead ([`stream_chunk`]).
pub fn is_streamed(r: &ChunkRef) -> bool {
    r.n > STREAM_CHUNK_OVER || r.c > STREAM_CHUNK_OVER
}

pub fn compress_chunk(raw: &[u8]) -> Vec<u8> {
    COMPRESSOR
        .with(|c| c.borrow_mut().compress(raw))
        .expect("zstd compresses in memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(p: &str) -> Entry {
        Entry {
            path: p.into(),
            kind: Kind::Dir,
            mode: 0o755,
            size: 0,
            mtime: 0,
            target: None,
            chunks: vec![],
        }
    }

    #[test]
    fn generation_round_trips_and_detects_tampering() {
        let g = Generation {
            key: "npm".into(),
            generation: 3,
            provenance: Provenance {
                time: 1,
                writer: "w".into(),
                base: None,
                note: None,
            },
            totals: Totals::default(),
            manifest_hash: Digest::of(b""),
            manifest_len: 0,
            manifest: vec![],
            pages: vec![],
        };
        let enc = g.encode();
        assert_eq!(Generation::decode("x", &enc).unwrap(), g);
        let mut bad = enc.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(Generation::decode("x", &bad).is_err());
        let mut newer = enc.clone();
        newer[8] = 3;
        let err = Generation::decode("x", &newer).unwrap_err().to_string();
        assert!(err.contains("format version 3"), "{err}");
        // A version 2 header on a generation without pages is refused, not read as JSON lines.
        let mut paged = enc.clone();
        paged[8] = 2;
        let err = Generation::decode("x", &paged).unwrap_err().to_string();
        assert!(err.contains("without a page table"), "{err}");
    }

    #[test]
    fn tree_validation_refuses_escapes() {
        let mut link = dir("a");
        link.kind = Kind::Symlink;
        link.target = Some("/etc".into());
        let cases: Vec<(Vec<Entry>, &str)> = vec![
            (vec![dir("/abs")], "absolute"),
            (vec![dir("a"), dir("a/../b")], "'..'"),
            (vec![link.clone(), dir("a/x")], "not a directory"),
            (vec![dir("b"), dir("a")], "sorted"),
            (vec![dir("x/y")], "not a directory"),
        ];
        for (mut entries, want) in cases {
            let err = validate_tree("m", &mut entries).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
        let mut ok = vec![dir("a"), dir("a/b"), link];
        ok[2].path = "b".into();
        validate_tree("m", &mut ok).unwrap();
    }

    #[test]
    fn unknown_kind_is_refused() {
        let line = br#"{"path":"dev","kind":"chardev","mode":420,"mtime":0}"#;
        let err = decode_entries("m", line).unwrap_err().to_string();
        assert!(err.contains("unknown variant"), "{err}");
    }

    #[test]
    fn setuid_is_stripped() {
        let mut e = vec![dir("a")];
        e[0].mode = 0o4755;
        validate_tree("m", &mut e).unwrap();
        assert_eq!(e[0].mode, 0o755);
    }
}

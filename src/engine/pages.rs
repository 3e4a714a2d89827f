//! Manifest pages (format version 2): a tree's entries in *directory order*, cut into pages of
//! a few hundred entries, each page one ordinary chunk in a pack.
//!
//! Directory order sorts an entry by its parent's path, then by its own name (bytes), so the
//! direct children of a directory are contiguous: a reader that wants one directory (the lazy
//! tree's lookup and readdir) finds its pages with a binary search on the generation's page
//! table and fetches only those. A full restore fetches every page, decodes each on its own, and
//! sorts the entries back into path order.
//!
//! A page is binary, about 70 bytes an entry (the JSON lines of version 1 took about 290): the
//! 32-byte chunk digests dominate, so a pack table per page replaces each chunk's 32-byte pack id
//! with a small index.
//!
//! ```text
//! page   = "CVPAGE01" packs groups
//! packs  = varint(count) count × pack id (32 B)
//! groups = varint(count) count × (bytes(parent path, "" for the root) varint(n) n × entry)
//! entry  = bytes(name) kind(u8: 0 file, 1 dir, 2 symlink) varint(mode) zigzag(mtime)
//!          file:    varint(size) varint(chunks) chunks × (digest 32 B, varint(pack index),
//!                   varint(offset), varint(compressed length), varint(raw length))
//!          symlink: bytes(target)
//! bytes  = varint(length) length bytes
//! ```
//!
//! Pages are cut where the content says, not at fixed counts: after an entry whose path hashes
//! to a value with its low 9 bits clear, once the page holds at least 64 entries (about 576
//! entries on average), and always at [`MAX_PAGE_ENTRIES`] entries or [`PAGE_SOFT_LEN`] bytes. An
//! insertion or deletion therefore changes only its own page (and at most its neighbour): the
//! other pages are byte for byte what the base generation stored, and are not uploaded again.

use std::cmp::Ordering;

use super::error::{Error, Result};
use super::format::{ChunkRef, Digest, Entry, Kind, MAX_PATH_LEN};

pub const PAGE_MAGIC: &[u8; 8] = b"CVPAGE01";
/// The most entries one page may hold: a hostile page costs at most this many entries of memory
/// before it is refused.
pub const MAX_PAGE_ENTRIES: u32 = 16_384;
/// The longest page a generation may declare (raw): pages are decoded whole, in memory, and a
/// chunk this size is still read in one piece (never streamed).
pub const MAX_PAGE_LEN: u32 = 4 << 20;
/// Commit cuts a page once it is this long, whatever the content says.
pub const PAGE_SOFT_LEN: usize = 1 << 20;
/// Content-defined cuts: at least this many entries in a page, then a cut after an entry whose
/// path hash has these low bits clear.
const PAGE_MIN_ENTRIES: usize = 64;
const PAGE_CUT_MASK: u64 = (1 << 9) - 1;

/// Where one page sits in its generation: how many entries it holds, and the path of its first
/// entry (in directory order, the page table is sorted by it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PageInfo {
    pub n: u32,
    pub first: String,
}

/// An entry's place in directory order: its parent's path ("" at the top) and its name.
pub fn dir_key(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

/// Directory order of two paths.
pub fn dir_cmp(a: &str, b: &str) -> Ordering {
    dir_key(a).cmp(&dir_key(b))
}

/// One page of entries, ready to be stored: its raw bytes and its place in the page table.
pub struct Page {
    pub raw: Vec<u8>,
    pub info: PageInfo,
}

/// Cuts `entries` (in any order; they are put in directory order here) into encoded pages.
/// Refuses an entry too large for any page (a file of hundreds of thousands of chunks).
pub fn encode_pages(entries: &[Entry]) -> std::result::Result<Vec<Page>, String> {
    let mut order: Vec<&Entry> = entries.iter().collect();
    order.sort_unstable_by(|a, b| dir_cmp(&a.path, &b.path));
    let mut pages = Vec::new();
    let mut start = 0;
    let mut raw_estimate = 0usize;
    for (i, e) in order.iter().enumerate() {
        raw_estimate += entry_len_estimate(e);
        let count = i + 1 - start;
        let cut = i + 1 == order.len()
            || count >= MAX_PAGE_ENTRIES as usize
            || raw_estimate >= PAGE_SOFT_LEN
            || (count >= PAGE_MIN_ENTRIES && path_hash(&e.path) & PAGE_CUT_MASK == 0);
        if cut {
            let page = encode_page(&order[start..=i]);
            if page.raw.len() > MAX_PAGE_LEN as usize {
                return Err(format!(
                    "the entry {:?} is too large for a manifest page ({} bytes, the format's limit is {MAX_PAGE_LEN})",
                    e.path,
                    page.raw.len()
                ));
            }
            pages.push(page);
            start = i + 1;
            raw_estimate = 0;
        }
    }
    Ok(pages)
}

fn path_hash(path: &str) -> u64 {
    let h = blake3::hash(path.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

fn entry_len_estimate(e: &Entry) -> usize {
    24 + e.path.len() + e.target.as_ref().map_or(0, |t| t.len()) + e.chunks.len() * 48
}

/// Encodes entries already in directory order as one page.
fn encode_page(entries: &[&Entry]) -> Page {
    let mut packs: Vec<Digest> = Vec::new();
    let mut pack_index = std::collections::HashMap::new();
    for r in entries.iter().flat_map(|e| &e.chunks) {
        pack_index.entry(r.p).or_insert_with(|| {
            packs.push(r.p);
            packs.len() - 1
        });
    }
    let mut out = Vec::with_capacity(64 + entries.len() * 80);
    out.extend_from_slice(PAGE_MAGIC);
    put_varint(&mut out, packs.len() as u64);
    for p in &packs {
        out.extend_from_slice(&p.0);
    }
    let mut groups: Vec<(&str, Vec<&Entry>)> = Vec::new();
    for e in entries {
        let (parent, _) = dir_key(&e.path);
        match groups.last_mut() {
            Some((p, g)) if *p == parent => g.push(e),
            _ => groups.push((parent, vec![e])),
        }
    }
    put_varint(&mut out, groups.len() as u64);
    for (parent, group) in &groups {
        put_bytes(&mut out, parent.as_bytes());
        put_varint(&mut out, group.len() as u64);
        for e in group {
            put_bytes(&mut out, dir_key(&e.path).1.as_bytes());
            out.push(match e.kind {
                Kind::File => 0,
                Kind::Dir => 1,
                Kind::Symlink => 2,
            });
            put_varint(&mut out, e.mode as u64);
            put_varint(&mut out, zigzag(e.mtime));
            match e.kind {
                Kind::File => {
                    put_varint(&mut out, e.size);
                    put_varint(&mut out, e.chunks.len() as u64);
                    for r in &e.chunks {
                        out.extend_from_slice(&r.h.0);
                        put_varint(&mut out, pack_index[&r.p] as u64);
                        put_varint(&mut out, r.o);
                        put_varint(&mut out, r.c as u64);
                        put_varint(&mut out, r.n as u64);
                    }
                }
                Kind::Dir => {}
                Kind::Symlink => put_bytes(&mut out, e.target.as_deref().unwrap_or("").as_bytes()),
            }
        }
    }
    Page {
        raw: out,
        info: PageInfo {
            n: entries.len() as u32,
            first: entries.first().map(|e| e.path.clone()).unwrap_or_default(),
        },
    }
}

/// Decodes one page and checks what can be checked inside it: the declared entry count, names
/// (one component each), directory order, pack indexes. The caller checks the tree as a whole
/// (parents, sizes, chunk refs: [`super::format::validate_tree`]). Memory is bounded by the
/// page's length: every length read is checked against the bytes left before it is used.
pub fn decode_page(location: &str, info: &PageInfo, raw: &[u8]) -> Result<Vec<Entry>> {
    let bad =
        |why: String| Error::corrupt(location, format!("manifest page {:?}: {why}", info.first));
    let mut r = Reader { buf: raw, at: 0 };
    if r.take(PAGE_MAGIC.len()).ok() != Some(&PAGE_MAGIC[..]) {
        return Err(bad("not a cachevol manifest page (bad magic)".into()));
    }
    let short = |_| bad("truncated".into());
    let npacks = r.varint().map_err(short)?;
    if npacks > (r.left() / 32) as u64 {
        return Err(bad(format!(
            "{npacks} packs in a page of {} bytes",
            raw.len()
        )));
    }
    let mut packs = Vec::with_capacity(npacks as usize);
    for _ in 0..npacks {
        packs.push(Digest(
            r.take(32).map_err(short)?.try_into().expect("32 bytes"),
        ));
    }
    let ngroups = r.varint().map_err(short)?;
    let mut entries: Vec<Entry> = Vec::with_capacity(info.n.min(MAX_PAGE_ENTRIES) as usize);
    for _ in 0..ngroups {
        let parent = r.string(MAX_PATH_LEN).map_err(|w| bad(w.into()))?;
        let n = r.varint().map_err(short)?;
        if n == 0 || entries.len() as u64 + n > info.n as u64 {
            return Err(bad(format!(
                "holds more entries than the {} it declares (or an empty group)",
                info.n
            )));
        }
        for _ in 0..n {
            let name = r
                .string(super::format::MAX_NAME_LEN)
                .map_err(|w| bad(w.into()))?;
            if name.is_empty() || name.contains('/') {
                return Err(bad(format!("the name {name:?} is not one path component")));
            }
            let path = if parent.is_empty() {
                name
            } else {
                format!("{parent}/{name}")
            };
            let kind = match r.byte().map_err(short)? {
                0 => Kind::File,
                1 => Kind::Dir,
                2 => Kind::Symlink,
                k => return Err(bad(format!("entry {path:?} has an unknown kind {k}"))),
            };
            let mode = u32::try_from(r.varint().map_err(short)?)
                .map_err(|_| bad(format!("entry {path:?} has an impossible mode")))?;
            let mtime = unzigzag(r.varint().map_err(short)?);
            let mut e = Entry {
                path,
                kind,
                mode,
                size: 0,
                mtime,
                target: None,
                chunks: Vec::new(),
            };
            match kind {
                Kind::File => {
                    e.size = r.varint().map_err(short)?;
                    let count = r.varint().map_err(short)?;
                    // A chunk takes at least 36 bytes: its digest and four varints.
                    if count > (r.left() / 36) as u64 {
                        return Err(bad(format!("entry {:?} claims {count} chunks", e.path)));
                    }
                    e.chunks.reserve(count as usize);
                    for _ in 0..count {
                        let h = Digest(r.take(32).map_err(short)?.try_into().expect("32 bytes"));
                        let pi = r.varint().map_err(short)?;
                        let p = *packs.get(pi as usize).ok_or_else(|| {
                            bad(format!(
                                "entry {:?} names pack {pi} of {}",
                                e.path,
                                packs.len()
                            ))
                        })?;
                        let o = r.varint().map_err(short)?;
                        let c = u32::try_from(r.varint().map_err(short)?);
                        let n = u32::try_from(r.varint().map_err(short)?);
                        let (Ok(c), Ok(n)) = (c, n) else {
                            return Err(bad(format!("entry {:?} has an impossible chunk", e.path)));
                        };
                        e.chunks.push(ChunkRef { h, p, o, c, n });
                    }
                }
                Kind::Dir => {}
                Kind::Symlink => {
                    e.target = Some(r.string(MAX_PATH_LEN).map_err(|w| bad(w.into()))?);
                }
            }
            if let Some(prev) = entries.last() {
                if dir_cmp(&prev.path, &e.path) != Ordering::Less {
                    return Err(bad(format!(
                        "entries {:?} and {:?} are not in directory order or not unique",
                        prev.path, e.path
                    )));
                }
            }
            entries.push(e);
        }
    }
    if r.left() != 0 {
        return Err(bad(format!("{} bytes after its last entry", r.left())));
    }
    if entries.len() != info.n as usize {
        return Err(bad(format!(
            "holds {} entries but the generation declares {}",
            entries.len(),
            info.n
        )));
    }
    if entries.first().map(|e| e.path.as_str()) != Some(info.first.as_str()) {
        return Err(bad(
            "its first entry is not the one the generation declares".into(),
        ));
    }
    Ok(entries)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

struct Short;

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.at
    }
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], Short> {
        if n > self.left() {
            return Err(Short);
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn byte(&mut self) -> std::result::Result<u8, Short> {
        Ok(self.take(1)?[0])
    }
    fn varint(&mut self) -> std::result::Result<u64, Short> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Short)
    }
    /// A length-prefixed UTF-8 string of at most `max` bytes.
    fn string(&mut self, max: usize) -> std::result::Result<String, &'static str> {
        let n = self.varint().map_err(|_| "truncated")?;
        if n > max as u64 {
            return Err("a name or path longer than PATH_MAX (4095 bytes)");
        }
        let b = self.take(n as usize).map_err(|_| "truncated")?;
        String::from_utf8(b.to_vec()).map_err(|_| "a name that is not UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: Kind, chunks: Vec<ChunkRef>) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o644,
            size: chunks.iter().map(|c| c.n as u64).sum(),
            mtime: -1_234_567_890_123,
            target: (kind == Kind::Symlink).then(|| "../x".to_string()),
            chunks,
        }
    }

    fn chunk(i: u32, pack: u8) -> ChunkRef {
        ChunkRef {
            h: Digest::of(&i.to_le_bytes()),
            p: Digest([pack; 32]),
            o: 16 + i as u64 * 100,
            c: 90,
            n: 1000 + i,
        }
    }

    /// A tree of `dirs` directories of `per` files each, in path order.
    fn tree(dirs: usize, per: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        for d in 0..dirs {
            out.push(entry(&format!("d{d:04}"), Kind::Dir, vec![]));
            for f in 0..per {
                let i = (d * per + f) as u32;
                out.push(entry(
                    &format!("d{d:04}/f{f:05}"),
                    Kind::File,
                    vec![chunk(i, (i % 3) as u8)],
                ));
            }
            out.push(entry(&format!("d{d:04}/link"), Kind::Symlink, vec![]));
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    fn decode_all(pages: &[Page]) -> Vec<Entry> {
        let mut all = Vec::new();
        for p in pages {
            all.extend(decode_page("t", &p.info, &p.raw).unwrap());
        }
        all
    }

    #[test]
    fn pages_round_trip_in_directory_order() {
        let entries = tree(30, 200);
        let pages = encode_pages(&entries).unwrap();
        assert!(pages.len() > 3, "{} pages", pages.len());
        let mut back = decode_all(&pages);
        for w in back.windows(2) {
            assert_eq!(dir_cmp(&w[0].path, &w[1].path), Ordering::Less);
        }
        back.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(back, entries);
        let bytes: usize = pages.iter().map(|p| p.raw.len()).sum();
        assert!(
            bytes / entries.len() < 80,
            "{} bytes an entry",
            bytes / entries.len()
        );
    }

    #[test]
    fn directory_order_keeps_children_together() {
        // In path order "a-b" sits between "a" and "a/x"; in directory order a's children come
        // after every top-level entry.
        let mut v = vec!["a/x", "a-b", "a", "b/c", "b"];
        v.sort_by(|a, b| dir_cmp(a, b));
        assert_eq!(v, ["a", "a-b", "b", "a/x", "b/c"]);
    }

    #[test]
    fn a_change_rewrites_only_pages_around_it() {
        let entries = tree(40, 300);
        let before = encode_pages(&entries).unwrap();
        let mut changed = entries.clone();
        changed.insert(
            5000,
            entry(&format!("{}0", entries[4999].path), Kind::File, vec![]),
        );
        changed.sort_by(|a, b| a.path.cmp(&b.path));
        let after = encode_pages(&changed).unwrap();
        let old: std::collections::HashSet<Digest> =
            before.iter().map(|p| Digest::of(&p.raw)).collect();
        let new = after
            .iter()
            .filter(|p| !old.contains(&Digest::of(&p.raw)))
            .count();
        assert!(new <= 2, "{new} of {} pages changed", after.len());
    }

    #[test]
    fn hostile_pages_are_refused() {
        let entries = tree(1, 10);
        let page = encode_pages(&entries).unwrap().remove(0);
        let info = page.info.clone();
        let check = |raw: &[u8], info: &PageInfo, want: &str| {
            let err = decode_page("t", info, raw).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should say {want}");
        };
        check(&page.raw[..page.raw.len() - 3], &info, "truncated");
        check(b"CVPAGE02", &info, "bad magic");
        let mut more = page.raw.clone();
        more.push(0);
        check(&more, &info, "after its last entry");
        let fewer = PageInfo {
            n: info.n - 1,
            ..info.clone()
        };
        check(&page.raw, &fewer, "more entries than");
        let other_first = PageInfo {
            first: "zzz".into(),
            ..info.clone()
        };
        check(&page.raw, &other_first, "first entry");
        // A pack count larger than the page could hold is refused before any allocation.
        let mut packs = PAGE_MAGIC.to_vec();
        put_varint(&mut packs, u64::MAX >> 1);
        check(&packs, &info, "packs in a page");
        // A name with a slash would put an entry outside its group's directory.
        let mut slash = PAGE_MAGIC.to_vec();
        put_varint(&mut slash, 0);
        put_varint(&mut slash, 1);
        put_bytes(&mut slash, b"");
        put_varint(&mut slash, 1);
        put_bytes(&mut slash, b"a/b");
        check(
            &slash,
            &PageInfo {
                n: 1,
                first: "a/b".into(),
            },
            "one path component",
        );
    }

    #[test]
    fn zigzag_round_trips() {
        for v in [0, 1, -1, i64::MAX, i64::MIN, 1_700_000_000_000_000_000] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}

//! The layout of an uncompressed EROFS image of one snapshot tree (the kernel's read-only file
//! system for container images): where every inode, directory block and byte of file data goes,
//! and the bytes of the metadata. File data is not here: the restore writes verified chunks at
//! the offsets [`Image::file_ranges`] gives, in any order.
//!
//! The image, 4 KiB blocks:
//! - block 0: 1 KiB of nothing, the superblock at 1024, then the first inodes (`meta_blkaddr` is
//!   0, so an inode's nid is its byte offset / 32 and the root's is 36);
//! - the inodes in tree order, each followed by its data's tail when that fits in the rest of
//!   the inode's block (`FLAT_INLINE`: small files, symlinks and directories are one inode and
//!   its bytes); compact 32-byte inodes where the mtime is the superblock's build time and the
//!   values fit, extended 64-byte ones otherwise;
//! - the whole blocks of large directories and symlinks (written with the metadata);
//! - the whole blocks of files, in tree order (`FLAT_PLAIN`, or `FLAT_INLINE` with the tail next
//!   to the inode).
//!
//! No xattrs, no compression, no superblock checksum feature.

use std::collections::HashMap;

use super::error::{Error, Result};
use super::format::{Entry, Kind};

pub const BLOCK: u64 = 4096;
const BLOCK_BITS: u8 = 12;
pub const MAGIC: u32 = 0xE0F5_E1E2;
const SUPER_OFFSET: u64 = 1024;
const SUPER_LEN: u64 = 128;
const COMPACT: u64 = 32;
const EXTENDED: u64 = 64;
const DIRENT: usize = 12;

const FLAT_PLAIN: u16 = 0;
const FLAT_INLINE: u16 = 2;

const FT_REG: u8 = 1;
const FT_DIR: u8 = 2;
const FT_SYMLINK: u8 = 7;

const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;

/// Owner, group and modes the image gives its inodes.
#[derive(Clone, Copy, Debug)]
pub struct Attrs {
    pub uid: u32,
    pub gid: u32,
    /// Modes widened for the group (as the node's `grant_group` does to a tree): directories
    /// group rwx and setgid, files group rw (x where the owner has it).
    pub widen: bool,
    /// Mode and mtime (ns) of the root directory, which the snapshot does not hold.
    pub root_mode: u32,
    pub root_mtime: i64,
}

/// Where one inode and its data are.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    /// Byte offset of the inode.
    at: u64,
    extended: bool,
    /// Bytes of data: file size, symlink target length, directory size.
    size: u64,
    /// First block of the data's whole blocks (0 when there are none).
    blkaddr: u64,
    /// Bytes of data in whole blocks; the rest (`size - full`) is inline after the inode.
    full: u64,
    nlink: u32,
}

impl Slot {
    fn inline(&self) -> bool {
        self.full < self.size
    }
    fn nid(&self) -> u64 {
        self.at / 32
    }
    fn isize(&self) -> u64 {
        if self.extended {
            EXTENDED
        } else {
            COMPACT
        }
    }
    /// Byte offset of the inline tail.
    fn tail_at(&self) -> u64 {
        self.at + self.isize()
    }
}

/// The planned image of a tree: slot 0 is the root, slot `i + 1` is `entries[i]`.
pub struct Image {
    slots: Vec<Slot>,
    /// Each directory slot's children (slot indexes), sorted by name.
    children: HashMap<usize, Vec<usize>>,
    /// Parent slot of every slot (the root's is itself).
    parent: Vec<usize>,
    attrs: Attrs,
    /// mtime of compact inodes (ns): the most common mtime of the tree.
    build_time: i64,
    /// End of the metadata (inodes, directory and symlink blocks): block aligned.
    meta_end: u64,
    /// End of the inodes and their tails (where the blocks of directories begin).
    inodes_end: u64,
    /// Where the bytes of files go (inline tails, then whole blocks), ascending and disjoint.
    file_data: Vec<(u64, u64)>,
    blocks: u64,
}

fn name_of(e: &Entry) -> &[u8] {
    let p = e.path.as_bytes();
    match e.path.rfind('/') {
        Some(k) => &p[k + 1..],
        None => p,
    }
}

impl Image {
    /// Plans the image of `entries` (a validated tree, sorted by path).
    pub fn plan(entries: &[Entry], attrs: Attrs) -> Result<Image> {
        let n = entries.len() + 1;
        let mut parent = vec![0usize; n];
        let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
        children.insert(0, Vec::new());
        {
            let mut dirs: HashMap<&str, usize> = HashMap::new();
            for (i, e) in entries.iter().enumerate() {
                let p = match e.path.rsplit_once('/') {
                    None => 0,
                    Some((d, _)) => *dirs.get(d).ok_or_else(|| {
                        Error::corrupt("manifest", format!("entry {:?} has no parent", e.path))
                    })?,
                };
                parent[i + 1] = p;
                children
                    .get_mut(&p)
                    .expect("parents are directories")
                    .push(i + 1);
                if e.kind == Kind::Dir {
                    dirs.insert(&e.path, i + 1);
                    children.insert(i + 1, Vec::new());
                }
            }
        }
        for kids in children.values_mut() {
            kids.sort_unstable_by(|a, b| name_of(&entries[a - 1]).cmp(name_of(&entries[b - 1])));
        }

        let mut counts: HashMap<i64, u32> = HashMap::new();
        for e in entries {
            *counts.entry(e.mtime).or_default() += 1;
        }
        let build_time = counts
            .into_iter()
            .max_by_key(|&(t, c)| (c, std::cmp::Reverse(t)))
            .map_or(attrs.root_mtime, |(t, _)| t);

        let mut slots = vec![Slot::default(); n];
        for (s, slot) in slots.iter_mut().enumerate() {
            let (kind, mtime) = match s {
                0 => (Kind::Dir, attrs.root_mtime),
                _ => (entries[s - 1].kind, entries[s - 1].mtime),
            };
            slot.size = match kind {
                Kind::File => entries[s - 1].size,
                Kind::Symlink => entries[s - 1].target.as_deref().map_or(0, str::len) as u64,
                Kind::Dir => dir_size(&dir_names(entries, &children[&s])),
            };
            slot.nlink = match kind {
                Kind::Dir => {
                    2 + children[&s]
                        .iter()
                        .filter(|&&c| entries[c - 1].kind == Kind::Dir)
                        .count() as u32
                }
                _ => 1,
            };
            slot.extended = mtime != build_time
                || slot.size > u32::MAX as u64
                || attrs.uid > 0xffff
                || attrs.gid > 0xffff
                || slot.nlink > 0xffff;
        }

        // Inodes, each with its tail when it fits in the rest of the inode's block.
        let mut at = SUPER_OFFSET + SUPER_LEN;
        for slot in &mut slots {
            at = at.next_multiple_of(32);
            let isize = slot.isize();
            let tail = slot.size % BLOCK;
            let inline = tail != 0 && isize + tail <= BLOCK;
            let need = isize + if inline { tail } else { 0 };
            if at % BLOCK + need > BLOCK {
                at = at.next_multiple_of(BLOCK);
            }
            slot.at = at;
            slot.full = if inline {
                slot.size - tail
            } else {
                slot.size.next_multiple_of(BLOCK)
            };
            at += need;
        }
        // Whole blocks: directories and symlinks first (metadata), then files.
        let mut next = at.div_ceil(BLOCK);
        let inodes_end = next * BLOCK;
        for pass in [false, true] {
            for s in 0..n {
                let is_file = s > 0 && entries[s - 1].kind == Kind::File;
                if is_file != pass || slots[s].full == 0 {
                    continue;
                }
                slots[s].blkaddr = next;
                next += slots[s].full / BLOCK;
            }
            if !pass {
                at = next * BLOCK;
            }
        }
        if next > u32::MAX as u64 || slots.last().is_some_and(|s| s.nid() > u32::MAX as u64) {
            return Err(Error::Unsupported {
                path: "image".into(),
                why: format!("a tree of {next} blocks is too large for an EROFS image"),
            });
        }
        let files = || {
            slots
                .iter()
                .enumerate()
                .filter(|&(s, _)| s > 0 && entries[s - 1].kind == Kind::File)
                .map(|(_, slot)| slot)
        };
        let tails = files()
            .filter(|slot| slot.inline())
            .map(|slot| (slot.tail_at(), slot.tail_at() + slot.size - slot.full));
        let whole = files().filter(|slot| slot.full > 0).map(|slot| {
            (
                slot.blkaddr * BLOCK,
                slot.blkaddr * BLOCK + slot.full.min(slot.size),
            )
        });
        let file_data = tails.chain(whole).collect();
        Ok(Image {
            slots,
            children,
            parent,
            attrs,
            build_time,
            meta_end: at,
            inodes_end,
            file_data,
            blocks: next,
        })
    }

    /// The image's length in bytes.
    pub fn image_len(&self) -> u64 {
        self.blocks * BLOCK
    }

    /// Where the metadata ends: [`Image::write_metadata`] writes everything below.
    pub fn meta_end(&self) -> u64 {
        self.meta_end
    }

    /// Where bytes `offset..offset + len` of file `entries[i]` go in the image: one or two
    /// ranges (whole blocks, then the inline tail), as (image offset, offset in the input).
    pub fn file_ranges(&self, i: usize, offset: u64, len: u64) -> [(u64, std::ops::Range<u64>); 2] {
        let s = &self.slots[i + 1];
        let end = offset + len;
        let split = end.min(s.full).max(offset);
        [
            (s.blkaddr * BLOCK + offset, 0..split - offset),
            (
                s.tail_at() + split.saturating_sub(s.full),
                split - offset..len,
            ),
        ]
    }

    /// Appends to `buf` the image bytes `from..to` when they hold no file data (only inodes,
    /// the inline data of directories and symlinks, padding), as [`Image::write_metadata`]
    /// writes them; returns false, appending nothing, when file data lies there or the range
    /// reaches into the blocks of directories. A write of file data that lands near the last
    /// one can so cover the gap between them too and be one write with it.
    pub fn fill_gap(&self, entries: &[Entry], from: u64, to: u64, buf: &mut Vec<u8>) -> bool {
        if from >= to {
            return from == to;
        }
        if from < SUPER_OFFSET + SUPER_LEN {
            return false;
        }
        let k = self.file_data.partition_point(|&(_, end)| end <= from);
        if self.file_data.get(k).is_some_and(|&(start, _)| start < to) {
            return false;
        }
        if from >= self.meta_end {
            buf.resize(buf.len() + (to - from) as usize, 0);
            return true;
        }
        if to > self.inodes_end {
            return false;
        }
        let base = buf.len();
        buf.resize(base + (to - from) as usize, 0);
        // The slot before the first inode at or after `from` may reach into the range.
        let first = self
            .slots
            .partition_point(|slot| slot.at < from)
            .saturating_sub(1);
        for s in first..self.slots.len() {
            let slot = &self.slots[s];
            if slot.at >= to {
                break;
            }
            let mut bytes = self.inode(s, entries);
            if slot.inline() {
                if let Some(data) = self.own_data(s, entries) {
                    bytes.extend_from_slice(&data[slot.full as usize..]);
                }
            }
            let (a, b) = (slot.at.max(from), (slot.at + bytes.len() as u64).min(to));
            if a < b {
                buf[base + (a - from) as usize..base + (b - from) as usize]
                    .copy_from_slice(&bytes[(a - slot.at) as usize..(b - slot.at) as usize]);
            }
        }
        true
    }

    /// The data of a directory or symlink (None for a file: its data comes from chunks).
    fn own_data(&self, s: usize, entries: &[Entry]) -> Option<Vec<u8>> {
        match self.kind(s, entries) {
            Kind::Dir => Some(self.dir_data(s, entries)),
            Kind::Symlink => Some(
                entries[s - 1]
                    .target
                    .as_deref()
                    .unwrap_or("")
                    .as_bytes()
                    .to_vec(),
            ),
            Kind::File => None,
        }
    }

    /// Writes the superblock, every inode, directory and symlink, in ascending offsets, by
    /// calling `out(offset, bytes)` with buffers of a few MiB. File data is left as zeros.
    pub fn write_metadata(
        &self,
        entries: &[Entry],
        mut out: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        const FLUSH: usize = 4 << 20;
        let mut buf: Vec<u8> = Vec::with_capacity(FLUSH + 2 * BLOCK as usize);
        let mut base = 0u64;
        // Extends `buf` with zeros to cover image bytes up to `to`.
        let cover = |buf: &mut Vec<u8>, base: u64, to: u64| {
            let want = (to - base) as usize;
            if buf.len() < want {
                buf.resize(want, 0);
            }
        };
        cover(&mut buf, base, SUPER_OFFSET + SUPER_LEN);
        buf[SUPER_OFFSET as usize..(SUPER_OFFSET + SUPER_LEN) as usize]
            .copy_from_slice(&self.superblock());

        let mut dir_blocks: Vec<(usize, Vec<u8>)> = Vec::new();
        for (s, slot) in self.slots.iter().enumerate() {
            let tail_len = slot.size - slot.full.min(slot.size);
            cover(&mut buf, base, slot.tail_at() + tail_len);
            if buf.len() >= FLUSH {
                // Flush up to the last whole block below this inode.
                let keep_from = (slot.at / BLOCK * BLOCK).max(base);
                let k = (keep_from - base) as usize;
                if k > 0 {
                    out(base, &buf[..k])?;
                    buf.drain(..k);
                    base = keep_from;
                }
            }
            let at = (slot.at - base) as usize;
            let inode = self.inode(s, entries);
            buf[at..at + inode.len()].copy_from_slice(&inode);
            if let Some(data) = self.own_data(s, entries) {
                let full = slot.full.min(slot.size) as usize;
                if slot.inline() {
                    let t = (slot.tail_at() - base) as usize;
                    buf[t..t + data.len() - full].copy_from_slice(&data[full..]);
                }
                if slot.full > 0 {
                    dir_blocks.push((s, data));
                }
            }
        }
        // The whole blocks of directories and symlinks, in the order they were given blocks.
        for (s, mut data) in dir_blocks {
            let slot = &self.slots[s];
            data.truncate(slot.full.min(slot.size) as usize);
            data.resize(slot.full as usize, 0);
            let at = slot.blkaddr * BLOCK;
            cover(&mut buf, base, at);
            buf.truncate((at - base) as usize);
            buf.extend_from_slice(&data);
            if buf.len() >= FLUSH {
                out(base, &buf)?;
                base += buf.len() as u64;
                buf.clear();
            }
        }
        if !buf.is_empty() {
            out(base, &buf)?;
        }
        Ok(())
    }

    fn kind(&self, s: usize, entries: &[Entry]) -> Kind {
        match s {
            0 => Kind::Dir,
            _ => entries[s - 1].kind,
        }
    }

    fn superblock(&self) -> [u8; SUPER_LEN as usize] {
        let mut b = [0u8; SUPER_LEN as usize];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        // checksum (4..8) and feature_compat (8..12): none.
        b[12] = BLOCK_BITS;
        b[14..16].copy_from_slice(&(self.slots[0].nid() as u16).to_le_bytes());
        b[16..24].copy_from_slice(&(self.slots.len() as u64).to_le_bytes());
        let (secs, nsec) = split_ns(self.build_time);
        b[24..32].copy_from_slice(&(secs as u64).to_le_bytes());
        b[32..36].copy_from_slice(&nsec.to_le_bytes());
        b[36..40].copy_from_slice(&(self.blocks as u32).to_le_bytes());
        // meta_blkaddr (40..44) and xattr_blkaddr (44..48): 0.
        let uuid = blake3::hash(&self.blocks.to_le_bytes());
        b[48..64].copy_from_slice(&uuid.as_bytes()[..16]);
        b[64..72].copy_from_slice(b"cachevol");
        b
    }

    fn inode(&self, s: usize, entries: &[Entry]) -> Vec<u8> {
        let slot = &self.slots[s];
        let a = &self.attrs;
        let kind = self.kind(s, entries);
        let (perm, mtime) = match s {
            0 => (a.root_mode, a.root_mtime),
            _ => (entries[s - 1].mode, entries[s - 1].mtime),
        };
        let mode = match kind {
            Kind::Dir if a.widen => S_IFDIR | super::format::widen_for_group(perm, kind) | 0o2000,
            Kind::Dir => S_IFDIR | perm,
            Kind::File if a.widen => S_IFREG | super::format::widen_for_group(perm, kind),
            Kind::File => S_IFREG | perm,
            Kind::Symlink => S_IFLNK | 0o777,
        };
        let layout = if slot.inline() {
            FLAT_INLINE
        } else {
            FLAT_PLAIN
        };
        let format = (layout << 1) | slot.extended as u16;
        let blkaddr = slot.blkaddr as u32;
        let ino = s as u32 + 1;
        if slot.extended {
            let mut b = vec![0u8; EXTENDED as usize];
            b[0..2].copy_from_slice(&format.to_le_bytes());
            b[4..6].copy_from_slice(&(mode as u16).to_le_bytes());
            b[8..16].copy_from_slice(&slot.size.to_le_bytes());
            b[16..20].copy_from_slice(&blkaddr.to_le_bytes());
            b[20..24].copy_from_slice(&ino.to_le_bytes());
            b[24..28].copy_from_slice(&a.uid.to_le_bytes());
            b[28..32].copy_from_slice(&a.gid.to_le_bytes());
            let (secs, nsec) = split_ns(mtime);
            b[32..40].copy_from_slice(&secs.to_le_bytes());
            b[40..44].copy_from_slice(&nsec.to_le_bytes());
            b[44..48].copy_from_slice(&slot.nlink.to_le_bytes());
            b
        } else {
            let mut b = vec![0u8; COMPACT as usize];
            b[0..2].copy_from_slice(&format.to_le_bytes());
            b[4..6].copy_from_slice(&(mode as u16).to_le_bytes());
            b[6..8].copy_from_slice(&(slot.nlink as u16).to_le_bytes());
            b[8..12].copy_from_slice(&(slot.size as u32).to_le_bytes());
            // 12..16: the mtime relative to the build time, which is 0 here.
            b[16..20].copy_from_slice(&blkaddr.to_le_bytes());
            b[20..24].copy_from_slice(&ino.to_le_bytes());
            b[24..26].copy_from_slice(&(a.uid as u16).to_le_bytes());
            b[26..28].copy_from_slice(&(a.gid as u16).to_le_bytes());
            b
        }
    }

    /// A directory's data: blocks of dirents and names, `.` and `..` among the names, every
    /// block sorted and the blocks in order, so the kernel can binary-search a lookup.
    fn dir_data(&self, s: usize, entries: &[Entry]) -> Vec<u8> {
        let kids = &self.children[&s];
        let mut all: Vec<(&[u8], u64, u8)> = Vec::with_capacity(kids.len() + 2);
        all.push((b".", self.slots[s].nid(), FT_DIR));
        all.push((b"..", self.slots[self.parent[s]].nid(), FT_DIR));
        for &c in kids {
            let e = &entries[c - 1];
            let ft = match e.kind {
                Kind::File => FT_REG,
                Kind::Dir => FT_DIR,
                Kind::Symlink => FT_SYMLINK,
            };
            all.push((name_of(e), self.slots[c].nid(), ft));
        }
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut out = Vec::with_capacity(self.slots[s].size as usize);
        for block in pack_blocks(all.iter().map(|x| x.0.len())) {
            let start = out.len();
            let group = &all[block];
            let mut nameoff = group.len() * DIRENT;
            for &(name, nid, ft) in group {
                out.extend_from_slice(&nid.to_le_bytes());
                out.extend_from_slice(&(nameoff as u16).to_le_bytes());
                out.push(ft);
                out.push(0);
                nameoff += name.len();
            }
            for &(name, _, _) in group {
                out.extend_from_slice(name);
            }
            if out.len() - start < BLOCK as usize && out.len() < self.slots[s].size as usize {
                out.resize(start + BLOCK as usize, 0);
            }
        }
        debug_assert_eq!(out.len() as u64, self.slots[s].size);
        out
    }
}

/// The names of a directory (its children and `.`, `..`), sorted.
fn dir_names<'a>(entries: &'a [Entry], kids: &[usize]) -> Vec<&'a [u8]> {
    let mut names: Vec<&[u8]> = kids.iter().map(|&c| name_of(&entries[c - 1])).collect();
    names.push(b".");
    names.push(b"..");
    names.sort_unstable();
    names
}

/// Splits sorted names of these lengths into directory blocks: index ranges, each block's
/// dirents and names within [`BLOCK`] bytes.
fn pack_blocks(lens: impl Iterator<Item = usize>) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut used, mut count) = (0usize, 0usize, 0usize);
    for (i, len) in lens.enumerate() {
        let cost = DIRENT + len;
        if used + cost > BLOCK as usize {
            out.push(start..i);
            (start, used) = (i, 0);
        }
        used += cost;
        count = i + 1;
    }
    out.push(start..count);
    out
}

/// A directory's size: whole blocks but the last, which ends at its last name.
fn dir_size(names: &[&[u8]]) -> u64 {
    let blocks = pack_blocks(names.iter().map(|n| n.len()));
    let last = blocks.last().expect("a directory has . and ..");
    let tail: usize = names[last.clone()].iter().map(|n| DIRENT + n.len()).sum();
    (blocks.len() as u64 - 1) * BLOCK + tail as u64
}

fn split_ns(ns: i64) -> (i64, u32) {
    (
        ns.div_euclid(1_000_000_000),
        ns.rem_euclid(1_000_000_000) as u32,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn file(path: String, size: u64, mtime: i64) -> Entry {
        Entry {
            path,
            kind: Kind::File,
            mode: 0o644,
            size,
            mtime,
            target: None,
            chunks: vec![],
        }
    }

    /// Root-owned, unwidened attributes for the tests of the format and of its writer.
    pub(crate) fn attrs() -> Attrs {
        Attrs {
            uid: 0,
            gid: 0,
            widen: false,
            root_mode: 0o755,
            root_mtime: 1,
        }
    }

    /// Metadata of many megabytes is written in several buffers, each at its place, in
    /// ascending order, and the inline tails of files land inside the metadata.
    #[test]
    fn large_metadata_is_written_in_order() {
        let mut entries = vec![Entry {
            path: "d".into(),
            kind: Kind::Dir,
            mode: 0o755,
            size: 0,
            mtime: 5,
            target: None,
            chunks: vec![],
        }];
        // Tails of 1.5 to 3.5 KiB: most inodes start a new block.
        for i in 0..8_000 {
            entries.push(file(format!("d/f{i:06}"), 1500 + (i % 2000), i as i64 % 7));
        }
        let img = Image::plan(&entries, attrs()).unwrap();
        let mut image = vec![0u8; img.meta_end() as usize];
        let mut next = 0u64;
        let mut writes = 0;
        img.write_metadata(&entries, |at, data| {
            assert!(at >= next, "write at {at} below {next}");
            next = at + data.len() as u64;
            image[at as usize..next as usize].copy_from_slice(data);
            writes += 1;
            Ok(())
        })
        .unwrap();
        assert!(writes > 1, "{writes} writes");
        assert_eq!(&image[1024..1028], &MAGIC.to_le_bytes());
        for (i, e) in entries.iter().enumerate().skip(1) {
            let [(_, whole), (at, tail)] = img.file_ranges(i, 0, e.size);
            assert!(
                whole.is_empty() && tail.end == e.size,
                "{} is inline",
                e.path
            );
            assert!(at + e.size <= img.meta_end());
        }
    }

    /// A directory's names fill blocks without crossing one, and its size ends at its last
    /// name.
    #[test]
    fn directory_blocks_hold_whole_entries() {
        let names: Vec<Vec<u8>> = (0..1000)
            .map(|i| format!("{i:0>50}").into_bytes())
            .collect();
        let refs: Vec<&[u8]> = names.iter().map(|n| n.as_slice()).collect();
        let blocks = pack_blocks(refs.iter().map(|n| n.len()));
        assert_eq!(blocks.iter().map(|b| b.len()).sum::<usize>(), 1000);
        for b in &blocks {
            assert!(b.len() * (DIRENT + 50) <= BLOCK as usize);
        }
        let per = BLOCK as usize / (DIRENT + 50);
        assert_eq!(blocks[0].len(), per);
        let last = 1000 - per * (blocks.len() - 1);
        assert_eq!(
            dir_size(&refs),
            (blocks.len() as u64 - 1) * BLOCK + (last * (DIRENT + 50)) as u64
        );
    }
}

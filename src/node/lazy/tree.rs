//! The lazy tree's names and attributes, all in memory, built once from a generation's entries.
//! Inode numbers are a pure function of the manifest: the root is 1 and the entry at position
//! `i` of the path-sorted list is `2 + i`. A restarted server (or a successor that takes over
//! the connection) gives every name the number the kernel already knows it by, with no table
//! to save.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::engine::format::widen_for_group;
use crate::engine::{Entry, Kind};

pub(super) const ROOT: u64 = 1;

/// Owner, group and modes the tree gives its inodes: the ones a tree base of the same
/// generation would have on this node.
#[derive(Clone, Copy, Debug)]
pub struct Attrs {
    /// A pod's fsGroup: every inode gets this group and modes widened as the node's
    /// `grant_group` widens a tree (directories group rwx and setgid, files group rw, x where
    /// the owner has it). None: group 0, modes as committed.
    pub group: Option<u32>,
    /// Mode and mtime (ns) of the root directory, which the snapshot does not hold.
    pub root_mode: u32,
    pub root_mtime: i64,
}

pub(super) struct Tree {
    pub entries: Arc<Vec<Entry>>,
    /// The children of each directory, by inode: positions in `entries`, in name order (the
    /// path order of siblings is their name order).
    children: HashMap<u64, Vec<u32>>,
    /// The parent inode of each entry.
    parent: Vec<u64>,
    /// How many subdirectories each directory has (its link count is 2 more), by inode.
    subdirs: HashMap<u64, u32>,
    /// The bytes of all files, for statfs.
    pub bytes: u64,
    attrs: Attrs,
}

impl Tree {
    /// `entries` must be a validated tree ([`crate::engine::format::validate_tree`]): sorted,
    /// unique, every parent a directory of it.
    pub fn new(entries: Vec<Entry>, attrs: Attrs) -> Tree {
        let mut children: HashMap<u64, Vec<u32>> = HashMap::new();
        children.insert(ROOT, Vec::new());
        let mut by_path: HashMap<&str, u64> = HashMap::new();
        let mut parent = Vec::with_capacity(entries.len());
        let mut subdirs: HashMap<u64, u32> = HashMap::new();
        let mut bytes = 0;
        for (i, e) in entries.iter().enumerate() {
            let ino = 2 + i as u64;
            let p = match e.path.rsplit_once('/') {
                Some((dir, _)) => by_path[dir],
                None => ROOT,
            };
            parent.push(p);
            children.entry(p).or_default().push(i as u32);
            bytes += e.size;
            if e.kind == Kind::Dir {
                *subdirs.entry(p).or_default() += 1;
                by_path.insert(&e.path, ino);
                children.entry(ino).or_default();
            }
        }
        drop(by_path);
        Tree {
            entries: Arc::new(entries),
            children,
            parent,
            subdirs,
            bytes,
            attrs,
        }
    }

    /// The entry of inode `ino` (None for the root and for numbers the tree does not have).
    pub fn entry(&self, ino: u64) -> Option<(usize, &Entry)> {
        let i = ino.checked_sub(2)? as usize;
        self.entries.get(i).map(|e| (i, e))
    }

    pub fn name(e: &Entry) -> &str {
        e.path.rsplit_once('/').map_or(&e.path, |(_, n)| n)
    }

    pub fn children(&self, dir: u64) -> Option<&[u32]> {
        self.children.get(&dir).map(Vec::as_slice)
    }

    pub fn parent(&self, ino: u64) -> u64 {
        self.entry(ino).map_or(ROOT, |(i, _)| self.parent[i])
    }

    /// The inode of `name` in directory `dir`.
    pub fn lookup(&self, dir: u64, name: &[u8]) -> Option<u64> {
        let kids = self.children.get(&dir)?;
        let at = kids
            .binary_search_by(|&i| Tree::name(&self.entries[i as usize]).as_bytes().cmp(name))
            .ok()?;
        Some(2 + kids[at] as u64)
    }

    pub fn attr(&self, ino: u64) -> Option<FileAttr> {
        let a = &self.attrs;
        let (kind, mode, size, mtime) = if ino == ROOT {
            (Kind::Dir, a.root_mode, 0, a.root_mtime)
        } else {
            let (_, e) = self.entry(ino)?;
            let size = match e.kind {
                Kind::File => e.size,
                Kind::Symlink => e.target.as_deref().map_or(0, str::len) as u64,
                Kind::Dir => 0,
            };
            (e.kind, e.mode, size, e.mtime)
        };
        let perm = match (kind, a.group) {
            (Kind::Symlink, _) => 0o777,
            (Kind::Dir, Some(_)) => widen_for_group(mode, kind) | 0o2000,
            (_, Some(_)) => widen_for_group(mode, kind),
            (_, None) => mode,
        };
        let (ftype, size, nlink) = match kind {
            Kind::File => (FileType::RegularFile, size, 1),
            Kind::Symlink => (FileType::Symlink, size, 1),
            Kind::Dir => {
                let subdirs = self.subdirs.get(&ino).copied().unwrap_or(0);
                (FileType::Directory, 4096, 2 + subdirs)
            }
        };
        let t = time(mtime);
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: ftype,
            perm: perm as u16,
            nlink,
            uid: 0,
            gid: a.group.unwrap_or(0),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    pub fn file_type(kind: Kind) -> FileType {
        match kind {
            Kind::File => FileType::RegularFile,
            Kind::Dir => FileType::Directory,
            Kind::Symlink => FileType::Symlink,
        }
    }
}

/// Nanoseconds since the epoch (negative before it) as a time.
pub(super) fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: Kind, mode: u32) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode,
            size: 0,
            mtime: 7,
            target: (kind == Kind::Symlink).then(|| "x".into()),
            chunks: Vec::new(),
        }
    }

    fn tree(group: Option<u32>) -> Tree {
        Tree::new(
            vec![
                e("a", Kind::Dir, 0o750),
                e("a/b", Kind::File, 0o640),
                e("a/c", Kind::Dir, 0o700),
                e("a/c/x", Kind::File, 0o700),
                e("a-z", Kind::Symlink, 0o777),
                e("b", Kind::File, 0o600),
            ],
            Attrs {
                group,
                root_mode: 0o755,
                root_mtime: 1,
            },
        )
    }

    #[test]
    fn numbers_and_names_follow_the_sorted_entries() {
        let t = tree(None);
        assert_eq!(t.lookup(ROOT, b"a"), Some(2));
        assert_eq!(t.lookup(ROOT, b"a-z"), Some(6));
        assert_eq!(t.lookup(ROOT, b"b"), Some(7));
        assert_eq!(t.lookup(2, b"c"), Some(4));
        assert_eq!(t.lookup(4, b"x"), Some(5));
        assert_eq!(t.lookup(ROOT, b"c"), None);
        assert_eq!(t.lookup(3, b"x"), None, "a file has no children");
        assert_eq!(t.parent(5), 4);
        assert_eq!(t.parent(2), ROOT);
        let kids: Vec<&str> = t
            .children(ROOT)
            .unwrap()
            .iter()
            .map(|&i| Tree::name(&t.entries[i as usize]))
            .collect();
        assert_eq!(kids, ["a", "a-z", "b"]);
        assert_eq!(t.attr(ROOT).unwrap().nlink, 3);
        assert_eq!(t.attr(2).unwrap().nlink, 3);
        assert!(t.attr(8).is_none());
    }

    #[test]
    fn a_group_widens_modes_as_a_tree_base() {
        let t = tree(None);
        assert_eq!(
            (t.attr(3).unwrap().perm, t.attr(3).unwrap().gid),
            (0o640, 0)
        );
        assert_eq!(t.attr(6).unwrap().perm, 0o777);
        let t = tree(Some(1234));
        let a = t.attr(2).unwrap();
        assert_eq!((a.perm, a.gid, a.uid), (0o2770, 1234, 0));
        assert_eq!(t.attr(3).unwrap().perm, 0o660);
        assert_eq!(t.attr(5).unwrap().perm, 0o770);
        assert_eq!(t.attr(ROOT).unwrap().perm, 0o2775);
    }
}

//! Changes recorded by overlayfs in an upper dir, applied to the base tree they were made over.
//! A deleted path is a whiteout (a 0:0 character device, or an empty file carrying an
//! `overlay.whiteout` xattr); a directory that replaced the lower one whole is opaque
//! (`overlay.opaque` = "y"); everything else in the upper dir is the new content of its path.
//! The node mounts its views with `metacopy=off` and `redirect_dir=off`, so the upper dir never
//! points back into the lower one; finding such a pointer is an error, not a guess.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::error::{io, Error, IoError, Result};
use super::format::{Entry, Kind, MODE_MASK};
use super::restore::{clear, timestamps};

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Whiteout(String),
    Dir {
        entry: Entry,
        opaque: bool,
    },
    /// A file (to be read from the upper dir) or a symlink.
    Content(Entry),
}

/// The value of an overlay xattr in the trusted namespace (mounted as root) or the user
/// namespace (`userxattr` mounts).
fn overlay_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    for ns in ["trusted", "user"] {
        let mut buf = [0u8; 256];
        if let Ok(n) = rustix::fs::lgetxattr(path, format!("{ns}.overlay.{name}"), &mut buf) {
            return Some(buf[..n].to_vec());
        }
    }
    None
}

/// Walks an upper dir: every change, sorted by path (parents first).
pub fn changes(upper: &Path) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    let mut stack = vec![(upper.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for item in std::fs::read_dir(&dir).map_err(io("read directory", &dir))? {
            let item = item.map_err(io("read directory", &dir))?;
            let full = item.path();
            let name = item.file_name();
            let name = name.to_str().ok_or_else(|| Error::Unsupported {
                path: full.clone(),
                why: "the name is not UTF-8".into(),
            })?;
            if rel.is_empty() && name == super::MARKER {
                continue; // the commit marker is never part of a snapshot
            }
            let path = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let md = std::fs::symlink_metadata(&full).map_err(io("stat", &full))?;
            let ft = md.file_type();
            let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
            let entry = |kind, size, target| Entry {
                path: path.clone(),
                kind,
                mode: md.mode() & MODE_MASK,
                size,
                mtime,
                target,
                chunks: vec![],
            };
            if ft.is_char_device() && md.rdev() == 0 {
                out.push(Change::Whiteout(path));
            } else if ft.is_dir() {
                if overlay_xattr(&full, "redirect").is_some() {
                    return Err(Error::Unsupported {
                        path: full,
                        why: "an overlay redirect (a renamed lower directory): views must be mounted with redirect_dir=off".into(),
                    });
                }
                let opaque = overlay_xattr(&full, "opaque").as_deref() == Some(b"y");
                out.push(Change::Dir {
                    entry: entry(Kind::Dir, 0, None),
                    opaque,
                });
                stack.push((full, path));
            } else if ft.is_file() {
                if md.len() == 0 && overlay_xattr(&full, "whiteout").is_some() {
                    out.push(Change::Whiteout(path));
                    continue;
                }
                if overlay_xattr(&full, "metacopy").is_some() {
                    return Err(Error::Unsupported {
                        path: full,
                        why: "an overlay metacopy file (data still in the lower layer): views must be mounted with metacopy=off".into(),
                    });
                }
                out.push(Change::Content(entry(Kind::File, md.len(), None)));
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&full).map_err(io("readlink", &full))?;
                let t = t.to_str().ok_or_else(|| Error::Unsupported {
                    path: full.clone(),
                    why: "the link target is not UTF-8".into(),
                })?;
                out.push(Change::Content(entry(
                    Kind::Symlink,
                    0,
                    Some(t.to_string()),
                )));
            }
            // Sockets, fifos and devices are not part of a cache.
        }
    }
    out.sort_by(|a, b| change_path(a).cmp(change_path(b)));
    Ok(out)
}

fn change_path(c: &Change) -> &str {
    match c {
        Change::Whiteout(p) => p,
        Change::Dir { entry, .. } | Change::Content(entry) => &entry.path,
    }
}

/// Removes `path`'s descendants from the tree.
pub(crate) fn remove_under(tree: &mut BTreeMap<String, Entry>, path: &str) {
    let prefix = format!("{path}/");
    let doomed: Vec<String> = tree
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, _)| k.clone())
        .collect();
    for k in doomed {
        tree.remove(&k);
    }
}

/// The tree after the changes, and the indices of its files to read from the upper dir.
pub fn apply(base: &[Entry], changes: Vec<Change>) -> (Vec<Entry>, Vec<usize>) {
    if changes.is_empty() {
        return (base.to_vec(), vec![]);
    }
    let mut tree: BTreeMap<String, Entry> =
        base.iter().map(|e| (e.path.clone(), e.clone())).collect();
    let mut from_upper = std::collections::HashSet::new();
    for c in changes {
        match c {
            Change::Whiteout(p) => {
                remove_under(&mut tree, &p);
                tree.remove(&p);
            }
            Change::Dir { entry, opaque } => {
                if opaque || tree.get(&entry.path).is_some_and(|e| e.kind != Kind::Dir) {
                    remove_under(&mut tree, &entry.path);
                }
                tree.insert(entry.path.clone(), entry);
            }
            Change::Content(entry) => {
                remove_under(&mut tree, &entry.path);
                if entry.kind == Kind::File {
                    from_upper.insert(entry.path.clone());
                }
                tree.insert(entry.path.clone(), entry);
            }
        }
    }
    let entries: Vec<Entry> = tree.into_values().collect();
    let to_read = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| from_upper.contains(&e.path))
        .map(|(i, _)| i)
        .collect();
    (entries, to_read)
}

/// Applies an upper dir's changes to `dir`, a private copy of the lower tree (hard links are
/// fine: nothing is modified in place, files are replaced by renaming the upper's files in, so
/// the upper dir is consumed). Turns a finished view into the next base in O(change).
pub fn apply_to_dir(upper: &Path, dir: &Path) -> Result<()> {
    let changes = changes(upper)?;
    let mut dirs = Vec::new();
    for c in &changes {
        match c {
            Change::Whiteout(p) => clear(&dir.join(p))?,
            Change::Dir { entry, opaque } => {
                let d = dir.join(&entry.path);
                let is_dir = std::fs::symlink_metadata(&d).is_ok_and(|m| m.is_dir());
                if *opaque || !is_dir {
                    clear(&d)?;
                    std::fs::create_dir(&d).map_err(io("create", &d))?;
                }
                dirs.push(entry.clone());
            }
            Change::Content(entry) => {
                let d = dir.join(&entry.path);
                clear(&d)?;
                if entry.kind == Kind::Symlink {
                    let t = entry.target.as_deref().unwrap_or_default();
                    std::os::unix::fs::symlink(t, &d).map_err(io("symlink", &d))?;
                } else {
                    let s = upper.join(&entry.path);
                    std::fs::rename(&s, &d).map_err(io("move", &s))?;
                }
            }
        }
    }
    for e in dirs.iter().rev() {
        let d = dir.join(&e.path);
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(e.mode))
            .map_err(io("chmod", &d))?;
        set_mtime(&d, e.mtime)?;
    }
    Ok(())
}

fn set_mtime(path: &Path, ns: i64) -> Result<()> {
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &timestamps(ns),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|errno| IoError::new("set times of", path, errno.into()).into())
}

/// Hard-links a tree: new directories (same modes and mtimes), the same file inodes. Cheap,
/// and safe for trees that are never modified in place.
pub fn link_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir(to).map_err(io("create", to))?;
    let mut stack = vec![(from.to_path_buf(), to.to_path_buf())];
    let mut made = vec![(from.to_path_buf(), to.to_path_buf())];
    while let Some((s, d)) = stack.pop() {
        for item in std::fs::read_dir(&s).map_err(io("read directory", &s))? {
            let item = item.map_err(io("read directory", &s))?;
            let (si, di) = (item.path(), d.join(item.file_name()));
            let ft = item.file_type().map_err(io("stat", &si))?;
            if ft.is_dir() {
                std::fs::create_dir(&di).map_err(io("create", &di))?;
                stack.push((si.clone(), di.clone()));
                made.push((si, di));
            } else {
                std::fs::hard_link(&si, &di).map_err(io("link", &di))?;
            }
        }
    }
    for (s, d) in made.into_iter().rev() {
        let md = std::fs::symlink_metadata(&s).map_err(io("stat", &s))?;
        std::fs::set_permissions(&d, md.permissions()).map_err(io("chmod", &d))?;
        set_mtime(&d, md.mtime() * 1_000_000_000 + md.mtime_nsec())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o755,
            size: 0,
            mtime: 1,
            target: (kind == Kind::Symlink).then(|| "x".into()),
            chunks: vec![],
        }
    }

    #[test]
    fn whiteouts_opaque_dirs_and_replacements() {
        let base = vec![
            e("a", Kind::Dir),
            e("a/keep", Kind::File),
            e("a/gone", Kind::File),
            e("b", Kind::Dir),
            e("b/old", Kind::File),
            e("c", Kind::File),
            e("d", Kind::Dir),
            e("d/x", Kind::File),
        ];
        let changes = vec![
            Change::Whiteout("a/gone".into()),
            Change::Dir {
                entry: e("b", Kind::Dir),
                opaque: true,
            },
            Change::Content(e("b/new", Kind::File)),
            Change::Dir {
                entry: e("c", Kind::Dir),
                opaque: false,
            },
            Change::Content(e("d", Kind::File)),
        ];
        let (tree, to_read) = apply(&base, changes);
        let paths: Vec<&str> = tree.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "a/keep", "b", "b/new", "c", "d"]);
        assert_eq!(tree[4].kind, Kind::Dir);
        let read: Vec<&str> = to_read.iter().map(|&i| tree[i].path.as_str()).collect();
        assert_eq!(read, ["b/new", "d"]);
    }
}

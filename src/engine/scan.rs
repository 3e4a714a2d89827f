//! Walking a cache directory: every entry's kind, mode, size, times and inode, sorted by path,
//! without following symlinks. Special files (sockets, fifos, devices) are skipped with a log
//! line: a cache never needs them and a snapshot never carries them.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::error::{Error, Result};
use super::format::{Kind, MODE_MASK};
use super::localstate::Stat;

pub struct Scanned {
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub stat: Stat,
    pub target: Option<String>,
}

pub fn scan(root: &Path) -> Result<Vec<Scanned>> {
    let mut out = Vec::new();
    let mut stack: Vec<(std::path::PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    let mut skipped = 0usize;
    while let Some((dir, rel)) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(Error::io("read directory", &dir))?;
        for item in rd {
            let item = item.map_err(Error::io("read directory", &dir))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else {
                return Err(Error::Unsupported {
                    path: item.path(),
                    why: "the name is not UTF-8".into(),
                });
            };
            let path = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let md = match item.metadata() {
                Ok(md) => md,
                // Gone between readdir and stat: it is not part of the tree.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("stat", item.path())(e)),
            };
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_file() {
                Kind::File
            } else if ft.is_symlink() {
                Kind::Symlink
            } else {
                skipped += 1;
                continue;
            };
            let target = if kind == Kind::Symlink {
                let t =
                    std::fs::read_link(item.path()).map_err(Error::io("readlink", item.path()))?;
                Some(
                    t.to_str()
                        .ok_or_else(|| Error::Unsupported {
                            path: item.path(),
                            why: "the link target is not UTF-8".into(),
                        })?
                        .to_string(),
                )
            } else {
                None
            };
            let stat = Stat {
                ino: md.ino(),
                size: if kind == Kind::File { md.size() } else { 0 },
                mtime: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                ctime: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            };
            if kind == Kind::Dir {
                stack.push((item.path(), path.clone()));
            }
            out.push(Scanned {
                path,
                kind,
                mode: md.mode() & MODE_MASK,
                stat,
                target,
            });
        }
    }
    if skipped > 0 {
        tracing::warn!(dir = %root.display(), skipped, "skipped special files (sockets, fifos, devices)");
    }
    out.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

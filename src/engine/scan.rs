//! Walking a cache directory: every entry's kind, mode, size, times and inode, sorted by path,
//! without following symlinks. Special files (sockets, fifos, devices) are skipped with a log
//! line: a cache never needs them and a snapshot never carries them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

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

/// Directories waiting to be read, and how many workers are reading one (and may add more).
struct Queue {
    dirs: Vec<(PathBuf, String)>,
    busy: usize,
    failed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    more: Condvar,
}

/// Walks `root` on a few threads (directories are read and their entries stat'ed in
/// parallel: on a warm cache the walk is system calls, and they run on every core), then sorts.
pub fn scan(root: &Path) -> Result<Vec<Scanned>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let shared = Shared {
        queue: Mutex::new(Queue {
            dirs: vec![(root.to_path_buf(), String::new())],
            busy: 0,
            failed: false,
        }),
        more: Condvar::new(),
    };
    let results: Vec<Result<Walked>> = std::thread::scope(|s| {
        let others: Vec<_> = (1..workers).map(|_| s.spawn(|| work(&shared))).collect();
        let mine = work(&shared);
        std::iter::once(mine)
            .chain(
                others
                    .into_iter()
                    .map(|h| h.join().expect("scan worker does not panic")),
            )
            .collect()
    });
    let mut out = Vec::new();
    let mut skipped = 0usize;
    for r in results {
        let w = r?;
        if out.is_empty() {
            out = w.entries;
        } else {
            out.extend(w.entries);
        }
        skipped += w.skipped;
    }
    if skipped > 0 {
        tracing::warn!(dir = %root.display(), skipped, "skipped special files (sockets, fifos, devices)");
    }
    out.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[derive(Default)]
struct Walked {
    entries: Vec<Scanned>,
    skipped: usize,
}

/// One worker: takes directories off the queue until none is left and no one is reading one.
fn work(shared: &Shared) -> Result<Walked> {
    let mut walked = Walked::default();
    let mut subdirs = Vec::new();
    loop {
        let (dir, rel) = {
            let mut q = shared.queue.lock().expect("not poisoned");
            loop {
                if q.failed {
                    return Ok(walked);
                }
                if let Some(job) = q.dirs.pop() {
                    q.busy += 1;
                    break job;
                }
                if q.busy == 0 {
                    return Ok(walked);
                }
                q = shared.more.wait(q).expect("not poisoned");
            }
        };
        let r = read_dir(&dir, &rel, &mut walked, &mut subdirs);
        let mut q = shared.queue.lock().expect("not poisoned");
        q.busy -= 1;
        q.failed |= r.is_err();
        let wake = !subdirs.is_empty() || q.busy == 0 || q.failed;
        q.dirs.append(&mut subdirs);
        drop(q);
        if wake {
            shared.more.notify_all();
        }
        r?;
    }
}

/// Reads one directory: its entries go to `walked`, its subdirectories to `subdirs`.
fn read_dir(
    dir: &Path,
    rel: &str,
    walked: &mut Walked,
    subdirs: &mut Vec<(PathBuf, String)>,
) -> Result<()> {
    let out = &mut walked.entries;
    let rd = std::fs::read_dir(dir).map_err(Error::io("read directory", dir))?;
    for item in rd {
        let item = item.map_err(Error::io("read directory", dir))?;
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
            let mut p = String::with_capacity(rel.len() + 1 + name.len());
            p.push_str(rel);
            p.push('/');
            p.push_str(name);
            p
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
            walked.skipped += 1;
            continue;
        };
        let target = if kind == Kind::Symlink {
            let t = std::fs::read_link(item.path()).map_err(Error::io("readlink", item.path()))?;
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
            subdirs.push((item.path(), path.clone()));
        }
        out.push(Scanned {
            path,
            kind,
            mode: md.mode() & MODE_MASK,
            stat,
            target,
        });
    }
    Ok(())
}

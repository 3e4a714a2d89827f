//! Walking a cache directory: every entry's kind, mode, size, times and inode, sorted by path,
//! without following symlinks. Special files (sockets, fifos, devices) are skipped with a log
//! line: a cache never needs them and a snapshot never carries them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use super::error::{io, Error, IoError, Result};
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

struct Shared<'a> {
    queue: Mutex<Queue>,
    more: Condvar,
    /// Entries found so far, for progress.
    seen: &'a AtomicU64,
}

/// Walks `root` on a few threads (directories are read and their entries stat'ed in
/// parallel: on a warm cache the walk is system calls, and they run on every core), then sorts.
pub fn scan(root: &Path) -> Result<Vec<Scanned>> {
    scan_counting(root, &AtomicU64::new(0))
}

/// [`scan`], adding the number of entries found to `seen` as it goes (for progress).
pub fn scan_counting(root: &Path, seen: &AtomicU64) -> Result<Vec<Scanned>> {
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
        seen,
    };
    let results: Vec<Result<Walked>> = std::thread::scope(|s| {
        // Helpers start only once there is work for them: a tree of one or two directories
        // is walked on this thread alone (starting, waking and joining threads costs more).
        let mut others = Vec::new();
        let mine = work(&shared, &mut |queued| {
            if queued >= 2 && others.is_empty() {
                others.extend((1..workers).map(|_| s.spawn(|| work(&shared, &mut |_| {}))));
            }
        });
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
    // The commit marker belongs to the run that wrote it, never to a snapshot.
    out.retain(|s| !super::is_marker(&s.path));
    out.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[derive(Default)]
struct Walked {
    entries: Vec<Scanned>,
    skipped: usize,
}

/// One worker: takes directories off the queue until none is left and no one is reading one.
/// `queued` is told how many directories wait after each one this worker read.
fn work(shared: &Shared, queued: &mut dyn FnMut(usize)) -> Result<Walked> {
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
        let before = walked.entries.len();
        let r = read_dir(&dir, &rel, &mut walked, &mut subdirs);
        shared.seen.fetch_add(
            walked.entries.len().saturating_sub(before) as u64,
            Ordering::Relaxed,
        );
        let mut q = shared.queue.lock().expect("not poisoned");
        q.busy -= 1;
        q.failed |= r.is_err();
        let wake = !subdirs.is_empty() || q.busy == 0 || q.failed;
        q.dirs.append(&mut subdirs);
        let waiting = q.dirs.len();
        drop(q);
        if wake {
            shared.more.notify_all();
        }
        r?;
        queued(waiting);
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
    let rd = std::fs::read_dir(dir).map_err(io("read directory", dir))?;
    for item in rd {
        let item = item.map_err(io("read directory", dir))?;
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
            Err(e) => return Err(IoError::new("stat", item.path(), e).into()),
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
            let t = std::fs::read_link(item.path()).map_err(io("readlink", item.path()))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn counts_what_it_found_as_it_goes() {
        let tmp = tempfile::tempdir().unwrap();
        for d in 0..5 {
            let dir = tmp.path().join(format!("d{d}"));
            std::fs::create_dir(&dir).unwrap();
            for f in 0..7 {
                std::fs::write(dir.join(format!("f{f}")), "x").unwrap();
            }
        }
        let seen = AtomicU64::new(0);
        let found = scan_counting(tmp.path(), &seen).unwrap();
        assert_eq!(found.len(), 5 + 35);
        assert_eq!(seen.load(Ordering::Relaxed), 40);
    }

    #[test]
    fn walks_every_directory_once_sorted() {
        let tmp = tempfile::tempdir().unwrap();
        let mut want = Vec::new();
        for i in 0..30 {
            let d = format!("d{i:02}");
            std::fs::create_dir(tmp.path().join(&d)).unwrap();
            want.push(d.clone());
            for j in 0..3 {
                let sub = format!("{d}/s{j}");
                std::fs::create_dir(tmp.path().join(&sub)).unwrap();
                want.push(sub.clone());
                let f = format!("{sub}/f");
                std::fs::write(tmp.path().join(&f), vec![b'x'; i * 3 + j]).unwrap();
                want.push(f);
            }
        }
        std::os::unix::fs::symlink("d00/s0/f", tmp.path().join("link")).unwrap();
        want.push("link".into());
        want.sort();
        let got = scan(tmp.path()).unwrap();
        let paths: Vec<&str> = got.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(paths, want);
        let f = got.iter().find(|s| s.path == "d07/s2/f").unwrap();
        assert_eq!((f.kind, f.stat.size), (Kind::File, 23));
        let l = got.iter().find(|s| s.path == "link").unwrap();
        assert_eq!(l.target.as_deref(), Some("d00/s0/f"));
    }

    #[test]
    fn a_name_that_is_not_utf8_fails_the_walk() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..10 {
            std::fs::create_dir_all(tmp.path().join(format!("a{i}/b"))).unwrap();
        }
        let bad = std::ffi::OsStr::from_bytes(b"bad\xff");
        std::fs::write(tmp.path().join("a7/b").join(bad), b"").unwrap();
        let err = scan(tmp.path()).err().expect("the walk fails").to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }
}

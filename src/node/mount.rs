//! Mounts the node plugin makes: overlay views, bind mounts onto kubelet's target paths,
//! read-only remounts, unmounts, and the mount table (to find mounts again after a restart and
//! to make publish and unpublish idempotent). Also the copy fallback for where overlayfs is
//! refused: a tree copied file by file, with reflinks when the file system offers them.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};

/// Mounts an overlay of `lower` (layers, top first) with `upper` and `work` at `target`.
/// metacopy and redirect_dir are off so the upper dir is a complete change set; index off keeps
/// the lower layers usable by other views.
pub fn overlay(lower: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},metacopy=off,redirect_dir=off,index=off",
        layer_list(lower)?,
        upper.display(),
        work.display()
    );
    let data =
        CString::new(opts).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL"))?;
    rustix::mount::mount(
        "overlay",
        target,
        "overlay",
        MountFlags::empty(),
        data.as_c_str(),
    )?;
    Ok(())
}

/// Mounts the EROFS image file `image` read-only at `target`. A file-backed mount (Linux 6.12
/// and later): no loop device, so nothing to attach, detach or leak.
pub fn erofs(image: &Path, target: &Path) -> io::Result<()> {
    rustix::mount::mount(
        image,
        target,
        "erofs",
        MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID,
        c"",
    )?;
    Ok(())
}

/// Mounts a read-only overlay of `lower` (layers, top first; at least two) at `target`: a
/// base made of an image and the changes committed on top of it. Whiteouts and opaque
/// directories in the upper layers hide what they deleted below.
pub fn overlay_read_only(lower: &[PathBuf], target: &Path) -> io::Result<()> {
    let lowers = layer_list(lower)?;
    let data = CString::new(format!(
        "lowerdir={lowers},metacopy=off,redirect_dir=off,index=off"
    ))
    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL"))?;
    rustix::mount::mount(
        "overlay",
        target,
        "overlay",
        MountFlags::RDONLY,
        data.as_c_str(),
    )?;
    Ok(())
}

/// Overlay's `lowerdir=` value: the layers joined by ':', refusing paths that would split.
fn layer_list(lower: &[PathBuf]) -> io::Result<String> {
    let lowers: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
    for l in &lowers {
        if l.contains(',') || l.contains(':') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("overlay layer path {l:?} contains ',' or ':'"),
            ));
        }
    }
    Ok(lowers.join(":"))
}

/// Bind-mounts `source` at `target`, read-only if asked.
pub fn bind(source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
    rustix::mount::mount_bind(source, target)?;
    if read_only {
        // A bind mount ignores MS_RDONLY on creation; it takes a remount (MS_REMOUNT is added;
        // the data is ignored for a bind remount).
        if let Err(e) =
            rustix::mount::mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, "")
        {
            let _ = unmount(target);
            return Err(e.into());
        }
    }
    Ok(())
}

/// Unmounts `target`; not mounted is fine. Busy mounts are detached lazily: kubelet has
/// already stopped the pod's containers when it unpublishes.
pub fn unmount(target: &Path) -> io::Result<()> {
    match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW) {
        Ok(()) => Ok(()),
        Err(Errno::INVAL | Errno::NOENT) => Ok(()),
        Err(Errno::BUSY) => {
            rustix::mount::unmount(target, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW)?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountInfo {
    pub root: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    pub options: String,
}

/// Undoes the octal escapes of mountinfo (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..(i + 4).min(s.len())], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            Some(MountInfo {
                root: unescape(pre.get(3)?),
                mount_point: PathBuf::from(unescape(pre.get(4)?)),
                fstype: post.first()?.to_string(),
                source: unescape(post.get(1)?),
                options: post.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

pub fn mounts() -> io::Result<Vec<MountInfo>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Unmounts everything mounted under `dir`, deepest first: for tools and tests that are done
/// with a state dir (a node plugin never does this: its pods use those mounts).
pub fn unmount_all_under(dir: &Path) -> io::Result<()> {
    let mut points: Vec<PathBuf> = mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        unmount(&p)?;
    }
    Ok(())
}

/// Whether something is mounted exactly at `path`.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    Ok(mounts()?.iter().any(|m| m.mount_point == path))
}

/// Copies a tree (files, directories, symlinks; modes and mtimes), cloning file data with a
/// reflink where the file system can and copying it otherwise. The copy fallback of views.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    let mut dirs = vec![(from.to_path_buf(), to.to_path_buf())];
    let mut fix_dirs = Vec::new();
    while let Some((src, dst)) = dirs.pop() {
        for item in std::fs::read_dir(&src)? {
            let item = item?;
            let (s, d) = (item.path(), dst.join(item.file_name()));
            let md = std::fs::symlink_metadata(&s)?;
            let ft = md.file_type();
            if ft.is_dir() {
                std::fs::create_dir(&d)?;
                dirs.push((s, d.clone()));
                fix_dirs.push((d, md));
            } else if ft.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&s)?, &d)?;
                set_times(&d, &md, true)?;
            } else if ft.is_file() {
                clone_file(&s, &d)?;
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(md.mode() & 0o1777))?;
                set_times(&d, &md, false)?;
            }
        }
    }
    for (d, md) in fix_dirs.into_iter().rev() {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(md.mode() & 0o1777))?;
        set_times(&d, &md, false)?;
    }
    Ok(())
}

fn clone_file(src: &Path, dst: &Path) -> io::Result<()> {
    let s = std::fs::File::open(src)?;
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    // FICLONE: share the data blocks (btrfs, xfs with reflink); EOPNOTSUPP/EXDEV elsewhere.
    if rustix::fs::ioctl_ficlone(&d, &s).is_ok() {
        return Ok(());
    }
    let (mut s, mut d) = (s, d);
    io::copy(&mut s, &mut d)?;
    Ok(())
}

fn set_times(path: &Path, md: &std::fs::Metadata, nofollow: bool) -> io::Result<()> {
    let ts = rustix::fs::Timespec {
        tv_sec: md.mtime(),
        tv_nsec: md.mtime_nsec() as _,
    };
    let times = rustix::fs::Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    let flags = if nofollow {
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW
    } else {
        rustix::fs::AtFlags::empty()
    };
    rustix::fs::utimensat(rustix::fs::CWD, path, &times, flags)?;
    Ok(())
}

/// The mounts the node makes, so the node's decisions can run without root: [`System`] makes
/// them (the functions above), a fake records them.
pub trait Mounter: Send + Sync + 'static {
    /// See [`overlay`].
    fn overlay(
        &self,
        lower: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> io::Result<()>;
    /// See [`erofs`].
    fn erofs(&self, image: &Path, target: &Path) -> io::Result<()>;
    /// See [`overlay_read_only`].
    fn overlay_read_only(&self, lower: &[PathBuf], target: &Path) -> io::Result<()>;
    /// See [`bind`].
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> io::Result<()>;
    /// See [`unmount`].
    fn unmount(&self, target: &Path) -> io::Result<()>;
    /// Where something is mounted.
    fn mount_points(&self) -> io::Result<Vec<PathBuf>>;
    /// Whether something is mounted exactly at `path`.
    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        Ok(self.mount_points()?.iter().any(|m| m == path))
    }
}

/// The system's mounts.
pub struct System;

impl Mounter for System {
    fn overlay(
        &self,
        lower: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> io::Result<()> {
        overlay(lower, upper, work, target)
    }

    fn erofs(&self, image: &Path, target: &Path) -> io::Result<()> {
        erofs(image, target)
    }

    fn overlay_read_only(&self, lower: &[PathBuf], target: &Path) -> io::Result<()> {
        overlay_read_only(lower, target)
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
        bind(source, target, read_only)
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        unmount(target)
    }

    fn mount_points(&self) -> io::Result<Vec<PathBuf>> {
        Ok(mounts()?.into_iter().map(|m| m.mount_point).collect())
    }

    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        is_mount_point(path)
    }
}

/// A mount table in memory, for tests: mounts are recorded, nothing is mounted.
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::sync::Mutex;

    /// One mount the fake made.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Mount {
        Overlay { lower: Vec<PathBuf>, upper: PathBuf },
        Bind { source: PathBuf, read_only: bool },
        Erofs { image: PathBuf },
        OverlayReadOnly { lower: Vec<PathBuf> },
    }

    #[derive(Default)]
    pub struct Fake {
        pub table: Mutex<Vec<(PathBuf, Mount)>>,
        /// Overlay mounts are refused (as where overlayfs is not allowed).
        pub refuse_overlay: bool,
        /// EROFS mounts are refused (as on kernels without file-backed EROFS).
        pub refuse_erofs: bool,
    }

    impl Fake {
        pub fn at(&self, target: &Path) -> Option<Mount> {
            let t = self.table.lock().unwrap();
            t.iter().find(|(p, _)| p == target).map(|(_, m)| m.clone())
        }
    }

    impl Mounter for Fake {
        fn overlay(
            &self,
            lower: &[PathBuf],
            upper: &Path,
            _work: &Path,
            target: &Path,
        ) -> io::Result<()> {
            if self.refuse_overlay {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            let m = Mount::Overlay {
                lower: lower.to_vec(),
                upper: upper.to_path_buf(),
            };
            self.table.lock().unwrap().push((target.to_path_buf(), m));
            Ok(())
        }

        fn erofs(&self, image: &Path, target: &Path) -> io::Result<()> {
            if self.refuse_erofs {
                return Err(io::Error::from_raw_os_error(libc::ENOTBLK));
            }
            let m = Mount::Erofs {
                image: image.to_path_buf(),
            };
            self.table.lock().unwrap().push((target.to_path_buf(), m));
            Ok(())
        }

        fn overlay_read_only(&self, lower: &[PathBuf], target: &Path) -> io::Result<()> {
            let m = Mount::OverlayReadOnly {
                lower: lower.to_vec(),
            };
            self.table.lock().unwrap().push((target.to_path_buf(), m));
            Ok(())
        }

        fn bind(&self, source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
            let m = Mount::Bind {
                source: source.to_path_buf(),
                read_only,
            };
            self.table.lock().unwrap().push((target.to_path_buf(), m));
            Ok(())
        }

        fn unmount(&self, target: &Path) -> io::Result<()> {
            let mut t = self.table.lock().unwrap();
            if let Some(i) = t.iter().rposition(|(p, _)| p == target) {
                t.remove(i);
            }
            Ok(())
        }

        fn mount_points(&self) -> io::Result<Vec<PathBuf>> {
            Ok(self
                .table
                .lock()
                .unwrap()
                .iter()
                .map(|(p, _)| p.clone())
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 0:40 / /var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/v/mount rw shared:2 - overlay overlay rw,lowerdir=/a\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fstype, "ext3");
        assert_eq!(m[1].fstype, "overlay");
        assert!(m[1].options.contains("lowerdir=/a"));
    }
}

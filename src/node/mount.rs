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

/// Mounts an overlay of `lower` (layers, top first) with `upper` and `work` at `target`,
/// labelled with SELinux `context` if given (see [`overlay_data`]).
pub fn overlay(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
    context: Option<&str>,
) -> io::Result<()> {
    let data = CString::new(overlay_data(lower, upper, work, context)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL"))?;
    rustix::mount::mount(
        "overlay",
        target,
        "overlay",
        MountFlags::empty(),
        data.as_c_str(),
    )?;
    Ok(())
}

/// The data of a view's overlay mount. metacopy and redirect_dir are off so the upper dir is a
/// complete change set; index off keeps the lower layers usable by other views. An SELinux
/// `context` is passed quoted (its level may hold a comma): SELinux takes it out of the data,
/// quote-aware, before overlayfs parses the rest, and every file of the mount then has that
/// label, as kubelet expects of a driver that says `seLinuxMount: true`.
pub fn overlay_data(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    context: Option<&str>,
) -> io::Result<String> {
    let mut data = format!(
        "lowerdir={},upperdir={},workdir={},metacopy=off,redirect_dir=off,index=off",
        layer_list(lower)?,
        upper.display(),
        work.display()
    );
    if let Some(c) = context {
        if c.contains('"') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("SELinux context {c:?} contains a quote"),
            ));
        }
        data.push_str(&format!(",context=\"{c}\""));
    }
    Ok(data)
}

/// Whether the kernel has SELinux: `selinuxfs` is in /proc/filesystems. The kernel registers
/// it exactly when SELinux was initialized at boot, which is also exactly when mount(2) takes
/// `context=` out of a mount's data; without it overlayfs would refuse the unknown option and
/// the mount. Read from /proc rather than by looking for /sys/fs/selinux: the node plugin's
/// container may not have selinuxfs mounted even where the host has SELinux.
pub fn selinux_enabled() -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|t| has_selinuxfs(&t))
}

fn has_selinuxfs(filesystems: &str) -> bool {
    filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("selinuxfs"))
}

/// The SELinux context a view is mounted (or, for a copy, labelled) with: the one kubelet
/// asked for where the kernel has SELinux; none where it has not (kubelet may still ask: the
/// option then means nothing, and a mount with it would fail), with a debug line.
pub fn view_context(requested: Option<&str>, selinux: bool) -> Option<String> {
    let c = requested?;
    if !selinux {
        tracing::debug!(
            selinux.context = c,
            "no SELinux in this kernel: the context= mount flag is dropped"
        );
        return None;
    }
    Some(c.to_string())
}

/// Labels every entry of the tree at `root` with SELinux `context` (the `security.selinux`
/// attribute), symbolic links themselves included: a copied view is bind-mounted onto the
/// target, and a bind mount cannot take `context=` (mount(2) ignores the data of MS_BIND), so
/// its files carry the label instead, as kubelet's own relabelling would have left them.
pub fn label_tree(root: &Path, context: &str) -> io::Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        rustix::fs::lsetxattr(
            &p,
            "security.selinux",
            context.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )?;
        if std::fs::symlink_metadata(&p)?.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
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
        context: Option<&str>,
    ) -> io::Result<()>;
    /// See [`erofs`].
    fn erofs(&self, image: &Path, target: &Path) -> io::Result<()>;
    /// See [`overlay_read_only`].
    fn overlay_read_only(&self, lower: &[PathBuf], target: &Path) -> io::Result<()>;
    /// See [`bind`].
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> io::Result<()>;
    /// See [`unmount`].
    fn unmount(&self, target: &Path) -> io::Result<()>;
    /// See [`label_tree`].
    fn label(&self, root: &Path, context: &str) -> io::Result<()>;
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
        context: Option<&str>,
    ) -> io::Result<()> {
        overlay(lower, upper, work, target, context)
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

    fn label(&self, root: &Path, context: &str) -> io::Result<()> {
        label_tree(root, context)
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
        Overlay {
            lower: Vec<PathBuf>,
            upper: PathBuf,
            /// The data mount(2) was given (see [`overlay_data`]).
            data: String,
        },
        Bind {
            source: PathBuf,
            read_only: bool,
        },
        Erofs {
            image: PathBuf,
        },
        OverlayReadOnly {
            lower: Vec<PathBuf>,
        },
    }

    #[derive(Default)]
    pub struct Fake {
        pub table: Mutex<Vec<(PathBuf, Mount)>>,
        /// Overlay mounts are refused (as where overlayfs is not allowed).
        pub refuse_overlay: bool,
        /// EROFS mounts are refused (as on kernels without file-backed EROFS).
        pub refuse_erofs: bool,
        /// Trees labelled with an SELinux context, in order.
        pub labels: Mutex<Vec<(PathBuf, String)>>,
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
            work: &Path,
            target: &Path,
            context: Option<&str>,
        ) -> io::Result<()> {
            if self.refuse_overlay {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            let m = Mount::Overlay {
                lower: lower.to_vec(),
                upper: upper.to_path_buf(),
                data: overlay_data(lower, upper, work, context)?,
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

        fn label(&self, root: &Path, context: &str) -> io::Result<()> {
            let l = (root.to_path_buf(), context.to_string());
            self.labels.lock().unwrap().push(l);
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

    #[test]
    fn an_overlay_takes_the_selinux_context_quoted_only_where_the_kernel_has_selinux() {
        let (lower, upper, work) = (
            [PathBuf::from("/b/tree")],
            Path::new("/v/upper"),
            Path::new("/v/work"),
        );
        let plain = "lowerdir=/b/tree,upperdir=/v/upper,workdir=/v/work,metacopy=off,\
                     redirect_dir=off,index=off";
        let asked = Some("system_u:object_r:container_file_t:s0:c1,c2");
        let data = |selinux| {
            let c = view_context(asked, selinux);
            overlay_data(&lower, upper, work, c.as_deref()).unwrap()
        };
        assert_eq!(
            data(true),
            format!("{plain},context=\"system_u:object_r:container_file_t:s0:c1,c2\"")
        );
        assert_eq!(data(false), plain);
        assert_eq!(
            overlay_data(&lower, upper, work, None).unwrap(),
            plain,
            "no context asked"
        );
        assert_eq!(view_context(None, true), None);
        assert!(overlay_data(&lower, upper, work, Some("a\"b")).is_err());
    }

    #[test]
    fn selinux_is_seen_in_the_kernels_file_systems() {
        let with = "nodev\tsysfs\nnodev\tselinuxfs\n\text4\nnodev\toverlay\n";
        let without = "nodev\tsysfs\n\text4\nnodev\toverlay\nnodev\tselinuxfs2\n";
        assert!(has_selinuxfs(with));
        assert!(!has_selinuxfs(without));
        assert!(!has_selinuxfs(""));
    }

    /// Runs as root on a file system that keeps `security.*` attributes (those of the temp dir
    /// do whether or not SELinux is on; only the kernel's checks of the label differ).
    #[test]
    fn label_tree_labels_every_entry_links_included() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("view");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink("nowhere", root.join("a/l")).unwrap();
        let c = "system_u:object_r:container_file_t:s0:c1,c2";
        label_tree(&root, c).unwrap();
        for p in ["", "a", "a/b", "a/b/f", "a/l"] {
            let mut buf = vec![0u8; 256];
            let n = rustix::fs::lgetxattr(root.join(p), "security.selinux", &mut buf[..])
                .unwrap_or_else(|e| panic!("{p}: {e}"));
            assert_eq!(&buf[..n], c.as_bytes(), "{p}");
        }
    }
}

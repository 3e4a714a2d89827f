//! Which volume capabilities cachevol serves: mounted directories (never raw block devices) in
//! the access modes where every pod gets its own view of a snapshot. Shared by CreateVolume,
//! ValidateVolumeCapabilities and the node's publish calls so they can never disagree.

use super::pb::volume_capability::access_mode::Mode;
use super::pb::volume_capability::AccessType;
use super::pb::VolumeCapability;

/// The access modes cachevol accepts.
///
/// - Writers on one node (`SINGLE_NODE_*_WRITER`) and on many nodes (`MULTI_NODE_MULTI_WRITER`,
///   what a ReadWriteMany claim asks for): each pod writes its own view and commits a whole
///   snapshot, so any number of writers is safe.
/// - Read-only modes (`SINGLE_NODE_READER_ONLY`, `MULTI_NODE_READER_ONLY`): a view of the newest
///   snapshot that never commits, e.g. a ReadOnlyMany claim of a cache other jobs fill.
///
/// `MULTI_NODE_SINGLE_WRITER` is refused: Kubernetes never asks for it, and cachevol does not
/// give a single writer among many nodes any meaning of its own (`mode: locked` is the way to
/// have one writer at a time).
pub const SUPPORTED_MODES: &[Mode] = &[
    Mode::SingleNodeWriter,
    Mode::SingleNodeSingleWriter,
    Mode::SingleNodeMultiWriter,
    Mode::MultiNodeMultiWriter,
    Mode::SingleNodeReaderOnly,
    Mode::MultiNodeReaderOnly,
];

/// Whether an access mode never writes.
pub fn is_read_only(mode: Mode) -> bool {
    matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
}

/// Checks one capability; the error says what is wrong in words a user can act on.
pub fn check(cap: &VolumeCapability) -> Result<Mode, String> {
    match &cap.access_type {
        None => return Err("access_type is missing: cachevol volumes are mounted (mount)".into()),
        Some(AccessType::Block(_)) => {
            return Err(
                "block access is not supported: a cachevol volume is a directory; use volumeMode: Filesystem"
                    .into(),
            )
        }
        // fs_type and mount flags are accepted and ignored (nothing is formatted, the view is a
        // directory on the node's own file system), except an SELinux `context=`: see
        // [`selinux_context`].
        Some(AccessType::Mount(_)) => {}
    }
    let raw = match &cap.access_mode {
        None => return Err("access_mode is missing".into()),
        Some(m) => m.mode,
    };
    match Mode::try_from(raw) {
        Ok(mode) if SUPPORTED_MODES.contains(&mode) => Ok(mode),
        Ok(Mode::Unknown) | Err(_) => Err(format!(
            "access mode {raw} is unknown; supported: {}",
            supported_list()
        )),
        Ok(mode) => Err(format!(
            "access mode {} is not supported; supported: {}",
            mode.as_str_name(),
            supported_list()
        )),
    }
}

/// The SELinux context the pod's view is to be mounted with: the `context=` option of the
/// mount flags, which kubelet passes (`context="system_u:object_r:container_file_t:s0:c1,c2"`)
/// when the CSIDriver says `seLinuxMount: true` and the pod has an SELinux label, instead of
/// relabelling every file itself. Quotes are removed; a flag may hold several options
/// separated by commas, and commas inside quotes belong to the value. None when no flag names
/// a context. Every other mount flag is ignored, as before.
///
/// Refused (the caller's mistake, whatever the node's kernel): an unterminated quote, an empty
/// context, and two different contexts.
pub fn selinux_context(cap: &VolumeCapability) -> Result<Option<String>, String> {
    let Some(AccessType::Mount(m)) = &cap.access_type else {
        return Ok(None);
    };
    let mut found: Option<String> = None;
    for flag in &m.mount_flags {
        for opt in split_options(flag)? {
            let Some(value) = opt.strip_prefix("context=") else {
                continue;
            };
            let value = match value.strip_prefix('"') {
                Some(rest) => rest
                    .strip_suffix('"')
                    .filter(|v| !v.contains('"'))
                    .ok_or_else(|| format!("mount flag {opt:?}: stray quote in the context"))?,
                None if value.contains('"') => {
                    return Err(format!("mount flag {opt:?}: stray quote in the context"))
                }
                None => value,
            };
            if value.is_empty() || value.chars().any(|c| c.is_control() || c == ' ') {
                return Err(format!(
                    "mount flag {opt:?}: not an SELinux context (user:role:type:level)"
                ));
            }
            match &found {
                Some(f) if f != value => {
                    return Err(format!(
                        "mount flags name two SELinux contexts: {f:?} and {value:?}"
                    ))
                }
                _ => found = Some(value.to_string()),
            }
        }
    }
    Ok(found)
}

/// One mount flag's options: split at commas outside double quotes (an SELinux level such as
/// `s0:c1,c2` is quoted because of its comma).
fn split_options(flag: &str) -> Result<Vec<&str>, String> {
    let (mut out, mut start, mut quoted) = (Vec::new(), 0, false);
    for (i, c) in flag.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&flag[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err(format!("mount flag {flag:?}: unterminated quote"));
    }
    out.push(&flag[start..]);
    Ok(out.into_iter().filter(|o| !o.is_empty()).collect())
}

fn supported_list() -> String {
    SUPPORTED_MODES
        .iter()
        .map(|m| m.as_str_name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::super::pb::volume_capability::{AccessMode, BlockVolume, MountVolume};
    use super::*;

    fn cap(access: Option<AccessType>, mode: i32) -> VolumeCapability {
        VolumeCapability {
            access_type: access,
            access_mode: Some(AccessMode { mode }),
        }
    }

    fn mount() -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume::default()))
    }

    #[test]
    fn mount_with_writer_and_reader_modes_is_accepted() {
        for m in SUPPORTED_MODES {
            assert_eq!(check(&cap(mount(), *m as i32)), Ok(*m));
        }
    }

    fn flags(flags: &[&str]) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                mount_flags: flags.iter().map(|f| f.to_string()).collect(),
                ..Default::default()
            })),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }
    }

    #[test]
    fn the_selinux_context_is_read_from_the_mount_flags() {
        let want = Some("system_u:object_r:container_file_t:s0:c1,c2".to_string());
        // As kubelet passes it: one flag, quoted because of the comma in the level.
        let got = selinux_context(&flags(&[
            "context=\"system_u:object_r:container_file_t:s0:c1,c2\"",
        ]));
        assert_eq!(got, Ok(want.clone()));
        // Among other options in one flag, and beside other flags (ignored).
        let got = selinux_context(&flags(&[
            "noatime",
            "ro,context=\"system_u:object_r:container_file_t:s0:c1,c2\",nodev",
        ]));
        assert_eq!(got, Ok(want));
        // Unquoted (no comma in it), and repeated with the same value.
        let got = selinux_context(&flags(&[
            "context=system_u:object_r:container_file_t:s0",
            "context=\"system_u:object_r:container_file_t:s0\"",
        ]));
        assert_eq!(
            got,
            Ok(Some("system_u:object_r:container_file_t:s0".to_string()))
        );
        // Other contexts and options are not `context=`.
        assert_eq!(
            selinux_context(&flags(&["fscontext=\"a:b:c:s0\"", "defcontext=a:b:c:s0"])),
            Ok(None)
        );
        assert_eq!(selinux_context(&flags(&[])), Ok(None));
        assert_eq!(selinux_context(&cap(mount(), 1)), Ok(None));
    }

    #[test]
    fn a_malformed_selinux_context_is_refused() {
        for bad in [
            &["context=\"a:b:c:s0:c1,c2"][..],
            &["context=a:b:c:s0\""],
            &["context=\"a:b\"c:s0\""],
            &["context="],
            &["context=\"\""],
            &["context=\"a:b:c:s0\"", "context=\"a:b:c:s0:c3\""],
        ] {
            assert!(selinux_context(&flags(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn block_is_refused_with_a_reason() {
        let e = check(&cap(
            Some(AccessType::Block(BlockVolume {})),
            Mode::SingleNodeWriter as i32,
        ))
        .unwrap_err();
        assert!(e.contains("block access is not supported"), "{e}");
    }

    #[test]
    fn unknown_and_unsupported_modes_are_refused() {
        let e = check(&cap(mount(), 0)).unwrap_err();
        assert!(e.contains("unknown"), "{e}");
        let e = check(&cap(mount(), 99)).unwrap_err();
        assert!(e.contains("unknown"), "{e}");
        let e = check(&cap(mount(), Mode::MultiNodeSingleWriter as i32)).unwrap_err();
        assert!(
            e.contains("MULTI_NODE_SINGLE_WRITER is not supported"),
            "{e}"
        );
        let e = check(&VolumeCapability {
            access_type: mount(),
            access_mode: None,
        })
        .unwrap_err();
        assert!(e.contains("access_mode"), "{e}");
        assert!(check(&cap(None, 1)).unwrap_err().contains("access_type"));
    }
}

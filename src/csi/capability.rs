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
        // fs_type and mount flags are accepted and ignored: nothing is formatted, the view is a
        // directory on the node's own file system.
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

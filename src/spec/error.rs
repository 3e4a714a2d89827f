//! The volume model's errors: a bad value of a named setting, or local records that cannot be
//! read or written. The CSI side turns them into gRPC codes in one place (`csi::error`).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A StorageClass parameter, volume attribute, annotation or flag has a bad value; names it.
    #[error("parameter {name:?}: {why}")]
    InvalidParameter { name: String, why: String },

    /// Local records (the controller's volume records) could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    pub(crate) fn parameter(name: impl Into<String>, why: impl Into<String>) -> Error {
        Error::InvalidParameter {
            name: name.into(),
            why: why.into(),
        }
    }
}

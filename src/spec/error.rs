//! The volume model's errors: a bad value of a named setting, or local records that cannot be
//! read or written. The CSI side turns them into gRPC codes in one place (`csi::error`).

use crate::engine;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A StorageClass parameter, volume attribute, annotation or flag has a bad value; names it.
    #[error("parameter {name:?}: {why}")]
    InvalidParameter { name: String, why: String },

    /// Local records (the controller's volume records) could not be read or written.
    #[error(transparent)]
    Io(#[from] engine::IoError),
}

impl Error {
    pub(crate) fn parameter(name: impl Into<String>, why: impl Into<String>) -> Error {
        Error::InvalidParameter {
            name: name.into(),
            why: why.into(),
        }
    }
}

//! The driver's errors, named for the conditions of the CSI spec's error tables, and the one
//! place where they (and the engine's errors) become gRPC status codes.

use tonic::{Code, Status};

use crate::{engine, node, spec};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A REQUIRED field is missing or empty (spec: "Missing required field").
    #[error("{0} is required")]
    MissingField(&'static str),

    /// A field has a value the plugin does not accept (spec: "Invalid or unsupported field").
    #[error("{field}: {why}")]
    InvalidField { field: &'static str, why: String },

    /// A StorageClass parameter (or volume attribute) has a bad value; names the parameter.
    #[error("parameter {name:?}: {why}")]
    InvalidParameter { name: String, why: String },

    /// A volume capability cachevol cannot serve. CreateVolume has no row of its own for this in
    /// the spec, so it is the general "unsupported field" case: INVALID_ARGUMENT.
    #[error("unsupported volume capability: {0}")]
    UnsupportedCapability(String),

    /// No volume with this id (ValidateVolumeCapabilities, node calls).
    #[error("volume {0:?} does not exist")]
    VolumeNotFound(String),

    /// CreateVolume: the name is taken by a volume with other attributes or capacity.
    #[error("{0}")]
    VolumeIncompatible(String),

    /// Another call on the same volume is in flight (spec: "Operation pending for volume").
    #[error("an operation on {0:?} is already in progress; retry later")]
    OperationPending(String),

    /// Not possible now, possible later: a locked cache held by another pod, the Kubernetes API
    /// out of reach. The CO retries with backoff; the message says what it waits for.
    #[error("{0}")]
    Unavailable(String),

    /// CreateVolume: the capacity range cannot be honoured.
    #[error("capacity_range: {0}")]
    CapacityOutOfRange(String),

    /// Local state (records, sockets, state dirs) could not be read or written.
    #[error(transparent)]
    Io(#[from] engine::IoError),

    /// A volume setting is invalid (a StorageClass parameter, an annotation, a volume
    /// attribute, the volume context of a publish: named), or the controller's records cannot
    /// be read or written. Kept as the volume model's own error; its code is chosen below.
    #[error(transparent)]
    Spec(#[from] spec::Error),

    #[error(transparent)]
    Engine(#[from] engine::Error),
}

impl Error {
    pub(crate) fn invalid(field: &'static str, why: impl Into<String>) -> Error {
        Error::InvalidField {
            field,
            why: why.into(),
        }
    }

    /// The gRPC code for this error, following the CSI spec's general and per-RPC tables.
    pub fn code(&self) -> Code {
        match self {
            Error::MissingField(_)
            | Error::InvalidField { .. }
            | Error::InvalidParameter { .. }
            | Error::UnsupportedCapability(_) => Code::InvalidArgument,
            Error::VolumeNotFound(_) => Code::NotFound,
            Error::VolumeIncompatible(_) => Code::AlreadyExists,
            Error::OperationPending(_) => Code::Aborted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::CapacityOutOfRange(_) => Code::OutOfRange,
            Error::Spec(spec::Error::InvalidParameter { .. }) => Code::InvalidArgument,
            Error::Io { .. } | Error::Spec(spec::Error::Io { .. }) => Code::Internal,
            Error::Engine(e) => engine_code(e),
        }
    }
}

/// The gRPC code for an engine error. A store that cannot be reached is UNAVAILABLE (the CO
/// retries); data that is not a valid snapshot is DATA_LOSS; refusals on purpose say why.
pub fn engine_code(e: &engine::Error) -> Code {
    use engine::Error as E;
    match e {
        E::InvalidName { .. } | E::InvalidStore { .. } => Code::InvalidArgument,
        // The StorageClass names a store that is not there: the operator must fix it.
        E::NoSuchBucket { .. } | E::NoCredentials { .. } => Code::FailedPrecondition,
        E::NoSuchKey { .. } | E::NoSuchGeneration { .. } => Code::NotFound,
        // Another writer holds the lock or keeps winning the race: retry later.
        E::Lock(_)
        | E::TooManyConflicts { .. }
        | E::InFlightLapsed { .. }
        | E::PacksGone { .. } => Code::Aborted,
        E::OverBudget { .. } => Code::ResourceExhausted,
        // Refused on purpose and retrying will not help until something changes.
        E::Fenced { .. } | E::Unsupported { .. } | E::UnsupportedVersion { .. } => {
            Code::FailedPrecondition
        }
        E::Corrupt { .. } => Code::DataLoss,
        e if e.is_store_unavailable() => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// Codes that mean the request was refused as asked (logged quietly), as opposed to failures of
/// the plugin or its store.
pub(crate) fn is_callers_fault(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::Aborted
            | Code::OutOfRange
            | Code::FailedPrecondition
            | Code::Unimplemented
    )
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        // The spec wants `details` empty and a human-readable message.
        Status::new(e.code(), e.to_string())
    }
}

impl From<node::Error> for Error {
    /// The node's errors by meaning: an invalid setting stays the volume model's error, a call
    /// in flight is "operation pending", a held lock is retryable, an unknown target is a
    /// volume not found.
    fn from(e: node::Error) -> Error {
        match e {
            node::Error::Spec(e) => Error::Spec(e),
            node::Error::Busy(what) => Error::OperationPending(what),
            node::Error::Unavailable(what) => Error::Unavailable(what),
            node::Error::NotPublished(id, target) => {
                Error::VolumeNotFound(format!("{id} at {target}"))
            }
            node::Error::Io(e) => Error::Io(e),
            node::Error::Engine(e) => Error::Engine(e),
        }
    }
}

impl From<engine::Error> for Status {
    fn from(e: engine::Error) -> Status {
        Status::from(Error::Engine(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_spec_tables() {
        let cases = [
            (Error::MissingField("name"), Code::InvalidArgument),
            (
                Error::UnsupportedCapability("block".into()),
                Code::InvalidArgument,
            ),
            (Error::VolumeNotFound("cv-1".into()), Code::NotFound),
            (Error::VolumeIncompatible("x".into()), Code::AlreadyExists),
            (Error::OperationPending("x".into()), Code::Aborted),
            (Error::CapacityOutOfRange("x".into()), Code::OutOfRange),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
    }

    #[test]
    fn engine_errors_map_by_meaning() {
        let timeout = engine::Error::StoreTimeout {
            op: "get",
            location: "x".into(),
            seconds: 1,
        };
        assert_eq!(Status::from(timeout).code(), Code::Unavailable);
        let corrupt = engine::Error::Corrupt {
            location: "x".into(),
            why: "bad".into(),
        };
        assert_eq!(Status::from(corrupt).code(), Code::DataLoss);
        let name = engine::names::key("../x").unwrap_err();
        let status = Status::from(name);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("cache key"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn volume_model_errors_map_by_meaning() {
        let bad = spec::VolumeSpec::from_context(&Default::default()).unwrap_err();
        let s = Status::from(Error::from(bad));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("\"store\""), "{}", s.message());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        // A state dir that is a file: the records cannot be opened.
        let io = spec::records::Records::open(&file).err().unwrap();
        assert_eq!(Status::from(Error::from(io)).code(), Code::Internal);
    }

    #[test]
    fn missing_field_names_the_field() {
        let s = Status::from(Error::MissingField("volume_capabilities"));
        assert_eq!(s.message(), "volume_capabilities is required");
    }
}

//! The engine's error type: one enum whose variants say what went wrong in terms a user can act
//! on, so the CLI and the CSI adapters can map them to exit codes and gRPC codes in one place.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A file system call that failed: what was done, to which path, and the system's error. The
/// one I/O error of every layer: the volume model, the node and the CSI services wrap it
/// (`#[from]`) rather than declare their own, so the path and the `std::io::Error` reach the
/// top intact.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct IoError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    pub fn new(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> IoError {
        IoError {
            op,
            path: path.into(),
            source,
        }
    }

    /// An I/O error that is not the system's: a refusal or a failure found by the caller
    /// (a child that exited badly, a torn file), said in the same `op path: why` form.
    pub fn other(
        op: &'static str,
        path: impl Into<PathBuf>,
        why: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> IoError {
        IoError::new(op, path, std::io::Error::other(why))
    }
}

/// `map_err(io("read", &path))?`: the error of `op` on `path`, which `?` turns into the
/// caller's error type.
pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> IoError {
    let path = path.into();
    move |source| IoError { op, path, source }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        what: &'static str,
        value: String,
        why: &'static str,
    },

    #[error("invalid store URL {url:?}: {why}")]
    InvalidStore { url: String, why: String },

    #[error(transparent)]
    Io(#[from] IoError),

    #[error("store {op} {location}: {source}")]
    Store {
        op: &'static str,
        location: String,
        #[source]
        source: object_store::Error,
    },

    /// The store URL names a bucket (S3, GCS) or container (Azure) that does not exist: a
    /// configuration error, the same for every command.
    #[error("store {url}: bucket {bucket:?} does not exist (create it, or fix the store URL)")]
    NoSuchBucket { url: String, bucket: String },

    /// No credentials in the environment, and the instance metadata service (the SDKs' last
    /// resort) gave none either: a configuration error, said in the user's terms.
    #[error("store {url}: no credentials found for {scheme}:// ({hint})")]
    NoCredentials {
        url: String,
        scheme: &'static str,
        hint: &'static str,
    },

    #[error("store {op} {location}: timed out after {seconds}s")]
    StoreTimeout {
        op: &'static str,
        location: String,
        seconds: u64,
    },

    /// The store holds something that is not a valid snapshot: refused before anything is written.
    #[error("refusing snapshot {location}: {why}")]
    Corrupt { location: String, why: String },

    #[error("snapshot {location} has format version {found}; this cachevol reads versions up to {supported}: upgrade cachevol")]
    UnsupportedVersion {
        location: String,
        found: u32,
        supported: u32,
    },

    #[error("cache {key:?} has no generation {generation}")]
    NoSuchGeneration { key: String, generation: u64 },

    #[error("cache {key:?} has no snapshot in scope {scope:?}")]
    NoSuchKey { scope: String, key: String },

    /// A fenced commit lost its claim on the next generation.
    #[error("commit of {key:?} fenced: it restored generation {restored}, but generation {taken} was already written by another writer; this commit is refused so it cannot overwrite newer data")]
    Fenced {
        key: String,
        restored: u64,
        taken: u64,
    },

    #[error("cache {key:?} is {size} bytes, over its budget of {budget} bytes: commit refused, nothing uploaded")]
    OverBudget { key: String, size: u64, budget: u64 },

    #[error("cannot commit {path}: {why}")]
    Unsupported { path: PathBuf, why: String },

    #[error("commit of {key:?} gave up after {attempts} conflicting attempts")]
    TooManyConflicts { key: String, attempts: u32 },

    /// A commit could not keep its in-flight marker fresh, so GC may have deleted packs it
    /// reuses: it is refused rather than report a generation that might not restore.
    #[error("commit of {key:?} refused: its in-flight marker was last written {seconds}s ago, so garbage collection may have deleted packs it reuses; nothing was published, commit again")]
    InFlightLapsed { key: String, seconds: u64 },

    /// A union commit merged a newer generation whose packs GC is deleting or has deleted.
    #[error("commit of {key:?} refused: {why}; nothing was published, commit again")]
    PacksGone { key: String, why: String },

    /// Cancelled before its point of no return (a CLI that got SIGINT or SIGTERM): no
    /// generation was created and the head did not move.
    #[error("commit of {key:?} cancelled {by}: nothing was committed, the cache keeps its previous generation")]
    Cancelled {
        key: String,
        /// Who asked, in words ("by SIGTERM").
        by: String,
        /// The signal that asked, when one did (the CLI exits 128 + it).
        signal: Option<i32>,
    },

    #[error("{0}")]
    Lock(String),
}

impl Error {
    pub(crate) fn corrupt(location: impl Into<String>, why: impl Into<String>) -> Error {
        Error::Corrupt {
            location: location.into(),
            why: why.into(),
        }
    }

    /// True for errors that mean the store could not be reached or answered badly, as opposed to
    /// errors in the data or the request: callers degrade to a stale or empty cache on these.
    pub fn is_store_unavailable(&self) -> bool {
        match self {
            // Not reachable as configured: callers that degrade (a pod starting with an empty
            // cache) do so, and say why.
            Error::StoreTimeout { .. }
            | Error::NoSuchBucket { .. }
            | Error::NoCredentials { .. } => true,
            Error::Store { source, .. } => !matches!(
                source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. }
            ),
            _ => false,
        }
    }
}

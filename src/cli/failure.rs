//! What ends a CLI command with a failure: an engine error, or a command line the engine never
//! sees (a key's `{hashFiles:…}` that matches nothing, two caches in one directory); each with
//! its exit code and the `kind` its JSON report names.

use crate::engine::Error;

use super::exit;

#[derive(Debug)]
pub enum Failure {
    Engine(Error),
    /// The command line is wrong: exit 2, the message says what to change.
    Usage(String),
    /// `--fail-on-miss` and no snapshot: exit 3.
    Miss(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Engine(e)
    }
}

impl From<crate::engine::IoError> for Failure {
    fn from(e: crate::engine::IoError) -> Failure {
        Failure::Engine(e.into())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Engine(e) => e.fmt(f),
            Failure::Usage(m) | Failure::Miss(m) => f.write_str(m),
        }
    }
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Engine(e) => super::exit_code(e),
            Failure::Usage(_) => exit::USAGE,
            Failure::Miss(_) => exit::NOT_FOUND,
        }
    }

    /// The class of failure scripts branch on (`error.kind` in JSON), one per exit code but for
    /// a miss, which shares 3 with an unknown cache.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Miss(_) => "miss",
            Failure::Engine(Error::Cancelled { .. }) => "cancelled",
            _ => kind_of(self.exit_code()),
        }
    }
}

/// The kind for an exit code (see `exit`).
pub fn kind_of(code: i32) -> &'static str {
    match code {
        exit::USAGE => "usage",
        exit::NOT_FOUND => "not_found",
        exit::REFUSED => "refused",
        exit::CORRUPT => "corrupt",
        exit::UNAVAILABLE => "unavailable",
        c if c > 128 => "cancelled",
        _ => "error",
    }
}

//! cachevol: persistent, incremental, deduplicated cache volumes for ephemeral CI pods.
//!
//! - [`engine`]: snapshots of directories in object storage (no gRPC, no Kubernetes).
//! - [`cli`]: the `cachevol` command line around the engine.

pub mod cli;
pub mod engine;

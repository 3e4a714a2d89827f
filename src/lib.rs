//! cachevol: persistent, incremental, deduplicated cache volumes for ephemeral CI pods.
//!
//! Layers, each importing only those below it (checked by `tests/layers.rs`; see
//! docs/architecture.md):
//!
//! - [`engine`]: snapshots of directories in object storage (no gRPC, no Kubernetes).
//! - [`spec`]: the volume model: attributes, modes, pods, endings, sizes, retention.
//! - [`node`]: the node plugin's volumes: node-local bases, overlay views, mounts, commits.
//! - [`csi`]: the CSI driver's gRPC services (Identity, Controller, Node) on a unix socket.
//! - [`cluster`]: the Kubernetes side: commits by pod phase, Leases, Events, claim annotations.
//! - [`metrics`]: the Prometheus registry a daemon owns, and the /metrics, /healthz, /readyz
//!   HTTP endpoint.
//! - [`daemon`]: `cachevol node` and `cachevol controller` as supervised processes.
//! - [`cli`]: the `cachevol` command line around the engine and the daemons.

// No unsafe code: system calls go through std, rustix or nix (the benchmark's getrusage, in a
// build with the `bench` feature).
#![forbid(unsafe_code)]

pub mod cli;
pub mod cluster;
pub mod csi;
pub mod daemon;
pub mod engine;
pub mod metrics;
pub mod node;
pub mod spec;

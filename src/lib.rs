//! cachevol: persistent, incremental, deduplicated cache volumes for ephemeral CI pods.
//!
//! - [`engine`]: snapshots of directories in object storage (no gRPC, no Kubernetes).
//! - [`cli`]: the `cachevol` command line around the engine.
//! - [`csi`]: the CSI driver's gRPC services (Identity, Controller) on a unix socket.
//! - [`node`]: the node plugin's volumes: node-local bases, overlay views, mounts, commits.
//! - [`cluster`]: the Kubernetes side: commits by pod phase, Leases, Events, claim annotations.
//! - [`metrics`]: Prometheus metrics and the /metrics, /healthz, /readyz HTTP endpoint.

// No unsafe code: system calls go through std or rustix. `deny` rather than `forbid` only for
// the single exception, `cli::bench::wait4` (neither has wait4 with rusage), which allows it on
// that one function; any other unsafe block fails the build.
#![deny(unsafe_code)]

pub mod cli;
pub mod cluster;
pub mod csi;
pub mod engine;
pub mod metrics;
pub mod node;

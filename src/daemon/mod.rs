//! The daemons' wiring: `cachevol node` and `cachevol controller` as processes. Their flags,
//! start-up (state dir, store, cluster connection), the metrics and health server, and a
//! supervised set of long-running tasks ([`Tasks`]): the gRPC server serves until SIGTERM, and
//! if the cluster agent, the leader election, the garbage collector or the metrics server ends
//! or panics meanwhile, the process exits with an error so that kubelet or the Deployment
//! restarts it instead of it serving on without that task.
//!
//! Everything the daemons do is in the layers below: the CSI services ([`crate::csi`]), the
//! cluster adapter ([`crate::cluster`]), the node's volumes ([`crate::node`]), the volume model
//! ([`crate::spec`]) and the engine.

pub mod controller;
pub mod health;
pub mod logs;
pub mod node;
mod tasks;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use tasks::{TaskEnded, Tasks};

use crate::csi;
use crate::engine::GcPolicy;
use crate::metrics::Metrics;
use crate::spec::{self, Retention};

/// Why a daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Start-up or serving failed (bad flags, the socket, the store, the state dir).
    #[error(transparent)]
    Csi(#[from] csi::Error),
    /// A supervised task ended while serving.
    #[error(transparent)]
    TaskEnded(#[from] TaskEnded),
}

impl From<spec::Error> for Error {
    fn from(e: spec::Error) -> Error {
        Error::Csi(e.into())
    }
}

impl Error {
    /// The process exit code: 2 for a wrong flag or setting (as for the command line), 1 for
    /// anything else, a dead task included.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Csi(
                csi::Error::InvalidField { .. }
                | csi::Error::InvalidParameter { .. }
                | csi::Error::Spec(spec::Error::InvalidParameter { .. })
                | csi::Error::MissingField(_),
            ) => 2,
            _ => 1,
        }
    }
}

/// Checks `--store`, the default store of volumes that name none: it is written into volume
/// attributes, so it must pass the volume model's check (no credentials), not only open.
fn check_store_flag(url: &str) -> Result<(), csi::Error> {
    spec::check_store_url(url).map_err(|why| csi::Error::invalid("--store", why))
}

/// Runs a daemon's start-up and serving; logs and prints why it stopped, and returns the exit
/// code.
async fn exit_code(what: &str, run: impl std::future::Future<Output = Result<(), Error>>) -> i32 {
    match run.await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("cachevol {what}: {e}");
            eprintln!("cachevol {what}: {e}");
            e.exit_code()
        }
    }
}

/// Binds /metrics (rendering `metrics`, the registry the daemon created at start-up), /healthz
/// and /readyz on `addr` (when given) for the node plugin or the controller, ready while the state dir is writable and the store (when given: the
/// controller's) answered its last health check, and adds the server to `tasks`.
pub async fn serve_metrics(
    addr: Option<SocketAddr>,
    state_dir: &Path,
    store: Option<Arc<health::StoreHealth>>,
    metrics: &Metrics,
    tasks: &mut Tasks,
) -> Result<(), csi::Error> {
    let Some(addr) = addr else {
        return Ok(());
    };
    let dir = state_dir.to_path_buf();
    let ready: crate::metrics::ReadyFn = Arc::new(move || {
        csi::identity::check_writable(&dir)?;
        store.as_ref().map_or(Ok(()), |s| s.get())
    });
    let (bound, server) = crate::metrics::bind(addr, ready, metrics.clone())
        .await
        .map_err(crate::engine::io("serve metrics on", addr.to_string()))?;
    tracing::info!(address = %bound, "serving /metrics, /healthz, /readyz");
    tasks.spawn("metrics server", server);
    Ok(())
}

/// Flags the node plugin and the controller share.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// The CSI driver's name (GetPluginInfo): the CSIDriver object's name and the
    /// StorageClasses' provisioner. A second install in one cluster takes another name; the
    /// names of its Leases, its lock label and its Events' reporting component derive from it.
    /// Node plugin and controller of one install must agree.
    #[arg(long, env = "CACHEVOL_DRIVER_NAME", default_value = spec::driver::DEFAULT)]
    pub driver_name: spec::DriverName,
    /// Use the Kubernetes API (pod phases, Leases, Events, claim annotations).
    #[arg(long, env = "CACHEVOL_CLUSTER", value_enum, default_value_t)]
    pub cluster: crate::cluster::ClusterMode,
    /// The driver's own namespace: its Leases live here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "cachevol")]
    pub namespace: String,
    /// How long a Lease stays held without renewal (locked caches, the controller's leader).
    /// A node that dies loses its locks after this long.
    #[arg(long, value_parser = spec::parse_duration, default_value = "30s")]
    pub lease_duration: Duration,
    /// Serve Prometheus metrics and health on this address (/metrics, /healthz, /readyz),
    /// e.g. 0.0.0.0:9090. Off when not given.
    #[arg(long, env = "CACHEVOL_METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,
    /// How logs are written to stderr: text (coloured only on a terminal) or json (one object
    /// a line, for log pipelines).
    #[arg(long, env = logs::LOG_FORMAT_ENV, value_enum, default_value_t)]
    pub log_format: logs::LogFormat,
}

/// The CSI Identity service of a daemon whose state dir is `state_dir`, named as `cluster`
/// says; both daemons make theirs here, so that their GetPluginInfo always agree.
pub fn identity(
    state_dir: std::path::PathBuf,
    cluster: &ClusterArgs,
    metrics: Metrics,
) -> csi::identity::IdentityService {
    csi::identity::IdentityService::new(state_dir)
        .with_driver_name(cluster.driver_name.clone())
        .with_metrics(metrics)
}

/// Retention rules as flags, shared by `cachevol gc` and the controller's periodic GC.
#[derive(clap::Args, Debug, Clone)]
pub struct RetentionArgs {
    /// Generations kept per key.
    #[arg(long, default_value_t = 3)]
    keep_last: usize,
    /// Drop keys unused for this long (e.g. 30d; 0 disables).
    #[arg(long, value_parser = spec::parse_duration, default_value = "30d")]
    ttl: Duration,
    /// Evict least recently used keys while the scope stores more than this (e.g. 50Gi).
    #[arg(long, value_parser = spec::parse_size)]
    scope_budget: Option<u64>,
    /// Unreferenced packs younger than this are kept. Running commits do not depend on it
    /// (their in-flight markers protect what they use, whatever the grace); quarantined packs
    /// are deleted at once.
    #[arg(long, value_parser = spec::parse_duration, default_value = "1h")]
    grace: Duration,
}

impl RetentionArgs {
    pub fn retention(&self) -> Retention {
        Retention {
            keep_last: self.keep_last,
            ttl: self.ttl,
            scope_budget: self.scope_budget,
            grace: self.grace,
        }
    }

    pub fn policy(&self, dry_run: bool) -> GcPolicy {
        self.retention().policy(dry_run)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::csi::pb::identity_server::Identity;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        cluster: ClusterArgs,
    }

    async fn plugin_name(args: &[&str]) -> String {
        let flags =
            Flags::try_parse_from(std::iter::once("cachevol").chain(args.iter().copied())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        identity(dir.path().to_path_buf(), &flags.cluster, Metrics::new())
            .get_plugin_info(tonic::Request::new(Default::default()))
            .await
            .unwrap()
            .into_inner()
            .name
    }

    #[tokio::test]
    async fn the_driver_name_flag_reaches_get_plugin_info() {
        assert_eq!(plugin_name(&[]).await, "cachevol.dev");
        assert_eq!(
            plugin_name(&["--driver-name", "canary.cachevol.dev"]).await,
            "canary.cachevol.dev"
        );
    }

    #[test]
    fn a_driver_name_the_csi_spec_refuses_is_a_usage_error() {
        for bad in ["-canary", "canary_cachevol", &"a".repeat(64), ""] {
            let flag = format!("--driver-name={bad}");
            let e = match Flags::try_parse_from(["cachevol", &flag]) {
                Ok(_) => panic!("--driver-name {bad:?} accepted"),
                Err(e) => e,
            };
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{e}");
        }
    }
}

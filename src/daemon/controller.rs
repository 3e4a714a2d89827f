//! `cachevol controller`: the CSI Identity and Controller services for csi-provisioner, the
//! leader election and periodic garbage collection of the stores, and the metrics server, as one
//! supervised process.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::health::{StoreHealth, STORE_CHECK_INTERVAL, STORE_CHECK_TIMEOUT};
use super::{ClusterArgs, Error, RetentionArgs, Tasks};
use crate::cluster;
use crate::csi::controller::ControllerService;
use crate::csi::pb::controller_server::ControllerServer;
use crate::csi::pb::identity_server::IdentityServer;
use crate::csi::{self, server};
use crate::engine::Store;
use crate::metrics::Metrics;
use crate::spec::{self, records::Records};

/// Default controller state dir (volume records).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cachevol-controller";

/// `cachevol controller`: the CSI Identity and Controller services for csi-provisioner.
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// The CSI endpoint to serve on.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Run retention and garbage collection of the stores this often (0 turns it off). With a
    /// cluster, only the replica holding the leader Lease collects.
    #[arg(long, value_parser = spec::parse_duration, default_value = "1h")]
    pub gc_interval: std::time::Duration,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

/// Runs the controller until SIGTERM/SIGINT or until a supervised task dies; returns the process
/// exit code. `store`: the default store URL (`--store`); `state_dir`: `--state-dir`, default
/// [`DEFAULT_STATE_DIR`].
pub async fn run(args: ControllerArgs, store: String, state_dir: Option<PathBuf>) -> i32 {
    super::exit_code("controller", start(args, store, state_dir)).await
}

async fn start(
    args: ControllerArgs,
    store_url: String,
    state_dir: Option<PathBuf>,
) -> Result<(), Error> {
    let state_dir = state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let path = server::parse_endpoint(&args.endpoint)?;
    super::check_store_flag(&store_url)?;
    // The process's registry, served on /metrics.
    let metrics = Metrics::new();
    let store = metrics.count_store(Store::open(&store_url).map_err(csi::Error::from)?);
    if store.local_root().is_some() {
        tracing::warn!(
            store = store.display_url(),
            "the default store is a local directory: only nodes that mount the same path share caches"
        );
    }
    let records = Arc::new(Records::open(&state_dir)?);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        store = store.display_url(),
        driver = %args.cluster.driver_name,
        state_dir = %state_dir.display(),
        volumes = records.len(),
        "cachevol controller starting"
    );
    let client = cluster::connect(args.cluster.cluster)
        .await
        .map_err(|why| csi::Error::Unavailable(format!("--cluster: {why}")))?;
    match &client {
        Some(_) => tracing::info!(
            namespace = args.cluster.namespace,
            "cluster features on: claim annotations are read, GC runs under the leader Lease"
        ),
        None => tracing::info!(
            "cluster features off: no Kubernetes API in use (claim annotations are not read)"
        ),
    }
    let mut tasks = Tasks::new();
    let leader = Arc::new(AtomicBool::new(client.is_none()));
    let lock_leases = client.as_ref().map(|c| {
        cluster::lease::Leases::new(
            c.clone(),
            &args.cluster.namespace,
            args.cluster.lease_duration,
        )
        .for_driver(&args.cluster.driver_name)
    });
    // Leadership matters only for GC: without it, no replica takes the Lease.
    if let (Some(c), false) = (&client, args.gc_interval.is_zero()) {
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
            format!(
                "{}-{}",
                crate::engine::hostname().unwrap_or_else(|| "controller".into()),
                std::process::id()
            )
        });
        let leases = cluster::lease::Leases::new(
            c.clone(),
            &args.cluster.namespace,
            args.cluster.lease_duration,
        )
        .for_driver(&args.cluster.driver_name);
        tasks.spawn(
            "leader election",
            cluster::gc::lead_forever(
                leases,
                identity,
                args.cluster.lease_duration,
                leader.clone(),
            ),
        );
    }
    if !args.gc_interval.is_zero() {
        let collector = cluster::gc::Collector {
            default_store: store_url.clone(),
            records: records.clone(),
            state_dir: state_dir.clone(),
            policy: args.retention.policy(false),
            interval: args.gc_interval,
            // Lock Leases free for a few lease durations, nobody waiting: a dead node's.
            locks: lock_leases.map(|l| (l, args.cluster.lease_duration * 4)),
            metrics: metrics.clone(),
        };
        tasks.spawn("garbage collector", collector.run(leader.clone()));
    }
    // The store's health goes to /readyz and cachevol_store_up, never to Probe: the
    // livenessprobe sidecar would restart the controller for an outage a restart cannot fix.
    let health = Arc::new(StoreHealth::new(store, metrics.clone()));
    tasks.spawn(
        "store health check",
        health
            .clone()
            .watch(STORE_CHECK_INTERVAL, STORE_CHECK_TIMEOUT),
    );
    {
        let leader = leader.clone();
        let metrics = metrics.clone();
        tasks.spawn("leader gauge", async move {
            loop {
                metrics.leader(leader.load(std::sync::atomic::Ordering::Relaxed));
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }
    super::serve_metrics(
        args.cluster.metrics_address,
        &state_dir,
        Some(health),
        &metrics,
        &mut tasks,
    )
    .await?;
    let identity = super::identity(state_dir, &args.cluster, metrics.clone());
    let controller = ControllerService::new(records, store_url)
        .with_client(client)
        .with_metrics(metrics);
    let socket = server::Socket::bind(&path)?;
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(ControllerServer::new(controller));
    tasks.serve(server::serve(socket, router)).await??;
    Ok(())
}

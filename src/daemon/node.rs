//! `cachevol node`: the CSI Identity and Node services for kubelet, the cluster agent when a
//! Kubernetes API is in use, and the metrics server, as one supervised process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{ClusterArgs, Error, Tasks};
use crate::cluster::{self, agent::Agent};
use crate::csi::node::NodeService;
use crate::csi::pb::identity_server::IdentityServer;
use crate::csi::pb::node_server::NodeServer;
use crate::csi::{self, server};
use crate::engine::Store;
use crate::metrics::Metrics;
use crate::node::{NodeConfig, Report, Volumes};
use crate::spec;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/cachevol";

/// How often the node's gauges (bases, views) are sampled: their bytes take a walk of the bases.
const NODE_GAUGES_INTERVAL: Duration = Duration::from_secs(30);

/// `cachevol node`: the CSI Identity and Node services for kubelet.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// The CSI endpoint to serve on.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// This node's name (kubelet's node name).
    #[arg(long, env = "NODE_NAME")]
    pub node_id: String,
    /// Never use overlayfs: every view is a copy of its base.
    #[arg(long)]
    pub copy_views: bool,
    /// Bytes of base trees kept on the node (e.g. 50Gi); least recently used go first.
    #[arg(long, value_parser = spec::parse_size)]
    pub base_budget: Option<u64>,
    /// Write a fresh node's bases as read-only EROFS images (one file per base, mounted without
    /// a loop device: Linux 6.12 or later) instead of trees of files; where the kernel refuses,
    /// bases are trees whatever this says.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub base_images: bool,
    /// How long a NodePublishVolume of a locked cache held by another pod stays open waiting
    /// for its turn before answering UNAVAILABLE (kubelet then calls again; the pod keeps its
    /// place in line). Keep it below kubelet's 2-minute CSI call timeout.
    #[arg(long, value_parser = spec::parse_duration, default_value = "90s")]
    pub lock_wait: Duration,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Runs the node plugin until SIGTERM/SIGINT or until a supervised task dies; returns the
/// process exit code.
pub async fn run(args: NodeArgs, store: Option<String>, state_dir: Option<PathBuf>) -> i32 {
    super::exit_code("node", start(args, store, state_dir)).await
}

async fn start(
    args: NodeArgs,
    store: Option<String>,
    state_dir: Option<PathBuf>,
) -> Result<(), Error> {
    if args.node_id.is_empty() {
        return Err(csi::Error::MissingField("--node-id").into());
    }
    let state_dir = state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let path = server::parse_endpoint(&args.endpoint)?;
    if let Some(s) = &store {
        super::check_store_flag(s)?;
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node = args.node_id,
        driver = %args.cluster.driver_name,
        state_dir = %state_dir.display(),
        "cachevol node starting"
    );
    let client = cluster::connect(args.cluster.cluster)
        .await
        .map_err(|why| csi::Error::Unavailable(format!("--cluster: {why}")))?;
    // The process's registry, served on /metrics; the node reports into it always, and with a
    // cluster, Events on the pods too.
    let metrics = Metrics::new();
    let counted: Arc<dyn Report> = Arc::new(metrics.clone());
    let report: Arc<dyn Report> = match &client {
        Some(c) => Arc::new(cluster::events::ClusterReport {
            metrics: counted,
            events: cluster::events::Recorder::new(c.clone(), "cachevol-node", &args.node_id)
                .for_driver(&args.cluster.driver_name),
        }),
        None => counted,
    };
    // A store that cannot even be opened is a configuration error, found before anything (the
    // pending commits resumed below) would write to it; the volumes use the store opened here.
    let opened = store
        .as_deref()
        .map(Store::open)
        .transpose()
        .map_err(csi::Error::from)?;
    let mut volumes = Volumes::with(
        NodeConfig {
            node_id: args.node_id.clone(),
            state_dir: state_dir.clone(),
            default_store: store.clone(),
            force_copy: args.copy_views,
            base_budget: args.base_budget,
            base_images: args.base_images,
        },
        Arc::new(crate::node::mount::System),
        report,
    )
    .map_err(csi::Error::from)?;
    if let (Some(url), Some(s)) = (&store, opened) {
        volumes = volumes.with_store(url, s);
    }
    let volumes = Arc::new(volumes);
    let mut tasks = Tasks::new();
    let agent = client.map(|c| {
        Agent::new(
            volumes.clone(),
            c,
            &args.cluster.namespace,
            args.cluster.lease_duration,
            args.lock_wait,
            &args.cluster.driver_name,
        )
    });
    match &agent {
        Some(a) => {
            tracing::info!(
                namespace = args.cluster.namespace,
                "cluster features on: commits follow pod phases, locked caches take Leases"
            );
            tasks.spawn("cluster agent", a.clone().run());
        }
        None => tracing::info!(
            "cluster features off: no Kubernetes API in use; views are committed when unpublished"
        ),
    }
    let service = Arc::new(NodeService::new(volumes.clone(), agent).with_metrics(metrics.clone()));
    // Views left pending by a previous run (unpublished, not yet committed) are committed now.
    service.resume_pending().await;
    super::serve_metrics(
        args.cluster.metrics_address,
        &state_dir,
        None,
        &metrics,
        &mut tasks,
    )
    .await?;
    if args.cluster.metrics_address.is_some() {
        let volumes = volumes.clone();
        tasks.spawn("node gauges", async move {
            loop {
                volumes.report_gauges().await;
                tokio::time::sleep(NODE_GAUGES_INTERVAL).await;
            }
        });
    }
    let identity = super::identity(state_dir, &args.cluster, metrics);
    let socket = server::Socket::bind(&path)?;
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(service.clone()));
    let served = tasks.serve(server::serve(socket, router)).await;
    // Commits already started finish (or, past a dead task, are resumed by the next start).
    service.drain().await;
    served??;
    Ok(())
}

//! The Kubernetes side of cachevol: how the node plugin and the controller behave as cluster
//! citizens. The node's agent watches the pods of its node and commits their caches by phase
//! ([`agent`]); locked caches are serialized across the cluster with Leases, and the
//! controller's GC runs under a leader Lease ([`lease`]); every restore, commit, skip, wait and
//! refusal is an Event on the pod ([`events`]); claims are read for their annotations
//! ([`claims`]). The engine and the node's volumes know nothing of this: it is an adapter.

pub mod agent;
pub mod claims;
pub mod events;
pub mod gc;
pub mod lease;

/// Whether the node plugin and the controller use the Kubernetes API.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClusterMode {
    /// Use it when running in a pod (the in-cluster service account) or when KUBECONFIG is set.
    #[default]
    Auto,
    /// Use it; fail to start without it.
    On,
    /// Never: views are committed when unpublished, locked caches lock per node only.
    Off,
}

/// Connects to the Kubernetes API as `mode` asks; `None` when cluster features are off.
pub async fn connect(mode: ClusterMode) -> Result<Option<kube::Client>, String> {
    let wanted = match mode {
        ClusterMode::Off => false,
        ClusterMode::On => true,
        ClusterMode::Auto => {
            std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
                || std::env::var_os("KUBECONFIG").is_some()
        }
    };
    if !wanted {
        return Ok(None);
    }
    let config = kube::Config::infer()
        .await
        .map_err(|e| format!("no usable Kubernetes configuration: {e}"))?;
    let url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config)
        .map_err(|e| format!("cannot make a Kubernetes client: {e}"))?;
    tracing::info!(api = url, "using the Kubernetes API");
    Ok(Some(client))
}

/// Whether a kube error is the API's "your copy is stale" or "already exists" (409): the
/// caller reads again and retries.
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Whether a kube error is a 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

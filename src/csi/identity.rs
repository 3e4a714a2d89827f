//! The CSI Identity service, served by the node plugin and the controller alike: who the plugin
//! is, what it offers, and whether it is ready: its state dir is writable. Only local health:
//! Probe feeds the livenessprobe sidecar, and restarting a plugin cannot fix a store outage
//! (the controller reports its store's health in `/readyz` and `cachevol_store_up` instead).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::handle;
use super::pb::identity_server::Identity;
use super::pb::{self, plugin_capability};
use crate::metrics::Metrics;
use crate::spec::DriverName;

/// The plugin capabilities. The spec requires every instance of one plugin version to report
/// the same set, whichever services it serves, so the node plugin reports CONTROLLER_SERVICE
/// too: it tells the CO that a controller exists, not that this process is one.
pub const PLUGIN_SERVICES: &[plugin_capability::service::Type] =
    &[plugin_capability::service::Type::ControllerService];

#[derive(Clone)]
pub struct IdentityService {
    state_dir: PathBuf,
    /// GetPluginInfo's name: kubelet and csi-provisioner match it to the CSIDriver object and
    /// the StorageClass's provisioner.
    driver: DriverName,
    /// Last readiness reported (0 unknown, 1 ready, 2 not ready), to log changes only.
    last: Arc<AtomicU8>,
    /// Where each RPC is counted; nothing is counted without.
    metrics: Option<Metrics>,
}

impl IdentityService {
    /// `state_dir`: the directory this process writes its state to.
    pub fn new(state_dir: PathBuf) -> IdentityService {
        IdentityService {
            state_dir,
            driver: DriverName::default(),
            last: Arc::new(AtomicU8::new(0)),
            metrics: None,
        }
    }

    /// Answers GetPluginInfo with `driver` instead of the default name.
    pub fn with_driver_name(mut self, driver: DriverName) -> IdentityService {
        self.driver = driver;
        self
    }

    /// Counts every RPC (method, code, duration) in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> IdentityService {
        self.metrics = Some(metrics);
        self
    }

    /// Ready when the state dir exists and is writable; no store is asked (a store outage must
    /// not look like a dead plugin: restores degrade to the node's bases, commits wait). Never
    /// an error: not ready is `ready: false`.
    pub async fn readiness(&self) -> Result<(), String> {
        let dir = self.state_dir.clone();
        tokio::task::spawn_blocking(move || check_writable(&dir))
            .await
            .map_err(|e| format!("state dir check: {e}"))?
    }
}

/// Ok when `dir` is a directory this process can write to; else why not (readiness).
pub fn check_writable(dir: &std::path::Path) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("state dir {} does not exist", dir.display()));
    }
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    std::fs::write(&probe, b"probe")
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| format!("state dir {} is not writable: {e}", dir.display()))
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        handle(self.metrics.as_ref(), "GetPluginInfo", "", async {
            Ok(pb::GetPluginInfoResponse {
                name: self.driver.to_string(),
                vendor_version: env!("CARGO_PKG_VERSION").to_string(),
                manifest: Default::default(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        handle(self.metrics.as_ref(), "GetPluginCapabilities", "", async {
            Ok(pb::GetPluginCapabilitiesResponse {
                capabilities: PLUGIN_SERVICES
                    .iter()
                    .map(|t| pb::PluginCapability {
                        r#type: Some(plugin_capability::Type::Service(
                            plugin_capability::Service { r#type: *t as i32 },
                        )),
                    })
                    .collect(),
            })
        })
        .await
    }

    /// Spec: a plugin that is healthy but not ready answers `ready: false` (not an error).
    async fn probe(
        &self,
        _req: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        handle(self.metrics.as_ref(), "Probe", "", async {
            let ready = self.readiness().await;
            let now = if ready.is_ok() { 1 } else { 2 };
            if self.last.swap(now, Ordering::Relaxed) != now {
                match &ready {
                    Ok(()) => tracing::info!("ready"),
                    Err(why) => tracing::warn!("not ready: {why}"),
                }
            }
            Ok(pb::ProbeResponse {
                ready: Some(ready.is_ok()),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_only_with_a_writable_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let id = IdentityService::new(state.clone());
        let e = id.readiness().await.unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::create_dir(&state).unwrap();
        id.readiness().await.unwrap();
    }
}

//! The CSI Identity service, served by the node plugin and the controller alike: who the plugin
//! is, what it offers, and whether it is ready (its state dir is writable and, for the
//! controller, its default store answers).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::pb::identity_server::Identity;
use super::pb::{self, plugin_capability};
use super::{handle, DRIVER_NAME};
use crate::engine::Store;

/// How long Probe waits for the store before it reports not ready.
pub const PROBE_STORE_TIMEOUT: Duration = Duration::from_secs(3);

/// The plugin capabilities. The spec requires every instance of one plugin version to report
/// the same set, whichever services it serves, so the node plugin reports CONTROLLER_SERVICE
/// too: it tells the CO that a controller exists, not that this process is one.
pub const PLUGIN_SERVICES: &[plugin_capability::service::Type] =
    &[plugin_capability::service::Type::ControllerService];

#[derive(Clone)]
pub struct IdentityService {
    state_dir: PathBuf,
    /// The store Probe checks; None: the state dir only.
    store: Option<Store>,
    /// Last readiness reported (0 unknown, 1 ready, 2 not ready), to log changes only.
    last: Arc<AtomicU8>,
}

impl IdentityService {
    /// `state_dir`: the directory this process writes its state to; `store`: its default store.
    pub fn new(state_dir: PathBuf, store: Store) -> IdentityService {
        IdentityService {
            state_dir,
            store: Some(store),
            last: Arc::new(AtomicU8::new(0)),
        }
    }

    /// Probe checks only the state dir. The node plugin's Probe feeds the livenessprobe
    /// sidecar: restarting the plugin while the store is out would not help (restores degrade
    /// to the node's bases, commits wait), so a store outage must not look like a dead plugin.
    pub fn state_dir_only(state_dir: PathBuf) -> IdentityService {
        IdentityService {
            state_dir,
            store: None,
            last: Arc::new(AtomicU8::new(0)),
        }
    }

    /// Ready when the state dir exists and is writable and the store answers a HEAD of a missing
    /// object within [`PROBE_STORE_TIMEOUT`]. Never an error: not ready is `ready: false`.
    pub async fn readiness(&self) -> Result<(), String> {
        let dir = self.state_dir.clone();
        tokio::task::spawn_blocking(move || check_writable(&dir))
            .await
            .map_err(|e| format!("state dir check: {e}"))??;
        let Some(store) = &self.store else {
            return Ok(());
        };
        let probe = store
            .layout("_probe")
            .map_err(|e| e.to_string())?
            .head("probe");
        match tokio::time::timeout(PROBE_STORE_TIMEOUT, store.head(&probe)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("store {}: {e}", store.display_url())),
            Err(_) => Err(format!(
                "store {} did not answer within {}s",
                store.display_url(),
                PROBE_STORE_TIMEOUT.as_secs()
            )),
        }
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
        handle("GetPluginInfo", "", async {
            Ok(pb::GetPluginInfoResponse {
                name: DRIVER_NAME.to_string(),
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
        handle("GetPluginCapabilities", "", async {
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
        handle("Probe", "", async {
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
        let store = Store::open(dir.path().join("store").to_str().unwrap()).unwrap();
        let state = dir.path().join("state");
        let id = IdentityService::new(state.clone(), store);
        let e = id.readiness().await.unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::create_dir(&state).unwrap();
        id.readiness().await.unwrap();
    }
}

//! The CSI Node service: NodePublishVolume gives a pod its view of a cache (see [`crate::node`]),
//! NodeUnpublishVolume takes it away and, with no cluster to say how the pod ended, commits the
//! view in the background; NodeGetVolumeStats reports bytes and inodes used and the volume's
//! condition (abnormal when its view lost what it stands on); NodeGetInfo and
//! NodeGetCapabilities describe the node. No staging: a cachevol volume has no device to stage.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::node_server::Node;
use super::pb::{self, node_service_capability, volume_usage};
use super::{capability, handle, inflight::InFlight, Error};
use crate::cluster::agent::Agent;
use crate::metrics::Metrics;
use crate::node::{self as volumes, Volumes};
use crate::spec::{Ending, PodRef};

impl From<volumes::Error> for Error {
    fn from(e: volumes::Error) -> Error {
        match e {
            volumes::Error::InvalidArgument(why) => Error::InvalidParameter {
                name: "volume_context".into(),
                why,
            },
            volumes::Error::Busy(what) => Error::OperationPending(what),
            volumes::Error::Unavailable(what) => Error::Unavailable(what),
            volumes::Error::NotPublished(id, target) => {
                Error::VolumeNotFound(format!("{id} at {target}"))
            }
            volumes::Error::Io(e) => Error::Io(e),
            volumes::Error::Engine(e) => Error::Engine(e),
        }
    }
}

pub struct NodeService {
    volumes: Arc<Volumes>,
    /// The cluster agent: commits by pod phase, Leases, Events. None without a cluster.
    agent: Option<Arc<Agent>>,
    inflight: InFlight,
    /// Commits that run after NodeUnpublishVolume returns.
    commits: tokio::sync::Mutex<tokio::task::JoinSet<()>>,
    /// Where each RPC is counted; nothing is counted without.
    metrics: Option<Metrics>,
}

fn required<'a>(field: &'static str, value: &'a str) -> Result<&'a str, Error> {
    if value.is_empty() {
        Err(Error::MissingField(field))
    } else {
        Ok(value)
    }
}

impl NodeService {
    pub fn new(volumes: Arc<Volumes>, agent: Option<Arc<Agent>>) -> NodeService {
        NodeService {
            volumes,
            agent,
            inflight: InFlight::default(),
            commits: tokio::sync::Mutex::new(tokio::task::JoinSet::new()),
            metrics: None,
        }
    }

    /// Counts every RPC (method, code, duration) in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> NodeService {
        self.metrics = Some(metrics);
        self
    }

    /// Decides a pending view in the background; its record keeps it pending until then, so
    /// a restart resumes it. With a cluster the agent decides from the pods' phases; without
    /// one, unpublishing means the pod is done and the view is committed as a success.
    async fn commit_later(&self, id: String) {
        if let Some(agent) = &self.agent {
            agent.spawn_finish(id);
            return;
        }
        let volumes = self.volumes.clone();
        self.commits.lock().await.spawn(async move {
            let _ = volumes.decide(&id, Ending::Succeeded).await;
        });
    }

    /// Decides the views a previous run left pending (unpublished, not yet committed): called
    /// once at start-up.
    pub async fn resume_pending(&self) {
        for v in self.volumes.recover() {
            tracing::info!(view = v.id, "resuming a pending commit");
            self.commit_later(v.id).await;
        }
    }

    /// Waits for background commits (on shutdown).
    pub async fn drain(&self) {
        let mut set = self.commits.lock().await;
        while set.join_next().await.is_some() {}
    }

    async fn publish(&self, r: pb::NodePublishVolumeRequest) -> Result<(), Error> {
        let volume_id = required("volume_id", &r.volume_id)?;
        let target = required("target_path", &r.target_path)?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or(Error::MissingField("volume_capability"))?;
        let mode = capability::check(cap).map_err(Error::UnsupportedCapability)?;
        let selinux_context = capability::selinux_context(cap)
            .map_err(|why| Error::invalid("volume_capability.mount.mount_flags", why))?;
        let target = normal_path("target_path", target)?;
        if !r.staging_target_path.is_empty() {
            normal_path("staging_target_path", &r.staging_target_path)?;
        }
        // Spec: a target already published from another volume, or from this one with another
        // capability (here: another SELinux context), is ALREADY_EXISTS; the same publish
        // again is fine.
        if let Some(v) = self.volumes.view_of_target(&target) {
            if v.volume_id != volume_id {
                return Err(Error::VolumeIncompatible(format!(
                    "{} is published from volume {}",
                    target.display(),
                    v.volume_id
                )));
            }
            let asked = self.volumes.view_context(selinux_context.as_deref());
            if v.selinux_context != asked {
                return Err(Error::VolumeIncompatible(format!(
                    "{} is published with SELinux context {:?}, not {:?}",
                    target.display(),
                    v.selinux_context.as_deref().unwrap_or("none"),
                    asked.as_deref().unwrap_or("none")
                )));
            }
        }
        let _guard = self
            .inflight
            .begin(&format!("{volume_id}\0{}", target.display()))?;
        let pod = PodRef::from_context(&r.volume_context);
        let group = mount_group(cap)?;
        let spec = self.volumes.spec_of(&r.volume_context)?;
        let _renewing = match &self.agent {
            Some(agent) => agent.lock(&spec, pod.as_ref(), volume_id, &target).await?,
            None => None,
        };
        let published = match self
            .volumes
            .publish(volumes::Publish {
                volume_id: volume_id.to_string(),
                target: target.clone(),
                context: r.volume_context.clone(),
                read_only: r.readonly || capability::is_read_only(mode),
                pod: pod.clone(),
                group,
                selinux_context,
            })
            .await
        {
            Ok(p) => p,
            Err(e) => {
                if let Some(agent) = &self.agent {
                    agent.unlock_unused(&spec, pod.as_ref()).await;
                }
                return Err(e.into());
            }
        };
        tracing::info!(
            view = published.view,
            warm = published.warm,
            seconds = published.seconds,
            degraded = published.degraded.as_deref().unwrap_or(""),
            "published"
        );
        Ok(())
    }

    async fn unpublish(&self, r: pb::NodeUnpublishVolumeRequest) -> Result<(), Error> {
        let volume_id = required("volume_id", &r.volume_id)?;
        let target = normal_path("target_path", required("target_path", &r.target_path)?)?;
        let _guard = self
            .inflight
            .begin(&format!("{volume_id}\0{}", target.display()))?;
        // Spec: unpublishing a target that is not published (any more) succeeds.
        if let Some(view) = self.volumes.unpublish(volume_id, &target).await? {
            self.commit_later(view.id).await;
        }
        Ok(())
    }

    fn stats(
        &self,
        r: &pb::NodeGetVolumeStatsRequest,
    ) -> Result<pb::NodeGetVolumeStatsResponse, Error> {
        let volume_id = required("volume_id", &r.volume_id)?;
        let path = Path::new(required("volume_path", &r.volume_path)?);
        let view = match self.volumes.view_of_target(path) {
            Some(v) if v.volume_id == volume_id => v,
            _ => {
                return Err(Error::VolumeNotFound(format!(
                    "{volume_id} at {}",
                    path.display()
                )))
            }
        };
        let u = self.volumes.usage(path)?;
        // Spec (VOLUME_CONDITION): an abnormal volume is still answered with OK and its usage;
        // the condition says what is wrong, and kubelet turns it into an Event on the pod.
        let condition = self.volumes.condition(&view, path);
        if condition.abnormal {
            tracing::warn!(reason = condition.message, "volume abnormal");
        }
        let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
        Ok(pb::NodeGetVolumeStatsResponse {
            usage: vec![
                pb::VolumeUsage {
                    available: clamp(u.available_bytes),
                    total: clamp(u.total_bytes),
                    used: clamp(u.bytes),
                    unit: volume_usage::Unit::Bytes as i32,
                },
                pb::VolumeUsage {
                    available: clamp(u.available_inodes),
                    total: clamp(u.total_inodes),
                    used: clamp(u.inodes),
                    unit: volume_usage::Unit::Inodes as i32,
                },
            ],
            volume_condition: Some(pb::VolumeCondition {
                abnormal: condition.abnormal,
                message: condition.message,
            }),
        })
    }
}

/// A path kubelet gave, as is: absolute and already normal (no `.` or `..` component, no empty
/// component, no trailing slash). Anything else is refused rather than resolved: a `..` would
/// mount or unmount outside the directory kubelet meant.
fn normal_path(field: &'static str, path: &str) -> Result<PathBuf, Error> {
    if !path.starts_with('/') {
        return Err(Error::invalid(field, "must be an absolute path"));
    }
    let normal = path == "/"
        || path[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !normal {
        return Err(Error::invalid(
            field,
            "must be a normalized path (no '.', '..', '//' or trailing '/')",
        ));
    }
    Ok(PathBuf::from(path))
}

/// The pod's fsGroup, which kubelet passes as the mount's `volume_mount_group` because the node
/// advertises VOLUME_MOUNT_GROUP (and then changes no ownership itself).
fn mount_group(cap: &pb::VolumeCapability) -> Result<Option<u32>, Error> {
    let Some(pb::volume_capability::AccessType::Mount(m)) = &cap.access_type else {
        return Ok(None);
    };
    if m.volume_mount_group.is_empty() {
        return Ok(None);
    }
    m.volume_mount_group.parse::<u32>().map(Some).map_err(|_| {
        Error::invalid(
            "volume_capability.mount.volume_mount_group",
            format!("{:?} is not a numeric group id", m.volume_mount_group),
        )
    })
}

#[tonic::async_trait]
impl Node for Arc<NodeService> {
    async fn node_stage_volume(
        &self,
        _: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "cachevol does not stage volumes (STAGE_UNSTAGE_VOLUME is not advertised)",
        ))
    }

    async fn node_unstage_volume(
        &self,
        _: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "cachevol does not stage volumes (STAGE_UNSTAGE_VOLUME is not advertised)",
        ))
    }

    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        handle(
            self.metrics.as_ref(),
            "NodePublishVolume",
            &id,
            async move {
                self.publish(r).await?;
                Ok(pb::NodePublishVolumeResponse {})
            },
        )
        .await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        handle(
            self.metrics.as_ref(),
            "NodeUnpublishVolume",
            &id,
            async move {
                self.unpublish(r).await?;
                Ok(pb::NodeUnpublishVolumeResponse {})
            },
        )
        .await
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        let this = self.clone();
        handle(
            self.metrics.as_ref(),
            "NodeGetVolumeStats",
            &id,
            async move {
                tokio::task::spawn_blocking(move || this.stats(&r))
                    .await
                    .expect("stats do not panic")
            },
        )
        .await
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        handle(self.metrics.as_ref(), "NodeGetCapabilities", "", async {
            let rpc = |t: node_service_capability::rpc::Type| pb::NodeServiceCapability {
                r#type: Some(node_service_capability::Type::Rpc(
                    node_service_capability::Rpc { r#type: t as i32 },
                )),
            };
            Ok(pb::NodeGetCapabilitiesResponse {
                capabilities: vec![
                    rpc(node_service_capability::rpc::Type::GetVolumeStats),
                    rpc(node_service_capability::rpc::Type::SingleNodeMultiWriter),
                    rpc(node_service_capability::rpc::Type::VolumeMountGroup),
                    rpc(node_service_capability::rpc::Type::VolumeCondition),
                ],
            })
        })
        .await
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        let node_id = self.volumes.config().node_id.clone();
        handle(self.metrics.as_ref(), "NodeGetInfo", "", async move {
            Ok(pb::NodeGetInfoResponse {
                node_id,
                max_volumes_per_node: 0,
                accessible_topology: None,
            })
        })
        .await
    }
}

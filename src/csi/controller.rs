//! The CSI Controller service. CreateVolume turns a claim
//! into volume attributes (which cache, how it is shared and committed) and a deterministic id;
//! it provisions no storage, so DeleteVolume only forgets the record and never deletes cache
//! data. Retention of the store is the garbage collector's job, not DeleteVolume's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::capability;
use super::inflight::InFlight;
use super::pb::controller_server::Controller;
use super::pb::{self, controller_service_capability as csc};
use super::{handle, Error};
use crate::engine::IoError;
use crate::metrics::Metrics;
use crate::spec::records::{self, Records, VolumeRecord};
use crate::spec::{param, VolumeSpec};

/// The Controller RPCs cachevol implements and advertises. SINGLE_NODE_MULTI_WRITER (with the
/// node's capability of the same name) lets ReadWriteOncePod claims arrive as
/// SINGLE_NODE_SINGLE_WRITER; both single-node writer modes are served.
pub const CAPABILITIES: &[csc::rpc::Type] = &[
    csc::rpc::Type::CreateDeleteVolume,
    csc::rpc::Type::SingleNodeMultiWriter,
];

#[derive(Clone)]
pub struct ControllerService {
    records: Arc<Records>,
    default_store: String,
    inflight: InFlight,
    /// The Kubernetes API, for claim annotations. None without a cluster.
    client: Option<kube::Client>,
    /// Where each RPC is counted; nothing is counted without.
    metrics: Option<Metrics>,
}

impl ControllerService {
    /// `default_store`: the store of volumes whose StorageClass names none.
    pub fn new(records: Arc<Records>, default_store: String) -> ControllerService {
        ControllerService {
            records,
            default_store,
            inflight: InFlight::default(),
            client: None,
            metrics: None,
        }
    }

    /// Counts every RPC (method, code, duration) in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> ControllerService {
        self.metrics = Some(metrics);
        self
    }

    /// Reads claims' `cachevol.dev/*` annotations through this client.
    pub fn with_client(mut self, client: Option<kube::Client>) -> ControllerService {
        self.client = client;
        self
    }

    async fn create(
        &self,
        req: pb::CreateVolumeRequest,
    ) -> Result<pb::CreateVolumeResponse, Error> {
        // Every argument is checked before anything is looked up or written.
        if req.name.is_empty() {
            return Err(Error::MissingField("name"));
        }
        if let Some(c) = req.name.chars().find(|c| is_banned_in_name(*c)) {
            return Err(Error::invalid(
                "name",
                format!("contains the control character U+{:04X}", c as u32),
            ));
        }
        if req.volume_capabilities.is_empty() {
            return Err(Error::MissingField("volume_capabilities"));
        }
        for cap in &req.volume_capabilities {
            capability::check(cap).map_err(Error::UnsupportedCapability)?;
        }
        // Not advertised (no CREATE_DELETE_SNAPSHOT, CLONE_VOLUME or MODIFY_VOLUME): refused as
        // unsupported fields rather than silently ignored.
        if req.volume_content_source.is_some() {
            return Err(Error::invalid(
                "volume_content_source",
                "creating a volume from a snapshot or another volume is not supported",
            ));
        }
        if !req.mutable_parameters.is_empty() {
            return Err(Error::invalid(
                "mutable_parameters",
                "not supported (cachevol has no ControllerModifyVolume)",
            ));
        }
        let budget = budget(req.capacity_range.as_ref())?;
        let mut spec = VolumeSpec::from_parameters(&req.parameters, &self.default_store, budget)?;
        // The claim's annotations (users' settings) over the StorageClass's; never store/scope.
        let claim = |k: &str| req.parameters.get(k).filter(|v| !v.is_empty());
        if let (Some(client), Some(name), Some(ns)) = (
            &self.client,
            claim(param::PVC_NAME),
            claim(param::PVC_NAMESPACE),
        ) {
            let annotations = crate::cluster::claims::annotations(client, ns, name)
                .await
                .map_err(Error::Unavailable)?;
            spec.apply_annotations(&annotations)?;
        }
        let context = spec.to_context();
        let capacity = budget.map_or(0, |b| b as i64);
        let id = records::volume_id(&req.name);
        tracing::Span::current().record("volume.id", id.as_str());

        // Spec: CreateVolume is idempotent by name. The id is derived from the name, so one
        // guard covers a CreateVolume and a DeleteVolume of the same volume.
        let _guard = self.inflight.begin(&id)?;
        if let Some(existing) = self.records.get(&id) {
            if existing.name != req.name {
                // 128 bits of BLAKE3 do not collide in practice; refuse rather than alias.
                return Err(Error::VolumeIncompatible(format!(
                    "volume id {id} is already used by volume {:?}",
                    existing.name
                )));
            }
            // Same name, same attributes and capacity: the same answer. Otherwise the spec's
            // "volume already exists but is incompatible": ALREADY_EXISTS.
            let diff = differences(&existing, &context, capacity);
            if !diff.is_empty() {
                return Err(Error::VolumeIncompatible(format!(
                    "volume {:?} already exists with other attributes: {}",
                    req.name,
                    diff.join(", ")
                )));
            }
            tracing::info!(cache.key = %spec.key, "volume exists: same answer");
            return Ok(response(&existing));
        }
        let record = VolumeRecord::new(&req.name, capacity, context);
        let records = self.records.clone();
        let r = record.clone();
        tokio::task::spawn_blocking(move || records.put(&r))
            .await
            .map_err(|e| IoError::other("write volume record", PathBuf::new(), e))??;
        tracing::info!(
            cache.key = %spec.key,
            cache.scope = %spec.scope,
            mode = spec.mode.as_str(),
            "volume created"
        );
        Ok(response(&record))
    }

    async fn delete(
        &self,
        req: pb::DeleteVolumeRequest,
    ) -> Result<pb::DeleteVolumeResponse, Error> {
        if req.volume_id.is_empty() {
            return Err(Error::MissingField("volume_id"));
        }
        let _guard = self.inflight.begin(&req.volume_id)?;
        // Spec: deleting a volume that does not exist (any more) is OK. The cache's data is
        // shared by every claim of its key and outlives them: only the record goes.
        let records = self.records.clone();
        let id = req.volume_id.clone();
        let existed = tokio::task::spawn_blocking(move || records.remove(&id))
            .await
            .map_err(|e| IoError::other("remove volume record", PathBuf::new(), e))??;
        if existed {
            tracing::info!("volume record forgotten; cache data kept");
        } else {
            tracing::info!("no such volume: nothing to do");
        }
        Ok(pb::DeleteVolumeResponse {})
    }

    async fn validate(
        &self,
        req: pb::ValidateVolumeCapabilitiesRequest,
    ) -> Result<pb::ValidateVolumeCapabilitiesResponse, Error> {
        if req.volume_id.is_empty() {
            return Err(Error::MissingField("volume_id"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(Error::MissingField("volume_capabilities"));
        }
        let record = self
            .records
            .get(&req.volume_id)
            .ok_or_else(|| Error::VolumeNotFound(req.volume_id.clone()))?;
        // Unsupported capabilities are an answer, not an error: `confirmed` stays unset and
        // `message` says why.
        let unconfirmed = |message: String| pb::ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message,
        };
        if !req.volume_context.is_empty()
            && req.volume_context.iter().collect::<BTreeMap<_, _>>()
                != record.volume_context.iter().collect::<BTreeMap<_, _>>()
        {
            return Ok(unconfirmed(
                "volume_context does not match the volume's attributes".into(),
            ));
        }
        for cap in &req.volume_capabilities {
            if let Err(why) = capability::check(cap) {
                return Ok(unconfirmed(why));
            }
        }
        Ok(pb::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                // The parameters are not re-validated here, so none are confirmed.
                parameters: Default::default(),
            }),
            message: String::new(),
        })
    }
}

/// Control characters other than common whitespace, which the spec bans from names.
fn is_banned_in_name(c: char) -> bool {
    matches!(c as u32, 0x00..=0x08 | 0x0B | 0x0C | 0x0E..=0x1F | 0x7F..=0x9F)
}

/// The cache's size budget from a capacity range: `required_bytes` when set, else
/// `limit_bytes`, else none. Negative values are invalid; a limit below the requirement cannot
/// be honoured (OUT_OF_RANGE).
fn budget(range: Option<&pb::CapacityRange>) -> Result<Option<u64>, Error> {
    let Some(r) = range else { return Ok(None) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Error::invalid(
            "capacity_range",
            "required_bytes and limit_bytes must not be negative",
        ));
    }
    if r.limit_bytes > 0 && r.required_bytes > r.limit_bytes {
        return Err(Error::CapacityOutOfRange(format!(
            "required_bytes {} is more than limit_bytes {}",
            r.required_bytes, r.limit_bytes
        )));
    }
    Ok(match (r.required_bytes, r.limit_bytes) {
        (0, 0) => None,
        (0, limit) => Some(limit as u64),
        (required, _) => Some(required as u64),
    })
}

/// What differs between a recorded volume and a new request for the same name.
fn differences(
    existing: &VolumeRecord,
    context: &BTreeMap<String, String>,
    capacity: i64,
) -> Vec<String> {
    let mut out = Vec::new();
    if existing.capacity_bytes != capacity {
        out.push(format!(
            "capacity {} bytes (was {})",
            capacity, existing.capacity_bytes
        ));
    }
    let keys: std::collections::BTreeSet<&String> = existing
        .volume_context
        .keys()
        .chain(context.keys())
        .collect();
    for k in keys {
        let (old, new) = (existing.volume_context.get(k), context.get(k));
        if old != new {
            out.push(format!(
                "{k} {:?} (was {:?})",
                new.map_or("", String::as_str),
                old.map_or("", String::as_str)
            ));
        }
    }
    out
}

fn response(r: &VolumeRecord) -> pb::CreateVolumeResponse {
    pb::CreateVolumeResponse {
        volume: Some(pb::Volume {
            capacity_bytes: r.capacity_bytes,
            volume_id: r.volume_id.clone(),
            volume_context: r.volume_context.clone().into_iter().collect(),
            content_source: None,
            accessible_topology: Vec::new(),
        }),
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        handle(self.metrics.as_ref(), "CreateVolume", "", self.create(req)).await
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        handle(self.metrics.as_ref(), "DeleteVolume", &id, self.delete(req)).await
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        handle(
            self.metrics.as_ref(),
            "ValidateVolumeCapabilities",
            &id,
            self.validate(req),
        )
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        handle(
            self.metrics.as_ref(),
            "ControllerGetCapabilities",
            "",
            async {
                Ok(pb::ControllerGetCapabilitiesResponse {
                    capabilities: CAPABILITIES
                        .iter()
                        .map(|t| pb::ControllerServiceCapability {
                            r#type: Some(csc::Type::Rpc(csc::Rpc { r#type: *t as i32 })),
                        })
                        .collect(),
                })
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::pb::volume_capability::{
        access_mode::Mode, AccessMode, AccessType, MountVolume,
    };

    fn service(dir: &std::path::Path) -> ControllerService {
        ControllerService::new(
            Arc::new(Records::open(dir).unwrap()),
            "s3://caches/a".into(),
        )
    }

    fn request(name: &str) -> pb::CreateVolumeRequest {
        pb::CreateVolumeRequest {
            name: name.into(),
            volume_capabilities: vec![pb::VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume::default())),
                access_mode: Some(AccessMode {
                    mode: Mode::MultiNodeMultiWriter as i32,
                }),
            }],
            parameters: [("scope", "cluster"), ("key", "npm")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_call_racing_another_on_the_same_volume_is_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path());
        let held = svc.inflight.begin(&records::volume_id("pvc-1")).unwrap();
        let e = svc.create(request("pvc-1")).await.unwrap_err();
        assert_eq!(Status::from(e).code(), tonic::Code::Aborted);
        let e = svc
            .delete(pb::DeleteVolumeRequest {
                volume_id: records::volume_id("pvc-1"),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(Status::from(e).code(), tonic::Code::Aborted);
        // Other names go through meanwhile, and the volume is free once the first call ends.
        svc.create(request("pvc-2")).await.unwrap();
        drop(held);
        svc.create(request("pvc-1")).await.unwrap();
    }

    #[test]
    fn capacity_becomes_the_budget() {
        let r = |required_bytes, limit_bytes| pb::CapacityRange {
            required_bytes,
            limit_bytes,
        };
        assert_eq!(budget(None).unwrap(), None);
        assert_eq!(budget(Some(&r(0, 0))).unwrap(), None);
        assert_eq!(budget(Some(&r(10, 0))).unwrap(), Some(10));
        assert_eq!(budget(Some(&r(0, 20))).unwrap(), Some(20));
        assert_eq!(budget(Some(&r(10, 20))).unwrap(), Some(10));
        let e = budget(Some(&r(30, 20))).unwrap_err();
        assert_eq!(Status::from(e).code(), tonic::Code::OutOfRange);
        let e = budget(Some(&r(-1, 0))).unwrap_err();
        assert_eq!(Status::from(e).code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn control_characters_are_banned_in_names_but_not_unicode() {
        assert!(is_banned_in_name('\u{0}'));
        assert!(is_banned_in_name('\u{85}'));
        assert!(!is_banned_in_name('\n'));
        assert!(!is_banned_in_name('é'));
    }
}

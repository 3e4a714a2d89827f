//! `Debug` for the messages that carry secrets (`csi_secret` fields) or mount flags, which the
//! spec says may be sensitive. build.rs tells prost not to derive `Debug` for them; these print
//! every other field and only the names of secrets, so no log line can leak a credential.

use std::collections::HashMap;
use std::fmt;

use super::pb;

/// The keys of a secrets map, sorted, without the values.
struct SecretKeys<'a>(&'a HashMap<String, String>);

impl fmt::Debug for SecretKeys<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<&str> = self.0.keys().map(String::as_str).collect();
        keys.sort_unstable();
        f.debug_map()
            .entries(keys.into_iter().map(|k| (k, "<redacted>")))
            .finish()
    }
}

impl fmt::Debug for pb::CreateVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateVolumeRequest")
            .field("name", &self.name)
            .field("capacity_range", &self.capacity_range)
            .field("volume_capabilities", &self.volume_capabilities)
            .field("parameters", &self.parameters)
            .field("secrets", &SecretKeys(&self.secrets))
            .field("volume_content_source", &self.volume_content_source)
            .field(
                "accessibility_requirements",
                &self.accessibility_requirements,
            )
            .field("mutable_parameters", &self.mutable_parameters)
            .finish()
    }
}

impl fmt::Debug for pb::DeleteVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeleteVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("secrets", &SecretKeys(&self.secrets))
            .finish()
    }
}

impl fmt::Debug for pb::ValidateVolumeCapabilitiesRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateVolumeCapabilitiesRequest")
            .field("volume_id", &self.volume_id)
            .field("volume_context", &self.volume_context)
            .field("volume_capabilities", &self.volume_capabilities)
            .field("parameters", &self.parameters)
            .field("secrets", &SecretKeys(&self.secrets))
            .finish()
    }
}

impl fmt::Debug for pb::NodeStageVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeStageVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("publish_context", &self.publish_context)
            .field("staging_target_path", &self.staging_target_path)
            .field("volume_capability", &self.volume_capability)
            .field("secrets", &SecretKeys(&self.secrets))
            .field("volume_context", &self.volume_context)
            .finish()
    }
}

impl fmt::Debug for pb::NodePublishVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodePublishVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("publish_context", &self.publish_context)
            .field("staging_target_path", &self.staging_target_path)
            .field("target_path", &self.target_path)
            .field("volume_capability", &self.volume_capability)
            .field("readonly", &self.readonly)
            .field("secrets", &SecretKeys(&self.secrets))
            .field("volume_context", &self.volume_context)
            .finish()
    }
}

impl fmt::Debug for pb::volume_capability::MountVolume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MountVolume")
            .field("fs_type", &self.fs_type)
            .field(
                "mount_flags",
                &format_args!("<{} redacted>", self.mount_flags.len()),
            )
            .field("volume_mount_group", &self.volume_mount_group)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_secret_values_or_mount_flags() {
        let secrets: HashMap<String, String> =
            [("awsSecretAccessKey".to_string(), "hunter2".to_string())].into();
        let cap = pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Mount(
                pb::volume_capability::MountVolume {
                    fs_type: "ext4".into(),
                    mount_flags: vec!["password=hunter2".into()],
                    volume_mount_group: String::new(),
                },
            )),
            access_mode: None,
        };
        let printed = [
            format!(
                "{:?}",
                pb::CreateVolumeRequest {
                    name: "pvc-1".into(),
                    secrets: secrets.clone(),
                    volume_capabilities: vec![cap.clone()],
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::DeleteVolumeRequest {
                    volume_id: "cv-1".into(),
                    secrets: secrets.clone(),
                }
            ),
            format!(
                "{:?}",
                pb::ValidateVolumeCapabilitiesRequest {
                    secrets: secrets.clone(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::NodeStageVolumeRequest {
                    secrets: secrets.clone(),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::NodePublishVolumeRequest {
                    secrets: secrets.clone(),
                    volume_capability: Some(cap),
                    ..Default::default()
                }
            ),
        ];
        for p in printed {
            assert!(!p.contains("hunter2"), "{p}");
            assert!(
                p.contains("awsSecretAccessKey") || p.contains("MountVolume"),
                "{p}"
            );
        }
    }
}

//! The pods of a volume: who a publish is for ([`PodRef`], from kubelet's pod info on mount)
//! and how a view's pods ended ([`Ending`], what the commit decision reads).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::user;

/// The pod a publish is for, from kubelet's pod info on mount (`csi.storage.k8s.io/pod.*`).
/// Read once, at the CSI edge, with the volume's spec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub service_account: String,
}

impl PodRef {
    /// Reads kubelet's pod info from a NodePublishVolume `volume_context`.
    pub fn from_context(ctx: &HashMap<String, String>) -> Option<PodRef> {
        let get = |k: &str| ctx.get(k).cloned().unwrap_or_default();
        let uid = get(user::POD_UID);
        (!uid.is_empty()).then(|| PodRef {
            name: get(user::POD_NAME),
            namespace: get(user::POD_NAMESPACE),
            uid,
            service_account: get(user::SERVICE_ACCOUNT),
        })
    }
}

/// How a view's pods ended, for the commit decision. Ordered from best to worst: a view
/// shared by several pods ends as the worst of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ending {
    /// Every pod succeeded (or, without a cluster, the volume was unpublished).
    Succeeded,
    /// A pod failed (non-zero exit).
    Failed,
    /// OOM-killed, evicted, past its deadline, deleted while running: never committed.
    Aborted,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_info_needs_a_uid() {
        let mut ctx: HashMap<String, String> = [
            ("csi.storage.k8s.io/pod.name", "build-1"),
            ("csi.storage.k8s.io/pod.namespace", "ci"),
            ("csi.storage.k8s.io/serviceAccount.name", "runner"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // Without podInfoOnMount kubelet sends no uid: no pod to follow.
        assert_eq!(PodRef::from_context(&ctx), None);
        ctx.insert("csi.storage.k8s.io/pod.uid".into(), "u-1".into());
        assert_eq!(
            PodRef::from_context(&ctx),
            Some(PodRef {
                name: "build-1".into(),
                namespace: "ci".into(),
                uid: "u-1".into(),
                service_account: "runner".into(),
            })
        );
    }

    #[test]
    fn a_shared_view_ends_as_its_worst_pod() {
        use Ending::*;
        assert_eq!(
            [Succeeded, Aborted, Failed].into_iter().max(),
            Some(Aborted)
        );
        assert_eq!([Succeeded, Failed].into_iter().max(), Some(Failed));
        // Recorded in view files as lowercase words.
        assert_eq!(serde_json::to_string(&Aborted).unwrap(), "\"aborted\"");
        assert_eq!(
            serde_json::from_str::<Ending>("\"succeeded\"").unwrap(),
            Succeeded
        );
    }
}

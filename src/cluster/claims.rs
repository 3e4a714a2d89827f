//! The controller's view of claims: CreateVolume reads the claim's `cachevol.dev/*`
//! annotations (the claim's name and namespace arrive in the parameters when csi-provisioner
//! runs with `--extra-create-metadata`).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::Api;

/// The annotations of claim `namespace/name`. Err: why they could not be read (retryable).
pub async fn annotations(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<BTreeMap<String, String>, String> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    match tokio::time::timeout(Duration::from_secs(10), api.get_opt(name)).await {
        Ok(Ok(Some(pvc))) => Ok(pvc.metadata.annotations.unwrap_or_default()),
        Ok(Ok(None)) => Err(format!("claim {namespace}/{name} does not exist (yet)")),
        Ok(Err(e)) => Err(format!("cannot read claim {namespace}/{name}: {e}")),
        Err(_) => Err(format!(
            "reading claim {namespace}/{name} timed out after 10s"
        )),
    }
}

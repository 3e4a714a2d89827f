//! The controller's view of its default store's health: a HEAD of a missing object now and then,
//! in the background, whose last answer `/readyz` reports (503 with the reason while the store
//! does not answer) and `cachevol_store_up` exports. Not part of the CSI Probe: the livenessprobe
//! sidecar restarts the controller when Probe fails, and a restart cannot fix a store outage.

use std::sync::Mutex;
use std::time::Duration;

use crate::engine::Store;
use crate::metrics::Metrics;

/// How often the store is checked.
pub const STORE_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// How long one check waits for the store's answer.
pub const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The last answer of the store to a health check.
pub struct StoreHealth {
    store: Store,
    /// `cachevol_store_up` follows the last answer.
    metrics: Metrics,
    last: Mutex<Result<(), String>>,
}

impl StoreHealth {
    /// Not checked yet: not ready until the first check answers.
    pub fn new(store: Store, metrics: Metrics) -> StoreHealth {
        StoreHealth {
            last: Mutex::new(Err(format!(
                "store {} not checked yet",
                store.display_url()
            ))),
            store,
            metrics,
        }
    }

    /// The last check's answer: `Ok` when the store answered, else why not.
    pub fn get(&self) -> Result<(), String> {
        self.last.lock().expect("not poisoned").clone()
    }

    /// Checks the store once (a HEAD of a missing object within `limit`), records and exports
    /// the answer and logs a change; returns it.
    pub async fn check(&self, limit: Duration) -> Result<(), String> {
        let store = &self.store;
        let answer = match store.layout("_probe") {
            Err(e) => Err(e.to_string()),
            Ok(layout) => {
                match tokio::time::timeout(limit, store.head(&layout.head("probe"))).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("store {}: {e}", store.display_url())),
                    Err(_) => Err(format!(
                        "store {} did not answer within {}s",
                        store.display_url(),
                        limit.as_secs_f64()
                    )),
                }
            }
        };
        self.metrics.store_up(answer.is_ok());
        let before = std::mem::replace(
            &mut *self.last.lock().expect("not poisoned"),
            answer.clone(),
        );
        match (&before, &answer) {
            (Err(_), Ok(())) => tracing::info!(store = store.display_url(), "store answers"),
            (Ok(()), Err(why)) => tracing::warn!("store does not answer: {why}"),
            // The first failed check is news too; a repeat of it is not.
            (Err(old), Err(why)) if old.ends_with("not checked yet") => {
                tracing::warn!("store does not answer: {why}")
            }
            _ => {}
        }
        answer
    }

    /// Checks every `every` forever (a supervised task).
    pub async fn watch(self: std::sync::Arc<Self>, every: Duration, limit: Duration) {
        loop {
            let _ = self.check(limit).await;
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_store_answers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
        let metrics = Metrics::new();
        let health = StoreHealth::new(store, metrics.clone());
        assert!(health.get().unwrap_err().contains("not checked yet"));
        assert!(metrics.render().contains("\ncachevol_store_up 0\n"));
        health.check(STORE_CHECK_TIMEOUT).await.unwrap();
        health.get().unwrap();
        assert!(metrics.render().contains("\ncachevol_store_up 1\n"));
    }
}

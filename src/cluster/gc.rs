//! The controller's retention: every `--gc-interval`, the garbage collector runs over every
//! scope of the stores the controller knows (its `--store` and the stores of the volumes it
//! created). With a cluster, only the replica holding the leader Lease collects, so standby
//! replicas never race it; without one, the single process collects.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::lease::Leases;
use crate::engine::{Engine, GcPolicy, Store};
use crate::metrics::Metrics;
use crate::spec::records::Records;
use crate::spec::DriverName;

/// The default driver's leader Lease (in the driver's namespace); see [`leader_lease`].
pub const LEADER_LEASE: &str = "cachevol-controller";

/// The leader Lease of `driver`'s controllers: `<lease prefix>-controller`, so that two
/// installs in one namespace elect a leader each ([`LEADER_LEASE`] for the default driver).
pub fn leader_lease(driver: &DriverName) -> String {
    format!("{}-controller", driver.lease_prefix())
}

pub struct Collector {
    pub default_store: String,
    pub records: Arc<Records>,
    pub state_dir: std::path::PathBuf,
    pub policy: GcPolicy,
    pub interval: Duration,
    /// With a cluster: lock Leases are deleted once free and unwanted for this long.
    pub locks: Option<(Leases, Duration)>,
    /// Where runs, deleted bytes and the stores' requests are counted.
    pub metrics: Metrics,
}

/// Keeps `leader` up to date by taking and renewing the leader Lease of the driver of `leases`
/// every third of its duration. A replica that stops holds it until it expires; then a standby takes over.
pub async fn lead_forever(
    leases: Leases,
    identity: String,
    duration: Duration,
    leader: Arc<AtomicBool>,
) {
    let mut every = tokio::time::interval((duration / 3).max(Duration::from_millis(200)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    let name = leader_lease(leases.driver());
    loop {
        every.tick().await;
        let answer = leases.lead(&name, &identity).await;
        if let Err(e) = &answer {
            tracing::warn!(error = %e, "cannot renew the leader Lease");
        }
        let now = matches!(answer, Ok(true));
        if now != leader.swap(now, Ordering::SeqCst) {
            tracing::info!(identity, leader = now, "leadership changed");
        } else if first && answer.is_ok() {
            // A standby says so once, so that its logs show it took part.
            tracing::info!(identity, "leader election: another replica leads");
            first = false;
        }
        if answer.is_ok() {
            first = false;
        }
    }
}

impl Collector {
    /// Runs GC every interval while `leader` is set.
    pub async fn run(self, leader: Arc<AtomicBool>) {
        let mut every = tokio::time::interval(self.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await; // the first tick is immediate: let the process settle first
        loop {
            every.tick().await;
            if !leader.load(Ordering::SeqCst) {
                tracing::info!("gc: skipped, this replica does not hold the leader Lease");
            } else {
                self.collect().await;
                if let Some((leases, idle)) = &self.locks {
                    if let Err(e) = leases.collect(*idle).await {
                        tracing::warn!(error = %e, "gc: cannot collect abandoned lock Leases");
                    }
                }
            }
        }
    }

    /// One pass over every scope of every known store.
    pub async fn collect(&self) {
        let mut stores = self.records.stores();
        stores.insert(self.default_store.clone());
        for url in stores {
            let store = match Store::open(&url) {
                Ok(s) => self.metrics.count_store(s),
                Err(e) => {
                    tracing::warn!(error = %e, "gc: cannot open a store");
                    self.metrics.gc_run(false, 0);
                    continue;
                }
            };
            let scopes = match store.scopes().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(store = store.display_url(), error = %e, "gc: cannot list scopes");
                    self.metrics.gc_run(false, 0);
                    continue;
                }
            };
            for scope in scopes {
                let r = match Engine::new(store.clone(), &scope, self.state_dir.join("gc")) {
                    Ok(engine) => engine.gc(&self.policy).await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(r) => {
                        self.metrics.gc_run(true, r.bytes_freed);
                        tracing::info!(
                            store = store.display_url(),
                            scope,
                            generations_deleted = r.generations_deleted,
                            packs_deleted = r.packs_deleted,
                            bytes_freed = r.bytes_freed,
                            keys_expired = r.keys_expired.len(),
                            keys_evicted = r.keys_evicted.len(),
                            "gc"
                        );
                    }
                    Err(e) => {
                        self.metrics.gc_run(false, 0);
                        tracing::warn!(store = store.display_url(), scope, error = %e, "gc failed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_lease_per_driver() {
        assert_eq!(leader_lease(&DriverName::default()), LEADER_LEASE);
        let canary = DriverName::parse("canary.cachevol.dev").unwrap();
        assert_eq!(
            leader_lease(&canary),
            "cachevol-canary-cachevol-dev-controller"
        );
    }
}

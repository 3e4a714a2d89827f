//! What keeps GC from breaking commits, and corrupt packs out of new snapshots. A commit names the
//! packs it relies on in an in-flight marker (refreshed while it runs) *before* it checks them;
//! GC names the packs it is about to delete in a doomed list *before* it reads the markers.
//! Whichever comes second sees the other: the commit does not reuse a doomed pack (its chunks are
//! uploaded again), or GC keeps every pack a fresh marker names and every pack uploaded since the
//! oldest fresh marker was written. Packs found corrupt are quarantined: no commit reuses them,
//! and GC deletes them once no kept generation references them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::format::Digest;
use super::store::Store;
use super::Engine;

/// A marker not rewritten for this long belongs to a commit that died (or froze): GC no longer
/// honours it, and removes it.
pub(crate) const MARKER_STALE: Duration = Duration::from_secs(15 * 60);
/// How often a running commit rewrites its marker.
const REFRESH: Duration = Duration::from_secs(60);
/// Packs written up to this long before a running commit's marker are kept too: objects are
/// stamped by the store's clock, which may differ a little between its servers.
pub(crate) const CLOCK_MARGIN: i64 = 60;

/// The body of an in-flight marker.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Marker {
    pub key: String,
    /// Unix seconds of the marker's first write by the store's clock (unset until known: the
    /// object's own time is its first write then).
    #[serde(default)]
    pub started: Option<i64>,
    /// The packs the commit reuses, as hex ids.
    #[serde(default)]
    pub packs: Vec<String>,
}

/// The body of a doomed list.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Doomed {
    pub packs: Vec<String>,
}

/// A running commit's marker; rewritten in the background until `end`.
pub(crate) struct InFlight {
    store: Store,
    loc: Path,
    /// The marker and when its last successful write started.
    shared: Arc<Mutex<(Marker, Instant)>>,
    task: tokio::task::JoinHandle<()>,
}

/// An id unique across processes and machines for all practical purposes.
pub(crate) fn unique_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let host = super::hostname().unwrap_or_default();
    let seed = format!(
        "{nanos}/{}/{}/{host}/{:p}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        &N
    );
    Digest::of(seed.as_bytes()).to_hex()[..32].to_string()
}

fn encode<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("serializes"))
}

impl InFlight {
    /// Adds packs the commit is about to rely on, and writes the marker now: only once this
    /// returns may the commit check them and then use them.
    pub(crate) async fn rely(&self, packs: impl IntoIterator<Item = Digest>) -> Result<()> {
        let (body, t) = {
            let mut s = self.shared.lock().expect("not poisoned");
            let mut all: HashSet<String> = s.0.packs.drain(..).collect();
            all.extend(packs.into_iter().map(|p| p.to_hex()));
            s.0.packs = all.into_iter().collect();
            s.0.packs.sort();
            (encode(&s.0), Instant::now())
        };
        self.store.put(&self.loc, body).await?;
        self.shared.lock().expect("not poisoned").1 = t;
        Ok(())
    }

    /// Fails when the marker has not been written for so long that GC may have stopped
    /// honouring it (the process froze, or the store refused the rewrites).
    pub(crate) fn check_fresh(&self, key: &str) -> Result<()> {
        let since = self.shared.lock().expect("not poisoned").1.elapsed();
        if since > MARKER_STALE / 2 {
            return Err(Error::InFlightLapsed {
                key: key.to_string(),
                seconds: since.as_secs(),
            });
        }
        Ok(())
    }

    /// Stops the rewrites and removes the marker (best effort: a left-over goes stale).
    pub(crate) async fn end(self) {
        self.task.abort();
        if let Err(e) = self.store.delete(&self.loc).await {
            tracing::debug!(error = %e, "could not remove in-flight marker");
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Engine {
    /// Writes the in-flight marker of a commit of `key` that relies on `packs`.
    pub(crate) async fn begin_inflight(
        &self,
        key: &str,
        packs: impl IntoIterator<Item = Digest>,
    ) -> Result<InFlight> {
        let loc = self.layout.inflight().join(unique_id());
        let mut marker = Marker {
            key: key.to_string(),
            started: None,
            packs: packs.into_iter().map(|p| p.to_hex()).collect(),
        };
        marker.packs.sort();
        marker.packs.dedup();
        let t0 = Instant::now();
        self.store.put(&loc, encode(&marker)).await?;
        marker.started = Some(match self.store.head(&loc).await? {
            Some(m) => m.last_modified.timestamp(),
            None => super::now_unix(),
        });
        let shared = Arc::new(Mutex::new((marker, t0)));
        let (store, at, s) = (self.store.clone(), loc.clone(), shared.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH).await;
                let (body, t) = {
                    let s = s.lock().expect("not poisoned");
                    (encode(&s.0), Instant::now())
                };
                match store.put(&at, body).await {
                    Ok(()) => s.lock().expect("not poisoned").1 = t,
                    Err(e) => tracing::warn!(error = %e, "could not refresh in-flight marker"),
                }
            }
        });
        Ok(InFlight {
            store: self.store.clone(),
            loc,
            shared,
            task,
        })
    }

    /// Of `packs`, those a commit must not reuse: doomed by a running GC, quarantined, or gone
    /// from the store. Call only after the commit's marker names them.
    pub(crate) async fn unusable_packs(&self, packs: &HashSet<Digest>) -> Result<HashSet<Digest>> {
        if packs.is_empty() {
            return Ok(HashSet::new());
        }
        let mut bad = self.doomed_packs().await?;
        bad.extend(self.quarantined().await?);
        bad.retain(|p| packs.contains(p));
        let rest: Vec<Digest> = packs.iter().filter(|p| !bad.contains(p)).copied().collect();
        let results: Vec<Result<Option<Digest>>> = futures::stream::iter(rest)
            .map(|p| async move {
                let present = self.store.head(&self.layout.pack(&p.to_hex())).await?;
                Ok(present.is_none().then_some(p))
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for r in results {
            if let Some(p) = r? {
                bad.insert(p);
            }
        }
        Ok(bad)
    }

    /// The packs of every doomed list in the scope.
    pub(crate) async fn doomed_packs(&self) -> Result<HashSet<Digest>> {
        let mut out = HashSet::new();
        for m in self.store.list(&self.layout.doomed()).await? {
            let Some((body, _)) = self.store.get(&m.location).await? else {
                continue;
            };
            let Ok(d) = serde_json::from_slice::<Doomed>(&body) else {
                continue;
            };
            out.extend(d.packs.iter().filter_map(|h| Digest::from_hex(h)));
        }
        Ok(out)
    }

    /// The quarantined packs of the scope.
    pub(crate) async fn quarantined(&self) -> Result<HashSet<Digest>> {
        Ok(self
            .store
            .list(&self.layout.quarantine())
            .await?
            .iter()
            .filter_map(|m| m.location.filename().and_then(Digest::from_hex))
            .collect())
    }

    /// Quarantines the pack `err` points at, when it is a pack found corrupt, truncated or
    /// missing, so no later commit deduplicates against it. Best effort: a store that refuses
    /// the write must not hide the original error.
    pub(crate) async fn quarantine_from(&self, err: &Error) {
        let Error::Corrupt { location, why } = err else {
            return;
        };
        let prefix = format!("{}/", self.layout.packs());
        let Some(id) = location
            .strip_prefix(&prefix)
            .and_then(|rest| rest.rsplit('/').next())
            .and_then(Digest::from_hex)
        else {
            return;
        };
        let loc = self.layout.quarantine().join(id.to_hex());
        let body = Bytes::from(format!("{} {why}\n", super::now_unix()));
        match self.store.put(&loc, body).await {
            Ok(()) => {
                tracing::warn!(pack = %id.to_hex(), why = %why, "pack quarantined: no commit will reuse it")
            }
            Err(e) => tracing::warn!(pack = %id.to_hex(), error = %e, "could not quarantine pack"),
        }
    }
}

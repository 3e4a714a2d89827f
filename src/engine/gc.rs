//! Retention and garbage collection of one scope: drop keys unused for a TTL, keep the last N
//! generations of each key, evict least recently used keys while the scope is over its byte
//! budget, then delete packs that no kept generation references and that are older than a grace
//! period (quarantined ones whatever their age), but never one a running commit reuses or may
//! have uploaded: see `protect` for how GC and commits see each other.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectMeta;
use serde::Serialize;

use super::error::{Error, Result};
use super::format::Digest;
use super::protect::{self, Doomed, Marker, CLOCK_MARGIN, MARKER_STALE};
use super::store::parse_generation;
use super::Engine;

#[derive(Clone, Debug)]
pub struct GcPolicy {
    /// Generations kept per key (at least 1: the newest is never deleted by this rule).
    pub keep_last: usize,
    /// Keys not restored or committed for this long are dropped whole.
    pub ttl: Option<Duration>,
    /// Past this many stored bytes, whole keys are evicted, least recently used first.
    pub scope_budget: Option<u64>,
    /// Unreferenced packs younger than this are left alone. Running commits do not depend on
    /// it: their markers protect what they reuse and upload, whatever the grace.
    pub grace: Duration,
    pub dry_run: bool,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy {
            keep_last: 3,
            ttl: Some(Duration::from_secs(30 * 86400)),
            scope_budget: None,
            grace: Duration::from_secs(3600),
            dry_run: false,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub keys_expired: Vec<String>,
    pub keys_evicted: Vec<String>,
    pub generations_deleted: usize,
    pub packs_deleted: usize,
    pub bytes_freed: u64,
    pub packs_kept: usize,
    pub bytes_kept: u64,
    /// Unreferenced packs left for a later run because they are younger than the grace period.
    pub packs_young: usize,
    /// Unreferenced packs left for a later run because a running commit reuses them or may
    /// have uploaded them.
    pub packs_in_flight: usize,
    /// Set when packs were not swept (a generation this version cannot read).
    pub sweep_skipped: Option<String>,
}

struct KeyState {
    gens: Vec<u64>,
    last_used: i64,
}

impl Engine {
    pub async fn gc(&self, policy: &GcPolicy) -> Result<GcReport> {
        let now = super::now_unix();
        let mut report = GcReport {
            dry_run: policy.dry_run,
            ..Default::default()
        };

        // Every generation object and every last-use marker, in two listings.
        let mut keys: BTreeMap<String, KeyState> = BTreeMap::new();
        for m in self.store.list(&self.layout.manifests()).await? {
            let Some((key, g)) = key_and_generation(&m.location) else {
                continue;
            };
            let k = keys.entry(key).or_insert(KeyState {
                gens: vec![],
                last_used: 0,
            });
            k.gens.push(g);
            k.last_used = k.last_used.max(m.last_modified.timestamp());
        }
        for (key, k) in keys.iter_mut() {
            k.gens.sort_unstable();
            if let Some(t) = self.last_used(key).await? {
                k.last_used = k.last_used.max(t);
            }
        }

        // TTL: whole keys.
        if let Some(ttl) = policy.ttl {
            let expired: Vec<String> = keys
                .iter()
                .filter(|(_, k)| now - k.last_used > ttl.as_secs() as i64)
                .map(|(key, _)| key.clone())
                .collect();
            for key in expired {
                let k = keys.remove(&key).expect("listed");
                self.drop_key(&key, &k.gens, policy.dry_run).await?;
                report.generations_deleted += k.gens.len();
                report.keys_expired.push(key);
            }
        }

        // Keep the last N generations of each key.
        let keep = policy.keep_last.max(1);
        for (key, k) in keys.iter_mut() {
            if k.gens.len() > keep {
                let old: Vec<u64> = k.gens.drain(..k.gens.len() - keep).collect();
                for g in &old {
                    if !policy.dry_run {
                        self.store.delete(&self.layout.generation(key, *g)).await?;
                    }
                }
                report.generations_deleted += old.len();
            }
        }

        // What each key's kept generations reference: (pack, offset) -> compressed size.
        let mut refs: HashMap<String, HashMap<(Digest, u64), u64>> = HashMap::new();
        let mut unreadable: Option<String> = None;
        for (key, k) in &keys {
            let mut mine = HashMap::new();
            for &g in &k.gens {
                match self.generation_refs(key, g).await {
                    Ok(r) => mine.extend(r),
                    Err(e @ Error::UnsupportedVersion { .. }) => {
                        unreadable.get_or_insert(e.to_string());
                    }
                    // An unreadable generation can never be restored: it protects nothing.
                    Err(e @ Error::Corrupt { .. }) => {
                        tracing::warn!(cache.key = %key, generation = g, error = %e, "skipping corrupt generation");
                    }
                    Err(e) => return Err(e),
                }
            }
            refs.insert(key.clone(), mine);
        }

        // Scope budget: evict least recently used keys while the distinct bytes are over it.
        if let Some(budget) = policy.scope_budget {
            let mut count: HashMap<(Digest, u64), (u32, u64)> = HashMap::new();
            for m in refs.values() {
                for (loc, size) in m {
                    count.entry(*loc).or_insert((0, *size)).0 += 1;
                }
            }
            let mut total: u64 = count.values().map(|(_, s)| s).sum();
            let mut lru: Vec<(i64, String)> = keys
                .iter()
                .map(|(key, k)| (k.last_used, key.clone()))
                .collect();
            lru.sort();
            for (_, key) in lru {
                if total <= budget {
                    break;
                }
                for loc in refs[&key].keys() {
                    let c = count.get_mut(loc).expect("counted");
                    c.0 -= 1;
                    if c.0 == 0 {
                        total -= c.1;
                    }
                }
                refs.remove(&key);
                let k = keys.remove(&key).expect("listed");
                self.drop_key(&key, &k.gens, policy.dry_run).await?;
                report.generations_deleted += k.gens.len();
                report.keys_evicted.push(key);
            }
        }

        // Sweep packs nothing kept references, once past the grace period (or quarantined).
        if let Some(why) = unreadable {
            report.sweep_skipped = Some(why);
            return Ok(report);
        }
        let mut live: HashSet<Digest> = refs
            .values()
            .flat_map(|m| m.keys().map(|(p, _)| *p))
            .collect();
        let quarantined = self.quarantined().await?;
        let mut candidates = Vec::new();
        for m in self.store.list(&self.layout.packs()).await? {
            let Some(id) = m.location.filename().and_then(Digest::from_hex) else {
                continue;
            };
            if live.contains(&id) {
                report.packs_kept += 1;
                report.bytes_kept += m.size;
            } else if !quarantined.contains(&id)
                && now - m.last_modified.timestamp() < policy.grace.as_secs() as i64
            {
                report.packs_young += 1;
            } else {
                candidates.push((id, m));
            }
        }
        if candidates.is_empty() || policy.dry_run {
            for (_, m) in &candidates {
                report.packs_deleted += 1;
                report.bytes_freed += m.size;
            }
            if !policy.dry_run {
                self.forget_quarantine(&quarantined, &live, &HashSet::new())
                    .await?;
            }
            return Ok(report);
        }

        // Announce the packs about to go before looking for running commits: a commit that
        // checks its packs after this does not reuse them, and one that checked before has its
        // marker in the store already.
        let doom = self.layout.doomed().join(protect::unique_id());
        let announced = Instant::now();
        let body = Doomed {
            packs: candidates.iter().map(|(id, _)| id.to_hex()).collect(),
        };
        self.store
            .put(
                &doom,
                bytes::Bytes::from(serde_json::to_vec(&body).expect("serializes")),
            )
            .await?;
        let swept = self
            .sweep(keys, candidates, &mut live, announced, &mut report)
            .await;
        let swept = match swept {
            Ok(gone) => self.forget_quarantine(&quarantined, &live, &gone).await,
            Err(e) => Err(e),
        };
        if let Err(e) = self.store.delete(&doom).await {
            tracing::warn!(error = %e, "could not remove gc's doomed list");
        }
        swept?;
        Ok(report)
    }

    /// Deletes the announced candidates except what running commits reuse or may have uploaded
    /// and what generations written since the retention pass reference. Returns the deleted.
    async fn sweep(
        &self,
        keys: BTreeMap<String, KeyState>,
        candidates: Vec<(Digest, ObjectMeta)>,
        live: &mut HashSet<Digest>,
        announced: Instant,
        report: &mut GcReport,
    ) -> Result<HashSet<Digest>> {
        // Running commits: the packs their markers name stay, and so does every pack written
        // since the oldest of them started (what they upload themselves).
        let now = super::now_unix();
        let mut protected: HashSet<Digest> = HashSet::new();
        let mut oldest: Option<i64> = None;
        for m in self.store.list(&self.layout.inflight()).await? {
            if now - m.last_modified.timestamp() > MARKER_STALE.as_secs() as i64 {
                self.store.delete(&m.location).await?;
                continue;
            }
            let Some((body, _)) = self.store.get(&m.location).await? else {
                continue;
            };
            let started = match serde_json::from_slice::<Marker>(&body) {
                Ok(marker) => {
                    protected.extend(marker.packs.iter().filter_map(|h| Digest::from_hex(h)));
                    marker.started.unwrap_or(m.last_modified.timestamp())
                }
                // A marker this version cannot read: keep every pack.
                Err(_) => i64::MIN + CLOCK_MARGIN,
            };
            oldest = Some(oldest.map_or(started, |o: i64| o.min(started)));
        }
        // Generations created since the retention pass (by commits that finished meanwhile).
        for m in self.store.list(&self.layout.manifests()).await? {
            let Some((key, g)) = key_and_generation(&m.location) else {
                continue;
            };
            if keys.get(&key).is_some_and(|k| k.gens.contains(&g)) {
                continue;
            }
            match self.generation_refs(&key, g).await {
                Ok(r) => live.extend(r.keys().map(|(p, _)| *p)),
                Err(Error::NoSuchGeneration { .. } | Error::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let mut doomed = Vec::new();
        for (id, m) in candidates {
            let in_flight = protected.contains(&id)
                || oldest.is_some_and(|o| m.last_modified.timestamp() >= o - CLOCK_MARGIN);
            if live.contains(&id) {
                report.packs_kept += 1;
                report.bytes_kept += m.size;
            } else if in_flight {
                report.packs_in_flight += 1;
            } else {
                report.packs_deleted += 1;
                report.bytes_freed += m.size;
                doomed.push((id, m.location));
            }
        }
        // Past this, commits that started before the announcement may no longer be honoured.
        if announced.elapsed() > MARKER_STALE / 2 {
            report.sweep_skipped = Some("the sweep took too long to be safe; run gc again".into());
            report.packs_deleted = 0;
            report.bytes_freed = 0;
            return Ok(HashSet::new());
        }
        let gone: HashSet<Digest> = doomed.iter().map(|(id, _)| *id).collect();
        futures::stream::iter(doomed)
            .map(|(_, loc)| async move { self.store.delete(&loc).await })
            .buffer_unordered(16)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(gone)
    }

    /// Removes the quarantine markers of packs that are gone and that nothing kept references.
    async fn forget_quarantine(
        &self,
        quarantined: &HashSet<Digest>,
        live: &HashSet<Digest>,
        gone: &HashSet<Digest>,
    ) -> Result<()> {
        for id in quarantined {
            if live.contains(id) {
                continue;
            }
            let deleted = gone.contains(id)
                || self
                    .store
                    .head(&self.layout.pack(&id.to_hex()))
                    .await?
                    .is_none();
            if deleted {
                self.store
                    .delete(&self.layout.quarantine().join(id.to_hex()))
                    .await?;
            }
        }
        Ok(())
    }

    async fn generation_refs(
        &self,
        key: &str,
        generation: u64,
    ) -> Result<HashMap<(Digest, u64), u64>> {
        let g = self.load_generation(key, generation).await?;
        let entries = self.load_entries(&g).await?;
        Ok(entries
            .iter()
            .flat_map(|e| &e.chunks)
            .chain(&g.manifest)
            .map(|r| ((r.p, r.o), r.c as u64))
            .collect())
    }

    /// Wipes a cache: every generation of `key`, its head hint and last-use marker. Its packs
    /// stay until GC finds nothing references them (after the grace period), so a restore
    /// that is reading them right now finishes. Returns how many generations were deleted.
    pub async fn wipe(&self, key: &str) -> Result<usize> {
        // Every object, even one whose number is invalid: wiping is how a blocked key is freed.
        let gens = self.generation_objects(key).await?;
        if gens.is_empty() {
            return Err(Error::NoSuchKey {
                scope: self.scope.clone(),
                key: key.to_string(),
            });
        }
        self.drop_key(key, &gens, false).await?;
        Ok(gens.len())
    }

    /// Deletes a key whole: its generations, then its head hint and last-use marker.
    async fn drop_key(&self, key: &str, gens: &[u64], dry_run: bool) -> Result<()> {
        if dry_run {
            return Ok(());
        }
        for g in gens {
            self.store.delete(&self.layout.generation(key, *g)).await?;
        }
        self.store.delete(&self.layout.head(key)).await?;
        self.store.delete(&self.layout.used(key)).await?;
        Ok(())
    }
}

/// The key and generation of a generation object (`.../manifests/<key>/<generation>`).
fn key_and_generation(location: &object_store::path::Path) -> Option<(String, u64)> {
    let g = parse_generation(location)?;
    let key = location.parts().rev().nth(1)?.as_ref().to_string();
    Some((key, g))
}

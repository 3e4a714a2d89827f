//! coordination.k8s.io/v1 Leases.
//!
//! A locked cache has one Lease per (scope, key) in the driver's namespace. Its holder is the pod
//! (by uid) that has the cache mounted; it is taken at NodePublishVolume, renewed while the pod
//! runs and released only after that pod's commit is in the store, so the next pod sees its
//! writes. Pods that find it held queue up in the Lease's `cachevol.dev/waiters` annotation and
//! are served in arrival order; a waiter that stops asking (its pod deleted or moved) drops out.
//! A holder that is not renewed (its node died) expires and the first waiter takes over; the
//! old holder, if it comes back, finds the Lease gone and its commit is refused (fencing).
//!
//! A Lease with no holder and no waiters left is deleted when its holder releases it (the
//! controller's GC deletes those a dead node left behind, see [`Leases::collect`]), so there is
//! no Lease per key ever locked.
//!
//! The controller's leader Lease uses the same read-modify-write loop (without the lock label):
//! every change is a replace conditional on a resourceVersion, starting from the copy this
//! process last read or wrote, re-read and retried with backoff on 409.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::BackoffBuilder;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use serde::{Deserialize, Serialize};

use super::{is_conflict, is_not_found};

/// Annotations on a lock Lease.
pub const WAITERS: &str = "cachevol.dev/waiters";
pub const HOLDER: &str = "cachevol.dev/holder";
pub const SCOPE: &str = "cachevol.dev/scope";
pub const KEY: &str = "cachevol.dev/key";
/// Label on every Lease cachevol makes.
pub const LOCK_LABEL: &str = "cachevol.dev/lock";

/// How often a read-modify-write is retried after 409s before giving up, and the backoff
/// between tries (jittered: writers racing for one Lease spread out).
const ATTEMPTS: usize = 10;

fn conflict_backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(10))
        .with_max_delay(Duration::from_millis(500))
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(ATTEMPTS)
        .build()
}

/// A waiter refreshes its `seen` time when it is older than this (asking again more often only
/// reads the Lease).
const SEEN_REFRESH_SECS: i64 = 3;

/// A pod asking for a lock, and the holder's description in messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimant {
    pub uid: String,
    /// `namespace/name`.
    pub pod: String,
    pub node: String,
}

impl Claimant {
    fn describe(&self) -> String {
        format!("pod {} on node {}", self.pod, self.node)
    }
}

/// A pod waiting for a lock, in the Lease's queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
    pub uid: String,
    pub pod: String,
    pub node: String,
    /// Unix seconds of its first and of its latest try.
    pub since: i64,
    pub seen: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// The claimant holds the lock. `took_over`: the holder whose Lease had expired.
    Held { took_over: Option<String> },
    /// Another pod holds it (or is first in line): `place` is 1 for the next in line.
    Waiting { holder: String, place: usize },
}

/// The name of the Lease of a locked cache: DNS-safe, fixed length, from scope and key.
pub fn lock_name(scope: &str, key: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(scope.as_bytes());
    h.update(b"\0");
    h.update(key.as_bytes());
    format!("cachevol-lock-{}", &h.finalize().to_hex()[..24])
}

fn waiters_of(lease: &Lease) -> Vec<Waiter> {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(WAITERS))
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

fn set_annotation(lease: &mut Lease, k: &str, v: String) {
    lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(k.to_string(), v);
}

fn set_waiters(lease: &mut Lease, w: &[Waiter]) {
    set_annotation(
        lease,
        WAITERS,
        serde_json::to_string(w).expect("waiters serialize"),
    );
}

/// What a read-modify-write step decided.
enum Step<T> {
    /// Write the modified Lease, then return T.
    Write(T),
    /// Return T without writing.
    Done(T),
    /// Delete the Lease (if unchanged since read), then return T.
    Delete(T),
}

#[derive(Clone)]
pub struct Leases {
    api: Api<Lease>,
    client: kube::Client,
    namespace: String,
    duration: Duration,
    /// A waiter that has not asked again for this long is dropped from the queue.
    waiter_ttl: Duration,
    /// The copy of each Lease this process last read or wrote: a change starts from it (its
    /// resourceVersion makes the write conditional) instead of reading first.
    known: Arc<Mutex<HashMap<String, Lease>>>,
}

impl Leases {
    pub fn new(client: kube::Client, namespace: &str, duration: Duration) -> Leases {
        Leases {
            api: Api::namespaced(client.clone(), namespace),
            client,
            namespace: namespace.to_string(),
            duration,
            // kubelet retries a failed mount with backoff up to about two minutes.
            waiter_ttl: Duration::from_secs(150),
            known: Arc::default(),
        }
    }

    fn remember(&self, name: &str, lease: Option<Lease>) {
        let mut known = self.known.lock().expect("not poisoned");
        match lease {
            Some(l) => known.insert(name.to_string(), l),
            None => known.remove(name),
        };
    }

    fn expired(&self, spec: &LeaseSpec, now: Timestamp) -> bool {
        let secs = spec
            .lease_duration_seconds
            .map_or(self.duration.as_secs() as i64, i64::from);
        match &spec.renew_time {
            Some(MicroTime(t)) => t.as_millisecond() + secs * 1000 < now.as_millisecond(),
            None => true,
        }
    }

    /// A new Lease; `lock`: a lock's, with the lock label (the leader Lease has none).
    fn blank(&self, name: &str, annotations: &[(&str, &str)], lock: bool) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(self.namespace.clone()),
                labels: lock.then(|| {
                    [(LOCK_LABEL.to_string(), "true".to_string())]
                        .into_iter()
                        .collect()
                }),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec::default()),
        }
    }

    fn hold(&self, lease: &mut Lease, identity: &str, now: Timestamp) {
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(identity) {
            spec.holder_identity = Some(identity.to_string());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(self.duration.as_secs().max(1) as i32);
    }

    /// Lets `f` change the Lease `name` (created from `blank` when missing) and writes it back
    /// conditionally. It starts from the copy last seen when there is one: a write based on a
    /// stale copy gets a 409, and a decision not to write is only taken on a fresh read. On
    /// conflicts it reads again, after a short jittered backoff.
    async fn modify<T>(
        &self,
        name: &str,
        blank: impl Fn() -> Lease,
        mut f: impl FnMut(&mut Lease, Timestamp) -> Step<T>,
    ) -> Result<T, kube::Error> {
        let mut backoff = conflict_backoff();
        let mut cached = self.known.lock().expect("not poisoned").get(name).cloned();
        loop {
            let now = Timestamp::now();
            let fresh = cached.is_none();
            let (mut lease, exists) = match cached.take() {
                Some(l) => (l, true),
                None => match self.api.get_opt(name).await? {
                    Some(l) => (l, true),
                    None => (blank(), false),
                },
            };
            let step = f(&mut lease, now);
            if !fresh && matches!(step, Step::Done(_)) {
                continue; // decided on an old copy: read it and decide again
            }
            let (out, written) = match step {
                Step::Done(t) => return Ok(t),
                Step::Write(t) => {
                    let w = if exists {
                        self.api.replace(name, &PostParams::default(), &lease).await
                    } else {
                        self.api.create(&PostParams::default(), &lease).await
                    };
                    (t, w.map(Some))
                }
                Step::Delete(t) if !exists => return Ok(t),
                Step::Delete(t) => {
                    let dp = DeleteParams {
                        preconditions: Some(Preconditions {
                            resource_version: lease.metadata.resource_version.clone(),
                            uid: lease.metadata.uid.clone(),
                        }),
                        ..Default::default()
                    };
                    let w = match self.api.delete(name, &dp).await {
                        Err(e) if is_not_found(&e) => Ok(None),
                        r => r.map(|_| None),
                    };
                    (t, w)
                }
            };
            match written {
                Ok(l) => {
                    self.remember(name, l);
                    return Ok(out);
                }
                Err(e) if is_conflict(&e) || (!fresh && is_not_found(&e)) => {
                    self.remember(name, None);
                    if fresh {
                        match backoff.next() {
                            Some(d) => tokio::time::sleep(d).await,
                            None => return Err(e),
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes the lock of cache (scope, key) for `me`, or queues `me` behind its holder.
    pub async fn acquire(
        &self,
        scope: &str,
        key: &str,
        me: &Claimant,
    ) -> Result<Acquire, kube::Error> {
        let name = lock_name(scope, key);
        loop {
            let mut stale_first: Option<Waiter> = None;
            let out = self
                .modify(
                    &name,
                    || self.blank(&name, &[(SCOPE, scope), (KEY, key)], true),
                    |lease, now| {
                        stale_first = None;
                        let spec = lease.spec.clone().unwrap_or_default();
                        let mut waiters = waiters_of(lease);
                        if spec.holder_identity.as_deref() == Some(me.uid.as_str()) {
                            // Ours already (kubelet retrying a publish that worked): renew.
                            waiters.retain(|w| w.uid != me.uid);
                            set_waiters(lease, &waiters);
                            self.hold(lease, &me.uid, now);
                            return Step::Write(Acquire::Held { took_over: None });
                        }
                        let secs = now.as_second();
                        let ttl = self.waiter_ttl.as_secs() as i64;
                        let before = waiters.len();
                        waiters.retain(|w| w.uid == me.uid || secs - w.seen <= ttl);
                        // Nothing to write when only asking again soon after the last time.
                        let mut changed = waiters.len() != before;
                        match waiters.iter_mut().find(|w| w.uid == me.uid) {
                            Some(w) if secs - w.seen < SEEN_REFRESH_SECS => {}
                            Some(w) => {
                                w.seen = secs;
                                changed = true;
                            }
                            None => {
                                changed = true;
                                waiters.push(Waiter {
                                    uid: me.uid.clone(),
                                    pod: me.pod.clone(),
                                    node: me.node.clone(),
                                    since: secs,
                                    seen: secs,
                                })
                            }
                        }
                        let write = |t| {
                            if changed {
                                Step::Write(t)
                            } else {
                                Step::Done(t)
                            }
                        };
                        let place = waiters
                            .iter()
                            .position(|w| w.uid == me.uid)
                            .expect("just added")
                            + 1;
                        let holder_text = lease
                            .metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get(HOLDER).cloned());
                        let live = spec.holder_identity.is_some() && !self.expired(&spec, now);
                        if live {
                            set_waiters(lease, &waiters);
                            return write(Acquire::Waiting {
                                holder: holder_text.unwrap_or_else(|| "another pod".into()),
                                place,
                            });
                        }
                        if place > 1 {
                            // Free, but another pod came first: it is served first, unless it
                            // has not asked for a while (then check that it still exists).
                            let first = waiters[0].clone();
                            set_waiters(lease, &waiters);
                            if secs - first.seen > 10 {
                                stale_first = Some(first.clone());
                            }
                            return write(Acquire::Waiting {
                                holder: format!(
                                    "nobody; pod {} (node {}) is first in line",
                                    first.pod, first.node
                                ),
                                place,
                            });
                        }
                        let took_over = spec
                            .holder_identity
                            .as_ref()
                            .map(|_| holder_text.unwrap_or_else(|| "an earlier holder".into()));
                        waiters.retain(|w| w.uid != me.uid);
                        set_waiters(lease, &waiters);
                        set_annotation(lease, HOLDER, me.describe());
                        self.hold(lease, &me.uid, now);
                        Step::Write(Acquire::Held { took_over })
                    },
                )
                .await?;
            match stale_first {
                Some(w) if !self.pod_alive(&w).await => {
                    tracing::info!(waiter = w.pod, "dropping a waiter whose pod is gone");
                    self.drop_waiter(&name, &w.uid).await?;
                }
                _ => return Ok(out),
            }
        }
    }

    /// Whether a waiting pod still exists and has not ended (then it will ask again).
    async fn pod_alive(&self, w: &Waiter) -> bool {
        let Some((ns, name)) = w.pod.split_once('/') else {
            return false;
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        match pods.get_opt(name).await {
            Ok(Some(p)) => {
                let ended = p
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
                p.metadata.uid.as_deref() == Some(w.uid.as_str())
                    && !ended
                    && p.metadata.deletion_timestamp.is_none()
            }
            Ok(None) => false,
            // Cannot tell: keep it (it drops out by itself when it stops asking).
            Err(_) => true,
        }
    }

    /// Takes pod `uid` out of the queue of (scope, key) (its pod ended while it waited).
    pub async fn leave(&self, scope: &str, key: &str, uid: &str) -> Result<(), kube::Error> {
        self.drop_waiter(&lock_name(scope, key), uid).await
    }

    async fn drop_waiter(&self, name: &str, uid: &str) -> Result<(), kube::Error> {
        self.modify(
            name,
            || self.blank(name, &[], true),
            |lease, _| {
                let mut w = waiters_of(lease);
                let before = w.len();
                w.retain(|x| x.uid != uid);
                if w.len() == before {
                    return Step::Done(());
                }
                set_waiters(lease, &w);
                Step::Write(())
            },
        )
        .await
    }

    /// Renews the lock of (scope, key) for pod `uid`. False when the pod no longer holds it
    /// (it expired and another pod took it, or it was released): the pod is fenced. Starts from
    /// the copy of the Lease last written, so a renewal is one conditional write.
    pub async fn renew(&self, scope: &str, key: &str, uid: &str) -> Result<bool, kube::Error> {
        let name = lock_name(scope, key);
        let r = self
            .modify(
                &name,
                || self.blank(&name, &[], true),
                |lease, now| {
                    let held = lease.metadata.resource_version.is_some()
                        && lease
                            .spec
                            .as_ref()
                            .and_then(|s| s.holder_identity.as_deref())
                            == Some(uid);
                    if !held {
                        return Step::Done(false);
                    }
                    self.hold(lease, uid, now);
                    Step::Write(true)
                },
            )
            .await;
        match r {
            Err(e) if is_not_found(&e) => Ok(false),
            r => r,
        }
    }

    /// The description of the current holder of (scope, key), if any.
    pub async fn holder(&self, scope: &str, key: &str) -> Result<Option<String>, kube::Error> {
        let lease = self.api.get_opt(&lock_name(scope, key)).await?;
        Ok(lease.and_then(|l| {
            l.spec.as_ref()?.holder_identity.as_ref()?;
            Some(
                l.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(HOLDER).cloned())
                    .unwrap_or_else(|| "another pod".into()),
            )
        }))
    }

    /// Releases the lock of (scope, key) if pod `uid` holds it; the queue stays. A Lease left
    /// with nobody waiting is deleted.
    pub async fn release(&self, scope: &str, key: &str, uid: &str) -> Result<(), kube::Error> {
        self.release_named(&lock_name(scope, key), uid).await
    }

    /// Takes or renews the leader Lease `name` for `identity`; true while it leads.
    pub async fn lead(&self, name: &str, identity: &str) -> Result<bool, kube::Error> {
        self.modify(
            name,
            || self.blank(name, &[], false),
            |lease, now| {
                let spec = lease.spec.clone().unwrap_or_default();
                let mine = spec.holder_identity.as_deref() == Some(identity);
                if mine || spec.holder_identity.is_none() || self.expired(&spec, now) {
                    // Earlier versions labelled it as a lock: it is not one.
                    if let Some(l) = lease.metadata.labels.as_mut() {
                        l.remove(LOCK_LABEL);
                    }
                    self.hold(lease, identity, now);
                    Step::Write(true)
                } else {
                    Step::Done(false)
                }
            },
        )
        .await
    }

    async fn release_named(&self, name: &str, identity: &str) -> Result<(), kube::Error> {
        let ttl = self.waiter_ttl.as_secs() as i64;
        let r = self
            .modify(
                name,
                || self.blank(name, &[], true),
                |lease, now| {
                    let secs = now.as_second();
                    let nobody_waits = waiters_of(lease).iter().all(|w| secs - w.seen > ttl);
                    let spec = lease.spec.get_or_insert_with(Default::default);
                    if lease.metadata.resource_version.is_none()
                        || spec.holder_identity.as_deref() != Some(identity)
                    {
                        return Step::Done(());
                    }
                    if nobody_waits {
                        return Step::Delete(());
                    }
                    spec.holder_identity = None;
                    spec.acquire_time = None;
                    // Kept: when it was freed, for the controller's GC.
                    spec.renew_time = Some(MicroTime(now));
                    if let Some(a) = lease.metadata.annotations.as_mut() {
                        a.remove(HOLDER);
                    }
                    Step::Write(())
                },
            )
            .await;
        match r {
            Err(e) if is_not_found(&e) => Ok(()),
            r => r,
        }
    }

    /// The changes of the lock Lease of (scope, key), as they happen (a watch): each item says
    /// "look again". Errors are retried inside with backoff.
    pub fn changes(&self, scope: &str, key: &str) -> impl futures::Stream<Item = ()> + Send {
        use futures::StreamExt;
        use kube::runtime::{watcher, WatchStreamExt};
        let config =
            watcher::Config::default().fields(&format!("metadata.name={}", lock_name(scope, key)));
        watcher(self.api.clone(), config)
            .default_backoff()
            .filter_map(|e| async move {
                match e {
                    Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))
                    | Ok(watcher::Event::InitDone) => Some(()),
                    Ok(_) => None,
                    Err(e) => {
                        tracing::debug!(error = %e, "watching a lock Lease failed; retrying");
                        None
                    }
                }
            })
    }

    /// The controller's GC of lock Leases a dead node left behind: deletes those nobody has
    /// held for `idle` (a holder that stopped renewing counts from its last renewal) and no
    /// live pod waits for. Returns how many it deleted.
    pub async fn collect(&self, idle: Duration) -> Result<usize, kube::Error> {
        let list = self
            .api
            .list(&ListParams::default().labels(&format!("{LOCK_LABEL}=true")))
            .await?;
        let now = Timestamp::now();
        let mut deleted = 0;
        for lease in list.items {
            let Some(name) = lease.metadata.name.clone() else {
                continue;
            };
            if !self.abandoned(&lease, now, idle) {
                continue;
            }
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: lease.metadata.resource_version.clone(),
                    uid: lease.metadata.uid.clone(),
                }),
                ..Default::default()
            };
            match self.api.delete(&name, &dp).await {
                Ok(_) => {
                    deleted += 1;
                    tracing::info!(lease = name, "deleted an abandoned lock Lease");
                }
                // Changed meanwhile (someone asked for it) or gone: leave it.
                Err(e) if is_conflict(&e) || is_not_found(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    fn abandoned(&self, lease: &Lease, now: Timestamp, idle: Duration) -> bool {
        let spec = lease.spec.clone().unwrap_or_default();
        let last = spec
            .renew_time
            .as_ref()
            .map(|t| t.0)
            .or_else(|| lease.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let quiet = last
            .is_none_or(|t| t.as_millisecond() + idle.as_millis() as i64 <= now.as_millisecond());
        let free = spec.holder_identity.is_none() || self.expired(&spec, now);
        let ttl = self.waiter_ttl.as_secs() as i64;
        let nobody_waits = waiters_of(lease)
            .iter()
            .all(|w| now.as_second() - w.seen > ttl);
        free && quiet && nobody_waits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_are_dns_labels_and_differ_by_scope() {
        let a = lock_name("team-a", "npm");
        let b = lock_name("team-b", "npm");
        assert_ne!(a, b);
        assert_ne!(lock_name("a", "bc"), lock_name("ab", "c"));
        for n in [&a, &b] {
            assert!(n.len() <= 63);
            assert!(n
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'));
        }
    }
}

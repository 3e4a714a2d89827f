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
//! Lease names and the lock label come from the driver's name ([`DriverName`]), so that two
//! installs in one namespace never share a Lease; the annotations below stay `cachevol.dev/*`,
//! on Leases that are already the install's own.
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
use crate::spec::DriverName;

/// Annotations on a lock Lease.
pub const WAITERS: &str = "cachevol.dev/waiters";
pub const HOLDER: &str = "cachevol.dev/holder";
pub const SCOPE: &str = "cachevol.dev/scope";
pub const KEY: &str = "cachevol.dev/key";
/// Label on every lock Lease of the default driver ([`DriverName::lock_label`]).
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
    /// The CSI volume id the pod mounts the cache as ("" when unknown).
    pub volume: String,
}

impl Claimant {
    /// Kubelet serializes this claimant's NodePublishVolume with `w`'s: the same persistent
    /// volume on the same node (kubelet runs one mount at a time per such volume, whatever the
    /// pod, and picks the next pod itself).
    fn serialized_with(&self, w: &Waiter) -> bool {
        !self.volume.is_empty() && w.volume == self.volume && w.node == self.node
    }

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
    /// The CSI volume id it mounts the cache as (absent in Leases of older versions).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub volume: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// The claimant holds the lock. `took_over`: the holder whose Lease had expired.
    Held { took_over: Option<String> },
    /// Another pod holds it (or is first in line): `place` is 1 for the next in line.
    Waiting { holder: String, place: usize },
}

/// The name of the Lease of a locked cache of the default driver: a DNS label of fixed length,
/// from scope and key.
pub fn lock_name(scope: &str, key: &str) -> String {
    lock_name_of(&DriverName::default(), scope, key)
}

/// The name of the Lease of a locked cache of `driver`: its [`DriverName::lease_prefix`], then
/// a hash of scope and key (a DNS subdomain, as Lease names are; a label for the default).
pub fn lock_name_of(driver: &DriverName, scope: &str, key: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(scope.as_bytes());
    h.update(b"\0");
    h.update(key.as_bytes());
    format!(
        "{}-lock-{}",
        driver.lease_prefix(),
        &h.finalize().to_hex()[..24]
    )
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

/// What the lock decisions read from a Lease: its fields, not the API object, so the decisions
/// are pure functions of them and of the time (see [`Rules`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseView {
    /// It was read from the API server (it has a resourceVersion), not made up because missing.
    pub exists: bool,
    /// `holderIdentity`: a pod uid, or the controller's identity for the leader Lease.
    pub holder: Option<String>,
    /// `renewTime`, Unix milliseconds.
    pub renewed_ms: Option<i64>,
    /// `leaseDurationSeconds`.
    pub duration_secs: Option<i64>,
    /// `creationTimestamp`, Unix milliseconds.
    pub created_ms: Option<i64>,
    /// The holder's description (annotation [`HOLDER`]).
    pub holder_text: Option<String>,
    /// The queue (annotation [`WAITERS`]), first in line first.
    pub waiters: Vec<Waiter>,
}

impl LeaseView {
    pub fn of(lease: &Lease) -> LeaseView {
        let spec = lease.spec.clone().unwrap_or_default();
        LeaseView {
            exists: lease.metadata.resource_version.is_some(),
            holder: spec.holder_identity,
            renewed_ms: spec.renew_time.map(|MicroTime(t)| t.as_millisecond()),
            duration_secs: spec.lease_duration_seconds.map(i64::from),
            created_ms: lease
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_millisecond()),
            holder_text: lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(HOLDER).cloned()),
            waiters: waiters_of(lease),
        }
    }
}

/// What [`Rules::acquire`] decided for a claimant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcquireDecision {
    pub outcome: Acquire,
    /// The queue to store.
    pub waiters: Vec<Waiter>,
    /// Make the claimant the holder (or renew it when it already is).
    pub hold: bool,
    /// The holder description to store, when it changes hands.
    pub holder_text: Option<String>,
    /// Something changed: write the Lease (otherwise only answer).
    pub write: bool,
    /// The first in line has not asked for a while: check that its pod still exists.
    pub stale_first: Option<Waiter>,
}

/// What [`Rules::release`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Not held by this identity (or not there): nothing to do.
    NotHeld,
    /// Nobody waits: delete the Lease.
    Delete,
    /// Others wait: clear the holder, keep the queue.
    Free,
}

/// The lock and leader decisions, pure: over a [`LeaseView`] and the time (Unix milliseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// The Lease duration this process writes, and assumes when a Lease has none.
    pub duration_secs: i64,
    /// A waiter that has not asked again for this long (seconds) is dropped from the queue.
    pub waiter_ttl_secs: i64,
}

impl Rules {
    /// The holder (if any) was not renewed within the Lease's duration.
    pub fn expired(&self, v: &LeaseView, now_ms: i64) -> bool {
        let secs = v.duration_secs.unwrap_or(self.duration_secs);
        match v.renewed_ms {
            Some(t) => t + secs * 1000 < now_ms,
            None => true,
        }
    }

    /// Whether every waiter has stopped asking.
    fn nobody_waits(&self, v: &LeaseView, now_ms: i64) -> bool {
        let secs = now_ms.div_euclid(1000);
        v.waiters
            .iter()
            .all(|w| secs - w.seen > self.waiter_ttl_secs)
    }

    /// `me` asks for the lock: it takes it when free and first in line (or already holds it:
    /// kubelet retrying a publish), else it joins or stays in the queue.
    pub fn acquire(&self, v: &LeaseView, me: &Claimant, now_ms: i64) -> AcquireDecision {
        let mut waiters = v.waiters.clone();
        if v.holder.as_deref() == Some(me.uid.as_str()) {
            // Ours already (kubelet retrying a publish that worked): renew.
            waiters.retain(|w| w.uid != me.uid);
            return AcquireDecision {
                outcome: Acquire::Held { took_over: None },
                waiters,
                hold: true,
                holder_text: None,
                write: true,
                stale_first: None,
            };
        }
        let secs = now_ms.div_euclid(1000);
        let ttl = self.waiter_ttl_secs;
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
                    volume: me.volume.clone(),
                })
            }
        }
        let place = waiters
            .iter()
            .position(|w| w.uid == me.uid)
            .expect("just added")
            + 1;
        let wait = |holder: String, waiters: Vec<Waiter>, stale_first| AcquireDecision {
            outcome: Acquire::Waiting { holder, place },
            waiters,
            hold: false,
            holder_text: None,
            write: changed,
            stale_first,
        };
        let live = v.holder.is_some() && !self.expired(v, now_ms);
        if live {
            let holder = v
                .holder_text
                .clone()
                .unwrap_or_else(|| "another pod".into());
            return wait(holder, waiters, None);
        }
        if place > 1 && me.serialized_with(&waiters[0]) {
            // Free, and the first in line is a pod whose mount kubelet serializes with ours
            // (one volume on one node): kubelet, not the queue, picks which of those pods it
            // calls next, and it calls none of the others while this call is answered. The
            // caller takes the first place; that pod takes the caller's place. Across nodes
            // and volumes the queue's order holds.
            let first = waiters.remove(0);
            waiters[place - 2] = first;
        } else if place > 1 {
            // Free, but another pod came first: it is served first, unless it has not asked
            // for a while (then check that it still exists).
            let first = waiters[0].clone();
            let holder = format!(
                "nobody; pod {} (node {}) is first in line",
                first.pod, first.node
            );
            let stale = (secs - first.seen > 10).then_some(first);
            return wait(holder, waiters, stale);
        }
        let took_over = v.holder.as_ref().map(|_| {
            v.holder_text
                .clone()
                .unwrap_or_else(|| "an earlier holder".into())
        });
        waiters.retain(|w| w.uid != me.uid);
        AcquireDecision {
            outcome: Acquire::Held { took_over },
            waiters,
            hold: true,
            holder_text: Some(me.describe()),
            write: true,
            stale_first: None,
        }
    }

    /// Pod `uid` renews the lock: only while it still holds it (else it is fenced).
    pub fn renew(&self, v: &LeaseView, uid: &str) -> bool {
        v.exists && v.holder.as_deref() == Some(uid)
    }

    /// `identity` lets go of the lock.
    pub fn release(&self, v: &LeaseView, identity: &str, now_ms: i64) -> Release {
        if !v.exists || v.holder.as_deref() != Some(identity) {
            Release::NotHeld
        } else if self.nobody_waits(v, now_ms) {
            Release::Delete
        } else {
            Release::Free
        }
    }

    /// `identity` takes or keeps the leader Lease: when it holds it, nobody does, or the holder
    /// expired.
    pub fn lead(&self, v: &LeaseView, identity: &str, now_ms: i64) -> bool {
        v.holder.as_deref() == Some(identity) || v.holder.is_none() || self.expired(v, now_ms)
    }

    /// A lock Lease a dead node left behind: nobody has held it for `idle_ms` (a holder that
    /// stopped renewing counts from its last renewal) and no pod still asks for it.
    pub fn abandoned(&self, v: &LeaseView, now_ms: i64, idle_ms: i64) -> bool {
        let last = v.renewed_ms.or(v.created_ms);
        let quiet = last.is_none_or(|t| t + idle_ms <= now_ms);
        let free = v.holder.is_none() || self.expired(v, now_ms);
        free && quiet && self.nobody_waits(v, now_ms)
    }
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
    /// Whose Leases these are: their names and the lock label derive from it.
    driver: DriverName,
    lock_label: String,
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
            driver: DriverName::default(),
            lock_label: LOCK_LABEL.to_string(),
        }
    }

    /// The Leases of `driver` instead of the default driver's: other names, another label.
    pub fn for_driver(mut self, driver: &DriverName) -> Leases {
        self.lock_label = driver.lock_label();
        self.driver = driver.clone();
        self
    }

    /// The driver whose Leases these are.
    pub fn driver(&self) -> &DriverName {
        &self.driver
    }

    /// The name of the lock Lease of cache (scope, key).
    pub fn lock_name(&self, scope: &str, key: &str) -> String {
        lock_name_of(&self.driver, scope, key)
    }

    fn remember(&self, name: &str, lease: Option<Lease>) {
        let mut known = self.known.lock().expect("not poisoned");
        match lease {
            Some(l) => known.insert(name.to_string(), l),
            None => known.remove(name),
        };
    }

    fn rules(&self) -> Rules {
        Rules {
            duration_secs: self.duration.as_secs() as i64,
            waiter_ttl_secs: self.waiter_ttl.as_secs() as i64,
        }
    }

    /// A new Lease; `lock`: a lock's, with the lock label (the leader Lease has none).
    fn blank(&self, name: &str, annotations: &[(&str, &str)], lock: bool) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(self.namespace.clone()),
                labels: lock.then(|| {
                    [(self.lock_label.clone(), "true".to_string())]
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
        let name = self.lock_name(scope, key);
        loop {
            let mut stale_first: Option<Waiter> = None;
            let out = self
                .modify(
                    &name,
                    || self.blank(&name, &[(SCOPE, scope), (KEY, key)], true),
                    |lease, now| {
                        let d =
                            self.rules()
                                .acquire(&LeaseView::of(lease), me, now.as_millisecond());
                        stale_first = d.stale_first;
                        set_waiters(lease, &d.waiters);
                        if let Some(text) = d.holder_text {
                            set_annotation(lease, HOLDER, text);
                        }
                        if d.hold {
                            self.hold(lease, &me.uid, now);
                        }
                        if d.write {
                            Step::Write(d.outcome)
                        } else {
                            Step::Done(d.outcome)
                        }
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
        self.drop_waiter(&self.lock_name(scope, key), uid).await
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
        let name = self.lock_name(scope, key);
        let r = self
            .modify(
                &name,
                || self.blank(&name, &[], true),
                |lease, now| {
                    if !self.rules().renew(&LeaseView::of(lease), uid) {
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
        let lease = self.api.get_opt(&self.lock_name(scope, key)).await?;
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
        self.release_named(&self.lock_name(scope, key), uid).await
    }

    /// Takes or renews the leader Lease `name` for `identity`; true while it leads.
    pub async fn lead(&self, name: &str, identity: &str) -> Result<bool, kube::Error> {
        self.modify(
            name,
            || self.blank(name, &[], false),
            |lease, now| {
                let v = LeaseView::of(lease);
                if self.rules().lead(&v, identity, now.as_millisecond()) {
                    // Earlier versions labelled it as a lock: it is not one.
                    if let Some(l) = lease.metadata.labels.as_mut() {
                        l.remove(&self.lock_label);
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
        let r = self
            .modify(
                name,
                || self.blank(name, &[], true),
                |lease, now| {
                    let v = LeaseView::of(lease);
                    match self.rules().release(&v, identity, now.as_millisecond()) {
                        Release::NotHeld => return Step::Done(()),
                        Release::Delete => return Step::Delete(()),
                        Release::Free => {}
                    }
                    let spec = lease.spec.get_or_insert_with(Default::default);
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
        let config = watcher::Config::default()
            .fields(&format!("metadata.name={}", self.lock_name(scope, key)));
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
            .list(&ListParams::default().labels(&format!("{}=true", self.lock_label)))
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
        self.rules().abandoned(
            &LeaseView::of(lease),
            now.as_millisecond(),
            idle.as_millis() as i64,
        )
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

    #[test]
    fn another_driver_has_lock_leases_of_its_own() {
        let canary = DriverName::parse("canary.cachevol.dev").unwrap();
        let n = lock_name_of(&canary, "team-a", "npm");
        assert_ne!(n, lock_name("team-a", "npm"));
        assert_eq!(
            lock_name_of(&DriverName::default(), "team-a", "npm"),
            lock_name("team-a", "npm")
        );
        // The longest driver name still gives a DNS subdomain, as Lease names must be.
        let long = DriverName::parse(&"a".repeat(63)).unwrap();
        for n in [n, lock_name_of(&long, "team-a", "npm")] {
            assert!(n.len() <= 253, "{n}");
            assert!(n
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'));
        }
    }

    const RULES: Rules = Rules {
        duration_secs: 15,
        waiter_ttl_secs: 150,
    };
    /// "Now" in the tables: Unix second 1000.
    const NOW: i64 = 1_000_000;

    fn pod(uid: &str) -> Claimant {
        Claimant {
            uid: uid.into(),
            pod: format!("ci/{uid}"),
            node: "n1".into(),
            volume: String::new(),
        }
    }

    fn waiter(uid: &str, since: i64, seen: i64) -> Waiter {
        Waiter {
            uid: uid.into(),
            pod: format!("ci/{uid}"),
            node: "n1".into(),
            since,
            seen,
            volume: String::new(),
        }
    }

    /// A Lease held by `holder` (renewed `ago_ms` before NOW), with `waiters` queued.
    fn held(holder: Option<&str>, ago_ms: i64, waiters: Vec<Waiter>) -> LeaseView {
        LeaseView {
            exists: true,
            holder: holder.map(String::from),
            renewed_ms: Some(NOW - ago_ms),
            duration_secs: Some(15),
            created_ms: Some(0),
            holder_text: holder.map(|h| format!("pod ci/{h} on node n1")),
            waiters,
        }
    }

    fn uids(w: &[Waiter]) -> Vec<&str> {
        w.iter().map(|w| w.uid.as_str()).collect()
    }

    #[test]
    fn expiry_counts_from_the_last_renewal_and_the_leases_own_duration() {
        // (renewed ms before now, the Lease's duration, expired)
        let table = [
            (Some(15_000), Some(15), false),
            (Some(15_001), Some(15), true),
            (Some(1_000), Some(0), true),
            (Some(20_000), Some(30), false),
            // no duration on the Lease: this process's own
            (Some(16_000), None, true),
            (Some(14_000), None, false),
            (None, Some(15), true),
        ];
        for (ago, secs, want) in table {
            let v = LeaseView {
                holder: Some("a".into()),
                renewed_ms: ago.map(|a| NOW - a),
                duration_secs: secs,
                ..Default::default()
            };
            assert_eq!(RULES.expired(&v, NOW), want, "{ago:?} {secs:?}");
        }
    }

    // One persistent volume on one node: kubelet calls its pods' mounts one at a time, in an
    // order of its own, so the pod it calls takes the place of the first in line when that is
    // one of them; anywhere else (another node, another volume, an entry without a volume)
    // the queue's order holds.
    #[test]
    fn the_pod_kubelet_calls_on_one_volume_and_node_takes_the_first_place() {
        let secs = NOW / 1000;
        let on = |uid, node: &str, volume: &str| Waiter {
            node: node.into(),
            volume: volume.into(),
            ..waiter(uid, secs - 1, secs - 1)
        };
        let me = Claimant {
            volume: "pv-1".into(),
            ..pod("me")
        };
        let free = held(
            None,
            0,
            vec![
                on("a", "n1", "pv-1"),
                on("r", "n2", "pv-1"),
                on("me", "n1", "pv-1"),
            ],
        );
        let d = RULES.acquire(&free, &me, NOW);
        assert_eq!(d.outcome, Acquire::Held { took_over: None });
        assert!(d.hold && d.write);
        // a keeps a place, the one me had: behind r, who came before me.
        assert_eq!(uids(&d.waiters), ["r", "a"]);
        // Still held by another: no jumping.
        let busy = held(Some("h"), 1_000, free.waiters.clone());
        let d = RULES.acquire(&busy, &me, NOW);
        assert!(
            matches!(d.outcome, Acquire::Waiting { place: 3, .. }),
            "{d:?}"
        );
        for (what, first) in [
            ("another volume on this node", on("a", "n1", "pv-2")),
            ("the same volume on another node", on("a", "n2", "pv-1")),
            ("an entry an older version wrote", on("a", "n1", "")),
        ] {
            let lease = held(None, 0, vec![first, on("me", "n1", "pv-1")]);
            let d = RULES.acquire(&lease, &me, NOW);
            assert!(
                matches!(d.outcome, Acquire::Waiting { place: 2, .. }),
                "{what}: {d:?}"
            );
            assert_eq!(uids(&d.waiters), ["a", "me"], "{what}");
        }
        // A Waiter without a volume reads as before (Leases of older versions).
        let old: Vec<Waiter> =
            serde_json::from_str(r#"[{"uid":"a","pod":"ci/a","node":"n1","since":1,"seen":2}]"#)
                .unwrap();
        assert_eq!(old[0].volume, "");
    }

    #[test]
    fn acquire_decisions() {
        struct Case {
            what: &'static str,
            lease: LeaseView,
            outcome: Acquire,
            queue: Vec<&'static str>,
            hold: bool,
            write: bool,
        }
        let secs = NOW / 1000;
        let fresh = |uid| waiter(uid, secs - 1, secs - 1);
        let cases = [
            Case {
                what: "a missing Lease is taken",
                lease: LeaseView::default(),
                outcome: Acquire::Held { took_over: None },
                queue: vec![],
                hold: true,
                write: true,
            },
            Case {
                what: "the holder asking again renews",
                lease: held(Some("me"), 5_000, vec![fresh("b")]),
                outcome: Acquire::Held { took_over: None },
                queue: vec!["b"],
                hold: true,
                write: true,
            },
            Case {
                what: "a live holder: queued first",
                lease: held(Some("a"), 1_000, vec![]),
                outcome: Acquire::Waiting {
                    holder: "pod ci/a on node n1".into(),
                    place: 1,
                },
                queue: vec!["me"],
                hold: false,
                write: true,
            },
            Case {
                what: "a live holder, asked again a second ago: nothing to write",
                lease: held(Some("a"), 1_000, vec![fresh("b"), fresh("me")]),
                outcome: Acquire::Waiting {
                    holder: "pod ci/a on node n1".into(),
                    place: 2,
                },
                queue: vec!["b", "me"],
                hold: false,
                write: false,
            },
            Case {
                what: "a live holder, asked again after the refresh time: seen is written",
                lease: held(Some("a"), 1_000, vec![waiter("me", secs - 60, secs - 5)]),
                outcome: Acquire::Waiting {
                    holder: "pod ci/a on node n1".into(),
                    place: 1,
                },
                queue: vec!["me"],
                hold: false,
                write: true,
            },
            Case {
                what: "a waiter that stopped asking drops out",
                lease: held(
                    Some("a"),
                    1_000,
                    vec![waiter("gone", secs - 500, secs - 151), fresh("me")],
                ),
                outcome: Acquire::Waiting {
                    holder: "pod ci/a on node n1".into(),
                    place: 1,
                },
                queue: vec!["me"],
                hold: false,
                write: true,
            },
            Case {
                what: "an expired holder is taken over by the first in line",
                lease: held(Some("a"), 16_000, vec![fresh("me"), fresh("b")]),
                outcome: Acquire::Held {
                    took_over: Some("pod ci/a on node n1".into()),
                },
                queue: vec!["b"],
                hold: true,
                write: true,
            },
            Case {
                what: "free, but another pod is first in line",
                lease: held(None, 1_000, vec![fresh("b")]),
                outcome: Acquire::Waiting {
                    holder: "nobody; pod ci/b (node n1) is first in line".into(),
                    place: 2,
                },
                queue: vec!["b", "me"],
                hold: false,
                write: true,
            },
            Case {
                what: "released and first in line: taken, nobody taken over",
                lease: held(None, 1_000, vec![fresh("me"), fresh("b")]),
                outcome: Acquire::Held { took_over: None },
                queue: vec!["b"],
                hold: true,
                write: true,
            },
        ];
        for c in cases {
            let d = RULES.acquire(&c.lease, &pod("me"), NOW);
            assert_eq!(d.outcome, c.outcome, "{}", c.what);
            assert_eq!(uids(&d.waiters), c.queue, "{}", c.what);
            assert_eq!(d.hold, c.hold, "{}", c.what);
            assert_eq!(d.write, c.write, "{}", c.what);
            assert_eq!(
                d.holder_text.is_some(),
                c.hold && c.lease.holder.as_deref() != Some("me"),
                "{}",
                c.what
            );
        }
    }

    #[test]
    fn a_new_waiter_is_stamped_now_and_a_quiet_first_in_line_is_checked() {
        let secs = NOW / 1000;
        let d = RULES.acquire(&held(Some("a"), 0, vec![]), &pod("me"), NOW);
        assert_eq!(d.waiters, [waiter("me", secs, secs)]);
        // Free, first in line quiet for 11 s: its pod is looked up; 10 s: not yet.
        for (quiet, checked) in [(11, true), (10, false)] {
            let first = waiter("b", secs - 20, secs - quiet);
            let d = RULES.acquire(&held(None, 0, vec![first.clone()]), &pod("me"), NOW);
            assert_eq!(d.stale_first.is_some(), checked, "{quiet}");
            assert!(!d.hold);
        }
        // Not while the holder is live.
        let first = waiter("b", secs - 20, secs - 11);
        let d = RULES.acquire(&held(Some("a"), 0, vec![first]), &pod("me"), NOW);
        assert_eq!(d.stale_first, None);
    }

    #[test]
    fn renew_only_while_held_else_fenced() {
        let table = [
            (held(Some("me"), 0, vec![]), true),
            // expired but nobody took it yet: still ours
            (held(Some("me"), 60_000, vec![]), true),
            (held(Some("b"), 0, vec![]), false),
            (held(None, 0, vec![]), false),
            // gone (released and deleted): a blank copy
            (LeaseView::default(), false),
            (
                LeaseView {
                    exists: false,
                    ..held(Some("me"), 0, vec![])
                },
                false,
            ),
        ];
        for (i, (v, want)) in table.into_iter().enumerate() {
            assert_eq!(RULES.renew(&v, "me"), want, "row {i}");
        }
    }

    #[test]
    fn release_deletes_when_nobody_waits_and_frees_otherwise() {
        let secs = NOW / 1000;
        let table = [
            (held(Some("me"), 0, vec![]), Release::Delete),
            (
                held(Some("me"), 0, vec![waiter("b", secs, secs - 150)]),
                Release::Free,
            ),
            (
                held(Some("me"), 0, vec![waiter("b", secs - 900, secs - 151)]),
                Release::Delete,
            ),
            (held(Some("b"), 0, vec![]), Release::NotHeld),
            (held(None, 0, vec![]), Release::NotHeld),
            (LeaseView::default(), Release::NotHeld),
        ];
        for (i, (v, want)) in table.into_iter().enumerate() {
            assert_eq!(RULES.release(&v, "me", NOW), want, "row {i}");
        }
    }

    #[test]
    fn leading_needs_the_lease_free_expired_or_ours() {
        let table = [
            (LeaseView::default(), true),
            (held(Some("me"), 0, vec![]), true),
            (held(None, 0, vec![]), true),
            (held(Some("other"), 15_000, vec![]), false),
            (held(Some("other"), 15_001, vec![]), true),
        ];
        for (i, (v, want)) in table.into_iter().enumerate() {
            assert_eq!(RULES.lead(&v, "me", NOW), want, "row {i}");
        }
    }

    #[test]
    fn abandoned_leases_are_free_quiet_and_unwanted() {
        let secs = NOW / 1000;
        let idle = 600_000;
        let table = [
            ("released long ago", held(None, idle, vec![]), true),
            ("released recently", held(None, idle - 1, vec![]), false),
            ("a dead holder, quiet", held(Some("a"), idle, vec![]), true),
            ("a live holder", held(Some("a"), 1_000, vec![]), false),
            (
                "a pod still asks",
                held(None, idle, vec![waiter("b", secs - 900, secs - 5)]),
                false,
            ),
            (
                "never renewed: counts from creation",
                LeaseView {
                    renewed_ms: None,
                    created_ms: Some(NOW - idle),
                    ..held(None, 0, vec![])
                },
                true,
            ),
            (
                "never renewed, created recently",
                LeaseView {
                    renewed_ms: None,
                    created_ms: Some(NOW - 1),
                    ..held(None, 0, vec![])
                },
                false,
            ),
        ];
        for (what, v, want) in table {
            assert_eq!(RULES.abandoned(&v, NOW, idle), want, "{what}");
        }
    }
}

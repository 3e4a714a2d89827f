//! The node agent: inside `cachevol node`, it watches the pods of its own node and decides each
//! cachevol view's commit from how its pods ended — by phase, not by guesswork — holds the
//! Leases of locked caches while their pods run, and reports everything as Events on the pods.
//!
//! It is level-triggered: how each pod ended is written into the view's record as soon as it is
//! seen, and every decision is taken again from the records and a fresh list of the node's pods
//! after a restart. A pod that vanished while the agent was down is handled from those records.
//!
//! Without a cluster there is no agent: unpublishing a view means its pod is done and it is
//! committed as a success ([`Volumes::decide`](crate::node::Volumes::decide)).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};

use super::events::{reason, Type};
use super::lease::{Acquire, Claimant, Leases};
use crate::node::report::Waiting;
use crate::node::{self, ViewState, Volumes};
use crate::spec::{self, user, DriverName, Ending, Mode, PodRef, VolumeSpec};

/// How often a waiting publish asks for its lock even when the Lease does not change.
const WAITER_HEARTBEAT: Duration = Duration::from_secs(5);

/// What a publish waiting for a lock watches.
struct Wait<'a> {
    changes: std::pin::Pin<Box<dyn futures::Stream<Item = ()> + Send>>,
    ended: tokio::sync::watch::Receiver<bool>,
    _gauge: Waiting<'a>,
}

/// Renews a lock's Lease while a NodePublishVolume holds it; stops when dropped.
pub struct Renewing(tokio::task::JoinHandle<()>);

impl Drop for Renewing {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct Agent {
    volumes: Arc<Volumes>,
    client: kube::Client,
    node: String,
    leases: Leases,
    renew_every: Duration,
    /// When each waiting pod (by uid) first found its locked cache held.
    waiting: Mutex<HashMap<String, Instant>>,
    /// How long a NodePublishVolume waits for a held lock before answering UNAVAILABLE.
    lock_wait: Duration,
    /// When each waiting pod was last told so with a CacheLockWaiting Event.
    told: Mutex<HashMap<String, Instant>>,
    /// Set when a pod with a publish waiting for a lock ends (deleted): the wait stops.
    ended_pods: Mutex<HashMap<String, tokio::sync::watch::Sender<bool>>>,
    /// One decision at a time per view.
    finishing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// How a pod ended, from its status; None while it runs. `deleted`: the pod object is gone.
///
/// `Succeeded` is a success only when the pod's own status backs it: every container that
/// reported a state exited 0, none was OOM-killed, no DisruptionTarget condition, and the
/// containers finished before anyone asked to delete the pod — a pod deleted while it ran whose
/// containers trapped SIGTERM and exited 0 (GitLab, Jenkins) ends Succeeded but was cut short.
/// Native sidecars (init containers that restart always) are stopped by the kubelet when the
/// pod completes and do not count.
pub fn ending_of(pod: &Pod, deleted: bool) -> Option<Ending> {
    use k8s_openapi::api::core::v1::ContainerStatus;
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
    // Evicted, past its deadline, preempted, node shutdown: the kubelet or a controller ended
    // it and says so in status.reason or a DisruptionTarget condition.
    let disrupted = status.is_some_and(|s| {
        s.reason.as_deref().is_some_and(|r| !r.is_empty())
            || s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "DisruptionTarget" && c.status == "True")
    });
    let terminated = |c: &ContainerStatus| c.state.as_ref().and_then(|st| st.terminated.clone());
    let sidecars: HashSet<&str> = pod
        .spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .map(|c| c.name.as_str())
        .collect();
    let containers = || {
        status
            .into_iter()
            .flat_map(|s| s.container_statuses.iter().flatten())
    };
    let init_containers = || {
        status
            .into_iter()
            .flat_map(|s| s.init_container_statuses.iter().flatten())
            .filter(|c| !sidecars.contains(c.name.as_str()))
    };
    let oom = containers()
        .chain(init_containers())
        .any(|c| terminated(c).and_then(|t| t.reason).as_deref() == Some("OOMKilled"));
    match phase {
        "Succeeded" if disrupted || oom => Some(Ending::Aborted),
        "Succeeded" => {
            let all_zero = containers().all(|c| terminated(c).is_none_or(|t| t.exit_code == 0));
            if !all_zero {
                return Some(Ending::Failed);
            }
            match deletion_requested(pod) {
                None => Some(Ending::Succeeded),
                Some(asked) => {
                    let finished = containers()
                        .map(|c| terminated(c).and_then(|t| t.finished_at).map(|t| t.0))
                        .collect::<Option<Vec<_>>>()
                        .and_then(|ts| ts.into_iter().max());
                    Some(match finished {
                        Some(f) if f <= asked => Ending::Succeeded,
                        _ => Ending::Aborted, // deleted first, or no proof it finished before
                    })
                }
            }
        }
        "Failed" if disrupted || oom => Some(Ending::Aborted),
        "Failed" => Some(Ending::Failed),
        // Deleted (or being deleted) before it finished.
        _ if deleted || pod.metadata.deletion_timestamp.is_some() => Some(Ending::Aborted),
        _ => None,
    }
}

/// When the pod's deletion was asked for: its deletionTimestamp is that moment plus the grace
/// period the pod was given.
fn deletion_requested(pod: &Pod) -> Option<k8s_openapi::jiff::Timestamp> {
    let at = pod.metadata.deletion_timestamp.as_ref()?.0;
    let grace = pod
        .metadata
        .deletion_grace_period_seconds
        .unwrap_or(0)
        .max(0);
    Some(
        at.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(grace))
            .unwrap_or(at),
    )
}

fn claimant(pod: &PodRef, node: &str, volume: &str) -> Claimant {
    Claimant {
        uid: pod.uid.clone(),
        pod: format!("{}/{}", pod.namespace, pod.name),
        node: node.to_string(),
        volume: volume.to_string(),
    }
}

impl Agent {
    pub fn new(
        volumes: Arc<Volumes>,
        client: kube::Client,
        namespace: &str,
        lease_duration: Duration,
        lock_wait: Duration,
        driver: &DriverName,
    ) -> Arc<Agent> {
        let node = volumes.config().node_id.clone();
        Arc::new(Agent {
            leases: Leases::new(client.clone(), namespace, lease_duration).for_driver(driver),
            client,
            node,
            volumes,
            renew_every: (lease_duration / 3).max(Duration::from_millis(200)),
            waiting: Mutex::default(),
            lock_wait,
            told: Mutex::default(),
            ended_pods: Mutex::default(),
            finishing: Mutex::default(),
        })
    }

    /// A receiver that turns true when pod `uid` ends (as the pod watcher sees it).
    fn pod_end(&self, uid: &str) -> tokio::sync::watch::Receiver<bool> {
        self.ended_pods
            .lock()
            .expect("not poisoned")
            .entry(uid.to_string())
            .or_insert_with(|| tokio::sync::watch::channel(false).0)
            .subscribe()
    }

    fn forget_pod_end(&self, uid: &str) {
        let mut m = self.ended_pods.lock().expect("not poisoned");
        if m.get(uid).is_some_and(|s| s.receiver_count() == 0) {
            m.remove(uid);
        }
    }

    /// Whether to post CacheLockWaiting for the pod now: at most once a minute per pod.
    fn tell_waiting(&self, uid: &str) -> bool {
        let mut told = self.told.lock().expect("not poisoned");
        told.retain(|_, at| at.elapsed() < Duration::from_secs(60));
        if told.contains_key(uid) {
            return false;
        }
        told.insert(uid.to_string(), Instant::now());
        true
    }

    /// Before publishing a locked cache: takes its Lease for the pod. When another pod holds it,
    /// the call stays open and waits for its turn — watching the Lease, keeping the pod's place
    /// in the queue — for up to `lock_wait`, then refuses with a retryable error naming the
    /// holder (kubelet calls again, and the pod keeps its place). The wait ends early, leaving
    /// the queue, when the pod ends; a cancelled call just stops (a retry keeps the place).
    ///
    /// `volume` and `target` are the call's. When this node already publishes the same volume
    /// to another target (its holder, most likely), the call does not wait: kubelet runs one
    /// mount or unmount at a time per persistent volume on a node, so a call held open would
    /// keep kubelet from unpublishing the holder — whose unpublish commits and frees the lock:
    /// a deadlock only the bound would break. Such a call joins the queue and answers at once; the
    /// holder's unmount, a different operation, resets kubelet's backoff for the volume, so
    /// kubelet calls again right after it (and that call, the volume no longer busy here,
    /// waits in the call for the commit). Calls kubelet does not serialize with the holder's
    /// (other claims, inline volumes, other nodes) wait in the call.
    ///
    /// The returned guard renews the Lease until it is dropped: a cold restore may take longer
    /// than the Lease lasts, and the view has no record (which the periodic renewal reads)
    /// until it is mounted. Drop it once the publish has finished either way.
    pub async fn lock(
        &self,
        spec: &VolumeSpec,
        pod: Option<&PodRef>,
        volume: &str,
        target: &std::path::Path,
    ) -> node::Result<Option<Renewing>> {
        if spec.mode != Mode::Locked {
            return Ok(None);
        }
        let pod = pod.ok_or_else(|| {
            spec::Error::parameter(
                user::POD_UID,
                "a locked cache needs the pod's identity: the CSIDriver must have \
                 podInfoOnMount: true",
            )
        })?;
        let me = claimant(pod, &self.node, volume);
        let busy_here = self.volumes.published_elsewhere(volume, target);
        let bound = if busy_here {
            Duration::ZERO
        } else {
            self.lock_wait
        };
        let deadline = tokio::time::Instant::now() + bound;
        // The pod's end is watched from before the first try: a pod deleted right after it
        // joined the queue (before the wait below is set up) still stops the wait at once.
        let mut ended_rx = Some(self.pod_end(&pod.uid));
        // Set up once the lock is found held: the Lease's changes, the pod's end, the gauge.
        let mut wait: Option<Wait> = None;
        let result = loop {
            // kube's client retries a struggling API server with long backoffs: bound each try
            // so kubelet gets an answer (and retries) rather than a hung mount.
            let acquired = tokio::time::timeout(
                Duration::from_secs(15),
                self.leases.acquire(&spec.scope, &spec.key, &me),
            )
            .await
            .unwrap_or_else(|_| {
                Err(kube::Error::Service(
                    "no answer from the Kubernetes API within 15s".into(),
                ))
            });
            let (holder, place) = match acquired {
                Ok(Acquire::Held { took_over }) => break Ok(self.held(spec, pod, &me, took_over)),
                Ok(Acquire::Waiting { holder, place }) => (holder, place),
                Err(e) => {
                    break Err(node::Error::Unavailable(format!(
                        "cannot take the lock of cache {}: the Kubernetes API failed: {e}",
                        spec.key
                    )))
                }
            };
            let mut msg = format!(
                "cache {} is locked: held by {holder}; this pod is number {place} in line \
                 and starts when the holder's commit is in the store",
                spec.key
            );
            if busy_here {
                msg += " (kubelet mounts this volume for one pod at a time on a node and \
                        calls again once the holder's is unmounted)";
            }
            if wait.is_none() {
                self.waiting
                    .lock()
                    .expect("not poisoned")
                    .entry(pod.uid.clone())
                    .or_insert_with(Instant::now);
                self.volumes.report().lock_waiting();
                if self.tell_waiting(&pod.uid) {
                    self.volumes
                        .report()
                        .event(pod, Type::Normal, reason::LOCK_WAITING, msg.clone())
                        .await;
                }
                wait = Some(Wait {
                    changes: Box::pin(self.leases.changes(&spec.scope, &spec.key)),
                    ended: ended_rx.take().expect("taken once"),
                    _gauge: Waiting::start(self.volumes.report()),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                break Err(node::Error::Unavailable(msg));
            }
            let w = wait.as_mut().expect("set above");
            let ended = tokio::select! {
                _ = w.changes.next() => false,
                // Ask again now and then anyway: it keeps the pod's entry in the queue fresh.
                _ = tokio::time::sleep(WAITER_HEARTBEAT) => false,
                // One last try at the deadline, then UNAVAILABLE.
                _ = tokio::time::sleep_until(deadline) => false,
                r = w.ended.wait_for(|ended| *ended) => r.is_ok(),
            };
            if ended {
                tracing::info!(
                    cache.key = spec.key,
                    pod = me.pod,
                    "the pod ended while waiting for a lock"
                );
                if let Err(e) = self.leases.leave(&spec.scope, &spec.key, &pod.uid).await {
                    tracing::warn!(cache.key = spec.key, error = %e, "could not leave a lock's queue; the entry expires by itself");
                }
                self.waiting.lock().expect("not poisoned").remove(&pod.uid);
                break Err(node::Error::Unavailable(format!(
                    "pod {} ended while waiting for the lock of cache {}",
                    me.pod, spec.key
                )));
            }
        };
        drop(wait);
        drop(ended_rx);
        self.forget_pod_end(&pod.uid);
        result
    }

    /// The lock is the pod's: records how long it waited, renews it while publishing.
    fn held(
        &self,
        spec: &VolumeSpec,
        pod: &PodRef,
        me: &Claimant,
        took_over: Option<String>,
    ) -> Option<Renewing> {
        let since = self.waiting.lock().expect("not poisoned").remove(&pod.uid);
        self.volumes
            .report()
            .lock_acquired(since.map_or(0.0, |t| t.elapsed().as_secs_f64()));
        if let Some(old) = took_over {
            tracing::info!(
                cache.key = spec.key,
                pod = me.pod,
                previous = old,
                "took over an expired lock"
            );
        }
        let (leases, every) = (self.leases.clone(), self.renew_every);
        let (scope, key, uid) = (spec.scope.clone(), spec.key.clone(), pod.uid.clone());
        Some(Renewing(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = leases.renew(&scope, &key, &uid).await {
                    tracing::warn!(cache.key = key, error = %e, "cannot renew the lock while publishing");
                }
            }
        })))
    }

    /// After a publish failed: gives the lock back unless the pod has a view of that cache.
    pub async fn unlock_unused(&self, spec: &VolumeSpec, pod: Option<&PodRef>) {
        let (Mode::Locked, Some(pod)) = (spec.mode, pod) else {
            return;
        };
        let has_view = self
            .volumes
            .views_of_pod(&pod.uid)
            .iter()
            .any(|v| v.spec.scope == spec.scope && v.spec.key == spec.key);
        if !has_view {
            if let Err(e) = self.leases.release(&spec.scope, &spec.key, &pod.uid).await {
                tracing::warn!(cache.key = spec.key, error = %e, "could not release a lock; it expires by itself");
            }
        }
    }

    /// Runs the pod watcher and the periodic work (lease renewal, pending views) forever.
    /// Returns only if the watch or the periodic work stops; a panic in either is the caller's
    /// (the daemon supervises this task and exits).
    pub async fn run(self: Arc<Self>) {
        let ticker = self.clone();
        let mut ticks = tokio::spawn(async move { ticker.tick_forever().await });
        tokio::select! {
            ended = &mut ticks => {
                if let Err(e) = ended {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
            }
            () = self.watch_pods() => ticks.abort(),
        }
    }

    async fn watch_pods(self: &Arc<Self>) {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let mut stream = watcher(pods, config).default_backoff().boxed();
        let mut listed: HashSet<String> = HashSet::new();
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => listed.clear(),
                Ok(watcher::Event::InitApply(p)) => {
                    if let Some(uid) = &p.metadata.uid {
                        listed.insert(uid.clone());
                    }
                    self.on_pod(&p, false).await;
                }
                Ok(watcher::Event::InitDone) => self.vanished(&listed).await,
                Ok(watcher::Event::Apply(p)) => self.on_pod(&p, false).await,
                Ok(watcher::Event::Delete(p)) => self.on_pod(&p, true).await,
                Err(e) => tracing::warn!(error = %e, "watching this node's pods failed; retrying"),
            }
        }
    }

    async fn on_pod(self: &Arc<Self>, pod: &Pod, deleted: bool) {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return;
        };
        let Some(ending) = ending_of(pod, deleted) else {
            return;
        };
        if let Some(tx) = self.ended_pods.lock().expect("not poisoned").get(uid) {
            tx.send_replace(true);
        }
        self.ended(uid, ending).await;
    }

    async fn ended(self: &Arc<Self>, uid: &str, ending: Ending) {
        match self.volumes.record_ending(uid, ending).await {
            Ok(views) => {
                for v in views {
                    tracing::info!(view = v.id, pod = uid, ?ending, "pod ended");
                    self.spawn_finish(v.id);
                }
            }
            Err(e) => tracing::warn!(pod = uid, error = %e, "could not record how a pod ended"),
        }
    }

    /// After a (re-)list: pods that views remember but the node no longer has ended while the
    /// agent was not watching. Their ending is unknown, so they never commit.
    async fn vanished(self: &Arc<Self>, listed: &HashSet<String>) {
        for v in self.volumes.views() {
            for p in &v.pods {
                if listed.contains(&p.uid) || v.endings.contains_key(&p.uid) {
                    continue;
                }
                // Published after the list was taken? Ask for the pod itself before deciding.
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), &p.namespace);
                match pods.get_opt(&p.name).await {
                    Ok(Some(pod)) if pod.metadata.uid.as_deref() == Some(p.uid.as_str()) => {
                        self.on_pod(&pod, false).await;
                    }
                    Ok(_) => {
                        tracing::info!(
                            view = v.id,
                            pod = p.name,
                            "pod vanished while the agent was away"
                        );
                        self.ended(&p.uid, Ending::Aborted).await;
                    }
                    Err(e) => {
                        tracing::warn!(pod = p.name, error = %e, "cannot tell whether a pod still exists")
                    }
                }
            }
        }
    }

    /// A view's targets are all unpublished: decide it when its pods' endings are known.
    pub fn spawn_finish(self: &Arc<Self>, id: String) {
        let me = self.clone();
        tokio::spawn(async move { me.finish(&id).await });
    }

    async fn finish(&self, id: &str) {
        let lock = self
            .finishing
            .lock()
            .expect("not poisoned")
            .entry(id.to_string())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let Some(record) = self.volumes.load(id) else {
            return;
        };
        if record.state != ViewState::Pending {
            tracing::debug!(view = id, "not deciding yet: the view is still published");
            return;
        }
        let ending = if record.pods.is_empty() {
            // No pod info (podInfoOnMount off): as without a cluster.
            Ending::Succeeded
        } else if record
            .pods
            .iter()
            .all(|p| record.endings.contains_key(&p.uid))
        {
            record
                .endings
                .values()
                .copied()
                .max()
                .unwrap_or(Ending::Succeeded)
        } else {
            tracing::debug!(view = id, "not deciding yet: a pod of the view still runs");
            return; // a pod still runs, or its ending has not been seen yet
        };
        let spec = &record.spec;
        // A lost lock matters only to a commit: the Lease is asked only when the verdict
        // with the lock held is to commit; the node decides (and reports) with the answer.
        let marked = self.volumes.marked(&record);
        let mut lock = node::Lock::Held;
        if spec.mode == Mode::Locked
            && node::verdict(spec, ending, marked, &node::Lock::Held).is_none()
        {
            for p in &record.pods {
                match self.leases.renew(&spec.scope, &spec.key, &p.uid).await {
                    Ok(true) => {}
                    Ok(false) => {
                        let holder = self
                            .leases
                            .holder(&spec.scope, &spec.key)
                            .await
                            .ok()
                            .flatten()
                            .unwrap_or_else(|| "nobody".into());
                        lock = node::Lock::Lost {
                            pod: format!("{}/{}", p.namespace, p.name),
                            holder,
                        };
                        break;
                    }
                    Err(e) => {
                        // Decided on a later tick, when the API answers again.
                        tracing::warn!(view = id, error = %e, "cannot check the lock before committing");
                        return;
                    }
                }
            }
        }
        let result = self.volumes.decide_with_lock(id, ending, &lock).await;
        let retry_later =
            matches!(&result, Err(node::Error::Engine(e)) if e.is_store_unavailable());
        // A lost lock is another pod's now: nothing to release.
        if spec.mode == Mode::Locked && !retry_later && lock == node::Lock::Held {
            for p in &record.pods {
                if let Err(e) = self.leases.release(&spec.scope, &spec.key, &p.uid).await {
                    tracing::warn!(view = id, error = %e, "could not release a lock; it expires by itself");
                }
            }
        }
    }

    /// Renews the Leases of locked views (mounted, or unmounted and not yet committed: the lock
    /// is released only once the commit is in) and retries pending views, every third of the
    /// lease's duration.
    async fn tick_forever(self: Arc<Self>) {
        let mut every = tokio::time::interval(self.renew_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            for v in self.volumes.views() {
                if v.state == ViewState::Pending {
                    self.spawn_finish(v.id.clone());
                }
                let spec = &v.spec;
                if spec.mode != Mode::Locked {
                    continue;
                }
                for p in &v.pods {
                    match self.leases.renew(&spec.scope, &spec.key, &p.uid).await {
                        Ok(true) => {}
                        Ok(false) if v.state == ViewState::Pending => {} // committed meanwhile
                        Ok(false) => tracing::warn!(
                            view = v.id,
                            pod = p.name,
                            "lost the lock of a cache in use: its commit will be refused"
                        ),
                        Err(e) => tracing::warn!(view = v.id, error = %e, "could not renew a lock"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value, meta: serde_json::Value, status: serde_json::Value) -> Pod {
        let mut metadata = json!({"name": "p", "namespace": "ci", "uid": "u"});
        metadata
            .as_object_mut()
            .unwrap()
            .extend(meta.as_object().unwrap().clone());
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": spec, "status": status,
        }))
        .unwrap()
    }

    fn terminated(name: &str, code: i32, reason: &str, finished: &str) -> serde_json::Value {
        json!({"name": name, "image": "i", "imageID": "", "ready": false, "restartCount": 0,
               "state": {"terminated": {"exitCode": code, "reason": reason, "finishedAt": finished}}})
    }

    fn containers(names: &[&str]) -> serde_json::Value {
        json!({"containers": names.iter().map(|n| json!({"name": n, "image": "i"})).collect::<Vec<_>>()})
    }

    /// Pods shaped as each CI system leaves them, and how they ended.
    #[test]
    fn how_each_ci_systems_pods_end() {
        let t0 = "2026-11-30T10:00:00Z";
        let t1 = "2026-11-30T10:05:00Z";
        let deleted_at = |ts: &str, grace: i64| json!({"deletionTimestamp": ts, "deletionGracePeriodSeconds": grace});
        let cases: Vec<(&str, Pod, bool, Option<Ending>)> = vec![
            (
                "Kubernetes Job / Argo / Buildkite: every container exited 0",
                pod(
                    containers(&["main", "wait"]),
                    json!({}),
                    json!({"phase": "Succeeded",
                    "containerStatuses": [terminated("main", 0, "Completed", t0), terminated("wait", 0, "Completed", t0)]}),
                ),
                false,
                Some(Ending::Succeeded),
            ),
            (
                "a running pod has not ended",
                pod(
                    containers(&["main"]),
                    json!({}),
                    json!({"phase": "Running"}),
                ),
                false,
                None,
            ),
            (
                "Tekton: a failed step fails the TaskRun's pod",
                pod(
                    containers(&["step-build", "step-test"]),
                    json!({}),
                    json!({"phase": "Failed",
                    "containerStatuses": [terminated("step-build", 0, "Completed", t0), terminated("step-test", 1, "Error", t0)]}),
                ),
                false,
                Some(Ending::Failed),
            ),
            (
                "Succeeded but a container says otherwise (not a success)",
                pod(
                    containers(&["main", "helper"]),
                    json!({}),
                    json!({"phase": "Succeeded",
                    "containerStatuses": [terminated("main", 0, "Completed", t0), terminated("helper", 2, "Error", t0)]}),
                ),
                false,
                Some(Ending::Failed),
            ),
            (
                "actions-runner-controller: the runner exits 0 whatever the job did",
                pod(
                    containers(&["runner"]),
                    json!({}),
                    json!({"phase": "Succeeded",
                    "containerStatuses": [terminated("runner", 0, "Completed", t0)]}),
                ),
                false,
                Some(Ending::Succeeded),
            ),
            (
                "GitLab: deleted while running, killed (137)",
                pod(
                    containers(&["build", "helper"]),
                    deleted_at(t1, 30),
                    json!({"phase": "Failed",
                    "containerStatuses": [terminated("build", 137, "Error", t1), terminated("helper", 137, "Error", t1)]}),
                ),
                false,
                Some(Ending::Failed),
            ),
            (
                "GitLab / Jenkins: deleted while running, the shell trapped TERM and exited 0",
                pod(
                    containers(&["build"]),
                    deleted_at("2026-11-30T10:05:30Z", 30),
                    json!({"phase": "Succeeded",
                    "containerStatuses": [terminated("build", 0, "Completed", "2026-11-30T10:05:01Z")]}),
                ),
                false,
                Some(Ending::Aborted),
            ),
            (
                "a Job pod deleted long after it completed (TTL controller) succeeded",
                pod(
                    containers(&["main"]),
                    deleted_at("2026-11-30T11:00:30Z", 30),
                    json!({"phase": "Succeeded",
                    "containerStatuses": [terminated("main", 0, "Completed", t0)]}),
                ),
                false,
                Some(Ending::Succeeded),
            ),
            (
                "deleted, Succeeded, and no container says when it finished",
                pod(
                    containers(&["main"]),
                    deleted_at(t1, 0),
                    json!({"phase": "Succeeded"}),
                ),
                false,
                Some(Ending::Aborted),
            ),
            (
                "the pod object is gone while it ran",
                pod(
                    containers(&["main"]),
                    json!({}),
                    json!({"phase": "Running"}),
                ),
                true,
                Some(Ending::Aborted),
            ),
            (
                "being deleted while running",
                pod(
                    containers(&["main"]),
                    deleted_at(t1, 30),
                    json!({"phase": "Running"}),
                ),
                false,
                Some(Ending::Aborted),
            ),
            (
                "Job activeDeadlineSeconds: the kubelet fails it with DeadlineExceeded",
                pod(
                    containers(&["main"]),
                    json!({}),
                    json!({"phase": "Failed", "reason": "DeadlineExceeded",
                    "containerStatuses": [terminated("main", 137, "Error", t1)]}),
                ),
                false,
                Some(Ending::Aborted),
            ),
            (
                "evicted (node pressure)",
                pod(
                    containers(&["main"]),
                    json!({}),
                    json!({"phase": "Failed", "reason": "Evicted"}),
                ),
                false,
                Some(Ending::Aborted),
            ),
            (
                "preempted or drained: DisruptionTarget, even if it then exited 0",
                pod(
                    containers(&["main"]),
                    json!({}),
                    json!({"phase": "Succeeded",
                    "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
                    "containerStatuses": [terminated("main", 0, "Completed", t0)]}),
                ),
                false,
                Some(Ending::Aborted),
            ),
            (
                "OOM-killed container in a Failed pod",
                pod(
                    containers(&["main"]),
                    json!({}),
                    json!({"phase": "Failed",
                    "containerStatuses": [terminated("main", 137, "OOMKilled", t0)]}),
                ),
                false,
                Some(Ending::Aborted),
            ),
            (
                "OOM-killed sidecar in a Succeeded pod (restartPolicy OnFailure kept the phase)",
                pod(
                    containers(&["main", "proxy"]),
                    json!({}),
                    json!({"phase": "Succeeded",
                    "containerStatuses": [terminated("main", 0, "Completed", t0), terminated("proxy", 0, "OOMKilled", t0)]}),
                ),
                false,
                Some(Ending::Aborted),
            ),
            (
                "native sidecars stopped by the kubelet at completion do not count",
                pod(
                    json!({"initContainers": [{"name": "istio-proxy", "image": "i", "restartPolicy": "Always"}],
                           "containers": [{"name": "main", "image": "i"}]}),
                    json!({}),
                    json!({"phase": "Succeeded",
                        "initContainerStatuses": [terminated("istio-proxy", 143, "Error", t0)],
                        "containerStatuses": [terminated("main", 0, "Completed", t0)]}),
                ),
                false,
                Some(Ending::Succeeded),
            ),
        ];
        for (what, p, deleted, want) in cases {
            assert_eq!(ending_of(&p, deleted), want, "{what}");
        }
    }
}

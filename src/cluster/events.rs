//! Events on pods: what a cache did for a pod is visible in `kubectl describe pod`. Posting an
//! event never fails or delays the caller for long: it is best effort, logged when it fails.
//!
//! Why not kube-runtime's `events::Recorder` (kube 5), which we already depend on: its
//! aggregation keys a repeat by type, reason, action, reporter and object but not by message,
//! and a repeat patches the *first* event's series count while keeping that event's note. Our
//! messages change while the reason stays: "number 2 in line" becomes "number 1 in line", a
//! store that was unreachable names the next error. With that recorder the pod would show the
//! first message with a growing count, which is wrong where it matters most (a pod waiting on a
//! lock). What we need instead is small: the same reason *and* message for the same pod at most
//! once a minute, and a new message posted at once. Its events also go to `events.k8s.io/v1`
//! and need `patch` on them; ours are core/v1 creates only, which every cluster version and
//! the chart's RBAC allow and `kubectl describe` shows alike.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

use crate::node::report::{CommitOutcome, RestoreLevel, RestoreOutcome};
use crate::node::Report;
use crate::spec::{DriverName, PodRef};

pub use crate::node::report::{reason, EventType as Type};

/// Posts core/v1 Events about pods.
pub struct Recorder {
    client: kube::Client,
    component: &'static str,
    /// `<driver name>/<component>`: which install posted it, when two run in one cluster.
    reporting_component: String,
    host: String,
    /// The last message per (pod uid, reason) and when it was posted: kubelet retries a
    /// waiting mount many times, and the same message need not be repeated each time.
    recent: Mutex<HashMap<(String, &'static str), Sent>>,
}

/// A message and when it was posted.
type Sent = (String, Instant);

const REPEAT_AFTER: Duration = Duration::from_secs(60);

impl Recorder {
    pub fn new(client: kube::Client, component: &'static str, host: &str) -> Recorder {
        Recorder {
            client,
            component,
            reporting_component: DriverName::default().reporting_component(component),
            host: host.to_string(),
            recent: Mutex::default(),
        }
    }

    /// Reports as `driver`'s component instead of the default driver's.
    pub fn for_driver(mut self, driver: &DriverName) -> Recorder {
        self.reporting_component = driver.reporting_component(self.component);
        self
    }

    /// Posts an event about `pod`. The same reason and message for the same pod is posted at
    /// most once a minute.
    pub async fn pod(&self, pod: &PodRef, kind: Type, reason: &'static str, message: String) {
        {
            let mut recent = self.recent.lock().expect("not poisoned");
            let k = (pod.uid.clone(), reason);
            if let Some((m, at)) = recent.get(&k) {
                if *m == message && at.elapsed() < REPEAT_AFTER {
                    return;
                }
            }
            recent.retain(|_, (_, at)| at.elapsed() < REPEAT_AFTER);
            recent.insert(k, (message.clone(), Instant::now()));
        }
        let now = Timestamp::now();
        let mut message = message;
        if message.len() > 1000 {
            let mut cut = 1000;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    pod.name,
                    now.as_nanosecond() as u128 & 0xffff_ffff_ffff
                )),
                namespace: Some(pod.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                uid: Some(pod.uid.clone()),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message.clone()),
            type_: Some(
                match kind {
                    Type::Normal => "Normal",
                    Type::Warning => "Warning",
                }
                .into(),
            ),
            source: Some(EventSource {
                component: Some(self.component.into()),
                host: Some(self.host.clone()),
            }),
            reporting_component: Some(self.reporting_component.clone()),
            reporting_instance: Some(self.host.clone()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            action: Some(reason.trim_start_matches("Cache").into()),
            count: Some(1),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &pod.namespace);
        match tokio::time::timeout(
            Duration::from_secs(5),
            api.create(&PostParams::default(), &event),
        )
        .await
        {
            Ok(Ok(_)) => tracing::debug!(pod = pod.name, reason, "event posted"),
            Ok(Err(e)) => {
                tracing::warn!(pod = pod.name, reason, error = %e, "could not post an event")
            }
            Err(_) => tracing::warn!(pod = pod.name, reason, "posting an event timed out"),
        }
    }
}

/// What the node reports with a cluster: what `metrics` counts, and Events on the pods.
pub struct ClusterReport {
    pub metrics: Arc<dyn Report>,
    pub events: Recorder,
}

impl Report for ClusterReport {
    fn restore(&self, level: RestoreLevel, outcome: RestoreOutcome, bytes: u64, secs: f64) {
        self.metrics.restore(level, outcome, bytes, secs)
    }

    fn base_written(&self, form: crate::node::BaseForm, secs: f64) {
        self.metrics.base_written(form, secs)
    }

    fn base_evicted(&self, reason: crate::node::report::EvictionReason) {
        self.metrics.base_evicted(reason)
    }

    fn commit(&self, outcome: CommitOutcome, uploaded_bytes: u64, secs: f64) {
        self.metrics.commit(outcome, uploaded_bytes, secs)
    }

    fn lock_waiting(&self) {
        self.metrics.lock_waiting()
    }

    fn lock_waiters(&self, delta: i64) {
        self.metrics.lock_waiters(delta)
    }

    fn lock_acquired(&self, waited_secs: f64) {
        self.metrics.lock_acquired(waited_secs)
    }

    fn store_error(&self, op: &'static str) {
        self.metrics.store_error(op)
    }

    fn store_latency(&self, op: &'static str, secs: f64) {
        self.metrics.store_latency(op, secs)
    }

    fn unreadable_record(&self) {
        self.metrics.unreadable_record()
    }

    fn node_gauges(&self, gauges: &crate::node::NodeGauges) {
        self.metrics.node_gauges(gauges)
    }

    fn event<'a>(
        &'a self,
        pod: &'a PodRef,
        kind: Type,
        reason: &'static str,
        message: String,
    ) -> BoxFuture<'a, ()> {
        Box::pin(self.events.pod(pod, kind, reason, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::node::report::EvictionReason;
    use crate::node::BaseForm;

    // Report's methods do nothing by default, so a method ClusterReport does not pass on is a
    // metric that silently stays at 0 in every cluster: what it records must be what the
    // metrics record themselves.
    #[tokio::test]
    async fn the_cluster_reporter_passes_every_metric_on() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        // Never asked: no Event is posted here.
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let through = Metrics::new();
        let report = ClusterReport {
            metrics: Arc::new(through.clone()),
            events: Recorder::new(client, "cachevol-node", "n1"),
        };
        let direct = Metrics::new();
        let gauges = crate::node::NodeGauges {
            base_bytes: 7,
            base_budget: Some(9),
            active_views: 2,
            pending_views: 1,
            oldest_pending_secs: 3.0,
        };
        for r in [&report as &dyn Report, &direct as &dyn Report] {
            r.restore(RestoreLevel::RestoreKey, RestoreOutcome::Warm, 5, 0.5);
            r.base_written(BaseForm::Image, 0.2);
            r.base_evicted(EvictionReason::Budget);
            r.commit(CommitOutcome::Fenced, 11, 0.3);
            r.lock_waiting();
            r.lock_waiters(1);
            r.lock_acquired(1.5);
            r.store_error("put");
            r.store_latency("get", 0.01);
            r.unreadable_record();
            r.node_gauges(&gauges);
        }
        let cachevol = |m: &Metrics| -> Vec<String> {
            m.render()
                .lines()
                .filter(|l| l.starts_with("cachevol_"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(cachevol(&through), cachevol(&direct));
        assert!(
            cachevol(&direct)
                .contains(&"cachevol_node_base_evictions_total{reason=\"budget\"} 1".to_string()),
            "{:?}",
            cachevol(&direct)
        );
    }
}

//! Prometheus metrics of the process, and the small HTTP server that exposes them with health
//! checks: `GET /metrics` (text exposition format 0.0.4), `/healthz` and `/readyz`.
//!
//! One registry per [`Metrics`]: the daemon creates it at start-up and hands clones of it (they
//! share the registry) to what records into it — the CSI services, the garbage collector, the
//! node's reporter, the store's hooks — and to the HTTP server that renders it. There is no
//! process-wide registry, so tests each build their own and cannot disturb each other. Every
//! label value comes from a fixed set — the enums below, the CSI
//! RPC names, tonic's code names, a handful of store operations — never from a pod, key, scope or
//! volume name, so the number of series stays bounded whatever the cluster does. Label
//! combinations of the fixed enums are created up front, so they are exported (at 0) before the
//! first observation and dashboards and alerts see a series rather than nothing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use crate::node::report::{CommitOutcome, EvictionReason, RestoreLevel, RestoreOutcome};
pub use crate::node::BaseForm;

/// The store operations `op` of [`store_error`] may name; anything else is counted as `other`.
pub const STORE_OPS: [&str; 6] = ["get", "put", "list", "head", "delete", "copy"];

/// The RPC names of CSI v1 that `method` of [`grpc`] may name; anything else is `other`.
pub const CSI_METHODS: [&str; 25] = [
    // Identity
    "GetPluginInfo",
    "GetPluginCapabilities",
    "Probe",
    // Controller
    "CreateVolume",
    "DeleteVolume",
    "ControllerPublishVolume",
    "ControllerUnpublishVolume",
    "ValidateVolumeCapabilities",
    "ListVolumes",
    "GetCapacity",
    "ControllerGetCapabilities",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ListSnapshots",
    "ControllerExpandVolume",
    "ControllerGetVolume",
    "ControllerModifyVolume",
    // Node
    "NodeStageVolume",
    "NodeUnstageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
    "NodeExpandVolume",
    "NodeGetCapabilities",
    "NodeGetInfo",
];

/// Durations of restores, commits and RPCs: 1 ms to 10 min.
const DURATION_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Store requests: a HEAD on a local disk to a pack upload at the 60 s timeout.
const STORE_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0,
];

/// Lock waits: most are 0 (no wait), the rest last as long as another pod's job, up to hours.
const LOCK_WAIT_BUCKETS: [f64; 14] = [
    0.001, 0.01, 0.1, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];

/// The process's metrics: a registry and the handles of its metrics. Cloning is cheap and the
/// clones record into the same registry (prometheus' metrics are shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    restores: IntCounterVec,
    restore_bytes: IntCounter,
    restore_duration: Histogram,
    base_writes: IntCounterVec,
    base_write_duration: HistogramVec,
    base_evictions: IntCounterVec,
    commits: IntCounterVec,
    commit_uploaded_bytes: IntCounter,
    commit_duration: Histogram,
    lock_waits: IntCounter,
    lock_wait_duration: Histogram,
    lock_waiting_pods: IntGauge,
    store_errors: IntCounterVec,
    unreadable_records: IntCounter,
    grpc_requests: IntCounterVec,
    grpc_duration: HistogramVec,
    gc_runs: IntCounterVec,
    gc_deleted_bytes: IntCounter,
    gc_last_success: Gauge,
    store_duration: HistogramVec,
    store_up: IntGauge,
    leader: IntGauge,
    base_bytes: IntGauge,
    base_budget_bytes: IntGauge,
    views: IntGaugeVec,
    oldest_pending_commit: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered, the fixed label sets at 0, the build info
    /// and the process collector.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn reg<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: M) -> M {
            r.register(Box::new(m.clone()))
                .expect("metric names are unique and valid");
            m
        }
        let counter = |name: &str, help: &str| {
            reg(
                &registry,
                IntCounter::new(name, help).expect("valid counter"),
            )
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(&registry, IntGauge::new(name, help).expect("valid gauge"))
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            reg(
                &registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                    .expect("valid histogram"),
            )
        };

        let m = Metrics {
            restores: counter_vec(
                "cachevol_restores_total",
                "Restores by the snapshot they started from (key, restore-key, miss) and outcome.",
                &["level", "outcome"],
            ),
            restore_bytes: counter(
                "cachevol_restore_bytes_total",
                "Bytes of cache content restored.",
            ),
            restore_duration: histogram(
                "cachevol_restore_duration_seconds",
                "How long restores took.",
                &DURATION_BUCKETS,
            ),
            base_writes: counter_vec(
                "cachevol_node_base_writes_total",
                "Bases a node wrote for a publish (cold restores), by form: image (one EROFS image mounted read-only) or tree (files).",
                &["form"],
            ),
            base_write_duration: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "cachevol_node_base_write_duration_seconds",
                        "How long publishes that wrote a base took, by form.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["form"],
                )
                .expect("valid histogram"),
            ),
            base_evictions: counter_vec(
                "cachevol_node_base_evictions_total",
                "Bases a node evicted, by reason: budget (its bases were over --base-budget; the least recently used one no view read went).",
                &["reason"],
            ),
            commits: counter_vec(
                "cachevol_commits_total",
                "Commits by outcome.",
                &["outcome"],
            ),
            commit_uploaded_bytes: counter(
                "cachevol_commit_uploaded_bytes_total",
                "Bytes uploaded to the store by commits (packs and generation objects).",
            ),
            commit_duration: histogram(
                "cachevol_commit_duration_seconds",
                "How long commits took.",
                &DURATION_BUCKETS,
            ),
            lock_waits: counter(
                "cachevol_lock_waits_total",
                "Publishes refused because another pod holds the locked cache.",
            ),
            lock_wait_duration: histogram(
                "cachevol_lock_wait_duration_seconds",
                "How long pods waited for a locked cache before getting it (0 when they did not).",
                &LOCK_WAIT_BUCKETS,
            ),
            lock_waiting_pods: reg(
                &registry,
                IntGauge::new(
                    "cachevol_lock_waiting_pods",
                    "Pods whose NodePublishVolume is waiting for a locked cache right now.",
                )
                .expect("valid gauge"),
            ),
            store_errors: counter_vec(
                "cachevol_store_request_errors_total",
                "Failed or timed-out object store requests by operation (not found and lost create races are answers, not errors).",
                &["op"],
            ),
            unreadable_records: counter(
                "cachevol_unreadable_view_records_total",
                "View records the node plugin could not read at start (their views are ignored).",
            ),
            grpc_requests: counter_vec(
                "cachevol_grpc_requests_total",
                "CSI gRPC calls by method and status code.",
                &["method", "code"],
            ),
            grpc_duration: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "cachevol_grpc_request_duration_seconds",
                        "How long CSI gRPC calls took, by method.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["method"],
                )
                .expect("valid histogram"),
            ),
            gc_runs: counter_vec(
                "cachevol_gc_runs_total",
                "Garbage collection runs by outcome (ok, failed).",
                &["outcome"],
            ),
            gc_deleted_bytes: counter(
                "cachevol_gc_deleted_bytes_total",
                "Bytes deleted from the store by garbage collection.",
            ),
            gc_last_success: reg(
                &registry,
                Gauge::new(
                    "cachevol_gc_last_success_timestamp_seconds",
                    "When garbage collection last finished a scope without error (unix seconds; 0: not yet since start).",
                )
                .expect("valid gauge"),
            ),
            store_duration: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "cachevol_store_request_duration_seconds",
                        "How long object store requests took (answered, failed or timed out), by operation.",
                    )
                    .buckets(STORE_BUCKETS.to_vec()),
                    &["op"],
                )
                .expect("valid histogram"),
            ),
            store_up: gauge(
                "cachevol_store_up",
                "1 while the controller's default store answered its last health check (a HEAD within a few seconds), else 0.",
            ),
            leader: gauge(
                "cachevol_controller_leader",
                "1 while this controller holds the leader Lease and runs garbage collection, else 0.",
            ),
            base_bytes: gauge(
                "cachevol_node_base_bytes",
                "Bytes of base trees kept on the node (sampled every few seconds).",
            ),
            base_budget_bytes: gauge(
                "cachevol_node_base_budget_bytes",
                "The node's budget for base trees (--base-budget); 0: no budget.",
            ),
            views: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "cachevol_node_views",
                        "Views on the node by state: active (mounted for a pod) or pending (pods gone, commit not decided yet).",
                    ),
                    &["state"],
                )
                .expect("valid gauge"),
            ),
            oldest_pending_commit: reg(
                &registry,
                Gauge::new(
                    "cachevol_node_oldest_pending_commit_age_seconds",
                    "How long the oldest view pending a commit has waited (0 when none).",
                )
                .expect("valid gauge"),
            ),
            registry,
        };

        let build_info = IntGaugeVec::new(
            Opts::new(
                "cachevol_build_info",
                "Always 1; the version label names the running build.",
            ),
            &["version"],
        )
        .expect("valid gauge");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        reg(&m.registry, build_info);

        // The fixed label sets, exported at 0 before anything happens.
        for level in RestoreLevel::ALL {
            for outcome in RestoreOutcome::ALL {
                m.restores
                    .with_label_values(&[level.label(), outcome.label()]);
            }
        }
        for form in [BaseForm::Image, BaseForm::Tree] {
            m.base_writes.with_label_values(&[form.label()]);
            m.base_write_duration.with_label_values(&[form.label()]);
        }
        for reason in EvictionReason::ALL {
            m.base_evictions.with_label_values(&[reason.label()]);
        }
        for outcome in CommitOutcome::ALL {
            m.commits.with_label_values(&[outcome.label()]);
        }
        for op in STORE_OPS {
            m.store_errors.with_label_values(&[op]);
        }
        for outcome in ["ok", "failed"] {
            m.gc_runs.with_label_values(&[outcome]);
        }
        for op in STORE_OPS {
            m.store_duration.with_label_values(&[op]);
        }
        for state in ["active", "pending"] {
            m.views.with_label_values(&[state]);
        }
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metric names are unique");
        m
    }
}

/// A duration as a histogram can take it: NaN and negative values (a clock gone backwards)
/// count as 0 rather than poisoning the sum.
fn non_negative(s: f64) -> f64 {
    if s >= 0.0 {
        s
    } else {
        0.0
    }
}

impl Metrics {
    /// Counts one restore: which snapshot it started from, how it ended, the bytes it wrote and
    /// how long it took.
    pub fn restore(&self, level: RestoreLevel, outcome: RestoreOutcome, bytes: u64, seconds: f64) {
        self.restores
            .with_label_values(&[level.label(), outcome.label()])
            .inc();
        self.restore_bytes.inc_by(bytes);
        self.restore_duration.observe(non_negative(seconds));
    }

    /// Counts one base written for a publish, by form, and how long that publish took.
    pub fn base_written(&self, form: BaseForm, seconds: f64) {
        self.base_writes.with_label_values(&[form.label()]).inc();
        self.base_write_duration
            .with_label_values(&[form.label()])
            .observe(non_negative(seconds));
    }

    /// Counts one base evicted from the node, by reason.
    pub fn base_evicted(&self, reason: EvictionReason) {
        self.base_evictions
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// Counts one commit: how it ended, the bytes it uploaded and how long it took.
    pub fn commit(&self, outcome: CommitOutcome, uploaded_bytes: u64, seconds: f64) {
        self.commits.with_label_values(&[outcome.label()]).inc();
        self.commit_uploaded_bytes.inc_by(uploaded_bytes);
        self.commit_duration.observe(non_negative(seconds));
    }

    /// A publish was refused because another pod holds the locked cache.
    pub fn lock_waiting(&self) {
        self.lock_waits.inc();
    }

    /// Pods now waiting for a locked cache: `delta` more (or fewer, when negative).
    pub fn lock_waiters(&self, delta: i64) {
        self.lock_waiting_pods.add(delta)
    }

    /// A pod got a locked cache after waiting `waited_seconds` (0 when it did not wait).
    pub fn lock_acquired(&self, waited_seconds: f64) {
        self.lock_wait_duration
            .observe(non_negative(waited_seconds));
    }

    /// A store request failed or timed out. `op` is one of [`STORE_OPS`]; anything else is
    /// counted as `other`.
    pub fn store_error(&self, op: &'static str) {
        let op = if STORE_OPS.contains(&op) { op } else { "other" };
        self.store_errors.with_label_values(&[op]).inc();
    }

    /// One store request of `op` (one of [`STORE_OPS`], else counted as `other`) that took
    /// `secs`.
    pub fn store_latency(&self, op: &'static str, secs: f64) {
        let op = if STORE_OPS.contains(&op) { op } else { "other" };
        self.store_duration
            .with_label_values(&[op])
            .observe(non_negative(secs));
    }

    /// A store opened by a daemon, with its failures and latencies counted here.
    pub fn count_store(&self, store: crate::engine::Store) -> crate::engine::Store {
        let errors = self.clone();
        let latency = self.clone();
        store
            .on_error(Arc::new(move |op| errors.store_error(op)))
            .on_latency(Arc::new(move |op, took| {
                latency.store_latency(op, took.as_secs_f64())
            }))
    }

    /// A view record could not be read when the node plugin started.
    pub fn unreadable_record(&self) {
        self.unreadable_records.inc();
    }

    /// Whether the default store answered the last health check (the controller's `/readyz`).
    pub fn store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }

    /// Whether this controller holds the leader Lease (and so runs GC).
    pub fn leader(&self, leads: bool) {
        self.leader.set(i64::from(leads));
    }

    /// One CSI RPC: its method (one of [`CSI_METHODS`], else counted as `other`), the status
    /// code it answered with and how long it took.
    pub fn grpc(&self, method: &'static str, code: tonic::Code, seconds: f64) {
        let method = if CSI_METHODS.contains(&method) {
            method
        } else {
            "other"
        };
        self.grpc_requests
            .with_label_values(&[method, code_name(code)])
            .inc();
        self.grpc_duration
            .with_label_values(&[method])
            .observe(non_negative(seconds));
    }

    /// One garbage collection run: whether it completed, and the bytes it deleted from the
    /// store.
    pub fn gc_run(&self, ok: bool, deleted_bytes: u64) {
        self.gc_runs
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
        self.gc_deleted_bytes.inc_by(deleted_bytes);
        if ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.gc_last_success.set(now);
        }
    }

    /// The metrics in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        encode(&self.registry)
    }
}

/// What the node reports, counted in this registry (no Events: see the cluster's reporter).
impl crate::node::Report for Metrics {
    fn restore(&self, level: RestoreLevel, outcome: RestoreOutcome, bytes: u64, secs: f64) {
        Metrics::restore(self, level, outcome, bytes, secs)
    }

    fn base_written(&self, form: BaseForm, secs: f64) {
        Metrics::base_written(self, form, secs)
    }

    fn base_evicted(&self, reason: EvictionReason) {
        Metrics::base_evicted(self, reason)
    }

    fn commit(&self, outcome: CommitOutcome, uploaded_bytes: u64, secs: f64) {
        Metrics::commit(self, outcome, uploaded_bytes, secs)
    }

    fn lock_waiting(&self) {
        Metrics::lock_waiting(self)
    }

    fn lock_waiters(&self, delta: i64) {
        Metrics::lock_waiters(self, delta)
    }

    fn lock_acquired(&self, waited_secs: f64) {
        Metrics::lock_acquired(self, waited_secs)
    }

    fn store_error(&self, op: &'static str) {
        Metrics::store_error(self, op)
    }

    fn store_latency(&self, op: &'static str, secs: f64) {
        Metrics::store_latency(self, op, secs)
    }

    fn unreadable_record(&self) {
        Metrics::unreadable_record(self)
    }

    fn node_gauges(&self, g: &crate::node::NodeGauges) {
        self.base_bytes.set(g.base_bytes as i64);
        self.base_budget_bytes
            .set(g.base_budget.map_or(0, |b| b as i64));
        self.views
            .with_label_values(&["active"])
            .set(g.active_views as i64);
        self.views
            .with_label_values(&["pending"])
            .set(g.pending_views as i64);
        self.oldest_pending_commit.set(g.oldest_pending_secs);
    }
}

/// The name of a gRPC status code as tonic spells its variant (`Ok`, `InvalidArgument`, ...).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

fn encode(registry: &Registry) -> String {
    let families = registry.gather();
    let mut out = Vec::new();
    match TextEncoder::new().encode(&families, &mut out) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        // Cannot happen with the metrics above; say so in the scrape rather than panic.
        Err(e) => format!("# error encoding metrics: {e}\n"),
    }
}

/// Readiness as the process defines it: `Ok(())` when ready, else why not.
pub type ReadyFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Serves `GET /metrics` (text exposition format 0.0.4), `/healthz` (200 "ok" while the process
/// runs) and `/readyz` (200 when `ready()` is `Ok`, else 503 with the reason as body); 404 for
/// any other path, 405 for methods other than GET and HEAD. Binds `addr` (port 0 picks one) and
/// returns the bound address; the server keeps running on a spawned task for the life of the
/// runtime. `/metrics` renders `metrics`.
pub async fn serve(
    addr: SocketAddr,
    ready: ReadyFn,
    metrics: Metrics,
) -> std::io::Result<SocketAddr> {
    let (local, server) = bind(addr, ready, metrics).await?;
    tokio::spawn(server);
    Ok(local)
}

/// Binds `addr` as [`serve`] does and returns the server for the caller to run, so a daemon can
/// supervise it (the future only ends if the server stops).
pub async fn bind(
    addr: SocketAddr,
    ready: ReadyFn,
    metrics: Metrics,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = ()> + Send + 'static,
)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((local, accept_loop(listener, ready, metrics)))
}

async fn accept_loop(listener: tokio::net::TcpListener, ready: ReadyFn, metrics: Metrics) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: pass, and try again shortly.
                tracing::warn!("metrics server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ready = ready.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = respond(req.method(), req.uri().path(), &*ready, &metrics);
                async move { Ok::<_, Infallible>(resp) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            // A client that never finishes its headers does not hold a connection forever.
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            if let Err(e) = http
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics server: connection: {e}");
            }
        });
    }
}

fn respond(
    method: &Method,
    path: &str,
    ready: &(dyn Fn() -> Result<(), String> + Send + Sync),
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n".into());
    }
    if method != Method::GET && method != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        resp.headers_mut().insert(
            "allow",
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return resp;
    }
    match path {
        "/metrics" => {
            let mut resp = text(StatusCode::OK, metrics.render());
            resp.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        _ => match ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series `name{labels}` (labels exactly as rendered) in `text`.
    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn fixed_label_sets_are_exported_before_any_observation() {
        // A registry of its own, untouched by the other tests.
        let text = encode(&Metrics::new().registry);
        for name in [
            "cachevol_restores_total",
            "cachevol_restore_bytes_total",
            "cachevol_restore_duration_seconds",
            "cachevol_commits_total",
            "cachevol_commit_uploaded_bytes_total",
            "cachevol_commit_duration_seconds",
            "cachevol_lock_waits_total",
            "cachevol_lock_wait_duration_seconds",
            "cachevol_lock_waiting_pods",
            "cachevol_store_request_errors_total",
            "cachevol_gc_runs_total",
            "cachevol_gc_deleted_bytes_total",
            "cachevol_build_info",
            "cachevol_store_request_duration_seconds",
            "cachevol_store_up",
            "cachevol_controller_leader",
            "cachevol_gc_last_success_timestamp_seconds",
            "cachevol_node_base_bytes",
            "cachevol_node_base_budget_bytes",
            "cachevol_node_views",
            "cachevol_node_oldest_pending_commit_age_seconds",
            "cachevol_node_base_writes_total",
            "cachevol_node_base_write_duration_seconds",
            "cachevol_node_base_evictions_total",
            "process_cpu_seconds_total",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        for level in ["key", "restore-key", "miss"] {
            for outcome in ["restored", "warm", "degraded", "failed"] {
                value(
                    &text,
                    &format!("cachevol_restores_total{{level=\"{level}\",outcome=\"{outcome}\"}}"),
                );
            }
        }
        for form in ["image", "tree"] {
            value(
                &text,
                &format!("cachevol_node_base_writes_total{{form=\"{form}\"}}"),
            );
        }
        value(
            &text,
            "cachevol_node_base_evictions_total{reason=\"budget\"}",
        );
        for outcome in [
            "committed",
            "unchanged",
            "skipped",
            "fenced",
            "refused",
            "failed",
        ] {
            value(
                &text,
                &format!("cachevol_commits_total{{outcome=\"{outcome}\"}}"),
            );
        }
        for op in STORE_OPS {
            value(
                &text,
                &format!("cachevol_store_request_errors_total{{op=\"{op}\"}}"),
            );
        }
        assert_eq!(
            value(
                &text,
                "cachevol_restores_total{level=\"key\",outcome=\"restored\"}"
            ),
            0.0
        );
        assert_eq!(value(&text, "cachevol_restore_duration_seconds_count"), 0.0);
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            value(
                &text,
                &format!("cachevol_build_info{{version=\"{version}\"}}")
            ),
            1.0
        );
        // Per-method gRPC series appear with the first call (the sidecars probe within seconds);
        // creating all CSI methods x codes up front would export hundreds of empty series.
        assert!(!text.contains("cachevol_grpc_"));
    }

    // Each test below records into a registry of its own: the values are exact, whatever the
    // other tests running in parallel do.

    #[test]
    fn commits_count_outcome_bytes_and_duration() {
        let m = Metrics::new();
        m.commit(CommitOutcome::Fenced, 1234, 0.2);
        m.commit(CommitOutcome::Fenced, 0, f64::NAN);
        let text = m.render();
        assert_eq!(
            value(&text, "cachevol_commits_total{outcome=\"fenced\"}"),
            2.0
        );
        assert_eq!(
            value(&text, "cachevol_commits_total{outcome=\"committed\"}"),
            0.0
        );
        assert_eq!(value(&text, "cachevol_commit_uploaded_bytes_total"), 1234.0);
        // The NaN was observed as 0: the sum stays a number.
        assert_eq!(value(&text, "cachevol_commit_duration_seconds_sum"), 0.2);
        assert_eq!(
            value(&text, "cachevol_commit_duration_seconds_bucket{le=\"0.1\"}"),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "cachevol_commit_duration_seconds_bucket{le=\"0.25\"}"
            ),
            2.0
        );
    }

    #[test]
    fn restores_count_level_and_outcome() {
        let m = Metrics::new();
        m.restore(
            RestoreLevel::RestoreKey,
            RestoreOutcome::Degraded,
            10,
            0.003,
        );
        let text = m.render();
        assert_eq!(
            value(
                &text,
                "cachevol_restores_total{level=\"restore-key\",outcome=\"degraded\"}"
            ),
            1.0
        );
        assert_eq!(value(&text, "cachevol_restore_bytes_total"), 10.0);
        assert_eq!(value(&text, "cachevol_restore_duration_seconds_count"), 1.0);
    }

    #[test]
    fn base_writes_count_their_form() {
        let m = Metrics::new();
        m.base_written(BaseForm::Image, 0.2);
        m.base_written(BaseForm::Image, 0.3);
        m.base_written(BaseForm::Tree, 1.5);
        let text = m.render();
        let v = |s: &str| value(&text, s);
        assert_eq!(v("cachevol_node_base_writes_total{form=\"image\"}"), 2.0);
        assert_eq!(v("cachevol_node_base_writes_total{form=\"tree\"}"), 1.0);
        assert_eq!(
            v("cachevol_node_base_write_duration_seconds_count{form=\"image\"}"),
            2.0
        );
        assert_eq!(
            v("cachevol_node_base_write_duration_seconds_sum{form=\"tree\"}"),
            1.5
        );
    }

    #[test]
    fn base_evictions_count_their_reason() {
        let m = Metrics::new();
        let text = m.render();
        assert_eq!(
            value(
                &text,
                "cachevol_node_base_evictions_total{reason=\"budget\"}"
            ),
            0.0
        );
        crate::node::Report::base_evicted(&m, EvictionReason::Budget);
        m.base_evicted(EvictionReason::Budget);
        let text = m.render();
        assert_eq!(
            value(
                &text,
                "cachevol_node_base_evictions_total{reason=\"budget\"}"
            ),
            2.0
        );
    }

    #[test]
    fn registries_are_independent() {
        // Two daemons' registries (or two tests') do not see each other's observations.
        let (a, b) = (Metrics::new(), Metrics::new());
        a.gc_run(true, 5);
        a.leader(true);
        let (ta, tb) = (a.render(), b.render());
        assert_eq!(value(&ta, "cachevol_gc_runs_total{outcome=\"ok\"}"), 1.0);
        assert_eq!(value(&tb, "cachevol_gc_runs_total{outcome=\"ok\"}"), 0.0);
        assert_eq!(value(&ta, "cachevol_controller_leader"), 1.0);
        assert_eq!(value(&tb, "cachevol_controller_leader"), 0.0);
        // A clone records into the same registry.
        a.clone().gc_run(false, 0);
        assert_eq!(
            value(&a.render(), "cachevol_gc_runs_total{outcome=\"failed\"}"),
            1.0
        );
    }

    #[test]
    fn grpc_labels_are_bounded() {
        let m = Metrics::new();
        m.grpc("NodeExpandVolume", tonic::Code::ResourceExhausted, 0.01);
        m.grpc("SomethingNew", tonic::Code::Unimplemented, 0.01);
        let text = m.render();
        assert_eq!(
            value(
                &text,
                "cachevol_grpc_requests_total{code=\"ResourceExhausted\",method=\"NodeExpandVolume\"}",
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "cachevol_grpc_requests_total{code=\"Unimplemented\",method=\"other\"}",
            ),
            1.0
        );
        assert!(!text.contains("SomethingNew"));
        assert_eq!(
            value(
                &text,
                "cachevol_grpc_request_duration_seconds_count{method=\"NodeExpandVolume\"}",
            ),
            1.0
        );
    }

    #[test]
    fn code_names_are_tonics_variant_names() {
        for i in 0..=16 {
            let code = tonic::Code::from_i32(i);
            assert_eq!(code_name(code), format!("{code:?}"));
        }
    }

    #[test]
    fn store_errors_outside_the_fixed_set_are_other() {
        let m = Metrics::new();
        m.store_error("rename");
        let text = m.render();
        assert_eq!(
            value(&text, "cachevol_store_request_errors_total{op=\"other\"}"),
            1.0
        );
        assert!(!text.contains("rename"));
    }

    #[test]
    fn every_series_has_bounded_labels() {
        // Every label name of every family, and a bound on how many values each may take.
        let m = Metrics::new();
        m.grpc("Probe", tonic::Code::Ok, 0.0);
        m.grpc("SomethingNew", tonic::Code::DataLoss, 0.0);
        m.gc_run(false, 0);
        m.lock_waiting();
        m.lock_acquired(-1.0);
        m.store_error("rename");
        m.store_latency("rename", 0.1);
        let allowed = |name: &str, value: &str| match name {
            "level" => RestoreLevel::ALL.iter().any(|l| l.label() == value),
            "outcome" => {
                RestoreOutcome::ALL.iter().any(|o| o.label() == value)
                    || CommitOutcome::ALL.iter().any(|o| o.label() == value)
                    || value == "ok"
            }
            "op" => STORE_OPS.contains(&value) || value == "other",
            "method" => CSI_METHODS.contains(&value) || value == "other",
            "code" => (0..=16).any(|i| code_name(tonic::Code::from_i32(i)) == value),
            "version" => value == env!("CARGO_PKG_VERSION"),
            "state" => ["active", "pending"].contains(&value),
            "form" => ["image", "tree"].contains(&value),
            "reason" => EvictionReason::ALL.iter().any(|r| r.label() == value),
            "le" => true, // histogram buckets: fixed by the bucket lists
            _ => false,
        };
        for family in m.registry.gather() {
            for metric in family.get_metric() {
                for pair in metric.get_label() {
                    assert!(
                        allowed(pair.name(), pair.value()),
                        "{}: label {}={:?} outside its fixed set",
                        family.name(),
                        pair.name(),
                        pair.value()
                    );
                }
            }
        }
    }

    #[test]
    fn routes() {
        let m = Metrics::new();
        let ok = || -> Result<(), String> { Ok(()) };
        let not_ready = || -> Result<(), String> { Err("no store yet".into()) };
        let status =
            |method: Method, p: &str, r: &(dyn Fn() -> Result<(), String> + Send + Sync)| {
                respond(&method, p, r, &m).status()
            };
        assert_eq!(status(Method::GET, "/metrics", &ok), StatusCode::OK);
        assert_eq!(status(Method::GET, "/healthz", &not_ready), StatusCode::OK);
        assert_eq!(status(Method::GET, "/readyz", &ok), StatusCode::OK);
        assert_eq!(
            status(Method::GET, "/readyz", &not_ready),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(status(Method::GET, "/", &ok), StatusCode::NOT_FOUND);
        assert_eq!(
            status(Method::GET, "/metrics/x", &ok),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(Method::POST, "/metrics", &ok),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(status(Method::HEAD, "/healthz", &ok), StatusCode::OK);
    }
}

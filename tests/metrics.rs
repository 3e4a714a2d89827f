//! The metrics endpoint as Prometheus and kubelet's probes see it: a real HTTP server on a TCP
//! port, asked with plain HTTP/1.1 requests. Checks the three paths and their status codes, that
//! what the public API records shows up in /metrics, that README.md's metrics table names exactly
//! the exported families (with their types), and that the store and the gRPC handler count what
//! they should — and not what is a normal answer.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cachevol::csi::identity::IdentityService;
use cachevol::csi::pb::{self, identity_server::Identity};
use cachevol::engine::Store;
use cachevol::metrics::{self, CommitOutcome, Metrics, RestoreLevel, RestoreOutcome};
use object_store::path::Path as StorePath;

struct Reply {
    status: u16,
    content_type: String,
    body: String,
}

/// One HTTP/1.1 request on a fresh connection, read to the end.
fn http(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {raw:?}"));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    if method != "HEAD" {
        let len: usize = header("content-length")
            .expect("a content-length")
            .parse()
            .unwrap();
        assert_eq!(body.len(), len, "body of {path} has its announced length");
    }
    Reply {
        status,
        content_type: header("content-type").unwrap_or_default(),
        body: body.to_string(),
    }
}

/// The families of an exposition text: name → type, from its `# TYPE` lines.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

/// The value of one series, `name{labels}` exactly as rendered (labels sorted by name).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// README.md's metrics table: metric name → type, from the table under "## Metrics".
fn readme_table() -> BTreeMap<String, String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Metrics\n"))
        .expect("README.md has a \"## Metrics\" section");
    let mut rows = section.lines().filter(|l| l.starts_with('|')).map(|l| {
        l.trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect::<Vec<_>>()
    });
    let header = rows.next().expect("a table");
    assert_eq!(header[..2], ["metric", "type"], "table header: {header:?}");
    rows.skip(1) // the |---| line
        .map(|cells| {
            let name = cells[0]
                .strip_prefix('`')
                .and_then(|c| c.strip_suffix('`'))
                .unwrap_or_else(|| panic!("first cell not a name in backticks: {cells:?}"));
            (name.to_string(), cells[1].clone())
        })
        .collect()
}

#[tokio::test]
async fn endpoint_serves_metrics_health_and_readiness() {
    let ready = Arc::new(AtomicBool::new(false));
    let flag = ready.clone();
    // The registry a daemon creates at start-up and hands to the server and to what records.
    let m = Metrics::new();
    let addr = metrics::serve(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(move || {
            if flag.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("store not reachable yet".to_string())
            }
        }),
        m.clone(),
    )
    .await
    .unwrap();
    assert_ne!(addr.port(), 0, "the bound port is returned");

    // The blocking client runs off the runtime's thread, so the server can answer.
    let get = move |method: &'static str, path: &'static str| {
        tokio::task::spawn_blocking(move || http(addr, method, path))
    };

    let before = get("GET", "/metrics").await.unwrap();
    assert_eq!(before.status, 200);
    assert!(
        before.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        before.content_type
    );

    // One of each observation, on series the other tests of this file do not touch.
    m.restore(RestoreLevel::Key, RestoreOutcome::Warm, 4096, 0.002);
    m.restore(RestoreLevel::Miss, RestoreOutcome::Restored, 0, 0.0005);
    m.commit(CommitOutcome::Committed, 1 << 20, 1.5);
    m.lock_waiting();
    m.lock_acquired(42.0);
    m.store_error("copy");
    m.grpc("NodeUnpublishVolume", tonic::Code::Internal, 0.02);
    m.gc_run(true, 777);
    m.store_up(true);
    m.leader(true);
    m.base_written(cachevol::node::BaseForm::Image, 0.25);
    use cachevol::node::Report as _;
    m.node_gauges(&cachevol::node::NodeGauges {
        base_bytes: 5 << 30,
        base_budget: Some(50 << 30),
        active_views: 3,
        pending_views: 2,
        oldest_pending_secs: 90.0,
    });

    let after = get("GET", "/metrics").await.unwrap();
    assert_eq!(after.status, 200);
    let (b, a) = (&before.body, &after.body);
    let delta = |series: &str| value(a, series) - value(b, series);
    assert_eq!(
        delta("cachevol_restores_total{level=\"key\",outcome=\"warm\"}"),
        1.0
    );
    assert_eq!(
        delta("cachevol_restores_total{level=\"miss\",outcome=\"restored\"}"),
        1.0
    );
    assert_eq!(delta("cachevol_restore_bytes_total"), 4096.0);
    assert_eq!(delta("cachevol_restore_duration_seconds_count"), 2.0);
    assert_eq!(
        delta("cachevol_restore_duration_seconds_bucket{le=\"0.001\"}"),
        1.0
    );
    assert_eq!(delta("cachevol_commits_total{outcome=\"committed\"}"), 1.0);
    assert_eq!(
        delta("cachevol_commit_uploaded_bytes_total"),
        (1 << 20) as f64
    );
    assert_eq!(
        delta("cachevol_commit_duration_seconds_bucket{le=\"1\"}"),
        0.0
    );
    assert_eq!(
        delta("cachevol_commit_duration_seconds_bucket{le=\"2.5\"}"),
        1.0
    );
    assert_eq!(delta("cachevol_lock_waits_total"), 1.0);
    assert_eq!(
        delta("cachevol_lock_wait_duration_seconds_bucket{le=\"60\"}"),
        1.0
    );
    assert_eq!(delta("cachevol_lock_wait_duration_seconds_sum"), 42.0);
    assert_eq!(
        delta("cachevol_store_request_errors_total{op=\"copy\"}"),
        1.0
    );
    // Created by this call: absent before.
    assert_eq!(
        value(
            a,
            "cachevol_grpc_requests_total{code=\"Internal\",method=\"NodeUnpublishVolume\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            a,
            "cachevol_grpc_request_duration_seconds_count{method=\"NodeUnpublishVolume\"}"
        ),
        1.0
    );
    assert_eq!(delta("cachevol_gc_runs_total{outcome=\"ok\"}"), 1.0);
    assert_eq!(delta("cachevol_gc_deleted_bytes_total"), 777.0);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        value(a, &format!("cachevol_build_info{{version=\"{version}\"}}")),
        1.0
    );

    // The gauges an operator looks for.
    assert_eq!(value(a, "cachevol_store_up"), 1.0);
    assert_eq!(value(a, "cachevol_controller_leader"), 1.0);
    assert_eq!(value(a, "cachevol_node_base_bytes"), (5u64 << 30) as f64);
    assert_eq!(
        value(a, "cachevol_node_base_budget_bytes"),
        (50u64 << 30) as f64
    );
    assert_eq!(value(a, "cachevol_node_views{state=\"active\"}"), 3.0);
    assert_eq!(value(a, "cachevol_node_views{state=\"pending\"}"), 2.0);
    assert_eq!(
        value(a, "cachevol_node_oldest_pending_commit_age_seconds"),
        90.0
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let gc = value(a, "cachevol_gc_last_success_timestamp_seconds");
    assert!((now - gc).abs() < 60.0, "last GC at {gc}, now {now}");
    // The process collector.
    assert!(value(a, "process_resident_memory_bytes") > 0.0);
    assert!(value(a, "process_open_fds") > 0.0);
    assert_eq!(families(a)["process_cpu_seconds_total"], "counter");
    // Store latency: every op exported from the start.
    for op in ["get", "put", "list", "head", "delete", "copy"] {
        value(
            b,
            &format!("cachevol_store_request_duration_seconds_count{{op=\"{op}\"}}"),
        );
    }

    // The README's table and the exported families are the same set, with the same types.
    let exported: BTreeMap<String, String> = families(a)
        .into_iter()
        .filter(|(name, _)| !name.starts_with("process_"))
        .collect();
    let documented = readme_table();
    for (name, kind) in &exported {
        assert_eq!(
            documented.get(name),
            Some(kind),
            "{name} ({kind}) is exported but not in README.md's metrics table with that type"
        );
    }
    for name in documented.keys() {
        assert!(
            exported.contains_key(name),
            "{name} is in README.md's metrics table but not exported"
        );
    }
    assert!(exported.len() >= 14, "{exported:?}");

    // Health: always 200 while the process runs.
    let health = get("GET", "/healthz").await.unwrap();
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));

    // Readiness follows the function, with the reason when not ready.
    let not_ready = get("GET", "/readyz").await.unwrap();
    assert_eq!(not_ready.status, 503);
    assert!(
        not_ready.body.contains("store not reachable yet"),
        "{}",
        not_ready.body
    );
    ready.store(true, Ordering::SeqCst);
    let now_ready = get("GET", "/readyz").await.unwrap();
    assert_eq!(now_ready.status, 200);
    ready.store(false, Ordering::SeqCst);
    assert_eq!(get("GET", "/readyz").await.unwrap().status, 503);

    // Anything else.
    assert_eq!(get("GET", "/").await.unwrap().status, 404);
    assert_eq!(get("GET", "/metricsx").await.unwrap().status, 404);
    assert_eq!(get("POST", "/metrics").await.unwrap().status, 405);
    assert_eq!(get("HEAD", "/healthz").await.unwrap().status, 200);
    // A query string does not change the path.
    assert_eq!(get("GET", "/healthz?verbose").await.unwrap().status, 200);
}

#[tokio::test]
async fn store_counts_failures_but_not_normal_answers() {
    let dir = tempfile::tempdir().unwrap();
    // The daemons hand their stores the metrics' hook; the engine itself keeps no metrics.
    let m = Metrics::new();
    let counted = m.clone();
    let store = Store::open(&format!("file://{}", dir.path().display()))
        .unwrap()
        .on_error(std::sync::Arc::new(move |op| counted.store_error(op)));
    let series = |op: &str| format!("cachevol_store_request_errors_total{{op=\"{op}\"}}");
    let ops = ["get", "head", "put", "delete", "list"];
    let counts = || {
        let text = m.render();
        ops.map(|op| value(&text, &series(op)))
    };
    let before = counts();

    // Normal answers: not found, a lost create race, deleting what is gone, an empty listing.
    let missing = StorePath::from("nothing/here");
    assert!(store.get(&missing).await.unwrap().is_none());
    assert!(store.head(&missing).await.unwrap().is_none());
    store.delete(&missing).await.unwrap();
    assert!(store.list(&missing).await.unwrap().is_empty());
    let gen = StorePath::from("manifests/k/1");
    assert!(store
        .put_create(&gen, Bytes::from_static(b"one"))
        .await
        .unwrap());
    assert!(!store
        .put_create(&gen, Bytes::from_static(b"two"))
        .await
        .unwrap());
    assert!(store
        .put_swap(&gen, Bytes::from_static(b"three"), None)
        .await
        .unwrap());
    assert_eq!(counts(), before, "normal answers are not errors");

    // A real failure: an object cannot be written below another object (a file, on file://).
    let file = StorePath::from("a");
    store.put(&file, Bytes::from_static(b"x")).await.unwrap();
    store
        .put(&StorePath::from("a/b"), Bytes::from_static(b"y"))
        .await
        .expect_err("a/b below the object a");
    store
        .put_create(&StorePath::from("a/c"), Bytes::from_static(b"y"))
        .await
        .expect_err("a/c below the object a");
    let after = counts();
    assert_eq!(after[2] - before[2], 2.0, "two failed puts: {after:?}");
    assert_eq!(
        [after[0], after[1], after[3], after[4]],
        [before[0], before[1], before[3], before[4]]
    );
}

#[tokio::test]
async fn grpc_calls_are_counted_by_method_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let m = Metrics::new();
    let svc = IdentityService::new(dir.path().to_path_buf()).with_metrics(m.clone());
    let series = "cachevol_grpc_requests_total{code=\"Ok\",method=\"GetPluginInfo\"}";
    let count = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = count(&m.render());
    svc.get_plugin_info(tonic::Request::new(pb::GetPluginInfoRequest {}))
        .await
        .unwrap();
    svc.get_plugin_info(tonic::Request::new(pb::GetPluginInfoRequest {}))
        .await
        .unwrap();
    let text = m.render();
    assert_eq!(count(&text) - before, 2.0);
    assert!(
        value(
            &text,
            "cachevol_grpc_request_duration_seconds_count{method=\"GetPluginInfo\"}"
        ) >= 2.0
    );
}

#[tokio::test]
async fn store_requests_are_timed_by_op() {
    let dir = tempfile::tempdir().unwrap();
    let m = Metrics::new();
    let counted = m.clone();
    let store = Store::open(&format!("file://{}", dir.path().display()))
        .unwrap()
        .on_latency(Arc::new(move |op, took| {
            counted.store_latency(op, took.as_secs_f64())
        }));
    let series = "cachevol_store_request_duration_seconds_count{op=\"head\"}";
    let before = value(&m.render(), series);
    for name in ["a", "b", "c"] {
        assert!(store.head(&StorePath::from(name)).await.unwrap().is_none());
    }
    store
        .put(&StorePath::from("x"), Bytes::from_static(b"x"))
        .await
        .unwrap();
    let text = m.render();
    assert_eq!(
        value(&text, series) - before,
        3.0,
        "three HEADs, not found included"
    );
    assert!(
        value(
            &text,
            "cachevol_store_request_duration_seconds_bucket{op=\"head\",le=\"60\"}"
        ) >= 3.0
    );
    assert!(
        value(
            &text,
            "cachevol_store_request_duration_seconds_count{op=\"put\"}"
        ) >= 1.0
    );
}

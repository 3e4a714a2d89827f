//! The Kubernetes side end to end, with no cluster: the API server stand-in (tests/common/
//! apiserver.rs) speaks real HTTP/JSON and watch semantics to the unmodified kube client in two
//! `cachevol node` processes (two nodes, separate state dirs) and a `cachevol controller`
//! process; caches live in a `file://` store in the test's temp dir, or on the S3 server or
//! Azurite .ci/run starts (`CACHEVOL_TEST_STORE=s3|az`; a test about S3 itself always uses S3). The test acts as csi-provisioner
//! (CreateVolume over the controller's socket) and as kubelet (pods in the stand-in, their
//! phases, NodePublish/NodeUnpublish over the node sockets), and reads the Events the plugins
//! post on the pods.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::apiserver::ApiServer;

use cachevol::csi::pb::controller_client::ControllerClient;
use cachevol::csi::pb::node_client::NodeClient;
use cachevol::csi::pb::volume_capability::{access_mode::Mode, AccessMode, AccessType};
use cachevol::csi::pb::{self, volume_capability};
use cachevol::engine::{Engine, Store};
use k8s_openapi::api::core::v1::{Event, PersistentVolumeClaim, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tonic::Code;

const NS: &str = "cachevol";
const LEASE: &str = "2s";

/// A `cachevol node` or `cachevol controller` process talking to the stand-in.
struct Plugin {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    kubeconfig: PathBuf,
    env: Vec<(String, String)>,
    /// The port of its --metrics-address, if any.
    metrics: Option<u16>,
}

impl Plugin {
    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_cachevol"))
            .args(&self.args)
            .env("CACHEVOL_LOG", "debug")
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let child = self.child.insert(child);
        common::wait_for_socket(
            "plugin",
            child,
            &self.socket,
            &self.log,
            Duration::from_secs(30),
        );
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (30 s at most) until the agent has decided, or declined to decide, a view after
    /// it saw pod `uid` end: its "pod ended" line for that pod, then a later line about the
    /// same view that ends the agent's look at it (a decision, or "not deciding yet").
    async fn wait_decided_after_ending(&self, uid: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let logs = self.logs();
            let ended = logs
                .lines()
                .position(|l| l.contains("pod ended") && l.contains(uid));
            if let Some(at) = ended {
                let line = logs.lines().nth(at).unwrap();
                let view = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("view="))
                    .map(|v| v.trim_matches('"').to_string())
                    .unwrap_or_else(|| panic!("no view in {line:?}"));
                let looked = logs.lines().skip(at + 1).any(|l| {
                    l.contains(&view)
                        && [
                            "not deciding yet",
                            "nothing to decide",
                            "committed",
                            "unchanged",
                            "commit ",
                        ]
                        .iter()
                        .any(|w| l.contains(w))
                });
                if looked {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the agent never looked at the view of pod {uid} after it ended:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET `path` of its metrics endpoint: (status code, body).
    fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics.unwrap())).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let code = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        (code, body.to_string())
    }

    /// The value of one sample line of /metrics (`name{labels}`), 0 when absent.
    fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `cachevol node` (or `controller`, by its name) with its own socket, state dir and log
/// under `root`, talking to the stand-in through `root/kubeconfig`.
fn plugin(root: &Path, store: &str, name: &str, extra: &[&str]) -> Plugin {
    let kind = if name.starts_with("controller") {
        "controller"
    } else {
        "node"
    };
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut args: Vec<String> = vec![
        kind.into(),
        "--cluster=on".into(),
        format!("--namespace={NS}"),
        format!("--lease-duration={LEASE}"),
        format!("--store={store}"),
        format!("--endpoint=unix://{}", dir.join("csi.sock").display()),
        format!("--state-dir={}", dir.join("state").display()),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    Plugin {
        child: None,
        socket: dir.join("csi.sock"),
        log: root.join(format!("{name}.log")),
        args,
        kubeconfig: root.join("kubeconfig"),
        env: Vec::new(),
        metrics: None,
    }
}

/// One test's cluster: the stand-in, a store, the controller and node plugins.
struct Cluster {
    /// Serves until the test ends.
    _api: ApiServer,
    client: kube::Client,
    root: tempfile::TempDir,
    store: String,
    controller: Plugin,
    nodes: HashMap<String, Plugin>,
}

impl Cluster {
    /// On the store `CACHEVOL_TEST_STORE` names (a `file://` directory in the test's temp dir
    /// by default, so the suite always runs; `s3` or `az` for the servers of .ci/run).
    async fn start(test: &str, nodes: &[&str]) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let store = common::test_store_url(test, &root.path().join("store"));
        Cluster::start_on(root, store, nodes).await
    }

    /// On the S3 server of .ci/run, for the tests about S3 itself (fails under `CI` when it is
    /// not configured; None, skipped with a message, outside CI).
    async fn start_s3(test: &str, nodes: &[&str]) -> Option<Cluster> {
        let store = common::s3_url(test)?;
        Some(Cluster::start_on(tempfile::tempdir().unwrap(), store, nodes).await)
    }

    async fn start_on(root: tempfile::TempDir, store: String, nodes: &[&str]) -> Cluster {
        let api = ApiServer::start().await;
        api.write_kubeconfig(&root.path().join("kubeconfig"))
            .unwrap();
        let controller = plugin(root.path(), &store, "controller", &["--gc-interval=0"]);
        let mut c = Cluster {
            client: api.client(),
            _api: api,
            store,
            controller,
            nodes: HashMap::new(),
            root,
        };
        c.controller.spawn();
        for n in nodes {
            let port = common::free_port();
            let mut p = c.plugin(
                n,
                &[
                    &format!("--node-id={n}"),
                    &format!("--metrics-address=127.0.0.1:{port}"),
                    // A publish waiting for a lock answers UNAVAILABLE after this long.
                    "--lock-wait=1s",
                ],
            );
            p.metrics = Some(port);
            p.spawn();
            c.nodes.insert(n.to_string(), p);
        }
        c
    }

    /// A plugin process of this cluster, not started: `name` is `controller…` or a node.
    fn plugin(&self, name: &str, extra: &[&str]) -> Plugin {
        plugin(self.root.path(), &self.store, name, extra)
    }

    fn logs(&self) -> String {
        let mut s = format!("--- controller\n{}", self.controller.logs());
        for (n, p) in &self.nodes {
            s += &format!("\n--- {n}\n{}", p.logs());
        }
        s
    }

    fn node(&mut self, name: &str) -> &mut Plugin {
        self.nodes.get_mut(name).unwrap()
    }

    async fn node_client(&self, name: &str) -> NodeClient<tonic::transport::Channel> {
        NodeClient::new(common::dial_unix(&self.nodes[name].socket).await)
    }

    /// A claim with annotations, and CreateVolume for it as csi-provisioner does (with
    /// `--extra-create-metadata`). Returns the volume id and its context, or the error.
    async fn claim(
        &self,
        ns: &str,
        name: &str,
        annotations: &[(&str, &str)],
        params: &[(&str, &str)],
    ) -> Result<(String, HashMap<String, String>), tonic::Status> {
        self.namespace(ns).await;
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": name, "namespace": ns,
                "annotations": annotations.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            },
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "cachevol",
                     "resources": {"requests": {"storage": "1Gi"}}},
        }))
        .unwrap();
        let created = pvcs.create(&PostParams::default(), &pvc).await.unwrap();
        let uid = created.metadata.uid.unwrap();
        let mut parameters: HashMap<String, String> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parameters.insert("csi.storage.k8s.io/pvc/name".into(), name.into());
        parameters.insert("csi.storage.k8s.io/pvc/namespace".into(), ns.into());
        parameters.insert("csi.storage.k8s.io/pv/name".into(), format!("pvc-{uid}"));
        let mut cc = ControllerClient::new(common::dial_unix(&self.controller.socket).await);
        let r = cc
            .create_volume(pb::CreateVolumeRequest {
                name: format!("pvc-{uid}"),
                volume_capabilities: vec![cap()],
                parameters,
                ..Default::default()
            })
            .await?
            .into_inner();
        let v = r.volume.unwrap();
        Ok((v.volume_id, v.volume_context))
    }

    async fn namespace(&self, ns: &str) {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        if api.get_opt(ns).await.unwrap().is_none() {
            let n = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns}}))
            .unwrap();
            api.create(&PostParams::default(), &n).await.unwrap();
        }
    }

    /// A running pod on `node`, as the scheduler and kubelet would leave it.
    async fn pod(&self, ns: &str, name: &str, node: &str) -> PodInfo {
        self.namespace(ns).await;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let p: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node, "restartPolicy": "Never",
                     "containers": [{"name": "build", "image": "busybox"}]},
        }))
        .unwrap();
        let p = pods.create(&PostParams::default(), &p).await.unwrap();
        let info = PodInfo {
            ns: ns.into(),
            name: name.into(),
            uid: p.metadata.uid.unwrap(),
            node: node.into(),
        };
        self.status(&info, json!({"phase": "Running"})).await;
        info
    }

    async fn status(&self, pod: &PodInfo, status: serde_json::Value) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.ns);
        pods.patch_status(
            &pod.name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .unwrap();
    }

    async fn succeed(&self, pod: &PodInfo) {
        self.status(pod, json!({"phase": "Succeeded"})).await;
    }

    fn target(&self, pod: &PodInfo, vol: &str) -> PathBuf {
        self.root
            .path()
            .join("kubelet")
            .join(&pod.uid)
            .join(vol)
            .join("mount")
    }

    /// NodePublishVolume as kubelet sends it (with podInfoOnMount).
    async fn publish(
        &self,
        pod: &PodInfo,
        vol: &str,
        ctx: &HashMap<String, String>,
    ) -> Result<PathBuf, tonic::Status> {
        let target = self.target(pod, vol);
        let mut ctx = ctx.clone();
        ctx.insert("csi.storage.k8s.io/pod.name".into(), pod.name.clone());
        ctx.insert("csi.storage.k8s.io/pod.namespace".into(), pod.ns.clone());
        ctx.insert("csi.storage.k8s.io/pod.uid".into(), pod.uid.clone());
        ctx.insert(
            "csi.storage.k8s.io/serviceAccount.name".into(),
            "default".into(),
        );
        self.node_client(&pod.node)
            .await
            .node_publish_volume(pb::NodePublishVolumeRequest {
                volume_id: vol.into(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap()),
                volume_context: ctx,
                ..Default::default()
            })
            .await?;
        Ok(target)
    }

    /// Publishes, retrying as kubelet does while the answer is retryable; the errors seen.
    async fn publish_retrying(
        &self,
        pod: &PodInfo,
        vol: &str,
        ctx: &HashMap<String, String>,
        within: Duration,
    ) -> (PathBuf, Vec<tonic::Status>) {
        let deadline = Instant::now() + within;
        let mut errors = Vec::new();
        loop {
            match self.publish(pod, vol, ctx).await {
                Ok(t) => return (t, errors),
                Err(e) if matches!(e.code(), Code::Unavailable | Code::Aborted) => {
                    assert!(
                        Instant::now() < deadline,
                        "publish of {} kept failing: {e:?}\n{}",
                        pod.name,
                        self.logs()
                    );
                    errors.push(e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("publish of {}: {e:?}\n{}", pod.name, self.logs()),
            }
        }
    }

    async fn unpublish(&self, pod: &PodInfo, vol: &str) {
        self.node_client(&pod.node)
            .await
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: vol.into(),
                target_path: self.target(pod, vol).display().to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("unpublish: {e:?}\n{}", self.logs()));
    }

    /// The (reason, message, type) of every Event on the pod.
    async fn events(&self, pod: &PodInfo) -> Vec<(String, String, String)> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &pod.ns);
        api.list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.involved_object.uid.as_deref() == Some(pod.uid.as_str()))
            .map(|e| {
                (
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default(),
                    e.type_.unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Waits for an Event with `reason` on the pod; its message. Problems are Warnings, the
    /// rest Normal (a skipped commit is either: a refusal or a rule).
    async fn event(&self, pod: &PodInfo, reason: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((_, m, kind)) = self
                .events(pod)
                .await
                .into_iter()
                .find(|(r, _, _)| r == reason)
            {
                let want = match reason {
                    "CacheRestoreDegraded" | "CacheFenced" => Some("Warning"),
                    "CacheCommitSkipped" => None,
                    _ => Some("Normal"),
                };
                if let Some(want) = want {
                    assert_eq!(kind, want, "{reason} on {}: {m}", pod.name);
                }
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "no {reason} event on {}: {:?}\n{}",
                pod.name,
                self.events(pod).await,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn engine(&self, scope: &str) -> (Engine, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let e = Engine::new(Store::open(&self.store).unwrap(), scope, tmp.path()).unwrap();
        (e, tmp)
    }

    async fn generations(&self, scope: &str, key: &str) -> Vec<u64> {
        let (e, _t) = self.engine(scope);
        e.generations(key).await.unwrap()
    }

    /// The files of the newest generation of (scope, key), restored into a scratch dir.
    async fn files(&self, scope: &str, key: &str) -> Vec<String> {
        let (e, t) = self.engine(scope);
        let dir = t.path().join("tree");
        e.restore(key, &[], &dir).await.unwrap();
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }
}

#[derive(Clone, Debug)]
struct PodInfo {
    ns: String,
    name: String,
    uid: String,
    node: String,
}

fn cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(volume_capability::MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
    }
}

fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

impl Drop for Cluster {
    /// Stops the plugins, then unmounts whatever they left under the test's root (a killed
    /// plugin leaves its mounts), deepest first, so the temp dir can go.
    fn drop(&mut self) {
        self.controller.kill();
        for p in self.nodes.values_mut() {
            p.kill();
        }
        let _ = cachevol::node::mount::unmount_all_under(self.root.path());
    }
}

// 1. Pod A on node 1 writes and succeeds: committed. Pod B on node 2 restores A's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_succeeded_pod_commits_and_another_node_restores_it() {
    let c = Cluster::start("k8s-succeeded", &["node-1", "node-2"]).await;
    let (vol, ctx) = c.claim("team-a", "npm", &[], &[]).await.unwrap();
    let a = c.pod("team-a", "build-a", "node-1").await;
    let t = c.publish(&a, &vol, &ctx).await.unwrap();
    assert!(c
        .event(&a, "CacheRestored")
        .await
        .contains("no snapshot yet"));
    common::write(&t.join("from-a"), b"A's dependency");
    c.succeed(&a).await;
    c.unpublish(&a, &vol).await;
    let m = c.event(&a, "CacheCommitted").await;
    assert!(m.contains("generation 1"), "{m}");
    assert_eq!(c.generations("team-a", "npm").await, [1]);

    let b = c.pod("team-a", "build-b", "node-2").await;
    let t = c.publish(&b, &vol, &ctx).await.unwrap();
    assert_eq!(std::fs::read(t.join("from-a")).unwrap(), b"A's dependency");
    let m = c.event(&b, "CacheRestored").await;
    assert!(m.contains("generation 1 of npm"), "{m}");
    // B changes nothing: its commit is CacheUnchanged and uploads nothing.
    c.succeed(&b).await;
    c.unpublish(&b, &vol).await;
    c.event(&b, "CacheUnchanged").await;
    assert_eq!(c.generations("team-a", "npm").await, [1]);

    // The same story in the node plugins' metrics.
    let (n1, n2) = (&c.nodes["node-1"], &c.nodes["node-2"]);
    assert_eq!(n1.http_get("/healthz").0, 200);
    assert_eq!(n1.http_get("/readyz").0, 200);
    let miss = r#"cachevol_restores_total{level="miss",outcome="restored"}"#;
    let hit = r#"cachevol_restores_total{level="key",outcome="restored"}"#;
    assert_eq!(n1.metric(miss), 1.0);
    assert_eq!(n2.metric(hit), 1.0);
    assert_eq!(
        n1.metric(r#"cachevol_commits_total{outcome="committed"}"#),
        1.0
    );
    assert_eq!(
        n2.metric(r#"cachevol_commits_total{outcome="unchanged"}"#),
        1.0
    );
    assert!(n1.metric("cachevol_commit_uploaded_bytes_total") > 0.0);
    assert_eq!(
        n2.metric(r#"cachevol_grpc_requests_total{code="Ok",method="NodePublishVolume"}"#),
        1.0
    );
}

// 2. Locked across the cluster: B waits for A's commit, then sees A's writes. Then a holder's
// node plugin dies: its lease expires, the next pod proceeds, and its late commit is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_caches_serialize_pods_across_nodes_and_fence_a_dead_holder() {
    let mut c = Cluster::start("k8s-locked", &["node-1", "node-2"]).await;
    let (vol, ctx) = c
        .claim("team-a", "cargo", &[("cachevol.dev/mode", "locked")], &[])
        .await
        .unwrap();
    let a = c.pod("team-a", "a", "node-1").await;
    let b = c.pod("team-a", "b", "node-2").await;
    let ta = c.publish(&a, &vol, &ctx).await.unwrap();
    let e = c.publish(&b, &vol, &ctx).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("pod team-a/a on node node-1"), "{e:?}");
    assert!(e.message().contains("number 1 in line"), "{e:?}");
    let m = c.event(&b, "CacheLockWaiting").await;
    assert!(m.contains("team-a/a"), "{m}");
    common::write(&ta.join("from-a"), b"a");
    // Still held while A runs: once A's node has renewed the Lease past its duration (it would
    // have expired by now without the renewals), B still finds it held.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leases = c.lock_leases().await;
        let spec = leases
            .first()
            .and_then(|l| l.spec.clone())
            .unwrap_or_default();
        let renewed_for = match (&spec.acquire_time, &spec.renew_time) {
            (Some(a), Some(r)) => r.0.as_millisecond() - a.0.as_millisecond(),
            _ => 0,
        };
        let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0)) * 1000;
        if duration > 0 && renewed_for > duration {
            assert_eq!(spec.holder_identity.as_deref(), Some(a.uid.as_str()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's Lease was never renewed past its duration: {spec:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        c.publish(&b, &vol, &ctx).await.unwrap_err().code(),
        Code::Unavailable
    );
    c.succeed(&a).await;
    c.unpublish(&a, &vol).await;
    let (tb, _) = c
        .publish_retrying(&b, &vol, &ctx, Duration::from_secs(30))
        .await;
    // B got the lock only once A's commit was in, so it sees A's writes.
    assert_eq!(std::fs::read(tb.join("from-a")).unwrap(), b"a");
    c.event(&a, "CacheCommitted").await;
    common::write(&tb.join("from-b"), b"b");
    c.succeed(&b).await;
    c.unpublish(&b, &vol).await;
    c.event(&b, "CacheCommitted").await;
    assert_eq!(c.files("team-a", "cargo").await, ["from-a", "from-b"]);

    // C holds the lock on node 1; node 1's plugin dies. D on node 2 gets it once it expires.
    let cpod = c.pod("team-a", "c", "node-1").await;
    let tc = c.publish(&cpod, &vol, &ctx).await.unwrap();
    common::write(&tc.join("from-c"), b"c");
    c.node("node-1").kill();
    let d = c.pod("team-a", "d", "node-2").await;
    let started = Instant::now();
    let (td, _) = c
        .publish_retrying(&d, &vol, &ctx, Duration::from_secs(30))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "D waited {:?}",
        started.elapsed()
    );
    assert!(!td.join("from-c").exists(), "C never committed");
    // Node 1 comes back; C finishes and its late commit is refused.
    c.node("node-1").spawn();
    c.succeed(&cpod).await;
    c.unpublish(&cpod, &vol).await;
    let m = c.event(&cpod, "CacheFenced").await;
    assert!(m.contains("lost its lock"), "{m}");
    common::write(&td.join("from-d"), b"d");
    c.succeed(&d).await;
    c.unpublish(&d, &vol).await;
    c.event(&d, "CacheCommitted").await;
    assert_eq!(
        c.files("team-a", "cargo").await,
        ["from-a", "from-b", "from-d"]
    );
}

// 3. Private: two concurrent pods both commit. replace → one wins whole; union → both files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_concurrent_commits_replace_or_union() {
    let c = Cluster::start("k8s-private", &["node-1", "node-2"]).await;
    for merge in ["replace", "union"] {
        let key = format!("pip-{merge}");
        let (vol, ctx) = c
            .claim(
                "team-a",
                &key,
                &[
                    ("cachevol.dev/mode", "private"),
                    ("cachevol.dev/merge", merge),
                ],
                &[],
            )
            .await
            .unwrap();
        let a = c.pod("team-a", &format!("{merge}-a"), "node-1").await;
        let b = c.pod("team-a", &format!("{merge}-b"), "node-2").await;
        let ta = c.publish(&a, &vol, &ctx).await.unwrap();
        let tb = c.publish(&b, &vol, &ctx).await.unwrap();
        common::write(&ta.join("a1"), b"a");
        common::write(&ta.join("a2"), b"a");
        common::write(&tb.join("b1"), b"b");
        assert!(
            !tb.join("a1").exists(),
            "private views never see each other"
        );
        c.succeed(&a).await;
        c.succeed(&b).await;
        c.unpublish(&a, &vol).await;
        c.unpublish(&b, &vol).await;
        c.event(&a, "CacheCommitted").await;
        c.event(&b, "CacheCommitted").await;
        assert_eq!(
            c.generations("team-a", &key).await,
            [1, 2],
            "both commits landed"
        );
        let files = c.files("team-a", &key).await;
        if merge == "replace" {
            assert!(
                files == ["a1", "a2"] || files == ["b1"],
                "one writer wins whole: {files:?}"
            );
        } else {
            assert_eq!(files, ["a1", "a2", "b1"]);
        }
    }
}

// 4. Shared: two pods on one node see each other's writes; one commit after both finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_pods_on_one_node_share_a_view_and_commit_once() {
    let c = Cluster::start("k8s-shared", &["node-1"]).await;
    let (vol, ctx) = c
        .claim("team-a", "go", &[("cachevol.dev/mode", "shared")], &[])
        .await
        .unwrap();
    let a = c.pod("team-a", "a", "node-1").await;
    let b = c.pod("team-a", "b", "node-1").await;
    let ta = c.publish(&a, &vol, &ctx).await.unwrap();
    let tb = c.publish(&b, &vol, &ctx).await.unwrap();
    common::write(&ta.join("from-a"), b"a");
    assert_eq!(std::fs::read(tb.join("from-a")).unwrap(), b"a");
    common::write(&tb.join("from-b"), b"b");
    c.succeed(&a).await;
    c.unpublish(&a, &vol).await;
    // A's ending had its chance: the agent saw it and then looked at the view (and declined,
    // as B still has it published).
    c.nodes["node-1"].wait_decided_after_ending(&a.uid).await;
    assert!(
        c.generations("team-a", "go").await.is_empty(),
        "B still runs"
    );
    c.succeed(&b).await;
    c.unpublish(&b, &vol).await;
    c.event(&b, "CacheCommitted").await;
    c.event(&a, "CacheCommitted").await;
    assert_eq!(c.generations("team-a", "go").await, [1]);
    assert_eq!(c.files("team-a", "go").await, ["from-a", "from-b"]);
}

// 5. A Failed pod with commit-on success uploads nothing; an OOM-killed pod with always neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_oom_killed_pods_upload_nothing() {
    let c = Cluster::start("k8s-failed", &["node-1"]).await;
    let (v1, ctx1) = c.claim("team-a", "on-success", &[], &[]).await.unwrap();
    let (v2, ctx2) = c
        .claim(
            "team-a",
            "always",
            &[("cachevol.dev/commit-on", "always")],
            &[],
        )
        .await
        .unwrap();
    let a = c.pod("team-a", "fails", "node-1").await;
    let t = c.publish(&a, &v1, &ctx1).await.unwrap();
    common::write(&t.join("x"), b"x");
    c.status(&a, json!({"phase": "Failed", "containerStatuses": [{"name": "build", "image": "busybox", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}))
        .await;
    c.unpublish(&a, &v1).await;
    let m = c.event(&a, "CacheCommitSkipped").await;
    assert!(m.contains("failed"), "{m}");

    let b = c.pod("team-a", "oom", "node-1").await;
    let t = c.publish(&b, &v2, &ctx2).await.unwrap();
    common::write(&t.join("x"), b"x");
    c.status(&b, json!({"phase": "Failed", "containerStatuses": [{"name": "build", "image": "busybox", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}))
        .await;
    c.unpublish(&b, &v2).await;
    let m = c.event(&b, "CacheCommitSkipped").await;
    assert!(m.contains("killed"), "{m}");

    // commit-on always does commit a plain failure.
    let f = c.pod("team-a", "fails-always", "node-1").await;
    let t = c.publish(&f, &v2, &ctx2).await.unwrap();
    common::write(&t.join("y"), b"y");
    c.status(&f, json!({"phase": "Failed"})).await;
    c.unpublish(&f, &v2).await;
    c.event(&f, "CacheCommitted").await;
    assert!(c.generations("team-a", "on-success").await.is_empty());
    assert_eq!(c.files("team-a", "always").await, ["y"]);
}

// 6. policy pull never uploads; restore-keys fall back and the commit goes to the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_never_uploads_and_restore_keys_fall_back() {
    let c = Cluster::start("k8s-pull", &["node-1", "node-2"]).await;
    let (main_vol, main_ctx) = c.claim("team-a", "main", &[], &[]).await.unwrap();
    let a = c.pod("team-a", "on-main", "node-1").await;
    let t = c.publish(&a, &main_vol, &main_ctx).await.unwrap();
    common::write(&t.join("m"), b"main");
    c.succeed(&a).await;
    c.unpublish(&a, &main_vol).await;
    c.event(&a, "CacheCommitted").await;

    let (pull_vol, pull_ctx) = c
        .claim(
            "team-a",
            "readonly",
            &[
                ("cachevol.dev/key", "main"),
                ("cachevol.dev/policy", "pull"),
            ],
            &[],
        )
        .await
        .unwrap();
    let p = c.pod("team-a", "puller", "node-2").await;
    let t = c.publish(&p, &pull_vol, &pull_ctx).await.unwrap();
    assert!(t.join("m").exists());
    common::write(&t.join("junk"), b"junk");
    c.succeed(&p).await;
    c.unpublish(&p, &pull_vol).await;
    assert!(c.event(&p, "CacheCommitSkipped").await.contains("pull"));
    assert_eq!(c.generations("team-a", "main").await, [1]);

    let (fvol, fctx) = c
        .claim(
            "team-a",
            "feature",
            &[("cachevol.dev/restore-keys", "nothing-here,main")],
            &[],
        )
        .await
        .unwrap();
    let f = c.pod("team-a", "feature-build", "node-2").await;
    let t = c.publish(&f, &fvol, &fctx).await.unwrap();
    assert_eq!(std::fs::read(t.join("m")).unwrap(), b"main");
    let m = c.event(&f, "CacheRestored").await;
    assert!(m.contains("restore key main"), "{m}");
    common::write(&t.join("f"), b"feature");
    c.succeed(&f).await;
    c.unpublish(&f, &fvol).await;
    c.event(&f, "CacheCommitted").await;
    assert_eq!(c.files("team-a", "feature").await, ["f", "m"]);
    assert_eq!(c.generations("team-a", "main").await, [1]);
}

// 7. The same claim name in two namespaces: two caches that never see each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_claim_in_two_namespaces_is_two_caches() {
    let c = Cluster::start("k8s-tenants", &["node-1"]).await;
    let (va, ctxa) = c.claim("team-a", "npm", &[], &[]).await.unwrap();
    let (vb, ctxb) = c.claim("team-b", "npm", &[], &[]).await.unwrap();
    assert_ne!(va, vb);
    let a = c.pod("team-a", "a", "node-1").await;
    let t = c.publish(&a, &va, &ctxa).await.unwrap();
    common::write(&t.join("secret-of-a"), b"a");
    c.succeed(&a).await;
    c.unpublish(&a, &va).await;
    c.event(&a, "CacheCommitted").await;
    let b = c.pod("team-b", "b", "node-1").await;
    let t = c.publish(&b, &vb, &ctxb).await.unwrap();
    assert!(
        ls(&t).is_empty(),
        "team-b sees nothing of team-a: {:?}",
        ls(&t)
    );
    assert!(c
        .event(&b, "CacheRestored")
        .await
        .contains("no snapshot yet"));
    assert!(c.generations("team-b", "npm").await.is_empty());
    assert_eq!(c.generations("team-a", "npm").await, [1]);
}

// 8. An invalid annotation fails CreateVolume with a message naming it.
// 9. An inline volume or an annotation that names another scope or a store is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_cannot_misconfigure_or_escape_their_namespace() {
    let c = Cluster::start("k8s-trust", &["node-1"]).await;
    let e = c
        .claim(
            "team-a",
            "bad-mode",
            &[("cachevol.dev/mode", "exclusive")],
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("cachevol.dev/mode"), "{e:?}");
    assert!(e.message().contains("shared, private, locked"), "{e:?}");
    for (i, (k, v)) in [
        ("cachevol.dev/scope", "team-b"),
        ("cachevol.dev/store", "s3://elsewhere/x"),
        ("cachevol.dev/key", "../team-b/npm"),
    ]
    .into_iter()
    .enumerate()
    {
        let e = c
            .claim("team-a", &format!("bad-{i}"), &[(k, v)], &[])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{k}: {e:?}");
        assert!(e.message().contains(k), "{k}: {e:?}");
    }
    // An administrator's StorageClass may widen the scope.
    let (_, ctx) = c
        .claim("team-a", "shared-npm", &[], &[("scope", "cluster")])
        .await
        .unwrap();
    assert_eq!(ctx["scope"], "cluster");

    // Inline volumes: the pod's namespace, the driver's store; scope and store refused.
    let p = c.pod("team-a", "inline", "node-1").await;
    let inline = |extra: &[(&str, &str)]| -> HashMap<String, String> {
        let mut m: HashMap<String, String> = [
            ("key", "npm-inline"),
            ("csi.storage.k8s.io/ephemeral", "true"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        m.remove("");
        m
    };
    for (k, v) in [("scope", "team-b"), ("store", "s3://elsewhere/x")] {
        let e = c
            .publish(&p, "csi-inline-1", &inline(&[(k, v)]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{k}: {e:?}");
        assert!(
            e.message().contains(&format!("volumeAttributes.{k}")),
            "{e:?}"
        );
    }
    let t = c.publish(&p, "csi-inline-1", &inline(&[])).await.unwrap();
    common::write(&t.join("i"), b"inline");
    c.succeed(&p).await;
    c.unpublish(&p, "csi-inline-1").await;
    c.event(&p, "CacheCommitted").await;
    assert_eq!(c.files("team-a", "npm-inline").await, ["i"]);
}

// Waiters are served in arrival order: a later pod never overtakes an earlier one, and a
// waiter that stops asking drops out of the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_waiters_are_served_in_arrival_order() {
    use cachevol::cluster::lease::{Acquire, Claimant, Leases};
    let api = ApiServer::start().await;
    let leases = Leases::new(api.client(), NS, Duration::from_secs(30));
    let who = |n: &str| Claimant {
        uid: format!("uid-{n}"),
        pod: format!("team-a/{n}"),
        node: "node-1".into(),
        volume: String::new(),
    };
    let (a, b, c) = (who("a"), who("b"), who("c"));
    let held = Acquire::Held { took_over: None };
    assert_eq!(leases.acquire("team-a", "npm", &a).await.unwrap(), held);
    let place = |r: Acquire| match r {
        Acquire::Waiting { place, holder } => {
            assert!(!holder.is_empty());
            place
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(place(leases.acquire("team-a", "npm", &b).await.unwrap()), 1);
    assert_eq!(place(leases.acquire("team-a", "npm", &c).await.unwrap()), 2);
    // Asking again keeps one's place; the holder asking again still holds it.
    assert_eq!(place(leases.acquire("team-a", "npm", &c).await.unwrap()), 2);
    assert_eq!(leases.acquire("team-a", "npm", &a).await.unwrap(), held);
    // Another key is another lock.
    assert_eq!(leases.acquire("team-a", "pip", &c).await.unwrap(), held);
    assert!(leases.renew("team-a", "npm", "uid-a").await.unwrap());
    assert!(!leases.renew("team-a", "npm", "uid-b").await.unwrap());
    leases.release("team-a", "npm", "uid-a").await.unwrap();
    // Free, but b came first: c keeps waiting, b gets it.
    assert_eq!(place(leases.acquire("team-a", "npm", &c).await.unwrap()), 2);
    assert_eq!(leases.acquire("team-a", "npm", &b).await.unwrap(), held);
    assert_eq!(place(leases.acquire("team-a", "npm", &c).await.unwrap()), 1);
    assert!(
        !leases.renew("team-a", "npm", "uid-a").await.unwrap(),
        "a is fenced"
    );
    leases.release("team-a", "npm", "uid-a").await.unwrap(); // not a's to release
    assert_eq!(place(leases.acquire("team-a", "npm", &c).await.unwrap()), 1);
    leases.release("team-a", "npm", "uid-b").await.unwrap();
    assert_eq!(leases.acquire("team-a", "npm", &c).await.unwrap(), held);
}

// The controller's GC runs only on the replica holding the leader Lease; when it dies, the
// standby takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_runs_on_the_leader_only_and_fails_over() {
    use cachevol::cluster::lease::Leases;
    let c = Cluster::start("k8s-gc", &[]).await;
    let (engine, tmp) = c.engine("team-a");
    let dir = tmp.path().join("src");
    let commit = |i: u32| {
        let (engine, dir) = (&engine, &dir);
        async move {
            common::write(&dir.join("f"), format!("v{i}").as_bytes());
            engine
                .commit("old", dir, &Default::default())
                .await
                .unwrap();
        }
    };
    for i in 0..3 {
        commit(i).await;
    }
    assert_eq!(c.generations("team-a", "old").await, [1, 2, 3]);

    // Another replica leads (this test renews its Lease): ours must not collect.
    let leases = Leases::new(c.client.clone(), NS, Duration::from_secs(2));
    assert!(leases
        .lead("cachevol-controller", "elsewhere")
        .await
        .unwrap());
    let renewing = {
        let leases = leases.clone();
        tokio::spawn(async move {
            loop {
                leases
                    .lead("cachevol-controller", "elsewhere")
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let gc = ["--gc-interval=1s", "--keep-last=1", "--grace=0s"];
    let mut one = c.plugin("controller-1", &gc);
    one.env.push(("POD_NAME".into(), "controller-1".into()));
    one.spawn();
    // Ours had its chance: the election answered that another replica leads, and a GC tick
    // came after that answer (and skipped).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = one.logs();
        let skipped_after_answer = logs
            .find("leader election: another replica leads")
            .is_some_and(|at| logs[at..].contains("gc: skipped"));
        if skipped_after_answer {
            break;
        }
        assert!(Instant::now() < deadline, "no skipped GC tick:\n{logs}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        c.generations("team-a", "old").await,
        [1, 2, 3],
        "a replica that does not lead collected:\n{}",
        one.logs()
    );
    // The other replica is gone: its Lease expires, ours takes it and collects.
    renewing.abort();
    let wait_for = |want: Vec<u64>, logs: String| {
        let c = &c;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.generations("team-a", "old").await != want {
                assert!(Instant::now() < deadline, "{logs}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    wait_for(vec![3], one.logs()).await;

    // A standby replica takes over when the leader dies.
    let mut two = c.plugin("controller-2", &gc);
    two.env.push(("POD_NAME".into(), "controller-2".into()));
    two.spawn();
    one.kill();
    for i in 3..5 {
        commit(i).await;
    }
    wait_for(vec![5], two.logs()).await;
    let holder = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(c.client.clone(), NS)
        .get("cachevol-controller")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(holder.as_deref(), Some("controller-2"));
}

// A store that cannot be reached never fails the pod: it starts from what the node has (here
// nothing) and a Warning Event says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_degrades_with_a_warning_event() {
    let Some(mut c) = Cluster::start_s3("k8s-degraded", &[]).await else {
        return;
    };
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut n = c.plugin("node-cut-off", &["--node-id=node-cut-off"]);
    n.env.push((
        "AWS_ENDPOINT_URL".into(),
        format!("http://127.0.0.1:{port}"),
    ));
    n.env.push(("CACHEVOL_STORE_TIMEOUT".into(), "1".into()));
    n.spawn();
    c.nodes.insert("node-cut-off".into(), n);
    let (vol, ctx) = c.claim("team-a", "npm", &[], &[]).await.unwrap();
    // A generation exists: an empty view then shows the node could not restore it.
    let (engine, tmp) = c.engine(&ctx["scope"]);
    common::write(&tmp.path().join("src/f"), b"v1");
    engine
        .commit(&ctx["key"], &tmp.path().join("src"), &Default::default())
        .await
        .unwrap();
    let p = c.pod("team-a", "offline", "node-cut-off").await;
    let started = Instant::now();
    let t = c.publish(&p, &vol, &ctx).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(ls(&t).is_empty());
    let m = c.event(&p, "CacheRestoreDegraded").await;
    assert!(m.contains("unreachable") && m.contains("empty"), "{m}");
}

// Level-triggered: what happened while the node plugin was down is decided after it comes
// back, from a fresh list and its own records: a pod that Succeeded meanwhile commits; a pod
// that was deleted meanwhile (its ending unknown) does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_happened_while_the_plugin_was_down_is_decided_after_it_restarts() {
    let mut c = Cluster::start("k8s-restart", &["node-1"]).await;
    let (va, ctxa) = c.claim("team-a", "done-meanwhile", &[], &[]).await.unwrap();
    let (vb, ctxb) = c.claim("team-a", "gone-meanwhile", &[], &[]).await.unwrap();
    let a = c.pod("team-a", "a", "node-1").await;
    let b = c.pod("team-a", "b", "node-1").await;
    let ta = c.publish(&a, &va, &ctxa).await.unwrap();
    let tb = c.publish(&b, &vb, &ctxb).await.unwrap();
    common::write(&ta.join("a"), b"a");
    common::write(&tb.join("b"), b"b");
    c.node("node-1").kill();
    c.succeed(&a).await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "team-a");
    pods.delete("b", &Default::default()).await.unwrap();
    c.node("node-1").spawn();
    // kubelet unmounts both once the plugin is back.
    c.unpublish(&a, &va).await;
    c.unpublish(&b, &vb).await;
    c.event(&a, "CacheCommitted").await;
    let m = c.event(&b, "CacheCommitSkipped").await;
    assert!(m.contains("deleted"), "{m}");
    assert_eq!(c.files("team-a", "done-meanwhile").await, ["a"]);
    assert!(c.generations("team-a", "gone-meanwhile").await.is_empty());
}

// A locked cache's Lease is renewed while a slow publish is still restoring (here: a store that
// accepts connections and never answers, so the restore waits out its timeout, longer than the
// Lease lasts): a pod on another node still finds it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_locked_publish_keeps_its_lease() {
    let Some(mut c) = Cluster::start_s3("k8s-slow-lock", &["node-1"]).await else {
        return;
    };
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut n = c.plugin("node-slow", &["--node-id=node-slow"]);
    n.env.push((
        "AWS_ENDPOINT_URL".into(),
        format!("http://127.0.0.1:{port}"),
    ));
    n.env.push(("CACHEVOL_STORE_TIMEOUT".into(), "5".into()));
    n.spawn();
    c.nodes.insert("node-slow".into(), n);
    let (vol, ctx) = c
        .claim("team-a", "tools", &[("cachevol.dev/mode", "locked")], &[])
        .await
        .unwrap();
    let a = c.pod("team-a", "slow", "node-slow").await;
    let b = c.pod("team-a", "next", "node-1").await;
    let started = Instant::now();
    let late = async {
        // The scenario is time passing, so this sleep stays: b asks only once a's Lease, had it
        // not been renewed, would have expired (its 2 s, plus a margin, counted from when the
        // Lease is seen held), while a's publish still waits for the silent store (5 s).
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.lock_leases().await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "a never took the lock\n{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        c.publish(&b, &vol, &ctx).await
    };
    let (ra, rb) = tokio::join!(c.publish(&a, &vol, &ctx), late);
    ra.unwrap();
    assert!(
        started.elapsed() > Duration::from_secs(4),
        "the publish should have waited for the silent store"
    );
    let err = rb.expect_err("b must not get a held lock");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("team-a/slow"), "{err:?}");
    drop(silent);
}

impl Cluster {
    /// Deletes a pod as GitLab's and Jenkins' executors do, while it runs.
    async fn delete_pod(&self, pod: &PodInfo) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.ns);
        pods.delete(&pod.name, &Default::default()).await.unwrap();
    }
}

const MARKER: &str = ".cachevol-commit";

// commit-on marker, with pods shaped as each CI system leaves them. GitLab: the job marks the
// cache, the runner deletes the pod while it runs → committed; no marker → skipped, and the next
// pod does not see those writes; the marker never shows up in a later view. actions-runner-
// controller: the runner pod Succeeded without a marker (the job failed) → skipped. Jenkins: the
// marker is written (post { success }), then the agent fails → committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_on_marker_follows_the_job_not_the_pod() {
    let c = Cluster::start("k8s-marker", &["node-1", "node-2"]).await;
    let (vol, ctx) = c
        .claim("ci", "gl", &[("cachevol.dev/commit-on", "marker")], &[])
        .await
        .unwrap();
    assert_eq!(ctx["commit-on"], "marker");

    // GitLab, a job that passed: after_script marks, then the pod is deleted while running.
    let g1 = c.pod("ci", "runner-g1", "node-1").await;
    let t = c.publish(&g1, &vol, &ctx).await.unwrap();
    common::write(&t.join("from-g1"), b"ok");
    common::write(&t.join(MARKER), b"");
    c.delete_pod(&g1).await;
    c.unpublish(&g1, &vol).await;
    let m = c.event(&g1, "CacheCommitted").await;
    assert!(m.contains("marked by the job"), "{m}");
    assert_eq!(c.generations("ci", "gl").await, [1]);
    assert_eq!(
        c.files("ci", "gl").await,
        ["from-g1"],
        "the marker is never committed"
    );

    // GitLab, a job that failed: no marker, deleted while running.
    let g2 = c.pod("ci", "runner-g2", "node-2").await;
    let t = c.publish(&g2, &vol, &ctx).await.unwrap();
    assert_eq!(ls(&t), ["from-g1"], "a view starts without a marker");
    common::write(&t.join("from-g2"), b"broken");
    c.delete_pod(&g2).await;
    c.unpublish(&g2, &vol).await;
    let m = c.event(&g2, "CacheCommitSkipped").await;
    assert!(m.contains(MARKER) && m.contains("no marker"), "{m}");

    // actions-runner-controller: the runner exits 0 after a failed job, no marker.
    let a = c.pod("ci", "arc-runner", "node-1").await;
    let t = c.publish(&a, &vol, &ctx).await.unwrap();
    assert_eq!(ls(&t), ["from-g1"], "g2's writes were not committed");
    common::write(&t.join("from-arc"), b"failed job");
    c.status(&a, json!({"phase": "Succeeded", "containerStatuses": [{"name": "build", "image": "busybox", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}))
        .await;
    c.unpublish(&a, &vol).await;
    c.event(&a, "CacheCommitSkipped").await;
    assert_eq!(c.generations("ci", "gl").await, [1]);

    // Jenkins: marked by post { success }, then the pod fails (exit 1).
    let j = c.pod("ci", "jenkins-agent", "node-2").await;
    let t = c.publish(&j, &vol, &ctx).await.unwrap();
    common::write(&t.join("from-jenkins"), b"ok");
    common::write(&t.join(MARKER), b"");
    c.status(&j, json!({"phase": "Failed", "containerStatuses": [{"name": "jnlp", "image": "busybox", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}))
        .await;
    c.unpublish(&j, &vol).await;
    assert!(c
        .event(&j, "CacheCommitted")
        .await
        .contains("marked by the job"));
    assert_eq!(c.files("ci", "gl").await, ["from-g1", "from-jenkins"]);

    // Under commit-on success, a pod deleted while running whose shell trapped TERM and exited
    // 0 (Succeeded, after the deletion) is not a success.
    let (svol, sctx) = c.claim("ci", "on-success", &[], &[]).await.unwrap();
    let s = c.pod("ci", "trapped", "node-1").await;
    let t = c.publish(&s, &svol, &sctx).await.unwrap();
    common::write(&t.join("half"), b"half");
    c.delete_pod(&s).await;
    c.unpublish(&s, &svol).await;
    assert!(c.event(&s, "CacheCommitSkipped").await.contains("deleted"));
    assert!(c.generations("ci", "on-success").await.is_empty());
}

// A shared view commits if the marker exists when the last of its pods leaves; a node plugin
// restarted between the marker and the unmount still commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_survives_a_restart_and_decides_a_shared_view() {
    let mut c = Cluster::start("k8s-marker-shared", &["node-1"]).await;
    let (vol, ctx) = c
        .claim(
            "ci",
            "shared",
            &[
                ("cachevol.dev/commit-on", "marker"),
                ("cachevol.dev/mode", "shared"),
            ],
            &[],
        )
        .await
        .unwrap();
    let p1 = c.pod("ci", "job-1", "node-1").await;
    let p2 = c.pod("ci", "job-2", "node-1").await;
    let t1 = c.publish(&p1, &vol, &ctx).await.unwrap();
    let t2 = c.publish(&p2, &vol, &ctx).await.unwrap();
    common::write(&t1.join("one"), b"1");
    c.delete_pod(&p1).await;
    c.unpublish(&p1, &vol).await;
    // job-2 marks the shared view, then the plugin restarts before kubelet unmounts it.
    common::write(&t2.join("two"), b"2");
    common::write(&t2.join(MARKER), b"");
    c.node("node-1").kill();
    c.delete_pod(&p2).await;
    c.node("node-1").spawn();
    c.unpublish(&p2, &vol).await;
    let m = c.event(&p2, "CacheCommitted").await;
    assert!(m.contains("marked by the job"), "{m}");
    assert_eq!(c.files("ci", "shared").await, ["one", "two"]);
    assert_eq!(c.generations("ci", "shared").await, [1], "committed once");
}

// A view restored from a restore key and left unchanged creates its own key (no chunk uploaded),
// so the next pod restores the key itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_key_fallback_creates_the_key_for_the_next_pod() {
    let c = Cluster::start("k8s-fallback", &["node-1", "node-2"]).await;
    let (mvol, mctx) = c.claim("ci", "npm-main", &[], &[]).await.unwrap();
    let m = c.pod("ci", "main-build", "node-1").await;
    let t = c.publish(&m, &mvol, &mctx).await.unwrap();
    common::write(&t.join("dep"), b"main's");
    c.succeed(&m).await;
    c.unpublish(&m, &mvol).await;
    c.event(&m, "CacheCommitted").await;

    let (fvol, fctx) = c
        .claim(
            "ci",
            "npm-feature",
            &[("cachevol.dev/restore-keys", "npm-main")],
            &[],
        )
        .await
        .unwrap();
    let f = c.pod("ci", "feature-1", "node-1").await;
    c.publish(&f, &fvol, &fctx).await.unwrap();
    assert!(c
        .event(&f, "CacheRestored")
        .await
        .contains("restore key npm-main"));
    c.succeed(&f).await;
    c.unpublish(&f, &fvol).await;
    let msg = c.event(&f, "CacheCommitted").await;
    assert!(
        msg.contains("created key npm-feature from restore key npm-main"),
        "{msg}"
    );
    assert_eq!(c.generations("ci", "npm-feature").await, [1]);

    for (name, node) in [("feature-2", "node-1"), ("feature-3", "node-2")] {
        let g = c.pod("ci", name, node).await;
        let t = c.publish(&g, &fvol, &fctx).await.unwrap();
        assert_eq!(std::fs::read(t.join("dep")).unwrap(), b"main's");
        let msg = c.event(&g, "CacheRestored").await;
        assert!(msg.contains("generation 1 of npm-feature"), "{name}: {msg}");
        c.succeed(&g).await;
        c.unpublish(&g, &fvol).await;
        c.event(&g, "CacheUnchanged").await;
    }
    assert_eq!(c.generations("ci", "npm-feature").await, [1]);
}

/// A TCP proxy to the S3 server that can be switched off (connections refused and cut), to play
/// a store that goes away and comes back.
struct Switch {
    port: u16,
    on: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Switch {
    async fn to(upstream: &str) -> Switch {
        use std::sync::atomic::Ordering;
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let on = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = on.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is cut
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                    }
                });
            }
        });
        Switch { port, on }
    }

    fn set(&self, on: bool) {
        self.on.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

// A view whose restore was degraded (the store was down at mount) never commits over newer
// data once the store is back: it may only create the generation after the one it started from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_view_never_commits_over_newer_data() {
    let Some(mut c) = Cluster::start_s3("k8s-degraded-commit", &[]).await else {
        return;
    };
    let endpoint = std::env::var("AWS_ENDPOINT_URL").expect("the S3 server's endpoint");
    let switch = Switch::to(&endpoint).await;
    let mut n = c.plugin("node-flaky", &["--node-id=node-flaky"]);
    n.env.push((
        "AWS_ENDPOINT_URL".into(),
        format!("http://127.0.0.1:{}", switch.port),
    ));
    n.env.push(("CACHEVOL_STORE_TIMEOUT".into(), "1".into()));
    n.spawn();
    c.nodes.insert("node-flaky".into(), n);
    let (vol, ctx) = c
        .claim(
            "team-a",
            "npm",
            &[("cachevol.dev/commit-on", "marker")],
            &[],
        )
        .await
        .unwrap();
    let (engine, tmp) = c.engine(&ctx["scope"]);
    common::write(&tmp.path().join("src/newer"), b"v1");
    engine
        .commit(&ctx["key"], &tmp.path().join("src"), &Default::default())
        .await
        .unwrap();

    switch.set(false);
    let p = c.pod("team-a", "offline", "node-flaky").await;
    let t = c.publish(&p, &vol, &ctx).await.unwrap();
    assert!(ls(&t).is_empty());
    c.event(&p, "CacheRestoreDegraded").await;
    common::write(&t.join("stale"), b"written without the newest snapshot");
    common::write(&t.join(MARKER), b"");
    switch.set(true);
    c.delete_pod(&p).await;
    c.unpublish(&p, &vol).await;
    let m = c.event(&p, "CacheFenced").await;
    assert!(m.contains("refused"), "{m}");
    assert_eq!(c.generations("team-a", "npm").await, [1]);
    assert_eq!(c.files("team-a", "npm").await, ["newer"]);
}

impl Cluster {
    /// A node plugin started with `extra` flags (and a metrics port), added to the cluster.
    fn add_node(&mut self, name: &str, extra: &[&str]) {
        let port = common::free_port();
        let mut args = vec![
            format!("--node-id={name}"),
            format!("--metrics-address=127.0.0.1:{port}"),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        let mut p = self.plugin(name, &args);
        p.metrics = Some(port);
        p.spawn();
        self.nodes.insert(name.to_string(), p);
    }

    /// Once (scope, key) has `n` generations in the store (polled every 50 ms): the earliest
    /// moment the last of them can have landed (the start of the last poll that did not see
    /// it), so that a latency measured from it is an upper bound.
    async fn committed(&self, scope: &str, key: &str, n: usize) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut not_yet = Instant::now();
        loop {
            let asked = Instant::now();
            if self.generations(scope, key).await.len() >= n {
                return not_yet;
            }
            not_yet = asked;
            assert!(
                Instant::now() < deadline,
                "no generation {n}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The lock Leases (by the label the troubleshooting command in docs/kubernetes.md uses).
    async fn lock_leases(&self) -> Vec<k8s_openapi::api::coordination::v1::Lease> {
        let api: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.client.clone(), NS);
        api.list(&kube::api::ListParams::default().labels("cachevol.dev/lock=true"))
            .await
            .unwrap()
            .items
    }
}

/// The waiters' pod names in the queue of a lock Lease.
fn queue(lease: &k8s_openapi::api::coordination::v1::Lease) -> Vec<String> {
    let w = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("cachevol.dev/waiters"))
        .cloned()
        .unwrap_or_else(|| "[]".into());
    serde_json::from_str::<Vec<serde_json::Value>>(&w)
        .unwrap()
        .iter()
        .map(|v| v["pod"].as_str().unwrap().to_string())
        .collect()
}

// Locked hand-off in seconds: waiters on other claims of the same cache, on other nodes, keep
// their NodePublishVolume open and each gets the cache within a second of the previous holder's
// commit, in queue order, without a single failed mount — where kubelet's retry backoff used to
// leave the cache idle for up to two minutes. The Lease is gone once the last holder is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_waiters_get_the_cache_within_a_second_of_the_holders_commit() {
    let mut c = Cluster::start("k8s-handoff", &[]).await;
    for n in ["node-a", "node-b", "node-c"] {
        c.add_node(n, &["--lock-wait=60s"]);
    }
    let mut vols = Vec::new();
    for claim in ["tools-a", "tools-b", "tools-c"] {
        vols.push(
            c.claim(
                "team-a",
                claim,
                &[
                    ("cachevol.dev/mode", "locked"),
                    ("cachevol.dev/key", "tools"),
                ],
                &[],
            )
            .await
            .unwrap(),
        );
    }
    let a = c.pod("team-a", "a", "node-a").await;
    let b = c.pod("team-a", "b", "node-b").await;
    let cp = c.pod("team-a", "c", "node-c").await;
    let ta = c.publish(&a, &vols[0].0, &vols[0].1).await.unwrap();
    common::write(&ta.join("from-a"), b"a");

    let kubelets: HashMap<String, Kubelet> = ["node-b", "node-c"]
        .iter()
        .map(|n| (n.to_string(), Kubelet::default()))
        .collect();
    let (c, kubelets) = (&c, &kubelets);
    let waiter_b = async {
        let (t, errors) = c
            .mount_by(
                &kubelets["node-b"],
                Shape::Persistent,
                &b,
                &vols[1].0,
                &vols[1].1,
            )
            .await;
        (t, errors, Instant::now())
    };
    let waiter_c = async {
        // After b is in line.
        c.event(&b, "CacheLockWaiting").await;
        let (t, errors) = c
            .mount_by(
                &kubelets["node-c"],
                Shape::Persistent,
                &cp,
                &vols[2].0,
                &vols[2].1,
            )
            .await;
        (t, errors, Instant::now())
    };
    let holders = async {
        // A runs several seconds while both wait, their calls open.
        c.event(&cp, "CacheLockWaiting").await;
        let lease = c.lock_leases().await;
        assert_eq!(queue(&lease[0]), ["team-a/b", "team-a/c"]);
        assert_eq!(c.nodes["node-b"].metric("cachevol_lock_waiting_pods"), 1.0);
        // A holder holding the lock (part of the scenario, not a wait for something): for two
        // Lease durations, so the waiters' open calls outlive the Lease as first written and
        // what keeps them (renewals, the queue) is exercised.
        tokio::time::sleep(Duration::from_secs(4)).await;
        c.succeed(&a).await;
        c.unpublish(&a, &vols[0].0).await;
        let a_committed = c.committed("team-a", "tools", 1).await;
        // b holds it now; it runs, then c's turn.
        let tb = c.target(&b, &vols[1].0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !tb.join("from-a").exists() {
            assert!(
                Instant::now() < deadline,
                "b never got the cache\n{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // b holds the lock past a Lease duration while c waits (part of the scenario).
        tokio::time::sleep(Duration::from_secs(3)).await;
        common::write(&tb.join("from-b"), b"b");
        c.succeed(&b).await;
        c.unpublish(&b, &vols[1].0).await;
        let b_committed = c.committed("team-a", "tools", 2).await;
        (a_committed, b_committed)
    };
    let ((tb, errors_b, b_got), (tc, errors_c, c_got), (a_committed, b_committed)) =
        tokio::join!(waiter_b, waiter_c, holders);
    eprintln!(
        "b got it {:?} after a's commit, c {:?} after b's commit",
        b_got.checked_duration_since(a_committed),
        c_got.checked_duration_since(b_committed)
    );
    // (That each got it after the commit shows in what it sees: the previous holder's files.)
    let handoff = |got: Instant, committed: Instant| got.saturating_duration_since(committed);
    assert!(
        handoff(b_got, a_committed) < Duration::from_secs(1),
        "b got the cache {:?} after a's commit",
        handoff(b_got, a_committed)
    );
    assert!(
        handoff(c_got, b_committed) < Duration::from_secs(1),
        "c got the cache {:?} after b's commit",
        handoff(c_got, b_committed)
    );
    assert!(b_got < c_got, "served in queue order");
    // Each waited in one open call: no failed mount to report.
    assert!(errors_b.is_empty(), "{errors_b:?}");
    assert!(errors_c.is_empty(), "{errors_c:?}");
    // b saw a's writes (checked while it held the cache), c sees both.
    let _ = tb;
    assert!(tc.join("from-a").exists());
    assert_eq!(
        std::fs::read(tc.join("from-b")).ok().as_deref(),
        Some(&b"b"[..]),
        "{:?}\n{}",
        c.events(&cp).await,
        c.logs()
    );
    assert_eq!(c.nodes["node-b"].metric("cachevol_lock_waiting_pods"), 0.0);
    // The last holder is done and nobody waits: no Lease is left behind.
    c.succeed(&cp).await;
    c.unpublish(&cp, &vols[2].0).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.lock_leases().await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the lock Lease stayed\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// A waiting publish is bounded and leaves gracefully: the bound answers UNAVAILABLE naming the
// holder (kubelet calls again, the pod keeps its place, also across a restart of its node
// plugin); a second call for the same volume while one waits is ABORTED and loses nothing; a
// waiter whose pod is deleted stops waiting at once and leaves the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_publish_is_bounded_keeps_its_place_and_stops_when_its_pod_is_deleted() {
    let mut c = Cluster::start("k8s-lock-wait", &[]).await;
    c.add_node("node-1", &["--lock-wait=60s"]);
    c.add_node("node-2", &["--lock-wait=2s"]);
    let (vol, ctx) = c
        .claim("team-a", "tools", &[("cachevol.dev/mode", "locked")], &[])
        .await
        .unwrap();
    let a = c.pod("team-a", "a", "node-1").await;
    let b = c.pod("team-a", "b", "node-2").await;
    let gone = c.pod("team-a", "gone", "node-1").await;
    // gone mounts the cache through a claim of its own: on a's node, a call for a's volume
    // would not wait (it would keep kubelet from unmounting a).
    let (gone_vol, gone_ctx) = c
        .claim(
            "team-a",
            "tools-gone",
            &[
                ("cachevol.dev/mode", "locked"),
                ("cachevol.dev/key", "tools"),
            ],
            &[],
        )
        .await
        .unwrap();
    c.publish(&a, &vol, &ctx).await.unwrap();

    // b: the bound passes → UNAVAILABLE after about 2 s; a retry while it waits is ABORTED.
    let started = Instant::now();
    let (first, second) = tokio::join!(c.publish(&b, &vol, &ctx), async {
        // Once the first call waits: b is in the Lease's queue.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c
            .lock_leases()
            .await
            .first()
            .map(queue)
            .unwrap_or_default()
            .contains(&"team-a/b".to_string())
        {
            assert!(Instant::now() < deadline, "b never queued\n{}", c.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.publish(&b, &vol, &ctx).await
    });
    let waited = started.elapsed();
    let e = first.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("pod team-a/a on node node-1"), "{e:?}");
    assert!(e.message().contains("number 1 in line"), "{e:?}");
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    assert_eq!(second.unwrap_err().code(), Code::Aborted);

    // `gone` queues behind b, in a call that stays open; its pod is deleted meanwhile.
    let deleted = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while c
            .lock_leases()
            .await
            .first()
            .map(queue)
            .unwrap_or_default()
            .len()
            < 2
        {
            assert!(Instant::now() < deadline, "gone never queued\n{}", c.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.delete_pod(&gone).await;
        Instant::now()
    };
    let (r, deleted_at) = tokio::join!(c.publish(&gone, &gone_vol, &gone_ctx), deleted);
    let e = r.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        deleted_at.elapsed() < Duration::from_secs(3),
        "the wait went on {:?} after the pod was deleted",
        deleted_at.elapsed()
    );
    assert_eq!(queue(&c.lock_leases().await[0]), ["team-a/b"]);

    // b's node plugin restarts; b asks again and is still first in line.
    c.node("node-2").kill();
    c.node("node-2").spawn();
    let e = c.publish(&b, &vol, &ctx).await.unwrap_err();
    assert!(e.message().contains("number 1 in line"), "{e:?}");
}

// Lock Leases clean up after themselves: released with nobody waiting, a Lease is deleted;
// with a waiter it stays; one a dead node left (expired, nobody waiting) is deleted by the
// controller's GC pass. The leader Lease is not a lock Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_leases_are_deleted_when_nobody_needs_them_and_the_leader_lease_is_not_one() {
    use cachevol::cluster::lease::{lock_name, Acquire, Claimant, Leases};
    use k8s_openapi::api::coordination::v1::Lease;
    let api = ApiServer::start().await;
    let leases = Leases::new(api.client(), NS, Duration::from_secs(1));
    let raw: Api<Lease> = Api::namespaced(api.client(), NS);
    let locks = || async {
        raw.list(&kube::api::ListParams::default().labels("cachevol.dev/lock=true"))
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|l| l.metadata.name.unwrap())
            .collect::<Vec<_>>()
    };
    let who = |n: &str| Claimant {
        uid: format!("uid-{n}"),
        pod: format!("team-a/{n}"),
        node: "node-1".into(),
        volume: String::new(),
    };
    let held = Acquire::Held { took_over: None };
    assert!(leases
        .lead("cachevol-controller", "replica-1")
        .await
        .unwrap());
    assert!(raw.get_opt("cachevol-controller").await.unwrap().is_some());
    assert!(locks().await.is_empty(), "{:?}", locks().await);
    // One an earlier version made, labelled as a lock, loses the label when next renewed.
    let legacy: Lease = serde_json::from_value(json!({
        "metadata": {"name": "legacy-leader", "namespace": NS,
                     "labels": {"cachevol.dev/lock": "true"}},
        "spec": {"holderIdentity": "replica-1"},
    }))
    .unwrap();
    raw.create(&PostParams::default(), &legacy).await.unwrap();
    assert!(leases.lead("legacy-leader", "replica-1").await.unwrap());
    assert!(locks().await.is_empty(), "{:?}", locks().await);

    // Released with nobody waiting: gone.
    assert_eq!(
        leases.acquire("team-a", "npm", &who("a")).await.unwrap(),
        held
    );
    assert_eq!(locks().await, [lock_name("team-a", "npm")]);
    assert!(leases.renew("team-a", "npm", "uid-a").await.unwrap());
    leases.release("team-a", "npm", "uid-a").await.unwrap();
    assert!(locks().await.is_empty());
    assert!(!leases.renew("team-a", "npm", "uid-a").await.unwrap());

    // With a waiter it stays until the waiter, served, releases too.
    assert_eq!(
        leases.acquire("team-a", "npm", &who("a")).await.unwrap(),
        held
    );
    assert!(matches!(
        leases.acquire("team-a", "npm", &who("b")).await.unwrap(),
        Acquire::Waiting { place: 1, .. }
    ));
    leases.release("team-a", "npm", "uid-a").await.unwrap();
    assert_eq!(locks().await.len(), 1);
    assert_eq!(
        leases.acquire("team-a", "npm", &who("b")).await.unwrap(),
        held
    );
    leases.release("team-a", "npm", "uid-b").await.unwrap();
    assert!(locks().await.is_empty());

    // A holder that died (never renewed, never released): its Lease is collected once it has
    // been free for the idle time, not before; a held one stays.
    let taken = Instant::now();
    assert_eq!(
        leases.acquire("team-a", "pip", &who("dead")).await.unwrap(),
        held
    );
    assert_eq!(
        leases.acquire("team-a", "go", &who("alive")).await.unwrap(),
        held
    );
    assert_eq!(leases.collect(Duration::from_secs(2)).await.unwrap(), 0);
    // The dead holder's Lease is collected once its idle time has passed (a lease expiring:
    // time is the scenario), the renewed one is not: collected by a pass no earlier than 2 s
    // after the dead one was taken, while the live one keeps renewing.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(leases.renew("team-a", "go", "uid-alive").await.unwrap());
        let collected = leases.collect(Duration::from_secs(2)).await.unwrap();
        if collected > 0 {
            assert_eq!(collected, 1);
            assert!(
                taken.elapsed() >= Duration::from_secs(2),
                "collected {:?} after it was taken",
                taken.elapsed()
            );
            break;
        }
        assert!(Instant::now() < deadline, "the dead holder's Lease stayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(locks().await, [lock_name("team-a", "go")]);
    assert!(raw.get_opt("cachevol-controller").await.unwrap().is_some());
}

// Benchmark, not a timed test (ignored; run it with
// `cargo test --test cluster -- --ignored --nocapture locked_handoff_latency`): hand-offs of a
// locked cache in every volume shape (one PVC on one node, one RWX PVC on two nodes, a claim
// per pod, inline volumes), all shapes at once, through kubelet's rule for volume operations
// (`Kubelet`: one operation per key, its backoff, its 2-minute timeout). Prints, per shape, the
// hand-off — the waiter's publish answered (its container can start) − the holder's job
// finished — as p50/p95/max, and the failed calls (each a FailedMount warning on a cluster).
// CACHEVOL_BENCH_HANDOFFS (default 6 per shape) and CACHEVOL_BENCH_HOLD_SECS (default 3) set
// the count and how long each holder runs; with CACHEVOL_BENCH_HOLD_MAX_SECS the holds spread
// evenly from HOLD to HOLD_MAX (in a shuffled order); CACHEVOL_BENCH_LOCK_WAIT sets the nodes'
// --lock-wait (default: the binary's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn locked_handoff_latency() {
    let mut c = Cluster::start("k8s-handoff-bench", &[]).await;
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env("CACHEVOL_BENCH_HANDOFFS", 6) as usize;
    let hold_min = env("CACHEVOL_BENCH_HOLD_SECS", 3);
    let hold_max = env("CACHEVOL_BENCH_HOLD_MAX_SECS", hold_min).max(hold_min);
    // Hand-off i holds for an evenly spread length, visited in a fixed shuffled order (7 is
    // coprime with any count not divisible by 7) so that long and short holds alternate.
    let hold_of = |i: usize| {
        let step = if n > 1 { (i * 7 + 3) % n } else { 0 };
        let span = (hold_max - hold_min) as f64 * step as f64 / (n.max(2) - 1) as f64;
        Duration::from_secs_f64(hold_min as f64 + span)
    };
    let lock_wait = std::env::var("CACHEVOL_BENCH_LOCK_WAIT")
        .ok()
        .map(|w| format!("--lock-wait={w}"));
    let node_args: Vec<&str> = lock_wait.iter().map(|s| s.as_str()).collect();
    c.add_node("node-1", &node_args);
    c.add_node("node-2", &node_args);
    c.namespace("team-a").await;
    let kubelets: HashMap<String, Kubelet> = ["node-1", "node-2"]
        .iter()
        .map(|n| (n.to_string(), Kubelet::default()))
        .collect();
    let c = &c;
    let shape_run = |(shape, nodes, keying): (&'static str, [&'static str; 2], Shape)| {
        let kubelets = &kubelets;
        async move {
            let mut pods = Vec::new();
            for i in 0..=n {
                pods.push(c.pod("team-a", &format!("{shape}-{i}"), nodes[i % 2]).await);
            }
            let key = format!("bench-{shape}");
            let vols = c.locked_volumes(shape, &key, &pods).await;
            let first = &pods[0];
            c.mount_by(
                &kubelets[&first.node],
                keying,
                first,
                &vols[0].0,
                &vols[0].1,
            )
            .await;
            let (mut handoffs, mut failed) = (Vec::new(), 0);
            for i in 0..n {
                let hold = hold_of(i);
                let (h, errors, _) = hand_off(
                    c,
                    kubelets,
                    keying,
                    (&pods[i], &vols[i]),
                    (&pods[i + 1], &vols[i + 1]),
                    hold,
                )
                .await;
                eprintln!(
                    "{shape} hand-off {i} (held {:.0}s): {:.3}s ({} failed calls)",
                    hold.as_secs_f64(),
                    h.as_secs_f64(),
                    errors.len()
                );
                handoffs.push(h.as_secs_f64());
                failed += errors.len();
            }
            (shape, handoffs, failed)
        }
    };
    let results = futures::future::join_all(LOCKED_SHAPES.map(shape_run)).await;
    println!(
        "locked hand-off, waiter's publish answered − holder finished, {n} hand-offs a shape, \
         holds {hold_min}-{hold_max} s, lock wait {}:",
        lock_wait.as_deref().unwrap_or("default")
    );
    println!("| shape | p50 | p95 | max | failed calls |");
    println!("|---|---:|---:|---:|---:|");
    for (shape, mut v, failed) in results {
        v.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
        println!(
            "| {shape} | {:.3} s | {:.3} s | {:.3} s | {failed} |",
            pct(0.5),
            pct(0.95),
            v[v.len() - 1]
        );
    }
}

/// How kubelet keys a volume's operations on a node (pkg/volume/util/nestedpendingoperations):
/// a CSI persistent volume counts as device-mountable, so its mounts and unmounts are keyed by
/// the volume alone, whatever the pod; an inline volume's by (volume, pod).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Persistent,
    Inline,
}

/// One kubelet operation in the table: whether one runs now, what it is, its backoff.
struct Op {
    pending: bool,
    name: &'static str,
    delay: Duration,
    failed_at: Option<Instant>,
}

/// Kubelet's rule for the volume operations of a node, as the tests play it: at most one
/// operation in flight per key; a failed one is not retried before its backoff (0.5 s after
/// the first failure, doubling, up to 2 min 2 s); a different operation on the key resets the
/// backoff; a success clears the key. The reconciler tries every pending operation each
/// 100 ms, in no fixed order (kubelet walks Go maps), so pods waiting on one key are called in
/// an order of chance.
#[derive(Default)]
struct Kubelet {
    ops: std::sync::Mutex<HashMap<String, Op>>,
}

const MOUNT: &str = "MountVolume";
const UNMOUNT: &str = "UnmountVolume";

impl Kubelet {
    fn key(pod: &PodInfo, vol: &str, shape: Shape) -> String {
        match shape {
            Shape::Persistent => format!("{}\0{vol}", pod.node),
            Shape::Inline => format!("{}\0{vol}\0{}", pod.node, pod.uid),
        }
    }

    /// Starts operation `name` on `key` if the rule allows it now.
    fn try_start(&self, key: &str, name: &'static str) -> bool {
        let mut ops = self.ops.lock().unwrap();
        let Some(op) = ops.get_mut(key) else {
            ops.insert(
                key.to_string(),
                Op {
                    pending: true,
                    name,
                    delay: Duration::ZERO,
                    failed_at: None,
                },
            );
            return true;
        };
        if op.pending {
            return false;
        }
        if op.name != name {
            op.delay = Duration::ZERO;
            op.failed_at = None;
        } else if op.failed_at.is_some_and(|t| t.elapsed() < op.delay) {
            return false;
        }
        op.name = name;
        op.pending = true;
        true
    }

    fn complete(&self, key: &str, ok: bool) {
        let mut ops = self.ops.lock().unwrap();
        if ok {
            ops.remove(key);
        } else if let Some(op) = ops.get_mut(key) {
            op.pending = false;
            op.delay = if op.delay.is_zero() {
                Duration::from_millis(500)
            } else {
                (op.delay * 2).min(Duration::from_secs(122))
            };
            op.failed_at = Some(Instant::now());
        }
    }

    /// One reconciler tick: 100 ms, and a random share of the next one (the order of chance).
    async fn tick() {
        use std::hash::{BuildHasher, Hasher};
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        tokio::time::sleep(Duration::from_millis(100 + r % 100)).await;
    }
}

impl Cluster {
    /// The pod's volume mounted as kubelet mounts it, under `kubelet`'s rule (kubelet's
    /// 2-minute call timeout included): the target and the failed calls.
    async fn mount_by(
        &self,
        kubelet: &Kubelet,
        shape: Shape,
        pod: &PodInfo,
        vol: &str,
        ctx: &HashMap<String, String>,
    ) -> (PathBuf, Vec<tonic::Status>) {
        let key = Kubelet::key(pod, vol, shape);
        let mut errors = Vec::new();
        loop {
            Kubelet::tick().await;
            if !kubelet.try_start(&key, MOUNT) {
                continue;
            }
            let r = tokio::time::timeout(Duration::from_secs(120), self.publish(pod, vol, ctx))
                .await
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("kubelet's timeout")));
            kubelet.complete(&key, r.is_ok());
            match r {
                Ok(t) => return (t, errors),
                Err(e) if e.code() != Code::InvalidArgument => errors.push(e),
                Err(e) => panic!("publish of {}: {e:?}\n{}", pod.name, self.logs()),
            }
        }
    }

    /// The pod's volume unmounted as kubelet does it, under `kubelet`'s rule.
    async fn unmount_by(&self, kubelet: &Kubelet, shape: Shape, pod: &PodInfo, vol: &str) {
        let key = Kubelet::key(pod, vol, shape);
        loop {
            if kubelet.try_start(&key, UNMOUNT) {
                self.unpublish(pod, vol).await;
                kubelet.complete(&key, true);
                return;
            }
            Kubelet::tick().await;
        }
    }

    /// Volumes of a locked cache `key` in `shape` for `pods`: one claim for all, a claim each,
    /// or an inline volume each. The (volume id, context) of each pod.
    async fn locked_volumes(
        &self,
        shape: &str,
        key: &str,
        pods: &[PodInfo],
    ) -> Vec<(String, HashMap<String, String>)> {
        let annotations = [("cachevol.dev/mode", "locked"), ("cachevol.dev/key", key)];
        match shape {
            "claim-per-pod" => {
                let mut v = Vec::new();
                for p in pods {
                    let claim = format!("{key}-{}", p.name);
                    v.push(self.claim(&p.ns, &claim, &annotations, &[]).await.unwrap());
                }
                v
            }
            "inline" => pods
                .iter()
                .map(|p| {
                    let ctx = [
                        ("csi.storage.k8s.io/ephemeral", "true"),
                        ("key", key),
                        ("mode", "locked"),
                    ]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                    (format!("csi-{}", p.uid), ctx)
                })
                .collect(),
            _ => {
                let one = self
                    .claim(&pods[0].ns, key, &annotations, &[])
                    .await
                    .unwrap();
                vec![one; pods.len()]
            }
        }
    }
}

/// The shapes of a locked cache that the hand-off must work in: (name, nodes of the holder and
/// of the waiter, kubelet's keying).
const LOCKED_SHAPES: [(&str, [&str; 2], Shape); 4] = [
    ("one-pvc-one-node", ["node-1", "node-1"], Shape::Persistent),
    ("one-pvc-two-nodes", ["node-1", "node-2"], Shape::Persistent),
    ("claim-per-pod", ["node-1", "node-1"], Shape::Persistent),
    ("inline", ["node-1", "node-1"], Shape::Inline),
];

/// One hand-off of a locked cache in a shape, through `kubelets` (one per node): the holder
/// has it; the waiter asks; the holder runs `hold`, writes a file and finishes; kubelet
/// unmounts it. The hand-off (waiter's publish answered − holder finished) and the waiter's
/// failed calls.
async fn hand_off(
    c: &Cluster,
    kubelets: &HashMap<String, Kubelet>,
    shape: Shape,
    (holder, holder_vol): (&PodInfo, &(String, HashMap<String, String>)),
    (waiter, waiter_vol): (&PodInfo, &(String, HashMap<String, String>)),
    hold: Duration,
) -> (Duration, Vec<tonic::Status>, PathBuf) {
    let kubelet = |p: &PodInfo| &kubelets[&p.node];
    let wait = async {
        let (t, errors) = c
            .mount_by(kubelet(waiter), shape, waiter, &waiter_vol.0, &waiter_vol.1)
            .await;
        (t, errors, Instant::now())
    };
    let run = async {
        // The holder's job (the scenario's time, not a wait for something).
        tokio::time::sleep(hold).await;
        let t = c.target(holder, &holder_vol.0);
        common::write(&t.join(format!("from-{}", holder.name)), b"x");
        let finished = Instant::now();
        c.succeed(holder).await;
        c.unmount_by(kubelet(holder), shape, holder, &holder_vol.0)
            .await;
        finished
    };
    let ((t, errors, got), finished) = tokio::join!(wait, run);
    (got.saturating_duration_since(finished), errors, t)
}

// Kubelet's rule, played for every shape of a locked cache: a waiter never keeps kubelet from
// unmounting the holder (on one PVC on one node a held-open call used to, until --lock-wait
// broke the deadlock), and the per-pod shapes keep waiting in one open call, without a failed
// mount. The nodes' --lock-wait is 60 s: a deadlock shows as a hand-off of about a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_hand_off_follows_kubelets_rule_in_every_volume_shape() {
    let mut c = Cluster::start("k8s-shapes", &[]).await;
    for n in ["node-1", "node-2"] {
        c.add_node(n, &["--lock-wait=60s"]);
    }
    let kubelets: HashMap<String, Kubelet> = ["node-1", "node-2"]
        .iter()
        .map(|n| (n.to_string(), Kubelet::default()))
        .collect();
    // Made once: the shapes below run at once, and each would make it.
    c.namespace("team-a").await;
    let c = &c;
    let run = |(shape, nodes, keying): (&'static str, [&'static str; 2], Shape)| {
        let kubelets = &kubelets;
        async move {
            let holder = c.pod("team-a", &format!("{shape}-h"), nodes[0]).await;
            let waiter = c.pod("team-a", &format!("{shape}-w"), nodes[1]).await;
            let vols = c
                .locked_volumes(shape, shape, &[holder.clone(), waiter.clone()])
                .await;
            c.mount_by(&kubelets[nodes[0]], keying, &holder, &vols[0].0, &vols[0].1)
                .await;
            let (handoff, errors, t) = hand_off(
                c,
                kubelets,
                keying,
                (&holder, &vols[0]),
                (&waiter, &vols[1]),
                Duration::from_secs(4),
            )
            .await;
            eprintln!(
                "{shape}: hand-off {handoff:?}, {} failed calls",
                errors.len()
            );
            assert!(t.join(format!("from-{}", holder.name)).exists(), "{shape}");
            (shape, handoff, errors)
        }
    };
    let results = futures::future::join_all(LOCKED_SHAPES.map(run)).await;
    for (shape, handoff, errors) in results {
        assert!(
            handoff < Duration::from_secs(15),
            "{shape}: the waiter started {handoff:?} after the holder finished: {errors:?}\n{}",
            c.logs()
        );
        // Where kubelet does not serialize the waiter with the holder, it waits in one call.
        if shape != "one-pvc-one-node" {
            assert!(errors.is_empty(), "{shape}: {errors:?}");
        }
    }
}

// Five pods on one locked PVC on one node: each gets the cache after the one before it has
// finished and committed (it sees every earlier pod's file), never two at once, each within
// seconds of the previous one finishing — never after a --lock-wait. Kubelet picks which of the
// waiting pods it calls; the one it calls takes the first place in the Lease's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_of_five_on_one_pvc_on_one_node_hands_over_one_by_one() {
    let mut c = Cluster::start("k8s-queue5", &[]).await;
    c.add_node("node-1", &["--lock-wait=60s"]);
    let kubelets: HashMap<String, Kubelet> = [("node-1".to_string(), Kubelet::default())].into();
    let c = &c;
    let mut pods = Vec::new();
    for i in 0..5 {
        pods.push(c.pod("team-a", &format!("job-{i}"), "node-1").await);
    }
    let vols = c.locked_volumes("one-pvc", "queue", &pods).await;
    let (vol, ctx) = &vols[0];
    let (target, _) = c
        .mount_by(&kubelets["node-1"], Shape::Persistent, &pods[0], vol, ctx)
        .await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let waiters = futures::future::join_all(pods[1..].iter().map(|p| {
        let (tx, kubelets) = (tx.clone(), &kubelets);
        async move {
            let (t, errors) = c
                .mount_by(&kubelets["node-1"], Shape::Persistent, p, vol, ctx)
                .await;
            tx.send((p.clone(), t, errors.len(), Instant::now()))
                .unwrap();
        }
    }));
    let holders = async {
        let (mut holder, mut target) = (pods[0].clone(), target);
        let mut seen = vec![holder.name.clone()];
        for _ in 1..5 {
            // The holder's job (the scenario's time).
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert!(rx.try_recv().is_err(), "two pods had the cache at once");
            common::write(&target.join(format!("from-{}", holder.name)), b"x");
            let finished = Instant::now();
            c.succeed(&holder).await;
            c.unmount_by(&kubelets["node-1"], Shape::Persistent, &holder, vol)
                .await;
            let (next, t, failed, got) = tokio::time::timeout(Duration::from_secs(90), rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("nobody got the cache after {}\n{}", holder.name, c.logs())
                })
                .unwrap();
            let handoff = got.saturating_duration_since(finished);
            eprintln!(
                "{} → {}: {handoff:?} ({failed} failed calls)",
                holder.name, next.name
            );
            assert!(
                handoff < Duration::from_secs(15),
                "{} got the cache {handoff:?} after {} finished\n{}",
                next.name,
                holder.name,
                c.logs()
            );
            for earlier in &seen {
                assert!(
                    t.join(format!("from-{earlier}")).exists(),
                    "{} misses {earlier}",
                    next.name
                );
            }
            seen.push(next.name.clone());
            (holder, target) = (next, t);
        }
        common::write(&target.join(format!("from-{}", holder.name)), b"x");
        c.succeed(&holder).await;
        c.unmount_by(&kubelets["node-1"], Shape::Persistent, &holder, vol)
            .await;
        seen
    };
    let (_, served) = tokio::join!(waiters, holders);
    let mut sorted = served.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["job-0", "job-1", "job-2", "job-3", "job-4"],
        "{served:?}"
    );
    c.committed("team-a", "queue", 5).await;
}

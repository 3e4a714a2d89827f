//! A Kubernetes API server stand-in for tests: real HTTP/1.1 and JSON on 127.0.0.1, so the
//! unmodified `kube::Client` (Api, `kube::runtime::watcher`, discovery), other processes given a
//! kubeconfig file, and client-go programs can talk to it as to kube-apiserver.
//!
//! Objects are kept generically as `serde_json::Value`, one store for every resource of the
//! static table [`RESOURCES`], with one global, monotonically increasing resourceVersion and a
//! history of the last [`HISTORY`] changes that watches replay from.
//!
//! The server runs on its own thread with its own tokio runtime, so a test that blocks its own
//! thread (waiting for a child process, say) does not stall the server. It stops when the
//! [`ApiServer`] handle is dropped.
//!
//! What it does, as kube-apiserver does: get, list, watch (with history replay, bookmarks,
//! `sendInitialEvents`, selector transitions sent as ADDED/DELETED, `timeoutSeconds`), create
//! (uid, resourceVersion, creationTimestamp, generation, `generateName`), replace with optimistic
//! concurrency, the status subresource, merge / strategic (as merge) / JSON / apply (as merge,
//! creating) patches, delete with preconditions and finalizers, delete collection, `dryRun`,
//! metadata-only (`PartialObjectMetadata`) answers, and discovery. A watch from a
//! resourceVersion older than the history is answered as the real server does: 200, then one
//! `ERROR` event carrying a 410 Expired Status (kube's watcher re-lists on that event; an HTTP
//! 410 at the start of a watch would have it retry the same resourceVersion forever).
//!
//! Outages: [`ApiServer::set_down`] drops connections (transport errors: what makes kube calls
//! fail), [`ApiServer::set_unavailable`] answers 503 (which kube's default client retries with
//! backoff), [`ApiServer::compact`] forgets the watch history and cuts live watches.
//!
//! What it does not do: authentication or authorization (every request is allowed), admission,
//! defaulting beyond `status.phase` (and dropping a client's status on create, except for
//! nodes), validation of object contents and immutable fields, strategic-merge list semantics
//! (a strategic merge patch is a JSON merge patch), server-side apply field ownership (an apply
//! patch is a JSON merge patch that may create), YAML or protobuf bodies, `Table` output, paging
//! (`limit` and `continue` are ignored: a list is one page with no continue token),
//! `resourceVersion`/`resourceVersionMatch` on a list (always the latest state), garbage
//! collection through ownerReferences, graceful pod deletion (a pod without finalizers is
//! removed at once), namespace existence checks and namespace cascade deletion, subresources
//! other than `status`, the legacy `/watch/` paths, and aggregated discovery (the legacy
//! documents are served as `application/json`). `/openapi/v2` and `/openapi/v3` answer 404; how
//! a client-go program (Helm) copes with that is not verified here. Field selectors accept any
//! dotted path of the object (a missing field reads as ""), not only the ones the real server
//! supports per resource.
//!
//! Test code installs the process's rustls crypto provider before it makes a `kube::Client`
//! ([`install_crypto_provider`], as cachevol's main does); [`ApiServer::client`] calls it.
//!
//! Set `STANDIN_LOG=1` to have every request printed on stderr.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use serde_json::{json, Map, Value};

/// How many changes watches can replay; a watch from before them gets 410 Expired.
pub const HISTORY: usize = 10_000;

/// How long a watch lasts when the request names no `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// How often a watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(30);

/// The resourceVersion of an empty server (nonzero: "0" means "any" to clients).
const FIRST_RV: u64 = 100;

/// One kind of object the stand-in serves.
#[derive(Debug)]
pub struct ResourceType {
    /// API group, "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural resource name, as in URLs.
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Has a `status` subresource: status changes only through it.
    pub status: bool,
}

impl ResourceType {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `leases.coordination.k8s.io`, as in the real server's messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const fn rt(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
) -> ResourceType {
    ResourceType {
        group,
        version,
        plural,
        kind,
        namespaced,
        status,
    }
}

/// Every resource the stand-in serves. Anything else answers 404.
pub const RESOURCES: &[ResourceType] = &[
    rt("", "v1", "pods", "Pod", true, true),
    rt("", "v1", "events", "Event", true, false),
    rt(
        "",
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        true,
        true,
    ),
    rt(
        "",
        "v1",
        "persistentvolumes",
        "PersistentVolume",
        false,
        true,
    ),
    rt("", "v1", "namespaces", "Namespace", false, true),
    rt("", "v1", "secrets", "Secret", true, false),
    rt("", "v1", "configmaps", "ConfigMap", true, false),
    rt("", "v1", "services", "Service", true, true),
    rt("", "v1", "serviceaccounts", "ServiceAccount", true, false),
    rt("", "v1", "nodes", "Node", false, true),
    rt("coordination.k8s.io", "v1", "leases", "Lease", true, false),
    rt("events.k8s.io", "v1", "events", "Event", true, false),
    rt(
        "storage.k8s.io",
        "v1",
        "storageclasses",
        "StorageClass",
        false,
        false,
    ),
    rt(
        "storage.k8s.io",
        "v1",
        "csidrivers",
        "CSIDriver",
        false,
        false,
    ),
    rt("storage.k8s.io", "v1", "csinodes", "CSINode", false, false),
    rt("apps", "v1", "daemonsets", "DaemonSet", true, true),
    rt("apps", "v1", "deployments", "Deployment", true, true),
    rt(
        "rbac.authorization.k8s.io",
        "v1",
        "roles",
        "Role",
        true,
        false,
    ),
    rt(
        "rbac.authorization.k8s.io",
        "v1",
        "rolebindings",
        "RoleBinding",
        true,
        false,
    ),
    rt(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterroles",
        "ClusterRole",
        false,
        false,
    ),
    rt(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
        false,
    ),
    rt(
        "policy",
        "v1",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
        true,
        true,
    ),
    rt(
        "monitoring.coreos.com",
        "v1",
        "servicemonitors",
        "ServiceMonitor",
        true,
        false,
    ),
];

/// Namespaces every fresh server has, as a new cluster does.
const INITIAL_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

fn find_resource(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// `pods`, `events` (the core one) or `events.events.k8s.io` (plural.group, as kubectl).
fn resource_by_name(name: &str) -> Option<usize> {
    match name.split_once('.') {
        Some((plural, group)) => RESOURCES
            .iter()
            .position(|r| r.plural == plural && r.group == group),
        None => RESOURCES.iter().position(|r| r.plural == name),
    }
}

/// Installs aws-lc-rs as rustls's process-wide crypto provider if none is yet, as cachevol's
/// main does: should a build ever enable a second provider, rustls could not choose by itself
/// and building a `kube::Client` would panic. Call this before `Client::try_default` and the
/// like in test code ([`ApiServer::client`] does).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

// ----------------------------------------------------------------------------------------------
// The handle

/// A running stand-in; dropping it stops the server.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Binds 127.0.0.1 on a free port and serves on a thread of its own.
    pub async fn start() -> ApiServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared::new(addr));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = shared.clone();
        let thread = std::thread::Builder::new()
            .name("apiserver-standin".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("stand-in runtime");
                runtime.block_on(accept_loop(server, listener, rx));
            })
            .expect("spawn the stand-in's thread");
        ApiServer {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client of this server (no TLS, no auth, default namespace "default"). Needs a tokio
    /// runtime context, as every `kube::Client` does.
    pub fn client(&self) -> kube::Client {
        install_crypto_provider();
        let mut config = kube::Config::new(self.url().parse().expect("server URL"));
        config.default_namespace = "default".into();
        kube::Client::try_from(config).expect("a client for the stand-in")
    }

    /// The text of a kubeconfig for this server (YAML): cluster, a dummy token user and a
    /// current context with namespace "default".
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: standin
  cluster:
    server: {}
    insecure-skip-tls-verify: true
users:
- name: standin
  user:
    token: standin-token
contexts:
- name: standin
  context:
    cluster: standin
    user: standin
    namespace: default
current-context: standin
preferences: {{}}
",
            self.url()
        )
    }

    /// Writes [`Self::kubeconfig`] to `path`, for processes started with `KUBECONFIG=path`.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// While down, the server is unreachable as a crashed or partitioned kube-apiserver: new
    /// connections are closed at once, requests on open ones get no answer (their connection is
    /// closed) and live watch streams end, so clients see transport errors. Up again, the same
    /// address serves as before, with the objects kept.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.shared.end_watches();
        }
    }

    /// While unavailable, every request is answered 503 ServiceUnavailable (a Status), as by a
    /// load balancer with no healthy backend, and live watch streams end. Note that kube's
    /// default client (`Config::default_retry`) retries 429/503/504 with exponential backoff
    /// (up to 15 times, from 5 ms to 1000 s), so its calls stall rather than fail:
    /// [`Self::set_down`] is what makes calls fail.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
        if unavailable {
            self.shared.end_watches();
        }
    }

    /// Forgets the whole watch history (as an etcd compaction) and ends live watch streams:
    /// a watch resumed from any resourceVersion handed out before gets 410 Expired, so a
    /// `kube::runtime::watcher` must list again.
    pub fn compact(&self) {
        {
            let mut store = self.shared.store();
            store.rv += 1;
            store.history.clear();
            store.oldest_watchable = store.rv;
            store.epoch += 1;
        }
        self.shared.wake();
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Every object of a resource (`pods`, `leases`, `events` for core events,
    /// `events.events.k8s.io`), in namespace/name order. Panics on an unknown resource.
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        let res = resource_by_name(resource).unwrap_or_else(|| panic!("unknown {resource}"));
        self.shared
            .store()
            .range(res)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// One object; `namespace` is ignored for cluster-scoped resources.
    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = resource_by_name(resource).unwrap_or_else(|| panic!("unknown {resource}"));
        let ns = if RESOURCES[res].namespaced {
            namespace
        } else {
            ""
        };
        self.shared
            .store()
            .objects
            .get(&(res, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// The requests received so far (the last 10,000), as `METHOD /path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ----------------------------------------------------------------------------------------------
// State

type Key = (usize, String, String);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One entry of the watch history.
struct Change {
    rv: u64,
    res: usize,
    ns: String,
    kind: ChangeKind,
    /// The object before a modification (for selector transitions).
    old: Option<Value>,
    /// The object after the change; for a deletion, its last state.
    new: Value,
}

struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    /// A watch from a resourceVersion below this one is answered 410 Expired.
    oldest_watchable: u64,
    /// Bumped to end every live watch stream.
    epoch: u64,
}

struct Shared {
    addr: SocketAddr,
    store: Mutex<Store>,
    /// Carries the resourceVersion after each change; watch streams wait on it.
    changed: tokio::sync::watch::Sender<u64>,
    /// Connections are dropped.
    down: AtomicBool,
    /// Requests are answered 503.
    unavailable: AtomicBool,
    log: bool,
    requests: Mutex<VecDeque<String>>,
}

impl Shared {
    fn new(addr: SocketAddr) -> Shared {
        let mut store = Store {
            rv: FIRST_RV,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            oldest_watchable: FIRST_RV,
            epoch: 0,
        };
        let ns = resource_by_name("namespaces").expect("namespaces in the table");
        for name in INITIAL_NAMESPACES {
            let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            store
                .create(ns, None, body, false)
                .expect("initial namespace");
        }
        // The initial objects are the state, not replayable history.
        store.history.clear();
        store.oldest_watchable = store.rv;
        Shared {
            addr,
            store: Mutex::new(store),
            changed: tokio::sync::watch::channel(0).0,
            down: AtomicBool::new(false),
            unavailable: AtomicBool::new(false),
            log: std::env::var("STANDIN_LOG").is_ok_and(|v| !v.is_empty() && v != "0"),
            requests: Mutex::new(VecDeque::new()),
        }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn end_watches(&self) {
        self.store().epoch += 1;
        self.wake();
    }

    fn wake(&self) {
        let rv = self.store().rv;
        self.changed.send_replace(rv);
    }

    fn note_request(&self, line: String) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if requests.len() >= 10_000 {
            requests.pop_front();
        }
        requests.push_back(line);
    }
}

// ----------------------------------------------------------------------------------------------
// Errors

/// A failure, answered as a metav1 Status.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn about(mut self, res: usize, name: &str) -> ApiError {
        let r = &RESOURCES[res];
        self.details = Some(json!({"name": name, "group": r.group, "kind": r.plural}));
        self
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(422, "Invalid", message)
    }

    fn no_route() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    fn not_found(res: usize, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", RESOURCES[res].qualified()),
        )
        .about(res, name)
    }

    fn conflict(res: usize, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                RESOURCES[res].qualified()
            ),
        )
        .about(res, name)
    }

    fn modified(res: usize, name: &str) -> ApiError {
        ApiError::conflict(
            res,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    fn to_value(&self) -> Value {
        let mut v = status_value(self.code, self.reason, &self.message);
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }
}

fn status_value(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

// ----------------------------------------------------------------------------------------------
// Object helpers

fn meta(v: &Value) -> &Value {
    &v["metadata"]
}

fn meta_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v["metadata"][key].as_str()
}

/// The metadata map of an object, made an object if it was not.
fn meta_mut(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    let obj = v.as_object_mut().expect("an object");
    let m = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !m.is_object() {
        *m = Value::Object(Map::new());
    }
    m.as_object_mut().expect("metadata is an object")
}

fn has_finalizers(v: &Value) -> bool {
    v["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

/// The object without metadata and status: what a change of bumps `generation`.
fn spec_part(v: &Value) -> Value {
    let mut c = v.clone();
    if let Some(o) = c.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
    }
    c
}

fn now_rfc3339() -> String {
    use k8s_openapi::jiff::Timestamp;
    let secs = Timestamp::now().as_second();
    Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

fn new_uid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// Five characters as the real server appends to `generateName`.
fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = random_u64();
    (0..5)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
            x /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// What the real server sets on create besides metadata.
fn apply_create_defaults(r: &ResourceType, v: &mut Value) {
    // The real server drops a client's status on create for these (PrepareForCreate); nodes keep
    // theirs (kubelet registers with one).
    if r.status && r.kind != "Node" {
        if let Some(o) = v.as_object_mut() {
            o.remove("status");
        }
    }
    let phase = match r.kind {
        "Pod" | "PersistentVolumeClaim" | "PersistentVolume" if r.group.is_empty() => "Pending",
        "Namespace" => "Active",
        _ => return,
    };
    if !v["status"].is_object() {
        v["status"] = json!({});
    }
    if v["status"]["phase"].as_str().is_none_or(str::is_empty) {
        v["status"]["phase"] = json!(phase);
    }
}

// ----------------------------------------------------------------------------------------------
// Patches

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Splits a JSON pointer into its parent pointer and its last token (unescaped).
fn split_pointer(path: &str) -> Result<(&str, String), String> {
    if !path.starts_with('/') {
        return Err(format!("invalid JSON pointer {path:?}"));
    }
    let cut = path.rfind('/').expect("starts with /");
    let last = path[cut + 1..].replace("~1", "/").replace("~0", "~");
    Ok((&path[..cut], last))
}

fn array_index(token: &str, len: usize, allow_end: bool) -> Result<usize, String> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    let i: usize = token
        .parse()
        .map_err(|_| format!("invalid array index {token:?}"))?;
    let max = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    if i > max || (!allow_end && len == 0) {
        return Err(format!("array index {i} out of bounds"));
    }
    Ok(i)
}

fn pointer_add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(o)) => {
            o.insert(last, value);
            Ok(())
        }
        Some(Value::Array(a)) => {
            let i = array_index(&last, a.len(), true)?;
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("path {path:?} has no parent to add to")),
    }
}

fn pointer_remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(o)) => o
            .remove(&last)
            .ok_or_else(|| format!("path {path:?} does not exist")),
        Some(Value::Array(a)) => {
            let i = array_index(&last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(format!("path {path:?} does not exist")),
    }
}

/// RFC 6902 JSON patch: add, remove, replace, move, copy, test.
fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch is an array")?;
    for op in ops {
        let path = op["path"].as_str().ok_or("a JSON patch op needs a path")?;
        let value = || op.get("value").cloned().ok_or("the op needs a value");
        let from = || op["from"].as_str().ok_or("the op needs from");
        match op["op"].as_str().unwrap_or("") {
            "add" => pointer_add(doc, path, value()?)?,
            "remove" => {
                pointer_remove(doc, path)?;
            }
            "replace" => {
                let v = value()?;
                match doc.pointer_mut(path) {
                    Some(slot) => *slot = v,
                    None => return Err(format!("path {path:?} does not exist")),
                }
            }
            "move" => {
                let v = pointer_remove(doc, from()?)?;
                pointer_add(doc, path, v)?;
            }
            "copy" => {
                let v = doc
                    .pointer(from()?)
                    .cloned()
                    .ok_or("copy from a path that does not exist")?;
                pointer_add(doc, path, v)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value()?) {
                    return Err(format!("test operation failed at {path:?}"));
                }
            }
            other => return Err(format!("unknown JSON patch op {other:?}")),
        }
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// Selectors

#[derive(Debug)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug)]
enum FieldReq {
    Eq(String, String),
    Ne(String, String),
}

#[derive(Debug, Default)]
struct Selectors {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

/// Splits at commas outside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    let bad = |t: &str| format!("unable to parse requirement: {t:?}");
    let key_ok = |k: &str| !k.is_empty() && !k.contains(char::is_whitespace);
    let mut reqs = Vec::new();
    for t in split_terms(s) {
        let req = if let Some(k) = t.strip_prefix('!') {
            LabelReq::NotExists(k.trim().to_string())
        } else if let Some(open) = t.find('(') {
            let close = t.rfind(')').filter(|&c| c > open).ok_or_else(|| bad(t))?;
            let (key, op) = t[..open]
                .trim()
                .rsplit_once(char::is_whitespace)
                .ok_or_else(|| bad(t))?;
            let values: Vec<String> = t[open + 1..close]
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            match op.trim() {
                "in" => LabelReq::In(key.trim().to_string(), values),
                "notin" => LabelReq::NotIn(key.trim().to_string(), values),
                _ => return Err(bad(t)),
            }
        } else if let Some((k, v)) = t.split_once("!=") {
            LabelReq::Ne(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = t.split_once("==") {
            LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = t.split_once('=') {
            LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
        } else {
            LabelReq::Exists(t.to_string())
        };
        let key = match &req {
            LabelReq::Eq(k, _)
            | LabelReq::Ne(k, _)
            | LabelReq::In(k, _)
            | LabelReq::NotIn(k, _)
            | LabelReq::Exists(k)
            | LabelReq::NotExists(k) => k,
        };
        if !key_ok(key) {
            return Err(bad(t));
        }
        reqs.push(req);
    }
    Ok(reqs)
}

fn parse_field_selector(s: &str) -> Result<Vec<FieldReq>, String> {
    split_terms(s)
        .into_iter()
        .map(|t| {
            let req = if let Some((k, v)) = t.split_once("!=") {
                FieldReq::Ne(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = t.split_once("==") {
                FieldReq::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = t.split_once('=') {
                FieldReq::Eq(k.trim().to_string(), v.trim().to_string())
            } else {
                return Err(format!("invalid field selector term {t:?}"));
            };
            Ok(req)
        })
        .collect()
}

/// A field of an object by dotted path, as a string; "" when missing.
fn field_value(v: &Value, path: &str) -> String {
    let mut cur = v;
    for part in path.split('.') {
        cur = &cur[part];
    }
    match cur {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Selectors {
    fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Selectors, ApiError> {
        Ok(Selectors {
            labels: labels
                .map(parse_label_selector)
                .transpose()
                .map_err(ApiError::bad_request)?
                .unwrap_or_default(),
            fields: fields
                .map(parse_field_selector)
                .transpose()
                .map_err(ApiError::bad_request)?
                .unwrap_or_default(),
        })
    }

    fn matches(&self, v: &Value) -> bool {
        let labels = &v["metadata"]["labels"];
        let label = |k: &str| labels[k].as_str();
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, val) => label(k) == Some(val.as_str()),
            LabelReq::Ne(k, val) => label(k) != Some(val.as_str()),
            LabelReq::In(k, vals) => label(k).is_some_and(|l| vals.iter().any(|x| x == l)),
            LabelReq::NotIn(k, vals) => label(k).is_none_or(|l| vals.iter().all(|x| x != l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|r| match r {
                FieldReq::Eq(k, val) => field_value(v, k) == *val,
                FieldReq::Ne(k, val) => field_value(v, k) != *val,
            })
    }
}

// ----------------------------------------------------------------------------------------------
// The store's operations

/// A request's target: a resource, maybe a namespace, a name and the status subresource.
#[derive(Debug, Clone)]
struct Target {
    res: usize,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

impl Target {
    fn key(&self, name: &str) -> Key {
        (
            self.res,
            self.ns.clone().unwrap_or_default(),
            name.to_string(),
        )
    }
}

impl Store {
    fn range(&self, res: usize) -> impl Iterator<Item = (&Key, &Value)> {
        self.objects
            .range((res, String::new(), String::new())..(res + 1, String::new(), String::new()))
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, res: usize, ns: &str, kind: ChangeKind, old: Option<Value>, new: Value) {
        let rv = self.rv;
        self.history.push_back(Change {
            rv,
            res,
            ns: ns.to_string(),
            kind,
            old,
            new,
        });
        while self.history.len() > HISTORY {
            if let Some(c) = self.history.pop_front() {
                self.oldest_watchable = self.oldest_watchable.max(c.rv);
            }
        }
    }

    /// Checks a body's apiVersion and kind (when given) against the resource and sets them.
    fn check_type(res: usize, body: &mut Value) -> Result<(), ApiError> {
        let r = &RESOURCES[res];
        let Some(o) = body.as_object_mut() else {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        };
        let api_version = r.api_version();
        if let Some(av) = o.get("apiVersion").and_then(Value::as_str) {
            if !av.is_empty() && av != api_version {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({av}) does not match the expected API version ({api_version})"
                )));
            }
        }
        if let Some(k) = o.get("kind").and_then(Value::as_str) {
            if !k.is_empty() && k != r.kind {
                return Err(ApiError::bad_request(format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    r.kind
                )));
            }
        }
        o.insert("apiVersion".into(), json!(api_version));
        o.insert("kind".into(), json!(r.kind));
        Ok(())
    }

    /// Checks the body's namespace against the request's and sets it.
    fn check_namespace(res: usize, ns: Option<&str>, body: &mut Value) -> Result<(), ApiError> {
        let m = meta_mut(body);
        if RESOURCES[res].namespaced {
            let ns = ns.ok_or_else(ApiError::no_route)?;
            if let Some(b) = m.get("namespace").and_then(Value::as_str) {
                if !b.is_empty() && b != ns {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
            m.insert("namespace".into(), json!(ns));
        } else {
            m.remove("namespace");
        }
        Ok(())
    }

    fn create(
        &mut self,
        res: usize,
        ns: Option<&str>,
        mut body: Value,
        dry: bool,
    ) -> Result<Value, ApiError> {
        let r = &RESOURCES[res];
        Self::check_type(res, &mut body)?;
        Self::check_namespace(res, ns, &mut body)?;
        let ns = if r.namespaced { ns.unwrap_or("") } else { "" };
        let mut name = meta_str(&body, "name").unwrap_or("").to_string();
        if name.is_empty() {
            let Some(prefix) = meta_str(&body, "generateName").filter(|p| !p.is_empty()) else {
                return Err(ApiError::invalid(format!(
                    "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    r.kind
                )));
            };
            let prefix = prefix.to_string();
            name = loop {
                let candidate = format!("{prefix}{}", name_suffix());
                if !self
                    .objects
                    .contains_key(&(res, ns.to_string(), candidate.clone()))
                {
                    break candidate;
                }
            };
        }
        let key = (res, ns.to_string(), name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", r.qualified()),
            )
            .about(res, &name));
        }
        apply_create_defaults(r, &mut body);
        let rv = if dry { self.rv } else { self.next_rv() };
        let m = meta_mut(&mut body);
        m.insert("name".into(), json!(name));
        m.insert("uid".into(), json!(new_uid()));
        m.insert("resourceVersion".into(), json!(rv.to_string()));
        m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        m.insert("generation".into(), json!(1));
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
        if !dry {
            self.objects.insert(key, body.clone());
            self.record(res, ns, ChangeKind::Added, None, body.clone());
        }
        Ok(body)
    }

    fn existing(&self, t: &Target) -> Result<(String, Value), ApiError> {
        let name = t.name.clone().unwrap_or_default();
        match self.objects.get(&t.key(&name)) {
            Some(v) => Ok((name, v.clone())),
            None => Err(ApiError::not_found(t.res, &name)),
        }
    }

    /// Stores `new` in place of `old` (metadata already merged): no change keeps the old
    /// resourceVersion; a spec change bumps generation; an object being deleted whose
    /// finalizers are gone is removed.
    fn finish_update(
        &mut self,
        t: &Target,
        name: &str,
        old: Value,
        mut new: Value,
        dry: bool,
    ) -> Result<Value, ApiError> {
        let old_rv = meta_str(&old, "resourceVersion").unwrap_or("").to_string();
        meta_mut(&mut new).insert("resourceVersion".into(), json!(old_rv));
        if new == old {
            return Ok(old);
        }
        if spec_part(&new) != spec_part(&old) {
            let generation = meta(&old)["generation"].as_i64().unwrap_or(0) + 1;
            meta_mut(&mut new).insert("generation".into(), json!(generation));
        }
        if dry {
            return Ok(new);
        }
        let rv = self.next_rv();
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        let key = t.key(name);
        if meta(&new)
            .get("deletionTimestamp")
            .is_some_and(|d| !d.is_null())
            && !has_finalizers(&new)
        {
            self.objects.remove(&key);
            self.record(t.res, &key.1, ChangeKind::Deleted, Some(old), new.clone());
        } else {
            self.objects.insert(key.clone(), new.clone());
            self.record(t.res, &key.1, ChangeKind::Modified, Some(old), new.clone());
        }
        Ok(new)
    }

    /// Keeps what a write through the main resource or through `status` may not change.
    fn merge_update(t: &Target, old: &Value, mut new: Value) -> Value {
        let r = &RESOURCES[t.res];
        if t.status {
            // Only status changes through the status subresource.
            let mut out = old.clone();
            match new.as_object_mut().and_then(|o| o.remove("status")) {
                Some(s) => out["status"] = s,
                None => {
                    if let Some(o) = out.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            return out;
        }
        if r.status {
            let o = new.as_object_mut().expect("checked to be an object");
            match old.get("status") {
                Some(s) => {
                    o.insert("status".into(), s.clone());
                }
                None => {
                    o.remove("status");
                }
            }
        }
        let m = meta_mut(&mut new);
        for k in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match old["metadata"].get(k) {
                Some(v) => m.insert(k.into(), v.clone()),
                None => m.remove(k),
            };
        }
        new
    }

    fn replace(&mut self, t: &Target, mut body: Value, dry: bool) -> Result<Value, ApiError> {
        let (name, old) = self.existing(t)?;
        Self::check_type(t.res, &mut body)?;
        Self::check_namespace(t.res, t.ns.as_deref(), &mut body)?;
        let body_name = meta_str(&body, "name").unwrap_or("");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let want = meta_str(&body, "resourceVersion").unwrap_or("");
        if !want.is_empty() && Some(want) != meta_str(&old, "resourceVersion") {
            return Err(ApiError::modified(t.res, &name));
        }
        let new = Self::merge_update(t, &old, body);
        self.finish_update(t, &name, old, new, dry)
    }

    fn patch(
        &mut self,
        t: &Target,
        content_type: &str,
        body: &[u8],
        dry: bool,
    ) -> Result<(u16, Value), ApiError> {
        let patch: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "the patch body is not JSON (this stand-in takes JSON only): {e}"
            ))
        })?;
        let name = t.name.clone().unwrap_or_default();
        let old = match self.objects.get(&t.key(&name)) {
            Some(v) => v.clone(),
            None if content_type == "application/apply-patch+yaml" && !t.status => {
                // Server-side apply creates what is missing.
                let mut body = patch;
                Self::check_type(t.res, &mut body)?;
                let body_name = meta_str(&body, "name").unwrap_or("");
                if !body_name.is_empty() && body_name != name {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({body_name}) does not match the name on the URL ({name})"
                    )));
                }
                meta_mut(&mut body).insert("name".into(), json!(name));
                let created = self.create(t.res, t.ns.as_deref(), body, dry)?;
                return Ok((201, created));
            }
            None => return Err(ApiError::not_found(t.res, &name)),
        };
        let mut patched = old.clone();
        match content_type {
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml" => {
                if !patch.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                merge_patch(&mut patched, &patch);
            }
            "application/json-patch+json" => {
                json_patch(&mut patched, &patch).map_err(|e| {
                    ApiError::invalid(format!("the JSON patch could not be applied: {e}"))
                })?;
            }
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"),
                ))
            }
        }
        if !patched.is_object() {
            return Err(ApiError::invalid("the patched object is not an object"));
        }
        Self::check_type(t.res, &mut patched)?;
        let got_rv = meta_str(&patched, "resourceVersion").unwrap_or("");
        if !got_rv.is_empty() && Some(got_rv) != meta_str(&old, "resourceVersion") {
            return Err(ApiError::modified(t.res, &name));
        }
        if meta_str(&patched, "name") != Some(name.as_str()) {
            return Err(ApiError::bad_request(
                "a patch may not change metadata.name",
            ));
        }
        let new = Self::merge_update(t, &old, patched);
        let v = self.finish_update(t, &name, old, new, dry)?;
        Ok((200, v))
    }

    fn delete(&mut self, t: &Target, opts: &Value, dry: bool) -> Result<(u16, Value), ApiError> {
        let (name, old) = self.existing(t)?;
        let pre = &opts["preconditions"];
        if let Some(uid) = pre["uid"].as_str() {
            let have = meta_str(&old, "uid").unwrap_or("");
            if uid != have {
                return Err(ApiError::conflict(
                    t.res,
                    &name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"),
                ));
            }
        }
        if let Some(rv) = pre["resourceVersion"].as_str() {
            let have = meta_str(&old, "resourceVersion").unwrap_or("");
            if rv != have {
                return Err(ApiError::conflict(
                    t.res,
                    &name,
                    &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {have}"),
                ));
            }
        }
        let key = t.key(&name);
        if has_finalizers(&old) {
            // Marked for deletion; removed once an update empties the finalizers.
            if meta(&old)
                .get("deletionTimestamp")
                .is_some_and(|d| !d.is_null())
            {
                return Ok((202, old));
            }
            let mut new = old.clone();
            let m = meta_mut(&mut new);
            m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            if dry {
                return Ok((202, new));
            }
            let rv = self.next_rv();
            meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
            self.objects.insert(key.clone(), new.clone());
            self.record(t.res, &key.1, ChangeKind::Modified, Some(old), new.clone());
            return Ok((202, new));
        }
        if dry {
            return Ok((200, old));
        }
        let rv = self.next_rv();
        let mut gone = old;
        meta_mut(&mut gone).insert("resourceVersion".into(), json!(rv.to_string()));
        self.objects.remove(&key);
        self.record(t.res, &key.1, ChangeKind::Deleted, None, gone.clone());
        Ok((200, gone))
    }

    fn list(&self, res: usize, ns: Option<&str>, sel: &Selectors) -> Vec<Value> {
        self.range(res)
            .filter(|((_, n, _), _)| ns.is_none_or(|ns| ns == n))
            .filter(|(_, v)| sel.matches(v))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

// ----------------------------------------------------------------------------------------------
// HTTP

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(v).expect("JSON serialises");
    Response::builder()
        .status(code)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed_unsync())
        .expect("a response")
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_value())
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        if shared.down.load(Ordering::SeqCst) {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| serve(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// What a handler needs of a request.
struct Req {
    method: Method,
    query: Vec<(String, String)>,
    content_type: String,
    accept: String,
    body: Bytes,
}

impl Req {
    fn q(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        self.q(key)
            .is_some_and(|v| v == "true" || v == "1" || v.is_empty())
    }

    fn dry_run(&self) -> bool {
        self.q("dryRun").is_some_and(|v| !v.is_empty())
    }

    /// Answers are PartialObjectMetadata (kube's `*_metadata` calls ask so).
    fn metadata_only(&self) -> bool {
        self.accept.contains("as=PartialObjectMetadata")
    }

    fn json_body(&self) -> Result<Value, ApiError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            ApiError::bad_request(format!(
                "the body is not JSON (this stand-in takes JSON only): {e}"
            ))
        })
    }
}

async fn serve(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    if shared.down.load(Ordering::SeqCst) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the stand-in is down",
        ));
    }
    let line = format!("{} {}", req.method(), req.uri());
    shared.note_request(line.clone());
    let header = |name: hyper::header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let content_type = header(hyper::header::CONTENT_TYPE)
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let accept = header(hyper::header::ACCEPT);
    let path = req.uri().path().to_string();
    let query = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let method = req.method().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let r = Req {
        method,
        query,
        content_type,
        accept,
        body,
    };
    let response = if shared.unavailable.load(Ordering::SeqCst) {
        error_response(&ApiError::new(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        ))
    } else {
        route(&shared, &path, &r)
    };
    if shared.log {
        eprintln!(
            "[apiserver-standin] {line} -> {}",
            response.status().as_u16()
        );
    }
    Ok(response)
}

fn route(shared: &Arc<Shared>, path: &str, r: &Req) -> Response<Body> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let discovery = |v: Option<Value>| match (r.method == Method::GET, v) {
        (true, Some(v)) => json_response(200, &v),
        (false, Some(_)) => error_response(&ApiError::method_not_allowed()),
        (_, None) => error_response(&ApiError::no_route()),
    };
    match segs.as_slice() {
        ["version"] => discovery(Some(version_info())),
        ["healthz" | "readyz" | "livez"] => Response::builder()
            .status(200)
            .header(hyper::header::CONTENT_TYPE, "text/plain")
            .body(Full::new(Bytes::from_static(b"ok")).boxed_unsync())
            .expect("a response"),
        ["api"] => discovery(Some(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}],
        }))),
        ["api", "v1"] => discovery(resource_list("", "v1")),
        ["apis"] => discovery(Some(group_list())),
        ["apis", g] => discovery(group(g)),
        ["apis", g, v] => discovery(resource_list(g, v)),
        ["api", "v1", rest @ ..] => resource_request(shared, "", "v1", rest, r),
        ["apis", g, v, rest @ ..] => resource_request(shared, g, v, rest, r),
        // No OpenAPI documents: client-go skips OpenAPI-based validation on 404.
        _ => error_response(&ApiError::no_route()),
    }
}

// ----------------------------------------------------------------------------------------------
// Discovery

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        resources.push(json!({
            "name": r.plural,
            "singularName": r.kind.to_ascii_lowercase(),
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": VERBS,
        }));
        if r.status {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

fn group_value(name: &str) -> Value {
    let mut versions: Vec<&str> = RESOURCES
        .iter()
        .filter(|r| r.group == name)
        .map(|r| r.version)
        .collect();
    versions.dedup();
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({
        "name": name,
        "versions": versions,
        "preferredVersion": versions[0],
    })
}

fn group_list() -> Value {
    let mut names: Vec<&str> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !names.contains(&r.group) {
            names.push(r.group);
        }
    }
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": names.iter().map(|g| group_value(g)).collect::<Vec<_>>(),
    })
}

fn group(name: &str) -> Option<Value> {
    RESOURCES.iter().any(|r| r.group == name).then(|| {
        let mut v = group_value(name);
        v["kind"] = json!("APIGroup");
        v["apiVersion"] = json!("v1");
        v
    })
}

// ----------------------------------------------------------------------------------------------
// Resource requests

fn parse_target(group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let known = |p: &str| find_resource(group, version, p);
    let (ns, rest) = match rest {
        ["namespaces", ns, res, ..] if known(res).is_some_and(|i| RESOURCES[i].namespaced) => {
            (Some(ns.to_string()), &rest[2..])
        }
        _ => (None, rest),
    };
    let res = rest
        .first()
        .and_then(|p| known(p))
        .ok_or_else(ApiError::no_route)?;
    if rest.len() > 3 || (ns.is_none() && rest.len() > 1 && RESOURCES[res].namespaced) {
        return Err(ApiError::no_route());
    }
    let status = match rest.get(2) {
        None => false,
        Some(&"status") if RESOURCES[res].status => true,
        Some(_) => return Err(ApiError::no_route()),
    };
    Ok(Target {
        res,
        ns,
        name: rest.get(1).map(|s| s.to_string()),
        status,
    })
}

fn to_metadata_only(v: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": v["metadata"],
    })
}

fn resource_request(
    shared: &Arc<Shared>,
    group: &str,
    version: &str,
    rest: &[&str],
    r: &Req,
) -> Response<Body> {
    let result = (|| -> Result<Response<Body>, ApiError> {
        let t = parse_target(group, version, rest)?;
        let shape = |v: Value| {
            if r.metadata_only() {
                to_metadata_only(&v)
            } else {
                v
            }
        };
        let dry = r.dry_run();
        let written = |shared: &Arc<Shared>| {
            if !dry {
                shared.wake();
            }
        };
        match (&r.method, t.name.is_some()) {
            (&Method::GET, false) if r.flag("watch") => start_watch(shared, &t, r),
            (&Method::GET, false) => {
                let sel = Selectors::parse(r.q("labelSelector"), r.q("fieldSelector"))?;
                let store = shared.store();
                let items: Vec<Value> = store
                    .list(t.res, t.ns.as_deref(), &sel)
                    .into_iter()
                    .map(shape)
                    .collect();
                let res = &RESOURCES[t.res];
                let (kind, api_version) = if r.metadata_only() {
                    (
                        "PartialObjectMetadataList".to_string(),
                        "meta.k8s.io/v1".to_string(),
                    )
                } else {
                    (format!("{}List", res.kind), res.api_version())
                };
                Ok(json_response(
                    200,
                    &json!({
                        "kind": kind,
                        "apiVersion": api_version,
                        "metadata": {"resourceVersion": store.rv.to_string()},
                        "items": items,
                    }),
                ))
            }
            (&Method::POST, false) => {
                if t.status {
                    return Err(ApiError::method_not_allowed());
                }
                let body = r.json_body()?;
                let v = shared.store().create(t.res, t.ns.as_deref(), body, dry)?;
                written(shared);
                Ok(json_response(201, &shape(v)))
            }
            (&Method::DELETE, false) => {
                if RESOURCES[t.res].namespaced && t.ns.is_none() {
                    return Err(ApiError::no_route());
                }
                let opts = r.json_body()?;
                let dry = dry || opts["dryRun"].as_array().is_some_and(|a| !a.is_empty());
                let sel = Selectors::parse(r.q("labelSelector"), r.q("fieldSelector"))?;
                let mut store = shared.store();
                let names: Vec<String> = store
                    .list(t.res, t.ns.as_deref(), &sel)
                    .iter()
                    .filter_map(|v| meta_str(v, "name").map(String::from))
                    .collect();
                let mut items = Vec::new();
                let mut failed = None;
                for name in names {
                    let one = Target {
                        name: Some(name),
                        ..t.clone()
                    };
                    match store.delete(&one, &opts, dry) {
                        Ok((_, v)) => items.push(shape(v)),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                let rv = store.rv;
                drop(store);
                written(shared);
                if let Some(e) = failed {
                    return Err(e);
                }
                let res = &RESOURCES[t.res];
                Ok(json_response(
                    200,
                    &json!({
                        "kind": format!("{}List", res.kind),
                        "apiVersion": res.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()},
                        "items": items,
                    }),
                ))
            }
            (&Method::GET, true) => {
                let (_, v) = shared.store().existing(&t)?;
                Ok(json_response(200, &shape(v)))
            }
            (&Method::PUT, true) => {
                let body = r.json_body()?;
                let v = shared.store().replace(&t, body, dry)?;
                written(shared);
                Ok(json_response(200, &shape(v)))
            }
            (&Method::PATCH, true) => {
                let (code, v) = shared.store().patch(&t, &r.content_type, &r.body, dry)?;
                written(shared);
                Ok(json_response(code, &shape(v)))
            }
            (&Method::DELETE, true) if !t.status => {
                let opts = r.json_body()?;
                let dry = dry || opts["dryRun"].as_array().is_some_and(|a| !a.is_empty());
                let (code, v) = shared.store().delete(&t, &opts, dry)?;
                written(shared);
                Ok(json_response(code, &shape(v)))
            }
            _ => Err(ApiError::method_not_allowed()),
        }
    })();
    result.unwrap_or_else(|e| error_response(&e))
}

// ----------------------------------------------------------------------------------------------
// Watch

struct WatchReq {
    res: usize,
    ns: Option<String>,
    sel: Selectors,
    /// None: from now, with ADDED for every current object first.
    from: Option<u64>,
    timeout: Duration,
    bookmarks: bool,
    /// `sendInitialEvents`: end the initial ADDED events with a marked bookmark.
    initial_events_end: bool,
    metadata_only: bool,
}

impl WatchReq {
    fn line(&self, kind: &str, obj: &Value) -> Bytes {
        let obj = if self.metadata_only {
            to_metadata_only(obj)
        } else {
            obj.clone()
        };
        let mut out = serde_json::to_vec(&json!({"type": kind, "object": obj})).expect("JSON");
        out.push(b'\n');
        Bytes::from(out)
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let r = &RESOURCES[self.res];
        let (kind, api_version) = if self.metadata_only {
            (
                "PartialObjectMetadata".to_string(),
                "meta.k8s.io/v1".to_string(),
            )
        } else {
            (r.kind.to_string(), r.api_version())
        };
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let mut out = serde_json::to_vec(&json!({
            "type": "BOOKMARK",
            "object": {"kind": kind, "apiVersion": api_version, "metadata": metadata},
        }))
        .expect("JSON");
        out.push(b'\n');
        Bytes::from(out)
    }

    fn expired(&self, rv: u64, oldest: u64) -> Bytes {
        let status = status_value(
            410,
            "Expired",
            &format!("too old resource version: {rv} ({oldest})"),
        );
        let mut out =
            serde_json::to_vec(&json!({"type": "ERROR", "object": status})).expect("JSON");
        out.push(b'\n');
        Bytes::from(out)
    }

    /// The event a watcher with these selectors sees for a change, if any.
    fn translate(&self, c: &Change) -> Option<Bytes> {
        if c.res != self.res || self.ns.as_ref().is_some_and(|ns| *ns != c.ns) {
            return None;
        }
        let now = self.sel.matches(&c.new);
        let kind = match c.kind {
            ChangeKind::Added => now.then_some("ADDED")?,
            ChangeKind::Deleted => now.then_some("DELETED")?,
            ChangeKind::Modified => {
                let before = c.old.as_ref().is_some_and(|o| self.sel.matches(o));
                match (before, now) {
                    (true, true) => "MODIFIED",
                    (false, true) => "ADDED",
                    (true, false) => "DELETED",
                    (false, false) => return None,
                }
            }
        };
        Some(self.line(kind, &c.new))
    }
}

fn start_watch(shared: &Arc<Shared>, t: &Target, r: &Req) -> Result<Response<Body>, ApiError> {
    let from = match r.q("resourceVersion").unwrap_or("") {
        "" | "0" => None,
        rv => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?,
        ),
    };
    let send_initial = r.flag("sendInitialEvents");
    let timeout = match r.q("timeoutSeconds") {
        Some(s) => Duration::from_secs(
            s.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {s:?}")))?,
        ),
        None => DEFAULT_WATCH_TIMEOUT,
    };
    let w = WatchReq {
        res: t.res,
        ns: t.ns.clone(),
        sel: Selectors::parse(r.q("labelSelector"), r.q("fieldSelector"))?,
        from: if send_initial { None } else { from },
        timeout,
        bookmarks: r.flag("allowWatchBookmarks"),
        initial_events_end: send_initial,
        metadata_only: r.metadata_only(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    // The epoch is taken now, not when the task first runs: a set_down or compact between
    // this answer and the task's start must still end the stream.
    let epoch = shared.store().epoch;
    tokio::spawn(watch_stream(shared.clone(), tx, w, epoch));
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Ok(Response::builder()
        .status(200)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(frames).boxed_unsync())
        .expect("a response"))
}

async fn watch_stream(
    shared: Arc<Shared>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    w: WatchReq,
    epoch: u64,
) {
    let mut wake = shared.changed.subscribe();
    let deadline = tokio::time::Instant::now() + w.timeout;
    let mut next_bookmark = tokio::time::Instant::now() + BOOKMARK_EVERY;
    let mut lines = Vec::new();
    let mut pos = {
        let store = shared.store();
        match w.from {
            None => {
                for v in store.list(w.res, w.ns.as_deref(), &w.sel) {
                    lines.push(w.line("ADDED", &v));
                }
                if w.initial_events_end && w.bookmarks {
                    lines.push(w.bookmark(store.rv, true));
                }
                store.rv
            }
            Some(rv) => rv,
        }
    };
    loop {
        let mut end = false;
        {
            let store = shared.store();
            if store.epoch != epoch {
                return; // compaction, or the server went down: the stream just ends
            }
            if pos < store.oldest_watchable {
                lines.push(w.expired(pos, store.oldest_watchable));
                end = true;
            } else {
                let first = store.history.partition_point(|c| c.rv <= pos);
                lines.extend(store.history.range(first..).filter_map(|c| w.translate(c)));
                pos = pos.max(store.rv);
            }
        }
        for line in lines.drain(..) {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if end {
            return;
        }
        tokio::select! {
            changed = wake.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(deadline) => {
                if w.bookmarks {
                    let _ = tx.send(w.bookmark(pos, false)).await;
                }
                return;
            }
            _ = tokio::time::sleep_until(next_bookmark), if w.bookmarks => {
                lines.push(w.bookmark(pos, false));
                next_bookmark += BOOKMARK_EVERY;
            }
            _ = tx.closed() => return,
        }
    }
}

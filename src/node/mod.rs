//! The node plugin's volumes: node-local bases (the newest snapshot of a cache, downloaded once
//! per node however many pods ask at once), per-pod overlay views over them, bind mounts onto
//! kubelet's target paths, and the commit of a view when its pod is done. No gRPC here: the CSI
//! Node service (src/csi/node.rs) and the cluster agent are adapters around [`Volumes`].
//!
//! [`Volumes`] is a façade over three owners, each with its own state and its own tests
//! through the fake mounter: the base cache ([`bases::Bases`]: which generations are local and
//! in which form, restores into them, eviction), the view store ([`views::Views`]: the views'
//! directories, records and mounts) and the committer ([`decide::Committer`]: what a finished
//! view becomes, after the one decision, [`verdict`]). None of them knows the others: the
//! façade hands each what it needs. Around them: [`records`] (the index of view records),
//! [`publish`] (publish and unpublish: engine, base, view), [`report`] (what the node tells
//! metrics and Events through a [`Report`]), [`health`] (how each store answered the node's
//! requests), [`condition`] (whether a published view is abnormal).
//!
//! State under the node's state dir, every record written atomically:
//! - `engine/`: the engine's records of restored and committed trees;
//! - `bases/@<store id>/<scope>/<key>/<generation>/tree`: base trees, never modified in place,
//!   one directory per store (a short hash of its URL without credentials), so two stores'
//!   trees of one scope, key and generation are never one directory. An image base keeps
//!   `image.erofs` beside `tree`, mounted at `image/`, and the trees committed over it on this
//!   node in `layers/`; `tree` is then a read-only mount (bind, or overlay of the layers);
//! - `views/<id>/{upper,work,view}` and `views/<id>.json`: one view, shared by the pods of a
//!   `shared` cache on this node or private to one pod.

mod bases;
pub mod condition;
pub mod decide;
#[cfg(test)]
mod fixture;
pub mod health;
pub mod lazy;
pub mod mount;
mod publish;
mod records;
pub mod report;
mod views;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::engine::{self, io, CommitReport, Engine, IoError, RestoreSource, Store};
use crate::spec::VolumeSpec;
pub use crate::spec::{Ending, PodRef};

pub use bases::{grant_group, BaseForm};
pub use condition::Condition;
pub use decide::{verdict, Lock};
pub use mount::Mounter;
pub use report::{NoReport, Report};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A volume setting is invalid (a locked cache published without the pod's identity);
    /// names the attribute. Kept as the volume model's error, for the CSI side to map.
    #[error(transparent)]
    Spec(#[from] crate::spec::Error),
    /// Another call on the same volume or target is in flight.
    #[error("an operation on {0} is already in progress; retry later")]
    Busy(String),
    /// The volume cannot be published now (a locked cache held by another pod); retryable.
    #[error("{0}")]
    Unavailable(String),
    #[error("volume {0} is not published at {1}")]
    NotPublished(String, String),
    #[error(transparent)]
    Io(#[from] engine::IoError),
    #[error(transparent)]
    Engine(#[from] engine::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: String,
    pub state_dir: PathBuf,
    /// The store of volumes whose context names none.
    pub default_store: Option<String>,
    /// Never use overlayfs: views are copies of their base.
    pub force_copy: bool,
    /// Bytes of base trees kept on the node; least recently used bases past it are evicted.
    pub base_budget: Option<u64>,
    /// Write a fresh node's bases as EROFS images mounted read-only (one file written
    /// sequentially instead of every file of the tree); trees where the kernel refuses.
    pub base_images: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViewKind {
    Overlay,
    Copy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViewState {
    /// Mounted at one or more targets.
    Active,
    /// Every target is unpublished; the commit decision is pending.
    Pending,
}

/// The record of one view.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ViewRecord {
    pub id: String,
    pub volume_id: String,
    /// The volume's spec, stored as its `volume_context` map under `context` (the format
    /// records always had, so records of earlier versions read back).
    #[serde(rename = "context")]
    pub spec: VolumeSpec,
    pub kind: ViewKind,
    pub state: ViewState,
    /// The base tree the view started from.
    pub base_dir: PathBuf,
    /// Which generation that base holds (None: empty).
    pub base: Option<engine::format::BaseRef>,
    /// Published targets and the pod each is for.
    pub targets: BTreeMap<PathBuf, Option<PodRef>>,
    /// Every pod that had the view mounted (a shared view commits once, for all of them).
    pub pods: Vec<PodRef>,
    /// Why the restore was degraded (store unreachable), for events.
    #[serde(default)]
    pub degraded: Option<String>,
    /// How each pod (by uid) ended, as the cluster agent saw it; the commit waits for all.
    #[serde(default)]
    pub endings: BTreeMap<String, Ending>,
    /// The group the view is writable by (the pods' fsGroup), if any.
    #[serde(default)]
    pub group: Option<u32>,
    /// When the view became pending (unix seconds), for the age of the oldest pending commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_since: Option<u64>,
    /// The SELinux context the view is mounted (or its copy labelled) with, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selinux_context: Option<String>,
}

/// The node's state as an operator watches it (metrics gauges).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeGauges {
    /// Bytes of base trees kept on the node.
    pub base_bytes: u64,
    /// The node's budget for them (`--base-budget`), if any.
    pub base_budget: Option<u64>,
    /// Views mounted for at least one pod.
    pub active_views: usize,
    /// Views whose pods are gone, waiting for their commit decision.
    pub pending_views: usize,
    /// How long the oldest of those has waited, in seconds (0 when none).
    pub oldest_pending_secs: f64,
}

/// Now in unix seconds, as the node's records keep it: the engine's clock (never negative:
/// it reads 0 before the epoch).
pub(crate) fn unix_now() -> u64 {
    crate::engine::now_unix() as u64
}

/// What NodePublishVolume asks for, its volume context already read into `spec` and `pod`.
#[derive(Clone, Debug)]
pub struct Publish {
    pub volume_id: String,
    pub target: PathBuf,
    pub spec: VolumeSpec,
    pub read_only: bool,
    pub pod: Option<PodRef>,
    /// The pod's fsGroup (VOLUME_MOUNT_GROUP): the view is made writable by this group.
    pub group: Option<u32>,
    /// The SELinux context kubelet asked the view to be mounted with (`context=` in the mount
    /// flags); dropped where the kernel has no SELinux.
    pub selinux_context: Option<String>,
}

/// What a publish did, for events and logs.
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub view: String,
    /// Set when this publish restored (or reused) a base.
    pub source: Option<RestoreSource>,
    /// The base was already on the node.
    pub warm: bool,
    /// How the base was written when this publish restored it (None when warm).
    pub form: Option<BaseForm>,
    pub degraded: Option<String>,
    /// Bytes of the restored tree and compressed bytes downloaded (0 when warm).
    pub bytes: u64,
    pub downloaded: u64,
    pub seconds: f64,
}

/// The node's answer for a finished view ([`Volumes::decide`]); a failed commit is an error
/// instead. Its metric label is [`report::CommitOutcome::of`] it.
#[derive(Clone, Debug)]
pub enum CommitDecision {
    /// The engine's report: a new generation, or unchanged.
    Committed(CommitReport),
    /// Not committed on purpose ([`verdict`]): policy `pull`, `commit-on`, how the pods ended.
    Skipped(String),
    /// Refused: its writer lost the lock of its locked cache ([`verdict`]), or the generation
    /// it may create was taken (the engine's fence). Says why.
    Fenced(String),
    /// Nothing to decide: the view is gone (decided by an earlier call) or still mounted.
    NotPending,
}

pub struct Volumes {
    cfg: NodeConfig,
    engines: Mutex<HashMap<(String, String), Engine>>,
    /// Stores the caller opened already, by URL (the daemon's default store): used as they are
    /// rather than opened a second time.
    opened: HashMap<String, Store>,
    /// The base cache: which generations are local, in which form; eviction.
    bases: bases::Bases,
    /// The view store: the views' directories, mounts and records.
    views: views::Views,
    /// What a finished view becomes.
    committer: decide::Committer,
    report: Arc<dyn Report>,
    /// How each store answered the node's requests, for the volumes' condition.
    answers: Arc<health::StoreAnswers>,
}

fn hash_id(parts: &[&str]) -> String {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update(b"\0");
    }
    h.finalize().to_hex()[..20].to_string()
}

impl Volumes {
    /// The node's volumes with the system's mounts and nothing reported.
    pub fn new(cfg: NodeConfig) -> Result<Volumes> {
        Volumes::with(cfg, Arc::new(mount::System), Arc::new(NoReport))
    }

    /// The node's volumes, mounting through `mounter` and reporting to `report`.
    pub fn with(
        cfg: NodeConfig,
        mounter: Arc<dyn Mounter>,
        report: Arc<dyn Report>,
    ) -> Result<Volumes> {
        for d in ["engine", "bases", "views", "trash"] {
            let p = cfg.state_dir.join(d);
            std::fs::create_dir_all(&p).map_err(io("create", &p))?;
        }
        let trash = Trash(cfg.state_dir.join("trash"));
        let bases = bases::Bases::new(
            cfg.state_dir.join("bases"),
            trash.clone(),
            cfg.base_budget,
            cfg.base_images,
            mounter.clone(),
            report.clone(),
        );
        let views = views::Views::new(
            cfg.state_dir.join("views"),
            trash,
            mounter,
            cfg.force_copy,
            mount::selinux_enabled(),
            report.as_ref(),
        );
        let committer = decide::Committer::new(cfg.node_id.clone());
        let volumes = Volumes {
            cfg,
            engines: Mutex::default(),
            opened: HashMap::new(),
            bases,
            views,
            committer,
            report,
            answers: Arc::default(),
        };
        volumes.bases.drop_unkeyed(&volumes.views.used_bases());
        Ok(volumes)
    }

    /// The same volumes, with the store at `url` already open: the node daemon opens its
    /// default store at start-up (a store that cannot be opened is a configuration error) and
    /// hands it over, so that volumes of that store, pending commits resumed first among them,
    /// do not open it again.
    pub fn with_store(mut self, url: &str, store: Store) -> Volumes {
        self.opened.insert(url.to_string(), store);
        self
    }

    /// The same volumes as if the kernel had SELinux (`true`) or not, whatever it has: for
    /// tests of what reaches the mounts.
    pub fn with_selinux(mut self, on: bool) -> Volumes {
        self.views.set_selinux(on);
        self
    }

    /// The SELinux context a view asked to have `requested` gets on this node (see
    /// [`mount::view_context`]).
    pub fn view_context(&self, requested: Option<&str>) -> Option<String> {
        self.views.context(requested)
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Where the node reports metrics and Events.
    pub fn report(&self) -> &dyn Report {
        self.report.as_ref()
    }

    fn engine(&self, spec: &VolumeSpec) -> Result<Engine> {
        let k = (spec.store.clone(), spec.scope.clone());
        if let Some(e) = self.engines.lock().expect("not poisoned").get(&k) {
            return Ok(e.clone());
        }
        let report = self.report.clone();
        let timer = self.report.clone();
        let store = match self.opened.get(&spec.store) {
            Some(s) => s.clone(),
            None => Store::open(&spec.store)?,
        };
        let store = store
            .on_error(Arc::new(move |op| report.store_error(op)))
            .on_latency(Arc::new(move |op, took| {
                timer.store_latency(op, took.as_secs_f64())
            }))
            .on_answer(self.answers.hook(&spec.store));
        let e = Engine::new(store, &spec.scope, self.cfg.state_dir.join("engine"))?;
        self.engines
            .lock()
            .expect("not poisoned")
            .insert(k, e.clone());
        Ok(e)
    }

    /// The node's gauges: bytes of its bases (walks every base tree: call it now and then, not
    /// per request), its views and how long the oldest pending commit has waited.
    pub async fn gauges(&self) -> NodeGauges {
        let base_bytes = self.bases.bytes().await;
        let now = unix_now();
        let views = self.views();
        let pending: Vec<&ViewRecord> = views
            .iter()
            .filter(|v| v.state == ViewState::Pending)
            .collect();
        NodeGauges {
            base_bytes,
            base_budget: self.bases.budget(),
            active_views: views.len() - pending.len(),
            pending_views: pending.len(),
            oldest_pending_secs: pending
                .iter()
                .filter_map(|v| v.pending_since)
                .min()
                .map(|t| now.saturating_sub(t) as f64)
                .unwrap_or(0.0),
        }
    }

    /// Samples [`Volumes::gauges`] and reports them.
    pub async fn report_gauges(&self) {
        let g = self.gauges().await;
        self.report.node_gauges(&g);
    }

    /// The record of view `id`.
    pub fn load(&self, id: &str) -> Option<ViewRecord> {
        self.views.load(id)
    }

    /// Every view record on the node, by id.
    pub fn views(&self) -> Vec<ViewRecord> {
        self.views.all()
    }

    /// The view a target is published from.
    pub fn view_of_target(&self, target: &Path) -> Option<ViewRecord> {
        self.views.of_target(target)
    }

    /// Whether volume `id` is published on this node at a target other than `target`.
    pub fn published_elsewhere(&self, id: &str, target: &Path) -> bool {
        self.views.published_elsewhere(id, target)
    }

    /// The views pod `uid` has or had mounted.
    pub fn views_of_pod(&self, uid: &str) -> Vec<ViewRecord> {
        self.views.of_pod(uid)
    }

    /// Bytes and inodes used by the volume published at `target`.
    pub fn usage(&self, target: &Path) -> Result<Usage> {
        self.views.usage(target)
    }

    /// After a restart of the node plugin: views whose targets are no longer mounted are
    /// unpublished; returns the views that are pending a commit decision.
    pub fn recover(&self) -> Vec<ViewRecord> {
        self.views.recover()
    }
}

/// The node's trash (`<state dir>/trash`), shared by the base cache and the views.
#[derive(Clone, Debug)]
struct Trash(PathBuf);

impl Trash {
    /// Moves a directory out of the way and deletes it in the background: deleting a large
    /// tree right before creating another is slow on ext4, and nobody waits for it.
    fn put(&self, dir: &Path) -> Result<()> {
        let to = self.0.join(format!(
            "{}-{}",
            hash_id(&[&dir.display().to_string()]),
            now_nanos()
        ));
        std::fs::rename(dir, &to).map_err(io("move to trash", dir))?;
        std::thread::spawn(move || {
            let _ = std::fs::remove_dir_all(&to);
        });
        Ok(())
    }
}

/// The lock of `key` in `map` (made on first use): one async lock per base or view.
fn lock_of<K: std::hash::Hash + Eq + Clone>(
    map: &Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
    key: &K,
) -> Arc<tokio::sync::Mutex<()>> {
    map.lock()
        .expect("not poisoned")
        .entry(key.clone())
        .or_default()
        .clone()
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
    pub available_bytes: u64,
    pub total_bytes: u64,
    pub available_inodes: u64,
    pub total_inodes: u64,
}

/// Runs a blocking file-system walk on tokio's blocking threads, not on a worker thread (which
/// would stall every other call the runtime serves meanwhile).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests;

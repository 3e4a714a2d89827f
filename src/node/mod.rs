//! The node plugin's volumes: node-local bases (the newest snapshot of a cache, downloaded once
//! per node however many pods ask at once), per-pod overlay views over them, bind mounts onto
//! kubelet's target paths, and the commit of a view when its pod is done. No gRPC here: the CSI
//! Node service (src/csi/node.rs) and the cluster agent are adapters around [`Volumes`].
//!
//! State under the node's state dir, every record written atomically:
//! - `engine/`: the engine's records of restored and committed trees;
//! - `bases/@<store id>/<scope>/<key>/<generation>/tree`: base trees, never modified in place,
//!   one directory per store (a short hash of its URL without credentials), so two stores'
//!   trees of one scope, key and generation are never one directory;
//! - `views/<id>/{upper,work,view}` and `views/<id>.json`: one view, shared by the pods of a
//!   `shared` cache on this node or private to one pod.

pub mod mount;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::engine::{
    self, CommitOptions, CommitOutcome, CommitReport, Engine, RestoreSource, Store,
};
use crate::spec::{attr, CommitOn, Ending, Mode, PodRef, Policy, VolumeSpec};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    /// Another call on the same volume or target is in flight.
    #[error("an operation on {0} is already in progress; retry later")]
    Busy(String),
    /// The volume cannot be published now (a locked cache held by another pod); retryable.
    #[error("{0}")]
    Unavailable(String),
    #[error("volume {0} is not published at {1}")]
    NotPublished(String, String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] engine::Error),
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
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
    /// The volume's attributes (the `volume_context` cachevol's controller made).
    pub context: BTreeMap<String, String>,
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
}

impl ViewRecord {
    pub fn spec(&self) -> Result<VolumeSpec> {
        let ctx: HashMap<String, String> = self.context.clone().into_iter().collect();
        VolumeSpec::from_context(&ctx).map_err(|e| Error::InvalidArgument(e.to_string()))
    }
}

/// What NodePublishVolume asks for.
#[derive(Clone, Debug)]
pub struct Publish {
    pub volume_id: String,
    pub target: PathBuf,
    pub context: HashMap<String, String>,
    pub read_only: bool,
    pub pod: Option<PodRef>,
    /// The pod's fsGroup (VOLUME_MOUNT_GROUP): the view is made writable by this group.
    pub group: Option<u32>,
}

/// What a publish did, for events and logs.
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub view: String,
    /// Set when this publish restored (or reused) a base.
    pub source: Option<RestoreSource>,
    /// The base was already on the node.
    pub warm: bool,
    pub degraded: Option<String>,
    /// Bytes of the restored tree and compressed bytes downloaded (0 when warm).
    pub bytes: u64,
    pub downloaded: u64,
    pub seconds: f64,
}

#[derive(Clone, Debug)]
pub enum CommitDecision {
    Committed(CommitReport),
    Skipped(String),
    /// Nothing to decide: the view is gone (decided by an earlier call) or still mounted.
    NotPending,
}

pub struct Volumes {
    cfg: NodeConfig,
    engines: Mutex<HashMap<(String, String), Engine>>,
    /// One lock per base directory: pods asking at once share one download.
    base_locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// One lock per view: publishes, unpublishes and commits of a view take turns.
    view_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
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
    pub fn new(cfg: NodeConfig) -> Result<Volumes> {
        for d in ["engine", "bases", "views", "trash"] {
            let p = cfg.state_dir.join(d);
            std::fs::create_dir_all(&p).map_err(io("create", &p))?;
        }
        let volumes = Volumes {
            cfg,
            engines: Mutex::default(),
            base_locks: Mutex::default(),
            view_locks: Mutex::default(),
        };
        volumes.drop_unkeyed_bases();
        Ok(volumes)
    }

    /// Bases of earlier versions (`bases/<scope>/...`, without the store) are never used again:
    /// which store they came from is not in their path. Those no view uses go to the trash (the
    /// next pod restores its cache again); a view over one still commits from it (its record
    /// names the directory), and its committed tree becomes a base of the new layout.
    fn drop_unkeyed_bases(&self) {
        let root = self.cfg.state_dir.join("bases");
        let used: Vec<PathBuf> = self.views().into_iter().map(|v| v.base_dir).collect();
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let dir = e.path();
            if is_store_dir(&dir) || used.iter().any(|u| u.starts_with(&dir)) {
                continue;
            }
            match self.trash(&dir) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "dropped bases of an earlier layout")
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not drop bases of an earlier layout")
                }
            }
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    fn engine(&self, spec: &VolumeSpec) -> Result<Engine> {
        let k = (spec.store.clone(), spec.scope.clone());
        if let Some(e) = self.engines.lock().expect("not poisoned").get(&k) {
            return Ok(e.clone());
        }
        let e = Engine::new(
            Store::open(&spec.store)?,
            &spec.scope,
            self.cfg.state_dir.join("engine"),
        )?;
        self.engines
            .lock()
            .expect("not poisoned")
            .insert(k, e.clone());
        Ok(e)
    }

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

    fn view_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("views").join(id)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("views").join(format!("{id}.json"))
    }

    fn save(&self, r: &ViewRecord) -> Result<()> {
        let data = serde_json::to_vec_pretty(r).expect("records serialize");
        engine_write_atomic(&self.record_path(&r.id), &data)
    }

    pub fn load(&self, id: &str) -> Option<ViewRecord> {
        let data = std::fs::read(self.record_path(id)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Every view record on the node.
    pub fn views(&self) -> Vec<ViewRecord> {
        let dir = self.cfg.state_dir.join("views");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return vec![];
        };
        let mut out: Vec<ViewRecord> = rd
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                self.load(name.strip_suffix(".json")?)
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The view a target is published from.
    pub fn view_of_target(&self, target: &Path) -> Option<ViewRecord> {
        self.views()
            .into_iter()
            .find(|v| v.targets.contains_key(target))
    }

    /// The spec of a NodePublishVolume context: the controller's attributes, or for an inline
    /// volume the pod's own attributes (validated, in the pod's namespace, on the node's store).
    pub fn spec_of(&self, ctx: &HashMap<String, String>) -> Result<VolumeSpec> {
        if VolumeSpec::is_inline(ctx) {
            return VolumeSpec::from_inline(ctx, self.cfg.default_store.as_deref())
                .map_err(|e| Error::InvalidArgument(e.to_string()));
        }
        let mut ctx = ctx.clone();
        if !ctx.contains_key(attr::STORE) {
            if let Some(s) = &self.cfg.default_store {
                ctx.insert(attr::STORE.into(), s.clone());
            }
        }
        VolumeSpec::from_context(&ctx).map_err(|e| Error::InvalidArgument(e.to_string()))
    }

    /// Publishes a view of the volume's cache at `req.target`. Idempotent: publishing a target
    /// that is already published from this volume succeeds without doing anything.
    pub async fn publish(&self, req: Publish) -> Result<Published> {
        let started = Instant::now();
        let spec = self.spec_of(&req.context)?;
        let id = match spec.mode {
            Mode::Shared => {
                // Pods of another fsGroup get a view of their own.
                let group = req.group.map(|g| g.to_string()).unwrap_or_default();
                format!(
                    "s-{}",
                    hash_id(&[&spec.store, &spec.scope, &spec.key, &group])
                )
            }
            Mode::Private | Mode::Locked => {
                let who = req
                    .pod
                    .as_ref()
                    .map(|p| p.uid.clone())
                    .unwrap_or_else(|| req.target.display().to_string());
                format!("p-{}", hash_id(&[&req.volume_id, &who]))
            }
        };
        let lock = Self::lock_of(&self.view_locks, &id);
        let _guard = lock
            .try_lock()
            .map_err(|_| Error::Busy(format!("volume {}", req.volume_id)))?;

        if let Some(existing) = self.load(&id) {
            if existing.targets.contains_key(&req.target)
                && mount::is_mount_point(&req.target).unwrap_or(false)
            {
                return Ok(Published {
                    view: id,
                    seconds: started.elapsed().as_secs_f64(),
                    ..Default::default()
                });
            }
        }
        if spec.mode == Mode::Locked {
            // Exclusive on this node: another view of the same cache that is still live holds it.
            let holder = self.views().into_iter().find(|v| {
                v.id != id
                    && v.spec().is_ok_and(|s| {
                        s.store == spec.store && s.scope == spec.scope && s.key == spec.key
                    })
            });
            if let Some(h) = holder {
                let who = h
                    .pods
                    .first()
                    .map(|p| format!("pod {}/{}", p.namespace, p.name))
                    .unwrap_or_else(|| format!("view {}", h.id));
                return Err(Error::Unavailable(format!(
                    "cache {} is locked: {who} has it until its commit is in the store",
                    spec.key
                )));
            }
        }

        let mut published = Published {
            view: id.clone(),
            ..Default::default()
        };
        let mut record = match self.load(&id) {
            Some(r) if r.state == ViewState::Active => {
                // Another pod's live view (shared): this pod joins it.
                published.warm = true;
                published.source = Some(match &r.base {
                    Some(b) if b.key == spec.key => RestoreSource::Key {
                        key: b.key.clone(),
                        generation: b.generation,
                    },
                    Some(b) => RestoreSource::RestoreKey {
                        key: b.key.clone(),
                        generation: b.generation,
                    },
                    None => RestoreSource::Miss,
                });
                r
            }
            Some(_) => {
                // A shared view whose pods are all gone and whose commit has not run yet: the
                // new pod waits for it (kubelet retries), so it starts from those pods' writes
                // and the commit is never lost.
                return Err(Error::Busy(format!(
                    "cache {}: the commit of the pods that used it before is pending",
                    spec.key
                )));
            }
            None => {
                let base = self.ensure_base(&spec, req.group).await?;
                published.source = Some(base.source.clone());
                published.warm = base.warm;
                published.degraded = base.degraded.clone();
                published.bytes = base.bytes;
                published.downloaded = base.downloaded;
                self.make_view(&id, &req, &spec, base)?
            }
        };

        std::fs::create_dir_all(&req.target).map_err(io("create", &req.target))?;
        // Not published by this driver (the early return above): whatever is mounted there
        // now is not this view, so the view is bound over it, never recorded in its place.
        mount::bind(&self.view_dir(&id).join("view"), &req.target, req.read_only)
            .map_err(io("bind-mount", &req.target))?;
        record.targets.insert(req.target.clone(), req.pod.clone());
        if let Some(p) = &req.pod {
            if !record.pods.contains(p) {
                record.pods.push(p.clone());
            }
        }
        self.save(&record)?;
        published.seconds = started.elapsed().as_secs_f64();
        Ok(published)
    }

    /// Creates the view's directories and mounts (overlay, or a copy where overlay is refused).
    fn make_view(
        &self,
        id: &str,
        req: &Publish,
        spec: &VolumeSpec,
        base: Base,
    ) -> Result<ViewRecord> {
        let dir = self.view_dir(id);
        let (upper, work, view) = (dir.join("upper"), dir.join("work"), dir.join("view"));
        if dir.exists() {
            let _ = mount::unmount(&view);
            self.trash(&dir)?;
        }
        for d in [&upper, &work, &view] {
            std::fs::create_dir_all(d).map_err(io("create", d))?;
        }
        if let Some(g) = req.group {
            // The merged view's root takes the upper dir's owner and mode.
            grant_group(&upper, g).map_err(io("set the group of", &upper))?;
        }
        let mut kind = ViewKind::Copy;
        if !self.cfg.force_copy {
            match mount::overlay(std::slice::from_ref(&base.dir), &upper, &work, &view) {
                Ok(()) => kind = ViewKind::Overlay,
                Err(e) => {
                    tracing::warn!(view = id, error = %e, "overlayfs refused; views are copies")
                }
            }
        }
        if kind == ViewKind::Copy {
            mount::copy_tree(&base.dir, &view).map_err(io("copy", &view))?;
            if let Some(g) = req.group {
                grant_group(&view, g).map_err(io("set the group of", &view))?;
            }
            self.engine(spec)?.adopt_copy(&base.dir, &view)?;
        }
        let record = ViewRecord {
            id: id.to_string(),
            volume_id: req.volume_id.clone(),
            context: spec.to_context(),
            kind,
            state: ViewState::Active,
            base_dir: base.dir,
            base: match &base.source {
                RestoreSource::Key { key, generation }
                | RestoreSource::RestoreKey { key, generation } => Some(engine::format::BaseRef {
                    key: key.clone(),
                    generation: *generation,
                }),
                RestoreSource::Miss => None,
            },
            targets: BTreeMap::new(),
            pods: vec![],
            degraded: base.degraded,
            endings: BTreeMap::new(),
            group: req.group,
        };
        // Saved by the caller once the target is mounted; a crash before that leaves a view
        // mount without a record, which `recover` removes.
        Ok(record)
    }

    /// Unpublishes `target`. Idempotent: a target that is not published (any more) is fine,
    /// and is left alone: only targets a view record names were mounted by this driver, so
    /// anything else at that path (another driver's mount, a directory) is not ours to unmount
    /// or remove. When the last target of a view goes, the view becomes pending: its commit
    /// decision is the caller's (`commit`), made from the pods' phases or, without a cluster,
    /// right away. Returns the view when it became pending.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<Option<ViewRecord>> {
        let Some(record) = self.view_of_target(target) else {
            return Ok(None);
        };
        if record.volume_id != volume_id {
            return Err(Error::NotPublished(
                volume_id.to_string(),
                target.display().to_string(),
            ));
        }
        // Waits for bookkeeping on the view (the agent recording how a pod ended, another
        // pod's publish): concurrent RPCs on one target are refused earlier, by the CSI layer.
        let lock = Self::lock_of(&self.view_locks, &record.id);
        let _guard = lock.lock().await;
        // Read again under the lock: the record may have changed while this call waited.
        let mut record = match self.load(&record.id) {
            Some(r) if r.targets.contains_key(target) => r,
            // Unpublished (or the view committed) while this call waited: nothing is ours.
            _ => return Ok(None),
        };
        mount::unmount(target).map_err(io("unmount", target))?;
        let _ = std::fs::remove_dir(target);
        record.targets.remove(target);
        if record.targets.is_empty() {
            if record.kind == ViewKind::Overlay {
                mount::unmount(&self.view_dir(&record.id).join("view"))
                    .map_err(io("unmount", &self.view_dir(&record.id)))?;
            }
            record.state = ViewState::Pending;
            self.save(&record)?;
            return Ok(Some(record));
        }
        self.save(&record)?;
        Ok(None)
    }

    /// Decides and (when the policy allows and the pods ended well) commits a pending view,
    /// then removes it. The committed tree becomes the node's base for the next pod.
    pub async fn commit(&self, id: &str, ending: Ending) -> Result<CommitDecision> {
        let lock = Self::lock_of(&self.view_locks, &id.to_string());
        let _guard = lock.lock().await;
        let Some(record) = self.load(id) else {
            return Ok(CommitDecision::NotPending);
        };
        if record.state != ViewState::Pending {
            return Ok(CommitDecision::NotPending);
        }
        let spec = record.spec()?;
        if let Some(why) = skip_reason(&spec, ending, self.marked(&record)) {
            self.discard(&record)?;
            return Ok(CommitDecision::Skipped(why));
        }
        let engine = self.engine(&spec)?;
        let writer = match record.pods.as_slice() {
            [] => format!("node {}", self.cfg.node_id),
            pods => format!(
                "{} on node {}",
                pods.iter()
                    .map(|p| format!("pod {}/{}", p.namespace, p.name))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.cfg.node_id
            ),
        };
        let opts = CommitOptions {
            merge: spec.merge,
            // A locked view may only follow the generation it restored; so may a view whose
            // restore was degraded (a stale base or an empty cache): newer data in the store
            // is never overwritten by a tree that never saw it.
            fence: spec.mode == Mode::Locked || record.degraded.is_some(),
            budget: spec.budget,
            writer,
            note: None,
            group_widened: record.group.is_some(),
        };
        let dir = self.view_dir(id);
        let result = match record.kind {
            ViewKind::Overlay => {
                let upper = dir.join("upper");
                if upper_is_unchanged(&upper)
                    && record.base.as_ref().is_some_and(|b| b.key == spec.key)
                {
                    // Nothing was written: unchanged, without reading the base's record.
                    let generation = record.base.as_ref().map(|b| b.generation);
                    Ok((
                        CommitReport::unchanged(&spec.key, generation, 0, 0, Instant::now()),
                        None,
                    ))
                } else {
                    engine
                        .commit_overlay(&spec.key, &record.base_dir, &upper, &opts)
                        .await
                }
            }
            ViewKind::Copy => engine
                .commit(&spec.key, &dir.join("view"), &opts)
                .await
                .map(|r| (r, None)),
        };
        let (report, tree) = match result {
            Ok(v) => v,
            Err(e) if e.is_store_unavailable() => return Err(e.into()),
            Err(e) => {
                // Refused (fenced, over budget) or invalid: retrying cannot help.
                self.discard(&record)?;
                return Err(e.into());
            }
        };
        if let (CommitOutcome::Committed { generation }, Some(tree), 0) =
            (&report.outcome, tree, report.merged)
        {
            if let Err(e) = self
                .advance_base(&engine, &spec, &record, *generation, &tree)
                .await
            {
                tracing::warn!(view = id, error = %e, "could not keep the committed tree as a base; the next pod downloads it");
            }
        }
        self.discard(&record)?;
        Ok(CommitDecision::Committed(report))
    }

    /// Whether the job marked the view for commit: `.cachevol-commit` at its root. The marker
    /// is looked for where the pods' writes are (an overlay's upper dir: the view itself is
    /// unmounted by now), so only this view's pods can have made it.
    pub fn marked(&self, record: &ViewRecord) -> bool {
        let root = match record.kind {
            ViewKind::Overlay => self.view_dir(&record.id).join("upper"),
            ViewKind::Copy => self.view_dir(&record.id).join("view"),
        };
        marker_in(&root)
    }

    /// Drops a pending view without committing it (its writer was fenced): the decision is
    /// `Skipped(why)`.
    pub async fn abandon(&self, id: &str, why: String) -> Result<CommitDecision> {
        let lock = Self::lock_of(&self.view_locks, &id.to_string());
        let _guard = lock.lock().await;
        match self.load(id) {
            Some(r) if r.state == ViewState::Pending => {
                self.discard(&r)?;
                Ok(CommitDecision::Skipped(why))
            }
            _ => Ok(CommitDecision::NotPending),
        }
    }

    /// Records how pod `uid` ended in the views it used; returns those views. The first ending
    /// seen for a pod stays: a pod deleted while running and then reported Succeeded (its
    /// containers handled SIGTERM) is still Aborted.
    pub async fn record_ending(&self, uid: &str, ending: Ending) -> Result<Vec<ViewRecord>> {
        let mut out = Vec::new();
        for v in self.views_of_pod(uid) {
            if v.endings.contains_key(uid) {
                // Already recorded (the first ending stays): no need to wait for the view's
                // lock, which a commit holds for its whole upload.
                out.push(v);
                continue;
            }
            let lock = Self::lock_of(&self.view_locks, &v.id);
            let _guard = lock.lock().await;
            let Some(mut r) = self.load(&v.id) else {
                continue;
            };
            if !r.endings.contains_key(uid) {
                r.endings.insert(uid.to_string(), ending);
                self.save(&r)?;
            }
            out.push(r);
        }
        Ok(out)
    }

    /// The views pod `uid` has or had mounted.
    pub fn views_of_pod(&self, uid: &str) -> Vec<ViewRecord> {
        self.views()
            .into_iter()
            .filter(|v| v.pods.iter().any(|p| p.uid == uid))
            .collect()
    }

    /// Removes a view that will not be used again: its mounts, directories and record.
    fn discard(&self, record: &ViewRecord) -> Result<()> {
        for t in record.targets.keys() {
            let _ = mount::unmount(t);
        }
        let dir = self.view_dir(&record.id);
        let _ = mount::unmount(&dir.join("view"));
        if dir.exists() {
            self.trash(&dir)?;
        }
        match std::fs::remove_file(self.record_path(&record.id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io("remove", &self.record_path(&record.id))(e))
            }
            _ => Ok(()),
        }
    }

    /// Moves a directory out of the way and deletes it in the background: deleting a large
    /// tree right before creating another is slow on ext4, and nobody waits for it.
    fn trash(&self, dir: &Path) -> Result<()> {
        let to = self.cfg.state_dir.join("trash").join(format!(
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

    /// Where the bases of the engine's store and scope live: `bases/@<store id>/<scope>`.
    /// Bases of two stores never share a directory, even with the same scope, key and
    /// generation (two StorageClasses, or an inline volume beside a PV).
    fn base_root(&self, engine: &Engine) -> PathBuf {
        self.cfg
            .state_dir
            .join("bases")
            .join(store_dir(engine.store().display_url()))
            .join(engine.scope())
    }

    /// The tree of generation `generation` of `key` (None: the empty base), as a base for
    /// pods of fsGroup `group`: each group has bases of its own, writable by it.
    fn base_tree(
        &self,
        engine: &Engine,
        key: &str,
        generation: Option<u64>,
        group: Option<u32>,
    ) -> PathBuf {
        let mut name = match generation {
            Some(g) => format!("{g:020}"),
            None => "_empty".to_string(),
        };
        if let Some(g) = group {
            name.push_str(&format!("-g{g}"));
        }
        let root = self.base_root(engine);
        match generation {
            Some(_) => root.join(key).join(name).join("tree"),
            None => root.join(name).join("tree"),
        }
    }

    /// The base of a volume: the newest generation of its key (else of a restore key) on the
    /// node, downloaded if missing — once, however many pods ask at once. A store that cannot
    /// be reached degrades to the newest base the node has for the key, else to an empty one.
    async fn ensure_base(&self, spec: &VolumeSpec, group: Option<u32>) -> Result<Base> {
        let engine = self.engine(spec)?;
        let source = if spec.policy == Policy::Push {
            Ok(RestoreSource::Miss)
        } else {
            engine.resolve(&spec.key, &spec.restore_keys).await
        };
        let (source, degraded) = match source {
            Ok(s) => (s, None),
            Err(e) if e.is_store_unavailable() => {
                let why = format!("store unreachable: {e}");
                match self
                    .local_bases(&spec.key, &engine, group)
                    .into_iter()
                    .next()
                {
                    Some((generation, _)) => (
                        RestoreSource::Key {
                            key: spec.key.clone(),
                            generation,
                        },
                        Some(format!("{why}; using the node's generation {generation}")),
                    ),
                    None => (RestoreSource::Miss, Some(format!("{why}; starting empty"))),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let dir = match &source {
            RestoreSource::Key { key, generation }
            | RestoreSource::RestoreKey { key, generation } => {
                self.base_tree(&engine, key, Some(*generation), group)
            }
            RestoreSource::Miss => self.base_tree(&engine, &spec.key, None, group),
        };
        let lock = Self::lock_of(&self.base_locks, &dir);
        let _guard = lock.lock().await;
        let warm = engine.has_record(&dir);
        let (mut bytes, mut downloaded) = (0, 0);
        if !warm {
            if let Some(other) = engine.foreign_record(&dir) {
                // Never reuse (or restore over) another store's or scope's tree.
                return Err(engine::Error::Unsupported {
                    path: dir,
                    why: format!("this base holds a snapshot of {other}"),
                }
                .into());
            }
            std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
            let restored = match engine.restore_source(source.clone(), &dir).await {
                Ok(r) => match group {
                    Some(g) => grant_group(&dir, g)
                        .map(|_| r)
                        .map_err(|e| io("set the group of", &dir)(e)),
                    None => Ok(r),
                },
                Err(e) => Err(e.into()),
            };
            match restored {
                Ok(r) => (bytes, downloaded) = (r.bytes, r.downloaded),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(dir.parent().unwrap_or(&dir));
                    return Err(e);
                }
            }
            self.evict_bases();
        }
        touch(&dir);
        Ok(Base {
            dir,
            source,
            warm,
            degraded,
            bytes,
            downloaded,
        })
    }

    /// The generations of `spec.key` the node has complete bases of for `group`, newest first.
    fn local_bases(&self, key: &str, engine: &Engine, group: Option<u32>) -> Vec<(u64, PathBuf)> {
        let root = self.base_root(engine).join(key);
        let suffix = group.map(|g| format!("-g{g}")).unwrap_or_default();
        let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().into_string().ok()?;
                let g: u64 = name.strip_suffix(suffix.as_str())?.parse().ok()?;
                let tree = e.path().join("tree");
                engine.has_record(&tree).then_some((g, tree))
            })
            .collect();
        out.sort_by_key(|b| std::cmp::Reverse(b.0));
        out
    }

    /// After a commit of generation `generation` from a view over `record.base_dir`: the
    /// committed tree becomes a base without a download — the old base is moved (when no other
    /// view uses it) or hard-linked, and the view's upper dir is moved in.
    async fn advance_base(
        &self,
        engine: &Engine,
        spec: &VolumeSpec,
        record: &ViewRecord,
        generation: u64,
        tree: &engine::CommittedTree,
    ) -> Result<()> {
        let new = self.base_tree(engine, &spec.key, Some(generation), record.group);
        let lock = Self::lock_of(&self.base_locks, &new);
        let _guard = lock.lock().await;
        if engine.has_record(&new) {
            return Ok(());
        }
        let parent = new.parent().expect("tree has a parent");
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        let upper = self.view_dir(&record.id).join("upper");
        let old = &record.base_dir;
        let in_use = self
            .views()
            .iter()
            .any(|v| v.id != record.id && &v.base_dir == old);
        let old_lock = Self::lock_of(&self.base_locks, old);
        let _old_guard = old_lock.lock().await;
        let empty_base = old
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("_empty"));
        if in_use || empty_base {
            engine::overlay::link_tree(old, &new)?;
        } else {
            std::fs::rename(old, &new).map_err(io("move", old))?;
            let _ = std::fs::remove_dir(old.parent().unwrap_or(old));
        }
        if let Some(g) = record.group {
            // What the pods wrote joins the group's base: writable by the next pod too.
            grant_group(&upper, g).map_err(io("set the group of", &upper))?;
        }
        engine::overlay::apply_to_dir(&upper, &new)?;
        engine.record_tree(&new, tree)?;
        touch(&new);
        Ok(())
    }

    /// Evicts least recently used bases no view uses while the node keeps more than its budget.
    fn evict_bases(&self) {
        let Some(budget) = self.cfg.base_budget else {
            return;
        };
        let used: Vec<PathBuf> = self.views().into_iter().map(|v| v.base_dir).collect();
        let mut bases: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
        let subdirs = |d: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(d)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .collect()
        };
        let mut trees = Vec::new();
        for store in subdirs(&self.cfg.state_dir.join("bases")) {
            if !is_store_dir(&store) {
                continue;
            }
            for scope in subdirs(&store) {
                for key in subdirs(&scope) {
                    if key
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("_empty"))
                    {
                        trees.push(key.join("tree"));
                    } else {
                        trees.extend(subdirs(&key).into_iter().map(|g| g.join("tree")));
                    }
                }
            }
        }
        for tree in trees {
            let Ok(md) = std::fs::metadata(&tree) else {
                continue;
            };
            let size = tree_bytes(&tree);
            bases.push((md.modified().unwrap_or(std::time::UNIX_EPOCH), size, tree));
        }
        let mut total: u64 = bases.iter().map(|b| b.1).sum();
        bases.sort();
        for (_, size, tree) in bases {
            if total <= budget {
                break;
            }
            if used.contains(&tree) {
                continue;
            }
            let lock = Self::lock_of(&self.base_locks, &tree);
            let Ok(_g) = lock.try_lock() else {
                continue;
            };
            let gen_dir = tree.parent().expect("tree has a parent").to_path_buf();
            if self.trash(&gen_dir).is_ok() {
                tracing::info!(base = %tree.display(), bytes = size, "evicted base");
                total -= size;
            }
        }
    }

    /// Bytes and inodes used by the volume published at `target`.
    pub fn usage(&self, target: &Path) -> Result<Usage> {
        if self.view_of_target(target).is_none() {
            return Err(Error::NotPublished(
                String::new(),
                target.display().to_string(),
            ));
        }
        let mut u = Usage::default();
        let mut stack = vec![target.to_path_buf()];
        while let Some(d) = stack.pop() {
            for item in std::fs::read_dir(&d)
                .map_err(io("read directory", &d))?
                .flatten()
            {
                u.inodes += 1;
                if let Ok(md) = item.metadata() {
                    if md.is_dir() {
                        stack.push(item.path());
                    } else {
                        u.bytes += md.len();
                    }
                }
            }
        }
        if let Ok(sv) = rustix::fs::statvfs(&self.cfg.state_dir) {
            u.available_bytes = sv.f_bavail * sv.f_frsize;
            u.total_bytes = sv.f_blocks * sv.f_frsize;
            u.available_inodes = sv.f_favail;
            u.total_inodes = sv.f_files;
        }
        Ok(u)
    }

    /// After a restart of the node plugin: views whose targets are no longer mounted are
    /// unpublished; returns the views that are pending a commit decision.
    pub fn recover(&self) -> Vec<ViewRecord> {
        let mounted: Vec<PathBuf> = mount::mounts()
            .map(|m| m.into_iter().map(|m| m.mount_point).collect())
            .unwrap_or_default();
        // View mounts of views that never got a record (a crash during publish).
        let views = self.cfg.state_dir.join("views");
        for m in &mounted {
            if let Ok(rest) = m.strip_prefix(&views) {
                let id = rest
                    .iter()
                    .next()
                    .and_then(|c| c.to_str())
                    .unwrap_or_default();
                if !id.is_empty() && self.load(id).is_none() {
                    tracing::info!(view = id, "removing the mount of a view without a record");
                    let _ = mount::unmount(m);
                }
            }
        }
        let mut pending = Vec::new();
        for mut v in self.views() {
            let before = v.targets.len();
            v.targets.retain(|t, _| mounted.contains(t));
            if v.state == ViewState::Active && v.targets.is_empty() {
                let view = self.view_dir(&v.id).join("view");
                let _ = mount::unmount(&view);
                v.state = ViewState::Pending;
            }
            if v.targets.len() != before || v.state == ViewState::Pending {
                let _ = self.save(&v);
            }
            if v.state == ViewState::Pending {
                pending.push(v);
            }
        }
        pending
    }
}

struct Base {
    dir: PathBuf,
    source: RestoreSource,
    warm: bool,
    degraded: Option<String>,
    bytes: u64,
    downloaded: u64,
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

/// Why a view of `spec` whose pods ended as `ending` is not committed; None: it is. `marked`:
/// the job created the commit marker at the view's root (what decides under `commit-on:
/// marker`, whatever the pods' phase or deletion).
pub fn skip_reason(spec: &VolumeSpec, ending: Ending, marked: bool) -> Option<String> {
    match (spec.policy, spec.commit_on, ending) {
        (Policy::Pull, _, _) => Some("policy pull never commits".to_string()),
        (_, CommitOn::Marker, _) if marked => None,
        (_, CommitOn::Marker, _) => Some(format!(
            "the job wrote no marker: commit-on is marker and no file {} was created at the \
             volume's root",
            engine::MARKER
        )),
        (_, _, Ending::Aborted) => {
            Some("the pod was killed, evicted or deleted before it finished".to_string())
        }
        (_, CommitOn::Success, Ending::Failed) => {
            Some("the pod failed and commit-on is success".to_string())
        }
        _ => None,
    }
}

/// Makes the tree at `root` writable by group `gid` (a pod's fsGroup): every entry's group
/// becomes `gid`; directories get group rwx and setgid (new entries inherit the group), files
/// group rw (and x where the owner has it). Symbolic links only change group.
pub fn grant_group(root: &Path, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p)?;
        std::os::unix::fs::lchown(&p, None, Some(gid))?;
        let ft = md.file_type();
        if ft.is_symlink() {
            continue;
        }
        let mode = md.permissions().mode() & 0o7777;
        let want = if ft.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
            engine::format::widen_for_group(mode, engine::Kind::Dir) | 0o2000
        } else {
            engine::format::widen_for_group(mode, engine::Kind::File)
        };
        if want != mode {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(want))?;
        }
    }
    Ok(())
}

/// The directory of one store's bases: `@` (never part of a scope name) and a short hash of
/// the store's URL without credentials.
fn store_dir(display_url: &str) -> String {
    format!("@{}", &hash_id(&[display_url])[..16])
}

fn is_store_dir(dir: &Path) -> bool {
    dir.file_name()
        .is_some_and(|n| n.as_encoded_bytes().starts_with(b"@"))
}

/// Whether the commit marker is at the root of `dir` (a whiteout, a deletion in an upper dir,
/// is no marker).
fn marker_in(dir: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(dir.join(engine::MARKER))
        .is_ok_and(|m| !m.file_type().is_char_device())
}

/// Whether an overlay upper dir holds no change (the commit marker is none).
fn upper_is_unchanged(upper: &Path) -> bool {
    std::fs::read_dir(upper).is_ok_and(|mut d| {
        d.all(|e| e.is_ok_and(|e| e.file_name() == engine::MARKER && marker_in(upper)))
    })
}

/// Marks a base as just used (its mtime orders eviction).
fn touch(dir: &Path) {
    let _ = std::fs::File::open(dir).and_then(|f| f.set_modified(std::time::SystemTime::now()));
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for item in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if let Ok(md) = item.metadata() {
                if md.is_dir() {
                    stack.push(item.path());
                } else {
                    total += md.len();
                }
            }
        }
    }
    total
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn engine_write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    engine::write_atomic(path, data).map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(policy: Policy, commit_on: CommitOn) -> VolumeSpec {
        VolumeSpec {
            store: "file:///s".into(),
            scope: "ci".into(),
            key: "npm".into(),
            restore_keys: vec![],
            mode: Mode::Private,
            policy,
            commit_on,
            merge: engine::Merge::Replace,
            budget: None,
        }
    }

    /// The commit decision for every commit-on, ending and marker: under `marker` only the
    /// marker counts (GitLab and Jenkins pods are deleted while running, ARC pods Succeed
    /// after failed jobs); `pull` never commits; an aborted pod never commits otherwise.
    #[test]
    fn what_decides_a_commit() {
        use CommitOn::*;
        use Ending::*;
        use Policy::*;
        let cases = [
            // (policy, commit-on, ending, marked, committed, why contains)
            (PullPush, Success, Succeeded, false, true, ""),
            (PullPush, Success, Succeeded, true, true, ""),
            (PullPush, Success, Failed, true, false, "failed"),
            (PullPush, Success, Aborted, true, false, "killed"),
            (PullPush, Always, Failed, false, true, ""),
            (PullPush, Always, Aborted, false, false, "deleted"),
            (PullPush, Marker, Succeeded, false, false, MARKER_NAME),
            (PullPush, Marker, Succeeded, true, true, ""),
            (PullPush, Marker, Failed, true, true, ""),
            (PullPush, Marker, Aborted, true, true, ""),
            (PullPush, Marker, Aborted, false, false, "no marker"),
            (Push, Marker, Aborted, true, true, ""),
            (Pull, Marker, Succeeded, true, false, "pull"),
            (Pull, Always, Succeeded, false, false, "pull"),
        ];
        for (policy, commit_on, ending, marked, committed, why) in cases {
            let got = skip_reason(&spec(policy, commit_on), ending, marked);
            let case = format!("{policy:?} {commit_on:?} {ending:?} marked={marked}: {got:?}");
            assert_eq!(got.is_none(), committed, "{case}");
            if let Some(g) = got {
                assert!(g.contains(why), "{case}");
            }
        }
    }

    const MARKER_NAME: &str = engine::MARKER;

    #[test]
    fn an_upper_dir_with_only_the_marker_is_unchanged() {
        let t = tempfile::tempdir().unwrap();
        assert!(upper_is_unchanged(t.path()));
        std::fs::write(t.path().join(engine::MARKER), b"").unwrap();
        assert!(marker_in(t.path()));
        assert!(upper_is_unchanged(t.path()));
        std::fs::write(t.path().join("dep"), b"x").unwrap();
        assert!(!upper_is_unchanged(t.path()));
    }
}

//! The view store: what a pod sees at its target path. An overlay of a base dir with an upper
//! dir of its own (or, where overlayfs is refused, a copy of the base), bind-mounted onto
//! kubelet's targets; shared by the pods of a `shared` cache on the node, private to one pod
//! otherwise. `views/<id>/{upper,work,view}` and the view records (`views/<id>.json`).
//!
//! [`Views`] owns that state and nothing else: it knows no store, cache policy or commit. What
//! it needs of them (the base a publish got, the engine that records a copy) its callers hand
//! it. Every mount goes through its [`Mounter`](super::Mounter).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::bases::{grant_group, Base};
use super::records::Records;
use super::{
    blocking, io, mount, Ending, Error, Mounter, PodRef, Publish, Report, Result, Trash, Usage,
    ViewKind, ViewRecord, ViewState,
};
use crate::engine::{self, Engine, RestoreSource};
use crate::spec::VolumeSpec;

/// The node's views.
pub(super) struct Views {
    /// `<state dir>/views`: a directory and a record per view.
    dir: PathBuf,
    /// The view records, and one lock per view.
    records: Records,
    mounter: Arc<dyn Mounter>,
    trash: Trash,
    /// Never use overlayfs: views are copies of their base (`--force-copy`).
    force_copy: bool,
    /// Whether the kernel has SELinux, so views take the `context=` kubelet asks for.
    selinux: bool,
}

impl Views {
    /// The views under `dir`, their records read once now (unreadable ones told to `report`).
    pub(super) fn new(
        dir: PathBuf,
        trash: Trash,
        mounter: Arc<dyn Mounter>,
        force_copy: bool,
        selinux: bool,
        report: &dyn Report,
    ) -> Views {
        Views {
            records: Records::load(dir.clone(), report),
            dir,
            mounter,
            trash,
            force_copy,
            selinux,
        }
    }

    /// As if the kernel had SELinux (`true`) or not: for tests of what reaches the mounts.
    pub(super) fn set_selinux(&mut self, on: bool) {
        self.selinux = on;
    }

    /// The SELinux context a view asked to have `requested` gets on this node (see
    /// [`mount::view_context`]).
    pub(super) fn context(&self, requested: Option<&str>) -> Option<String> {
        mount::view_context(requested, self.selinux)
    }

    /// The directory of view `id`: `upper`, `work` and `view` in it.
    pub(super) fn dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// The lock of view `id`, or of another name (a view id never contains NUL): publishes,
    /// unpublishes and commits of one view take turns under it.
    pub(super) fn lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.records.lock(name)
    }

    pub(super) fn load(&self, id: &str) -> Option<ViewRecord> {
        self.records.get(id)
    }

    /// Every record, by id.
    pub(super) fn all(&self) -> Vec<ViewRecord> {
        self.records.all()
    }

    pub(super) fn save(&self, r: &ViewRecord) -> Result<()> {
        self.records.save(r)
    }

    /// The view a target is published from.
    pub(super) fn of_target(&self, target: &Path) -> Option<ViewRecord> {
        self.records.find(|v| v.targets.contains_key(target))
    }

    /// Whether volume `id` is published at a target other than `target`.
    pub(super) fn published_elsewhere(&self, id: &str, target: &Path) -> bool {
        self.records
            .find(|v| v.volume_id == id && v.targets.keys().any(|t| t != target))
            .is_some()
    }

    /// The views pod `uid` has or had mounted.
    pub(super) fn of_pod(&self, uid: &str) -> Vec<ViewRecord> {
        self.records.filter(|v| v.pods.iter().any(|p| p.uid == uid))
    }

    /// Another view than `id` of the cache `spec` names (its store, scope and key).
    pub(super) fn other_of_cache(&self, spec: &VolumeSpec, id: &str) -> Option<ViewRecord> {
        self.records.find(|v| {
            v.id != id
                && v.spec.store == spec.store
                && v.spec.scope == spec.scope
                && v.spec.key == spec.key
        })
    }

    /// The base directories views read: the base cache never evicts or drops those.
    pub(super) fn used_bases(&self) -> Vec<PathBuf> {
        self.all().into_iter().map(|v| v.base_dir).collect()
    }

    /// Whether `record` is published at `target` and it is mounted.
    pub(super) fn is_published(&self, record: &ViewRecord, target: &Path) -> bool {
        record.targets.contains_key(target) && self.mounter.is_mount_point(target).unwrap_or(false)
    }

    /// The node's mount table, as the view's mounter reads it.
    pub(super) fn mount_table(&self) -> std::io::Result<Vec<PathBuf>> {
        self.mounter.mount_points()
    }

    /// Creates view `id`'s directories and mounts over `base` (overlay, or a copy where overlay
    /// is refused or `force_copy`), with SELinux `context` if any: an option of the overlay
    /// mount, or the label of every copied file (the bind mount of a copy cannot take one).
    /// `engine` records what a copy holds, to find what its pods changed. Returns the record,
    /// unsaved: the caller saves it once a target is mounted ([`Views::attach`]); a crash before
    /// that leaves a view mount without a record, which [`Views::recover`] removes.
    pub(super) async fn make(
        &self,
        engine: &Engine,
        id: &str,
        req: &Publish,
        base: Base,
        context: Option<String>,
    ) -> Result<ViewRecord> {
        let dir = self.dir(id);
        let (upper, work, view) = (dir.join("upper"), dir.join("work"), dir.join("view"));
        if dir.exists() {
            let _ = self.mounter.unmount(&view);
            self.trash.put(&dir)?;
        }
        for d in [&upper, &work, &view] {
            std::fs::create_dir_all(d).map_err(io("create", d))?;
        }
        if let Some(g) = req.group {
            // The merged view's root takes the upper dir's owner and mode.
            let u = upper.clone();
            blocking(move || grant_group(&u, g))
                .await
                .map_err(io("set the group of", &upper))?;
        }
        let mut kind = ViewKind::Copy;
        if !self.force_copy {
            match self.mounter.overlay(
                std::slice::from_ref(&base.dir),
                &upper,
                &work,
                &view,
                context.as_deref(),
            ) {
                Ok(()) => kind = ViewKind::Overlay,
                Err(e) => {
                    tracing::warn!(view = id, error = %e, "overlayfs refused; views are copies")
                }
            }
        }
        if kind == ViewKind::Copy {
            let (from, to, group) = (base.dir.clone(), view.clone(), req.group);
            let (mounter, label) = (self.mounter.clone(), context.clone());
            blocking(move || {
                mount::copy_tree(&from, &to).map_err(io("copy", &to))?;
                if let Some(g) = group {
                    grant_group(&to, g).map_err(io("set the group of", &to))?;
                }
                // Before the copy is adopted: labelling changes each file's ctime, which the
                // record of the copy compares to find what the pod changed.
                if let Some(c) = label {
                    mounter
                        .label(&to, &c)
                        .map_err(io("set the SELinux context of", &to))?;
                }
                Ok::<(), Error>(())
            })
            .await?;
            let (engine, from, to) = (engine.clone(), base.dir.clone(), view.clone());
            blocking(move || engine.adopt_copy(&from, &to)).await?;
        }
        Ok(ViewRecord {
            id: id.to_string(),
            volume_id: req.volume_id.clone(),
            spec: req.spec.clone(),
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
            pending_since: None,
            selinux_context: context,
        })
    }

    /// A view made for `req` and mounted at its target, read-write, as a publish leaves it:
    /// for the owners' tests.
    #[cfg(test)]
    pub(super) async fn make_mounted(
        &self,
        engine: &Engine,
        id: &str,
        req: &Publish,
        base: Base,
    ) -> ViewRecord {
        let mut v = self.make(engine, id, req, base, None).await.unwrap();
        self.attach(&mut v, &req.target, false, req.pod.as_ref())
            .unwrap();
        v
    }

    /// Bind-mounts the view of `record` onto `target` (created if missing) and saves the record
    /// with that target, for `pod`. Whatever is mounted at `target` now is not this view (the
    /// caller checked [`Views::is_published`]): the view is bound over it, never recorded in
    /// its place.
    pub(super) fn attach(
        &self,
        record: &mut ViewRecord,
        target: &Path,
        read_only: bool,
        pod: Option<&PodRef>,
    ) -> Result<()> {
        std::fs::create_dir_all(target).map_err(io("create", target))?;
        self.mounter
            .bind(&self.dir(&record.id).join("view"), target, read_only)
            .map_err(io("bind-mount", target))?;
        record.targets.insert(target.to_path_buf(), pod.cloned());
        if let Some(p) = pod {
            if !record.pods.contains(p) {
                record.pods.push(p.clone());
            }
        }
        self.save(record)
    }

    /// Unmounts `target` of volume `volume_id`; see [`super::Volumes::unpublish`]. Returns the
    /// view when it became pending (its last target gone).
    pub(super) async fn detach(
        &self,
        volume_id: &str,
        target: &Path,
    ) -> Result<Option<ViewRecord>> {
        let Some(record) = self.of_target(target) else {
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
        let lock = self.records.lock(&record.id);
        let _guard = lock.lock().await;
        // Read again under the lock: the record may have changed while this call waited.
        let mut record = match self.load(&record.id) {
            Some(r) if r.targets.contains_key(target) => r,
            // Unpublished (or the view committed) while this call waited: nothing is ours.
            _ => return Ok(None),
        };
        self.mounter
            .unmount(target)
            .map_err(io("unmount", target))?;
        let _ = std::fs::remove_dir(target);
        record.targets.remove(target);
        if record.targets.is_empty() {
            if record.kind == ViewKind::Overlay {
                self.mounter
                    .unmount(&self.dir(&record.id).join("view"))
                    .map_err(io("unmount", &self.dir(&record.id)))?;
            }
            record.state = ViewState::Pending;
            record.pending_since = Some(super::unix_now());
            self.save(&record)?;
            return Ok(Some(record));
        }
        self.save(&record)?;
        Ok(None)
    }

    /// Records how pod `uid` ended in the views it used; returns those views. The first ending
    /// seen for a pod stays.
    pub(super) async fn record_ending(&self, uid: &str, ending: Ending) -> Result<Vec<ViewRecord>> {
        let mut out = Vec::new();
        for v in self.of_pod(uid) {
            if v.endings.contains_key(uid) {
                // Already recorded (the first ending stays): no need to wait for the view's
                // lock, which a commit holds for its whole upload.
                out.push(v);
                continue;
            }
            let lock = self.records.lock(&v.id);
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

    /// Removes a view that will not be used again: its mounts, directories and record.
    pub(super) fn discard(&self, record: &ViewRecord) -> Result<()> {
        for t in record.targets.keys() {
            let _ = self.mounter.unmount(t);
        }
        let dir = self.dir(&record.id);
        let _ = self.mounter.unmount(&dir.join("view"));
        if dir.exists() {
            self.trash.put(&dir)?;
        }
        self.records.remove(&record.id)
    }

    /// Where the pods of a finished view wrote: an overlay's upper dir (the view itself is
    /// unmounted by then), a copy's tree.
    pub(super) fn writes(&self, record: &ViewRecord) -> PathBuf {
        match record.kind {
            ViewKind::Overlay => self.dir(&record.id).join("upper"),
            ViewKind::Copy => self.dir(&record.id).join("view"),
        }
    }

    /// Bytes and inodes used by the volume published at `target`, and the room left on the
    /// file system of the views.
    pub(super) fn usage(&self, target: &Path) -> Result<Usage> {
        if self.of_target(target).is_none() {
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
        // The state dir's file system (the views dir is in it), as it always was.
        let fs = self.dir.parent().unwrap_or(&self.dir);
        if let Ok(sv) = rustix::fs::statvfs(fs) {
            u.available_bytes = sv.f_bavail * sv.f_frsize;
            u.total_bytes = sv.f_blocks * sv.f_frsize;
            u.available_inodes = sv.f_favail;
            u.total_inodes = sv.f_files;
        }
        Ok(u)
    }

    /// After a restart of the node plugin: view mounts without a record are removed, views
    /// whose targets are no longer mounted are unpublished; returns the views that are pending
    /// a commit decision.
    pub(super) fn recover(&self) -> Vec<ViewRecord> {
        let mounted: Vec<PathBuf> = self.mounter.mount_points().unwrap_or_default();
        // View mounts of views that never got a record (a crash during publish).
        for m in &mounted {
            if let Ok(rest) = m.strip_prefix(&self.dir) {
                let id = rest
                    .iter()
                    .next()
                    .and_then(|c| c.to_str())
                    .unwrap_or_default();
                if !id.is_empty() && self.load(id).is_none() {
                    tracing::info!(view = id, "removing the mount of a view without a record");
                    let _ = self.mounter.unmount(m);
                }
            }
        }
        let mut pending = Vec::new();
        for mut v in self.all() {
            let before = v.targets.len();
            v.targets.retain(|t, _| mounted.contains(t));
            if v.state == ViewState::Active && v.targets.is_empty() {
                let view = self.dir(&v.id).join("view");
                let _ = self.mounter.unmount(&view);
                v.state = ViewState::Pending;
                v.pending_since = Some(super::unix_now());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::bases::Bases;
    use crate::node::fixture;
    use crate::node::mount::fake::{Fake, Mount};
    use crate::node::NoReport;

    struct Fixture {
        tmp: tempfile::TempDir,
        engine: Engine,
        mounts: Arc<Fake>,
        views: Views,
    }

    impl Fixture {
        fn state(&self) -> PathBuf {
            self.tmp.path().join("state")
        }

        /// The same views dir read again, as after a restart.
        fn reloaded(&self) -> Views {
            views(&self.state(), self.mounts.clone())
        }

        /// A base of generation 1 of `ci/npm` (one file `f`, "one"), restored by the base
        /// cache as a publish gets it.
        async fn base(&self) -> Base {
            let bases = Bases::new(
                self.state().join("bases"),
                Trash(self.state().join("trash")),
                None,
                false,
                self.mounts.clone(),
                Arc::new(NoReport),
            );
            bases
                .ensure(&self.engine, &spec(self), None, Vec::new)
                .await
                .unwrap()
        }

        fn req(&self, pod: &str) -> Publish {
            Publish {
                volume_id: "cv-1".into(),
                target: self.tmp.path().join("pods").join(pod),
                spec: spec(self),
                read_only: false,
                pod: Some(PodRef {
                    name: pod.into(),
                    namespace: "ci".into(),
                    uid: format!("uid-{pod}"),
                    service_account: "default".into(),
                }),
                group: None,
                selinux_context: None,
            }
        }
    }

    fn views(state: &Path, mounts: Arc<Fake>) -> Views {
        Views::new(
            state.join("views"),
            Trash(state.join("trash")),
            mounts,
            false,
            false,
            &NoReport,
        )
    }

    fn spec(s: &Fixture) -> VolumeSpec {
        fixture::spec(s.tmp.path(), "npm")
    }

    /// A view store over an empty state dir, whose store holds generation 1 of `ci/npm`.
    async fn store(mounts: Fake) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        fixture::commit(tmp.path(), "npm", "one").await;
        let (state, engine) = fixture::state(tmp.path());
        let mounts = Arc::new(mounts);
        let views = views(&state, mounts.clone());
        Fixture {
            tmp,
            engine,
            mounts,
            views,
        }
    }

    #[tokio::test]
    async fn an_overlay_view_gets_its_dirs_one_overlay_and_a_bind_per_target() {
        let s = store(Fake::default()).await;
        let base = s.base().await;
        let base_dir = base.dir.clone();
        let req = s.req("build-1");
        let mut v = s
            .views
            .make(&s.engine, "p-1", &req, base, None)
            .await
            .unwrap();
        assert_eq!(v.kind, ViewKind::Overlay);
        assert_eq!(v.state, ViewState::Active);
        assert_eq!(v.base.as_ref().map(|b| b.generation), Some(1));
        let dir = s.views.dir("p-1");
        for d in ["upper", "work", "view"] {
            assert!(dir.join(d).is_dir(), "{d}");
        }
        assert_eq!(
            *s.mounts.table.lock().unwrap(),
            vec![(
                dir.join("view"),
                Mount::Overlay {
                    lower: vec![base_dir.clone()],
                    upper: dir.join("upper"),
                    data: mount::overlay_data(
                        &[base_dir],
                        &dir.join("upper"),
                        &dir.join("work"),
                        None
                    )
                    .unwrap(),
                }
            )]
        );
        assert!(
            s.views.load("p-1").is_none(),
            "saved once a target is mounted"
        );

        s.views
            .attach(&mut v, &req.target, true, req.pod.as_ref())
            .unwrap();
        assert_eq!(
            s.mounts.at(&req.target),
            Some(Mount::Bind {
                source: dir.join("view"),
                read_only: true
            })
        );
        let saved = s.views.load("p-1").expect("saved with its target");
        assert!(saved.targets.contains_key(&req.target));
        assert_eq!(saved.pods, vec![req.pod.clone().unwrap()]);
        assert!(s.views.is_published(&saved, &req.target));
        assert_eq!(
            s.views.of_target(&req.target).map(|v| v.id),
            Some("p-1".into())
        );
        assert_eq!(s.views.of_pod("uid-build-1").len(), 1);
        assert_eq!(s.views.used_bases(), vec![saved.base_dir.clone()]);
        assert!(s.views.published_elsewhere("cv-1", Path::new("/elsewhere")));
        assert!(!s.views.published_elsewhere("cv-1", &req.target));
    }

    #[tokio::test]
    async fn where_overlay_is_refused_the_view_is_a_labelled_copy() {
        let s = store(Fake {
            refuse_overlay: true,
            ..Fake::default()
        })
        .await;
        let base = s.base().await;
        let context = "system_u:object_r:container_file_t:s0:c1,c2".to_string();
        let v = s
            .views
            .make(
                &s.engine,
                "p-1",
                &s.req("build-1"),
                base,
                Some(context.clone()),
            )
            .await
            .unwrap();
        assert_eq!(v.kind, ViewKind::Copy);
        let view = s.views.dir("p-1").join("view");
        assert_eq!(std::fs::read_to_string(view.join("f")).unwrap(), "one");
        assert!(
            s.mounts.table.lock().unwrap().is_empty(),
            "a copy is no mount"
        );
        assert_eq!(
            *s.mounts.labels.lock().unwrap(),
            vec![(view, context.clone())]
        );
        assert_eq!(v.selinux_context, Some(context));
    }

    #[tokio::test]
    async fn the_last_target_gone_leaves_a_pending_view_and_discard_removes_it() {
        let s = store(Fake::default()).await;
        let base = s.base().await;
        let (a, b) = (s.req("build-1"), s.req("build-2"));
        let mut v = s.views.make_mounted(&s.engine, "s-1", &a, base).await;
        s.views
            .attach(&mut v, &b.target, false, b.pod.as_ref())
            .unwrap();
        assert_eq!(s.views.load("s-1").unwrap().pods.len(), 2);

        assert!(s.views.detach("cv-1", &a.target).await.unwrap().is_none());
        assert!(matches!(
            s.views.detach("cv-other", &b.target).await,
            Err(Error::NotPublished(..))
        ));
        let pending = s.views.detach("cv-1", &b.target).await.unwrap().unwrap();
        assert_eq!(pending.state, ViewState::Pending);
        assert!(pending.pending_since.is_some());
        assert!(
            s.mounts.table.lock().unwrap().is_empty(),
            "targets and the overlay unmounted"
        );
        assert_eq!(s.views.writes(&pending), s.views.dir("s-1").join("upper"));

        s.views.discard(&pending).unwrap();
        assert!(!s.views.dir("s-1").exists());
        assert!(s.views.load("s-1").is_none());
        assert!(!s.state().join("views").join("s-1.json").exists());
        assert!(s.reloaded().all().is_empty(), "no record read back");
    }

    #[tokio::test]
    async fn records_survive_a_reload_and_recover_finds_the_unmounted_ones() {
        let s = store(Fake::default()).await;
        let base = s.base().await;
        let req = s.req("build-1");
        s.views.make_mounted(&s.engine, "p-1", &req, base).await;
        s.views
            .record_ending("uid-build-1", Ending::Succeeded)
            .await
            .unwrap();
        // A view mount whose record was never saved (a crash during publish).
        let orphan = s.views.dir("p-orphan").join("view");
        s.mounts
            .overlay(&[], &orphan, &orphan, &orphan, None)
            .unwrap();

        let again = s.reloaded();
        let r = again.load("p-1").expect("read back");
        assert_eq!(r.targets.keys().collect::<Vec<_>>(), vec![&req.target]);
        assert_eq!(r.endings.get("uid-build-1"), Some(&Ending::Succeeded));
        assert!(again.recover().is_empty(), "still mounted: nothing pending");
        assert!(s.mounts.at(&orphan).is_none(), "the orphan mount is gone");

        // The node restarted without its mounts: the view is pending.
        s.mounts.table.lock().unwrap().clear();
        let pending = again.recover();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].state, ViewState::Pending);
        assert!(pending[0].targets.is_empty());
        assert_eq!(s.reloaded().load("p-1").unwrap().state, ViewState::Pending);
    }
}

//! Views: what a pod sees at its target path. An overlay of the cache's base with an upper dir
//! of its own (or, where overlayfs is refused, a copy of the base), bind-mounted onto kubelet's
//! target; shared by the pods of a `shared` cache on the node, private to one pod otherwise.
//! Every mount goes through the node's [`Mounter`](super::Mounter).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::bases::{grant_group, Base};
use super::report::{RestoreLevel, RestoreOutcome};
use super::{
    blocking, hash_id, io, mount, Ending, Error, Publish, Published, Result, Usage, ViewKind,
    ViewRecord, ViewState, Volumes,
};
use crate::engine::{self, RestoreSource};
use crate::spec::Mode;

impl Volumes {
    /// Publishes a view of the volume's cache at `req.target`. Idempotent: publishing a target
    /// that is already published from this volume succeeds without doing anything.
    /// Reports what it did: a restore metric, and an Event on the pod.
    pub async fn publish(&self, req: Publish) -> Result<Published> {
        let (spec, pod) = (req.spec.clone(), req.pod.clone());
        match self.publish_view(req).await {
            Ok(p) => {
                self.report_publish(&spec, pod.as_ref(), &p).await;
                Ok(p)
            }
            Err(e) => {
                if !matches!(e, Error::Busy(_) | Error::Unavailable(_)) {
                    self.report
                        .restore(RestoreLevel::Miss, RestoreOutcome::Failed, 0, 0.0);
                }
                Err(e)
            }
        }
    }

    async fn publish_view(&self, req: Publish) -> Result<Published> {
        let started = Instant::now();
        let spec = &req.spec;
        let context = self.view_context(req.selinux_context.as_deref());
        let id = match spec.mode {
            Mode::Shared => {
                // Pods of another fsGroup get a view of their own; so do pods of another
                // SELinux context (one mount has one label, and another pod's categories
                // would lock them out). Without a context the id is what it always was.
                let group = req.group.map(|g| g.to_string()).unwrap_or_default();
                let mut parts = vec![spec.store.as_str(), &spec.scope, &spec.key, group.as_str()];
                if let Some(c) = &context {
                    parts.push(c);
                }
                format!("s-{}", hash_id(&parts))
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
        let lock = self.records.lock(&id);
        let _guard = lock
            .try_lock()
            .map_err(|_| Error::Busy(format!("volume {}", req.volume_id)))?;

        if let Some(existing) = self.load(&id) {
            if existing.targets.contains_key(&req.target)
                && self.mounter.is_mount_point(&req.target).unwrap_or(false)
            {
                return Ok(Published {
                    view: id,
                    seconds: started.elapsed().as_secs_f64(),
                    ..Default::default()
                });
            }
        }
        // A locked cache: held from the check below until the view's record is saved, so two
        // pods publishing it at once never both find it free (the record is what holds it).
        let cache_lock = (spec.mode == Mode::Locked).then(|| {
            self.records.lock(&format!(
                "cache\0{}\0{}\0{}",
                spec.store, spec.scope, spec.key
            ))
        });
        let _cache_guard = match &cache_lock {
            Some(l) => Some(l.try_lock().map_err(|_| {
                Error::Unavailable(format!(
                    "cache {} is locked: another pod's publish on this node is taking it",
                    spec.key
                ))
            })?),
            None => None,
        };
        if spec.mode == Mode::Locked {
            // Exclusive on this node: another view of the same cache that is still live holds it.
            let holder = self.views().into_iter().find(|v| {
                v.id != id
                    && v.spec.store == spec.store
                    && v.spec.scope == spec.scope
                    && v.spec.key == spec.key
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
                let engine = self.engine(spec)?;
                let base = self
                    .bases
                    .ensure(&engine, spec, req.group, || self.used_bases())
                    .await?;
                published.source = Some(base.source.clone());
                published.warm = base.warm;
                published.form = base.form;
                published.degraded = base.degraded.clone();
                published.bytes = base.bytes;
                published.downloaded = base.downloaded;
                self.make_view(&id, &req, base, context).await?
            }
        };

        std::fs::create_dir_all(&req.target).map_err(io("create", &req.target))?;
        // Not published by this driver (the early return above): whatever is mounted there
        // now is not this view, so the view is bound over it, never recorded in its place.
        self.mounter
            .bind(&self.view_dir(&id).join("view"), &req.target, req.read_only)
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

    /// Creates the view's directories and mounts (overlay, or a copy where overlay is refused),
    /// with SELinux `context` if any: an option of the overlay mount, or the label of every
    /// copied file (the bind mount of a copy cannot take one).
    async fn make_view(
        &self,
        id: &str,
        req: &Publish,
        base: Base,
        context: Option<String>,
    ) -> Result<ViewRecord> {
        let dir = self.view_dir(id);
        let (upper, work, view) = (dir.join("upper"), dir.join("work"), dir.join("view"));
        if dir.exists() {
            let _ = self.mounter.unmount(&view);
            self.trash(&dir)?;
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
        if !self.cfg.force_copy {
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
            let (engine, from, to) = (self.engine(&req.spec)?, base.dir.clone(), view.clone());
            blocking(move || engine.adopt_copy(&from, &to)).await?;
        }
        let record = ViewRecord {
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
                    .unmount(&self.view_dir(&record.id).join("view"))
                    .map_err(io("unmount", &self.view_dir(&record.id)))?;
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
        let dir = self.view_dir(&record.id);
        let _ = self.mounter.unmount(&dir.join("view"));
        if dir.exists() {
            self.trash(&dir)?;
        }
        self.records.remove(&record.id)
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
        let mounted: Vec<PathBuf> = self.mounter.mount_points().unwrap_or_default();
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
                    let _ = self.mounter.unmount(m);
                }
            }
        }
        let mut pending = Vec::new();
        for mut v in self.views() {
            let before = v.targets.len();
            v.targets.retain(|t, _| mounted.contains(t));
            if v.state == ViewState::Active && v.targets.is_empty() {
                let view = self.view_dir(&v.id).join("view");
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

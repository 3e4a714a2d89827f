//! Publish and unpublish, as the node orchestrates them: the volume's id and locks, the engine
//! of its store, a base from the base cache ([`super::bases`]), a view over it from the view
//! store ([`super::views`]), and what is reported about it.

use std::path::Path;
use std::time::Instant;

use super::report::{RestoreLevel, RestoreOutcome};
use super::{hash_id, Ending, Error, Publish, Published, Result, ViewRecord, ViewState, Volumes};
use crate::engine::RestoreSource;
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
        let lock = self.views.lock(&id);
        let _guard = lock
            .try_lock()
            .map_err(|_| Error::Busy(format!("volume {}", req.volume_id)))?;

        if let Some(existing) = self.views.load(&id) {
            if self.views.is_published(&existing, &req.target) {
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
            self.views.lock(&format!(
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
            if let Some(h) = self.views.other_of_cache(spec, &id) {
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
        let mut record = match self.views.load(&id) {
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
                    .ensure(&engine, spec, req.group, || self.views.used_bases())
                    .await?;
                published.source = Some(base.source.clone());
                published.warm = base.warm;
                published.form = base.form;
                published.degraded = base.degraded.clone();
                published.bytes = base.bytes;
                published.downloaded = base.downloaded;
                self.views.make(&engine, &id, &req, base, context).await?
            }
        };

        // Not published by this driver (the early return above): whatever is mounted there
        // now is not this view, so the view is bound over it, never recorded in its place.
        self.views
            .attach(&mut record, &req.target, req.read_only, req.pod.as_ref())?;
        published.seconds = started.elapsed().as_secs_f64();
        Ok(published)
    }

    /// Unpublishes `target`. Idempotent: a target that is not published (any more) is fine,
    /// and is left alone: only targets a view record names were mounted by this driver, so
    /// anything else at that path (another driver's mount, a directory) is not ours to unmount
    /// or remove. When the last target of a view goes, the view becomes pending: its commit
    /// decision is the caller's (`commit`), made from the pods' phases or, without a cluster,
    /// right away. Returns the view when it became pending.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<Option<ViewRecord>> {
        self.views.detach(volume_id, target).await
    }

    /// Records how pod `uid` ended in the views it used; returns those views. The first ending
    /// seen for a pod stays: a pod deleted while running and then reported Succeeded (its
    /// containers handled SIGTERM) is still Aborted.
    pub async fn record_ending(&self, uid: &str, ending: Ending) -> Result<Vec<ViewRecord>> {
        self.views.record_ending(uid, ending).await
    }
}

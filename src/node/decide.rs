//! The commit decision: whether a pending view is committed ([`verdict`]: its policy,
//! `commit-on`, how its pods ended, the job's marker, the lock of a locked cache), the commit
//! itself ([`Committer`]: what a finished view becomes, handed the views, bases and engine),
//! and what is reported about it (once, in [`Volumes::decide`]).

use std::path::Path;
use std::time::Instant;

use super::bases::{self, Bases};
use super::report::{self, reason, EventType};
use super::views::Views;
use super::{CommitDecision, Ending, Result, ViewKind, ViewRecord, ViewState, Volumes};
use crate::engine::{self, CommitOptions, CommitOutcome, CommitReport, Engine};
use crate::spec::{CommitOn, Mode, Policy, VolumeSpec};

impl Volumes {
    /// Decides and commits a pending view as its pods ended (`ending`), and reports the
    /// outcome: a metric always, and an Event on each of the view's pods. For a view whose
    /// writer's lock nobody checks (no cluster): see [`Volumes::decide_with_lock`].
    pub async fn decide(&self, id: &str, ending: Ending) -> Result<CommitDecision> {
        self.decide_with_lock(id, ending, &Lock::Held).await
    }

    /// [`Volumes::decide`] for a view whose writer stands with its cache's lock as `lock` says
    /// (the cluster agent asked the Lease). The one place a decision is reported: a fenced
    /// view, whichever fence stopped it, is counted and told once.
    pub async fn decide_with_lock(
        &self,
        id: &str,
        ending: Ending,
        lock: &Lock,
    ) -> Result<CommitDecision> {
        let record = self.load(id);
        let started = Instant::now();
        let result = self.commit_with_lock(id, ending, lock).await;
        let seconds = started.elapsed().as_secs_f64();
        let Some(outcome) = report::CommitOutcome::of(&result) else {
            tracing::debug!(view = id, "nothing to decide: the view is not pending");
            return result;
        };
        let uploaded = match &result {
            Ok(CommitDecision::Committed(c)) if outcome == report::CommitOutcome::Committed => {
                c.uploaded
            }
            _ => 0,
        };
        self.report.commit(outcome, uploaded, seconds);
        let spec = record.as_ref().map(|r| &r.spec);
        let key = spec.map(|s| s.key.clone()).unwrap_or_default();
        let mib = report::mib;
        // What decided the commit, for the event (only pods with a cluster get events).
        let decided = match (spec.map(|s| s.commit_on), ending) {
            (Some(CommitOn::Marker), _) => "marked by the job",
            (Some(CommitOn::Always), Ending::Failed | Ending::Aborted) => "commit-on always",
            (_, Ending::Succeeded) => "pod succeeded",
            _ => "commit-on always",
        };
        let r = &self.report;
        let (kind, why, text) = match &result {
            Ok(CommitDecision::Committed(c)) => match c.outcome {
                CommitOutcome::Committed { generation } => {
                    tracing::info!(
                        view = id,
                        cache.key = key,
                        generation,
                        uploaded = c.uploaded,
                        seconds,
                        "committed"
                    );
                    let text = match &c.restore_key {
                        Some(from) => format!(
                            "cache {key}: created key {key} from restore key {from} as generation \
                             {generation} ({decided}), {} uploaded ({} files, {}) in {seconds:.2}s",
                            mib(c.uploaded),
                            c.files,
                            mib(c.bytes)
                        ),
                        None => format!(
                            "cache {key}: committed generation {generation} ({decided}), {} \
                             uploaded ({} files, {}) in {seconds:.2}s",
                            mib(c.uploaded),
                            c.files,
                            mib(c.bytes)
                        ),
                    };
                    (EventType::Normal, reason::COMMITTED, text)
                }
                CommitOutcome::Unchanged { generation } => {
                    tracing::info!(view = id, cache.key = key, "unchanged");
                    (
                        EventType::Normal,
                        reason::UNCHANGED,
                        match generation {
                            Some(g) => format!(
                                "cache {key}: unchanged since generation {g}, nothing uploaded"
                            ),
                            None => format!("cache {key}: still empty, nothing uploaded"),
                        },
                    )
                }
            },
            Ok(CommitDecision::Skipped(why)) => {
                tracing::info!(view = id, cache.key = key, why, "not committed");
                (
                    EventType::Normal,
                    reason::COMMIT_SKIPPED,
                    format!("cache {key}: not committed: {why}"),
                )
            }
            Ok(CommitDecision::Fenced(why)) => {
                tracing::warn!(view = id, error = %why, "commit fenced");
                (EventType::Warning, reason::FENCED, why.clone())
            }
            Ok(CommitDecision::NotPending) => return result,
            Err(super::Error::Engine(e)) if e.is_store_unavailable() => {
                tracing::warn!(view = id, error = %e, "commit failed: the store is unreachable; retried later");
                return result;
            }
            Err(e) => {
                tracing::warn!(view = id, error = %e, "commit refused");
                (
                    EventType::Warning,
                    reason::COMMIT_SKIPPED,
                    format!("cache {key}: commit refused: {e}"),
                )
            }
        };
        if let Some(record) = &record {
            for p in &record.pods {
                r.event(p, kind, why, text.clone()).await;
            }
        }
        result
    }

    /// Decides and (when the policy allows and the pods ended well) commits a pending view,
    /// then removes it. The committed tree becomes the node's base for the next pod. Reports
    /// nothing: [`Volumes::decide`] does.
    pub async fn commit(&self, id: &str, ending: Ending) -> Result<CommitDecision> {
        self.commit_with_lock(id, ending, &Lock::Held).await
    }

    /// [`Volumes::commit`] for a view whose writer stands with its cache's lock as `lock` says.
    pub async fn commit_with_lock(
        &self,
        id: &str,
        ending: Ending,
        lock: &Lock,
    ) -> Result<CommitDecision> {
        let engine_of = |spec: &VolumeSpec| self.engine(spec);
        self.committer
            .commit(&self.views, &self.bases, &engine_of, id, ending, lock)
            .await
    }

    /// Whether the job marked the view for commit: `.cachevol-commit` at its root. The marker
    /// is looked for where the pods' writes are (an overlay's upper dir: the view itself is
    /// unmounted by now), so only this view's pods can have made it.
    pub fn marked(&self, record: &ViewRecord) -> bool {
        marked(&self.views, record)
    }
}

/// What a finished view becomes: committed into its store (its tree then the node's next
/// base) or not, and discarded either way. Knows the node (the writer of its commits); the
/// views, the bases and the engine its caller hands it.
pub(super) struct Committer {
    node_id: String,
}

impl Committer {
    pub(super) fn new(node_id: String) -> Committer {
        Committer { node_id }
    }

    /// Decides and (when [`verdict`] allows) commits pending view `id` of `views` as its pods
    /// ended and its writer stands with its lock, then discards it; a committed tree becomes
    /// the next base in `bases`. `engine_of` opens the view's store, only when it commits.
    pub(super) async fn commit(
        &self,
        views: &Views,
        bases: &Bases,
        engine_of: &(dyn Fn(&VolumeSpec) -> Result<Engine> + Sync),
        id: &str,
        ending: Ending,
        lock: &Lock,
    ) -> Result<CommitDecision> {
        let view_lock = views.lock(id);
        let _guard = view_lock.lock().await;
        let Some(record) = views.load(id) else {
            return Ok(CommitDecision::NotPending);
        };
        if record.state != ViewState::Pending {
            return Ok(CommitDecision::NotPending);
        }
        let spec = record.spec.clone();
        if let Some(decided) = verdict(&spec, ending, marked(views, &record), lock) {
            views.discard(&record)?;
            return Ok(decided);
        }
        let engine = engine_of(&spec)?;
        let writer = match record.pods.as_slice() {
            [] => format!("node {}", self.node_id),
            pods => format!(
                "{} on node {}",
                pods.iter()
                    .map(|p| format!("pod {}/{}", p.namespace, p.name))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.node_id
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
        let dir = views.dir(id);
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
                    // An image base is read where the upper lacks a file's chunks (a pack
                    // that must be uploaded again): mounted again after a reboot.
                    if let Err(e) = bases.mount(&record.base_dir).await {
                        tracing::warn!(view = id, error = %e, "cannot mount the view's base image; committing from the upper dir and the store");
                    }
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
            Err(e @ engine::Error::Fenced { .. }) => {
                // The generation it may create was taken (a degraded or locked view that
                // newer data overtook): the same answer as a lost lock, told the same way.
                views.discard(&record)?;
                return Ok(CommitDecision::Fenced(e.to_string()));
            }
            Err(e) => {
                // Refused (over budget, too many conflicts) or invalid: retrying cannot help.
                views.discard(&record)?;
                return Err(e.into());
            }
        };
        if let (CommitOutcome::Committed { generation }, Some(tree), 0) =
            (&report.outcome, tree, report.merged)
        {
            let upper = dir.join("upper");
            let others_read_base = || {
                views
                    .all()
                    .iter()
                    .any(|v| v.id != record.id && v.base_dir == record.base_dir)
            };
            let finished = bases::Finished {
                base: &record.base_dir,
                group: record.group,
                upper: &upper,
                others_read_base: &others_read_base,
            };
            if let Err(e) = bases
                .advance(&engine, &spec.key, *generation, finished, &tree)
                .await
            {
                tracing::warn!(view = id, error = %e, "could not keep the committed tree as a base; the next pod downloads it");
            }
        }
        views.discard(&record)?;
        Ok(CommitDecision::Committed(report))
    }
}

/// Whether the job marked `record`'s view for commit (see [`Volumes::marked`]).
fn marked(views: &Views, record: &ViewRecord) -> bool {
    marker_in(&views.writes(record))
}

/// How the writer of a view stands with its cache's lock when the view is decided (only a
/// `locked` cache has one; only the cluster agent asks its Lease).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lock {
    /// Held, or nobody asked: not a locked cache, no cluster, or the view is not committed
    /// anyway (a lost lock matters only to a commit).
    Held,
    /// Lost: pod `pod` (`namespace/name`) let its Lease expire and `holder` has it now.
    Lost { pod: String, holder: String },
}

/// The one commit decision for a view of `spec` whose pods ended as `ending`: `None` when it is
/// committed, else the answer given instead ([`CommitDecision::Skipped`] or
/// [`CommitDecision::Fenced`], saying why). `marked`: the job created the commit marker at the
/// view's root (what decides under `commit-on: marker`, whatever the pods' phase or deletion).
/// `lock`: a locked cache's writer that lost its lock is fenced, since its writes could
/// overwrite newer data; a view that is skipped anyway says why it is skipped.
pub fn verdict(
    spec: &VolumeSpec,
    ending: Ending,
    marked: bool,
    lock: &Lock,
) -> Option<CommitDecision> {
    let skip = |why: String| Some(CommitDecision::Skipped(why));
    match (spec.policy, spec.commit_on, ending) {
        (Policy::Pull, _, _) => return skip("policy pull never commits".to_string()),
        (_, CommitOn::Marker, _) if marked => {}
        (_, CommitOn::Marker, _) => {
            return skip(format!(
                "the job wrote no marker: commit-on is marker and no file {} was created at \
                 the volume's root",
                engine::MARKER
            ))
        }
        (_, _, Ending::Aborted) => {
            return skip("the pod was killed, evicted or deleted before it finished".to_string())
        }
        (_, CommitOn::Success, Ending::Failed) => {
            return skip("the pod failed and commit-on is success".to_string())
        }
        _ => {}
    }
    match lock {
        Lock::Lost { pod, holder } if spec.mode == Mode::Locked => {
            Some(CommitDecision::Fenced(format!(
                "commit of cache {} refused: pod {pod} lost its lock (its lease expired and is \
                 now held by {holder}), so its writes could overwrite newer data",
                spec.key
            )))
        }
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(policy: Policy, commit_on: CommitOn, mode: Mode) -> VolumeSpec {
        VolumeSpec {
            store: "file:///s".into(),
            scope: "ci".into(),
            key: "npm".into(),
            restore_keys: vec![],
            mode,
            policy,
            commit_on,
            merge: engine::Merge::Replace,
            budget: None,
        }
    }

    /// What a row expects: committed, or the answer given instead with a word of its reason.
    #[derive(Debug)]
    enum Want {
        Commit,
        Skipped(&'static str),
        Fenced(&'static str),
    }

    /// The commit decision for every commit-on, ending and marker, and for a locked cache's
    /// lock: under `marker` only the marker counts (GitLab and Jenkins pods are deleted while
    /// running, ARC pods Succeed after failed jobs); `pull` never commits; an aborted pod never
    /// commits otherwise; a locked cache's writer that lost its lock is fenced, but only where
    /// it would have committed (a skipped view says why it is skipped), and a lock is nothing
    /// to a cache that is not locked.
    #[test]
    fn what_decides_a_commit() {
        use CommitOn::*;
        use Ending::*;
        use Mode::*;
        use Policy::*;
        use Want::*;
        let lost = Lock::Lost {
            pod: "ci/build-1".into(),
            holder: "ci/build-2".into(),
        };
        let held = Lock::Held;
        #[rustfmt::skip]
        let cases = [
            // (policy, commit-on, mode, ending, marked, lock, expected)
            (PullPush, Success, Private, Succeeded, false, &held, Commit),
            (PullPush, Success, Private, Succeeded, true, &held, Commit),
            (PullPush, Success, Private, Failed, false, &held, Skipped("failed")),
            (PullPush, Success, Private, Failed, true, &held, Skipped("failed")),
            (PullPush, Success, Private, Aborted, false, &held, Skipped("killed")),
            (PullPush, Success, Private, Aborted, true, &held, Skipped("killed")),
            (PullPush, Always, Private, Succeeded, false, &held, Commit),
            (PullPush, Always, Private, Failed, false, &held, Commit),
            (PullPush, Always, Private, Failed, true, &held, Commit),
            (PullPush, Always, Private, Aborted, false, &held, Skipped("deleted")),
            (PullPush, Always, Private, Aborted, true, &held, Skipped("evicted")),
            (PullPush, Marker, Private, Succeeded, false, &held, Skipped(MARKER_NAME)),
            (PullPush, Marker, Private, Succeeded, true, &held, Commit),
            (PullPush, Marker, Private, Failed, false, &held, Skipped("no marker")),
            (PullPush, Marker, Private, Failed, true, &held, Commit),
            (PullPush, Marker, Private, Aborted, false, &held, Skipped("no marker")),
            (PullPush, Marker, Private, Aborted, true, &held, Commit),
            (PullPush, Success, Shared, Succeeded, false, &held, Commit),
            (Push, Success, Private, Succeeded, false, &held, Commit),
            (Push, Success, Private, Failed, false, &held, Skipped("failed")),
            (Push, Marker, Private, Aborted, true, &held, Commit),
            (Pull, Success, Private, Succeeded, false, &held, Skipped("pull")),
            (Pull, Marker, Private, Succeeded, true, &held, Skipped("pull")),
            (Pull, Always, Private, Succeeded, false, &held, Skipped("pull")),
            // Locked: held, the same as any mode.
            (PullPush, Success, Locked, Succeeded, false, &held, Commit),
            (PullPush, Success, Locked, Failed, false, &held, Skipped("failed")),
            // Locked, lost: fenced where it would commit ...
            (PullPush, Success, Locked, Succeeded, false, &lost, Fenced("lost its lock")),
            (PullPush, Always, Locked, Failed, false, &lost, Fenced("ci/build-2")),
            (PullPush, Marker, Locked, Aborted, true, &lost, Fenced("pod ci/build-1")),
            (Push, Success, Locked, Succeeded, false, &lost, Fenced("newer data")),
            // ... and skipped, saying why, where it would not.
            (PullPush, Success, Locked, Failed, false, &lost, Skipped("failed")),
            (PullPush, Success, Locked, Aborted, false, &lost, Skipped("killed")),
            (PullPush, Marker, Locked, Succeeded, false, &lost, Skipped("no marker")),
            (Pull, Success, Locked, Succeeded, false, &lost, Skipped("pull")),
            // A lock is nothing to a cache that is not locked.
            (PullPush, Success, Private, Succeeded, false, &lost, Commit),
            (PullPush, Success, Shared, Succeeded, false, &lost, Commit),
        ];
        for (policy, commit_on, mode, ending, marked, lock, want) in cases {
            let got = verdict(&spec(policy, commit_on, mode), ending, marked, lock);
            let case = format!(
                "{policy:?} {commit_on:?} {mode:?} {ending:?} marked={marked} {lock:?}: \
                 want {want:?}, got {got:?}"
            );
            match (&got, &want) {
                (None, Commit) => {}
                (Some(CommitDecision::Skipped(why)), Skipped(needle))
                | (Some(CommitDecision::Fenced(why)), Fenced(needle)) => {
                    assert!(why.contains(needle), "{case}")
                }
                _ => panic!("{case}"),
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

    /// The committer on its own: views, bases and an engine over a `file://` store holding
    /// generation 1 of `ci/npm` (`f`: "one"), mounts through the fake mounter, no Volumes.
    mod committer {
        use super::*;
        use crate::node::fixture;
        use crate::node::mount::fake::Fake;
        use crate::node::{NoReport, PodRef, Publish, Trash};
        use std::sync::Arc;

        struct Node {
            tmp: tempfile::TempDir,
            engine: Engine,
            views: Views,
            bases: Bases,
        }

        async fn node() -> Node {
            let tmp = tempfile::tempdir().unwrap();
            fixture::commit(tmp.path(), "npm", "one").await;
            let (state, engine) = fixture::state(tmp.path());
            let mounts = Arc::new(Fake::default());
            let trash = Trash(state.join("trash"));
            Node {
                engine,
                views: Views::new(
                    state.join("views"),
                    trash.clone(),
                    mounts.clone(),
                    false,
                    false,
                    &NoReport,
                ),
                bases: Bases::new(
                    state.join("bases"),
                    trash,
                    None,
                    false,
                    mounts,
                    Arc::new(NoReport),
                ),
                tmp,
            }
        }

        fn npm(n: &Node, policy: Policy) -> VolumeSpec {
            VolumeSpec {
                store: format!("file://{}", n.tmp.path().join("store").display()),
                ..spec(policy, CommitOn::Success, Mode::Private)
            }
        }

        /// A view of `spec` whose pod wrote `f2` (where an overlay puts it) and unpublished.
        async fn finished(n: &Node, spec: &VolumeSpec) -> String {
            let req = Publish {
                volume_id: "cv-1".into(),
                target: n.tmp.path().join("target"),
                spec: spec.clone(),
                read_only: false,
                pod: Some(PodRef {
                    name: "build-1".into(),
                    namespace: "ci".into(),
                    uid: "uid-1".into(),
                    service_account: "default".into(),
                }),
                group: None,
                selinux_context: None,
            };
            let base = n
                .bases
                .ensure(&n.engine, spec, None, Vec::new)
                .await
                .unwrap();
            n.views.make_mounted(&n.engine, "p-1", &req, base).await;
            std::fs::write(n.views.dir("p-1").join("upper").join("f2"), "two").unwrap();
            let pending = n.views.detach("cv-1", &req.target).await.unwrap();
            assert!(pending.is_some(), "pending once its last target is gone");
            "p-1".into()
        }

        async fn commit(n: &Node, id: &str, ending: Ending) -> Result<CommitDecision> {
            let engine = n.engine.clone();
            let engine_of = move |_: &VolumeSpec| Ok(engine.clone());
            Committer::new("node1".into())
                .commit(&n.views, &n.bases, &engine_of, id, ending, &Lock::Held)
                .await
        }

        #[tokio::test]
        async fn a_view_with_writes_becomes_the_next_generation_and_the_next_base() {
            let n = node().await;
            let spec = npm(&n, Policy::PullPush);
            let id = finished(&n, &spec).await;
            match commit(&n, &id, Ending::Succeeded).await.unwrap() {
                CommitDecision::Committed(r) => assert!(
                    matches!(r.outcome, CommitOutcome::Committed { generation: 2 }),
                    "{:?}",
                    r.outcome
                ),
                other => panic!("{other:?}"),
            }
            assert!(n.views.load(&id).is_none(), "discarded once committed");
            assert!(!n.views.dir(&id).exists());
            let next = n
                .bases
                .ensure(&n.engine, &spec, None, Vec::new)
                .await
                .unwrap();
            assert!(next.warm, "the committed tree is the node's base");
            assert_eq!(std::fs::read_to_string(next.dir.join("f2")).unwrap(), "two");
            assert!(matches!(
                commit(&n, &id, Ending::Succeeded).await.unwrap(),
                CommitDecision::NotPending
            ));
        }

        #[tokio::test]
        async fn a_skipped_view_is_discarded_without_a_commit() {
            let n = node().await;
            let id = finished(&n, &npm(&n, Policy::PullPush)).await;
            match commit(&n, &id, Ending::Failed).await.unwrap() {
                CommitDecision::Skipped(why) => assert!(why.contains("failed"), "{why}"),
                other => panic!("{other:?}"),
            }
            assert!(n.views.load(&id).is_none());
            assert!(!n.views.dir(&id).exists());
            let base = n
                .bases
                .ensure(&n.engine, &npm(&n, Policy::PullPush), None, Vec::new)
                .await
                .unwrap();
            assert!(
                !base.dir.join("f2").exists(),
                "the base is still generation 1"
            );
        }
    }
}

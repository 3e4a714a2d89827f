//! The commit decision: whether a pending view is committed (its policy, `commit-on`, how its
//! pods ended, the job's marker), the commit itself, and what is reported about it.

use std::path::Path;
use std::time::Instant;

use super::report::{self, reason, EventType};
use super::{bases, CommitDecision, Ending, Result, ViewKind, ViewRecord, ViewState, Volumes};
use crate::engine::{self, CommitOptions, CommitOutcome, CommitReport};
use crate::spec::{CommitOn, Mode, Policy, VolumeSpec};

impl Volumes {
    /// Decides and commits a pending view as its pods ended (`ending`), and reports the
    /// outcome: a metric always, and an Event on each of the view's pods.
    pub async fn decide(&self, id: &str, ending: Ending) -> Result<CommitDecision> {
        let record = self.load(id);
        let started = Instant::now();
        let result = self.commit(id, ending).await;
        let seconds = started.elapsed().as_secs_f64();
        let spec = record.as_ref().and_then(|r| r.spec().ok());
        let key = spec.as_ref().map(|s| s.key.clone()).unwrap_or_default();
        let mib = report::mib;
        // What decided the commit, for the event (only pods with a cluster get events).
        let decided = match (spec.as_ref().map(|s| s.commit_on), ending) {
            (Some(CommitOn::Marker), _) => "marked by the job",
            (Some(CommitOn::Always), Ending::Failed | Ending::Aborted) => "commit-on always",
            (_, Ending::Succeeded) => "pod succeeded",
            _ => "commit-on always",
        };
        let r = &self.report;
        let (kind, why, text) = match &result {
            Ok(CommitDecision::Committed(c)) => match c.outcome {
                CommitOutcome::Committed { generation } => {
                    r.commit(report::CommitOutcome::Committed, c.uploaded, seconds);
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
                    r.commit(report::CommitOutcome::Unchanged, 0, seconds);
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
                r.commit(report::CommitOutcome::Skipped, 0, seconds);
                tracing::info!(view = id, cache.key = key, why, "not committed");
                (
                    EventType::Normal,
                    reason::COMMIT_SKIPPED,
                    format!("cache {key}: not committed: {why}"),
                )
            }
            Ok(CommitDecision::NotPending) => {
                tracing::debug!(view = id, "nothing to decide: the view is not pending");
                return result;
            }
            Err(super::Error::Engine(e)) if e.is_store_unavailable() => {
                r.commit(report::CommitOutcome::Failed, 0, seconds);
                tracing::warn!(view = id, error = %e, "commit failed: the store is unreachable; retried later");
                return result;
            }
            Err(super::Error::Engine(e @ engine::Error::Fenced { .. })) => {
                r.commit(report::CommitOutcome::Fenced, 0, seconds);
                tracing::warn!(view = id, error = %e, "commit fenced");
                (EventType::Warning, reason::FENCED, e.to_string())
            }
            Err(e) => {
                r.commit(report::CommitOutcome::Refused, 0, seconds);
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
    /// then removes it. The committed tree becomes the node's base for the next pod.
    pub async fn commit(&self, id: &str, ending: Ending) -> Result<CommitDecision> {
        let lock = self.records.lock(id);
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
                    // An image base is read where the upper lacks a file's chunks (a pack
                    // that must be uploaded again): mounted again after a reboot.
                    if let Err(e) = self.bases.mount(&record.base_dir).await {
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
            Err(e) => {
                // Refused (fenced, over budget) or invalid: retrying cannot help.
                self.discard(&record)?;
                return Err(e.into());
            }
        };
        if let (CommitOutcome::Committed { generation }, Some(tree), 0) =
            (&report.outcome, tree, report.merged)
        {
            let upper = dir.join("upper");
            let others_read_base = || {
                self.views()
                    .iter()
                    .any(|v| v.id != record.id && v.base_dir == record.base_dir)
            };
            let finished = bases::Finished {
                base: &record.base_dir,
                group: record.group,
                upper: &upper,
                others_read_base: &others_read_base,
            };
            if let Err(e) = self
                .bases
                .advance(&engine, &spec.key, *generation, finished, &tree)
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
        let lock = self.records.lock(id);
        let _guard = lock.lock().await;
        match self.load(id) {
            Some(r) if r.state == ViewState::Pending => {
                self.discard(&r)?;
                Ok(CommitDecision::Skipped(why))
            }
            _ => Ok(CommitDecision::NotPending),
        }
    }
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

//! What the node tells the world: metrics (restores, commits, locks, store errors, unreadable
//! records) and Events on pods, behind one small trait, [`Report`]. The node and the engine know
//! no metrics registry and no Kubernetes API: the daemon passes in an implementation (metrics;
//! with a cluster, metrics and Events), and without one nothing is reported ([`NoReport`]).

use futures::future::BoxFuture;

use super::{CommitDecision, PodRef, Published, Volumes};
use crate::engine::{self, RestoreSource};
use crate::spec::VolumeSpec;

/// Event reasons (the contract: users filter on them).
pub mod reason {
    pub const RESTORED: &str = "CacheRestored";
    pub const RESTORE_DEGRADED: &str = "CacheRestoreDegraded";
    pub const COMMITTED: &str = "CacheCommitted";
    pub const UNCHANGED: &str = "CacheUnchanged";
    pub const COMMIT_SKIPPED: &str = "CacheCommitSkipped";
    pub const LOCK_WAITING: &str = "CacheLockWaiting";
    pub const FENCED: &str = "CacheFenced";
}

/// An Event's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// Which snapshot a restore started from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreLevel {
    /// The cache's own key had a snapshot.
    Key,
    /// The key had none; one of its restore keys had.
    RestoreKey,
    /// Neither had one: the cache starts empty.
    Miss,
}

impl RestoreLevel {
    pub const ALL: [RestoreLevel; 3] = [Self::Key, Self::RestoreKey, Self::Miss];

    pub fn label(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::RestoreKey => "restore-key",
            Self::Miss => "miss",
        }
    }
}

/// How a restore ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// Downloaded from the store.
    Restored,
    /// Already on the node (or in the directory): nothing or little to download.
    Warm,
    /// The store could not be used: a stale local copy or an empty cache instead.
    Degraded,
    /// The restore failed.
    Failed,
}

impl RestoreOutcome {
    pub const ALL: [RestoreOutcome; 4] = [Self::Restored, Self::Warm, Self::Degraded, Self::Failed];

    pub fn label(self) -> &'static str {
        match self {
            Self::Restored => "restored",
            Self::Warm => "warm",
            Self::Degraded => "degraded",
            Self::Failed => "failed",
        }
    }
}

/// How a commit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// A new generation is in the store.
    Committed,
    /// Nothing changed: nothing uploaded, no new generation.
    Unchanged,
    /// Not committed on purpose (policy `pull`, `commit-on: success` and the pod failed, ...).
    Skipped,
    /// Refused because the writer's lock or generation was overtaken
    /// ([`CommitDecision::Fenced`]).
    Fenced,
    /// Refused on purpose: over budget, too many conflicting commits, unsupported file, ...
    Refused,
    /// The commit failed (store unreachable, local I/O, ...).
    Failed,
}

impl CommitOutcome {
    /// The outcome of the node's answer for a view (None: nothing was decided, the view was
    /// not pending). The only place a decision becomes a metric label.
    pub fn of(decided: &super::Result<CommitDecision>) -> Option<CommitOutcome> {
        Some(match decided {
            Ok(CommitDecision::Committed(c)) => match c.outcome {
                engine::CommitOutcome::Committed { .. } => Self::Committed,
                engine::CommitOutcome::Unchanged { .. } => Self::Unchanged,
            },
            Ok(CommitDecision::Skipped(_)) => Self::Skipped,
            Ok(CommitDecision::Fenced(_)) => Self::Fenced,
            Ok(CommitDecision::NotPending) => return None,
            Err(super::Error::Engine(e)) if e.is_store_unavailable() => Self::Failed,
            Err(_) => Self::Refused,
        })
    }

    pub const ALL: [CommitOutcome; 6] = [
        Self::Committed,
        Self::Unchanged,
        Self::Skipped,
        Self::Fenced,
        Self::Refused,
        Self::Failed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Committed => "committed",
            Self::Unchanged => "unchanged",
            Self::Skipped => "skipped",
            Self::Fenced => "fenced",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// Why a node evicted a base (removed a generation it kept, which its next pod then restores
/// cold).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictionReason {
    /// Its bases were over the node's `--base-budget`: the least recently used one no view
    /// reads went.
    Budget,
}

impl EvictionReason {
    pub const ALL: [EvictionReason; 1] = [Self::Budget];

    pub fn label(self) -> &'static str {
        match self {
            Self::Budget => "budget",
        }
    }
}

/// Where the node reports. Every method does nothing unless implemented; none may block for
/// long (an Event is best effort).
pub trait Report: Send + Sync + 'static {
    /// One restore (or reuse) of a base for a publish.
    fn restore(&self, _level: RestoreLevel, _outcome: RestoreOutcome, _bytes: u64, _secs: f64) {}
    /// A publish wrote a base (a cold restore) in `form`; the publish took `secs`.
    fn base_written(&self, _form: super::BaseForm, _secs: f64) {}
    /// A base was evicted from the node, for `reason`.
    fn base_evicted(&self, _reason: EvictionReason) {}
    /// One commit decision carried out.
    fn commit(&self, _outcome: CommitOutcome, _uploaded_bytes: u64, _secs: f64) {}
    /// A publish found its locked cache held by another pod.
    fn lock_waiting(&self) {}
    /// Pods now waiting for a lock: +1 when one starts waiting, -1 when it stops.
    fn lock_waiters(&self, _delta: i64) {}
    /// A pod got its locked cache after waiting `waited_secs`.
    fn lock_acquired(&self, _waited_secs: f64) {}
    /// A store request failed or timed out (`op`: get, head, put, delete, list, copy, other).
    fn store_error(&self, _op: &'static str) {}
    /// A store request took `secs` (`op` as for [`Report::store_error`]).
    fn store_latency(&self, _op: &'static str, _secs: f64) {}
    /// A view record on the node could not be read (its view is ignored).
    fn unreadable_record(&self) {}
    /// The node's bases and views now (sampled every few seconds).
    fn node_gauges(&self, _gauges: &super::NodeGauges) {}
    /// An Event about a pod.
    fn event<'a>(
        &'a self,
        _pod: &'a PodRef,
        _kind: EventType,
        _reason: &'static str,
        _message: String,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// Reports nothing.
pub struct NoReport;

impl Report for NoReport {}

/// Counts a pod waiting for a lock while it lives.
pub struct Waiting<'a>(&'a dyn Report);

impl<'a> Waiting<'a> {
    pub fn start(report: &'a dyn Report) -> Waiting<'a> {
        report.lock_waiters(1);
        Waiting(report)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock_waiters(-1);
    }
}

pub(super) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl Volumes {
    /// Reports a publish: a restore metric, and an Event on the pod.
    pub(super) async fn report_publish(
        &self,
        spec: &VolumeSpec,
        pod: Option<&PodRef>,
        p: &Published,
    ) {
        let Some(source) = &p.source else {
            return; // kubelet repeating a publish that was done
        };
        let (level, what) = match source {
            RestoreSource::Key { key, generation } => (
                RestoreLevel::Key,
                format!("generation {generation} of {key}"),
            ),
            RestoreSource::RestoreKey { key, generation } => (
                RestoreLevel::RestoreKey,
                format!("generation {generation} of restore key {key}"),
            ),
            RestoreSource::Miss => (RestoreLevel::Miss, "nothing".to_string()),
        };
        let outcome = if p.degraded.is_some() {
            RestoreOutcome::Degraded
        } else if p.warm {
            RestoreOutcome::Warm
        } else {
            RestoreOutcome::Restored
        };
        self.report.restore(level, outcome, p.bytes, p.seconds);
        if let Some(form) = p.form {
            self.report.base_written(form, p.seconds);
        }
        let Some(pod) = pod else {
            return;
        };
        if let Some(why) = &p.degraded {
            let msg = format!("cache {}: {why}", spec.key);
            self.report
                .event(pod, EventType::Warning, reason::RESTORE_DEGRADED, msg)
                .await;
            return;
        }
        let msg = match source {
            RestoreSource::Miss if spec.restore_keys.is_empty() => format!(
                "cache {} has no snapshot yet: starting empty ({:.2}s)",
                spec.key, p.seconds
            ),
            RestoreSource::Miss => format!(
                "cache {} has no snapshot yet, nor its restore keys {}: starting empty ({:.2}s)",
                spec.key,
                spec.restore_keys.join(", "),
                p.seconds
            ),
            _ if p.warm => format!(
                "cache {}: {what}, already on node {} ({:.3}s)",
                spec.key, self.cfg.node_id, p.seconds
            ),
            _ => format!(
                "cache {}: restored {what}, {} ({} downloaded) in {:.2}s, {}",
                spec.key,
                mib(p.bytes),
                mib(p.downloaded),
                p.seconds,
                match p.form {
                    Some(super::BaseForm::Image) => "as an image",
                    _ => "as files",
                }
            ),
        };
        self.report
            .event(pod, EventType::Normal, reason::RESTORED, msg)
            .await;
    }
}

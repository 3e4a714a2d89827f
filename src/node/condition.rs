//! The condition of a published volume, as NodeGetVolumeStats reports it (CSI VOLUME_CONDITION):
//! abnormal when the pod's view no longer stands on what it was made of — its target or its
//! overlay unmounted, its base gone, unmounted or dropped from the node — or when its store has
//! failed every request for a minute (the view's commit would wait for it). What the node sees
//! is gathered in [`Volumes::condition`]; the decision is [`decide`], a plain function.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::health::FAILING_AFTER;
use super::{ViewKind, ViewRecord, Volumes};

/// A volume's condition: abnormal or not, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    /// What is wrong, every problem found; "ok" when nothing is.
    pub message: String,
}

/// The state of a view's base, as far as the view depends on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BaseSeen {
    /// In place (or the view does not depend on it: a copy).
    Fine,
    /// The base's directory is gone.
    Gone,
    /// The node dropped the base's record (it found the base damaged): the view's changes
    /// can no longer be committed against it.
    Dropped,
    /// An image base whose tree is not mounted any more.
    Unmounted,
}

/// What the node saw of one published view.
#[derive(Clone, Debug)]
pub struct Seen {
    pub target: PathBuf,
    /// None: the mount table could not be read (mounts are not judged then).
    pub target_mounted: Option<bool>,
    /// The view's own overlay mount, which the targets are bound from (None: a copy view has
    /// none, or the mount table could not be read).
    pub view_mounted: Option<bool>,
    pub base_dir: PathBuf,
    pub base: BaseSeen,
    /// The store's redacted URL, and how long every request to it has failed (when at least
    /// [`FAILING_AFTER`]).
    pub store: String,
    pub store_failing: Option<Duration>,
}

/// The condition of a view from what the node saw of it.
pub fn decide(s: &Seen) -> Condition {
    let mut problems = Vec::new();
    if s.target_mounted == Some(false) {
        problems.push(format!(
            "the volume is no longer mounted at {}",
            s.target.display()
        ));
    }
    if s.view_mounted == Some(false) {
        problems.push("the view's overlay mount is gone from under it".to_string());
    }
    match s.base {
        BaseSeen::Fine => {}
        BaseSeen::Gone => problems.push(format!(
            "the view's base {} is gone from the node",
            s.base_dir.display()
        )),
        BaseSeen::Dropped => problems.push(format!(
            "the view's base {} was dropped from the node (found damaged): the pod's changes \
             cannot be committed",
            s.base_dir.display()
        )),
        BaseSeen::Unmounted => problems.push(format!(
            "the view's base image is no longer mounted at {}",
            s.base_dir.display()
        )),
    }
    if let Some(d) = s.store_failing {
        problems.push(format!(
            "store {} has failed every request for {}s: the cache's commit waits for it",
            s.store,
            d.as_secs()
        ));
    }
    Condition {
        abnormal: !problems.is_empty(),
        message: if problems.is_empty() {
            "ok".to_string()
        } else {
            problems.join("; ")
        },
    }
}

impl Volumes {
    /// The condition of the view published at `target`: see [`decide`]. Reads the mount table
    /// and the base's record; asks the store nothing.
    pub fn condition(&self, view: &ViewRecord, target: &Path) -> Condition {
        let mounted = match self.views.mount_table() {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the mount table: mounts not judged");
                None
            }
        };
        let is_mounted = |p: &Path| mounted.as_ref().map(|m| m.iter().any(|x| x == p));
        let spec = &view.spec;
        let store = crate::engine::store::redact_url(&spec.store);
        let (view_mounted, base) = match view.kind {
            ViewKind::Copy => (None, BaseSeen::Fine),
            ViewKind::Overlay => {
                let engine = self.engine(spec).ok();
                let base = if !view.base_dir.exists() {
                    BaseSeen::Gone
                } else if engine.is_some_and(|e| !e.has_record(&view.base_dir)) {
                    BaseSeen::Dropped
                } else if self.bases.is_image(&view.base_dir)
                    && is_mounted(&view.base_dir) == Some(false)
                {
                    BaseSeen::Unmounted
                } else {
                    BaseSeen::Fine
                };
                (is_mounted(&self.views.dir(&view.id).join("view")), base)
            }
        };
        let store_failing = self
            .answers
            .of(&spec.store)
            .failing_for(Instant::now(), FAILING_AFTER);
        decide(&Seen {
            target: target.to_path_buf(),
            target_mounted: is_mounted(target),
            view_mounted,
            base_dir: view.base_dir.clone(),
            base,
            store,
            store_failing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fine() -> Seen {
        Seen {
            target: "/pods/a/mount".into(),
            target_mounted: Some(true),
            view_mounted: Some(true),
            base_dir: "/state/bases/@s/ci/npm/1/tree".into(),
            base: BaseSeen::Fine,
            store: "s3://ci/".into(),
            store_failing: None,
        }
    }

    #[test]
    fn a_view_on_everything_it_was_made_of_is_normal() {
        let c = decide(&fine());
        assert_eq!((c.abnormal, c.message.as_str()), (false, "ok"));
        // A copy view has no overlay; an unreadable mount table judges no mount.
        let c = decide(&Seen {
            view_mounted: None,
            target_mounted: None,
            ..fine()
        });
        assert!(!c.abnormal, "{c:?}");
    }

    #[test]
    fn each_problem_is_abnormal_and_named() {
        let cases: Vec<(Seen, &str)> = vec![
            (
                Seen {
                    target_mounted: Some(false),
                    ..fine()
                },
                "no longer mounted at /pods/a/mount",
            ),
            (
                Seen {
                    view_mounted: Some(false),
                    ..fine()
                },
                "overlay mount is gone",
            ),
            (
                Seen {
                    base: BaseSeen::Gone,
                    ..fine()
                },
                "base /state/bases/@s/ci/npm/1/tree is gone",
            ),
            (
                Seen {
                    base: BaseSeen::Dropped,
                    ..fine()
                },
                "dropped from the node (found damaged)",
            ),
            (
                Seen {
                    base: BaseSeen::Unmounted,
                    ..fine()
                },
                "base image is no longer mounted",
            ),
            (
                Seen {
                    store_failing: Some(Duration::from_secs(75)),
                    ..fine()
                },
                "store s3://ci/ has failed every request for 75s",
            ),
        ];
        for (seen, want) in cases {
            let c = decide(&seen);
            assert!(c.abnormal, "{seen:?}");
            assert!(c.message.contains(want), "{want:?} in {:?}", c.message);
        }
        // Several at once: all of them.
        let c = decide(&Seen {
            target_mounted: Some(false),
            base: BaseSeen::Dropped,
            ..fine()
        });
        assert!(c.message.contains("no longer mounted at") && c.message.contains("dropped"));
    }
}

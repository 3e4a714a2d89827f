//! Bases: the trees of restored or committed generations a node keeps, one directory per
//! store, scope, key, generation and group (`bases/@<store id>/<scope>/<key>/<generation>/tree`),
//! never modified in place. Restores into them (once, however many pods ask at once), the
//! committed tree kept as the next base, and eviction past the node's budget.

use std::path::{Path, PathBuf};

use super::{blocking, hash_id, io, Result, ViewRecord, Volumes};
use crate::engine::{self, Engine, RestoreSource};
use crate::spec::{Policy, VolumeSpec};

pub(super) struct Base {
    pub(super) dir: PathBuf,
    pub(super) source: RestoreSource,
    pub(super) warm: bool,
    pub(super) degraded: Option<String>,
    pub(super) bytes: u64,
    pub(super) downloaded: u64,
}

impl Volumes {
    /// Bases of earlier versions (`bases/<scope>/...`, without the store) are never used again:
    /// which store they came from is not in their path. Those no view uses go to the trash (the
    /// next pod restores its cache again); a view over one still commits from it (its record
    /// names the directory), and its committed tree becomes a base of the new layout.
    pub(super) fn drop_unkeyed_bases(&self) {
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
    pub(super) async fn ensure_base(&self, spec: &VolumeSpec, group: Option<u32>) -> Result<Base> {
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
                    Some(g) => {
                        let d = dir.clone();
                        blocking(move || grant_group(&d, g))
                            .await
                            .map(|_| r)
                            .map_err(|e| io("set the group of", &dir)(e))
                    }
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
            self.evict_bases().await;
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
    pub(super) async fn advance_base(
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
            let (from, to) = (old.clone(), new.clone());
            blocking(move || engine::overlay::link_tree(&from, &to)).await?;
        } else {
            std::fs::rename(old, &new).map_err(io("move", old))?;
            let _ = std::fs::remove_dir(old.parent().unwrap_or(old));
        }
        if let Some(g) = record.group {
            // What the pods wrote joins the group's base: writable by the next pod too.
            let u = upper.clone();
            blocking(move || grant_group(&u, g))
                .await
                .map_err(io("set the group of", &upper))?;
        }
        let (u, to) = (upper.clone(), new.clone());
        blocking(move || engine::overlay::apply_to_dir(&u, &to)).await?;
        engine.record_tree(&new, tree)?;
        touch(&new);
        Ok(())
    }

    /// The node's gauges: bytes of its bases (walks every base tree: call it now and then, not
    /// per request), its views and how long the oldest pending commit has waited.
    pub async fn gauges(&self) -> super::NodeGauges {
        let root = self.cfg.state_dir.join("bases");
        let bases = blocking(move || sized_bases(&root)).await;
        let now = super::unix_now();
        let views = self.views();
        let pending: Vec<&super::ViewRecord> = views
            .iter()
            .filter(|v| v.state == super::ViewState::Pending)
            .collect();
        super::NodeGauges {
            base_bytes: bases.iter().map(|b| b.1).sum(),
            base_budget: self.cfg.base_budget,
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

    /// Evicts least recently used bases no view uses while the node keeps more than its budget.
    async fn evict_bases(&self) {
        let Some(budget) = self.cfg.base_budget else {
            return;
        };
        let used: Vec<PathBuf> = self.views().into_iter().map(|v| v.base_dir).collect();
        let root = self.cfg.state_dir.join("bases");
        let mut bases = blocking(move || sized_bases(&root)).await;
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
}

/// Every base tree under `root` (the node's `bases/`): when it was last used and its bytes.
fn sized_bases(root: &Path) -> Vec<(std::time::SystemTime, u64, PathBuf)> {
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
    for store in subdirs(root) {
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
    bases
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

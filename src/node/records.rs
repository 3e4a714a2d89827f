//! The view records: one atomic file per view (`views/<id>.json`), read once when the node
//! starts and kept in an in-memory index that every save and removal updates, so listing the
//! node's views reads no file. A record that cannot be read at start is reported (a warning and
//! the reporter's count), never silently dropped from sight. Also one lock per view (its
//! publishes, unpublishes and commits take turns) and one per locked cache on the node.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{IoError, Report, Result, ViewRecord};

pub(super) struct Records {
    dir: PathBuf,
    index: Mutex<BTreeMap<String, ViewRecord>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Records {
    /// Reads every record under `dir`; those that cannot be read or parsed are reported and
    /// left where they are (a later version, or a person, may still make sense of them).
    pub(super) fn load(dir: PathBuf, report: &dyn Report) -> Records {
        let mut index = BTreeMap::new();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = e.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_string)
            else {
                continue;
            };
            match read(&path) {
                Ok(r) if r.id == id => {
                    index.insert(id, r);
                }
                Ok(r) => unreadable(report, &path, &format!("it names view {}", r.id)),
                Err(why) => unreadable(report, &path, &why),
            }
        }
        Records {
            dir,
            index: Mutex::new(index),
            locks: Mutex::default(),
        }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub(super) fn get(&self, id: &str) -> Option<ViewRecord> {
        self.index.lock().expect("not poisoned").get(id).cloned()
    }

    /// Every record, by id.
    pub(super) fn all(&self) -> Vec<ViewRecord> {
        self.filter(|_| true)
    }

    pub(super) fn filter(&self, mut keep: impl FnMut(&ViewRecord) -> bool) -> Vec<ViewRecord> {
        let index = self.index.lock().expect("not poisoned");
        index.values().filter(|r| keep(r)).cloned().collect()
    }

    pub(super) fn find(&self, mut want: impl FnMut(&ViewRecord) -> bool) -> Option<ViewRecord> {
        let index = self.index.lock().expect("not poisoned");
        index.values().find(|r| want(r)).cloned()
    }

    /// Writes the record atomically, then indexes it.
    pub(super) fn save(&self, r: &ViewRecord) -> Result<()> {
        let data = serde_json::to_vec_pretty(r).expect("records serialize");
        crate::engine::write_atomic(&self.path(&r.id), &data)?;
        self.index
            .lock()
            .expect("not poisoned")
            .insert(r.id.clone(), r.clone());
        Ok(())
    }

    /// Removes the record's file, then its index entry (kept when the file cannot be removed:
    /// the index says what a restart would read).
    pub(super) fn remove(&self, id: &str) -> Result<()> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(IoError::new("remove", &path, e).into())
            }
            _ => {
                self.index.lock().expect("not poisoned").remove(id);
                Ok(())
            }
        }
    }

    /// The lock of view `id` (or of another name: a view id never contains NUL).
    pub(super) fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("not poisoned")
            .entry(id.to_string())
            .or_default()
            .clone()
    }
}

fn read(path: &Path) -> std::result::Result<ViewRecord, String> {
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&data).map_err(|e| e.to_string())
}

fn unreadable(report: &dyn Report, path: &Path, why: &str) {
    tracing::warn!(record = %path.display(), error = why, "cannot read a view record; its view is ignored");
    report.unreadable_record();
}

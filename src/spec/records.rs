//! The controller's record of the volumes it created, so CreateVolume stays idempotent across
//! restarts (the same name gets the same answer; a reused name with other attributes is refused)
//! and ValidateVolumeCapabilities knows which ids exist. One small JSON file per volume under
//! `<state dir>/volumes/`, written atomically (temp file, fsync, rename, fsync of the directory).
//! A record holds no cache data: forgetting it deletes nothing in the store.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::Error;
use crate::engine::{io, IoError};

const FORMAT_VERSION: u32 = 1;
/// Prefix of every volume id cachevol hands out.
pub const VOLUME_ID_PREFIX: &str = "cv-";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub version: u32,
    /// The CreateVolume request name.
    pub name: String,
    pub volume_id: String,
    /// What CreateVolume answered (0: unknown).
    pub capacity_bytes: i64,
    pub volume_context: BTreeMap<String, String>,
    /// Unix seconds of the first CreateVolume.
    pub created: i64,
}

impl VolumeRecord {
    pub fn new(
        name: &str,
        capacity_bytes: i64,
        volume_context: BTreeMap<String, String>,
    ) -> VolumeRecord {
        VolumeRecord {
            version: FORMAT_VERSION,
            name: name.to_string(),
            volume_id: volume_id(name),
            capacity_bytes,
            volume_context,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        }
    }
}

/// The volume id for a CreateVolume name: `cv-` and 32 hex digits of its BLAKE3 hash. The same
/// name always gives the same id, on any controller replica, with or without a record.
pub fn volume_id(name: &str) -> String {
    let h = blake3::hash(name.as_bytes());
    format!("{VOLUME_ID_PREFIX}{}", &h.to_hex()[..32])
}

/// Whether `id` has the shape of an id cachevol hands out; anything else is not ours (and is
/// never used to build a path).
pub fn is_volume_id(id: &str) -> bool {
    id.strip_prefix(VOLUME_ID_PREFIX).is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The records of one controller state dir, cached in memory.
pub struct Records {
    dir: PathBuf,
    by_id: Mutex<HashMap<String, VolumeRecord>>,
}

impl Records {
    /// Opens (creating if needed) `<state_dir>/volumes` and loads every record. A record that
    /// cannot be read is reported and skipped, not deleted.
    pub fn open(state_dir: &Path) -> Result<Records, Error> {
        let dir = state_dir.join("volumes");
        std::fs::create_dir_all(&dir).map_err(io("create state directory", &dir))?;
        let mut by_id = HashMap::new();
        for entry in std::fs::read_dir(&dir).map_err(io("read", &dir))? {
            let entry = entry.map_err(io("read", &dir))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                // A write interrupted before its rename: the record it was replacing is intact.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(id) = name.strip_suffix(".json").filter(|id| is_volume_id(id)) else {
                continue;
            };
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<VolumeRecord>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) if r.volume_id == id => {
                    by_id.insert(r.volume_id.clone(), r);
                }
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "volume record names another volume: skipped")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "unreadable volume record skipped: {e}")
                }
            }
        }
        Ok(Records {
            dir,
            by_id: Mutex::new(by_id),
        })
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stores named by the volumes' attributes.
    pub fn stores(&self) -> std::collections::BTreeSet<String> {
        self.lock()
            .values()
            .filter_map(|r| r.volume_context.get(super::attr::STORE).cloned())
            .collect()
    }

    pub fn get(&self, volume_id: &str) -> Option<VolumeRecord> {
        self.lock().get(volume_id).cloned()
    }

    /// Writes the record durably, then makes it visible. Blocking: call from a blocking task.
    pub fn put(&self, r: &VolumeRecord) -> Result<(), Error> {
        assert!(is_volume_id(&r.volume_id), "records only hold cachevol ids");
        let path = self.path(&r.volume_id);
        let tmp = self.dir.join(format!(".{}.json.tmp", r.volume_id));
        let body = serde_json::to_vec_pretty(r).expect("a record serializes");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            sync_dir(&self.dir)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::Io(IoError::new("write volume record", &path, e))
        })?;
        self.lock().insert(r.volume_id.clone(), r.clone());
        Ok(())
    }

    /// Forgets a volume; `Ok(false)` when there was no record. Blocking.
    pub fn remove(&self, volume_id: &str) -> Result<bool, Error> {
        if !is_volume_id(volume_id) {
            return Ok(false);
        }
        let path = self.path(volume_id);
        let existed = match std::fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&self.dir).map_err(io("sync", &self.dir))?;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(IoError::new("remove volume record", &path, e).into()),
        };
        Ok(self.lock().remove(volume_id).is_some() || existed)
    }

    fn path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.json"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VolumeRecord>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_well_formed() {
        let a = volume_id("pvc-0f6c0e0a-1111-2222-3333-444455556666");
        assert_eq!(a, volume_id("pvc-0f6c0e0a-1111-2222-3333-444455556666"));
        assert_ne!(a, volume_id("pvc-other"));
        assert!(is_volume_id(&a), "{a}");
        assert_eq!(a.len(), 35);
        for bad in ["", "cv-", "cv-../../etc/passwd", "pvc-1", &a.to_uppercase()] {
            assert!(!is_volume_id(bad), "{bad}");
        }
    }

    #[test]
    fn records_survive_reopening_and_removal_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let ctx: BTreeMap<String, String> = [("key".to_string(), "npm".to_string())].into();
        let r = VolumeRecord::new("pvc-1", 1 << 30, ctx);
        {
            let recs = Records::open(dir.path()).unwrap();
            assert!(recs.is_empty());
            recs.put(&r).unwrap();
            assert_eq!(recs.get(&r.volume_id), Some(r.clone()));
        }
        // A crashed write leaves a temp file behind: ignored and cleaned.
        let tmp = dir.path().join("volumes").join(".cv-x.json.tmp");
        std::fs::write(&tmp, b"{").unwrap();
        // A damaged record is skipped, not fatal.
        std::fs::write(
            dir.path()
                .join("volumes")
                .join(format!("{}.json", volume_id("pvc-2"))),
            b"not json",
        )
        .unwrap();
        let recs = Records::open(dir.path()).unwrap();
        assert_eq!(recs.get(&r.volume_id), Some(r.clone()));
        assert_eq!(recs.len(), 1);
        assert!(!tmp.exists());
        assert!(recs.remove(&r.volume_id).unwrap());
        assert!(!recs.remove(&r.volume_id).unwrap());
        assert!(!recs.remove("../escape").unwrap());
        assert!(Records::open(dir.path())
            .unwrap()
            .get(&r.volume_id)
            .is_none());
    }
}

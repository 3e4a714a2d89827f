//! The per-volume in-flight guard: at most one call works on a volume at a time. The CO should
//! never overlap calls on one volume, but after a restart it may; the spec then lets the plugin
//! refuse the second call with ABORTED, and the CO retries with backoff.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::Error;

#[derive(Clone, Default)]
pub struct InFlight {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while a call works on a volume; dropping it frees the volume.
#[must_use = "the volume is free again as soon as the guard is dropped"]
pub struct Guard {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    /// Claims `key` (a volume id or name), or fails with `OperationPending` (ABORTED).
    pub fn begin(&self, key: &str) -> Result<Guard, Error> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(key.to_string()) {
            return Err(Error::OperationPending(key.to_string()));
        }
        Ok(Guard {
            busy: self.busy.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_call_on_a_busy_volume_is_aborted_until_the_first_ends() {
        let f = InFlight::default();
        let g = f.begin("cv-1").unwrap();
        let e = f.begin("cv-1").err().expect("busy");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Aborted);
        // Other volumes are not affected.
        let _other = f.begin("cv-2").unwrap();
        drop(g);
        assert!(f.begin("cv-1").is_ok());
    }
}

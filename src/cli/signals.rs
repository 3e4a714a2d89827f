//! The signals that stop a commit of the CLI (`cachevol commit`, the commit phase of `cachevol
//! run`): SIGINT (a terminal's Ctrl-C, sent to the whole process group) and SIGTERM (a CI
//! runner cancelling the job, often sent to cachevol alone) cancel it before its point of no
//! return, so no generation is created, and the process exits 128 + the signal.

use tokio::signal::unix::{signal, SignalKind};

use super::output::Out;
use crate::engine::Cancel;

/// Turns SIGINT and SIGTERM into a cancel request while it lives.
pub struct Stop {
    cancel: Cancel,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Stop {
    /// From now on SIGINT and SIGTERM request the cancel. Their default action (dying on the
    /// spot, which leaves the in-flight marker to go stale) is replaced for the rest of the
    /// process: tokio never restores it.
    pub fn watch(out: &Out) -> Stop {
        let cancel = Cancel::default();
        let streams = signal(SignalKind::interrupt())
            .and_then(|int| Ok((int, signal(SignalKind::terminate())?)));
        let task = match streams {
            Ok((mut int, mut term)) => {
                let c = cancel.clone();
                Some(tokio::spawn(async move {
                    let (by, sig) = tokio::select! {
                        _ = int.recv() => ("by SIGINT", libc::SIGINT),
                        _ = term.recv() => ("by SIGTERM", libc::SIGTERM),
                    };
                    c.request(by, Some(sig));
                }))
            }
            Err(e) => {
                // Not a reason to refuse the commit: it only cannot be stopped cleanly.
                out.warn(&format!("cannot watch for SIGINT and SIGTERM: {e}"));
                None
            }
        };
        Stop { cancel, task }
    }

    /// The request the signals make, for the engine (`Engine::with_cancel`).
    pub fn cancel(&self) -> Cancel {
        self.cancel.clone()
    }
}

impl Drop for Stop {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

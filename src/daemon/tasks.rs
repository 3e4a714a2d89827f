//! A supervised set of a daemon's long-running tasks. Each task is meant to run for the life of
//! the process (the cluster agent, the leader election, the garbage collector, the metrics
//! server); when one ends or panics while the gRPC server is still serving, the process must
//! not go on without it: [`Tasks::serve`] stops serving and returns an error, the process
//! exits non-zero, and kubelet or the Deployment restarts it.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinError, JoinSet};

/// A supervised task ended while the server was serving.
#[derive(Debug, thiserror::Error)]
#[error("the {task} stopped ({how}); exiting so that the process is restarted")]
pub struct TaskEnded {
    /// The task's name, as given to [`Tasks::spawn`].
    pub task: &'static str,
    /// `returned`, `panicked: <message>` or `was cancelled`.
    pub how: String,
}

/// Long-running tasks, aborted when the set is dropped.
#[derive(Default)]
pub struct Tasks {
    set: JoinSet<()>,
    names: HashMap<Id, &'static str>,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Starts `task`, which should never end; `name` says which one did if it does.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let id = self.set.spawn(task).id();
        self.names.insert(id, name);
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Runs `server` until it returns and gives back its result, unless a task ends first: then
    /// the server is dropped (it stops serving) and the error names the task. The remaining
    /// tasks are aborted either way.
    pub async fn serve<T>(mut self, server: impl Future<Output = T>) -> Result<T, TaskEnded> {
        tokio::pin!(server);
        // With no task left, `join_next_with_id` gives None and only the server is awaited.
        tokio::select! {
            out = &mut server => Ok(out),
            Some(ended) = self.set.join_next_with_id() => Err(self.ended(ended)),
        }
    }

    fn ended(&mut self, ended: Result<(Id, ()), JoinError>) -> TaskEnded {
        let (id, how) = match ended {
            Ok((id, ())) => (id, "returned".to_string()),
            Err(e) => {
                let id = e.id();
                let how = if e.is_panic() {
                    let payload = e.into_panic();
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "no message".to_string());
                    format!("panicked: {msg}")
                } else {
                    "was cancelled".to_string()
                };
                (id, how)
            }
        };
        TaskEnded {
            task: self.names.remove(&id).unwrap_or("unnamed task"),
            how,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Long enough never to be reached when the supervisor does its job; a hang would be the
    /// old behaviour (a dead task went unnoticed and the server kept serving).
    const NEVER: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_panicking_task_stops_the_server_and_is_named() {
        let mut tasks = Tasks::new();
        tasks.spawn("cluster agent", async { panic!("watch stream broke") });
        tasks.spawn("metrics server", std::future::pending());
        let serving = std::future::pending::<()>();
        let ended = tokio::time::timeout(NEVER, tasks.serve(serving))
            .await
            .expect("the server must stop when a task dies")
            .unwrap_err();
        assert_eq!(ended.task, "cluster agent");
        assert_eq!(ended.how, "panicked: watch stream broke");
        assert!(
            ended.to_string().contains("cluster agent stopped"),
            "{ended}"
        );
    }

    #[tokio::test]
    async fn a_task_that_returns_stops_the_server() {
        let mut tasks = Tasks::new();
        tasks.spawn("leader election", std::future::pending());
        tasks.spawn("garbage collector", async {
            tokio::time::sleep(Duration::from_millis(10)).await;
        });
        let ended = tokio::time::timeout(NEVER, tasks.serve(std::future::pending::<()>()))
            .await
            .expect("the server must stop when a task ends")
            .unwrap_err();
        assert_eq!(
            (ended.task, ended.how.as_str()),
            ("garbage collector", "returned")
        );
    }

    /// The server's own end (SIGTERM, an error) is the process's; the tasks are stopped.
    #[tokio::test]
    async fn the_servers_result_is_returned_and_the_tasks_are_stopped() {
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = Flag(dropped.clone());
        let mut tasks = Tasks::new();
        tasks.spawn("metrics server", async move {
            let _flag = flag;
            std::future::pending::<()>().await;
        });
        assert_eq!(tasks.len(), 1);
        let out = tasks.serve(async { Err::<(), _>("socket gone") }).await;
        assert_eq!(out.unwrap(), Err("socket gone"));
        // Aborting is asynchronous: wait for the task's state to be dropped.
        tokio::time::timeout(NEVER, async {
            while !dropped.load(Ordering::SeqCst) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the tasks are aborted when the server returns");
    }

    #[tokio::test]
    async fn without_tasks_the_server_runs_alone() {
        let tasks = Tasks::new();
        assert!(tasks.is_empty());
        assert_eq!(tasks.serve(async { 7 }).await.unwrap(), 7);
    }
}

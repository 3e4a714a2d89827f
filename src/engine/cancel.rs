//! Cancelling a commit from outside (the CLI on SIGINT or SIGTERM). A commit stops at its next
//! await until it reaches its point of no return, the create of its generation object; from
//! there it completes. So a cancelled commit never leaves behind a generation it did not
//! report, and a commit that passed the point is reported as committed, whenever the request
//! came.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::error::Error;

/// A request to cancel, shared by the one who asks and the commits that obey.
#[derive(Clone, Default)]
pub struct Cancel {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Default)]
struct State {
    /// Who asked ("by SIGTERM") and the signal, once someone did.
    requested: Option<(String, Option<i32>)>,
    /// A commit is between its point of no return and its end: a request waits for the next.
    committing: bool,
}

impl Cancel {
    /// Asks every commit that uses this to stop; a commit past its point of no return ends
    /// first (as committed), and every later one is refused before it starts.
    pub fn request(&self, by: impl Into<String>, signal: Option<i32>) {
        let mut s = self.inner.state.lock().expect("not poisoned");
        s.requested.get_or_insert((by.into(), signal));
        drop(s);
        self.inner.notify.notify_waiters();
    }

    fn error(requested: &(String, Option<i32>), key: &str) -> Error {
        Error::Cancelled {
            key: key.to_string(),
            by: requested.0.clone(),
            signal: requested.1,
        }
    }

    /// The cancellation error when someone asked.
    pub(crate) fn check(&self, key: &str) -> Result<(), Error> {
        match &self.inner.state.lock().expect("not poisoned").requested {
            Some(r) => Err(Cancel::error(r, key)),
            None => Ok(()),
        }
    }

    /// Resolves when a request must stop the running commit: never once it is past its point
    /// of no return. Race it against the commit (`select!`), which is then dropped.
    pub(crate) async fn requested(&self, key: &str) -> Error {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a request between the two is not missed.
            notified.as_mut().enable();
            {
                let s = self.inner.state.lock().expect("not poisoned");
                if let (Some(r), false) = (&s.requested, s.committing) {
                    return Cancel::error(r, key);
                }
            }
            notified.await;
        }
    }

    /// The point of no return, right before the generation is created: refused when someone
    /// asked already; otherwise requests no longer stop this commit until the guard is dropped
    /// (the create lost a race and the commit tries again, or the commit is over).
    pub(crate) fn no_return(&self, key: &str) -> Result<NoReturn, Error> {
        let mut s = self.inner.state.lock().expect("not poisoned");
        if let Some(r) = &s.requested {
            return Err(Cancel::error(r, key));
        }
        s.committing = true;
        Ok(NoReturn(self.clone()))
    }
}

/// Held from the point of no return until the commit is over or may stop again.
pub(crate) struct NoReturn(Cancel);

impl Drop for NoReturn {
    fn drop(&mut self) {
        self.0.inner.state.lock().expect("not poisoned").committing = false;
        // A request that came meanwhile now stops the commit at its next await, if any.
        self.0.inner.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_request_stops_a_commit_before_its_point_of_no_return_only() {
        let c = Cancel::default();
        assert!(c.check("k").is_ok());
        let guard = c.no_return("k").unwrap();
        c.request("by SIGTERM", Some(15));
        // Past the point: the request does not stop this commit.
        let waited = tokio::time::timeout(Duration::from_millis(50), c.requested("k")).await;
        assert!(
            waited.is_err(),
            "a commit past its point of no return was stopped"
        );
        drop(guard);
        let e = c.requested("k").await;
        assert!(
            matches!(
                e,
                Error::Cancelled {
                    signal: Some(15),
                    ..
                }
            ),
            "{e}"
        );
        assert!(c.no_return("k").is_err());
        assert!(c.check("k").is_err());
    }

    #[tokio::test]
    async fn a_waiting_commit_is_woken_by_a_request() {
        let c = Cancel::default();
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.requested("k").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.request("by SIGINT", Some(2));
        let e = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert!(e.to_string().contains("by SIGINT"), "{e}");
    }
}

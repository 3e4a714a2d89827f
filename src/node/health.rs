//! What the node knows of each store's health, from the requests its volumes make: when the
//! store last answered and since when every request has failed. NodeGetVolumeStats reports a
//! volume whose store has failed every request for a minute as abnormal. The node has no probe
//! of its own: it learns from the restores and commits of its pods.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::engine::store::AnswerHook;

/// How long every request to a store must have failed before its volumes are abnormal: long
/// enough that one slow or refused request, or a brief outage, is not news.
pub const FAILING_AFTER: Duration = Duration::from_secs(60);

/// The answers of one store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Answers {
    /// When the store last answered a request.
    pub last_answer: Option<Instant>,
    /// The first failure since then (None: the last request was answered, or none failed).
    pub first_failure: Option<Instant>,
}

impl Answers {
    /// Records one request's outcome at `now`.
    pub fn record(&mut self, answered: bool, now: Instant) {
        if answered {
            self.last_answer = Some(now);
            self.first_failure = None;
        } else if self.first_failure.is_none() {
            self.first_failure = Some(now);
        }
    }

    /// How long every request has failed, when that is at least `after`.
    pub fn failing_for(&self, now: Instant, after: Duration) -> Option<Duration> {
        let since = now.saturating_duration_since(self.first_failure?);
        (since >= after).then_some(since)
    }
}

/// The answers of every store the node's volumes use, by store URL.
#[derive(Default)]
pub struct StoreAnswers {
    by_store: Mutex<HashMap<String, Answers>>,
}

impl StoreAnswers {
    /// The hook that records the answers of store `url` (see `Store::on_answer`).
    pub fn hook(self: &Arc<Self>, url: &str) -> AnswerHook {
        let (this, url) = (self.clone(), url.to_string());
        Arc::new(move |answered| {
            this.by_store
                .lock()
                .expect("not poisoned")
                .entry(url.clone())
                .or_default()
                .record(answered, Instant::now())
        })
    }

    /// What store `url` answered so far (nothing when no request was made).
    pub fn of(&self, url: &str) -> Answers {
        self.by_store
            .lock()
            .expect("not poisoned")
            .get(url)
            .copied()
            .unwrap_or_default()
    }

    /// Sets what store `url` answered, as if its requests had.
    #[cfg(test)]
    pub fn set(&self, url: &str, answers: Answers) {
        let mut m = self.by_store.lock().expect("not poisoned");
        m.insert(url.to_string(), answers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_failing_once_every_request_failed_for_the_whole_window() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut a = Answers::default();
        assert_eq!(
            a.failing_for(s(1000), FAILING_AFTER),
            None,
            "no request yet"
        );
        a.record(true, s(0));
        a.record(false, s(10));
        a.record(false, s(40));
        assert_eq!(a.failing_for(s(69), FAILING_AFTER), None, "59s of failures");
        assert_eq!(
            a.failing_for(s(70), FAILING_AFTER),
            Some(Duration::from_secs(60))
        );
        // One answer in between: the failures start again from the next one.
        a.record(true, s(71));
        assert_eq!(a.failing_for(s(200), FAILING_AFTER), None);
        a.record(false, s(100));
        a.record(false, s(150));
        assert_eq!(a.failing_for(s(159), FAILING_AFTER), None);
        assert_eq!(
            a.failing_for(s(160), FAILING_AFTER),
            Some(Duration::from_secs(60))
        );
        assert_eq!(a.last_answer, Some(s(71)));
    }

    #[test]
    fn the_hook_records_per_store() {
        let answers = Arc::new(StoreAnswers::default());
        let (a, b) = (answers.hook("file:///a"), answers.hook("s3://b/"));
        a(false);
        b(true);
        assert!(answers.of("file:///a").first_failure.is_some());
        assert!(answers.of("file:///a").last_answer.is_none());
        assert!(answers.of("s3://b/").first_failure.is_none());
        assert!(answers.of("s3://b/").last_answer.is_some());
        assert_eq!(answers.of("gs://c/"), Answers::default());
    }
}

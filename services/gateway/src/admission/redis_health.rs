//! Whether the admission Redis (rate limits and budgets) is worth asking right now.
//!
//! Redis is an optimisation of accuracy, not a dependency: when it fails or answers slower than
//! the timeout, the caller decides in this replica's memory. Redis is *down* when it refuses a
//! call (connection refused or lost) or has missed the timeout on every call for
//! [`OUTAGE_AFTER`]; one slow answer is not an outage (on a busy host Redis may miss 20 ms now
//! and then, and treating that as down would send every call of the next probe interval to the
//! local decision). While Redis is down, only one call per [`PROBE_INTERVAL`] tries it, so an
//! outage does not add the timeout to every call; the first probe that succeeds brings the shared
//! state back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use llmesh_ratelimit::Failure;
use tokio::time::Instant;

/// While Redis is down, how often one call tries it again.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// How long Redis may keep missing the timeout, with no answer in between, before it is down.
pub(crate) const OUTAGE_AFTER: Duration = Duration::from_millis(250);

pub(crate) struct RedisHealth {
    /// For logs: the URL without its password.
    url: String,
    /// What Redis shares, for logs: "rate limits", "budgets".
    shares: &'static str,
    healthy: AtomicBool,
    start: Instant,
    /// Milliseconds since `start` before which no call tries Redis again (while down).
    next_probe: AtomicU64,
    /// Milliseconds since `start`, plus one, of the first timeout since Redis last answered;
    /// zero when it answered last.
    slow_since: AtomicU64,
}

impl RedisHealth {
    /// `url` is logged as given: pass it redacted.
    pub(crate) fn new(url: String, shares: &'static str) -> Self {
        Self {
            url,
            shares,
            healthy: AtomicBool::new(true),
            start: Instant::now(),
            next_probe: AtomicU64::new(0),
            slow_since: AtomicU64::new(0),
        }
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Whether Redis answered the last time it was asked (a lone slow answer aside).
    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether this call should ask Redis: always while healthy, else one call per probe interval.
    pub(crate) fn should_try(&self) -> bool {
        if self.healthy() {
            return true;
        }
        let now = self.millis();
        let next = self.next_probe.load(Ordering::Relaxed);
        now >= next
            && self
                .next_probe
                .compare_exchange(next, now + PROBE_INTERVAL.as_millis() as u64, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Redis answered.
    pub(crate) fn answered(&self) {
        self.slow_since.store(0, Ordering::Relaxed);
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!(url = %self.url, "Redis answers again; {} are shared again", self.shares);
        }
    }

    /// Redis failed this call: down at once when it refused it, after [`OUTAGE_AFTER`] of
    /// timeouts when it was only slow.
    pub(crate) fn failed(&self, failure: &Failure) {
        if matches!(failure, Failure::Timeout(_)) && !self.slow_for_too_long() {
            tracing::debug!(url = %self.url, "Redis answered slower than the timeout; this call decides locally");
            return;
        }
        self.slow_since.store(0, Ordering::Relaxed);
        self.next_probe.store(self.millis() + PROBE_INTERVAL.as_millis() as u64, Ordering::Relaxed);
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                url = %self.url,
                error = %failure,
                "Redis unavailable; each gateway replica decides {} on its own until it answers",
                self.shares
            );
        } else {
            tracing::debug!(error = %failure, "Redis still unavailable");
        }
    }

    /// Records a timeout; whether Redis has now missed the timeout for [`OUTAGE_AFTER`].
    fn slow_for_too_long(&self) -> bool {
        let now = self.millis().saturating_add(1);
        let since = match self.slow_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => now,
            Err(since) => since,
        };
        now.saturating_sub(since) >= OUTAGE_AFTER.as_millis() as u64
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> RedisHealth {
        RedisHealth::new("redis://127.0.0.1:6379/".into(), "rate limits")
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_call_is_an_outage_at_once_and_probes_are_spaced() {
        let health = health();
        health.failed(&Failure::Reply([0; 5]));
        assert!(!health.healthy());
        assert!(!health.should_try(), "no probe before the interval");
        tokio::time::advance(PROBE_INTERVAL).await;
        assert!(health.should_try());
        assert!(!health.should_try(), "one probe per interval");
        health.answered();
        assert!(health.healthy() && health.should_try());
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_are_an_outage_only_once_they_last() {
        let health = health();
        let timeout = Failure::Timeout(Duration::from_millis(20));
        health.failed(&timeout);
        assert!(health.healthy(), "one slow answer is not an outage");
        tokio::time::advance(OUTAGE_AFTER / 2).await;
        health.failed(&timeout);
        assert!(health.healthy());
        health.answered();
        tokio::time::advance(OUTAGE_AFTER).await;
        health.failed(&timeout);
        assert!(health.healthy(), "an answer in between starts the count again");
        tokio::time::advance(OUTAGE_AFTER).await;
        health.failed(&timeout);
        assert!(!health.healthy(), "timeouts for {OUTAGE_AFTER:?} with no answer");
    }
}

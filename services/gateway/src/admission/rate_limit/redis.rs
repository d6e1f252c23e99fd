//! The limit shared by every gateway replica: the GCRA script on Redis, with Redis' clock
//! ([`llmesh_ratelimit::RedisGcra`]), and whether Redis is worth asking right now.
//!
//! Redis is an optimisation of accuracy, not a dependency: when it fails or answers slower than
//! the timeout, the caller decides locally. While Redis is down, only one call per
//! [`PROBE_INTERVAL`] tries it (so an outage does not add the timeout to every call); the first
//! probe that succeeds brings the shared limit back.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use llmesh_ratelimit::{Cost, Decision, Failure, Limit, RedisGcra};
use tokio::time::Instant;

/// While Redis is down, how often one call tries it again.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_millis(500);

pub(super) struct RedisLimiter {
    gcra: RedisGcra,
    /// For logs: the URL without its password.
    url: String,
    healthy: AtomicBool,
    start: Instant,
    /// Milliseconds since `start` before which no call tries Redis again (while unhealthy).
    next_probe: AtomicU64,
}

impl RedisLimiter {
    /// A lazy connection: nothing is sent until the first call. Needs a Tokio runtime.
    pub(super) fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let redacted = llmesh_util::redact::redact_url(url);
        let gcra = RedisGcra::new(url, timeout).with_context(|| format!("invalid rate_limit.redis_url {redacted}"))?;
        Ok(Self {
            gcra,
            url: redacted,
            healthy: AtomicBool::new(true),
            start: Instant::now(),
            next_probe: AtomicU64::new(0),
        })
    }

    /// Connects (and loads the script) ahead of the first call. A failure is logged, not fatal:
    /// the local limiter decides until Redis answers.
    pub(super) async fn warm_up(&self) {
        match self.gcra.warm_up().await {
            Ok(()) => tracing::info!(url = %self.url, "rate limits shared through Redis"),
            Err(failure) => self.failed(&failure),
        }
    }

    pub(super) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether this call should ask Redis: always while healthy, else one call per probe interval.
    pub(super) fn should_try(&self) -> bool {
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

    /// Runs the script for `key`, within the timeout, and records whether Redis answered.
    pub(super) async fn decide(&self, key: &str, limit: Limit, cost: Cost) -> Result<Decision, Failure> {
        let result = self.gcra.decide(key, limit, cost).await;
        match &result {
            Ok(_) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(url = %self.url, "Redis answers again; rate limits are shared again");
                }
            }
            Err(failure) => self.failed(failure),
        }
        result
    }

    fn failed(&self, failure: &Failure) {
        self.next_probe.store(self.millis() + PROBE_INTERVAL.as_millis() as u64, Ordering::Relaxed);
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                url = %self.url,
                error = %failure,
                "Redis unavailable; each gateway replica limits on its own until it answers"
            );
        } else {
            tracing::debug!(error = %failure, "Redis still unavailable");
        }
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

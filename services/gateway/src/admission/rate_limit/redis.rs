//! The limit shared by every gateway replica: the GCRA script on Redis, with Redis' clock.
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
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use super::gcra::{Cost, Decision, Limit, SCRIPT};

/// While Redis is down, how often one call tries it again.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// How long the first connection may take, in the background, at start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Reconnection attempts per failure: few, so that a failed attempt gives way to a fresh one soon
/// after Redis is back rather than sleeping through a long backoff.
const RECONNECT_RETRIES: usize = 1;

pub(super) struct RedisLimiter {
    conn: ConnectionManager,
    script: redis::Script,
    timeout: Duration,
    /// For logs: the URL without its password.
    url: String,
    healthy: AtomicBool,
    start: Instant,
    /// Milliseconds since `start` before which no call tries Redis again (while unhealthy).
    next_probe: AtomicU64,
}

/// Why Redis did not decide.
#[derive(Debug, thiserror::Error)]
pub(super) enum RedisFailure {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply {0:?}")]
    Reply([i64; 5]),
}

impl RedisLimiter {
    /// A lazy connection: nothing is sent until the first call. Needs a Tokio runtime.
    pub(super) fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let redacted = llmesh_common::redact::redact_url(url);
        let client = redis::Client::open(url).with_context(|| format!("invalid rate_limit.redis_url {redacted}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(timeout.max(CONNECT_TIMEOUT)))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .with_context(|| format!("cannot set up the Redis connection to {redacted}"))?;
        Ok(Self {
            conn,
            script: redis::Script::new(SCRIPT),
            timeout,
            url: redacted,
            healthy: AtomicBool::new(true),
            start: Instant::now(),
            next_probe: AtomicU64::new(0),
        })
    }

    /// Connects (and loads the script) ahead of the first call. A failure is logged, not fatal:
    /// the local limiter decides until Redis answers.
    pub(super) async fn warm_up(&self) {
        let mut conn = self.conn.clone();
        let invocation = self.script.prepare_invoke();
        match tokio::time::timeout(CONNECT_TIMEOUT, invocation.load_async(&mut conn)).await {
            Ok(Ok(_)) => tracing::info!(url = %self.url, "rate limits shared through Redis"),
            Ok(Err(error)) => self.failed(&RedisFailure::Redis(error)),
            Err(_) => self.failed(&RedisFailure::Timeout(CONNECT_TIMEOUT)),
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
    pub(super) async fn decide(&self, key: &str, limit: Limit, cost: Cost) -> Result<Decision, RedisFailure> {
        let result = self.invoke(key, limit, cost).await;
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

    async fn invoke(&self, key: &str, limit: Limit, cost: Cost) -> Result<Decision, RedisFailure> {
        let (amount, force) = cost.as_args();
        let interval_ns = u64::try_from(limit.interval.as_nanos()).unwrap_or(u64::MAX);
        let mut conn = self.conn.clone();
        let mut invocation = self.script.key(key);
        invocation.arg(interval_ns).arg(limit.burst).arg(amount).arg(force);
        let reply: [i64; 5] = match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
            Ok(reply) => reply?,
            Err(_) => return Err(RedisFailure::Timeout(self.timeout)),
        };
        decision_from_reply(reply).ok_or(RedisFailure::Reply(reply))
    }

    fn failed(&self, failure: &RedisFailure) {
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

/// The script's reply `{allowed, new_tat, retry_after_us, remaining, now}` as a decision.
pub fn decision_from_reply([allowed, new_tat, retry_after, remaining, _now]: [i64; 5]) -> Option<Decision> {
    Some(Decision {
        allowed: match allowed {
            0 => false,
            1 => true,
            _ => return None,
        },
        new_tat: u64::try_from(new_tat).ok()?,
        retry_after: Duration::from_micros(u64::try_from(retry_after).ok()?),
        remaining: u64::try_from(remaining).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_checked() {
        let decision = decision_from_reply([1, 5, 0, 3, 4]).unwrap();
        assert_eq!((decision.allowed, decision.new_tat, decision.remaining), (true, 5, 3));
        assert_eq!(decision_from_reply([2, 5, 0, 3, 4]), None);
        assert_eq!(decision_from_reply([0, -5, 0, 3, 4]), None);
    }
}

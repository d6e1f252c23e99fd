//! The limit shared by every gateway replica: the GCRA script on Redis, with Redis' clock
//! ([`llmesh_ratelimit::RedisGcra`]), asked while [`RedisHealth`] says it is worth asking.

use std::time::Duration;

use anyhow::Context as _;
use llmesh_ratelimit::{Cost, Decision, Failure, Limit, RedisGcra};

use crate::admission::redis_health::RedisHealth;

pub(super) struct RedisLimiter {
    gcra: RedisGcra,
    health: RedisHealth,
}

impl RedisLimiter {
    /// A lazy connection: nothing is sent until the first call. Needs a Tokio runtime.
    pub(super) fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let redacted = llmesh_util::redact::redact_url(url);
        let gcra = RedisGcra::new(url, timeout).with_context(|| format!("invalid rate_limit.redis_url {redacted}"))?;
        Ok(Self { gcra, health: RedisHealth::new(redacted, "rate limits") })
    }

    /// Connects (and loads the script) ahead of the first call. A failure is logged, not fatal:
    /// the local limiter decides until Redis answers.
    pub(super) async fn warm_up(&self) {
        match self.gcra.warm_up().await {
            Ok(()) => tracing::info!(url = %self.health.url(), "rate limits shared through Redis"),
            Err(failure) => self.health.failed(&failure),
        }
    }

    pub(super) fn healthy(&self) -> bool {
        self.health.healthy()
    }

    /// Whether this call should ask Redis.
    pub(super) fn should_try(&self) -> bool {
        self.health.should_try()
    }

    /// Runs the script for `key`, within the timeout, and records whether Redis answered.
    pub(super) async fn decide(&self, key: &str, limit: Limit, cost: Cost) -> Result<Decision, Failure> {
        let result = self.gcra.decide(key, limit, cost).await;
        match &result {
            Ok(_) => self.health.answered(),
            Err(failure) => self.health.failed(failure),
        }
        result
    }
}

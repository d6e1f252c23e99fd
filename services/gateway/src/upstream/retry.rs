//! Retries: only for codes that say another try may succeed, within a budget (a share of recent
//! calls, so a struggling upstream is not hit with a retry storm), with exponential backoff and
//! jitter, honouring the upstream's pushback.

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tonic::{Code, Status};
use tower::retry::budget::{Budget as _, TpsBudget};

use crate::metrics::{label, metrics};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Retries allowed as a share of calls, over `budget_window_ms`.
    pub budget_ratio: f32,
    /// Retries per second allowed whatever the traffic.
    pub budget_min_per_second: u32,
    pub budget_window_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            budget_ratio: 0.2,
            budget_min_per_second: 10,
            budget_window_ms: 10_000,
            backoff_base_ms: 25,
            backoff_max_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Retry {
    config: RetryConfig,
    budget: Arc<TpsBudget>,
}

/// A failure another attempt (on another replica) may fix.
pub fn is_retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded)
}

/// The upstream's `grpc-retry-pushback-ms`: how long to wait, or `Err` when it says not to retry.
pub fn pushback(status: &Status) -> Option<Result<Duration, ()>> {
    let value = status.metadata().get("grpc-retry-pushback-ms")?.to_str().ok()?;
    Some(value.trim().parse::<u64>().map(Duration::from_millis).map_err(|_| ()))
}

impl Retry {
    pub fn new(config: RetryConfig) -> Self {
        let budget = TpsBudget::new(
            Duration::from_millis(config.budget_window_ms.max(1_000)),
            config.budget_min_per_second,
            config.budget_ratio,
        );
        Self { config, budget: Arc::new(budget) }
    }

    /// Every call adds to the budget.
    pub fn deposit(&self) {
        self.budget.deposit();
    }

    /// How long to wait before attempt `attempt + 1` after `status`, or `None` to stop here:
    /// not retryable, out of attempts, pushback says no or says longer than `remaining`, or the
    /// budget is spent (counted under `endpoint`).
    pub fn next(&self, endpoint: &'static str, attempt: u32, status: &Status, remaining: Duration) -> Option<Duration> {
        if !is_retryable(status.code()) || attempt >= self.config.max_attempts {
            return None;
        }
        let wait = match pushback(status) {
            Some(Ok(wait)) => wait,
            Some(Err(())) => return None,
            None => self.backoff(attempt),
        };
        if wait >= remaining {
            return None;
        }
        if !self.budget.withdraw() {
            metrics().retry_budget_exhausted.add(1, &[label("endpoint", endpoint)]);
            return None;
        }
        metrics()
            .retries
            .add(1, &[label("endpoint", endpoint), label("reason", llmesh_telemetry::code_name(status.code()))]);
        Some(wait)
    }

    /// `base * 2^(attempt-1)`, capped, with ±20% jitter.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.config.backoff_base_ms.saturating_mul(1 << attempt.saturating_sub(1).min(16));
        let capped = base.min(self.config.backoff_max_ms) as f64;
        Duration::from_secs_f64(capped * (0.8 + 0.4 * fastrand::f64()) / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unavailable() -> Status {
        Status::unavailable("down")
    }

    #[tokio::test(start_paused = true)]
    async fn retries_only_what_may_succeed() {
        let retry = Retry::new(RetryConfig::default());
        let long = Duration::from_secs(10);
        assert!(retry.next("Generate", 1, &unavailable(), long).is_some());
        assert!(retry.next("Generate", 1, &Status::invalid_argument("bad"), long).is_none());
        assert!(retry.next("Generate", 3, &unavailable(), long).is_none(), "out of attempts");
        assert!(retry.next("Generate", 1, &unavailable(), Duration::from_millis(1)).is_none(), "no time left");
    }

    #[tokio::test(start_paused = true)]
    async fn honours_pushback() {
        let retry = Retry::new(RetryConfig::default());
        let mut status = Status::resource_exhausted("slow down");
        status.metadata_mut().insert("grpc-retry-pushback-ms", "300".parse().unwrap());
        assert_eq!(retry.next("Generate", 1, &status, Duration::from_secs(10)), Some(Duration::from_millis(300)));
        assert_eq!(retry.next("Generate", 1, &status, Duration::from_millis(200)), None, "pushback past the deadline");
        status.metadata_mut().insert("grpc-retry-pushback-ms", "-1".parse().unwrap());
        assert_eq!(
            retry.next("Generate", 1, &status, Duration::from_secs(10)),
            None,
            "negative pushback: do not retry"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_to_a_share_of_calls() {
        let config = RetryConfig { budget_min_per_second: 0, budget_ratio: 0.2, ..RetryConfig::default() };
        let retry = Retry::new(config);
        for _ in 0..100 {
            retry.deposit();
        }
        let granted =
            (0..100).filter(|_| retry.next("Generate", 1, &unavailable(), Duration::from_secs(10)).is_some()).count();
        assert!((15..=25).contains(&granted), "granted {granted} retries for 100 calls at 20%");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let retry = Retry::new(RetryConfig::default());
        let first = retry.backoff(1);
        assert!(first >= Duration::from_millis(20) && first <= Duration::from_millis(30), "{first:?}");
        let late = retry.backoff(20);
        assert!(late <= Duration::from_millis(1_200), "{late:?}");
    }
}

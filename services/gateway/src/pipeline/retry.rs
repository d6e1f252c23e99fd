//! Retries, as tower's `Retry` with our [`RetryPolicy`]: only what another attempt may fix
//! ([`UpstreamError::is_retryable`]), at most `max_attempts` tries, within a budget (a share of
//! recent calls, so a struggling generation is not hit with a retry storm), after a backoff with
//! jitter or the upstream's pushback, and never past the call's deadline.
//!
//! The budget is two: the gateway's (a share of every call) and the caller's key's (the same
//! share of that key's own calls, and [`KEY_MIN_PER_SECOND`]). A retry takes from both, so a key
//! whose calls keep failing spends what its own calls put in, not the retries of the others.
//!
//! A stream is retried only until its first chunk: the balancer answers a stream once its first
//! chunk has arrived, and from there on nothing is an error of this layer's.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::time::Sleep;
use tower::retry::{
    Policy,
    budget::{Budget as _, TpsBudget},
};

use super::{Call, Reply, UpstreamError};
use crate::metrics::{label, metrics};

/// `[gateway.generation.retry]`.
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

/// Retries a key may make each second whatever its own traffic: a key with few calls can still
/// retry now and then.
pub const KEY_MIN_PER_SECOND: u32 = 1;
/// Most keys with a budget of their own (the keys file bounds them; a reload may bring new ones).
/// Past it, a key without one retries within the gateway's budget alone.
const MAX_KEY_BUDGETS: usize = 10_000;

/// The policy tower's `Retry` asks. Cloned per call: `attempts` is that call's.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    config: Arc<RetryConfig>,
    budgets: Arc<Budgets>,
    attempts: u32,
}

#[derive(Debug)]
struct Budgets {
    gateway: TpsBudget,
    per_key: Mutex<HashMap<Arc<str>, Arc<TpsBudget>>>,
}

impl Budgets {
    fn window(config: &RetryConfig) -> Duration {
        Duration::from_millis(config.budget_window_ms.max(1_000))
    }

    /// `key`'s budget, made on its first call.
    fn of(&self, key: &Arc<str>, config: &RetryConfig) -> Option<Arc<TpsBudget>> {
        let mut per_key = self.per_key.lock().ok()?;
        if let Some(budget) = per_key.get(key) {
            return Some(budget.clone());
        }
        if per_key.len() >= MAX_KEY_BUDGETS {
            return None;
        }
        let budget = Arc::new(TpsBudget::new(Self::window(config), KEY_MIN_PER_SECOND, config.budget_ratio));
        per_key.insert(key.clone(), budget.clone());
        Some(budget)
    }
}

impl RetryPolicy {
    pub fn new(config: RetryConfig) -> Self {
        let gateway = TpsBudget::new(Budgets::window(&config), config.budget_min_per_second, config.budget_ratio);
        let budgets = Arc::new(Budgets { gateway, per_key: Mutex::default() });
        Self { config: Arc::new(config), budgets, attempts: 0 }
    }

    /// `base * 2^(attempt-1)`, capped, with ±20% jitter.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.config.backoff_base_ms.saturating_mul(1 << attempt.saturating_sub(1).min(16));
        let capped = base.min(self.config.backoff_max_ms) as f64;
        Duration::from_secs_f64(capped * (0.8 + 0.4 * fastrand::f64()) / 1000.0)
    }

    /// How long to wait before another attempt after `error`, or `None` to stop here.
    fn next(&mut self, call: &Call, error: &UpstreamError) -> Option<Duration> {
        self.attempts += 1;
        if !error.is_retryable() || self.attempts >= self.config.max_attempts {
            return None;
        }
        let wait = match error.pushback() {
            Some(Some(wait)) => wait,
            Some(None) => return None,
            None => self.backoff(self.attempts),
        };
        if wait >= call.deadline.remaining() {
            return None;
        }
        let method = call.ask.method();
        let key = self.budgets.of(&call.caller.id, &self.config);
        // The key's first: a key past its own share must not take the gateway's.
        if !key.is_none_or(|key| key.withdraw()) || !self.budgets.gateway.withdraw() {
            metrics().retry_budget_exhausted.add(1, &[label("endpoint", method)]);
            return None;
        }
        metrics().retries.add(1, &[label("endpoint", method), label("reason", error.label())]);
        tracing::debug!(method, attempt = self.attempts, wait_ms = wait.as_millis() as u64, error = %error, "retrying generation");
        Some(wait)
    }
}

impl Policy<Call, Reply, UpstreamError> for RetryPolicy {
    type Future = Sleep;

    fn retry(&mut self, call: &mut Call, result: &mut Result<Reply, UpstreamError>) -> Option<Self::Future> {
        let error = result.as_ref().err()?;
        let wait = self.next(call, error)?;
        call.attempt = self.attempts + 1;
        Some(tokio::time::sleep(wait))
    }

    fn clone_request(&mut self, call: &Call) -> Option<Call> {
        // tower asks the service's own policy once per call, before the first attempt (its clone
        // for the call asks again only before a retry): every call adds to the budget.
        if self.attempts == 0 {
            self.budgets.gateway.deposit();
            if let Some(key) = self.budgets.of(&call.caller.id, &self.config) {
                key.deposit();
            }
        }
        Some(call.clone())
    }
}

#[cfg(test)]
mod tests {
    use tonic::Status;
    use tower::{Layer as _, ServiceExt as _, retry::RetryLayer};
    use tower_test::mock;

    use super::*;
    use crate::{deadline::Deadline, pipeline::testing};

    fn unavailable() -> UpstreamError {
        UpstreamError::from_client(Status::unavailable("down"))
    }

    fn policy(config: RetryConfig) -> RetryPolicy {
        RetryPolicy::new(config)
    }

    fn call() -> Call {
        testing::generate("hello", Deadline::after(Duration::from_secs(10)))
    }

    #[tokio::test(start_paused = true)]
    async fn retries_only_what_may_succeed_and_stops_after_max_attempts() {
        let mut retry = policy(RetryConfig::default());
        assert!(retry.next(&call(), &unavailable()).is_some());
        assert!(retry.next(&call(), &unavailable()).is_some());
        assert!(retry.next(&call(), &unavailable()).is_none(), "three attempts in all");
        let mut retry = policy(RetryConfig::default());
        assert!(retry.next(&call(), &UpstreamError::from_client(Status::invalid_argument("bad"))).is_none());
        let short = testing::generate("hello", Deadline::after(Duration::from_millis(1)));
        assert!(policy(RetryConfig::default()).next(&short, &unavailable()).is_none(), "no time left");
    }

    #[tokio::test(start_paused = true)]
    async fn honours_pushback() {
        let mut status = Status::resource_exhausted("slow down");
        status.metadata_mut().insert("grpc-retry-pushback-ms", "300".parse().unwrap());
        let slow_down = UpstreamError::from_client(status);
        assert_eq!(policy(RetryConfig::default()).next(&call(), &slow_down), Some(Duration::from_millis(300)));
        let short = testing::generate("hello", Deadline::after(Duration::from_millis(200)));
        assert_eq!(policy(RetryConfig::default()).next(&short, &slow_down), None, "pushback past the deadline");
        let mut status = Status::resource_exhausted("stop");
        status.metadata_mut().insert("grpc-retry-pushback-ms", "-1".parse().unwrap());
        assert_eq!(policy(RetryConfig::default()).next(&call(), &UpstreamError::from_client(status)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_to_a_share_of_calls() {
        let config = RetryConfig { budget_min_per_second: 0, budget_ratio: 0.2, ..RetryConfig::default() };
        let mut shared = policy(config);
        for _ in 0..100 {
            shared.clone_request(&call());
        }
        let granted = (0..100).filter(|_| shared.clone().next(&call(), &unavailable()).is_some()).count();
        assert!((15..=25).contains(&granted), "granted {granted} retries for 100 calls at 20%");
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_whose_calls_keep_failing_spends_its_own_budget_not_the_others() {
        let config = RetryConfig { budget_min_per_second: 0, budget_ratio: 0.2, ..RetryConfig::default() };
        let mut shared = policy(config);
        let of = |id: &str| {
            let mut call = call();
            call.caller = crate::principal::Principal { id: id.into(), ..crate::principal::Principal::anonymous() };
            call
        };
        // Both keys make 100 calls: the gateway's budget allows 40 retries.
        for _ in 0..100 {
            shared.clone_request(&of("noisy"));
            shared.clone_request(&of("quiet"));
        }
        // The noisy key's calls all fail: it gets its own share and the one a second its key may
        // always have (10 over the 10 s window), 30 at most, though the gateway's has room for 40.
        let noisy = (0..100).filter(|_| shared.clone().next(&of("noisy"), &unavailable()).is_some()).count();
        assert!((25..=31).contains(&noisy), "the noisy key got {noisy} retries");
        // So the quiet key still has retries.
        let quiet = (0..100).filter(|_| shared.clone().next(&of("quiet"), &unavailable()).is_some()).count();
        assert!(quiet >= 8, "the quiet key got {quiet} retries");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let retry = policy(RetryConfig::default());
        let first = retry.backoff(1);
        assert!(first >= Duration::from_millis(20) && first <= Duration::from_millis(30), "{first:?}");
        assert!(retry.backoff(20) <= Duration::from_millis(1_200));
    }

    #[tokio::test(start_paused = true)]
    async fn as_a_layer_it_tries_again_after_a_backoff_then_answers() {
        let (service, mut handle) = mock::pair::<Call, Reply>();
        let retrying = RetryLayer::new(policy(RetryConfig::default())).layer(testing::fail_with(service));
        let started = tokio::time::Instant::now();
        let call = tokio::spawn(retrying.oneshot(call()));
        let (first, respond) = handle.next_request().await.unwrap();
        assert_eq!(first.attempt, 1);
        respond.send_error(testing::Fail(unavailable()));
        let (second, respond) = handle.next_request().await.unwrap();
        assert_eq!(second.attempt, 2);
        assert!(started.elapsed() >= Duration::from_millis(20), "waited {:?}", started.elapsed());
        respond.send_response(testing::answer("second time lucky"));
        assert!(matches!(call.await.unwrap(), Ok(Reply::Generated(r)) if r.text == "second time lucky"));
    }
}

//! Circuit breakers, charged with what failed.
//!
//! Every replica has a breaker of its own, for failures of the replica (its process, its
//! connection), and one per model it serves, for failures of that model's upstream and for
//! timeouts (a replica slow for one model may be fine for the others; a hung replica is slow for
//! every model and so ends up avoided for each). A dead upstream for model X opens X's breakers
//! and leaves model Y alone; a dead replica opens its own breaker and every model moves to the
//! others. What counts is [`UpstreamError::charge`]: a client's mistake, a deadline the client
//! chose, or a call that never reached a replica counts for nothing.
//!
//! The breakers live with their endpoint ([`Breakers`]), because the balancer must skip the
//! endpoints whose breakers refuse the call before it picks one. This layer sits outside the
//! per-try timeout and charges each attempt's outcome — a timeout included — to the replica and
//! model the balancer picked (the [`Lease`] it left in the attempt's pick slot). The gate (the
//! balancer's skip) and the charge (this layer) cannot be used apart: this layer makes each
//! [`Attempt`](crate::pipeline::Attempt), and the balancer takes nothing else.
//!
//! Per-model breakers are made on a model's first counted failure and dropped once closed and
//! quiet, at most [`MAX_MODEL_BREAKERS`] per replica: a model past that bound is guarded only by
//! the replica's breaker (and logged), so no map grows with names a client sends.

mod future;
mod layer;
mod state;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use future::ResponseFuture;
pub use layer::{BreakerLayer, ChargeOutcomes};
pub use state::{Breaker, Outcome, Permit, Scope, State};

use super::{Charge, UpstreamError};

/// Most per-model breakers one replica keeps.
pub const MAX_MODEL_BREAKERS: usize = 256;

/// `[gateway.generation.breaker]`: the same settings for every breaker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Failures in a row that open a breaker.
    pub consecutive_failures: u32,
    /// How long an open breaker stays open before one probe may try (60 s, as in the seed).
    pub recovery_ms: u64,
    /// The time window the failure rate is measured over (whole seconds).
    pub window_ms: u64,
    /// Fewest calls in the window before the rate can open a breaker.
    pub min_calls: u32,
    /// Share of failed calls over the window that opens a breaker; 1 or more turns this off.
    pub failure_rate: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { consecutive_failures: 5, recovery_ms: 60_000, window_ms: 10_000, min_calls: 10, failure_rate: 0.5 }
    }
}

impl BreakerConfig {
    fn recovery(&self) -> Duration {
        Duration::from_millis(self.recovery_ms)
    }

    /// failsafe counts the window in whole seconds.
    fn window(&self) -> Duration {
        Duration::from_secs(self.window_ms.div_ceil(1_000).max(1))
    }
}

/// One replica's breakers: its own and one per model that has failed on it.
#[derive(Debug)]
pub struct Breakers {
    config: BreakerConfig,
    endpoint: Arc<str>,
    replica: Breaker,
    models: Mutex<HashMap<Arc<str>, Arc<Breaker>>>,
}

/// Leave to call one model on one replica: the replica's permit and, when the model has a
/// breaker there, the model's.
#[derive(Debug)]
pub struct Permits {
    replica: Option<Permit>,
    model: Option<(Arc<Breaker>, Permit)>,
}

impl Breakers {
    pub fn new(config: &BreakerConfig, endpoint: &str) -> Self {
        let endpoint: Arc<str> = endpoint.into();
        let replica = Breaker::new(config, Scope { endpoint: endpoint.clone(), model: None });
        Self { config: config.clone(), endpoint, replica, models: Mutex::default() }
    }

    /// The replica's own breaker.
    pub fn replica(&self) -> &Breaker {
        &self.replica
    }

    /// The per-model breakers there are now.
    pub fn models(&self) -> Vec<Arc<Breaker>> {
        self.models.lock().map(|models| models.values().cloned().collect()).unwrap_or_default()
    }

    fn model(&self, model: &str) -> Option<Arc<Breaker>> {
        self.models.lock().ok()?.get(model).cloned()
    }

    /// True when a call for `model` would be let through now (without taking a probe).
    pub fn available(&self, model: Option<&str>) -> bool {
        self.replica.available() && model.and_then(|m| self.model(m)).is_none_or(|b| b.available())
    }

    /// Leave to call `model` here, or `None` when a breaker refuses.
    pub fn try_acquire(&self, model: Option<&str>) -> Option<Permits> {
        let replica = self.replica.try_acquire()?;
        let model = match model.and_then(|m| self.model(m)) {
            None => None,
            Some(breaker) => match breaker.try_acquire() {
                Some(permit) => Some((breaker, permit)),
                None => {
                    self.replica.release(replica);
                    return None;
                }
            },
        };
        Some(Permits { replica: Some(replica), model })
    }

    /// Charges a finished attempt for `model` to what failed, and tells the others it worked
    /// when it did.
    pub fn record(&self, mut permits: Permits, model: Option<&str>, result: Result<(), &UpstreamError>) {
        let (replica, for_model) = match result {
            Ok(()) => (Outcome::Success, Outcome::Success),
            Err(error) => match error.charge() {
                Some(Charge::Replica) => (Outcome::Failure, Outcome::Ignored),
                // The replica answered (its upstream failed) or may be fine for other models.
                Some(Charge::Model) => (Outcome::Ignored, Outcome::Failure),
                // The replica and the upstream answered; the client was at fault.
                None if matches!(error, UpstreamError::Status { .. }) => (Outcome::Success, Outcome::Success),
                None => (Outcome::Ignored, Outcome::Ignored),
            },
        };
        if let Some(permit) = permits.replica.take() {
            self.replica.record(permit, replica);
        }
        match (permits.model.take(), model) {
            (Some((breaker, permit)), _) => {
                let probe = permit.is_probe();
                breaker.record(permit, for_model);
                if probe && breaker.state() == State::Closed {
                    self.forget_if_closed(&breaker);
                }
            }
            (None, Some(model)) if for_model == Outcome::Failure => {
                if let Some(breaker) = self.model_breaker(model)
                    && let Some(permit) = breaker.try_acquire()
                {
                    breaker.record(permit, Outcome::Failure);
                }
            }
            (None, _) => {}
        }
    }

    /// The model's breaker, made on its first counted failure (within the bound).
    fn model_breaker(&self, model: &str) -> Option<Arc<Breaker>> {
        let mut models = self.models.lock().ok()?;
        if let Some(breaker) = models.get(model) {
            return Some(breaker.clone());
        }
        if models.len() >= MAX_MODEL_BREAKERS {
            models.retain(|_, breaker| breaker.state() != State::Closed || Arc::strong_count(breaker) > 1);
        }
        if models.len() >= MAX_MODEL_BREAKERS {
            tracing::warn!(endpoint = %self.endpoint, model, "too many per-model breakers; this model is guarded by the replica's only");
            return None;
        }
        let model: Arc<str> = model.into();
        let breaker =
            Arc::new(Breaker::new(&self.config, Scope { endpoint: self.endpoint.clone(), model: Some(model.clone()) }));
        models.insert(model, breaker.clone());
        Some(breaker)
    }

    /// A model breaker closed again by a successful probe has nothing left to remember.
    fn forget_if_closed(&self, breaker: &Arc<Breaker>) {
        if let (Ok(mut models), Some(model)) = (self.models.lock(), &breaker.scope().model)
            && models.get(model).is_some_and(|b| Arc::ptr_eq(b, breaker) && b.state() == State::Closed)
        {
            models.remove(model);
        }
    }

    /// Gives permits back for an attempt that ended without an outcome (the caller went away).
    pub fn release(&self, mut permits: Permits) {
        if let Some(permit) = permits.replica.take() {
            self.replica.release(permit);
        }
        if let Some((breaker, permit)) = permits.model.take() {
            breaker.release(permit);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use tonic::Status;
    use tower::{Layer as _, ServiceExt as _, service_fn};

    use super::*;
    use crate::{
        deadline::Deadline,
        pipeline::{
            Attempt, Reply,
            balance::{EndpointSettings, Pool},
            testing,
            timeout::PerTryTimeoutLayer,
        },
    };

    fn pool() -> Arc<Pool> {
        let settings = EndpointSettings {
            connect_timeout: Duration::from_millis(100),
            ewma_decay: Duration::from_secs(10),
            penalty: Duration::from_secs(1),
            breaker: BreakerConfig { consecutive_failures: 3, ..BreakerConfig::default() },
        };
        let pool = Arc::new(Pool::new(settings));
        pool.set(&["http://127.0.0.1:1".to_string()]);
        pool
    }

    /// A balancer stand-in: leases from `pool` as the real one does, then answers with `answer`
    /// after `delay`.
    fn balancer(
        pool: Arc<Pool>,
        delay: Duration,
        answer: fn() -> Result<Reply, UpstreamError>,
    ) -> impl tower::Service<Attempt, Response = Reply, Error = UpstreamError, Future: Send> + Clone {
        service_fn(move |attempt: Attempt| {
            let lease = pool.lease(attempt.call.ask.request());
            async move {
                attempt.picked(lease?);
                tokio::time::sleep(delay).await;
                answer()
            }
        })
    }

    fn replica_state(pool: &Pool) -> State {
        pool.snapshot()[0].breakers().replica().state()
    }

    #[tokio::test]
    async fn each_attempts_outcome_is_charged_to_the_replica_the_balancer_picked() {
        let pool = pool();
        let refused = || Err(UpstreamError::Transport(Status::unavailable("connection refused")));
        let service = BreakerLayer.layer(balancer(pool.clone(), Duration::ZERO, refused));
        for _ in 0..3 {
            let call = testing::generate("hello", Deadline::after(Duration::from_secs(5)));
            assert!(service.clone().oneshot(call).await.is_err());
        }
        assert_eq!(replica_state(&pool), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_attempt_is_charged_too_but_not_the_clients_deadline() {
        // Outside the timeout, the breaker layer still finds the lease of an attempt the timeout
        // dropped: three per-try timeouts open the model's breaker on that replica.
        let pool = pool();
        let answer = || Ok(testing::answer("too late"));
        let slow = balancer(pool.clone(), Duration::from_secs(10), answer);
        let service = BreakerLayer.layer(PerTryTimeoutLayer::new(Some(Duration::from_secs(1))).layer(slow));
        for _ in 0..3 {
            let call = testing::generate("hello", Deadline::after(Duration::from_secs(30)));
            let error = service.clone().oneshot(call).await.unwrap_err();
            assert!(matches!(error, UpstreamError::Timeout { cause: crate::pipeline::TimeoutCause::PerTry, .. }));
        }
        let endpoint = pool.snapshot()[0].clone();
        assert_eq!(endpoint.breakers().replica().state(), State::Closed, "a slow model is not a dead replica");
        let models = endpoint.breakers().models();
        assert_eq!(models.len(), 1);
        assert_eq!(models[0].state(), State::Open);

        // The client's own deadline, however often, opens nothing.
        let pool = self::pool();
        let slow = balancer(pool.clone(), Duration::from_secs(10), answer);
        let service = BreakerLayer.layer(PerTryTimeoutLayer::new(None).layer(slow));
        for _ in 0..10 {
            let call = testing::generate("hello", testing::client_deadline(Duration::from_millis(100)));
            let error = service.clone().oneshot(call).await.unwrap_err();
            assert!(matches!(error, UpstreamError::Timeout { cause: crate::pipeline::TimeoutCause::Client, .. }));
        }
        assert_eq!(replica_state(&pool), State::Closed);
        assert!(pool.snapshot()[0].breakers().models().is_empty());
    }
}

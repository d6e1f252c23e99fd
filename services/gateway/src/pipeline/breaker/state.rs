//! One circuit breaker: failsafe's state machine, behind what failsafe lacks.
//!
//! failsafe decides when to open (its `consecutive_failures` policy, or its
//! `success_rate_over_time_window` policy, whichever trips first) and for how long (its backoff;
//! `recovery_ms`, constant, as in the seed). It does not:
//! - let one probe at a time through when half-open (it admits every call): [`Breaker::try_acquire`]
//!   hands out one probe permit and refuses the rest until the probe's outcome is known;
//! - say which state it is in: our [`Instrument`] keeps the state as failsafe reports it, and
//!   logs and counts each change;
//! - know which outcomes count: the caller records [`Outcome::Ignored`] for those that say nothing
//!   (see [`crate::pipeline::UpstreamError::charge`]).
//!
//! failsafe reads `std::time::Instant`, not Tokio's clock, so paused-time tests do not move it
//! (its hidden `failsafe::clock::freeze` does, in synchronous tests).

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU8, Ordering},
};

use failsafe::{
    Instrument, StateMachine,
    backoff::{self, Constant},
    failure_policy::{ConsecutiveFailures, FailurePolicy as _, OrElse, SuccessRateOverTimeWindow},
};
use opentelemetry::KeyValue;

use super::BreakerConfig;
use crate::metrics::metrics;

/// A breaker's state, as failsafe last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// The `llmesh_breaker_state` gauge's value.
    pub fn gauge(self) -> u64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::HalfOpen,
            2 => Self::Open,
            _ => Self::Closed,
        }
    }
}

/// What one call said about the thing a breaker guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Nothing either way (a client's deadline, a failure charged to something else).
    Ignored,
}

type Policy = OrElse<ConsecutiveFailures<Constant>, SuccessRateOverTimeWindow<Constant>>;

/// What the breaker guards, for logs and metric labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The replica's address.
    pub endpoint: Arc<str>,
    /// The model, for a breaker that guards one model on the replica; `None` for the replica's own.
    pub model: Option<Arc<str>>,
}

pub struct Breaker {
    machine: StateMachine<Policy, Observer>,
    observer: Observer,
    /// The half-open probe is out.
    probing: AtomicBool,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker").field("scope", &self.observer.0.scope).field("state", &self.state()).finish()
    }
}

/// Leave to make one call; give it back through [`Breaker::record`] or [`Breaker::release`].
#[derive(Debug)]
pub struct Permit {
    probe: bool,
}

impl Permit {
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Breaker {
    pub fn new(config: &BreakerConfig, scope: Scope) -> Self {
        let recovery = backoff::constant(config.recovery());
        let consecutive =
            failsafe::failure_policy::consecutive_failures(config.consecutive_failures.max(1), recovery.clone());
        // failsafe wants a success rate; a failure rate of 1 or more can never be reached, so
        // that policy is off (a required success rate of 0 is never undercut).
        let required_success = (1.0 - config.failure_rate).clamp(0.0, 1.0);
        let rate = failsafe::failure_policy::success_rate_over_time_window(
            required_success,
            config.min_calls,
            config.window(),
            recovery,
        );
        let observer = Observer(Arc::new(Observed { state: AtomicU8::new(0), scope }));
        let machine = StateMachine::new(consecutive.or_else(rate), observer.clone());
        Self { machine, observer, probing: AtomicBool::new(false) }
    }

    pub fn state(&self) -> State {
        State::from_u8(self.observer.0.state.load(Ordering::Relaxed))
    }

    pub fn scope(&self) -> &Scope {
        &self.observer.0.scope
    }

    /// True when a call would be let through now, without taking the probe. Past the recovery
    /// time this moves an open breaker to half-open, as asking failsafe does.
    pub fn available(&self) -> bool {
        match self.state() {
            State::Closed => true,
            State::Open | State::HalfOpen => self.machine.is_call_permitted() && !self.probing.load(Ordering::Acquire),
        }
    }

    /// Leave to call: always when closed; when half-open, to one caller at a time (the probe).
    pub fn try_acquire(&self) -> Option<Permit> {
        if self.state() == State::Closed {
            return Some(Permit { probe: false });
        }
        if self.machine.is_call_permitted()
            && self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            return Some(Permit { probe: true });
        }
        None
    }

    /// Records a call's outcome. While the breaker is not closed only the probe's outcome counts:
    /// calls let through before it opened say nothing about the recovery.
    pub fn record(&self, permit: Permit, outcome: Outcome) {
        if permit.probe || self.state() == State::Closed {
            match outcome {
                Outcome::Success => self.machine.on_success(),
                Outcome::Failure => self.machine.on_error(),
                Outcome::Ignored => {}
            }
        }
        self.release(permit);
    }

    /// Gives back a permit whose call ended without an outcome: a probe slot is freed.
    pub fn release(&self, permit: Permit) {
        if permit.probe {
            self.probing.store(false, Ordering::Release);
        }
    }
}

/// failsafe's instrument: keeps the state it reports, logs and counts each change.
#[derive(Debug, Clone)]
struct Observer(Arc<Observed>);

#[derive(Debug)]
struct Observed {
    state: AtomicU8,
    scope: Scope,
}

impl Observer {
    fn moved_to(&self, state: State) {
        let before = State::from_u8(self.0.state.swap(state.gauge() as u8, Ordering::AcqRel));
        if before == state {
            return;
        }
        let scope = &self.0.scope;
        let model = scope.model.as_deref().unwrap_or("");
        tracing::warn!(endpoint = %scope.endpoint, model, state = state.as_str(), "circuit breaker changed state");
        let mut labels =
            vec![KeyValue::new("endpoint", scope.endpoint.to_string()), KeyValue::new("to", state.as_str())];
        if let Some(model) = &scope.model {
            labels.push(KeyValue::new("model", model.to_string()));
        }
        metrics().breaker_transitions.add(1, &labels);
    }
}

impl Instrument for Observer {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        self.moved_to(State::Open);
    }

    fn on_half_open(&self) {
        self.moved_to(State::HalfOpen);
    }

    fn on_closed(&self) {
        self.moved_to(State::Closed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn breaker(config: BreakerConfig) -> Breaker {
        Breaker::new(&config, Scope { endpoint: "http://127.0.0.1:1".into(), model: None })
    }

    fn five_then_one_second() -> BreakerConfig {
        BreakerConfig { consecutive_failures: 5, recovery_ms: 1_000, ..BreakerConfig::default() }
    }

    fn call(breaker: &Breaker, outcome: Outcome) {
        let permit = breaker.try_acquire().expect("let through");
        breaker.record(permit, outcome);
    }

    #[test]
    fn opens_after_consecutive_failures_and_probes_once_after_recovery() {
        failsafe::clock::freeze(|clock| {
            let breaker = breaker(five_then_one_second());
            for _ in 0..4 {
                call(&breaker, Outcome::Failure);
                assert_eq!(breaker.state(), State::Closed);
            }
            call(&breaker, Outcome::Failure);
            assert_eq!(breaker.state(), State::Open);
            assert!(breaker.try_acquire().is_none());
            assert!(!breaker.available());

            clock.advance(Duration::from_millis(999));
            assert!(breaker.try_acquire().is_none(), "still open before the recovery time");
            clock.advance(Duration::from_millis(2));
            assert!(breaker.available());
            let probe = breaker.try_acquire().expect("one probe after recovery");
            assert_eq!(breaker.state(), State::HalfOpen);
            assert!(breaker.try_acquire().is_none(), "only one probe at a time");
            assert!(!breaker.available());
            breaker.record(probe, Outcome::Success);
            assert_eq!(breaker.state(), State::Closed);
            assert!(breaker.try_acquire().is_some());
        });
    }

    #[test]
    fn a_failed_probe_opens_again_and_an_abandoned_one_frees_the_slot() {
        failsafe::clock::freeze(|clock| {
            let breaker = breaker(five_then_one_second());
            for _ in 0..5 {
                call(&breaker, Outcome::Failure);
            }
            clock.advance(Duration::from_millis(1_001));
            let probe = breaker.try_acquire().unwrap();
            breaker.record(probe, Outcome::Failure);
            assert_eq!(breaker.state(), State::Open);
            clock.advance(Duration::from_millis(500));
            assert!(breaker.try_acquire().is_none());
            clock.advance(Duration::from_millis(501));
            let probe = breaker.try_acquire().unwrap();
            breaker.release(probe);
            assert_eq!(breaker.state(), State::HalfOpen);
            let probe = breaker.try_acquire().expect("the abandoned probe's slot is free again");
            breaker.record(probe, Outcome::Ignored);
            assert!(breaker.try_acquire().is_some(), "an outcome that says nothing frees the slot too");
        });
    }

    #[test]
    fn successes_reset_the_count_and_ignored_outcomes_count_for_nothing() {
        failsafe::clock::freeze(|_| {
            let breaker = breaker(five_then_one_second());
            for _ in 0..4 {
                call(&breaker, Outcome::Failure);
            }
            call(&breaker, Outcome::Success);
            for _ in 0..4 {
                call(&breaker, Outcome::Failure);
                call(&breaker, Outcome::Ignored);
            }
            assert_eq!(breaker.state(), State::Closed);
            call(&breaker, Outcome::Failure);
            assert_eq!(breaker.state(), State::Open);
        });
    }

    #[test]
    fn a_high_failure_rate_over_the_window_opens_it() {
        failsafe::clock::freeze(|clock| {
            let config = BreakerConfig {
                consecutive_failures: 1_000,
                window_ms: 1_000,
                min_calls: 10,
                ..five_then_one_second()
            };
            let breaker = breaker(config);
            let mut opened = false;
            // Two of three fail, never five in a row; the rate decides once the window has passed.
            for i in 0..300 {
                clock.advance(Duration::from_millis(10));
                call(&breaker, if i % 3 == 2 { Outcome::Success } else { Outcome::Failure });
                if breaker.state() == State::Open {
                    opened = true;
                    break;
                }
            }
            assert!(opened, "a 67% failure rate over the window opens the breaker");
        });
    }

    #[test]
    fn a_failure_rate_of_one_or_more_turns_the_rate_policy_off() {
        failsafe::clock::freeze(|clock| {
            let config = BreakerConfig {
                consecutive_failures: 1_000,
                failure_rate: 2.0,
                window_ms: 1_000,
                ..five_then_one_second()
            };
            let breaker = breaker(config);
            for _ in 0..500 {
                clock.advance(Duration::from_millis(10));
                call(&breaker, Outcome::Failure);
            }
            assert_eq!(breaker.state(), State::Closed);
        });
    }
}

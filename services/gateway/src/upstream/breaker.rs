//! A circuit breaker per generation endpoint. It opens after `consecutive_failures` failures in a
//! row (5 by default, as in the seed) or when the failure rate over the last `window` calls reaches
//! `failure_rate`; after `recovery` (60 s, as in the seed) it lets exactly one probe through
//! (half-open), and closes again when the probe succeeds.
//!
//! Only failures that say the endpoint is in trouble count: UNAVAILABLE, DEADLINE_EXCEEDED,
//! RESOURCE_EXHAUSTED and timeouts. A client's bad request is the client's problem, and shed or
//! rate-limited calls never reach here.

use std::{collections::VecDeque, sync::Mutex, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::Code;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub recovery_ms: u64,
    /// Calls remembered for the failure rate.
    pub window: usize,
    /// Fewest calls in the window before the rate can open the breaker.
    pub min_calls: usize,
    pub failure_rate: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { consecutive_failures: 5, recovery_ms: 60_000, window: 20, min_calls: 10, failure_rate: 0.5 }
    }
}

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
}

/// Whether a call's outcome counts against the endpoint.
pub fn is_failure(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted)
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive: u32,
    recent: VecDeque<bool>,
    open_until: Instant,
    probing: bool,
}

/// Leave to make one call. Report how it went with [`Breaker::record`].
#[derive(Debug)]
pub struct Permit {
    probe: bool,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        let inner = Inner {
            state: State::Closed,
            consecutive: 0,
            recent: VecDeque::new(),
            open_until: Instant::now(),
            probing: false,
        };
        Self { config, inner: Mutex::new(inner) }
    }

    pub fn state(&self) -> State {
        self.inner.lock().map_or(State::Closed, |i| i.state)
    }

    /// True when a call would be let through now (without taking the probe).
    pub fn available(&self) -> bool {
        let Ok(inner) = self.inner.lock() else { return true };
        match inner.state {
            State::Closed => true,
            State::Open => Instant::now() >= inner.open_until,
            State::HalfOpen => !inner.probing,
        }
    }

    /// Leave to call, or `None` while open (or while the half-open probe is out).
    pub fn try_acquire(&self) -> Option<Permit> {
        let Ok(mut inner) = self.inner.lock() else { return Some(Permit { probe: false }) };
        match inner.state {
            State::Closed => Some(Permit { probe: false }),
            State::Open if Instant::now() >= inner.open_until => {
                inner.state = State::HalfOpen;
                inner.probing = true;
                Some(Permit { probe: true })
            }
            State::HalfOpen if !inner.probing => {
                inner.probing = true;
                Some(Permit { probe: true })
            }
            State::Open | State::HalfOpen => None,
        }
    }

    /// Gives back a permit whose call ended without an outcome (the caller went away): a probe
    /// slot is freed, nothing is counted.
    pub fn release(&self, permit: Permit) {
        if permit.probe
            && let Ok(mut inner) = self.inner.lock()
        {
            inner.probing = false;
        }
    }

    /// Records a call's outcome; returns the new state when it changed.
    pub fn record(&self, permit: Permit, failed: bool) -> Option<State> {
        let Ok(mut inner) = self.inner.lock() else { return None };
        let before = inner.state;
        if permit.probe {
            inner.probing = false;
        }
        inner.recent.push_back(failed);
        while inner.recent.len() > self.config.window.max(1) {
            inner.recent.pop_front();
        }
        if failed {
            inner.consecutive += 1;
            let failures = inner.recent.iter().filter(|f| **f).count();
            let rate_trips = inner.recent.len() >= self.config.min_calls
                && failures as f64 >= self.config.failure_rate * inner.recent.len() as f64;
            if permit.probe || inner.consecutive >= self.config.consecutive_failures.max(1) || rate_trips {
                inner.state = State::Open;
                inner.open_until = Instant::now() + Duration::from_millis(self.config.recovery_ms);
            }
        } else {
            inner.consecutive = 0;
            if permit.probe || inner.state == State::HalfOpen {
                inner.state = State::Closed;
                inner.recent.clear();
            }
        }
        (inner.state != before).then_some(inner.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig { recovery_ms: 1_000, ..BreakerConfig::default() })
    }

    fn call(breaker: &Breaker, failed: bool) -> Option<State> {
        let permit = breaker.try_acquire().expect("let through");
        breaker.record(permit, failed)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_probes_once_after_recovery() {
        let breaker = breaker();
        for _ in 0..4 {
            assert_eq!(call(&breaker, true), None);
        }
        assert_eq!(call(&breaker, true), Some(State::Open));
        assert!(breaker.try_acquire().is_none());
        assert!(!breaker.available());

        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(breaker.try_acquire().is_none(), "still open 1 ms before recovery");
        tokio::time::advance(Duration::from_millis(1)).await;
        let probe = breaker.try_acquire().expect("one probe after recovery");
        assert_eq!(breaker.state(), State::HalfOpen);
        assert!(breaker.try_acquire().is_none(), "only one probe at a time");
        assert_eq!(breaker.record(probe, false), Some(State::Closed));
        assert!(breaker.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_again_for_another_recovery() {
        let breaker = breaker();
        for _ in 0..5 {
            call(&breaker, true);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = breaker.try_acquire().unwrap();
        assert_eq!(breaker.record(probe, true), Some(State::Open));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(breaker.try_acquire().is_none());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(breaker.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn successes_reset_the_count_but_a_high_failure_rate_still_opens() {
        let breaker = breaker();
        // fail, fail, ok, ... never 5 in a row, but 2 of 3 fail.
        let mut opened = false;
        for i in 0..30 {
            if call(&breaker, i % 3 != 2) == Some(State::Open) {
                opened = true;
                break;
            }
        }
        assert!(opened, "a 67% failure rate over the window opens the breaker");
    }

    #[test]
    fn only_endpoint_trouble_counts() {
        assert!(is_failure(Code::Unavailable));
        assert!(is_failure(Code::DeadlineExceeded));
        assert!(is_failure(Code::ResourceExhausted));
        assert!(!is_failure(Code::InvalidArgument));
        assert!(!is_failure(Code::NotFound));
        assert!(!is_failure(Code::Ok));
    }
}

//! Exponential backoff with jitter: for jobs waiting to be retried, and for a worker waiting for
//! Redis to come back.

use std::time::Duration;

/// How far jitter moves a delay either way: ±20%.
const JITTER: f64 = 0.2;

/// `base * 2^(n-1)` for the `n`th wait, capped at `max`, then spread by ±20% so that jobs (or
/// workers) that failed together do not come back together. The cap applies before the jitter,
/// so waits at the cap stay spread too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max: max.max(base) }
    }

    pub const fn from_millis(base_ms: u64, max_ms: u64) -> Self {
        let max_ms = if max_ms < base_ms { base_ms } else { max_ms };
        Self { base: Duration::from_millis(base_ms), max: Duration::from_millis(max_ms) }
    }

    /// The `n`th wait (from 1) before jitter.
    pub fn nominal(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1);
        let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The `n`th wait (from 1), jittered with `rng`.
    pub fn delay(&self, n: u32, rng: &mut fastrand::Rng) -> Duration {
        let spread = 1.0 - JITTER + 2.0 * JITTER * rng.f64();
        Duration::try_from_secs_f64(self.nominal(n).as_secs_f64() * spread).unwrap_or(self.max)
    }
}

/// Counts consecutive failures to reach Redis and says how long to pause after each, so a worker
/// never spins while Redis is down.
#[derive(Debug)]
pub(crate) struct OutageBackoff {
    backoff: Backoff,
    failures: u32,
    rng: fastrand::Rng,
}

impl OutageBackoff {
    pub fn new(backoff: Backoff) -> Self {
        Self { backoff, failures: 0, rng: fastrand::Rng::new() }
    }

    /// Records one more failure and returns the pause before trying again.
    pub fn next_pause(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.backoff.delay(self.failures, &mut self.rng)
    }

    /// Redis answered: the next failure starts from the base pause again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_from_the_base_until_the_cap() {
        let backoff = Backoff::new(ms(1_000), ms(5_000));
        let waits: Vec<_> = (1..=5).map(|n| backoff.nominal(n)).collect();
        assert_eq!(waits, [ms(1_000), ms(2_000), ms(4_000), ms(5_000), ms(5_000)]);
    }

    #[test]
    fn attempt_zero_and_huge_attempts_neither_underflow_nor_overflow() {
        let backoff = Backoff::new(ms(10), Duration::MAX);
        assert_eq!(backoff.nominal(0), ms(10));
        assert_eq!(backoff.nominal(1), ms(10));
        assert!(backoff.nominal(u32::MAX) >= ms(10 * u64::from(u32::MAX)));
    }

    #[test]
    fn jitter_stays_within_twenty_percent_and_actually_spreads() {
        let backoff = Backoff::new(ms(1_000), ms(60_000));
        let mut rng = fastrand::Rng::with_seed(7);
        let delays: Vec<_> = (0..1_000).map(|_| backoff.delay(3, &mut rng)).collect();
        assert!(delays.iter().all(|d| (ms(3_200)..=ms(4_800)).contains(d)), "{delays:?}");
        let (min, max) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
        assert!(*min < ms(3_400) && *max > ms(4_600), "jitter should use its range: {min:?}..{max:?}");
    }

    #[test]
    fn jitter_applies_at_the_cap_too() {
        let backoff = Backoff::new(ms(1_000), ms(2_000));
        let mut rng = fastrand::Rng::with_seed(1);
        let delays: Vec<_> = (0..100).map(|_| backoff.delay(10, &mut rng)).collect();
        assert!(delays.iter().all(|d| (ms(1_600)..=ms(2_400)).contains(d)));
        assert!(delays.iter().any(|d| *d > ms(2_000)) && delays.iter().any(|d| *d < ms(2_000)));
    }

    #[tokio::test(start_paused = true)]
    async fn outage_pauses_grow_then_start_over_once_redis_answers() {
        let mut outages = OutageBackoff::new(Backoff::new(ms(100), ms(400)));
        let mut slept = Vec::new();
        for _ in 0..4 {
            let start = tokio::time::Instant::now();
            tokio::time::sleep(outages.next_pause()).await;
            slept.push(start.elapsed());
        }
        let nominal = [100, 200, 400, 400];
        for (pause, nominal) in slept.iter().zip(nominal) {
            assert!((ms(nominal * 8 / 10)..=ms(nominal * 12 / 10)).contains(pause), "{slept:?}");
        }
        assert_eq!(outages.failures(), 4);

        outages.reset();
        assert!(outages.next_pause() <= ms(120));
    }
}

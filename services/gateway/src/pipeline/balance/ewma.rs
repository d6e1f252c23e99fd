//! Peak EWMA latency, as in linkerd and finagle: a spike counts at once, calm decays slowly. The
//! cost of an endpoint is its estimate times the calls it has in flight plus one, so p2c prefers a
//! replica that is both fast and not busy. The estimate also decays while nothing is observed, so
//! a replica that was slow and got no traffic since is tried again after a while.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

#[derive(Debug)]
pub struct PeakEwma {
    decay: Duration,
    state: Mutex<(f64, Instant)>,
}

impl PeakEwma {
    /// Starts at `initial` (an optimistic guess, so new endpoints get traffic).
    pub fn new(initial: Duration, decay: Duration) -> Self {
        Self { decay, state: Mutex::new((initial.as_secs_f64(), Instant::now())) }
    }

    pub fn observe(&self, rtt: Duration) {
        let Ok(mut state) = self.state.lock() else { return };
        let now = Instant::now();
        let rtt = rtt.as_secs_f64();
        let (estimate, at) = *state;
        let next = if rtt > estimate {
            rtt
        } else {
            let weight = self.weight(now.saturating_duration_since(at));
            estimate * weight + rtt * (1.0 - weight)
        };
        *state = (next, now);
    }

    /// The current estimate, in seconds, decayed for the time since the last observation.
    pub fn estimate(&self) -> f64 {
        self.state.lock().map_or(0.0, |s| s.0 * self.weight(Instant::now().saturating_duration_since(s.1)))
    }

    fn weight(&self, elapsed: Duration) -> f64 {
        (-elapsed.as_secs_f64() / self.decay.as_secs_f64().max(1e-3)).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peaks_at_once_and_decays_slowly() {
        let ewma = PeakEwma::new(Duration::from_millis(1), Duration::from_secs(10));
        ewma.observe(Duration::from_secs(2));
        assert!((ewma.estimate() - 2.0).abs() < 1e-9, "a spike counts at once");
        tokio::time::advance(Duration::from_secs(1)).await;
        ewma.observe(Duration::from_millis(10));
        let after_one = ewma.estimate();
        assert!(after_one > 1.5 && after_one < 2.0, "{after_one}");
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(10)).await;
            ewma.observe(Duration::from_millis(10));
        }
        assert!(ewma.estimate() < 0.05, "{}", ewma.estimate());
    }

    #[tokio::test(start_paused = true)]
    async fn forgets_a_spike_without_new_observations() {
        let ewma = PeakEwma::new(Duration::from_millis(1), Duration::from_secs(10));
        ewma.observe(Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(ewma.estimate() < 0.2, "{}", ewma.estimate());
    }
}

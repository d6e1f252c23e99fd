//! The in-process limiter: the GCRA state of each key in a bounded map. It decides alone when no
//! Redis is configured, and stands in for Redis while Redis is unreachable.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::time::Instant;

use llmesh_ratelimit::{Cost, Decision, Kind, Limit};

/// Keys kept at most. Only configured keys and `anonymous` ever reach the limiter, so this is a
/// guard, not a working size.
pub(super) const DEFAULT_CAPACITY: usize = 10_000;

pub(super) struct LocalLimiter {
    start: Instant,
    capacity: usize,
    keys: Mutex<HashMap<Arc<str>, Tats>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Tats {
    requests: u64,
    tokens: u64,
    last_used: u64,
}

impl Tats {
    fn of(&mut self, kind: Kind) -> &mut u64 {
        match kind {
            Kind::Requests => &mut self.requests,
            Kind::Tokens => &mut self.tokens,
        }
    }
}

impl LocalLimiter {
    pub(super) fn new(capacity: usize) -> Self {
        Self { start: Instant::now(), capacity: capacity.max(1), keys: Mutex::new(HashMap::new()) }
    }

    /// Microseconds on this limiter's monotonic clock.
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub(super) fn decide(&self, id: &Arc<str>, kind: Kind, limit: Limit, cost: Cost) -> Decision {
        let now = self.now();
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if !keys.contains_key(id) && keys.len() >= self.capacity {
            make_room(&mut keys, self.capacity, now);
        }
        let tats = keys.entry(id.clone()).or_default();
        tats.last_used = now;
        let tat = tats.of(kind);
        let decision = limit.decide(*tat, now, cost);
        *tat = decision.new_tat;
        decision
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Drops the keys whose buckets are full again (they carry no state), then, if that is not
/// enough, the least recently used.
fn make_room(keys: &mut HashMap<Arc<str>, Tats>, capacity: usize, now: u64) {
    keys.retain(|_, tats| tats.requests > now || tats.tokens > now);
    while keys.len() >= capacity {
        let Some(oldest) = keys.iter().min_by_key(|(_, tats)| tats.last_used).map(|(id, _)| id.clone()) else {
            return;
        };
        keys.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn id(name: &str) -> Arc<str> {
        name.into()
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_limited_separately_and_refill_with_time() {
        let local = LocalLimiter::new(DEFAULT_CAPACITY);
        let limit = Limit::per_minute(120).unwrap(); // 2 a second
        for _ in 0..120 {
            assert!(local.decide(&id("a"), Kind::Requests, limit, Cost::Take(1)).allowed);
        }
        let refused = local.decide(&id("a"), Kind::Requests, limit, Cost::Take(1));
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        // Another key, and the same key's tokens, are untouched.
        assert!(local.decide(&id("b"), Kind::Requests, limit, Cost::Take(1)).allowed);
        assert_eq!(local.decide(&id("a"), Kind::Tokens, limit, Cost::Take(1)).remaining, 119);

        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(local.decide(&id("a"), Kind::Requests, limit, Cost::Take(1)).allowed);
        assert!(!local.decide(&id("a"), Kind::Requests, limit, Cost::Take(1)).allowed);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(local.decide(&id("a"), Kind::Requests, limit, Cost::Take(1)).remaining, 19);
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_is_bounded_and_evicts_idle_then_oldest() {
        let local = LocalLimiter::new(3);
        let limit = Limit::per_minute(60).unwrap();
        local.decide(&id("a"), Kind::Requests, limit, Cost::Take(1));
        tokio::time::advance(Duration::from_millis(10)).await;
        local.decide(&id("b"), Kind::Requests, limit, Cost::Take(1));
        tokio::time::advance(Duration::from_millis(10)).await;
        local.decide(&id("c"), Kind::Requests, limit, Cost::Take(1));
        tokio::time::advance(Duration::from_millis(10)).await;
        // Full, nobody idle long enough to be full again: the oldest ("a") goes.
        local.decide(&id("d"), Kind::Requests, limit, Cost::Take(1));
        assert_eq!(local.len(), 3);
        let a_again = local.decide(&id("a"), Kind::Requests, limit, Cost::Take(1));
        assert_eq!(a_again.remaining, 59, "a started over");
        // "b" was the oldest then. "c" still has its state.
        assert_eq!(local.decide(&id("c"), Kind::Requests, limit, Cost::Take(1)).remaining, 58);

        // After a second every bucket is full again: all go before anyone is picked by age.
        tokio::time::advance(Duration::from_secs(2)).await;
        local.decide(&id("e"), Kind::Requests, limit, Cost::Take(1));
        assert_eq!(local.len(), 1);
    }
}

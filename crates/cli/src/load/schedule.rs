//! The open loop's timetable: request `n` is meant to start `n / rate` seconds after the start,
//! whatever happened to the requests before it. Offsets are computed from `n`, never by adding
//! intervals, so they do not drift over long runs.

use std::time::Duration;

use tokio::time::Instant;

/// Intended start times at a fixed rate from `start`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    /// Requests per second; positive and finite (checked by the flags).
    rate: f64,
}

impl Schedule {
    pub fn new(start: Instant, rate: f64) -> Self {
        Self { start, rate }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// How long after the start request `seq` is due, rounded to the nanosecond.
    pub fn offset(&self, seq: u64) -> Duration {
        // f64 holds every sequence number a run can reach exactly (up to 2^53); the float to
        // integer cast saturates instead of wrapping.
        let nanos = (seq as f64 * 1e9 / self.rate).round();
        Duration::from_nanos(nanos as u64)
    }

    /// When request `seq` is due.
    pub fn at(&self, seq: u64) -> Instant {
        self.start.checked_add(self.offset(seq)).unwrap_or_else(far_future)
    }

    /// How many requests are due strictly before `elapsed` has passed since the start.
    pub fn due_before(&self, elapsed: Duration) -> u64 {
        let mut n = (elapsed.as_secs_f64() * self.rate).ceil() as u64;
        // Settle float rounding against `offset`, which is the definition.
        while n > 0 && self.offset(n - 1) >= elapsed {
            n -= 1;
        }
        while self.offset(n) < elapsed {
            n += 1;
        }
        n
    }
}

/// An instant no run reaches (about 30 years from now).
pub fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_n_over_rate() {
        let s = Schedule::new(Instant::now(), 100.0);
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(1), Duration::from_millis(10));
        assert_eq!(s.offset(3), Duration::from_millis(30));
        assert_eq!(s.offset(100), Duration::from_secs(1));
        // Rounded, not truncated, and not accumulated: a third of a second, then exactly one second.
        let thirds = Schedule::new(Instant::now(), 3.0);
        assert_eq!(thirds.offset(1), Duration::from_nanos(333_333_333));
        assert_eq!(thirds.offset(2), Duration::from_nanos(666_666_667));
        assert_eq!(thirds.offset(3), Duration::from_secs(1));
        assert_eq!(thirds.offset(3_000_000), Duration::from_secs(1_000_000));
        // Slower than one per second.
        assert_eq!(Schedule::new(Instant::now(), 0.5).offset(3), Duration::from_secs(6));
    }

    #[test]
    fn at_adds_the_offset_to_the_start() {
        let start = Instant::now();
        let s = Schedule::new(start, 4.0);
        assert_eq!(s.at(0), start);
        assert_eq!(s.at(6), start + Duration::from_millis(1500));
        assert!(s.at(u64::MAX) > start + Duration::from_secs(86_400 * 365));
    }

    #[test]
    fn counts_what_is_due_in_a_window() {
        let s = Schedule::new(Instant::now(), 10.0);
        assert_eq!(s.due_before(Duration::ZERO), 0);
        assert_eq!(s.due_before(Duration::from_nanos(1)), 1);
        assert_eq!(s.due_before(Duration::from_millis(100)), 1);
        assert_eq!(s.due_before(Duration::from_millis(101)), 2);
        assert_eq!(s.due_before(Duration::from_secs(10)), 100);
        let thirds = Schedule::new(Instant::now(), 3.0);
        assert_eq!(thirds.due_before(Duration::from_secs(1)), 3);
        assert_eq!(thirds.due_before(Duration::from_nanos(1_000_000_001)), 4);
        // Consistent with `offset` at every boundary.
        let odd = Schedule::new(Instant::now(), 7.3);
        for n in 0..500 {
            assert_eq!(odd.due_before(odd.offset(n)), n);
            assert_eq!(odd.due_before(odd.offset(n) + Duration::from_nanos(1)), n + 1);
        }
    }
}

//! GCRA (the generic cell rate algorithm): a rate limit kept as a single number per key, the
//! theoretical arrival time (TAT) of the next unit if the key had been sending at exactly its
//! rate. A key may run ahead of that schedule by at most `burst` units.
//!
//! [`decide`] is the whole algorithm; [`SCRIPT`] is the same arithmetic in Lua for Redis, over
//! Redis' own clock. Times are integer microseconds (Redis `TIME` resolution) on whatever clock
//! the caller uses; the interval is in nanoseconds so that high rates stay exact. Every quantity
//! stays below 2^53, so Lua's doubles compute exactly what the Rust integers do.

use std::time::Duration;

/// What a call costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Take `n` units if all are available, else nothing.
    Take(u32),
    /// Charge `n` units even past the limit: usage that already happened (a response longer than
    /// its reservation). Later calls wait until the key is back within its limit.
    Force(u32),
    /// Give back `n` units reserved but not used. Never more than a full bucket.
    Refund(u32),
}

impl Cost {
    /// The two script arguments: a signed amount and whether to force it.
    pub fn as_args(self) -> (i64, u8) {
        match self {
            Self::Take(n) => (i64::from(n), 0),
            Self::Force(n) => (i64::from(n), 1),
            Self::Refund(n) => (-i64::from(n), 0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The TAT to store (on a refusal, the unchanged one).
    pub new_tat: u64,
    /// How long until the same cost would be allowed; zero when allowed.
    pub retry_after: Duration,
    /// Units that could still be taken right now.
    pub remaining: u64,
}

/// A limit of `per_minute` units: one unit every `interval`, a burst of a whole minute's worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub interval: Duration,
    pub burst: u32,
}

impl Limit {
    /// `None` for 0, which means unlimited.
    pub fn per_minute(per_minute: u32) -> Option<Self> {
        (per_minute > 0).then(|| Self { interval: Duration::from_secs(60) / per_minute, burst: per_minute })
    }

    pub fn decide(&self, tat: u64, now: u64, cost: Cost) -> Decision {
        decide(tat, now, self.interval, self.burst, cost)
    }
}

/// One GCRA step: whether `cost` is allowed at `now` for a key whose TAT is `tat` (0 for a key
/// never seen), with one unit every `interval` and at most `burst` units at once.
pub fn decide(tat: u64, now: u64, interval: Duration, burst: u32, cost: Cost) -> Decision {
    let interval_ns = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX).max(1);
    let tolerance = tolerance(burst, interval_ns);
    let base = tat.max(now);
    let free_at = |tat: u64| free_units(tat, now, tolerance, interval_ns);
    let (amount, force) = cost.as_args();
    if amount < 0 {
        let new_tat = base.saturating_sub(cost_span(amount.unsigned_abs(), interval_ns)).max(now);
        return Decision { allowed: true, new_tat, retry_after: Duration::ZERO, remaining: free_at(new_tat) };
    }
    let new_tat = base.saturating_add(cost_span(amount.unsigned_abs(), interval_ns));
    let allow_at = new_tat.saturating_sub(tolerance);
    if allow_at > now && force == 0 {
        return Decision {
            allowed: false,
            new_tat: base,
            retry_after: Duration::from_micros(allow_at - now),
            remaining: free_at(base),
        };
    }
    Decision { allowed: true, new_tat, retry_after: Duration::ZERO, remaining: free_at(new_tat) }
}

/// Units that could be taken at `now` with the TAT at `tat`.
fn free_units(tat: u64, now: u64, tolerance: u64, interval_ns: u64) -> u64 {
    let slack = now.saturating_add(tolerance).saturating_sub(tat);
    u64::try_from(u128::from(slack) * 1000 / u128::from(interval_ns)).unwrap_or(u64::MAX)
}

/// How far ahead of `now` the TAT may run: `burst` intervals in microseconds, rounded up.
fn tolerance(burst: u32, interval_ns: u64) -> u64 {
    u64::try_from((u128::from(burst) * u128::from(interval_ns)).div_ceil(1000)).unwrap_or(u64::MAX)
}

/// Microseconds that `units` move the TAT, rounded down (at least 1 for any units), so that the
/// rounding of many small calls never adds up to refusing a call the exact arithmetic allows.
fn cost_span(units: u64, interval_ns: u64) -> u64 {
    let span = u64::try_from(u128::from(units) * u128::from(interval_ns) / 1000).unwrap_or(u64::MAX);
    if units > 0 { span.max(1) } else { 0 }
}

/// [`decide`] on Redis, atomically, with Redis' clock (`TIME`), so replicas whose clocks disagree
/// still agree on the limit.
///
/// `KEYS[1]`: the key's TAT. `ARGV`: interval in ns, burst, signed cost, force (0/1), as
/// [`Cost::as_args`] gives them. Returns `{allowed (0/1), new_tat, retry_after_us, remaining,
/// now}`. The key expires when its bucket is full again, so idle keys cost nothing.
pub const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local force = ARGV[4] == '1'

-- Exact integer division for exact integer operands (all below 2^53).
local function div_floor(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function cost_span(units)
  if units <= 0 then return 0 end
  return math.max(div_floor(units * interval, 1000), 1)
end

local tolerance = div_floor(burst * interval + 999, 1000)
local stored = redis.call('GET', KEYS[1])
local tat = now
if stored then tat = tonumber(stored) end
local base = math.max(tat, now)
local function free_at(x)
  local d = now + tolerance - x
  if d <= 0 then return 0 end
  return div_floor(d * 1000, interval)
end

local new_tat
if amount < 0 then
  new_tat = math.max(base - cost_span(-amount), now)
else
  new_tat = base + cost_span(amount)
  local allow_at = new_tat - tolerance
  if allow_at > now and not force then
    return {0, base, allow_at - now, free_at(base), now}
  end
end
if new_tat > now then
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', div_floor(new_tat - now + 999, 1000) + 1)
else
  redis.call('DEL', KEYS[1])
end
return {1, new_tat, 0, free_at(new_tat), now}
";

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000;

    /// Applies `cost` at `now`, keeping the TAT like a store would.
    fn step(tat: &mut u64, limit: Limit, now: u64, cost: Cost) -> Decision {
        let decision = limit.decide(*tat, now, cost);
        *tat = decision.new_tat;
        decision
    }

    #[test]
    fn zero_means_unlimited() {
        assert_eq!(Limit::per_minute(0), None);
        let limit = Limit::per_minute(60).unwrap();
        assert_eq!(limit.interval, Duration::from_secs(1));
        assert_eq!(limit.burst, 60);
    }

    #[test]
    fn a_burst_then_the_steady_rate() {
        // 60 per minute: 60 at once, then one a second.
        let limit = Limit::per_minute(60).unwrap();
        let now = 1_000 * SECOND;
        let mut tat = 0;
        for i in 0..60 {
            let d = step(&mut tat, limit, now, Cost::Take(1));
            assert!(d.allowed, "call {i}");
            assert_eq!(d.remaining, 59 - i);
        }
        let refused = step(&mut tat, limit, now, Cost::Take(1));
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.new_tat, tat, "a refusal changes nothing");

        // Half a second later: still 0.5 s to wait.
        let d = step(&mut tat, limit, now + SECOND / 2, Cost::Take(1));
        assert_eq!((d.allowed, d.retry_after), (false, Duration::from_millis(500)));
        // Then exactly one a second, no more.
        for s in 1..=5 {
            let d = step(&mut tat, limit, now + s * SECOND, Cost::Take(1));
            assert!(d.allowed, "second {s}");
            assert_eq!(d.remaining, 0);
            let d = step(&mut tat, limit, now + s * SECOND, Cost::Take(1));
            assert!(!d.allowed);
            assert_eq!(d.retry_after, Duration::from_secs(1));
        }
        // Idle for a minute: the whole burst is back.
        let d = step(&mut tat, limit, now + 65 * SECOND, Cost::Take(1));
        assert_eq!((d.allowed, d.remaining), (true, 59));
    }

    #[test]
    fn costs_take_several_units_or_none() {
        let limit = Limit::per_minute(600).unwrap(); // 10 a second, 100 ms each
        let now = 50 * SECOND;
        let mut tat = 0;
        let d = step(&mut tat, limit, now, Cost::Take(500));
        assert_eq!((d.allowed, d.remaining), (true, 100));
        let d = step(&mut tat, limit, now, Cost::Take(150));
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_secs(5), "50 units short at 10 a second");
        assert_eq!(d.remaining, 100);
        let d = step(&mut tat, limit, now, Cost::Take(100));
        assert_eq!((d.allowed, d.remaining), (true, 0));
        // More than the burst can never be allowed; the wait says how far off it is.
        let d = limit.decide(0, now, Cost::Take(601));
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_millis(100));
    }

    #[test]
    fn refunds_give_back_unused_units_but_never_more_than_a_full_bucket() {
        let limit = Limit::per_minute(600).unwrap();
        let now = 50 * SECOND;
        let mut tat = 0;
        step(&mut tat, limit, now, Cost::Take(600));
        assert!(!step(&mut tat, limit, now, Cost::Take(1)).allowed);
        let d = step(&mut tat, limit, now, Cost::Refund(250));
        assert_eq!((d.allowed, d.remaining), (true, 250));
        let d = step(&mut tat, limit, now, Cost::Refund(10_000));
        assert_eq!((d.allowed, d.remaining, d.new_tat), (true, 600, now));
        // A refund to a key never seen is a no-op.
        let d = limit.decide(0, now, Cost::Refund(5));
        assert_eq!((d.new_tat, d.remaining), (now, 600));
    }

    #[test]
    fn forced_charges_go_past_the_limit_and_make_later_calls_wait() {
        let limit = Limit::per_minute(600).unwrap();
        let now = 50 * SECOND;
        let mut tat = 0;
        step(&mut tat, limit, now, Cost::Take(550));
        let d = step(&mut tat, limit, now, Cost::Force(100));
        assert_eq!((d.allowed, d.remaining), (true, 0));
        let d = step(&mut tat, limit, now, Cost::Take(1));
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_millis(5_100), "50 over, then 1 more");
        let d = step(&mut tat, limit, now + 5_100_000, Cost::Take(1));
        assert!(d.allowed);
    }

    #[test]
    fn rates_that_do_not_divide_a_minute_stay_exact() {
        // 7 per minute: 8.571428571 s each.
        let limit = Limit::per_minute(7).unwrap();
        assert_eq!(limit.interval, Duration::from_nanos(8_571_428_571));
        let now = 10 * SECOND;
        let mut tat = 0;
        for _ in 0..7 {
            assert!(step(&mut tat, limit, now, Cost::Take(1)).allowed);
        }
        let d = step(&mut tat, limit, now, Cost::Take(1));
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_micros(8_571_424), "within a few us of the exact 8.571428 s");
        // A large token limit: 7,000,000 per minute is 8571 ns a token, not 8 or 9 us.
        let tokens = Limit::per_minute(7_000_000).unwrap();
        let d = tokens.decide(0, now, Cost::Take(1_000_000));
        assert_eq!(d.remaining, 6_000_000);
    }

    #[test]
    fn the_clock_starting_at_zero_is_fine() {
        let limit = Limit::per_minute(2).unwrap();
        let mut tat = 0;
        assert!(step(&mut tat, limit, 0, Cost::Take(1)).allowed);
        assert!(step(&mut tat, limit, 0, Cost::Take(1)).allowed);
        let d = step(&mut tat, limit, 0, Cost::Take(1));
        assert_eq!((d.allowed, d.retry_after), (false, Duration::from_secs(30)));
    }
}

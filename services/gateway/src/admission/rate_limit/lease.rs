//! Leases: a busy key's requests, and its tokens, are taken from Redis in slices, so that one
//! Redis call admits a slice of calls on this replica rather than one, and a token settlement
//! goes back into the slice rather than to Redis.
//!
//! # What it promises
//! - **The limit holds across replicas**: a slice is taken from the key's GCRA in Redis like any
//!   request (all or nothing), before the calls it admits. Calls are admitted from a slice only
//!   within [`TTL`] of taking it, so a slice is spent at most that much later than Redis counted
//!   it: never more than the limit plus one slice per replica.
//! - **Little is held back**: a slice is at most 1% of the key's limit per minute (and a request
//!   slice at most [`MAX_SLICE`] requests), so N replicas hold back at most N% of a limit. A slice
//!   grows (doubling) only while slices run out before they expire, and shrinks (halving) when one
//!   expires unused; what an expired slice did not use goes back to Redis with the next take. A key
//!   calling less than once per [`TTL`] on this replica, or whose limit's 1% is under twice what a
//!   call takes (200 requests a minute; tokens: a hundred times two calls' reservation), takes what
//!   each call needs per Redis call, exactly as without leases; so does a call Redis refuses a whole
//!   slice to (the key is near its limit: the call asks for itself alone), and the key's next
//!   calls for [`CALM`].
//! - **Token settlements stay exact**: the unused part of a token reservation goes back into the
//!   key's slice while the slice is valid (else to Redis, as without leases), and an excess is taken
//!   from the slice when it holds enough (else forced in Redis): either way every token a call used
//!   was taken in Redis.
//! - The figure a leased call reports (`x-ratelimit-remaining-requests`) is what Redis said was
//!   left after the slice was taken plus what this replica still holds of it.
//!
//! # What it does not
//! The unused part of an expired slice of a key this replica never sees again is not given back
//! (at most one slice, the same as calls that were admitted and never sent).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use llmesh_ratelimit::Limit;

/// How long a slice admits calls after Redis counted it.
pub(super) const TTL: Duration = Duration::from_millis(100);
/// How long a key Redis refused stays at one request per call, slices not growing: near its
/// limit, a slice would only be refused again (and cost a second Redis call).
pub(super) const CALM: Duration = Duration::from_secs(1);
/// The largest slice, whatever the limit.
pub(super) const MAX_SLICE: u32 = 64;
/// Keys with a lease kept at most (only configured keys reach the limiter: a guard, not a working
/// size); past it, a new key takes one request per Redis call.
const CAPACITY: usize = 10_000;

#[derive(Debug, Default)]
pub(super) struct Leases {
    keys: Mutex<HashMap<Arc<str>, Lease>>,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Requests taken in Redis and not yet admitted here.
    left: u32,
    /// When the requests left stop admitting calls.
    expires: Instant,
    /// What the next take asks for.
    slice: u32,
    /// What Redis said the key had left after the last take.
    remaining: u64,
    /// Until when slices stay at one request (Redis refused the key).
    calm_until: Instant,
    /// The largest slice: what the slice may hold at most, settlements given back included.
    max: u32,
}

/// What to ask Redis for: `want` requests (the call's one included), and the unused part of an
/// expired slice to give back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plan {
    pub(super) want: u32,
    pub(super) refund: u32,
}

/// The largest request slice of `limit`: 1% of it, at most [`MAX_SLICE`]; below 2, no leasing.
pub(super) fn max_slice(limit: Limit) -> u32 {
    (limit.burst / 100).min(MAX_SLICE)
}

/// The largest token slice of `limit`: 1% of it.
pub(super) fn max_token_slice(limit: Limit) -> u32 {
    limit.burst / 100
}

impl Leases {
    /// Admits a call of `id` that takes `units` from its slice, if it holds that many in a slice
    /// that has not expired; returns what the key has left by this replica's reckoning.
    pub(super) fn admit(&self, id: &str, units: u32) -> Option<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let lease = keys.get_mut(id)?;
        if lease.left < units || Instant::now() >= lease.expires {
            return None;
        }
        lease.left -= units;
        Some(lease.remaining + u64::from(lease.left))
    }

    /// Gives `units` back into `id`'s slice (a token reservation's unused part), if its slice has
    /// not expired and stays within the largest slice (so that a replica never holds back more
    /// than that); returns what the key has left by this replica's reckoning. `None`: Redis must
    /// take them.
    pub(super) fn give_back(&self, id: &str, units: u32) -> Option<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let lease = keys.get_mut(id)?;
        if Instant::now() >= lease.expires || lease.left.saturating_add(units) > lease.max {
            return None;
        }
        lease.left = lease.left.saturating_add(units);
        Some(lease.remaining + u64::from(lease.left))
    }

    /// What the next Redis call for `id`, whose call takes `units`, asks for (at least `units`),
    /// and the slice's new size: doubled when the last slice ran out before it expired, halved
    /// when it expired unused. `None`: `id` is not leased (`max`, the largest slice, is under
    /// twice `units`, or too many keys are).
    pub(super) fn plan(&self, id: &Arc<str>, units: u32, max: u32) -> Option<Plan> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if units == 0 || max < units.saturating_mul(2) || (keys.len() >= CAPACITY && !keys.contains_key(id)) {
            return None;
        }
        let now = Instant::now();
        let lease = keys.entry(id.clone()).or_insert(Lease {
            left: 0,
            expires: now,
            slice: 1,
            remaining: 0,
            calm_until: now,
            max,
        });
        lease.max = max;
        let expired = now >= lease.expires;
        let refund = if expired { std::mem::take(&mut lease.left) } else { 0 };
        lease.slice = match (expired, refund) {
            _ if now < lease.calm_until => 1,
            (false, _) => lease.slice.saturating_mul(2),
            (true, 0) => lease.slice,
            (true, _) => lease.slice / 2,
        }
        .clamp(1, max);
        Some(Plan { want: lease.slice.max(units), refund })
    }

    /// Redis took `taken` units of `id` (`units` of them the calling one's) and said `remaining`
    /// were left: the rest admit calls here until [`TTL`] from now. Returns what the key has left
    /// by this replica's reckoning.
    pub(super) fn granted(&self, id: &str, taken: u32, units: u32, remaining: u64) -> u64 {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(lease) = keys.get_mut(id) else { return remaining };
        lease.left = lease.left.saturating_add(taken.saturating_sub(units));
        lease.expires = Instant::now() + TTL;
        lease.remaining = remaining;
        remaining + u64::from(lease.left)
    }

    /// Redis refused `id` a slice or a call: the key is near its limit, one request at a time
    /// for [`CALM`].
    pub(super) fn refused(&self, id: &str) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lease) = keys.get_mut(id) {
            lease.slice = 1;
            lease.calm_until = Instant::now() + CALM;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_minute(n: u32) -> Limit {
        Limit::per_minute(n).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn slices_grow_while_they_run_out_and_shrink_when_they_expire() {
        let leases = Leases::default();
        let id: Arc<str> = "bob".into();
        let max = max_slice(per_minute(100_000));
        // A first call asks for itself alone.
        assert_eq!(leases.plan(&id, 1, max), Some(Plan { want: 1, refund: 0 }));
        assert_eq!(leases.granted(&id, 1, 1, 99_999), 99_999);
        assert_eq!(leases.admit(&id, 1), None, "nothing left");
        // The slice ran out before it expired: twice as much next, and so on up to the cap.
        assert_eq!(leases.plan(&id, 1, max), Some(Plan { want: 2, refund: 0 }));
        assert_eq!(leases.granted(&id, 2, 1, 99_997), 99_998);
        assert_eq!(leases.admit(&id, 1), Some(99_997));
        assert_eq!(leases.admit(&id, 1), None);
        for want in [4, 8, 16, 32, 64, 64] {
            assert_eq!(leases.plan(&id, 1, max).unwrap().want, want);
            leases.granted(&id, want, 1, 0);
            while leases.admit(&id, 1).is_some() {}
        }
        // A slice that expires unused goes back with the next take, and the next is half.
        assert_eq!(leases.plan(&id, 1, max).unwrap().want, 64);
        leases.granted(&id, 64, 1, 0);
        assert_eq!(leases.admit(&id, 1), Some(62));
        tokio::time::advance(TTL).await;
        assert_eq!(leases.admit(&id, 1), None, "expired");
        assert_eq!(leases.give_back(&id, 1), None, "expired: Redis takes it back");
        assert_eq!(leases.plan(&id, 1, max), Some(Plan { want: 32, refund: 62 }));
        // Redis refusing a slice: one at a time again, for a while.
        leases.refused(&id);
        for _ in 0..3 {
            assert_eq!(leases.plan(&id, 1, max).unwrap().want, 1);
            leases.granted(&id, 1, 1, 10);
        }
        tokio::time::advance(CALM).await;
        leases.granted(&id, 1, 1, 10);
        assert_eq!(leases.plan(&id, 1, max).unwrap().want, 2, "growing again");
    }

    #[tokio::test(start_paused = true)]
    async fn token_slices_cover_whole_reservations_and_take_settlements_back() {
        let leases = Leases::default();
        let id: Arc<str> = "bob".into();
        let max = max_token_slice(per_minute(1_000_000));
        assert_eq!(max, 10_000);
        // A call reserving 600 tokens asks for at least that.
        assert_eq!(leases.plan(&id, 600, max).unwrap().want, 600);
        leases.granted(&id, 600, 600, 999_400);
        assert_eq!(leases.admit(&id, 600), None);
        // Growing: the slice doubles, and a call is admitted from it only whole.
        assert_eq!(leases.plan(&id, 600, max).unwrap().want, 600, "2, below a call's need");
        leases.granted(&id, 600, 600, 998_800);
        let mut want = 0;
        for _ in 0..14 {
            want = leases.plan(&id, 600, max).unwrap().want;
            leases.granted(&id, want, 600, 0);
            while leases.admit(&id, 600).is_some() {}
        }
        assert_eq!(want, max, "capped at 1% of the limit");
        // A settlement's unused tokens go back into the slice; an excess comes out of it.
        let left = leases.admit(&id, 0).unwrap();
        assert_eq!(leases.give_back(&id, 500), Some(left + 500));
        assert_eq!(leases.admit(&id, 200), Some(left + 300));
        // A slice never holds more than the largest slice: a larger refund goes to Redis.
        assert_eq!(leases.give_back(&id, max), None);
        // A reservation larger than half the largest slice is never leased.
        assert_eq!(leases.plan(&id, 5_001, max), None);
    }

    #[tokio::test(start_paused = true)]
    async fn small_limits_are_never_leased() {
        let leases = Leases::default();
        let id: Arc<str> = "carol".into();
        for _ in 0..5 {
            assert_eq!(leases.plan(&id, 1, max_slice(per_minute(199))), None);
            leases.granted(&id, 1, 1, 10);
            assert_eq!(leases.admit(&id, 1), None);
        }
        // 1% of the limit, at most 64.
        assert_eq!(max_slice(per_minute(200)), 2);
        assert_eq!(max_slice(per_minute(3_000)), 30);
        assert_eq!(max_slice(per_minute(100_000_000)), MAX_SLICE);
    }
}

//! Money in slices: a busy key's calls take their reservations from a slice this replica reserved
//! in Redis ahead of them, so that two script calls (reserve, settle) serve a slice of calls on
//! this replica rather than one.
//!
//! # What it promises
//! - **Budgets stay exact and are never passed**: a slice is a reservation in Redis like any
//!   call's (all or nothing, across the key's and its team's buckets), taken before the calls it
//!   serves; a call takes from a slice only what fits in what the slice has free, and gives back
//!   what it did not spend. A slice is settled in Redis with the sum of its calls' costs (each
//!   capped at its reservation, as alone) once it is closed and its last call has settled, so
//!   what the buckets hold is exactly the sum of the settled costs, as without slices.
//! - **Little is held**: a slice takes calls for [`LIFE`] after Redis counted it, then closes; it
//!   holds at most [`MAX_CALLS`] reservations of the call that opened it and at most 1% of the
//!   tightest limit. It starts at two reservations and doubles while slices run out within their
//!   life; it falls back to two when one closes with room to spare. A slice is taken only for a
//!   key that called within [`LIFE`] of its previous call on this replica, and only while the
//!   tightest budget had [`ROOM`] slices' worth left at the last look: a quiet key, a key near its
//!   limit, and a budget too small for a slice of two calls reserve each call alone, exactly as
//!   without slices. A slice Redis refuses makes the call reserve alone; so do the key's other
//!   calls while one call's slice is being reserved (they go in the same batch as it).
//! - So a refusal can be early by what this replica's slices hold unused, besides the
//!   reservations in flight: what the open one has free (at most 1% of the limit), and what the
//!   settled calls of a closed slice did not spend while its other calls still run (released with
//!   its last call, not with each). No slice is taken once less than [`ROOM`] slices' worth is
//!   left, so near a budget's end the slices still held are the last ones closing.
//! - A closed slice whose calls have all settled is handed back for settlement by the next call
//!   of its key, or by [`Slices::sweep`], which the budgets' catch-up runs every 250 ms; at
//!   shutdown, [`Slices::close_all`].
//!
//! # What it does not
//! A replica that dies holds its open slices until their period ends, as it holds its calls'
//! reservations in flight. Jobs never take from a slice: a job's reservation is stored with it
//! and settled by a worker.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use llmesh_ratelimit::budget::{Hold, Nanos};
use tokio::time::Instant;

use super::Labels;

/// How long a slice takes new calls after Redis counted it.
pub(super) const LIFE: Duration = Duration::from_millis(100);
/// The most reservations of the call that opens it a slice holds.
const MAX_CALLS: u64 = 64;
/// A slice is at most this fraction of the tightest limit (1%).
const LIMIT_SHARE: u64 = 100;
/// Slices are taken only while the tightest budget has this many slices' worth left.
const ROOM: u64 = 20;
/// Keys with slices kept at most (only configured keys have budgets: a guard, not a working
/// size); past it, a new key reserves each call alone.
const CAPACITY: usize = 10_000;

/// The slices of every busy key on this replica.
#[derive(Debug, Default)]
pub(super) struct Slices {
    keys: Mutex<HashMap<Arc<str>, Key>>,
}

/// One key's (one set of buckets') slices.
#[derive(Debug)]
struct Key {
    /// Its buckets' keys, shared by the references of the calls that took from its slices.
    name: Arc<str>,
    /// When this replica last reserved for the key.
    last_call: Instant,
    /// Reservations the next slice holds.
    next_calls: u64,
    /// What the tightest budget had left at the last look (after what was then taken).
    remaining: Option<Nanos>,
    /// The slice new calls take from.
    open: Option<Slice>,
    /// Slices that take no more calls, waiting for theirs to settle: each has one in flight (a
    /// slice closing with none is handed over at once, and the last call to settle hands it over).
    closed: Vec<Slice>,
    next_id: u64,
    /// Since when a call has been reserving the next slice in Redis: meanwhile the key's other
    /// calls reserve alone rather than each reserve a slice of its own. A call that goes away
    /// mid-reservation leaves it set: it counts for [`OPENING`] at most.
    opening: Option<Instant>,
}

/// Longest one call's reservation of a slice keeps the key's other calls from opening one.
const OPENING: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Slice {
    id: u64,
    hold: Hold,
    labels: Arc<[Labels]>,
    opened: Instant,
    /// Not held by a call: what new calls may take.
    free: Nanos,
    /// Settled costs of its calls.
    spent: Nanos,
    /// Calls in flight.
    calls: u32,
}

/// Which slice a call took from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SliceRef {
    key: Arc<str>,
    id: u64,
}

/// What a call should do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// Taken from a slice; what the tightest budget has left by this replica's reckoning.
    Took { slice: SliceRef, remaining: Option<Nanos> },
    /// Reserve a slice of this much in Redis, then [`Slices::opened`] with it.
    Open(Nanos),
    /// Reserve the call alone, as without slices.
    Alone,
}

/// A slice to settle in Redis: its reservation, and what its calls spent.
#[derive(Debug)]
pub(super) struct Done {
    pub hold: Hold,
    pub spent: Nanos,
    pub labels: Arc<[Labels]>,
}

impl Slices {
    /// Plans the reservation of `amount` for a call of the key whose buckets are named `key`
    /// (their tightest limit `limit`); appends to `done` the slices that closed with no call left.
    pub fn plan(&self, key: &str, amount: Nanos, limit: Option<Nanos>, now: Instant, done: &mut Vec<Done>) -> Plan {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = keys.get_mut(key) else {
            if keys.len() < CAPACITY {
                keys.insert(key.into(), Key::new(key, now));
            }
            return Plan::Alone;
        };
        let busy = now.saturating_duration_since(entry.last_call) < LIFE;
        entry.last_call = now;
        if let Some(open) = &mut entry.open {
            let live = now.saturating_duration_since(open.opened) < LIFE;
            if live && open.free >= amount {
                open.free -= amount;
                open.calls += 1;
                let slice = SliceRef { key: entry.name.clone(), id: open.id };
                return Plan::Took { slice, remaining: entry.remaining_here() };
            }
            // Ran out within its life: the next one is larger. Closed with room: back to two.
            entry.next_calls = if live { (entry.next_calls * 2).min(MAX_CALLS) } else { Key::FIRST_CALLS };
            entry.close_open(done);
        }
        let opening = entry.opening.is_some_and(|since| now.saturating_duration_since(since) < OPENING);
        match entry.slice_size(amount, limit) {
            Some(size) if busy && !opening => {
                entry.opening = Some(now);
                Plan::Open(size)
            }
            _ => Plan::Alone,
        }
    }

    /// The slice a call planned to open was not taken (Redis refused it, or did not answer).
    pub fn not_opened(&self, key: &str) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = keys.get_mut(key) {
            entry.opening = None;
        }
    }

    /// A slice reserved in Redis for the call that planned it: the call's `amount` is taken from
    /// it. `remaining`: what Redis said the tightest budget had left after the slice.
    #[allow(clippy::too_many_arguments)] // the slice, and what it was taken for
    pub fn opened(
        &self,
        key: &str,
        hold: Hold,
        labels: Arc<[Labels]>,
        amount: Nanos,
        remaining: Option<Nanos>,
        now: Instant,
        done: &mut Vec<Done>,
    ) -> (SliceRef, Option<Nanos>) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = keys.entry(key.into()).or_insert_with(|| Key::new(key, now));
        entry.opening = None;
        // A slice the previous opener took after its planned one's life ended closes now.
        entry.close_open(done);
        let id = entry.next_id;
        entry.next_id += 1;
        let free = hold.amount.saturating_sub(amount);
        entry.remaining = remaining;
        entry.open = Some(Slice { id, hold, labels, opened: now, free, spent: 0, calls: 1 });
        (SliceRef { key: entry.name.clone(), id }, entry.remaining_here())
    }

    /// What Redis said the tightest budget had left after a reservation of the key's alone.
    pub fn learn(&self, key: &str, remaining: Option<Nanos>) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = keys.get_mut(key) {
            entry.remaining = remaining;
        }
    }

    /// A call that took `amount` from `slice` settles with `cost` (at most `amount`). Returns
    /// the slice when it was closed and this was its last call.
    pub fn settle(&self, slice: &SliceRef, amount: Nanos, cost: Nanos) -> Option<Done> {
        let cost = cost.min(amount);
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = keys.get_mut(&slice.key)?;
        if let Some(open) = entry.open.as_mut().filter(|open| open.id == slice.id) {
            open.calls = open.calls.saturating_sub(1);
            open.spent += cost;
            open.free += amount - cost;
            return None;
        }
        let at = entry.closed.iter().position(|closed| closed.id == slice.id)?;
        let closed = &mut entry.closed[at];
        closed.calls = closed.calls.saturating_sub(1);
        closed.spent += cost;
        (closed.calls == 0).then(|| entry.closed.swap_remove(at).done())
    }

    /// Closes the slices past their life and returns those with no call left; forgets the keys
    /// that have nothing left and have been quiet for a while.
    pub fn sweep(&self, now: Instant) -> Vec<Done> {
        let mut done = Vec::new();
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.retain(|_, entry| {
            if entry.open.as_ref().is_some_and(|open| now.saturating_duration_since(open.opened) >= LIFE) {
                entry.next_calls = Key::FIRST_CALLS;
                entry.close_open(&mut done);
            }
            entry.open.is_some()
                || !entry.closed.is_empty()
                || now.saturating_duration_since(entry.last_call) < LIFE * 10
        });
        done
    }

    /// At shutdown, once no call is in flight: closes every slice and returns those to settle.
    pub fn close_all(&self) -> Vec<Done> {
        let mut done = Vec::new();
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        for entry in keys.values_mut() {
            entry.close_open(&mut done);
        }
        done
    }

    /// Slices open, or closed with calls in flight.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.values().map(|entry| usize::from(entry.open.is_some()) + entry.closed.len()).sum()
    }
}

impl Key {
    const FIRST_CALLS: u64 = 2;

    fn new(name: &str, now: Instant) -> Self {
        Self {
            name: name.into(),
            last_call: now,
            next_calls: Self::FIRST_CALLS,
            remaining: None,
            open: None,
            closed: Vec::new(),
            next_id: 0,
            opening: None,
        }
    }

    /// What the tightest budget has left by this replica's reckoning: what Redis said after the
    /// last look, plus what the open slice has free.
    fn remaining_here(&self) -> Option<Nanos> {
        let free = self.open.as_ref().map_or(0, |open| open.free);
        self.remaining.map(|remaining| remaining.saturating_add(free))
    }

    /// The next slice for calls of `amount`, or `None` when the budget is too small or too near
    /// its limit for one.
    fn slice_size(&self, amount: Nanos, limit: Option<Nanos>) -> Option<Nanos> {
        let cap = limit? / LIMIT_SHARE;
        let size = amount.saturating_mul(self.next_calls).min(cap);
        let roomy = self.remaining.is_none_or(|remaining| remaining >= size.saturating_mul(ROOM));
        (amount > 0 && size >= amount.saturating_mul(Self::FIRST_CALLS) && roomy).then_some(size)
    }

    fn close_open(&mut self, done: &mut Vec<Done>) {
        if let Some(open) = self.open.take() {
            if open.calls == 0 {
                done.push(open.done());
            } else {
                self.closed.push(open);
            }
        }
    }
}

impl Slice {
    fn done(self) -> Done {
        Done { hold: self.hold, spent: self.spent, labels: self.labels }
    }
}

#[cfg(test)]
mod tests {
    use llmesh_ratelimit::budget::{Bucket, Period, Scope};

    use super::*;

    const KEY: &str = "llmesh:budget:month:2026-12:key:alice";
    const LIMIT: Nanos = 1_000_000;

    fn hold(amount: Nanos) -> Hold {
        Hold::new(amount, vec![Bucket::new(Period::Month, Scope::Key, "alice", Some(LIMIT), 0)])
    }

    fn labels() -> Arc<[Labels]> {
        Arc::from(Vec::new())
    }

    /// Plans a call of `amount`, opening a slice of what the plan asks when it asks for one.
    fn call(slices: &Slices, amount: Nanos, now: Instant, done: &mut Vec<Done>) -> Option<SliceRef> {
        match slices.plan(KEY, amount, Some(LIMIT), now, done) {
            Plan::Took { slice, .. } => Some(slice),
            Plan::Open(size) => Some(slices.opened(KEY, hold(size), labels(), amount, Some(LIMIT / 2), now, done).0),
            Plan::Alone => None,
        }
    }

    #[test]
    fn a_quiet_key_reserves_alone_and_a_busy_one_opens_a_slice_of_two_calls() {
        let slices = Slices::default();
        let now = Instant::now();
        let mut done = Vec::new();
        assert_eq!(slices.plan(KEY, 100, Some(LIMIT), now, &mut done), Plan::Alone, "first call");
        let later = now + LIFE * 2;
        assert_eq!(slices.plan(KEY, 100, Some(LIMIT), later, &mut done), Plan::Alone, "quiet: a call a while ago");
        assert_eq!(slices.plan(KEY, 100, Some(LIMIT), later, &mut done), Plan::Open(200), "busy");
        assert!(done.is_empty());
    }

    #[test]
    fn calls_take_from_the_slice_and_its_settlement_is_the_sum_of_their_costs() {
        let slices = Slices::default();
        let now = Instant::now();
        let mut done = Vec::new();
        assert_eq!(call(&slices, 100, now, &mut done), None);
        let first = call(&slices, 100, now, &mut done).unwrap();
        let second = call(&slices, 100, now, &mut done).unwrap();
        assert_eq!(first, second, "the second call fits in the slice of two");
        assert!(slices.settle(&first, 100, 30).is_none(), "the slice is still open");
        // The third call fits in what the first gave back (70).
        let Plan::Took { slice: third, remaining } = slices.plan(KEY, 60, Some(LIMIT), now, &mut done) else {
            panic!("fits")
        };
        assert_eq!(remaining, Some(LIMIT / 2 + 10), "what Redis said, plus the slice's free part");
        assert!(slices.settle(&second, 100, 100).is_none());
        // The slice ends its life; the sweep closes it, but a call is still in flight.
        assert!(slices.sweep(now + LIFE).is_empty());
        let done = slices.settle(&third, 60, 500).expect("the last call of a closed slice hands it over");
        assert_eq!((done.hold.amount, done.spent), (200, 30 + 100 + 60), "costs capped at each reservation");
        assert_eq!(slices.held(), 0);
    }

    #[test]
    fn slices_double_while_they_run_out_and_fall_back_when_they_close_with_room() {
        let slices = Slices::default();
        let now = Instant::now();
        let mut done = Vec::new();
        call(&slices, 100, now, &mut done);
        let mut sizes = Vec::new();
        for _ in 0..40 {
            if let Plan::Open(size) = slices.plan(KEY, 100, Some(LIMIT), now, &mut done) {
                sizes.push(size);
                slices.opened(KEY, hold(size), labels(), 100, Some(LIMIT / 2), now, &mut done);
            }
        }
        assert_eq!(sizes, [200, 400, 800, 1_600, 3_200], "doubling");
        assert!(matches!(slices.plan(KEY, 100, Some(LIMIT), now + LIFE / 2, &mut done), Plan::Took { .. }));
        assert_eq!(slices.plan(KEY, 100, Some(LIMIT), now + LIFE, &mut done), Plan::Open(200), "closed with room");
        // Every closed slice had calls in flight: none handed over yet.
        assert!(done.is_empty());
    }

    #[test]
    fn a_slice_serves_only_the_key_whose_buckets_it_was_taken_from() {
        let slices = Slices::default();
        let now = Instant::now();
        let mut done = Vec::new();
        assert!(call(&slices, 100, now, &mut done).is_none());
        assert!(call(&slices, 100, now, &mut done).is_some(), "alice's slice, with room for one more call");
        // Bob, in alice's team: his buckets are named apart (his own and the team's), so alice's
        // slice is not his, and his first call is a quiet key's.
        let bob = "llmesh:budget:month:2026-12:key:bob\nllmesh:budget:day:2026-12-06:team:search\n";
        assert_eq!(slices.plan(bob, 100, Some(LIMIT), now, &mut done), Plan::Alone);
        assert!(matches!(slices.plan(KEY, 100, Some(LIMIT), now, &mut done), Plan::Took { .. }), "still alice's");
    }

    #[test]
    fn while_one_call_opens_a_slice_the_others_reserve_alone() {
        let slices = Slices::default();
        let now = Instant::now();
        let mut done = Vec::new();
        slices.plan(KEY, 100, Some(LIMIT), now, &mut done);
        assert_eq!(slices.plan(KEY, 100, Some(LIMIT), now, &mut done), Plan::Open(200));
        assert_eq!(slices.plan(KEY, 100, Some(LIMIT), now, &mut done), Plan::Alone, "one is being opened");
        slices.not_opened(KEY);
        assert_eq!(slices.plan(KEY, 100, Some(LIMIT), now, &mut done), Plan::Open(200), "that one was refused");
        // Its caller went away: after a while another busy call opens one.
        let later = now + OPENING / 2;
        assert_eq!(slices.plan(KEY, 100, Some(LIMIT), later, &mut done), Plan::Alone, "quiet since");
        assert_eq!(slices.plan(KEY, 100, Some(LIMIT), later, &mut done), Plan::Alone, "still being opened");
        let later = now + OPENING;
        assert_eq!(slices.plan(KEY, 100, Some(LIMIT), later, &mut done), Plan::Alone, "quiet since");
        assert_eq!(slices.plan(KEY, 100, Some(LIMIT), later, &mut done), Plan::Open(200));
    }

    #[test]
    fn no_slice_near_the_limit_or_for_a_budget_too_small() {
        let slices = Slices::default();
        let now = Instant::now();
        let mut done = Vec::new();
        slices.plan(KEY, 100, Some(LIMIT), now, &mut done);
        // 1% of a limit of 15,000 is 150: under two calls of 100.
        assert_eq!(slices.plan(KEY, 100, Some(15_000), now, &mut done), Plan::Alone);
        assert_eq!(slices.plan(KEY, 100, None, now, &mut done), Plan::Alone, "no limit to take a share of");
        // Redis said 3,999 was left: under twenty slices of 200.
        slices.learn(KEY, Some(3_999));
        assert_eq!(slices.plan(KEY, 100, Some(LIMIT), now, &mut done), Plan::Alone);
        slices.learn(KEY, Some(4_000));
        assert_eq!(slices.plan(KEY, 100, Some(LIMIT), now, &mut done), Plan::Open(200));
    }

    #[test]
    fn an_idle_slice_is_handed_over_by_the_sweep_and_all_at_shutdown() {
        let slices = Slices::default();
        let now = Instant::now();
        let mut done = Vec::new();
        call(&slices, 100, now, &mut done);
        let slice = call(&slices, 100, now, &mut done).unwrap();
        slices.settle(&slice, 100, 40);
        assert!(slices.sweep(now + LIFE / 2).is_empty(), "still taking calls");
        let swept = slices.sweep(now + LIFE);
        assert_eq!(swept.iter().map(|done| (done.hold.amount, done.spent)).collect::<Vec<_>>(), [(200, 40)]);

        assert!(call(&slices, 100, now + LIFE * 2, &mut done).is_none(), "quiet again");
        let open = call(&slices, 100, now + LIFE * 2, &mut done);
        assert!(open.is_some());
        slices.settle(&open.unwrap(), 100, 7);
        let closed = slices.close_all();
        assert_eq!(closed.iter().map(|done| done.spent).collect::<Vec<_>>(), [7]);
        assert_eq!(slices.held(), 0);
    }
}

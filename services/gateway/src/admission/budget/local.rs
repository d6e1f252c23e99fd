//! This replica's own reckoning of the budgets, for the calls it decides while Redis is not
//! there: its share of what Redis last said was left, and what it spent since, until Redis takes
//! that spend over.
//!
//! Per bucket it keeps what Redis last said was left (`limit − spent − held`, or the whole limit
//! when Redis never said), the reservations it holds, and the spend it settled that Redis does not
//! know yet. A reservation fits when that spend, plus what is held, plus the reservation, stays
//! within `1 / replicas` of what was left. Each addition to Redis of the spend decided here has an
//! id and a fixed amount, so retrying it after a timeout never adds it twice.

use std::{collections::HashMap, sync::Mutex};

use llmesh_ratelimit::budget::{Bucket, Hold, Level, Nanos};

#[derive(Debug, Default)]
pub(super) struct LocalBudgets {
    buckets: Mutex<HashMap<String, LocalBucket>>,
}

#[derive(Debug)]
struct LocalBucket {
    bucket: Bucket,
    /// What Redis last said the bucket had left; `None` when it never said (or has no limit).
    known_remaining: Option<Nanos>,
    /// Reserved here by calls in flight.
    held: Nanos,
    /// Settled here and not yet added to Redis.
    unshared: Nanos,
    /// The addition to Redis under way: its id and amount, kept until Redis took it.
    adding: Option<(String, Nanos)>,
}

impl LocalBucket {
    fn new(bucket: &Bucket) -> Self {
        Self { bucket: bucket.clone(), known_remaining: None, held: 0, unshared: 0, adding: None }
    }

    /// What was left when Redis last said, or the whole limit.
    fn base(&self) -> Option<Nanos> {
        self.known_remaining.or(self.bucket.limit)
    }

    /// The whole bucket as this replica sees it (what Redis said, plus what happened here since).
    fn level(&self) -> Level {
        let spent_elsewhere = self.bucket.limit.zip(self.base()).map_or(0, |(limit, base)| limit.saturating_sub(base));
        Level { spent: spent_elsewhere.saturating_add(self.unshared), held: self.held, limit: self.bucket.limit }
    }
}

impl LocalBudgets {
    /// Takes `hold` here when it fits every bucket's share; else says which bucket refused.
    pub(super) fn reserve(&self, hold: &Hold, replicas: u32) -> Result<Vec<Level>, (usize, Vec<Level>)> {
        let Ok(mut buckets) = self.buckets.lock() else { return Err((0, Vec::new())) };
        let mut refused = None;
        for (index, bucket) in hold.buckets.iter().enumerate() {
            let state = buckets.entry(bucket.key.clone()).or_insert_with(|| LocalBucket::new(bucket));
            state.bucket.limit = bucket.limit;
            if let Some(base) = state.base() {
                let share = base / u64::from(replicas.max(1));
                if refused.is_none() && state.unshared.saturating_add(state.held).saturating_add(hold.amount) > share {
                    refused = Some(index);
                }
            }
        }
        let levels = |buckets: &HashMap<String, LocalBucket>| {
            hold.buckets
                .iter()
                .map(|bucket| buckets.get(&bucket.key).map(LocalBucket::level).unwrap_or_default())
                .collect()
        };
        if let Some(index) = refused {
            return Err((index, levels(&buckets)));
        }
        for bucket in &hold.buckets {
            if let Some(state) = buckets.get_mut(&bucket.key) {
                state.held = state.held.saturating_add(hold.amount);
            }
        }
        Ok(levels(&buckets))
    }

    /// Settles a hold taken here with its real cost.
    pub(super) fn settle(&self, hold: &Hold, cost: Nanos) -> Vec<Level> {
        let Ok(mut buckets) = self.buckets.lock() else { return Vec::new() };
        hold.buckets
            .iter()
            .map(|bucket| {
                let state = buckets.entry(bucket.key.clone()).or_insert_with(|| LocalBucket::new(bucket));
                state.held = state.held.saturating_sub(hold.amount);
                state.unshared = state.unshared.saturating_add(cost);
                state.level()
            })
            .collect()
    }

    /// Remembers what Redis said each of `hold`'s buckets has left.
    pub(super) fn learn(&self, hold: &Hold, levels: &[Level]) {
        let Ok(mut buckets) = self.buckets.lock() else { return };
        for (bucket, level) in hold.buckets.iter().zip(levels) {
            let state = buckets.entry(bucket.key.clone()).or_insert_with(|| LocalBucket::new(bucket));
            state.known_remaining = level.remaining();
        }
    }

    /// The additions to make to Redis: per bucket with spend Redis does not know, an addition of
    /// one bucket (its id fixed until Redis took it) and its amount.
    pub(super) fn to_flush(&self) -> Vec<(Hold, Nanos)> {
        let Ok(mut buckets) = self.buckets.lock() else { return Vec::new() };
        buckets
            .values_mut()
            .filter(|state| state.unshared > 0)
            .map(|state| {
                let unshared = state.unshared;
                let (id, amount) =
                    state.adding.get_or_insert_with(|| (uuid::Uuid::now_v7().simple().to_string(), unshared)).clone();
                (Hold { id, amount: 0, buckets: vec![state.bucket.clone()] }, amount)
            })
            .collect()
    }

    /// Redis took the addition `flush` of `amount`.
    pub(super) fn flushed(&self, flush: &Hold, amount: Nanos) {
        let Ok(mut buckets) = self.buckets.lock() else { return };
        for bucket in &flush.buckets {
            if let Some(state) = buckets.get_mut(&bucket.key)
                && state.adding.as_ref().is_some_and(|(id, _)| *id == flush.id)
            {
                state.unshared = state.unshared.saturating_sub(amount);
                state.adding = None;
            }
        }
    }

    /// Spend settled here that Redis does not know yet, over every bucket.
    pub(super) fn unflushed(&self) -> Nanos {
        self.buckets.lock().map(|buckets| buckets.values().map(|state| state.unshared).sum()).unwrap_or(0)
    }
}

//! Spend budgets per API key and per team, in US dollars per calendar day or month (UTC), exact
//! across gateway replicas: each generation call reserves its most expensive outcome before it
//! runs and settles its real cost after, against the key's budget and its team's at once.
//!
//! # What it promises
//! - **Where the limits come from**: a key's `budget` and its team's (`[[teams]]`), in the keys
//!   file ([`crate::admission::auth`]). A key with neither costs nothing here, not even a Redis
//!   call. The money itself lives in Redis (`llmesh_ratelimit::budget`), so reloading the keys
//!   changes limits, never what was spent.
//! - **Reserve, then settle** ([`Budgets::reserve`], [`Spend`]): the reservation is the call's
//!   most expensive outcome (the prompt's estimate at the input price plus `max_tokens` at the
//!   output price, at the dearer of the requested model and the fallback's secondary model), taken
//!   from the key's and the team's buckets in one atomic Redis script, or refused
//!   (RESOURCE_EXHAUSTED naming the budget, no retry hint: waiting within the period will not
//!   help). The prompt's part is the most tokens any provider can count for it
//!   (`llmesh_proto::validate::prompt_tokens_bound`: its bytes plus the framing), not the
//!   quarter-byte estimate the token rate limit holds. The settlement releases it and adds the
//!   real cost, once, but never more than the reservation ([`charged`]; the Redis script caps it
//!   too). So what the buckets hold is exactly the sum of the settled costs, and a budget is never
//!   passed: every reservation fitted under the limit, and no settlement adds more than its
//!   reservation took. A call is refused only when what is spent plus what calls in flight hold
//!   leaves no room for it: the most a refusal can be "early" is the reservations in flight at the
//!   time, plus what slices hold unused.
//! - **In slices** (`slices.rs`): a busy key's calls take their reservations from a slice this
//!   replica reserved in Redis ahead (a reservation like a call's, settled with the sum of its
//!   calls' costs), so that two script calls serve a slice of calls. Quiet keys, keys near their
//!   limit, small budgets and jobs reserve each call alone. A replica settles its slices when it
//!   stops ([`Budgets::close`]).
//! - **In batches** (`batch.rs`): a replica sends its reservations, and its settlements, by group
//!   commit: one script call of each kind in flight at a time, carrying what arrived while the
//!   previous one was (up to 64 holds), each hold checked in turn as if alone; a call that finds
//!   none in flight goes at once. Batching changes what a call costs Redis, not what Redis
//!   decides.
//! - **Without Redis**, or while it does not answer, each replica decides alone, with its share of
//!   what Redis last said was left (or of the whole limit, when it never said): `1 / replicas`
//!   (`[gateway.budget] replicas`). Such decisions are counted (`llmesh_budget_decisions_total
//!   {store="local"}`) and the gateway's MeshHealth shows the budget store DEGRADED. When Redis
//!   answers again, the spend decided alone is added to Redis (once: each addition has an id), and
//!   settlements that could not reach it are retried (once: each reservation has an id): nothing is
//!   lost and nothing is counted twice. A reservation whose reply was lost (a batch that timed
//!   out: each of its reservations) is released, and a late one is void (see
//!   `llmesh_ratelimit::budget`); so is the reservation of a call that went away before its
//!   answer (its client cancelled while it was in flight or waiting for its batch).
//! - Settlements run in the background: an answer does not wait for them. A call that ends
//!   without settling (the client went away) pays for what it was sent: nothing when it was sent
//!   nothing, else its prompt's estimate at the input price plus the text streamed to it so far at
//!   the output price.
//!
//! # What it does not
//! A reservation whose gateway died before settling stays held until its period ends (the way of
//! the limit). Redis restarted without its data forgets the period's spend: run the limiter's
//! Redis with persistence where budgets matter.

mod batch;
mod levels;
mod local;
mod slices;

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use llmesh_ratelimit::budget::{self, Bucket, Hold, Level, Nanos, Rate, RedisBudget, Reserved, Scope, StoredHold};
use opentelemetry::KeyValue;
use serde::{Deserialize, Serialize};

pub use self::levels::Shown;
use self::{
    batch::{Batches, MAX_BATCH, Settlement},
    levels::LastLevels,
    local::LocalBudgets,
    slices::{Done, Plan, SliceRef, Slices},
};
use super::redis_health::RedisHealth;
use crate::{error::CallError, headers::Quota, metrics::metrics, principal::Principal};

/// How often settlements and spend that could not reach Redis are retried.
const CATCH_UP_INTERVAL: Duration = Duration::from_millis(250);
/// Settlements kept for Redis while it is away; past this the oldest is dropped (its reservation
/// stays held until the period ends, which errs on the side of the budget).
const MAX_PENDING: usize = 100_000;

/// `[gateway.budget]`. The budgets themselves are in the keys file; their state is in the rate
/// limiter's Redis (`[gateway.rate_limit] redis_url`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Gateway replicas sharing the budgets: without Redis each enforces this share of them.
    pub replicas: u32,
    /// Share of a reused answer's price a call pays: a cache hit, or an identical call's answer in
    /// flight (0: free, the default; 1: as if generated).
    pub cache_hit_share: f64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self { replicas: 1, cache_hit_share: 0.0 }
    }
}

/// The budgets of every key and team; see the module docs.
pub struct Budgets {
    replicas: u32,
    cache_hit_share: f64,
    redis: Option<Shared>,
    local: LocalBudgets,
    /// Settlements Redis did not take yet (it failed, or was being given a rest).
    pending: Mutex<VecDeque<Pending>>,
    /// Reservations and settlements waiting for the script call in flight.
    batches: Batches,
    /// Money reserved ahead for busy keys' calls (`slices.rs`).
    slices: Slices,
    local_decisions: AtomicU64,
    /// Whether any key or team has a budget (health shows the store only then).
    in_use: AtomicBool,
    /// This process's name for the reservations it took in its own memory.
    replica: Arc<str>,
    /// What the budget gauges show.
    last_levels: LastLevels,
}

impl std::fmt::Debug for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgets")
            .field("replicas", &self.replicas)
            .field("redis", &self.redis.is_some())
            .field("pending", &self.pending_count())
            .finish_non_exhaustive()
    }
}

/// Redis, and whether it is worth asking right now.
struct Shared {
    budget: RedisBudget,
    health: RedisHealth,
    /// How long a script call may take: also the longest a reservation waits for its batch.
    timeout: Duration,
}

/// Work for Redis that has to wait for it.
#[derive(Debug, Clone)]
enum Pending {
    Settle { hold: Hold, cost: Nanos },
}

/// Where a reservation was taken, and so where it is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    Shared,
    Local,
    /// From a slice this replica reserved in Redis ahead (`slices.rs`).
    Slice(SliceRef),
}

/// Whether a reservation may come from a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slicing {
    /// A call: yes, when its key is busy.
    Allowed,
    /// A job: never. Its reservation is stored with it and settled by a worker, in Redis.
    Never,
}

/// The money a call holds until it settles; settles on drop with what the caller was sent.
pub struct Spend {
    budgets: Arc<Budgets>,
    /// `None` once settled or handed over.
    held: Option<Held>,
    /// The requested model's price: what a call dropped half-way pays at.
    rate: Rate,
    prompt_tokens: u32,
    received: u32,
}

#[derive(Debug, Clone)]
struct Held {
    hold: Hold,
    taken: Taken,
    /// What the tightest budget had left once this reservation was taken.
    remaining: Option<Nanos>,
    labels: Arc<[Labels]>,
}

/// Metric labels of a hold's buckets, in its order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Labels([KeyValue; 2]);

impl Budgets {
    /// Budgets kept in `redis_url`'s Redis (none: each replica alone). Must run inside a Tokio
    /// runtime when `redis_url` is set; fails only on a malformed URL.
    pub fn new(config: &BudgetConfig, redis_url: Option<&str>, timeout: Duration) -> anyhow::Result<Arc<Self>> {
        let redis = match redis_url.filter(|url| !url.trim().is_empty()) {
            Some(url) => {
                let redacted = llmesh_util::redact::redact_url(url);
                let timeout = timeout.max(Duration::from_millis(1));
                let budget = RedisBudget::new(url, timeout)
                    .map_err(|error| anyhow::anyhow!("invalid rate_limit.redis_url {redacted}: {error}"))?;
                Some(Shared { budget, health: RedisHealth::new(redacted, "budgets"), timeout })
            }
            None => None,
        };
        if !config.cache_hit_share.is_finite() || !(0.0..=1.0).contains(&config.cache_hit_share) {
            anyhow::bail!("budget.cache_hit_share must be from 0 to 1 (got {})", config.cache_hit_share);
        }
        let budgets = Arc::new(Self {
            replicas: config.replicas.max(1),
            cache_hit_share: config.cache_hit_share,
            redis,
            local: LocalBudgets::default(),
            pending: Mutex::new(VecDeque::new()),
            batches: Batches::default(),
            slices: Slices::default(),
            local_decisions: AtomicU64::new(0),
            in_use: AtomicBool::new(false),
            replica: format!("gateway-{}", uuid::Uuid::now_v7().simple()).into(),
            last_levels: LastLevels::default(),
        });
        if budgets.redis.is_some() {
            let runtime = tokio::runtime::Handle::try_current()
                .map_err(|_| anyhow::anyhow!("budgets on Redis must be set up inside a Tokio runtime"))?;
            runtime.spawn(catch_up(Arc::downgrade(&budgets)));
        }
        Ok(budgets)
    }

    /// Says whether any key or team has a budget (when the keys are loaded).
    pub fn set_in_use(&self, in_use: bool) {
        self.in_use.store(in_use, Ordering::Relaxed);
    }

    /// Whether any key or team has a budget, or a budgeted call was seen.
    pub fn in_use(&self) -> bool {
        self.in_use.load(Ordering::Relaxed)
    }

    /// The share of a reused answer's price a call pays.
    pub fn cache_hit_share(&self) -> f64 {
        self.cache_hit_share
    }

    /// Reserves `amount` from `principal`'s budgets (its own, its team's), for a call whose model
    /// costs `rate` and whose prompt is estimated at `prompt_tokens`. `None` when no budget applies.
    pub async fn reserve(
        self: &Arc<Self>,
        principal: &Principal,
        amount: Nanos,
        rate: Rate,
        prompt_tokens: u32,
    ) -> Result<Option<Spend>, CallError> {
        self.reserve_with(principal, amount, rate, prompt_tokens, Slicing::Allowed).await
    }

    /// [`Self::reserve`], from a slice only when `slicing` allows it.
    pub async fn reserve_with(
        self: &Arc<Self>,
        principal: &Principal,
        amount: Nanos,
        rate: Rate,
        prompt_tokens: u32,
        slicing: Slicing,
    ) -> Result<Option<Spend>, CallError> {
        let Some((buckets, labels)) = buckets_of(principal, now_ms()) else { return Ok(None) };
        if !self.in_use() {
            self.set_in_use(true);
        }
        let shared = self.redis.as_ref().filter(|shared| shared.health.should_try());
        let slice_key = (slicing == Slicing::Allowed && shared.is_some()).then(|| slice_key(&buckets));
        if let (Some(shared), Some(key)) = (shared, &slice_key)
            && let Some(held) = self.take_from_slice(shared, key, amount, &buckets, &labels).await?
        {
            return Ok(Some(Spend { budgets: self.clone(), held: Some(held), rate, prompt_tokens, received: 0 }));
        }
        let (hold, taken, levels) = self.take(Hold::new(amount, buckets), &labels).await?;
        let remaining = levels.iter().filter_map(Level::remaining).min();
        if let (Some(key), Taken::Shared) = (&slice_key, &taken) {
            self.slices.learn(key, remaining);
        }
        let held = Held { hold, taken, remaining, labels };
        Ok(Some(Spend { budgets: self.clone(), held: Some(held), rate, prompt_tokens, received: 0 }))
    }

    /// Takes `amount` from the key's open slice, or from a new slice reserved in Redis when the
    /// key is busy; `None` when the call is to reserve alone (`slices.rs`).
    async fn take_from_slice(
        self: &Arc<Self>,
        shared: &Shared,
        key: &str,
        amount: Nanos,
        buckets: &[Bucket],
        labels: &Arc<[Labels]>,
    ) -> Result<Option<Held>, CallError> {
        let limit = buckets.iter().filter_map(|bucket| bucket.limit).min();
        let mut done = Vec::new();
        let plan = self.slices.plan(key, amount, limit, tokio::time::Instant::now(), &mut done);
        self.settle_slices(done);
        let size = match plan {
            Plan::Took { slice, remaining } => {
                metrics().budget_decisions.add(1, &[KeyValue::new("store", "slice")]);
                let hold = Hold::new(amount, buckets.to_vec());
                return Ok(Some(Held { hold, taken: Taken::Slice(slice), remaining, labels: labels.clone() }));
            }
            Plan::Open(size) => size,
            Plan::Alone => return Ok(None),
        };
        match self.reserve_in_redis(shared, Hold::new(size, buckets.to_vec())).await? {
            (slice, Some(Reserved::Taken(levels))) => {
                self.local.learn(&slice, &levels);
                self.record(labels, &levels, "redis");
                let remaining = levels.iter().filter_map(Level::remaining).min();
                let now = tokio::time::Instant::now();
                let mut done = Vec::new();
                let (slice, remaining) =
                    self.slices.opened(key, slice, labels.clone(), amount, remaining, now, &mut done);
                self.settle_slices(done);
                let hold = Hold::new(amount, buckets.to_vec());
                Ok(Some(Held { hold, taken: Taken::Slice(slice), remaining, labels: labels.clone() }))
            }
            // Not room for a slice (the key is near a limit): the call asks for itself alone.
            (slice, Some(Reserved::Refused { levels, .. })) => {
                self.local.learn(&slice, &levels);
                self.slices.learn(key, levels.iter().filter_map(Level::remaining).min());
                self.slices.not_opened(key);
                Ok(None)
            }
            // Redis did not decide (a lost reply is released): the call goes the usual way.
            (_, Some(Reserved::Void) | None) => {
                self.slices.not_opened(key);
                Ok(None)
            }
        }
    }

    /// Settles in Redis the slices that closed with no call left.
    fn settle_slices(self: &Arc<Self>, done: Vec<Done>) {
        for Done { hold, spent, labels } in done {
            self.settle_soon(Settlement { hold, cost: spent, labels: Some(labels) });
        }
    }

    /// At shutdown, once no call is in flight: settles every slice in Redis (within the script
    /// timeout). What cannot be settled stays held until its period ends.
    pub async fn close(&self) {
        let done = self.slices.close_all();
        let Some(shared) = self.redis.as_ref().filter(|_| !done.is_empty()) else { return };
        match shared.budget.settle_many(done.iter().map(|done| (&done.hold, done.spent))).await {
            Ok(_) => tracing::info!(slices = done.len(), "budget slices settled"),
            Err(failure) => {
                shared.health.failed(&failure);
                tracing::warn!(slices = done.len(), "budget slices could not be settled: held until their period ends");
            }
        }
    }

    /// Takes the hold in Redis (alone, or in the next batch: `batch.rs`), or alone when Redis does
    /// not answer.
    async fn take(
        self: &Arc<Self>,
        hold: Hold,
        labels: &Arc<[Labels]>,
    ) -> Result<(Hold, Taken, Vec<Level>), CallError> {
        let hold = match self.redis.as_ref().filter(|shared| shared.health.should_try()) {
            Some(shared) => match self.reserve_in_redis(shared, hold).await? {
                (hold, Some(Reserved::Taken(levels))) => {
                    self.local.learn(&hold, &levels);
                    self.record(labels, &levels, "redis");
                    return Ok((hold, Taken::Shared, levels));
                }
                (hold, Some(Reserved::Refused { bucket, levels })) => {
                    self.local.learn(&hold, &levels);
                    self.record(labels, &levels, "redis");
                    return Err(self.refused(&hold, labels, bucket, &levels));
                }
                (hold, Some(Reserved::Void)) => {
                    tracing::warn!(hold = %hold.id, "a fresh budget reservation was void");
                    hold
                }
                // Redis failed (counted in its health; a lost reply is released): decide alone.
                (hold, None) => hold,
            },
            None => hold,
        };
        self.local_decisions.fetch_add(1, Ordering::Relaxed);
        let decision = self.local.reserve(&hold, self.replicas);
        match decision {
            Ok(levels) => {
                self.record(labels, &levels, "local");
                Ok((hold, Taken::Local, levels))
            }
            Err((bucket, levels)) => {
                self.record(labels, &levels, "local");
                Err(self.refused(&hold, labels, bucket, &levels))
            }
        }
    }

    /// The decision, counted, and each bucket's levels for the budget gauges.
    fn record(&self, labels: &[Labels], levels: &[Level], store: &'static str) {
        metrics().budget_decisions.add(1, &[KeyValue::new("store", store)]);
        self.last_levels.note(labels, levels);
    }

    /// Observes `shown` of every budget for its gauge (`llmesh_budget_*_usd`), at collection.
    pub fn observe_levels(&self, shown: Shown, gauge: &dyn opentelemetry::metrics::AsyncInstrument<f64>) {
        self.last_levels.observe(shown, gauge);
    }

    fn refused(&self, hold: &Hold, labels: &[Labels], bucket: usize, levels: &[Level]) -> CallError {
        let level = levels.get(bucket).copied().unwrap_or_default();
        if let Some(labels) = labels.get(bucket) {
            metrics().budget_refusals.add(1, &labels.0);
        }
        over_budget(hold, bucket, level, labels.get(bucket))
    }

    /// Settles `held` with `cost`, in the background (in Redis: with the next batch, or at once when
    /// none is in flight); returns what its tightest budget has left by this reservation's
    /// reckoning.
    fn settle_in_background(self: &Arc<Self>, held: Held, cost: Nanos) -> Option<Nanos> {
        let cost = charged(&held.hold, cost);
        let remaining = held.remaining.map(|remaining| {
            if cost <= held.hold.amount {
                remaining.saturating_add(held.hold.amount - cost)
            } else {
                remaining.saturating_sub(cost - held.hold.amount)
            }
        });
        match held.taken {
            Taken::Slice(slice) => {
                if let Some(done) = self.slices.settle(&slice, held.hold.amount, cost) {
                    self.settle_slices(vec![done]);
                }
            }
            Taken::Local => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let budgets = self.clone();
                    runtime.spawn(async move {
                        let levels = budgets.local.settle(&held.hold, cost);
                        budgets.record(&held.labels, &levels, "local");
                    });
                }
                // Only at shutdown: the reservation stays held, which errs on the side of the budget.
                Err(_) => tracing::debug!("no runtime: a budget reservation stays held"),
            },
            Taken::Shared => self.settle_soon(Settlement { hold: held.hold, cost, labels: Some(held.labels) }),
        }
        remaining
    }

    async fn settle_shared(&self, hold: Hold, cost: Nanos, labels: Option<&[Labels]>) {
        let Some(shared) = self.redis.as_ref().filter(|shared| shared.health.should_try()) else {
            self.defer(Pending::Settle { hold, cost });
            return;
        };
        match shared.budget.settle(&hold, cost).await {
            Ok(settled) => {
                shared.health.answered();
                self.local.learn(&hold, &settled.levels);
                if let Some(labels) = labels {
                    self.record(labels, &settled.levels, "redis");
                }
            }
            Err(failure) => {
                shared.health.failed(&failure);
                self.defer(Pending::Settle { hold, cost });
            }
        }
    }

    /// A job's reservation, as its record stores it (`None`: nothing to store).
    pub fn store(&self, spend: Spend) -> Option<StoredHold> {
        let mut spend = spend;
        if matches!(spend.held.as_ref().map(|held| &held.taken), Some(Taken::Slice(_))) {
            // Jobs reserve with `Slicing::Never`; a slice's money cannot go with one job.
            tracing::error!("a job's budget reservation came from a slice: it settles as a call's instead");
            return None;
        }
        let held = spend.held.take()?;
        let local_replica = (held.taken == Taken::Local).then(|| self.replica.to_string());
        Some(StoredHold { hold: held.hold, rate: spend.rate, local_replica })
    }

    /// Settles a stored reservation (a cancelled job's) with `cost`, where it was taken, when this
    /// replica can reach it: one taken in another replica's memory stays charged there.
    pub async fn settle_stored(&self, stored: StoredHold, cost: Nanos) {
        let cost = charged(&stored.hold, cost);
        match stored.local_replica {
            Some(replica) if replica == *self.replica => {
                self.local.settle(&stored.hold, cost);
            }
            Some(_) => {
                tracing::debug!(hold = %stored.hold.id, "reserved in another replica's memory: stays held there")
            }
            None => self.settle_shared(stored.hold, cost, None).await,
        }
    }

    fn defer(&self, pending: Pending) {
        let Ok(mut queue) = self.pending.lock() else { return };
        if queue.len() >= MAX_PENDING {
            queue.pop_front();
            tracing::warn!("too many budget settlements wait for Redis: the oldest is dropped and stays held");
        }
        queue.push_back(pending);
    }

    /// Settlements waiting for Redis.
    pub fn pending_count(&self) -> usize {
        self.pending.lock().map(|queue| queue.len()).unwrap_or(0)
    }

    /// Reservations this replica decided alone (no Redis, or Redis not answering).
    pub fn local_decisions(&self) -> u64 {
        self.local_decisions.load(Ordering::Relaxed)
    }

    /// Spend decided alone and not yet added to Redis, in nano-dollars.
    pub fn unshared_spend(&self) -> Nanos {
        self.local.unflushed()
    }

    /// Whether the budgets are shared through a Redis that answers.
    pub fn shared(&self) -> Option<bool> {
        self.redis.as_ref().map(|shared| shared.health.healthy())
    }

    /// Replays what waited for Redis: settlements, then spend decided alone. Stops at the first
    /// failure (Redis is away again). Returns whether everything went through.
    async fn catch_up_once(&self) -> bool {
        let Some(shared) = self.redis.as_ref() else { return true };
        if (self.pending_count() == 0 && self.local.unflushed() == 0) || !shared.health.should_try() {
            return self.pending_count() == 0 && self.local.unflushed() == 0;
        }
        loop {
            let batch: Vec<(Hold, Nanos)> = match self.pending.lock() {
                Ok(mut queue) => {
                    let n = queue.len().min(MAX_BATCH);
                    queue.drain(..n).map(|Pending::Settle { hold, cost }| (hold, cost)).collect()
                }
                Err(_) => Vec::new(),
            };
            if batch.is_empty() {
                break;
            }
            match shared.budget.settle_many(batch.iter().map(|(hold, cost)| (hold, *cost))).await {
                Ok(settled) => {
                    shared.health.answered();
                    for ((hold, _), settled) in batch.iter().zip(&settled) {
                        self.local.learn(hold, &settled.levels);
                    }
                }
                Err(failure) => {
                    shared.health.failed(&failure);
                    if let Ok(mut queue) = self.pending.lock() {
                        for (hold, cost) in batch.into_iter().rev() {
                            queue.push_front(Pending::Settle { hold, cost });
                        }
                    }
                    return false;
                }
            }
        }
        for (flush, amount) in self.local.to_flush() {
            match shared.budget.add(&flush, amount).await {
                Ok(settled) => {
                    shared.health.answered();
                    self.local.flushed(&flush, amount);
                    self.local.learn(&flush, &settled.levels);
                }
                Err(failure) => {
                    shared.health.failed(&failure);
                    return false;
                }
            }
        }
        true
    }
}

/// Retries what waited for Redis until the budgets are dropped.
async fn catch_up(budgets: std::sync::Weak<Budgets>) {
    if let Some(budgets) = budgets.upgrade()
        && let Some(shared) = &budgets.redis
    {
        match shared.budget.warm_up().await {
            Ok(()) => tracing::info!(url = %shared.health.url(), "budgets shared through Redis"),
            Err(failure) => shared.health.failed(&failure),
        }
    }
    let mut ticker = tokio::time::interval(CATCH_UP_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(budgets) = budgets.upgrade() else { return };
        budgets.settle_slices(budgets.slices.sweep(tokio::time::Instant::now()));
        budgets.catch_up_once().await;
    }
}

impl Spend {
    /// Counts `tokens` more as sent to the caller (streamed text, before the usage is known).
    pub fn received(&mut self, tokens: u32) {
        self.received = self.received.saturating_add(tokens);
    }

    /// What the tightest budget had left once the reservation was taken.
    pub fn remaining(&self) -> Option<Nanos> {
        self.held.as_ref().and_then(|held| held.remaining)
    }

    /// The requested model's price.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Settles with the call's real cost, in the background; returns what its tightest budget
    /// has left by this reservation's reckoning.
    pub fn settle(mut self, cost: Nanos) -> Option<Nanos> {
        let held = self.held.take()?;
        self.budgets.settle_in_background(held, cost)
    }

    /// What a call that ends now, unsettled, pays: see the module docs.
    fn dropped_cost(&self) -> Nanos {
        if self.received == 0 { 0 } else { budget::cost(self.prompt_tokens, self.received, self.rate) }
    }
}

impl Drop for Spend {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            let cost = self.dropped_cost().min(held.hold.amount);
            self.budgets.settle_in_background(held, cost);
        }
    }
}

impl std::fmt::Debug for Spend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spend").field("held", &self.held).field("received", &self.received).finish()
    }
}

/// What a call whose real cost is `cost` is charged against `hold`: its cost, but never more than
/// it reserved, so that no settlement takes a bucket past its limit (the reservation fitted under
/// it). The reservation bounds every cost a provider can report for text
/// (`llmesh_proto::validate::prompt_tokens_bound`); more is logged and left uncharged.
fn charged(hold: &Hold, cost: Nanos) -> Nanos {
    if cost > hold.amount {
        tracing::info!(
            hold = %hold.id,
            reserved = hold.amount,
            cost,
            "a call cost more than its budget reservation: charged the reservation"
        );
    }
    cost.min(hold.amount)
}

/// The buckets a principal's calls are counted in (its own, then its team's when the team has a
/// budget), with their metric labels; `None` when no budget applies.
fn buckets_of(principal: &Principal, now_ms: u64) -> Option<(Vec<Bucket>, Arc<[Labels]>)> {
    if !principal.has_budget() {
        return None;
    }
    let mut buckets = Vec::with_capacity(2);
    let mut labels = Vec::with_capacity(2);
    // A key without a budget of its own is counted in its team's period.
    let period = principal.budget.or(principal.team_budget).map(|budget| budget.period).unwrap_or_default();
    let limit = principal.budget.map(|budget| budget.nanos);
    buckets.push(Bucket::new(period, Scope::Key, &principal.id, limit, now_ms));
    labels.push(Labels([KeyValue::new("scope", "key"), KeyValue::new("name", principal.id.clone())]));
    if let (Some(team), Some(budget)) = (&principal.team, principal.team_budget) {
        buckets.push(Bucket::new(budget.period, Scope::Team, team, Some(budget.nanos), now_ms));
        labels.push(Labels([KeyValue::new("scope", "team"), KeyValue::new("name", team.clone())]));
    }
    Some((buckets, labels.into()))
}

/// The name of a key's slices: its buckets' keys (a key changing team gets other slices).
fn slice_key(buckets: &[Bucket]) -> String {
    let mut key = String::with_capacity(buckets.iter().map(|bucket| bucket.key.len() + 1).sum());
    for bucket in buckets {
        key.push_str(&bucket.key);
        key.push('\n');
    }
    key
}

/// Why a call is over budget, for the caller: which budget, what it holds, what the call needed.
fn over_budget(hold: &Hold, bucket: usize, level: Level, labels: Option<&Labels>) -> CallError {
    let whose = match labels {
        Some(Labels([scope, name])) => format!("{} {}", scope.value.as_str(), name.value.as_str()),
        None => "this key".to_string(),
    };
    let period = hold.buckets.get(bucket).map(|bucket| period_of(&bucket.key)).unwrap_or_default();
    let remaining = level.remaining().unwrap_or(0);
    let message = format!(
        "budget: {whose} has spent ${} of its ${} budget for {period} (${} more held by calls in flight); \
         this call may cost up to ${}",
        budget::format_usd(level.spent),
        budget::format_usd(level.limit.unwrap_or(0)),
        budget::format_usd(level.held),
        budget::format_usd(hold.amount),
    );
    // Waiting will not help within the period: clients are told not to retry (`CallError::retry`).
    CallError::OverBudget { message, quota: Quota { remaining_budget: Some(remaining), ..Quota::default() } }
}

/// The period part of a bucket's key (`month 2026-12`).
fn period_of(key: &str) -> String {
    let mut parts = key.split(':').skip(2);
    match (parts.next(), parts.next()) {
        (Some(period), Some(date)) => format!("the {period} {date} (UTC)"),
        _ => String::new(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|since| since.as_millis() as u64).unwrap_or(0)
}

/// A health component's view of the budgets: how they are enforced right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    /// Shared through Redis, with nothing waiting for it.
    pub exact: bool,
    pub detail: String,
}

impl Budgets {
    /// How the budgets are enforced, for the gateway's MeshHealth.
    pub fn standing(&self) -> Standing {
        let pending = self.pending_count();
        let unshared = self.unshared_spend();
        match self.shared() {
            Some(true) if pending == 0 && unshared == 0 => {
                Standing { exact: true, detail: "budgets shared through Redis".into() }
            }
            Some(true) => Standing {
                exact: false,
                detail: format!(
                    "catching up with Redis: {pending} settlements and ${} of spend decided alone still to add",
                    budget::format_usd(unshared)
                ),
            },
            Some(false) => Standing {
                exact: false,
                detail: format!(
                    "Redis unavailable: each replica enforces 1/{} of what was left ({} decisions alone, {pending} settlements waiting)",
                    self.replicas,
                    self.local_decisions()
                ),
            },
            None => Standing {
                exact: false,
                detail: format!("no Redis: each replica enforces 1/{} of each budget", self.replicas),
            },
        }
    }
}

#[cfg(test)]
mod tests;

//! Per-key rate limits: requests per minute (checked by [`RateLimitLayer`] on every call) and
//! tokens per minute (reserved by the handler once it knows the request, settled once it knows
//! the usage).
//!
//! Each limit is a GCRA ([`gcra`]) with a burst of one minute's worth: a key limited to 60
//! requests a minute may send 60 at once, then one a second. With `redis_url` the state lives in
//! Redis and the limit holds across every gateway replica; without it, or while Redis fails or is
//! slower than `redis_timeout_ms`, each replica decides with its own in-process state (so N
//! replicas allow up to N times the limit) and [`RateLimiter::local_fallbacks`] counts it.
//! A limit of 0 is unlimited and costs nothing, not even a Redis call. A busy key's requests and
//! tokens are taken from Redis in slices ([`lease`]): one Redis call admits a slice of calls on
//! this replica, and token settlements go back into the slice, so a busy key costs Redis about
//! one call per slice instead of up to three per call.
//!
//! The arithmetic, its Redis script and the key names are `llmesh-ratelimit`'s, shared with
//! generation's workers, which settle the token reservations of jobs on the same Redis keys.
//!
//! A token reservation is settled where it was taken ([`Taken`]): one Redis took is settled in
//! Redis, one the local limiter took (no Redis, or Redis failing at the time) in this replica's
//! memory. When that place cannot be reached, the settlement goes the way of the limit: a refund
//! is dropped, an excess is charged locally.

mod held;
mod layer;
mod lease;
mod local;
mod redis;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

pub use held::Held;
pub use layer::RateLimitLayer;
pub use llmesh_ratelimit::{Cost, Decision, Limit, decision_from_reply, gcra};
use llmesh_ratelimit::{Kind, key as redis_key};

use self::{lease::Leases, local::LocalLimiter, redis::RedisLimiter};
use serde::{Deserialize, Serialize};

use crate::{
    error::{CallError, Retry},
    principal::Principal,
};

/// `[gateway.rate_limit]`: per key, across every gateway replica sharing `redis_url`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Shared limiter state; unset means each replica limits on its own.
    pub redis_url: Option<String>,
    /// Per key, unless the key says otherwise; 0 means unlimited.
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    /// Longest wait for Redis before the local limiter decides instead.
    pub redis_timeout_ms: u64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self { redis_url: None, requests_per_minute: 0, tokens_per_minute: 0, redis_timeout_ms: 20 }
    }
}

pub use crate::headers::Quota;

/// Where a reservation was taken, and so where it is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// In Redis: any process reaching that Redis can settle it (a job's worker does).
    Shared,
    /// In this replica's memory (no Redis configured, or Redis failing at the time): only this
    /// replica can settle it.
    Local,
}

/// Tokens taken from a key's budget before the call, to be settled with the real usage.
/// Dropping it without [`RateLimiter::settle`] keeps the whole reservation charged; a call holds
/// it as a [`Held`], which settles on drop; a job stores it ([`Held::detach`]) and its worker, or
/// whoever cancels it, settles it.
#[derive(Debug)]
#[must_use = "settle the reservation once the usage is known"]
pub struct Reservation {
    id: Arc<str>,
    /// `None`: the key's tokens are unlimited and there is nothing to settle.
    limit: Option<Limit>,
    tokens: u32,
    remaining: Option<u64>,
    taken: Taken,
}

impl Reservation {
    pub fn tokens(&self) -> u32 {
        self.tokens
    }

    /// The key's token limit it was taken under; `None` when unlimited (nothing to settle).
    pub fn limit(&self) -> Option<Limit> {
        self.limit
    }

    pub fn taken(&self) -> Taken {
        self.taken
    }

    /// Tokens the key had left once this reservation was taken.
    pub fn quota(&self) -> Quota {
        Quota { remaining_tokens: self.remaining, ..Quota::default() }
    }
}

pub struct RateLimiter {
    requests_per_minute: u32,
    tokens_per_minute: u32,
    local: LocalLimiter,
    redis: Option<Arc<RedisLimiter>>,
    /// Slices of busy keys' requests, and of their tokens, taken from Redis ([`lease`]).
    leases: Leases,
    token_leases: Leases,
    fallbacks: AtomicU64,
    /// This replica's name for the reservations its local limiter took (unique per process).
    replica: Arc<str>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("requests_per_minute", &self.requests_per_minute)
            .field("tokens_per_minute", &self.tokens_per_minute)
            .field("redis", &self.redis.is_some())
            .field("local_fallbacks", &self.local_fallbacks())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter for `[gateway.rate_limit]`. With `redis_url` it must run inside a Tokio runtime;
    /// it connects in the background and never fails because Redis is down (it logs, and the
    /// local limiter decides until Redis answers). Fails only on a malformed URL.
    pub fn new(config: &RateLimitConfig) -> anyhow::Result<Self> {
        let redis = match &config.redis_url {
            Some(url) if !url.trim().is_empty() => {
                let runtime = tokio::runtime::Handle::try_current()
                    .map_err(|_| anyhow::anyhow!("the Redis rate limiter must be created inside a Tokio runtime"))?;
                let redis = Arc::new(RedisLimiter::new(url, Duration::from_millis(config.redis_timeout_ms.max(1)))?);
                let warming = redis.clone();
                runtime.spawn(async move { warming.warm_up().await });
                Some(redis)
            }
            _ => None,
        };
        Ok(Self {
            requests_per_minute: config.requests_per_minute,
            tokens_per_minute: config.tokens_per_minute,
            local: LocalLimiter::new(local::DEFAULT_CAPACITY),
            redis,
            leases: Leases::default(),
            token_leases: Leases::default(),
            fallbacks: AtomicU64::new(0),
            replica: format!("gateway-{}", uuid::Uuid::now_v7().simple()).into(),
        })
    }

    /// This process's name for the reservations its local limiter takes: a job records it, so
    /// that only this replica settles them.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// A reservation stored away from its call (with a job), made whole again to be settled
    /// here: `tokens` taken from `id`'s budget of `per_minute` (0: unlimited, nothing to settle).
    pub fn restore(&self, id: &str, tokens: u32, per_minute: u32, taken: Taken) -> Reservation {
        Reservation { id: id.into(), limit: Limit::per_minute(per_minute), tokens, remaining: None, taken }
    }

    /// The principal's request limit; `None` when unlimited.
    pub fn request_limit(&self, principal: &Principal) -> Option<Limit> {
        Limit::per_minute(principal.requests_per_minute.unwrap_or(self.requests_per_minute))
    }

    /// The principal's token limit; `None` when unlimited.
    pub fn token_limit(&self, principal: &Principal) -> Option<Limit> {
        Limit::per_minute(principal.tokens_per_minute.unwrap_or(self.tokens_per_minute))
    }

    /// Counts one request against the principal's requests per minute.
    pub async fn check_request(&self, principal: &Principal) -> Result<Quota, CallError> {
        self.decide_request(principal).await.0
    }

    /// [`check_request`](Self::check_request), and which limiter decided (`None`: the principal
    /// has no request limit, nothing was decided).
    pub async fn decide_request(&self, principal: &Principal) -> (Result<Quota, CallError>, Option<Taken>) {
        let Some(limit) = self.request_limit(principal) else {
            return (Ok(Quota::default()), None);
        };
        if let Some(remaining) = self.leases.admit(&principal.id, 1) {
            return (Ok(Quota { remaining_requests: Some(remaining), ..Quota::default() }), Some(Taken::Shared));
        }
        let (decision, taken) = match self.lease_in_redis(Kind::Requests, &principal.id, limit, 1).await {
            Some(leased) => leased,
            None => self.decide(&principal.id, Kind::Requests, limit, Cost::Take(1)).await,
        };
        let decided = if decision.allowed {
            Ok(Quota { remaining_requests: Some(decision.remaining), ..Quota::default() })
        } else {
            Err(exhausted(Kind::Requests, limit, &principal.id, decision))
        };
        (decided, Some(taken))
    }

    /// The leases of `kind`, and the largest slice of `limit` for it.
    fn leases_of(&self, kind: Kind, limit: Limit) -> (&Leases, u32) {
        match kind {
            Kind::Requests => (&self.leases, lease::max_slice(limit)),
            Kind::Tokens => (&self.token_leases, lease::max_token_slice(limit)),
        }
    }

    /// The call's `units` taken with a slice of `id`'s `kind` from Redis ([`lease`]): the decision
    /// and where it was taken. `None` when `id` is not leased (no Redis, a limit too small for
    /// slices): the call asks for itself alone, the usual way. A whole slice Redis refuses (the
    /// key is near its limit) becomes a request for the call's units alone.
    async fn lease_in_redis(&self, kind: Kind, id: &Arc<str>, limit: Limit, units: u32) -> Option<(Decision, Taken)> {
        self.redis.as_ref()?;
        let (leases, max) = self.leases_of(kind, limit);
        let plan = leases.plan(id, units, max)?;
        if plan.refund > 0
            && let Some(redis) = self.redis.clone().filter(|redis| redis.should_try())
        {
            // What an expired slice did not use goes back, beside the take.
            let (key, refund) = (redis_key(kind, id), Cost::Refund(plan.refund));
            tokio::spawn(async move { redis.decide(&key, limit, refund).await });
        }
        let mut want = plan.want;
        let mut answer = self.decide_in_redis(id, kind, limit, Cost::Take(want)).await;
        if want > units && answer.is_some_and(|decision| !decision.allowed) {
            leases.refused(id);
            want = units;
            answer = self.decide_in_redis(id, kind, limit, Cost::Take(units)).await;
        }
        let Some(decision) = answer else {
            // Redis did not answer: this replica decides alone, as for any call.
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            return Some((self.local.decide(id, kind, limit, Cost::Take(units)), Taken::Local));
        };
        if !decision.allowed {
            leases.refused(id);
            return Some((decision, Taken::Shared));
        }
        let remaining = leases.granted(id, want, units, decision.remaining);
        Some((Decision { remaining, ..decision }, Taken::Shared))
    }

    /// Takes `tokens` (the most the call can use: prompt plus `max_tokens`) from the principal's
    /// tokens per minute, all or nothing.
    pub async fn reserve_tokens(&self, principal: &Principal, tokens: u32) -> Result<Reservation, CallError> {
        let Some(limit) = self.token_limit(principal) else {
            return Ok(Reservation {
                id: principal.id.clone(),
                limit: None,
                tokens,
                remaining: None,
                taken: Taken::Local,
            });
        };
        if tokens > limit.burst {
            return Err(never_fits(tokens, limit, &principal.id));
        }
        if self.redis.is_some()
            && let Some(remaining) = self.token_leases.admit(&principal.id, tokens)
        {
            let id = principal.id.clone();
            return Ok(Reservation {
                id,
                limit: Some(limit),
                tokens,
                remaining: Some(remaining),
                taken: Taken::Shared,
            });
        }
        let (decision, taken) = match self.lease_in_redis(Kind::Tokens, &principal.id, limit, tokens).await {
            Some(leased) => leased,
            None => self.decide(&principal.id, Kind::Tokens, limit, Cost::Take(tokens)).await,
        };
        if decision.allowed {
            Ok(Reservation {
                id: principal.id.clone(),
                limit: Some(limit),
                tokens,
                remaining: Some(decision.remaining),
                taken,
            })
        } else {
            Err(exhausted(Kind::Tokens, limit, &principal.id, decision))
        }
    }

    /// [`reserve_tokens`](Self::reserve_tokens), held by the call until it settles or is dropped.
    pub async fn hold_tokens(self: &Arc<Self>, principal: &Principal, tokens: u32) -> Result<Held, CallError> {
        let reservation = self.reserve_tokens(principal, tokens).await?;
        Ok(Held::new(self.clone(), reservation))
    }

    /// Settles a reservation with the tokens really used: gives back the difference, or charges
    /// the excess (even past the limit: the tokens are spent; later calls wait), where the
    /// reservation was taken. Returns what the key has left (what it had once the reservation
    /// was taken, when the settlement could not be made).
    pub async fn settle(&self, reservation: Reservation, used_tokens: u32) -> Quota {
        let Some(limit) = reservation.limit else {
            return Quota::default();
        };
        let Some(cost) = llmesh_ratelimit::settlement(reservation.tokens, used_tokens) else {
            return reservation.quota();
        };
        if let Some(remaining) = self.settle_in_lease(&reservation, cost) {
            return Quota { remaining_tokens: Some(remaining), ..Quota::default() };
        }
        let decision = match reservation.taken {
            Taken::Local => Some(self.local.decide(&reservation.id, Kind::Tokens, limit, cost)),
            Taken::Shared => match self.decide_in_redis(&reservation.id, Kind::Tokens, limit, cost).await {
                Some(decision) => Some(decision),
                // Redis cannot take it now: the way of the limit. An excess is charged here (this
                // replica's own calls wait for it); a refund is dropped (it stays charged in Redis,
                // until the key's bucket fills again within the minute).
                None if matches!(cost, Cost::Force(_)) => {
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                    Some(self.local.decide(&reservation.id, Kind::Tokens, limit, cost))
                }
                None => {
                    tracing::debug!(key = %reservation.id, "Redis unavailable: a token refund is dropped");
                    None
                }
            },
        };
        match decision {
            Some(decision) => Quota { remaining_tokens: Some(decision.remaining), ..Quota::default() },
            None => reservation.quota(),
        }
    }

    /// Settles a reservation Redis took through the key's token slice, when it is valid: the
    /// unused tokens go back into it, an excess comes out of it when it holds enough. Returns what
    /// the key has left by this replica's reckoning; `None`: Redis must settle it.
    fn settle_in_lease(&self, reservation: &Reservation, cost: Cost) -> Option<u64> {
        if reservation.taken != Taken::Shared {
            return None;
        }
        match cost {
            Cost::Refund(tokens) => self.token_leases.give_back(&reservation.id, tokens),
            Cost::Force(tokens) => self.token_leases.admit(&reservation.id, tokens),
            Cost::Take(_) => None,
        }
    }

    /// [`settle`](Self::settle) in the background, so that the answer does not wait for another
    /// Redis round trip. Returns what the key has left by this reservation's reckoning: what was
    /// left once it was taken, plus the refund (at most a full bucket) or minus the excess. Calls
    /// on other replicas in between are not in that figure, as they are not in the reservation's.
    fn settle_in_background(self: &Arc<Self>, reservation: Reservation, used_tokens: u32) -> Quota {
        let remaining = reservation.remaining.zip(reservation.limit).map(|(remaining, limit)| {
            if used_tokens <= reservation.tokens {
                (remaining + u64::from(reservation.tokens - used_tokens)).min(u64::from(limit.burst))
            } else {
                remaining.saturating_sub(u64::from(used_tokens - reservation.tokens))
            }
        });
        let cost = llmesh_ratelimit::settlement(reservation.tokens, used_tokens);
        if let (Some(_), Some(cost)) = (reservation.limit, cost)
            && self.settle_in_lease(&reservation, cost).is_none()
        {
            let limiter = self.clone();
            tokio::spawn(async move { limiter.settle(reservation, used_tokens).await });
        }
        Quota { remaining_tokens: remaining, ..Quota::default() }
    }

    /// Calls the local limiter answered because Redis failed, was too slow, or was being given a
    /// rest after failing. Zero when no Redis is configured.
    pub fn local_fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Whether Redis answered the last time it was asked (false when none is configured).
    pub fn redis_healthy(&self) -> bool {
        self.redis.as_ref().is_some_and(|redis| redis.healthy())
    }

    /// Decides in Redis when it is configured and answers, else in this replica's memory; says
    /// which took the decision.
    async fn decide(&self, id: &Arc<str>, kind: Kind, limit: Limit, cost: Cost) -> (Decision, Taken) {
        if self.redis.is_some() {
            if let Some(decision) = self.decide_in_redis(id, kind, limit, cost).await {
                return (decision, Taken::Shared);
            }
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        (self.local.decide(id, kind, limit, cost), Taken::Local)
    }

    /// Redis' decision; `None` when none is configured, it failed, or it is being given a rest.
    async fn decide_in_redis(&self, id: &str, kind: Kind, limit: Limit, cost: Cost) -> Option<Decision> {
        let redis = self.redis.as_ref()?;
        if !redis.should_try() {
            return None;
        }
        redis.decide(&redis_key(kind, id), limit, cost).await.ok()
    }
}

fn exhausted(kind: Kind, limit: Limit, id: &str, decision: Decision) -> CallError {
    let wait_ms = u64::try_from(decision.retry_after.as_micros().div_ceil(1000)).unwrap_or(u64::MAX).max(1);
    let wait = Duration::from_millis(wait_ms);
    let quota = match kind {
        Kind::Requests => Quota { remaining_requests: Some(decision.remaining), ..Quota::default() },
        Kind::Tokens => Quota { remaining_tokens: Some(decision.remaining), ..Quota::default() },
    };
    tracing::debug!(key = id, limit = kind.unit(), wait_ms, "rate limited");
    CallError::RateLimited {
        message: format!("rate limit: {} {} per minute for key {id}", limit.burst, kind.unit()),
        retry: Retry::After(wait),
        quota,
    }
}

/// A reservation larger than the whole limit: waiting will not help, so clients are told not to
/// retry.
fn never_fits(tokens: u32, limit: Limit, id: &str) -> CallError {
    CallError::RateLimited {
        message: format!("rate limit: {} tokens per minute for key {id}; this call needs up to {tokens}", limit.burst),
        retry: Retry::Never,
        quota: Quota::default(),
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;
    use tonic::{Code, Status, metadata::MetadataMap};

    use super::*;
    use crate::headers::{REMAINING_REQUESTS, REMAINING_TOKENS, RETRY_AFTER_MS, RETRY_PUSHBACK_MS};

    fn principal(id: &str, requests: Option<u32>, tokens: Option<u32>) -> Principal {
        Principal { id: id.into(), requests_per_minute: requests, tokens_per_minute: tokens, ..Principal::anonymous() }
    }

    fn limiter(requests: u32, tokens: u32) -> RateLimiter {
        RateLimiter::new(&RateLimitConfig {
            requests_per_minute: requests,
            tokens_per_minute: tokens,
            ..RateLimitConfig::default()
        })
        .unwrap()
    }

    fn metadata(status: &Status, key: &str) -> Option<String> {
        status.metadata().get(key).map(|v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn requests_over_the_limit_are_resource_exhausted_with_a_wait() {
        let limiter = limiter(2, 0);
        let alice = principal("alice", None, None);
        assert_eq!(limiter.check_request(&alice).await.unwrap().remaining_requests, Some(1));
        assert_eq!(limiter.check_request(&alice).await.unwrap().remaining_requests, Some(0));
        let status = limiter.check_request(&alice).await.unwrap_err().into_status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "rate limit: 2 requests per minute for key alice");
        assert_eq!(metadata(&status, RETRY_AFTER_MS).as_deref(), Some("30000"));
        assert_eq!(metadata(&status, RETRY_PUSHBACK_MS).as_deref(), Some("30000"));
        assert_eq!(metadata(&status, REMAINING_REQUESTS).as_deref(), Some("0"));

        tokio::time::advance(Duration::from_secs(10)).await;
        let status = limiter.check_request(&alice).await.unwrap_err().into_status();
        assert_eq!(metadata(&status, RETRY_AFTER_MS).as_deref(), Some("20000"));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(limiter.check_request(&alice).await.is_ok());
        assert_eq!(limiter.local_fallbacks(), 0);
        assert!(!limiter.redis_healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_is_unlimited_and_keys_override_the_default() {
        let limiter = limiter(0, 0);
        let anonymous = Principal::anonymous();
        for _ in 0..1000 {
            assert_eq!(limiter.check_request(&anonymous).await.unwrap(), Quota::default());
        }
        let strict = principal("strict", Some(1), None);
        assert!(limiter.check_request(&strict).await.is_ok());
        assert!(limiter.check_request(&strict).await.is_err());

        let limiter = self::limiter(1, 0);
        let exempt = principal("exempt", Some(0), None);
        for _ in 0..100 {
            assert!(limiter.check_request(&exempt).await.is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn token_reservations_are_settled_with_the_real_usage() {
        let limiter = limiter(0, 1_000);
        let bob = principal("bob", None, None);
        let reservation = limiter.reserve_tokens(&bob, 600).await.unwrap();
        assert_eq!(reservation.quota().remaining_tokens, Some(400));
        let status = limiter.reserve_tokens(&bob, 500).await.unwrap_err().into_status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "rate limit: 1000 tokens per minute for key bob");
        assert_eq!(metadata(&status, RETRY_AFTER_MS).as_deref(), Some("6000"));

        // Only 100 used: 500 come back.
        assert_eq!(limiter.settle(reservation, 100).await.remaining_tokens, Some(900));
        let reservation = limiter.reserve_tokens(&bob, 500).await.unwrap();
        assert_eq!(reservation.quota().remaining_tokens, Some(400));
        // 1200 used: the 700 over are charged even past the limit (300 over it, 18 s at 60 ms a token).
        assert_eq!(limiter.settle(reservation, 1_200).await.remaining_tokens, Some(0));
        let status = limiter.reserve_tokens(&bob, 1).await.unwrap_err().into_status();
        assert_eq!(metadata(&status, RETRY_AFTER_MS).as_deref(), Some("18060"));
        // Exactly as reserved: nothing to do.
        tokio::time::advance(Duration::from_secs(120)).await;
        let reservation = limiter.reserve_tokens(&bob, 10).await.unwrap();
        assert_eq!(limiter.settle(reservation, 10).await.remaining_tokens, Some(990));
    }

    #[tokio::test(start_paused = true)]
    async fn settling_in_the_background_reports_and_charges_what_settling_would() {
        let shared = Arc::new(limiter(0, 1_000));
        let bob = principal("bob", None, None);
        // Refunds: the estimate is the settled figure, capped at a full bucket.
        let reservation = shared.reserve_tokens(&bob, 600).await.unwrap();
        assert_eq!(shared.settle_in_background(reservation, 100).remaining_tokens, Some(900));
        tokio::time::sleep(Duration::from_millis(1)).await;
        let reservation = shared.reserve_tokens(&bob, 500).await.unwrap();
        assert_eq!(reservation.quota().remaining_tokens, Some(400));
        // The excess is charged once the background settle has run: the next call must wait.
        assert_eq!(shared.settle_in_background(reservation, 1_200).remaining_tokens, Some(0));
        tokio::time::sleep(Duration::from_millis(1)).await;
        let status = shared.reserve_tokens(&bob, 1).await.unwrap_err().into_status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        // A failed call gives everything back.
        tokio::time::advance(Duration::from_secs(120)).await;
        let reservation = shared.reserve_tokens(&bob, 300).await.unwrap();
        assert_eq!(shared.settle_in_background(reservation, 0).remaining_tokens, Some(1_000));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(shared.reserve_tokens(&bob, 1_000).await.unwrap().quota().remaining_tokens, Some(0));
        // Unlimited keys have nothing to report.
        let unlimited = Arc::new(limiter(0, 0));
        let reservation = unlimited.reserve_tokens(&bob, 10).await.unwrap();
        assert_eq!(unlimited.settle_in_background(reservation, 5), Quota::default());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_larger_than_the_limit_is_refused_for_good() {
        let limiter = limiter(0, 1_000);
        let status = limiter.reserve_tokens(&principal("carol", None, None), 1_001).await.unwrap_err().into_status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("needs up to 1001"), "{}", status.message());
        assert_eq!(metadata(&status, RETRY_PUSHBACK_MS).as_deref(), Some("-1"));
        assert_eq!(metadata(&status, RETRY_AFTER_MS), None);
        // Unlimited tokens: reservations are free and settle to nothing.
        let limiter = self::limiter(0, 0);
        let reservation = limiter.reserve_tokens(&principal("carol", None, None), u32::MAX).await.unwrap();
        assert_eq!(limiter.settle(reservation, 5).await, Quota::default());
    }

    #[test]
    fn quotas_become_headers_and_metadata() {
        let quota = Quota { remaining_requests: Some(7), ..Quota::default() };
        let mut headers = HeaderMap::new();
        quota.write_headers(&mut headers);
        assert_eq!(headers[REMAINING_REQUESTS], "7");
        assert!(!headers.contains_key(REMAINING_TOKENS));

        let quota = Quota { remaining_tokens: Some(1234), remaining_budget: Some(2_500_000_000), ..Quota::default() };
        let mut metadata = MetadataMap::new();
        quota.write_metadata(&mut metadata);
        assert_eq!(metadata.get(REMAINING_TOKENS).unwrap(), "1234");
        assert_eq!(metadata.get("x-budget-remaining-usd").unwrap(), "2.500000");
        assert!(metadata.get(REMAINING_REQUESTS).is_none());
    }

    #[test]
    fn redis_keys_name_the_limit_and_the_key() {
        assert_eq!(redis_key(Kind::Requests, "team-a"), "llmesh:ratelimit:requests:team-a");
        assert_eq!(redis_key(Kind::Tokens, "team-a"), "llmesh:ratelimit:tokens:team-a");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restored_local_reservation_settles_in_this_replicas_memory() {
        let limiter = limiter(0, 1_000);
        let bob = principal("bob", None, None);
        let taken = limiter.reserve_tokens(&bob, 900).await.unwrap();
        assert_eq!(taken.taken(), Taken::Local, "no Redis configured");
        assert_eq!(taken.limit(), Limit::per_minute(1_000));
        // The call ends, the reservation lives on with a job (dropped here without settling).
        let (tokens, per_minute) = (taken.tokens(), taken.limit().unwrap().burst);
        drop(taken);
        assert!(limiter.reserve_tokens(&bob, 900).await.is_err(), "still charged");
        let restored = limiter.restore("bob", tokens, per_minute, Taken::Local);
        assert_eq!(limiter.settle(restored, 0).await.remaining_tokens, Some(1_000));
        assert!(limiter.reserve_tokens(&bob, 900).await.is_ok());
        // Unlimited: nothing to settle.
        let unlimited = limiter.restore("bob", 10, 0, Taken::Local);
        assert_eq!(limiter.settle(unlimited, 0).await, Quota::default());
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_reservation_is_never_refunded_into_local_memory() {
        // No Redis: a reservation Redis took (restored from a job) cannot be refunded here.
        let limiter = limiter(0, 1_000);
        let bob = principal("bob", None, None);
        let _local = limiter.reserve_tokens(&bob, 900).await.unwrap();
        let shared = limiter.restore("bob", 900, 1_000, Taken::Shared);
        assert_eq!(limiter.settle(shared, 0).await.remaining_tokens, None);
        assert!(limiter.reserve_tokens(&bob, 200).await.is_err(), "the refund was dropped");
        // An excess is charged here all the same: the way of the limit.
        tokio::time::advance(Duration::from_secs(60)).await;
        let shared = limiter.restore("bob", 100, 1_000, Taken::Shared);
        assert_eq!(limiter.settle(shared, 600).await.remaining_tokens, Some(500));
    }
}

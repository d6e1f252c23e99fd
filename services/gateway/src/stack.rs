//! The gateway's request path, declared once, outermost first. Each step is one layer or one call
//! in one file; this is the only place that orders them. `ARCHITECTURE.md` walks one request down
//! this list.
//!
//! **The server** (`llmesh_common::server::Base`, the same for every llmesh service):
//!
//! 1. trace (`llmesh_telemetry::GrpcTraceLayer`): continues the caller's `traceparent`, opens the
//!    call's span, records the seed's metrics (`llm_requests_total`, `llm_response_time`, ...).
//!    Outermost, so that every refusal below is counted and traced.
//! 2. [`admission`] (below): protocol-blind HTTP layers that refuse before any body is decoded.
//! 3. oversize (`llmesh_common::server`): tonic's "message too large" rewritten as the client's
//!    INVALID_ARGUMENT, innermost, next to the services.
//!
//! **Admission** ([`admission`], over HTTP requests, gRPC and the HTTP routes alike):
//!
//! 4. rejections ([`crate::http::RejectionLayer`], HTTP routes only): a refusal below, a
//!    [`CallError`](crate::error::CallError) in a gRPC trailers-only response, re-rendered in the
//!    route's dialect. Outside every refusing layer, so each refusal is seen.
//! 5. auth ([`crate::admission::AuthLayer`]): the key, or UNAUTHENTICATED; puts the
//!    [`Principal`](crate::principal::Principal) in the request extensions for every step below.
//! 6. rate limit ([`crate::admission::RateLimitLayer`]): one request against the key's requests
//!    per minute (GCRA in Redis, local when Redis is away). After auth: limits are per key.
//! 7. load shed ([`crate::admission::ShedLayer`]): the key's bound of calls in flight, then the
//!    gateway's; refuses at once, never queues. After the rate limit, so a key over its rate does
//!    not take a slot.
//! 8. call deadline ([`crate::admission::CallDeadlineLayer`]): ends a call whose answer has not
//!    begun in time. Inside shedding, so a call it ends gives its slots back.
//! 9. routes: the gRPC services, and beside them the HTTP routes ([`crate::http::Ingress`]), which
//!    translate their dialect into the same typed request.
//!
//! **The answer step** ([`answers`], called once per generation call by
//! [`crate::service::GatewayService::unary`] / `stream` with a typed [`Asked`](crate::answer::Asked)):
//!
//! 10. token admission ([`crate::answer::admit`], [`crate::admission::TokenAdmission::admit`]): the
//!     request is valid, the key may use the model, its tokens per minute and spend budgets cover
//!     the most the call can use; holds both reservations as
//!     [`Tokens`](crate::admission::Tokens), and the call goes on as a
//!     [`Reserved`](crate::answer::Reserved) [`Question`](crate::answer::Question).
//! 11. settlement ([`crate::answer::settle`]): the reservations settled exactly once with what the
//!     answer's [`Bill`](crate::admission::Bill) says; a live stream settles when it ends
//!     ([`crate::answer::relay`]). Outermost, so a cached or shared answer is billed too, and a
//!     failure below costs nothing.
//! 12. cache ([`crate::answer::lookup`]): the request's cache policy, the near cache and the cache
//!     service ([`crate::cache`]); a hit is the answer, ONLY_IF_CACHED misses are NOT_FOUND, and a
//!     fresh answer is stored on the way back. Outside single flight, which needs its cache key.
//! 13. single flight ([`crate::answer::single_flight`]): identical cacheable unary misses share
//!     the first one's call; a degraded answer is never shared.
//! 14. generate ([`crate::answer::generate`]): the question asked of the pipeline below, its reply
//!     made an answer.
//!
//! **The generation pipeline** ([`generation_over`], typed [`Call`]s):
//!
//! 15. fallback ([`crate::pipeline::fallback`]): when all else failed, a degraded answer
//!     (secondary model, stale cache, message). Outside the breaker, so an open breaker still
//!     degrades gracefully.
//! 16. retry ([`crate::pipeline::retry`]): another attempt for what another attempt may fix, within
//!     a budget, after a backoff or the upstream's pushback; never after a stream's first chunk.
//! 17. breaker ([`crate::pipeline::breaker`]): each attempt's outcome charged to the replica, or the
//!     model on it, that failed. Outside the timeout, so a timed-out attempt is charged too.
//! 18. per-try timeout ([`crate::pipeline::timeout`]).
//! 19. balance ([`crate::pipeline::balance`]): power of two choices over peak EWMA among the
//!     replicas whose breakers let the call through, and the gRPC call to generation itself.

use std::{sync::Arc, time::Duration};

use llmesh_common::{
    reload::Live,
    server::{HttpLayer, http_layer},
};
use tower::{ServiceBuilder, retry::RetryLayer, util::BoxCloneSyncService};

use crate::{
    admission::{AuthLayer, CallDeadlineLayer, KeyStore, RateLimitLayer, RateLimiter, ShedLayer, TokenAdmission},
    answer::{
        Answering, admit::AdmitLayer, generate::Generate, lookup::LookupLayer, settle::SettleLayer,
        single_flight::SingleFlightLayer,
    },
    cache::{Cache, CacheConfig},
    catalog::Catalog,
    http::{Ingress, RejectionLayer},
    pipeline::{
        Attempt, Generation, GenerationConfig, Reply, UpstreamError,
        balance::{Balance, Pool},
        breaker::BreakerLayer,
        fallback::{FallbackConfig, FallbackLayer},
        retry::RetryPolicy,
        timeout::PerTryTimeoutLayer,
    },
};

/// What the admission layers (steps 4 to 8) share with the rest of the gateway.
#[derive(Debug, Clone)]
pub struct AdmissionLayers {
    /// Re-read when the keys file changes.
    pub keys: Live<KeyStore>,
    pub limiter: Arc<RateLimiter>,
    pub shed: ShedLayer,
    pub deadline: CallDeadlineLayer,
}

/// Steps 4 to 9 around the gRPC services: with `routes`, the HTTP routes sit innermost (beside the
/// gRPC services, behind every layer) and the layers' refusals of plain HTTP requests are answered
/// in the HTTP dialects' terms.
pub fn admission(layers: &AdmissionLayers, routes: Option<Ingress>) -> HttpLayer {
    let AdmissionLayers { keys, limiter, shed, deadline } = layers.clone();
    http_layer(move |inner| {
        let inner = match &routes {
            Some(routes) => routes.around(inner),
            None => inner,
        };
        BoxCloneSyncService::new(
            ServiceBuilder::new()
                .option_layer(routes.as_ref().map(|_| RejectionLayer))
                .layer(AuthLayer::new(keys.clone()))
                .layer(RateLimitLayer::new(limiter.clone()))
                .layer(shed.clone())
                .layer(deadline)
                .service(inner),
        )
    })
}

/// Steps 10 to 14 over `generation` (steps 15 to 19): the answer step as one service.
pub fn answers(
    admission: TokenAdmission,
    generation: Generation,
    cache: Cache,
    catalog: Catalog,
    config: &CacheConfig,
) -> Answering {
    let single_flight_wait = Duration::from_millis(config.single_flight_wait_ms);
    let service = ServiceBuilder::new()
        .layer(AdmitLayer::new(admission))
        .layer(SettleLayer)
        .layer(LookupLayer::new(cache, catalog, config))
        .layer(SingleFlightLayer::new(single_flight_wait))
        .service(Generate::new(generation));
    BoxCloneSyncService::new(service)
}

/// Steps 15 to 19 over the replicas in `pool`.
pub fn generation(config: &GenerationConfig, fallback: FallbackConfig, cache: Cache, pool: Arc<Pool>) -> Generation {
    generation_over(config, fallback, cache, Balance::new(pool))
}

/// Steps 15 to 19 over `balance` (the balancer, or a mock of it in tests).
pub fn generation_over<B>(config: &GenerationConfig, fallback: FallbackConfig, cache: Cache, balance: B) -> Generation
where
    B: tower::Service<Attempt, Response = Reply, Error = UpstreamError> + Clone + Send + Sync + 'static,
    B::Future: Send,
{
    let per_try = (config.per_try_timeout_ms > 0).then(|| Duration::from_millis(config.per_try_timeout_ms));
    let service = ServiceBuilder::new()
        .layer(FallbackLayer::new(fallback, cache))
        .layer(RetryLayer::new(RetryPolicy::new(config.retry.clone())))
        .layer(BreakerLayer)
        .layer(PerTryTimeoutLayer::new(per_try))
        .service(balance);
    BoxCloneSyncService::new(service)
}

//! The request-rate check as a layer over tonic's HTTP requests, after auth.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, Either};
use http::{Request, Response};
use tower::{Layer, Service};

use super::RateLimiter;
use crate::{admission::is_exempt, principal::Principal};

/// Counts each call against its principal's requests per minute (the [`Principal`] the auth
/// layer put into the extensions; `anonymous` without one). Over the limit: RESOURCE_EXHAUSTED
/// with `retry-after-ms` and `grpc-retry-pushback-ms`. Allowed calls get
/// `x-ratelimit-remaining-requests` on their response headers. Keys without a request limit cost
/// nothing here. Health and reflection pass untouched.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Arc<RateLimiter>,
}

impl RateLimitLayer {
    pub fn new(limiter: Arc<RateLimiter>) -> Self {
        Self { limiter }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit { inner, limiter: self.limiter.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<RateLimiter>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<ResBody>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if is_exempt(request.uri().path()) {
            return Either::Left(self.inner.call(request));
        }
        // Most keys have no request limit: their calls pass without a copy of their principal.
        let limited = match request.extensions().get::<Principal>() {
            Some(principal) => self.limiter.request_limit(principal).is_some(),
            None => self.limiter.request_limit(&Principal::anonymous()).is_some(),
        };
        if !limited {
            return Either::Left(self.inner.call(request));
        }
        let principal = Principal::of(request.extensions());
        // The service polled ready goes into the future; a fresh clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limiter = self.limiter.clone();
        Either::Right(Box::pin(async move {
            let (decided, taken) = limiter.decide_request(&principal).await;
            record_decision(&limiter, &principal, &decided, taken);
            match decided {
                Ok(quota) => {
                    let mut response = inner.call(request).await?;
                    quota.write_headers(response.headers_mut());
                    Ok(response)
                }
                Err(refusal) => Ok(refusal.into_http()),
            }
        }))
    }
}

/// `llmesh_ratelimit_decisions_total` (`limiter`: which one decided; for a key without a request
/// limit, where it would have been decided) and the share of the request quota left.
fn record_decision(
    limiter: &RateLimiter,
    principal: &Principal,
    decided: &Result<super::Quota, crate::error::CallError>,
    taken: Option<super::Taken>,
) {
    use crate::metrics::{label, metrics};
    let shared = taken.map_or_else(|| limiter.redis_healthy(), |taken| taken == super::Taken::Shared);
    let limiter_kind = if shared { "redis" } else { "local" };
    let result = if decided.is_ok() { "allowed" } else { "rejected" };
    // The key's id is shared (`Arc<str>`): the label costs a reference count, not a copy.
    let key = principal.id.clone();
    metrics()
        .ratelimit_decisions
        .add(1, &[label("api_key", key.clone()), label("result", result), label("limiter", limiter_kind)]);
    if let (Ok(quota), Some(limit)) = (decided, limiter.request_limit(principal))
        && let Some(remaining) = quota.remaining_requests
    {
        let ratio = remaining as f64 / f64::from(limit.burst.max(1));
        metrics().ratelimit_remaining_ratio.record(ratio, &[label("api_key", key), label("kind", "requests")]);
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tonic::Code;
    use tower::{ServiceExt as _, service_fn};

    use super::*;
    use crate::{
        admission::RateLimitConfig,
        headers::{REMAINING_REQUESTS, RETRY_AFTER_MS, RETRY_PUSHBACK_MS},
    };

    async fn ok(_: Request<()>) -> Result<Response<String>, Infallible> {
        Ok(Response::new("ok".to_owned()))
    }

    fn request(path: &str, principal: Option<Principal>) -> Request<()> {
        let mut request = Request::builder().uri(format!("http://gateway{path}")).body(()).unwrap();
        if let Some(principal) = principal {
            request.extensions_mut().insert(principal);
        }
        request
    }

    fn layer(requests_per_minute: u32) -> RateLimitLayer {
        let config = RateLimitConfig { requests_per_minute, ..RateLimitConfig::default() };
        RateLimitLayer::new(Arc::new(RateLimiter::new(&config).unwrap()))
    }

    const GENERATE: &str = "/llmesh.gateway.v1.Gateway/Generate";

    #[tokio::test(start_paused = true)]
    async fn calls_over_the_limit_get_a_status_with_the_wait() {
        let service = layer(2).layer(service_fn(ok));
        let alice = Principal { id: "alice".into(), ..Principal::anonymous() };
        for remaining in ["1", "0"] {
            let response = service.clone().oneshot(request(GENERATE, Some(alice.clone()))).await.unwrap();
            assert_eq!(response.body(), "ok");
            assert_eq!(response.headers()[REMAINING_REQUESTS], remaining);
        }
        let response = service.clone().oneshot(request(GENERATE, Some(alice))).await.unwrap();
        assert_eq!(response.body(), "", "the inner service was not called");
        let headers = response.headers();
        assert_eq!(Code::from_bytes(headers["grpc-status"].as_bytes()), Code::ResourceExhausted);
        assert_eq!(headers["grpc-message"], "rate%20limit:%202%20requests%20per%20minute%20for%20key%20alice");
        assert_eq!(headers[RETRY_AFTER_MS], "30000");
        assert_eq!(headers[RETRY_PUSHBACK_MS], "30000");

        // Another key has its own budget; without a principal the caller is anonymous.
        let bob = Principal { id: "bob".into(), ..Principal::anonymous() };
        let response = service.clone().oneshot(request(GENERATE, Some(bob))).await.unwrap();
        assert_eq!(response.headers()[REMAINING_REQUESTS], "1");
        let response = service.clone().oneshot(request(GENERATE, None)).await.unwrap();
        assert_eq!(response.headers()[REMAINING_REQUESTS], "1");
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_keys_and_probes_pass_untouched() {
        let service = layer(1).layer(service_fn(ok));
        for _ in 0..5 {
            let response = service.clone().oneshot(request("/grpc.health.v1.Health/Check", None)).await.unwrap();
            assert_eq!(response.body(), "ok");
            assert!(!response.headers().contains_key(REMAINING_REQUESTS));
        }
        let unlimited = Principal { id: "unlimited".into(), requests_per_minute: Some(0), ..Principal::anonymous() };
        for _ in 0..5 {
            let response = service.clone().oneshot(request(GENERATE, Some(unlimited.clone()))).await.unwrap();
            assert_eq!(response.body(), "ok");
            assert!(!response.headers().contains_key(REMAINING_REQUESTS));
        }
    }
}

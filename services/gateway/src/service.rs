//! The `llmesh.gateway.v1.Gateway` gRPC service.

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use llmesh_common::{
    cache_key,
    validate::{self, Limits},
};
use llmesh_proto::{
    common::v1::{FinishReason, Usage},
    gateway::v1::{
        self as gw, CancelJobRequest, CancelJobResponse, GetJobRequest, GetJobResponse, ListModelsRequest,
        ListModelsResponse, SubmitJobRequest, SubmitJobResponse, WatchJobRequest, gateway_server::Gateway,
    },
    generation::v1 as generation,
};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    admission::{Held, Principal, RateLimiter},
    cache::{Cache, Use},
    catalog::Catalog,
    config::{Config, Price},
    deadline::Deadline,
    fallback::{self, FallbackConfig},
    jobs::{self, Jobs},
    metrics::{label, metrics},
    single_flight::{Flight, SingleFlight},
    upstream::{Started, Upstream},
};

#[derive(Debug, Clone)]
pub struct GatewayService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    upstream: Upstream,
    cache: Cache,
    catalog: Catalog,
    flights: SingleFlight,
    fallback: FallbackConfig,
    limits: Limits,
    request_timeout: Duration,
    cache_nondeterministic: bool,
    single_flight_wait: Duration,
    jobs: Jobs,
    limiter: Arc<RateLimiter>,
    prices: std::collections::BTreeMap<String, Price>,
}

/// What the cache said about a request.
enum Cached {
    Hit(Box<generation::GenerateResponse>, Vec<String>),
    Miss(Use),
}

type ChunkStream = futures::stream::BoxStream<'static, Result<gw::GenerateStreamResponse, Status>>;

impl GatewayService {
    pub fn new(config: &Config, upstream: Upstream, catalog: Catalog, jobs: Jobs, limiter: Arc<RateLimiter>) -> Self {
        Self {
            inner: Arc::new(Inner {
                cache: Cache::new(upstream.cache.clone(), &config.cache),
                upstream,
                catalog,
                flights: SingleFlight::default(),
                fallback: config.fallback.clone(),
                limits: config.limits.clone(),
                request_timeout: Duration::from_millis(config.request_timeout_ms),
                cache_nondeterministic: config.cache.cache_nondeterministic,
                single_flight_wait: Duration::from_millis(config.cache.single_flight_wait_ms),
                jobs,
                limiter,
                prices: config.prices.clone(),
            }),
        }
    }

    /// Validates the request and admits it for the caller: the key may use the model, and its
    /// token quota covers the prompt and `max_tokens` (settled with the real usage afterwards).
    async fn admit(
        &self,
        extensions: &http::Extensions,
        request: &generation::GenerateRequest,
    ) -> Result<(Principal, Held), Status> {
        validate::generate_request(request, &self.inner.limits)?;
        let principal = extensions.get::<Principal>().cloned().unwrap_or_else(Principal::anonymous);
        if !principal.allows(&request.model) {
            return Err(Status::permission_denied(format!(
                "model: API key {} may not use {:?}",
                principal.id, request.model
            )));
        }
        let prompt_tokens = validate::estimated_tokens(validate::prompt_bytes(request));
        let max_tokens = validate::effective_max_tokens(request, &self.inner.limits);
        let held = self.inner.limiter.hold_tokens(&principal, prompt_tokens.saturating_add(max_tokens)).await?;
        Ok((principal, held))
    }

    /// Settles a reservation with what was used, tells the client what is left, and counts the
    /// tokens and their cost for the key.
    fn settle<T>(&self, who: &Principal, model: &str, held: Held, usage: Option<Usage>, response: &mut Response<T>) {
        let quota = held.settle(usage.map_or(0, |u| u.total_tokens));
        quota.write_metadata(response.metadata_mut());
        self.account(who, model, usage, quota.remaining_tokens);
    }

    fn account(&self, who: &Principal, model: &str, usage: Option<Usage>, remaining_tokens: Option<u64>) {
        let metrics = metrics();
        if let Some(usage) = usage {
            let key = || label("api_key", who.id.to_string());
            let model_label = || label("model", model.to_string());
            metrics.tokens.add(u64::from(usage.prompt_tokens), &[key(), model_label(), label("type", "input")]);
            metrics.tokens.add(u64::from(usage.completion_tokens), &[key(), model_label(), label("type", "output")]);
            if let Some(price) = self.inner.prices.get(model) {
                let cost = (f64::from(usage.prompt_tokens) * price.input_per_million
                    + f64::from(usage.completion_tokens) * price.output_per_million)
                    / 1e6;
                metrics.cost_usd.add(cost, &[key(), model_label()]);
            }
        }
        if let (Some(remaining), Some(limit)) = (remaining_tokens, self.inner.limiter.token_limit(who)) {
            let ratio = remaining as f64 / f64::from(limit.burst.max(1));
            metrics
                .ratelimit_remaining_ratio
                .record(ratio, &[label("api_key", who.id.to_string()), label("kind", "tokens")]);
        }
    }

    /// True when the same request is expected to give the same answer, so caching it is safe.
    fn cacheable(&self, request: &generation::GenerateRequest) -> bool {
        self.inner.cache_nondeterministic
            || request.temperature == Some(0.0)
            || request.seed.is_some()
            || self.inner.catalog.deterministic(&request.model)
    }

    /// Consults the cache.
    async fn cached(&self, request: &generation::GenerateRequest, deadline: Deadline) -> Result<Cached, Status> {
        let policy = Use::of(request.cache, self.cacheable(request));
        if !policy.read && !policy.only_cached {
            metrics().cache_requests.add(1, &[label("result", "bypass")]);
        }
        if policy.read
            && let Some(hit) = self.inner.cache.lookup(request, deadline.remaining()).await
            && let Some(response) = hit.response
        {
            return Ok(Cached::Hit(Box::new(response), hit.chunks));
        }
        if policy.only_cached {
            return Err(Status::not_found("cache: no cached answer for this request (policy ONLY_IF_CACHED)"));
        }
        Ok(Cached::Miss(policy))
    }

    /// The answer to a unary call, from the cache, a call in flight for the same request, or
    /// generation; with the usage generation reported when this call is the one that paid for it.
    async fn respond(
        &self,
        request: generation::GenerateRequest,
        deadline: Deadline,
    ) -> Result<(generation::GenerateResponse, Option<Usage>, Duration), Status> {
        let policy = match self.cached(&request, deadline).await? {
            Cached::Hit(response, _) => return Ok((*response, None, Duration::ZERO)),
            Cached::Miss(policy) => policy,
        };
        // Identical cacheable misses in flight at once share one generation call.
        let leader = if policy.read {
            match self.inner.flights.join(cache_key::of(&request)) {
                Flight::Leader(leader) => Some(leader),
                Flight::Follower(follower) => {
                    let wait = self.inner.single_flight_wait.min(deadline.remaining());
                    let waited = std::time::Instant::now();
                    if let Some(response) = follower.wait(wait).await {
                        return Ok((response, None, waited.elapsed()));
                    }
                    None
                }
            }
        } else {
            None
        };
        let called = std::time::Instant::now();
        let response = self.answer(&request, deadline).await?;
        let upstream_time = called.elapsed();
        if let Some(leader) = leader {
            leader.finish(&response);
        }
        let used = response.usage.filter(|_| response.degraded.is_none());
        if policy.write {
            self.inner.cache.store(request, response.clone(), Vec::new());
        }
        Ok((response, used, upstream_time))
    }

    /// Generation's answer, or a fallback one when generation cannot give it.
    async fn answer(
        &self,
        request: &generation::GenerateRequest,
        deadline: Deadline,
    ) -> Result<generation::GenerateResponse, Status> {
        match self.inner.upstream.generate(request, deadline).await {
            Ok(response) => Ok(response),
            Err(status) => self.degrade(request, status, deadline).await,
        }
    }

    /// The fallback chain: a secondary model, a stale cache entry, the configured message. Past
    /// the client's own deadline nobody is listening, so the failure stands.
    async fn degrade(
        &self,
        request: &generation::GenerateRequest,
        status: Status,
        deadline: Deadline,
    ) -> Result<generation::GenerateResponse, Status> {
        let config = &self.inner.fallback;
        let Some(reason) = fallback::reason(&status).filter(|_| config.enabled) else { return Err(status) };
        if deadline.remaining().is_zero() && deadline.client_bound() {
            return Err(status);
        }
        let answer = self.fallback_answer(request, reason, status, deadline).await;
        let source = answer.degraded.as_ref().map_or("message", |d| d.source.as_str()).to_string();
        metrics().fallbacks.add(1, &[label("reason", reason), label("source", source)]);
        tracing::info!(reason, "answered with a fallback");
        Ok(answer)
    }

    async fn fallback_answer(
        &self,
        request: &generation::GenerateRequest,
        reason: &'static str,
        status: Status,
        deadline: Deadline,
    ) -> generation::GenerateResponse {
        let config = &self.inner.fallback;
        if let Some(secondary) = config.secondary_model.as_ref().filter(|m| **m != request.model)
            && !deadline.remaining().is_zero()
        {
            let second = generation::GenerateRequest { model: secondary.clone(), ..request.clone() };
            if let Ok(mut response) = self.inner.upstream.generate(&second, deadline).await {
                response.degraded = Some(fallback::degraded(reason, "secondary_model", &status));
                return response;
            }
        }
        if config.stale_cache
            && !deadline.remaining().is_zero()
            && let Some(hit) = self.inner.cache.lookup_stale(request, deadline.remaining()).await
            && let Some(mut response) = hit.response
        {
            response.degraded = Some(fallback::degraded(reason, "stale_cache", &status));
            return response;
        }
        tracing::warn!(reason, code = ?status.code(), message = status.message(), "answering with the fallback message");
        config.message(&request.model, reason, &status)
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn generate(&self, request: Request<gw::GenerateRequest>) -> Result<Response<gw::GenerateResponse>, Status> {
        // The gateway's own time counts from here: the token reservation and the cache are in it.
        let started = std::time::Instant::now();
        let deadline = Deadline::new(request.metadata(), self.inner.request_timeout);
        let (_, extensions, request) = request.into_parts();
        let request: generation::GenerateRequest = request.into();
        let (who, held) = self.admit(&extensions, &request).await?;
        let model = request.model.clone();
        match self.respond(request, deadline).await {
            Ok((response, used, upstream_time)) => {
                metrics().overhead.record(
                    started.elapsed().saturating_sub(upstream_time).as_secs_f64(),
                    &[label("endpoint", "Generate")],
                );
                let mut response = Response::new(gw::GenerateResponse::from(response));
                self.settle(&who, &model, held, used, &mut response);
                Ok(response)
            }
            Err(status) => {
                // A failed call costs the caller nothing.
                held.settle(0);
                Err(status)
            }
        }
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        request: Request<gw::GenerateStreamRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let deadline = Deadline::new(request.metadata(), self.inner.request_timeout);
        let (_, extensions, request) = request.into_parts();
        let request: generation::GenerateRequest = request.into();
        let (who, held) = self.admit(&extensions, &request).await?;
        let policy = match self.cached(&request, deadline).await {
            Ok(Cached::Hit(response, chunks)) => {
                let mut reply = Response::new(replay(*response, chunks));
                self.settle(&who, &request.model, held, None, &mut reply);
                return Ok(reply);
            }
            Ok(Cached::Miss(policy)) => policy,
            Err(status) => {
                held.settle(0);
                return Err(status);
            }
        };
        let started = match self.inner.upstream.generate_stream(&request, deadline).await {
            Ok(started) => started,
            // Nothing was streamed yet: a fallback answer can still be the whole stream.
            Err(status) => {
                let degraded = self.degrade(&request, status, deadline).await;
                held.settle(0);
                let response = degraded?;
                let chunks = if response.cached { Vec::new() } else { vec![response.text.clone()] };
                return Ok(Response::new(replay(response, chunks)));
            }
        };
        let cache = policy.write.then(|| self.inner.cache.clone());
        // Headers go out before the tokens are known: they carry what is left after the reservation.
        let quota = held.quota();
        let settle = Settle { service: self.clone(), who, model: request.model.clone(), held };
        let mut reply = Response::new(relay(started, request, cache, deadline, settle));
        quota.write_metadata(reply.metadata_mut());
        Ok(reply)
    }

    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        self.inner
            .jobs
            .submit(request, &self.inner.limiter, async |extensions, generate| self.admit(extensions, generate).await)
            .await
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<GetJobResponse>, Status> {
        self.inner.jobs.get(request).await
    }

    type WatchJobStream = jobs::WatchStream;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        self.inner.jobs.watch(request).await
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        self.inner.jobs.cancel(request, &self.inner.limiter).await
    }

    async fn list_models(&self, request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let deadline = Deadline::new(request.metadata(), self.inner.request_timeout);
        let models = deadline.run("generation", self.inner.upstream.list_models(deadline)).await?;
        Ok(Response::new(ListModelsResponse { models: models.models.into_iter().map(Into::into).collect() }))
    }
}

/// A whole answer sent as a stream: a cached one as the chunks it was first streamed in (or as
/// one chunk when it was cached from a unary call), a fallback one as one chunk; then the final
/// chunk with the finish reason and usage.
fn replay(response: generation::GenerateResponse, chunks: Vec<String>) -> ChunkStream {
    let chunks = if chunks.is_empty() { vec![response.text.clone()] } else { chunks };
    let header = move |delta: String| gw::GenerateStreamResponse {
        id: response.id.clone(),
        model: response.model.clone(),
        provider: response.provider.clone(),
        cached: response.cached,
        degraded: response.degraded.clone(),
        delta,
        ..Default::default()
    };
    let mut last = header(String::new());
    last.finish_reason = response.finish_reason;
    last.usage = response.usage;
    let deltas: Vec<_> = chunks.into_iter().map(|delta| Ok(header(delta))).collect();
    futures::stream::iter(deltas).chain(futures::stream::once(async move { Ok(last) })).boxed()
}

/// A stream's token reservation, settled with the usage its final chunk reports; if the stream
/// ends before that (the client went away), with the text it received.
struct Settle {
    service: GatewayService,
    who: Principal,
    model: String,
    held: Held,
}

/// Passes generation's chunks on as they arrive, until the call's deadline. When the stream
/// finishes normally, the whole answer is stored in the cache (chunk boundaries included, for
/// replay) and the token reservation is settled.
fn relay(
    started: Started,
    request: generation::GenerateRequest,
    cache: Option<Cache>,
    deadline: Deadline,
    settle: Settle,
) -> ChunkStream {
    struct Relay {
        settle: Option<Settle>,
        first: Option<generation::GenerateStreamResponse>,
        rest: Streaming<generation::GenerateStreamResponse>,
        request: Option<generation::GenerateRequest>,
        cache: Option<Cache>,
        chunks: Vec<String>,
        done: bool,
    }

    impl Relay {
        fn pass(&mut self, chunk: generation::GenerateStreamResponse) -> gw::GenerateStreamResponse {
            if let Some(settle) = self.settle.as_mut() {
                settle.held.received(validate::estimated_tokens(chunk.delta.len()));
            }
            if self.cache.is_some() && !chunk.delta.is_empty() {
                self.chunks.push(chunk.delta.clone());
            }
            if chunk.finish_reason != i32::from(FinishReason::Unspecified) {
                self.done = true;
                if let (Some(cache), Some(request)) = (self.cache.take(), self.request.take()) {
                    let response = generation::GenerateResponse {
                        id: chunk.id.clone(),
                        model: chunk.model.clone(),
                        text: self.chunks.concat(),
                        finish_reason: chunk.finish_reason,
                        usage: chunk.usage,
                        cached: false,
                        degraded: chunk.degraded.clone(),
                        provider: chunk.provider.clone(),
                    };
                    cache.store(request, response, std::mem::take(&mut self.chunks));
                }
            }
            chunk.into()
        }
    }

    let state = Relay {
        settle: Some(settle),
        first: Some(started.first),
        rest: started.rest,
        request: Some(request),
        cache,
        chunks: Vec::new(),
        done: false,
    };
    futures::stream::unfold(state, move |mut state| async move {
        if state.done {
            return None;
        }
        let next = match state.first.take() {
            Some(first) => Ok(Some(first)),
            None => deadline.run("generation's next chunk", state.rest.message()).await,
        };
        let item = match next {
            Ok(Some(chunk)) => {
                let chunk = state.pass(chunk);
                if state.done
                    && let Some(Settle { service, who, model, held }) = state.settle.take()
                {
                    let usage = chunk.usage.filter(|_| chunk.degraded.is_none());
                    let quota = held.settle(usage.map_or(0, |u| u.total_tokens));
                    service.account(&who, &model, usage, quota.remaining_tokens);
                }
                Ok(chunk)
            }
            Ok(None) => {
                state.done = true;
                Err(Status::unavailable("generation ended the stream without a final chunk"))
            }
            Err(status) => {
                state.done = true;
                Err(status)
            }
        };
        Some((item, state))
    })
    .boxed()
}

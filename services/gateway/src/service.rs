//! The `llmesh.gateway.v1.Gateway` gRPC service.

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use llmesh_common::{
    cache_key,
    validate::{self, Limits},
};
use llmesh_proto::{
    common::v1::FinishReason,
    gateway::v1::{
        self as gw, CancelJobRequest, CancelJobResponse, GetJobRequest, GetJobResponse, ListModelsRequest,
        ListModelsResponse, SubmitJobRequest, SubmitJobResponse, WatchJobRequest, WatchJobResponse,
        gateway_server::Gateway,
    },
    generation::v1 as generation,
};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    cache::{Cache, Use},
    catalog::Catalog,
    config::Config,
    deadline::Deadline,
    fallback::{self, FallbackConfig},
    jobs::{self, Jobs},
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
}

/// What the cache said about a request.
enum Cached {
    Hit(Box<generation::GenerateResponse>, Vec<String>),
    Miss(Use),
}

type ChunkStream = futures::stream::BoxStream<'static, Result<gw::GenerateStreamResponse, Status>>;

impl GatewayService {
    pub fn new(config: &Config, upstream: Upstream, catalog: Catalog, jobs: Jobs) -> Self {
        Self {
            inner: Arc::new(Inner {
                cache: Cache::new(upstream.cache.clone(), Duration::from_millis(config.cache.budget_ms)),
                upstream,
                catalog,
                flights: SingleFlight::default(),
                fallback: config.fallback.clone(),
                limits: config.limits.clone(),
                request_timeout: Duration::from_millis(config.request_timeout_ms),
                cache_nondeterministic: config.cache.cache_nondeterministic,
                single_flight_wait: Duration::from_millis(config.cache.single_flight_wait_ms),
                jobs,
            }),
        }
    }

    /// True when the same request is expected to give the same answer, so caching it is safe.
    fn cacheable(&self, request: &generation::GenerateRequest) -> bool {
        self.inner.cache_nondeterministic
            || request.temperature == Some(0.0)
            || request.seed.is_some()
            || self.inner.catalog.deterministic(&request.model)
    }

    /// Validates the request and consults the cache.
    async fn cached(&self, request: &generation::GenerateRequest, deadline: Deadline) -> Result<Cached, Status> {
        validate::generate_request(request, &self.inner.limits)?;
        let policy = Use::of(request.cache, self.cacheable(request));
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
        if let Some(secondary) = config.secondary_model.as_ref().filter(|m| **m != request.model)
            && !deadline.remaining().is_zero()
        {
            let second = generation::GenerateRequest { model: secondary.clone(), ..request.clone() };
            if let Ok(mut response) = self.inner.upstream.generate(&second, deadline).await {
                response.degraded = Some(fallback::degraded(reason, "secondary_model", &status));
                return Ok(response);
            }
        }
        if config.stale_cache
            && !deadline.remaining().is_zero()
            && let Some(hit) = self.inner.cache.lookup_stale(request, deadline.remaining()).await
            && let Some(mut response) = hit.response
        {
            response.degraded = Some(fallback::degraded(reason, "stale_cache", &status));
            return Ok(response);
        }
        tracing::warn!(reason, code = ?status.code(), message = status.message(), "answering with the fallback message");
        Ok(config.message(&request.model, reason, &status))
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn generate(&self, request: Request<gw::GenerateRequest>) -> Result<Response<gw::GenerateResponse>, Status> {
        let deadline = Deadline::new(request.metadata(), self.inner.request_timeout);
        let request: generation::GenerateRequest = request.into_inner().into();
        let policy = match self.cached(&request, deadline).await? {
            Cached::Hit(response, _) => return Ok(Response::new((*response).into())),
            Cached::Miss(policy) => policy,
        };
        // Identical cacheable misses in flight at once share one generation call.
        let leader = if policy.read {
            match self.inner.flights.join(cache_key::of(&request)) {
                Flight::Leader(leader) => Some(leader),
                Flight::Follower(follower) => {
                    let wait = self.inner.single_flight_wait.min(deadline.remaining());
                    if let Some(response) = follower.wait(wait).await {
                        return Ok(Response::new(response.into()));
                    }
                    None
                }
            }
        } else {
            None
        };
        let response = self.answer(&request, deadline).await?;
        if let Some(leader) = leader {
            leader.finish(&response);
        }
        if policy.write {
            self.inner.cache.store(request, response.clone(), Vec::new());
        }
        Ok(Response::new(response.into()))
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        request: Request<gw::GenerateStreamRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let deadline = Deadline::new(request.metadata(), self.inner.request_timeout);
        let request: generation::GenerateRequest = request.into_inner().into();
        let policy = match self.cached(&request, deadline).await? {
            Cached::Hit(response, chunks) => return Ok(Response::new(replay(*response, chunks))),
            Cached::Miss(policy) => policy,
        };
        let started = match self.inner.upstream.generate_stream(&request, deadline).await {
            Ok(started) => started,
            // Nothing was streamed yet: a fallback answer can still be the whole stream.
            Err(status) => {
                let response = self.degrade(&request, status, deadline).await?;
                let chunks = if response.cached { Vec::new() } else { vec![response.text.clone()] };
                return Ok(Response::new(replay(response, chunks)));
            }
        };
        let cache = policy.write.then(|| self.inner.cache.clone());
        Ok(Response::new(relay(started, request, cache, deadline)))
    }

    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        let queue = self.inner.jobs.queue()?;
        let request = request.into_inner();
        let idempotency_key = request.idempotency_key.clone();
        let generate: generation::GenerateRequest = request.into();
        validate::generate_request(&generate, &self.inner.limits)?;
        let submitted = queue.submit(&generate, &idempotency_key).await.map_err(jobs::status)?;
        Ok(Response::new(SubmitJobResponse { job: Some(submitted.job), existing: submitted.existing }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<GetJobResponse>, Status> {
        let queue = self.inner.jobs.queue()?;
        let id = jobs::job_id(&request.get_ref().job_id)?;
        let job = jobs::found(queue.get(id).await.map_err(jobs::status)?, id)?;
        Ok(Response::new(GetJobResponse { job: Some(job) }))
    }

    type WatchJobStream = futures::stream::BoxStream<'static, Result<WatchJobResponse, Status>>;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let queue = self.inner.jobs.queue()?;
        let id = jobs::job_id(&request.get_ref().job_id)?;
        let changes =
            queue.watch(id).map(|change| change.map(|job| WatchJobResponse { job: Some(job) }).map_err(jobs::status));
        Ok(Response::new(changes.boxed()))
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        let queue = self.inner.jobs.queue()?;
        let id = jobs::job_id(&request.get_ref().job_id)?;
        let job = queue.cancel(id).await.map_err(jobs::status)?;
        Ok(Response::new(CancelJobResponse { job: Some(job) }))
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

/// Passes generation's chunks on as they arrive, until the call's deadline. When the stream
/// finishes normally, the whole answer is stored in the cache (chunk boundaries included, for
/// replay).
fn relay(
    started: Started,
    request: generation::GenerateRequest,
    cache: Option<Cache>,
    deadline: Deadline,
) -> ChunkStream {
    struct Relay {
        first: Option<generation::GenerateStreamResponse>,
        rest: Streaming<generation::GenerateStreamResponse>,
        request: Option<generation::GenerateRequest>,
        cache: Option<Cache>,
        chunks: Vec<String>,
        done: bool,
    }

    impl Relay {
        fn pass(&mut self, chunk: generation::GenerateStreamResponse) -> gw::GenerateStreamResponse {
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
            Ok(Some(chunk)) => Ok(state.pass(chunk)),
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

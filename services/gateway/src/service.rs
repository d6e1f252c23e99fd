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
    generation::v1::{self as generation, generation_client::GenerationClient},
};
use tonic::{Request, Response, Status, Streaming, transport::Channel};

use crate::{
    cache::{Cache, Use},
    catalog::Catalog,
    config::Config,
    deadline::Deadline,
    jobs::{self, Jobs},
    single_flight::{Flight, SingleFlight},
    upstream::Upstream,
};

#[derive(Debug, Clone)]
pub struct GatewayService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    generation: GenerationClient<Channel>,
    cache: Cache,
    catalog: Catalog,
    flights: SingleFlight,
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
                generation: upstream.generation,
                cache: Cache::new(upstream.cache, Duration::from_millis(config.cache.budget_ms)),
                catalog,
                flights: SingleFlight::default(),
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

    async fn call_generation(
        &self,
        request: &generation::GenerateRequest,
        deadline: Deadline,
    ) -> Result<generation::GenerateResponse, Status> {
        let mut client = self.inner.generation.clone();
        let call = client.generate(with_timeout(request.clone(), deadline)?);
        Ok(deadline.run("generation", call).await?.into_inner())
    }
}

fn with_timeout<T>(message: T, deadline: Deadline) -> Result<Request<T>, Status> {
    let remaining = deadline.remaining();
    if remaining.is_zero() {
        return Err(Status::deadline_exceeded("deadline exceeded before calling generation"));
    }
    let mut request = Request::new(message);
    request.set_timeout(remaining);
    Ok(request)
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
        let response = self.call_generation(&request, deadline).await?;
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
        let mut client = self.inner.generation.clone();
        let upstream_request = generation::GenerateStreamRequest::from(request.clone());
        let call = client.generate_stream(with_timeout(upstream_request, deadline)?);
        let upstream = deadline.run("generation", call).await?.into_inner();
        let cache = policy.write.then(|| self.inner.cache.clone());
        Ok(Response::new(relay(upstream, request, cache, deadline)))
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
        let mut client = self.inner.generation.clone();
        let call = client.list_models(with_timeout(generation::ListModelsRequest {}, deadline)?);
        let models = deadline.run("generation", call).await?.into_inner();
        Ok(Response::new(ListModelsResponse { models: models.models.into_iter().map(Into::into).collect() }))
    }
}

/// A cached answer, sent as the chunks it was first streamed in (or as one chunk when it was
/// cached from a unary call), then the final chunk.
fn replay(response: generation::GenerateResponse, chunks: Vec<String>) -> ChunkStream {
    let chunks = if chunks.is_empty() { vec![response.text.clone()] } else { chunks };
    let header = move |delta: String| gw::GenerateStreamResponse {
        id: response.id.clone(),
        model: response.model.clone(),
        provider: response.provider.clone(),
        cached: true,
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
    upstream: Streaming<generation::GenerateStreamResponse>,
    request: generation::GenerateRequest,
    cache: Option<Cache>,
    deadline: Deadline,
) -> ChunkStream {
    struct Relay {
        upstream: Streaming<generation::GenerateStreamResponse>,
        request: Option<generation::GenerateRequest>,
        cache: Option<Cache>,
        chunks: Vec<String>,
        done: bool,
    }
    let state = Relay { upstream, request: Some(request), cache, chunks: Vec::new(), done: false };
    futures::stream::unfold(state, move |mut state| async move {
        if state.done {
            return None;
        }
        let item = match deadline.run("generation's next chunk", state.upstream.message()).await {
            Ok(Some(chunk)) => {
                if state.cache.is_some() && !chunk.delta.is_empty() {
                    state.chunks.push(chunk.delta.clone());
                }
                if chunk.finish_reason != i32::from(FinishReason::Unspecified) {
                    state.done = true;
                    if let (Some(cache), Some(request)) = (state.cache.take(), state.request.take()) {
                        let response = generation::GenerateResponse {
                            id: chunk.id.clone(),
                            model: chunk.model.clone(),
                            text: state.chunks.concat(),
                            finish_reason: chunk.finish_reason,
                            usage: chunk.usage,
                            cached: false,
                            degraded: chunk.degraded.clone(),
                            provider: chunk.provider.clone(),
                        };
                        cache.store(request, response, std::mem::take(&mut state.chunks));
                    }
                }
                Ok(chunk.into())
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

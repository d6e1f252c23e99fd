//! The `llmesh.gateway.v1.Gateway` gRPC service.

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use llmesh_common::validate::{self, Limits};
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
    config::Config,
    deadline::Deadline,
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
    limits: Limits,
    request_timeout: Duration,
}

type ChunkStream = futures::stream::BoxStream<'static, Result<gw::GenerateStreamResponse, Status>>;

impl GatewayService {
    pub fn new(config: &Config, upstream: Upstream) -> Self {
        Self {
            inner: Arc::new(Inner {
                generation: upstream.generation,
                cache: Cache::new(upstream.cache, Duration::from_millis(config.cache.budget_ms)),
                limits: config.limits.clone(),
                request_timeout: Duration::from_millis(config.request_timeout_ms),
            }),
        }
    }

    /// Validates the request and consults the cache. `Ok(Some(hit))` answers from the cache;
    /// `Ok(None)` means generate.
    async fn cached(
        &self,
        request: &generation::GenerateRequest,
        deadline: Deadline,
    ) -> Result<Option<(generation::GenerateResponse, Vec<String>)>, Status> {
        validate::generate_request(request, &self.inner.limits)?;
        let policy = Use::of(request.cache);
        if policy.read
            && let Some(hit) = self.inner.cache.lookup(request, deadline.remaining()).await
            && let Some(response) = hit.response
        {
            return Ok(Some((response, hit.chunks)));
        }
        if policy.only_cached {
            return Err(Status::not_found("cache: no cached answer for this request (policy ONLY_IF_CACHED)"));
        }
        Ok(None)
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
        if let Some((response, _)) = self.cached(&request, deadline).await? {
            return Ok(Response::new(response.into()));
        }
        let mut client = self.inner.generation.clone();
        let call = client.generate(with_timeout(request.clone(), deadline)?);
        let response = deadline.run("generation", call).await?.into_inner();
        if Use::of(request.cache).write {
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
        if let Some((response, chunks)) = self.cached(&request, deadline).await? {
            return Ok(Response::new(replay(response, chunks)));
        }
        let mut client = self.inner.generation.clone();
        let upstream_request = generation::GenerateStreamRequest::from(request.clone());
        let call = client.generate_stream(with_timeout(upstream_request, deadline)?);
        let upstream = deadline.run("generation", call).await?.into_inner();
        let cache = Use::of(request.cache).write.then(|| self.inner.cache.clone());
        Ok(Response::new(relay(upstream, request, cache, deadline)))
    }

    async fn submit_job(&self, _: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        Err(jobs_unavailable())
    }

    async fn get_job(&self, _: Request<GetJobRequest>) -> Result<Response<GetJobResponse>, Status> {
        Err(jobs_unavailable())
    }

    type WatchJobStream = futures::stream::BoxStream<'static, Result<WatchJobResponse, Status>>;

    async fn watch_job(&self, _: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(jobs_unavailable())
    }

    async fn cancel_job(&self, _: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        Err(jobs_unavailable())
    }

    async fn list_models(&self, request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let deadline = Deadline::new(request.metadata(), self.inner.request_timeout);
        let mut client = self.inner.generation.clone();
        let call = client.list_models(with_timeout(generation::ListModelsRequest {}, deadline)?);
        let models = deadline.run("generation", call).await?.into_inner();
        Ok(Response::new(ListModelsResponse { models: models.models.into_iter().map(Into::into).collect() }))
    }
}

fn jobs_unavailable() -> Status {
    Status::unimplemented("jobs: the job queue is not part of this build yet")
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

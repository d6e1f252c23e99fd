//! The `llmesh.gateway.v1.Gateway` gRPC service: RPC glue. Each generation call is handed to the
//! answer step ([`Answering`], declared in [`crate::stack::answers`]: token admission, settlement,
//! cache, single flight, the pipeline to generation) in one shared path —
//! [`GatewayService::unary`] and [`GatewayService::stream`], which the HTTP routes
//! ([`crate::http`]) take too; the job RPCs are in [`jobs`], admitted by the same
//! [`TokenAdmission`].

use std::{sync::Arc, time::Duration};

use llmesh_proto::{
    gateway::v1::{
        self as gw, CancelJobRequest, CancelJobResponse, GetJobRequest, GetJobResponse, ListModelsRequest,
        ListModelsResponse, SubmitJobRequest, SubmitJobResponse, WatchJobRequest, gateway_server::Gateway,
    },
    generation::v1 as generation,
};
use tonic::{Request, Response, Status};
use tower::ServiceExt as _;

use crate::{
    admission::{Quota, TokenAdmission},
    answer::{Answering, Asked, generate::unexpected_reply, relay::ChunkStream, settle::Settled},
    deadline::Deadline,
    error::CallError,
    jobs::{self, Jobs},
    metrics::{label, metrics},
    pipeline::{self, Ask, Call, Generation, Reply},
    principal::Principal,
};

#[derive(Debug, Clone)]
pub struct GatewayService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Admits jobs (generation calls are admitted inside `answers`).
    admission: TokenAdmission,
    answers: Answering,
    generation: Generation,
    jobs: Jobs,
    request_timeout: Duration,
}

/// A unary call's answer and what the key has left after it.
pub struct Unary {
    pub response: generation::GenerateResponse,
    pub quota: Quota,
}

/// A stream's chunks and what the key had left when its headers went out.
pub struct Stream {
    pub chunks: ChunkStream,
    pub quota: Quota,
}

impl GatewayService {
    pub fn new(
        admission: TokenAdmission,
        answers: Answering,
        generation: Generation,
        jobs: Jobs,
        request_timeout: Duration,
    ) -> Self {
        Self { inner: Arc::new(Inner { admission, answers, generation, jobs, request_timeout }) }
    }

    /// The configured longest a call may take.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// One unary generation call, whichever way it came in: admitted for `caller`, answered, and
    /// settled. `endpoint` labels the overhead metric.
    pub async fn unary(
        &self,
        caller: Principal,
        request: generation::GenerateRequest,
        deadline: Deadline,
        endpoint: &'static str,
    ) -> Result<Unary, CallError> {
        // The gateway's own time counts from here: the token reservation and the cache are in it.
        let started = std::time::Instant::now();
        let asked = Asked { request, stream: false, deadline, caller };
        let Settled::Unary { response, quota, upstream_time } = self.inner.answers.clone().oneshot(asked).await? else {
            return Err(unexpected_reply());
        };
        metrics()
            .overhead
            .record(started.elapsed().saturating_sub(upstream_time).as_secs_f64(), &[label("endpoint", endpoint)]);
        Ok(Unary { response, quota })
    }

    /// One streamed generation call, whichever way it came in: admitted, answered (from the cache,
    /// a fallback, or generation's live stream), and settled when the stream ends — or, when the
    /// client goes away first, when its chunks are dropped.
    pub async fn stream(
        &self,
        caller: Principal,
        request: generation::GenerateRequest,
        deadline: Deadline,
    ) -> Result<Stream, CallError> {
        let asked = Asked { request, stream: true, deadline, caller };
        match self.inner.answers.clone().oneshot(asked).await? {
            Settled::Stream { chunks, quota } => Ok(Stream { chunks, quota }),
            Settled::Unary { .. } => Err(unexpected_reply()),
        }
    }

    /// The models generation serves, for `caller`.
    pub async fn models(&self, caller: Principal, deadline: Deadline) -> Result<Vec<generation::Model>, CallError> {
        let reply = pipeline::ask(&self.inner.generation, Call::new(Ask::ListModels, deadline, caller.clone())).await;
        match reply? {
            // Only the models the key may use, whichever API asks.
            Reply::Models(models) => Ok(models.models.into_iter().filter(|model| caller.allows(&model.name)).collect()),
            _ => Err(unexpected_reply()),
        }
    }

    /// The call's deadline, the caller the auth layer found, and its request.
    fn parts<T: Into<generation::GenerateRequest>>(
        &self,
        request: Request<T>,
    ) -> (Deadline, Principal, generation::GenerateRequest) {
        let deadline = Deadline::new(request.metadata(), self.inner.request_timeout);
        let caller = Principal::of(request.extensions());
        (deadline, caller, request.into_inner().into())
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn generate(&self, request: Request<gw::GenerateRequest>) -> Result<Response<gw::GenerateResponse>, Status> {
        let (deadline, caller, request) = self.parts(request);
        let Unary { response, quota } =
            self.unary(caller, request, deadline, "Generate").await.map_err(CallError::into_status)?;
        let mut response = Response::new(gw::GenerateResponse::from(response));
        quota.write_metadata(response.metadata_mut());
        Ok(response)
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        request: Request<gw::GenerateStreamRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (deadline, caller, request) = self.parts(request);
        let Stream { chunks, quota } = self.stream(caller, request, deadline).await.map_err(CallError::into_status)?;
        let mut response = Response::new(chunks);
        quota.write_metadata(response.metadata_mut());
        Ok(response)
    }

    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        let admission = &self.inner.admission;
        // Jobs are admitted exactly as generate calls are; the job then holds the tokens.
        let admit = async |caller: Principal, generate: &generation::GenerateRequest| {
            let admitted = admission.admit_job(caller, generate.clone()).await?;
            let (held, spend) = admitted.tokens.into_parts();
            Ok((admitted.principal, held, spend))
        };
        self.inner.jobs.submit(request, admission.limiter(), admission.budgets(), admit).await
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<GetJobResponse>, Status> {
        self.inner.jobs.get(request).await
    }

    type WatchJobStream = jobs::WatchStream;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        self.inner.jobs.watch(request).await
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        let admission = &self.inner.admission;
        self.inner.jobs.cancel(request, admission.limiter(), admission.budgets()).await
    }

    async fn list_models(&self, request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let deadline = Deadline::new(request.metadata(), self.inner.request_timeout);
        let caller = Principal::of(request.extensions());
        let models = self.models(caller, deadline).await?;
        Ok(Response::new(ListModelsResponse { models: models.into_iter().map(Into::into).collect() }))
    }
}

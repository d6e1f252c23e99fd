//! The `llmesh.gateway.v1.Gateway` gRPC service: RPC glue. Each generation RPC is admitted
//! ([`TokenAdmission`]), answered ([`Answers`]: cache, single flight, the pipeline to generation),
//! and settled (its [`Tokens`](crate::admission::Tokens)) in one shared path; the job RPCs are in
//! [`jobs`].

use std::{sync::Arc, time::Duration};

use llmesh_proto::{
    gateway::v1::{
        self as gw, CancelJobRequest, CancelJobResponse, GetJobRequest, GetJobResponse, ListModelsRequest,
        ListModelsResponse, SubmitJobRequest, SubmitJobResponse, WatchJobRequest, gateway_server::Gateway,
    },
    generation::v1 as generation,
};
use tonic::{Request, Response, Status};

use crate::{
    admission::{Admitted, TokenAdmission},
    answer::{Answers, Streamed},
    deadline::Deadline,
    jobs::{self, Jobs},
    metrics::{label, metrics},
    pipeline::{self, Ask, Call, Generation, Reply},
    relay::{self, ChunkStream},
};

#[derive(Debug, Clone)]
pub struct GatewayService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    admission: TokenAdmission,
    answers: Answers,
    generation: Generation,
    jobs: Jobs,
    request_timeout: Duration,
}

impl GatewayService {
    pub fn new(
        admission: TokenAdmission,
        answers: Answers,
        generation: Generation,
        jobs: Jobs,
        request_timeout: Duration,
    ) -> Self {
        Self { inner: Arc::new(Inner { admission, answers, generation, jobs, request_timeout }) }
    }

    /// The call's deadline and its admission, from the typed request.
    async fn admit<T: Into<generation::GenerateRequest>>(
        &self,
        request: Request<T>,
    ) -> Result<(Deadline, Admitted), Status> {
        let deadline = Deadline::new(request.metadata(), self.inner.request_timeout);
        let (_, extensions, request) = request.into_parts();
        Ok((deadline, self.inner.admission.admit(&extensions, request.into()).await?))
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn generate(&self, request: Request<gw::GenerateRequest>) -> Result<Response<gw::GenerateResponse>, Status> {
        // The gateway's own time counts from here: the token reservation and the cache are in it.
        let started = std::time::Instant::now();
        let (deadline, Admitted { principal, request, tokens }) = self.admit(request).await?;
        // A failure drops `tokens`: the call costs the caller nothing.
        let answer = self.inner.answers.unary(&request, deadline, &principal).await.map_err(|e| e.into_status())?;
        metrics().overhead.record(
            started.elapsed().saturating_sub(answer.upstream_time).as_secs_f64(),
            &[label("endpoint", "Generate")],
        );
        let quota = tokens.settle(answer.billable(), &answer.response.model);
        let mut response = Response::new(gw::GenerateResponse::from(answer.response));
        quota.write_metadata(response.metadata_mut());
        Ok(response)
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        request: Request<gw::GenerateStreamRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (deadline, Admitted { principal, request, tokens }) = self.admit(request).await?;
        let streamed = self.inner.answers.stream(&request, deadline, &principal).await.map_err(|e| e.into_status())?;
        let (chunks, quota) = match streamed {
            Streamed::Whole(answer) => relay::replay(answer, tokens),
            // Headers go out before the tokens are known: they carry what is left after the reservation.
            Streamed::Live(started, cache) => {
                let quota = tokens.quota();
                (relay::relay(started, request, cache, deadline, tokens), quota)
            }
        };
        let mut response = Response::new(chunks);
        quota.write_metadata(response.metadata_mut());
        Ok(response)
    }

    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        let admission = &self.inner.admission;
        // Jobs are admitted exactly as generate calls are; the job then holds the tokens.
        let admit = async |extensions: &http::Extensions, generate: &generation::GenerateRequest| {
            let admitted = admission.admit(extensions, generate.clone()).await?;
            Ok((admitted.principal, admitted.tokens.into_held()))
        };
        self.inner.jobs.submit(request, admission.limiter(), admit).await
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<GetJobResponse>, Status> {
        self.inner.jobs.get(request).await
    }

    type WatchJobStream = jobs::WatchStream;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        self.inner.jobs.watch(request).await
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        self.inner.jobs.cancel(request, self.inner.admission.limiter()).await
    }

    async fn list_models(&self, request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let deadline = Deadline::new(request.metadata(), self.inner.request_timeout);
        let caller = request.extensions().get().cloned().unwrap_or_else(crate::admission::Principal::anonymous);
        let reply = pipeline::ask(&self.inner.generation, Call::new(Ask::ListModels, deadline, caller)).await;
        match reply.map_err(pipeline::UpstreamError::into_status)? {
            Reply::Models(models) => {
                Ok(Response::new(ListModelsResponse { models: models.models.into_iter().map(Into::into).collect() }))
            }
            _ => Err(Status::internal("generation's reply did not match the call")),
        }
    }
}

//! The `llmesh.generation.v1.Generation` gRPC service.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use anyhow::bail;
use futures::{StreamExt as _, TryStreamExt as _};
use llmesh_common::validate::{self, Limits};
use llmesh_proto::{
    common::v1::FinishReason,
    generation::v1::{
        GenerateRequest, GenerateResponse, GenerateStreamRequest, GenerateStreamResponse, ListModelsRequest,
        ListModelsResponse, Model, generation_server::Generation,
    },
};
use llmesh_queue::JobError;
use tonic::{Code, Request, Response, Status};

use crate::{
    config::Config,
    observe::{Call, GenAiMetrics, observe},
    provider::{Event, EventStream, Mode, Provider, sim},
};

#[derive(Debug, Clone)]
pub struct GenerationService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    metrics: Arc<GenAiMetrics>,
    models: BTreeMap<String, Arc<Provider>>,
    /// `sim-flaky-N` providers made on first use (at most 1000 names exist).
    flaky: Mutex<HashMap<String, Arc<Provider>>>,
    limits: Limits,
}

/// A started generation: the provider's events and what to label the chunks with.
struct Started {
    id: String,
    model: String,
    provider: &'static str,
    events: EventStream,
}

impl GenerationService {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        if config.models.is_empty() {
            bail!("no models configured: add at least one [generation.models.NAME] section");
        }
        let models = config
            .models
            .iter()
            .map(|(name, model)| Ok((name.clone(), Arc::new(Provider::from_config(name, model)?))))
            .collect::<anyhow::Result<_>>()?;
        let metrics = Arc::new(GenAiMetrics::new(&llmesh_telemetry::meter()));
        Ok(Self { inner: Arc::new(Inner { metrics, models, flaky: Mutex::default(), limits: config.limits.clone() }) })
    }

    fn provider(&self, model: &str) -> Result<Arc<Provider>, Status> {
        if let Some(provider) = self.inner.models.get(model) {
            return Ok(provider.clone());
        }
        if let Some(config) = sim::flaky(model) {
            let mut flaky = self.inner.flaky.lock().map_err(|_| Status::internal("flaky model table poisoned"))?;
            let provider =
                flaky.entry(model.to_string()).or_insert_with(|| Arc::new(Provider::Sim(sim::Sim::new(config))));
            return Ok(provider.clone());
        }
        let known: Vec<&str> = self.inner.models.keys().map(String::as_str).collect();
        Err(Status::invalid_argument(format!(
            "model: unknown model {model:?}; available: {} (and sim-flaky-N)",
            known.join(", ")
        )))
    }

    fn start(&self, request: &GenerateRequest, mode: Mode) -> Result<Started, Status> {
        validate::generate_request(request, &self.inner.limits)?;
        let provider = self.provider(&request.model)?;
        let max_tokens = validate::effective_max_tokens(request, &self.inner.limits);
        let id = format!("gen-{}", uuid::Uuid::now_v7().simple());
        let call = Call { id: &id, model: &request.model, provider: provider.name(), max_tokens };
        let events = observe(provider.stream(request, max_tokens, mode), self.inner.metrics.clone(), call);
        Ok(Started { id, model: request.model.clone(), provider: provider.name(), events })
    }
}

impl GenerationService {
    /// One whole answer: the unary RPC and the queue's workers both come here.
    pub async fn complete(&self, request: &GenerateRequest) -> Result<GenerateResponse, Status> {
        let started = self.start(request, Mode::Unary)?;
        let mut response = GenerateResponse {
            id: started.id,
            model: started.model,
            provider: started.provider.to_string(),
            ..Default::default()
        };
        let mut events = started.events;
        while let Some(event) = events.try_next().await? {
            match event {
                Event::Delta(delta) => response.text.push_str(&delta),
                Event::Finish { reason, usage } => {
                    response.finish_reason = reason.into();
                    response.usage = Some(usage);
                }
            }
        }
        if response.finish_reason == i32::from(FinishReason::Unspecified) {
            return Err(Status::unavailable("provider ended the answer without finishing it"));
        }
        Ok(response)
    }

    /// Runs a queued job. Failures a retry may fix (the upstream down, rate limited, slow) are
    /// retryable; a request the provider rejects is not.
    pub async fn run_job(&self, request: GenerateRequest) -> Result<GenerateResponse, JobError> {
        // The job's span continues the trace of its submission.
        let span = tracing::info_span!("job.run", otel.kind = "consumer", gen_ai.request.model = %request.model);
        if let Some(traceparent) = request.metadata.get(llmesh_telemetry::JOB_TRACEPARENT_KEY) {
            llmesh_telemetry::set_parent_from_traceparent(&span, traceparent);
        }
        let completed = tracing::Instrument::instrument(self.complete(&request), span).await;
        completed.map_err(|status| {
            let message = format!("{:?}: {}", status.code(), status.message());
            match status.code() {
                Code::InvalidArgument | Code::FailedPrecondition | Code::PermissionDenied | Code::NotFound => {
                    JobError::permanent(message)
                }
                _ => JobError::retryable(message),
            }
        })
    }
}

#[tonic::async_trait]
impl Generation for GenerationService {
    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateResponse>, Status> {
        self.complete(request.get_ref()).await.map(Response::new)
    }

    type GenerateStreamStream = futures::stream::BoxStream<'static, Result<GenerateStreamResponse, Status>>;

    async fn generate_stream(
        &self,
        request: Request<GenerateStreamRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let request: GenerateRequest = request.into_inner().into();
        let Started { id, model, provider, events } = self.start(&request, Mode::Stream)?;
        // The provider stream is polled by tonic as the client reads: back-pressure comes for free,
        // and a client that goes away drops the stream, which stops the upstream work.
        let chunks = events.map_ok(move |event| {
            let mut chunk = GenerateStreamResponse {
                id: id.clone(),
                model: model.clone(),
                provider: provider.to_string(),
                ..Default::default()
            };
            match event {
                Event::Delta(delta) => chunk.delta = delta,
                Event::Finish { reason, usage } => {
                    chunk.finish_reason = reason.into();
                    chunk.usage = Some(usage);
                }
            }
            chunk
        });
        Ok(Response::new(chunks.boxed()))
    }

    async fn list_models(&self, _: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let models = self
            .inner
            .models
            .iter()
            .map(|(name, provider)| Model {
                name: name.clone(),
                provider: provider.name().to_string(),
                upstream_model: provider.upstream_model(name).to_string(),
                deterministic: provider.deterministic(),
            })
            .collect();
        Ok(Response::new(ListModelsResponse { models }))
    }
}

//! The `llmesh.generation.v1.Generation` gRPC service.
//!
//! Routes each request's model name to its provider: a configured model, a fault-injection model
//! when `fault_models` is set, or nothing (INVALID_ARGUMENT on `model`). The routing table and the
//! metric label sets are made at start-up: no name a client sends adds an entry, a provider or a
//! label value.
//!
//! Failures: whatever a provider reports is its upstream's, and the caller gets a status marked
//! `llmesh-failure-origin: upstream` (see `provider::error`): as the unary call's status, and as a
//! stream's error item (in its trailers) whether it comes before or after the first chunk. A
//! status the replica makes itself (validation, an unknown model) has no mark.

use std::{collections::BTreeMap, sync::Arc};

use anyhow::bail;
use futures::{StreamExt as _, TryStreamExt as _};
use llmesh_proto::assemble;
use llmesh_proto::validate::{self, Limits};
use llmesh_proto::{
    common::v1::FinishReason,
    generation::v1::{
        GenerateRequest, GenerateResponse, GenerateStreamRequest, GenerateStreamResponse, ListModelsRequest,
        ListModelsResponse, Model as ListedModel, generation_server::Generation,
    },
};
use llmesh_queue::JobError;
use tonic::{Code, Request, Response, Status};

use crate::{
    capabilities,
    config::{self, Config},
    observe::{Call, GenAiMetrics, ModelLabels, observe},
    provider::{
        Event, EventStream, Mode, Provider, UpstreamError,
        error::Kind,
        sim::{self, Flaky},
    },
};

/// How much of an unknown model's name an error message shows.
const SHOWN_NAME_CHARS: usize = 64;

#[derive(Debug, Clone)]
pub struct GenerationService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    metrics: Arc<GenAiMetrics>,
    models: BTreeMap<String, Model>,
    /// The `sim-flaky-N` family, when fault models are on: one provider and one label set for
    /// every N.
    flaky: Option<(Flaky, Arc<ModelLabels>)>,
    limits: Limits,
}

/// A configured model.
#[derive(Debug)]
struct Model {
    provider: Provider,
    labels: Arc<ModelLabels>,
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
        let mut configured = config.models.clone();
        if config.fault_models {
            for (name, model) in config::fault_models() {
                configured.entry(name).or_insert(model);
            }
        }
        let models = configured
            .iter()
            .map(|(name, model)| {
                let provider = Provider::from_config(name, model, config.max_upstream_response_bytes)?;
                let labels = ModelLabels::new(name, provider.name());
                Ok((name.clone(), Model { provider, labels }))
            })
            .collect::<anyhow::Result<_>>()?;
        let flaky = config.fault_models.then(|| (Flaky::default(), ModelLabels::new(sim::FLAKY, "sim")));
        let metrics = Arc::new(GenAiMetrics::new(&llmesh_telemetry::meter()));
        Ok(Self { inner: Arc::new(Inner { metrics, models, flaky, limits: config.limits.clone() }) })
    }

    fn unknown(&self, model: &str) -> Status {
        let known: Vec<&str> = self.inner.models.keys().map(String::as_str).collect();
        let family = if self.inner.flaky.is_some() { " (and sim-flaky-N, N from 1 to 1000)" } else { "" };
        Status::invalid_argument(format!(
            "model: unknown model {}; available: {}{family}",
            shown(model),
            known.join(", ")
        ))
    }

    fn start(&self, request: &GenerateRequest, mode: Mode) -> Result<Started, Status> {
        validate::generate_request(request, &self.inner.limits)?;
        let mut max_tokens = validate::effective_max_tokens(request, &self.inner.limits);
        let (events, provider, labels) = match self.inner.models.get(&request.model) {
            Some(model) => {
                capabilities::check(request, &model.provider.catalog().capabilities)?;
                let limit = model.provider.catalog().max_output_tokens;
                if limit > 0 && max_tokens > limit {
                    if request.max_tokens > 0 {
                        return Err(Status::invalid_argument(format!(
                            "max_tokens: {max_tokens} exceeds the output limit of model {}, {limit}",
                            request.model
                        )));
                    }
                    max_tokens = limit;
                }
                (model.provider.stream(request, max_tokens, mode)?, model.provider.name(), model.labels.clone())
            }
            None => match (&self.inner.flaky, sim::flaky_n(&request.model)) {
                (Some((flaky, labels)), Some(n)) => (flaky.stream(n, request, max_tokens), "sim", labels.clone()),
                _ => return Err(self.unknown(&request.model)),
            },
        };
        let id = format!("gen-{}", uuid::Uuid::now_v7().simple());
        let call = Call { id: &id, model: &request.model, provider, max_tokens, labels };
        let events = observe(events, self.inner.metrics.clone(), call);
        Ok(Started { id, model: request.model.clone(), provider, events })
    }
}

/// A provider's stream that names a tool call or reasoning block past the limit: its upstream's fault.
fn malformed(error: &assemble::IndexTooHigh, model: &str) -> Status {
    UpstreamError::new(Kind::Malformed, error.to_string()).into_status(model)
}

/// A name as an error message may show it: quoted, and cut short when long (a client may send a
/// megabyte of it).
fn shown(name: &str) -> String {
    if name.chars().count() <= SHOWN_NAME_CHARS {
        return format!("{name:?}");
    }
    let start: String = name.chars().take(SHOWN_NAME_CHARS).collect();
    format!("{start:?}... ({} bytes)", name.len())
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
        let mut assembler = assemble::Assembler::default();
        while let Some(event) = events.try_next().await.map_err(|error| error.into_status(&response.model))? {
            match event {
                Event::Delta(delta) => response.text.push_str(&delta),
                Event::ToolCall(delta) => assembler.tool_call(&delta).map_err(|e| malformed(&e, &response.model))?,
                Event::Reasoning(delta) => assembler.reasoning(&delta).map_err(|e| malformed(&e, &response.model))?,
                Event::Extensions(extensions) => response.extensions = Some(extensions),
                Event::Finish { reason, usage } => {
                    response.finish_reason = reason.into();
                    response.usage = Some(usage);
                }
            }
        }
        let (tool_calls, reasoning) = assembler.into_parts();
        response.tool_calls = tool_calls;
        response.reasoning = reasoning;
        if response.finish_reason == i32::from(FinishReason::Unspecified) {
            let error = UpstreamError::new(Kind::Unfinished, "the provider's answer ended without a finish");
            return Err(error.into_status(&response.model));
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
        // The upstream's extensions wait for the final chunk, where the contract puts them.
        let mut extensions = None;
        let chunks = events.filter_map(move |event| {
            let chunk = (|| {
                let event = event.map_err(|error| error.into_status(&model))?;
                let mut chunk = GenerateStreamResponse {
                    id: id.clone(),
                    model: model.clone(),
                    provider: provider.to_string(),
                    ..Default::default()
                };
                match event {
                    Event::Delta(delta) => chunk.delta = delta,
                    Event::ToolCall(delta) => chunk.tool_calls = vec![delta],
                    Event::Reasoning(delta) => chunk.reasoning = vec![delta],
                    Event::Extensions(more) => {
                        extensions = Some(more);
                        return Ok(None);
                    }
                    Event::Finish { reason, usage } => {
                        chunk.finish_reason = reason.into();
                        chunk.usage = Some(usage);
                        chunk.extensions = extensions.take();
                    }
                }
                Ok(Some(chunk))
            })();
            futures::future::ready(chunk.transpose())
        });
        Ok(Response::new(chunks.boxed()))
    }

    /// The configured models, and the fault-injection models `sim-slow`, `sim-error` and
    /// `sim-429` when `fault_models` is on. The `sim-flaky-N` family is not listed (a thousand
    /// names of one model); an unknown model's error message mentions it when it is on.
    async fn list_models(&self, _: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let models = self
            .inner
            .models
            .iter()
            .map(|(name, model)| ListedModel {
                name: name.clone(),
                provider: model.provider.name().to_string(),
                upstream_model: model.provider.upstream_model(name).to_string(),
                deterministic: model.provider.deterministic(),
                context_window: model.provider.catalog().context_window,
                max_output_tokens: model.provider.catalog().max_output_tokens,
                capabilities: model.provider.catalog().capabilities.clone(),
            })
            .collect();
        Ok(Response::new(ListModelsResponse { models }))
    }
}

#[cfg(test)]
mod tests {
    use llmesh_proto::{
        failure::{ORIGIN_KEY, ORIGIN_UPSTREAM},
        generation::v1::generation_client::GenerationClient,
    };
    use tonic::transport::Channel;

    use super::*;

    /// A generation server on a loopback port, with fault models as asked.
    async fn client(fault_models: bool) -> GenerationClient<Channel> {
        let config = Config { fault_models, ..Config::default() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(crate::serve(config, listener, std::future::pending()));
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        GenerationClient::new(endpoint.connect().await.unwrap())
    }

    fn request(model: &str) -> GenerateRequest {
        GenerateRequest { model: model.into(), prompt: "hello".into(), ..Default::default() }
    }

    fn origin(status: &Status) -> Option<&str> {
        status.metadata().get(ORIGIN_KEY).and_then(|v| v.to_str().ok())
    }

    async fn stream_error(client: &mut GenerationClient<Channel>, model: &str) -> Status {
        let request = GenerateStreamRequest { model: model.into(), prompt: "hello".into(), ..Default::default() };
        let mut stream = match client.generate_stream(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return status,
        };
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("{model}: the stream ended without an error"),
                Err(status) => return status,
            }
        }
    }

    #[tokio::test]
    async fn a_models_output_limit_bounds_max_tokens_and_is_listed() {
        use crate::provider::{Catalog, ModelConfig, sim::SimConfig};
        let catalog = Catalog { context_window: 1000, max_output_tokens: 10, capabilities: vec!["tools".into()] };
        let mut config = Config::default();
        config
            .models
            .insert("small".into(), ModelConfig::Sim(SimConfig { output_tokens: 50, catalog, ..SimConfig::default() }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(crate::serve(config, listener, std::future::pending()));
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let mut client = GenerationClient::new(endpoint.connect().await.unwrap());

        let status = client.generate(GenerateRequest { max_tokens: 11, ..request("small") }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "max_tokens: 11 exceeds the output limit of model small, 10");
        // Left at 0, the default (256) is held to the model's limit.
        let answer = client.generate(request("small")).await.unwrap().into_inner();
        assert_eq!(answer.usage.unwrap().completion_tokens, 10);
        assert_eq!(answer.finish_reason, i32::from(FinishReason::Length));
        // It lists tools only: a document is refused before the model is called, naming the part.
        let document = llmesh_proto::common::v1::ContentPart {
            kind: Some(llmesh_proto::common::v1::content_part::Kind::Document(llmesh_proto::common::v1::Document {
                source: Some(llmesh_proto::common::v1::document::Source::Text("the terms".into())),
                media_type: "text/plain".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let message =
            llmesh_proto::common::v1::ChatMessage { role: "user".into(), parts: vec![document], ..Default::default() };
        let refused = GenerateRequest { messages: vec![message], prompt: String::new(), ..request("small") };
        let status = client.generate(refused).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "messages[0].parts[0]: model small does not take documents (its capabilities: tools)"
        );

        let models = client.list_models(ListModelsRequest {}).await.unwrap().into_inner().models;
        let small = models.iter().find(|m| m.name == "small").unwrap();
        assert_eq!((small.context_window, small.max_output_tokens), (1000, 10));
        assert_eq!(small.capabilities, ["tools"]);
        let sim = models.iter().find(|m| m.name == "sim").unwrap();
        assert_eq!(sim.capabilities, ["tools", "images", "documents", "json_schema"]);
    }

    #[tokio::test]
    async fn injected_failures_are_the_upstreams_on_both_rpcs() {
        let mut client = client(true).await;
        for (model, code) in [("sim-error", Code::Unavailable), ("sim-429", Code::ResourceExhausted)] {
            let unary = client.generate(request(model)).await.unwrap_err();
            let stream = stream_error(&mut client, model).await;
            for status in [unary, stream] {
                assert_eq!(status.code(), code, "{model}: {status:?}");
                assert_eq!(origin(&status), Some(ORIGIN_UPSTREAM), "{model}: {status:?}");
            }
        }
        let status = client.generate(request("sim-flaky-1")).await.unwrap_err();
        assert_eq!(origin(&status), Some(ORIGIN_UPSTREAM), "{status:?}");
        assert!(client.generate(request("sim")).await.is_ok());
    }

    #[tokio::test]
    async fn the_replicas_own_answers_are_not_marked() {
        let mut client = client(true).await;
        let invalid = client.generate(GenerateRequest { prompt: String::new(), ..request("sim") }).await.unwrap_err();
        let unknown = client.generate(request("nope")).await.unwrap_err();
        let unknown_stream = stream_error(&mut client, "nope").await;
        for status in [invalid, unknown, unknown_stream] {
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert_eq!(origin(&status), None, "{status:?}");
        }
    }

    #[tokio::test]
    async fn fault_models_exist_only_when_enabled() {
        let mut off = client(false).await;
        for model in ["sim-error", "sim-429", "sim-slow", "sim-flaky-1", "sim-flaky-3"] {
            let status = off.generate(request(model)).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{model}: {status:?}");
            assert!(status.message().starts_with("model: unknown model"), "{model}: {status:?}");
            assert!(!status.message().contains("sim-flaky-N"), "{status:?}");
        }
        let listed = off.list_models(ListModelsRequest {}).await.unwrap().into_inner().models;
        assert_eq!(listed.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["sim"]);

        let mut on = client(true).await;
        let listed = on.list_models(ListModelsRequest {}).await.unwrap().into_inner().models;
        let names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["sim", "sim-429", "sim-error", "sim-slow"]);
        assert!(on.generate(request("sim-flaky-2")).await.is_ok());
        for model in ["sim-flaky-007", "sim-flaky-+7", "sim-flaky-0", "sim-flaky-1001"] {
            let status = on.generate(request(model)).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{model}: {status:?}");
            assert_eq!(origin(&status), None, "{status:?}");
        }
    }

    #[tokio::test]
    async fn a_long_unknown_name_is_not_echoed_whole() {
        let mut client = client(true).await;
        let name = format!("sim-flaky-{}", "0".repeat(50_000));
        let status = client.generate(request(&name)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().len() < 400, "{} bytes of message", status.message().len());
        assert!(status.message().starts_with("model: "), "{}", status.message());
    }

    #[test]
    fn names_are_shown_short() {
        assert_eq!(shown("gpt-4o"), "\"gpt-4o\"");
        let long = "é".repeat(100);
        assert_eq!(shown(&long), format!("{:?}... (200 bytes)", "é".repeat(64)));
    }
}

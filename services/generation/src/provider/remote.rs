//! A model served over HTTP: a wire format ([`Wire`]: its body, its answer, its stream's events)
//! behind the HTTP side every such model shares ([`Upstream`]).

use llmesh_proto::generation::v1::GenerateRequest;
use tonic::Status;

use super::{
    Catalog, EventStream, Mode, anthropic,
    error::{Kind, UpstreamError},
    gemini,
    http::{Api, HttpModelConfig, Upstream},
    openai,
    translate::Refusal,
};

/// The wire formats llmesh speaks to upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// OpenAI's chat completions (OpenAI, compatible servers, Azure OpenAI).
    OpenAi,
    /// Anthropic's Messages.
    Anthropic,
    /// Google's Gemini `generateContent`.
    Gemini,
}

#[derive(Debug)]
pub struct Remote {
    wire: Wire,
    catalog: Catalog,
    upstream: Upstream,
    /// The model name sent upstream.
    model: String,
    deterministic: bool,
}

impl Remote {
    /// `name` is the model's as clients send it; `api` how its provider is called;
    /// `max_response_bytes` the generation-wide default, for a model that sets none.
    pub fn new(
        name: &str,
        config: &HttpModelConfig,
        wire: Wire,
        api: &Api,
        max_response_bytes: u64,
    ) -> anyhow::Result<Self> {
        let model = if config.upstream_model.is_empty() { name.to_string() } else { config.upstream_model.clone() };
        Ok(Self {
            wire,
            catalog: config.catalog.clone(),
            upstream: Upstream::new(name, &model, config, api, max_response_bytes)?,
            model,
            deterministic: config.deterministic,
        })
    }

    /// `openai`, `azure`, `anthropic`, `gemini`.
    pub fn provider(&self) -> &'static str {
        self.upstream.name()
    }

    pub fn upstream_model(&self) -> &str {
        &self.model
    }

    pub fn deterministic(&self) -> bool {
        self.deterministic
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Until when the upstream's rate-limit headers said it has no headroom, if still ahead.
    pub fn exhausted_until(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        self.upstream.exhausted_until(now)
    }

    /// Starts the call. A request the wire format has no form for is INVALID_ARGUMENT, naming the
    /// field, before anything is sent.
    pub fn stream(&self, request: &GenerateRequest, max_tokens: u32, mode: Mode) -> Result<EventStream, Status> {
        let streamed = mode == Mode::Stream;
        let body = match self.wire {
            Wire::OpenAi => openai::wire::body(request, &self.model, max_tokens, streamed),
            Wire::Anthropic => anthropic::wire::body(request, &self.model, max_tokens, streamed),
            Wire::Gemini => gemini::wire::body(request, max_tokens),
        };
        let body = match body {
            Ok(body) => body,
            Err(refusal @ Refusal::Field { .. }) => {
                return Err(Status::invalid_argument(format!("{refusal} (model {})", request.model)));
            }
            Err(error @ Refusal::Json(_)) => {
                // Validation made every JSON text an object; this is a bug, told as the upstream's.
                let error = UpstreamError::new(Kind::Malformed, error.to_string());
                return Ok(Box::pin(futures::stream::once(async move { Err(error) })));
            }
        };
        let prompt_tokens = llmesh_proto::validate::estimated_prompt_tokens(request);
        let upstream = &self.upstream;
        Ok(match self.wire {
            Wire::OpenAi => {
                upstream.call(body, mode, prompt_tokens, openai::read_completion, openai::Chunks::new(prompt_tokens))
            }
            Wire::Anthropic => {
                upstream.call(body, mode, prompt_tokens, anthropic::read_message, anthropic::Events::new(prompt_tokens))
            }
            Wire::Gemini => {
                upstream.call(body, mode, prompt_tokens, gemini::read_response, gemini::Responses::new(prompt_tokens))
            }
        })
    }
}

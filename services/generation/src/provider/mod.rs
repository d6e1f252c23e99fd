//! Providers turn a generation request into a stream of events. Unary calls collect the stream,
//! so both RPCs share one code path per provider. A provider fails only with an [`UpstreamError`]:
//! whatever goes wrong in it is the model's upstream, never the replica.

pub mod anthropic;
pub mod error;
pub mod failure;
pub mod gemini;
#[cfg(test)]
mod golden;
pub mod group;
mod headroom;
pub mod http;
pub mod openai;
mod remote;
pub mod sim;
mod sse;
mod translate;

use std::pin::Pin;

pub use self::error::UpstreamError;
use futures::Stream;
use llmesh_proto::{
    common::v1::{Extensions, FinishReason, ReasoningDelta, ToolCallDelta, Usage},
    generation::v1::GenerateRequest,
};
use tonic::Status;

use self::remote::Wire;

/// One step of a generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// More text.
    Delta(String),
    /// A piece of a tool call (see `ToolCallDelta`: the first piece of a call has its id and name).
    ToolCall(ToolCallDelta),
    /// A piece of a reasoning block.
    Reasoning(ReasoningDelta),
    /// The upstream's answer fields llmesh does not act on; before the finish.
    Extensions(Extensions),
    /// The end: why it ended and what it cost. Always the last event of a successful stream.
    Finish { reason: FinishReason, usage: Usage },
}

/// A provider's answer. Dropping it cancels the upstream work.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, UpstreamError>> + Send>>;

/// Whether the caller wants the answer streamed (upstreams may answer differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Unary,
    Stream,
}

/// Which provider serves a model, and how (`[generation.models.NAME]`). Here and not in `config`
/// so that the providers do not depend on the service's configuration (which depends on them).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(tag = "provider", rename_all = "lowercase")]
pub enum ModelConfig {
    /// The built-in simulated model: deterministic text, no network, no key.
    Sim(sim::SimConfig),
    /// Any OpenAI-compatible chat completions endpoint.
    Openai(http::HttpModelConfig),
    /// Anthropic's Messages API, natively.
    Anthropic(http::HttpModelConfig),
    /// Azure OpenAI's v1 API: OpenAI's wire format at the resource's endpoint.
    Azure(http::HttpModelConfig),
    /// Google's Gemini API, natively.
    Gemini(http::HttpModelConfig),
    /// One name over several deployments, with failover and cool-downs.
    Group(group::GroupConfig),
}

/// A model's catalog entry (`[generation.models.NAME.catalog]`): what ListModels reports, and
/// the output limit generation holds `max_tokens` to.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Catalog {
    /// The context window, in tokens (reported only; 0: unknown).
    pub context_window: u32,
    /// The most tokens one answer may have: a request asking for more is refused
    /// (INVALID_ARGUMENT on `max_tokens`), one leaving `max_tokens` at 0 gets at most this. 0: no
    /// limit but `limits.max_tokens`.
    pub max_output_tokens: u32,
    /// What the model takes besides text: "tools", "images", "documents", "json_schema",
    /// "reasoning" (reported only).
    pub capabilities: Vec<String>,
}

/// A configured model's provider.
#[derive(Debug)]
pub enum Provider {
    Sim(sim::Sim),
    /// OpenAI-compatible, Azure, Anthropic or Gemini (boxed: a model is built once, and the enum
    /// stays small).
    Remote(Box<remote::Remote>),
    Group(Box<group::Group>),
}

impl Provider {
    /// `max_response_bytes`: the default size limit of an upstream's answer.
    pub fn from_config(name: &str, config: &ModelConfig, max_response_bytes: u64) -> anyhow::Result<Self> {
        let (config, wire, api) = match config {
            ModelConfig::Sim(sim) => return Ok(Self::Sim(sim::Sim::new(sim.clone()))),
            ModelConfig::Group(group) => {
                return Ok(Self::Group(Box::new(group::Group::new(name, group, max_response_bytes)?)));
            }
            ModelConfig::Openai(config) => (config, Wire::OpenAi, &openai::OPENAI),
            ModelConfig::Azure(config) => (config, Wire::OpenAi, &openai::AZURE),
            ModelConfig::Anthropic(config) => (config, Wire::Anthropic, &anthropic::API),
            ModelConfig::Gemini(config) => (config, Wire::Gemini, &gemini::API),
        };
        Ok(Self::Remote(Box::new(remote::Remote::new(name, config, wire, api, max_response_bytes)?)))
    }

    /// The provider's low-cardinality name, as reported in responses and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sim(_) => "sim",
            Self::Remote(remote) => remote.provider(),
            Self::Group(_) => "group",
        }
    }

    /// True when the same request always yields the same answer.
    pub fn deterministic(&self) -> bool {
        match self {
            Self::Sim(sim) => sim.deterministic(),
            Self::Remote(remote) => remote.deterministic(),
            Self::Group(group) => group.deterministic(),
        }
    }

    /// The model's catalog entry.
    pub fn catalog(&self) -> &Catalog {
        match self {
            Self::Sim(sim) => sim.catalog(),
            Self::Remote(remote) => remote.catalog(),
            Self::Group(group) => group.catalog(),
        }
    }

    /// The model name sent upstream.
    pub fn upstream_model<'a>(&'a self, name: &'a str) -> &'a str {
        match self {
            Self::Sim(_) => name,
            Self::Remote(remote) => remote.upstream_model(),
            Self::Group(group) => group.upstream_model(name),
        }
    }

    /// Until when the model's upstream said it has no headroom left (a remote model's rate-limit
    /// headers), if that is still ahead.
    pub fn exhausted_until(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        match self {
            Self::Remote(remote) => remote.exhausted_until(now),
            Self::Sim(_) | Self::Group(_) => None,
        }
    }

    /// Starts generating. `max_tokens` is already resolved against the configured default. A
    /// request the provider's API has no form for is refused here (INVALID_ARGUMENT naming the
    /// field), before anything is sent; whatever fails later is the upstream's.
    pub fn stream(&self, request: &GenerateRequest, max_tokens: u32, mode: Mode) -> Result<EventStream, Status> {
        match self {
            Self::Sim(sim) => Ok(sim.stream(request, max_tokens)),
            Self::Remote(remote) => remote.stream(request, max_tokens, mode),
            Self::Group(group) => group.stream(request, max_tokens, mode),
        }
    }
}

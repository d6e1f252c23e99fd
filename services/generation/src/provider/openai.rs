//! Any OpenAI-compatible chat completions endpoint: OpenAI, vLLM, Ollama, llama.cpp, LM Studio,
//! and Azure OpenAI's v1 API ([`AZURE`]: the same wire format at the resource's endpoint).
//!
//! Unary calls ask for a plain JSON completion; streaming calls ask for Server-Sent Events with
//! `stream_options.include_usage`, so streamed answers still report tokens. The HTTP side (key,
//! limits, failures) is [`super::http`]'s, shared with the other HTTP providers.
//!
//! Tools, tool calls, images, response formats, reasoning and extensions: see [`wire`], which
//! holds the wire format both ways. Streamed tool calls are passed on as deltas by their index;
//! the gateway (and a unary call here) joins the fragments.

#[cfg(test)]
mod golden;
pub mod wire;

use std::collections::VecDeque;

use llmesh_proto::{
    assemble::MAX_ITEMS,
    common::v1::{FinishReason, Usage},
};

use super::{
    Event,
    error::{Kind, UpstreamError},
    http::{Api, Auth, Decoder, estimate, malformed},
};

/// How OpenAI's API is called, and any OpenAI-compatible server's.
pub const OPENAI: Api = Api {
    name: "openai",
    base_url: "https://api.openai.com/v1",
    path: "/chat/completions",
    stream_path: "",
    api_key_env: "OPENAI_API_KEY",
    auth: Auth::Bearer,
    headers: &[],
};

/// How Azure OpenAI's v1 API is called: the resource's endpoint (`https://NAME.openai.azure.com`,
/// no default), the deployment's name as the model, the key as `api-key`.
pub const AZURE: Api = Api {
    name: "azure",
    base_url: "",
    path: "/openai/v1/chat/completions",
    stream_path: "",
    api_key_env: "AZURE_OPENAI_API_KEY",
    auth: Auth::Header("api-key"),
    headers: &[],
};

/// A unary completion's events.
pub fn read_completion(body: &[u8], prompt_tokens: u32) -> Result<Vec<Event>, UpstreamError> {
    let completion = serde_json::from_slice::<wire::Completion>(body)
        .map_err(|e| malformed(format_args!("the completion is not valid JSON: {e}")))?;
    completion_events(completion, prompt_tokens)
}

/// A unary completion's events: reasoning, text, tool calls (whole, one delta each), extensions,
/// the finish.
fn completion_events(completion: wire::Completion, prompt_tokens: u32) -> Result<Vec<Event>, UpstreamError> {
    let wire::Completion { choices, usage, rest } = completion;
    let choice = choices.into_iter().next();
    let reason = wire::finish_reason(choice.as_ref().and_then(|c| c.finish_reason.as_deref()));
    let mut message = choice.and_then(|c| c.message).unwrap_or_default();
    let mut events = Vec::new();
    let mut completion_chars = 0;
    if let Some(reasoning) = message.reasoning_text() {
        completion_chars += reasoning.chars().count();
        events.push(Event::Reasoning(wire::reasoning_delta(reasoning)));
    }
    let text = message.text().unwrap_or_default();
    completion_chars += text.chars().count();
    events.push(Event::Delta(text));
    if message.tool_calls.len() > MAX_ITEMS {
        return Err(UpstreamError::new(
            Kind::Malformed,
            format!("{} tool calls in one answer", message.tool_calls.len()),
        ));
    }
    for (call, index) in message.tool_calls.into_iter().zip(0u32..) {
        let mut delta = wire::tool_call_delta(call, index);
        delta.index = index;
        completion_chars += delta.arguments.chars().count();
        events.push(Event::ToolCall(delta));
    }
    if let Some(extensions) = wire::extensions(rest) {
        events.push(Event::Extensions(extensions));
    }
    let usage = usage.map_or_else(|| estimate(prompt_tokens, completion_chars), Usage::from);
    events.push(Event::Finish { reason, usage });
    Ok(events)
}

/// The chunks of a streamed completion.
pub struct Chunks {
    prompt_tokens: u32,
    /// Tool calls begun so far: the index of a call whose chunks give none.
    tool_calls: u32,
    extensions: Option<llmesh_proto::common::v1::Extensions>,
    completion_chars: usize,
    reason: Option<FinishReason>,
    usage: Option<Usage>,
}

impl Chunks {
    pub fn new(prompt_tokens: u32) -> Self {
        Self { prompt_tokens, tool_calls: 0, extensions: None, completion_chars: 0, reason: None, usage: None }
    }

    fn finish(&mut self, out: &mut VecDeque<Event>) {
        let usage = self.usage.unwrap_or_else(|| estimate(self.prompt_tokens, self.completion_chars));
        let reason = self.reason.unwrap_or(FinishReason::Stop);
        if let Some(extensions) = self.extensions.take() {
            out.push_back(Event::Extensions(extensions));
        }
        out.push_back(Event::Finish { reason, usage });
    }
}

impl Decoder for Chunks {
    fn event(&mut self, data: &str, out: &mut VecDeque<Event>) -> Result<bool, UpstreamError> {
        if data.trim() == "[DONE]" {
            self.finish(out);
            return Ok(true);
        }
        let chunk: wire::Chunk = serde_json::from_str(data).map_err(|error| {
            let shown: String = data.chars().take(80).collect();
            malformed(format_args!("chunk {shown:?} is not a completion chunk: {error}"))
        })?;
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage.into());
        }
        if let Some(extensions) = wire::extensions(chunk.rest) {
            self.extensions = Some(extensions);
        }
        for choice in chunk.choices.into_iter().take(1) {
            let mut delta = choice.delta.unwrap_or_default();
            if let Some(reasoning) = delta.reasoning_text() {
                self.completion_chars += reasoning.chars().count();
                out.push_back(Event::Reasoning(wire::reasoning_delta(reasoning)));
            }
            if let Some(text) = delta.text() {
                self.completion_chars += text.chars().count();
                out.push_back(Event::Delta(text));
            }
            for call in delta.tool_calls {
                // A call without an index: a new one when it has an id, else the last one's.
                let fallback = if call.id.is_some() { self.tool_calls } else { self.tool_calls.saturating_sub(1) };
                let delta = wire::tool_call_delta(call, fallback);
                if delta.index as usize >= MAX_ITEMS {
                    return Err(malformed(format_args!("tool call index {} past {MAX_ITEMS}", delta.index)));
                }
                self.tool_calls = self.tool_calls.max(delta.index + 1);
                self.completion_chars += delta.arguments.chars().count();
                out.push_back(Event::ToolCall(delta));
            }
            if let Some(reason) = choice.finish_reason {
                self.reason = Some(wire::finish_reason(Some(&reason)));
            }
        }
        Ok(false)
    }

    fn end(&mut self, out: &mut VecDeque<Event>) -> Result<(), UpstreamError> {
        if self.reason.is_none() {
            return Err(UpstreamError::new(Kind::Unfinished, "the body ended without [DONE] or a finish"));
        }
        self.finish(out);
        Ok(())
    }
}

//! Anthropic's Messages API, natively: `POST {base_url}/v1/messages` with `x-api-key` and
//! `anthropic-version: 2023-06-01` (the model's `headers` add `anthropic-beta` or replace the
//! version). What an Anthropic client sent that llmesh does not act on reaches the upstream as it
//! came; the rest of the contract is translated ([`wire`]).
//!
//! Unary calls read the whole message; streaming calls read Anthropic's events
//! (`message_start`, `content_block_start` / `_delta` / `_stop`, `message_delta`,
//! `message_stop`): text deltas as text, `input_json_delta` fragments as a tool call's arguments
//! by the call's index, `thinking_delta` and `signature_delta` as reasoning. An `error` event is the
//! upstream's failure (`overloaded_error` UNAVAILABLE, `rate_limit_error` RESOURCE_EXHAUSTED, ...);
//! the HTTP side (key, limits, status codes, the 529 of an overloaded API) is [`super::http`]'s.

#[cfg(test)]
mod golden;
pub mod wire;

use std::collections::{BTreeMap, VecDeque};

use llmesh_proto::{
    assemble::MAX_ITEMS,
    common::v1::{Extensions, FinishReason},
};

use super::{
    Event,
    error::{Kind, UpstreamError},
    http::{Api, Auth, Decoder, estimate, malformed},
};

/// How Anthropic's API is called.
pub const API: Api = Api {
    name: "anthropic",
    base_url: "https://api.anthropic.com",
    path: "/v1/messages",
    stream_path: "",
    api_key_env: "ANTHROPIC_API_KEY",
    auth: Auth::Header("x-api-key"),
    headers: &[("anthropic-version", "2023-06-01")],
};

/// A unary message's events: reasoning blocks, the text, tool calls (whole, one delta each),
/// extensions, the finish.
pub fn read_message(body: &[u8], prompt_tokens: u32) -> Result<Vec<Event>, UpstreamError> {
    let answer = wire::answer(body).map_err(|e| malformed(format_args!("the message is not valid JSON: {e}")))?;
    let mut events = Vec::new();
    let mut text = String::new();
    let (mut reasoning, mut calls) = (0u32, 0u32);
    for block in answer.content {
        match block.kind.as_str() {
            "text" => text.push_str(block.text.as_deref().unwrap_or_default()),
            "thinking" | "redacted_thinking" => {
                let mut delta = wire::reasoning_delta(reasoning);
                delta.text = block.thinking.unwrap_or_default();
                delta.signature = block.signature.unwrap_or_default().into_bytes();
                delta.redacted_content = block.data.unwrap_or_default().into_bytes();
                events.push(Event::Reasoning(delta));
                reasoning += 1;
            }
            "tool_use" => {
                let mut delta = wire::tool_call_delta(calls);
                delta.id = block.id.unwrap_or_default();
                delta.name = block.name.unwrap_or_default();
                delta.arguments = block.input.map_or_else(|| "{}".to_owned(), |input| input.get().to_owned());
                events.push(Event::ToolCall(delta));
                calls += 1;
            }
            // Server tools' blocks and what the API adds: nothing the contract holds.
            _ => {}
        }
        if events.len() > 2 * MAX_ITEMS {
            return Err(malformed(format_args!("more than {} blocks in one message", 2 * MAX_ITEMS)));
        }
    }
    let completion_chars = text.chars().count()
        + events
            .iter()
            .map(|event| match event {
                Event::Reasoning(delta) => delta.text.chars().count(),
                Event::ToolCall(delta) => delta.arguments.chars().count(),
                _ => 0,
            })
            .sum::<usize>();
    // The text goes after the reasoning and before the calls, as the events of a stream would.
    let at = events.iter().position(|e| matches!(e, Event::ToolCall(_))).unwrap_or(events.len());
    events.insert(at, Event::Delta(text));
    if let Some(extensions) = answer.extensions {
        events.push(Event::Extensions(extensions));
    }
    let usage =
        answer.usage.and_then(wire::WireUsage::usage).unwrap_or_else(|| estimate(prompt_tokens, completion_chars));
    events.push(Event::Finish { reason: wire::finish_reason(answer.stop_reason.as_deref()), usage });
    Ok(events)
}

/// What a content block of a stream is, by the block's index.
#[derive(Debug, Clone, Copy)]
enum Open {
    Text,
    /// A tool call: its index among the answer's calls, and whether any of its input came.
    Tool {
        call: u32,
        input: bool,
    },
    /// A reasoning block: its index among the answer's.
    Reasoning {
        block: u32,
    },
    /// A block the contract does not hold: its deltas are skipped.
    Skipped,
}

/// The events of a streamed message.
pub struct Events {
    prompt_tokens: u32,
    blocks: BTreeMap<u32, Open>,
    tool_calls: u32,
    reasoning: u32,
    completion_chars: usize,
    usage: wire::WireUsage,
    reason: Option<FinishReason>,
    extensions: Option<Extensions>,
}

impl Events {
    pub fn new(prompt_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            blocks: BTreeMap::new(),
            tool_calls: 0,
            reasoning: 0,
            completion_chars: 0,
            usage: wire::WireUsage::default(),
            reason: None,
            extensions: None,
        }
    }

    fn start(
        &mut self,
        index: u32,
        block: wire::AnswerBlock<'_>,
        out: &mut VecDeque<Event>,
    ) -> Result<(), UpstreamError> {
        if self.blocks.len() >= 2 * MAX_ITEMS {
            return Err(malformed(format_args!("more than {} blocks in one message", 2 * MAX_ITEMS)));
        }
        let open = match block.kind.as_str() {
            "text" => {
                if let Some(text) = block.text.filter(|t| !t.is_empty()) {
                    self.completion_chars += text.chars().count();
                    out.push_back(Event::Delta(text));
                }
                Open::Text
            }
            "tool_use" => {
                let mut delta = wire::tool_call_delta(self.tool_calls);
                delta.id = block.id.unwrap_or_default();
                delta.name = block.name.unwrap_or_default();
                out.push_back(Event::ToolCall(delta));
                self.tool_calls += 1;
                Open::Tool { call: self.tool_calls - 1, input: false }
            }
            "thinking" | "redacted_thinking" => {
                let mut delta = wire::reasoning_delta(self.reasoning);
                delta.text = block.thinking.unwrap_or_default();
                delta.signature = block.signature.unwrap_or_default().into_bytes();
                delta.redacted_content = block.data.unwrap_or_default().into_bytes();
                self.completion_chars += delta.text.chars().count();
                // The block's first delta says where it starts only when it holds something.
                if delta != wire::reasoning_delta(self.reasoning) {
                    out.push_back(Event::Reasoning(delta));
                }
                self.reasoning += 1;
                Open::Reasoning { block: self.reasoning - 1 }
            }
            _ => Open::Skipped,
        };
        self.blocks.insert(index, open);
        Ok(())
    }

    fn delta(&mut self, index: u32, delta: wire::Delta, out: &mut VecDeque<Event>) -> Result<(), UpstreamError> {
        let Some(open) = self.blocks.get_mut(&index) else {
            return Err(malformed(format_args!("a delta of block {index}, which never started")));
        };
        match (open, delta) {
            (Open::Text, wire::Delta::Text { text }) => {
                self.completion_chars += text.chars().count();
                out.push_back(Event::Delta(text));
            }
            (Open::Tool { call, input }, wire::Delta::InputJson { partial_json }) if !partial_json.is_empty() => {
                *input = true;
                self.completion_chars += partial_json.chars().count();
                let mut delta = wire::tool_call_delta(*call);
                delta.arguments = partial_json;
                out.push_back(Event::ToolCall(delta));
            }
            (Open::Reasoning { block }, wire::Delta::Thinking { thinking }) => {
                self.completion_chars += thinking.chars().count();
                let mut delta = wire::reasoning_delta(*block);
                delta.text = thinking;
                out.push_back(Event::Reasoning(delta));
            }
            (Open::Reasoning { block }, wire::Delta::Signature { signature }) => {
                let mut delta = wire::reasoning_delta(*block);
                delta.signature = signature.into_bytes();
                out.push_back(Event::Reasoning(delta));
            }
            // Citations, a skipped block's deltas, what the API adds.
            _ => {}
        }
        Ok(())
    }

    /// A block ended: a tool call whose input never came has `{}`, the input of a tool without
    /// parameters (the contract's arguments are JSON text).
    fn stop(&mut self, index: u32, out: &mut VecDeque<Event>) {
        if let Some(Open::Tool { call, input: false }) = self.blocks.get(&index) {
            let mut delta = wire::tool_call_delta(*call);
            delta.arguments = "{}".into();
            out.push_back(Event::ToolCall(delta));
        }
    }

    fn finish(&mut self, out: &mut VecDeque<Event>) {
        let usage = self.usage.usage().unwrap_or_else(|| estimate(self.prompt_tokens, self.completion_chars));
        if let Some(extensions) = self.extensions.take() {
            out.push_back(Event::Extensions(extensions));
        }
        out.push_back(Event::Finish { reason: self.reason.unwrap_or(FinishReason::Stop), usage });
    }
}

impl Decoder for Events {
    fn event(&mut self, data: &str, out: &mut VecDeque<Event>) -> Result<bool, UpstreamError> {
        let event = wire::stream_event(data).map_err(|error| {
            let shown: String = data.chars().take(80).collect();
            malformed(format_args!("event {shown:?} is not a message event: {error}"))
        })?;
        match event {
            wire::StreamEvent::MessageStart(message) => {
                self.usage = self.usage.update(message.usage.unwrap_or_default());
                self.extensions = wire::extensions(message.rest);
            }
            wire::StreamEvent::ContentBlockStart { index, block } => self.start(index, block, out)?,
            wire::StreamEvent::ContentBlockDelta { index, delta } => self.delta(index, delta, out)?,
            wire::StreamEvent::ContentBlockStop { index } => self.stop(index, out),
            wire::StreamEvent::MessageDelta { stop_reason, usage } => {
                if let Some(reason) = stop_reason {
                    self.reason = Some(wire::finish_reason(Some(&reason)));
                }
                self.usage = self.usage.update(usage.unwrap_or_default());
            }
            wire::StreamEvent::MessageStop => {
                self.finish(out);
                return Ok(true);
            }
            wire::StreamEvent::Error(error) => return Err(stream_error(error)),
            wire::StreamEvent::Other => {}
        }
        Ok(false)
    }

    fn end(&mut self, out: &mut VecDeque<Event>) -> Result<(), UpstreamError> {
        if self.reason.is_none() {
            return Err(UpstreamError::new(Kind::Unfinished, "the body ended without message_stop or a stop reason"));
        }
        self.finish(out);
        Ok(())
    }
}

/// An `error` event, as the HTTP status of the same error type would have been.
fn stream_error(error: wire::WireError) -> UpstreamError {
    let kind = match error.kind.as_str() {
        "rate_limit_error" => Kind::RateLimited { retry_after_ms: None },
        "invalid_request_error" => Kind::Rejected { http: 400 },
        "request_too_large" => Kind::Rejected { http: 413 },
        "authentication_error" => Kind::Unauthorized { http: 401 },
        "permission_error" => Kind::Unauthorized { http: 403 },
        "not_found_error" => Kind::NoSuchModel,
        "overloaded_error" => Kind::Failed { http: 529 },
        "timeout_error" => Kind::Failed { http: 504 },
        _ => Kind::Failed { http: 500 },
    };
    let message: String = error.message.chars().take(200).collect();
    UpstreamError::new(kind, format!("error event {}: {message}", error.kind.chars().take(40).collect::<String>()))
}

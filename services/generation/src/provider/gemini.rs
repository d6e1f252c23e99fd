//! Google's Gemini API, natively: `POST {base_url}/v1beta/models/{model}:generateContent`, or
//! `:streamGenerateContent?alt=sse` for a stream, with the key as `x-goog-api-key`
//! (`GEMINI_API_KEY` by default). The contract is translated by [`wire`].
//!
//! A streamed answer is a series of whole responses, each with the next parts; the last carries
//! the finish reason and the usage. A function call arrives whole, in one part. Gemini ends the
//! stream by closing it: a body that ends without a finish reason is unfinished. An `error` in a
//! response is the failure its HTTP code names; the HTTP side is [`super::http`]'s.

#[cfg(test)]
mod golden;
pub mod wire;

use std::collections::VecDeque;

use llmesh_proto::{
    assemble::MAX_ITEMS,
    common::v1::{Extensions, FinishReason, ReasoningDelta, ToolCallDelta},
};

use super::{
    Event,
    error::{Kind, UpstreamError},
    http::{Api, Auth, Decoder, estimate, malformed, status_kind},
};

/// How the Gemini API is called.
pub const API: Api = Api {
    name: "gemini",
    base_url: "https://generativelanguage.googleapis.com",
    path: "/v1beta/models/{model}:generateContent",
    stream_path: "/v1beta/models/{model}:streamGenerateContent?alt=sse",
    api_key_env: "GEMINI_API_KEY",
    auth: Auth::Header("x-goog-api-key"),
    headers: &[],
};

/// A unary response's events: read as a stream of one response.
pub fn read_response(body: &[u8], prompt_tokens: u32) -> Result<Vec<Event>, UpstreamError> {
    let mut responses = Responses::new(prompt_tokens);
    let mut out = VecDeque::new();
    responses.read(body, &mut out)?;
    responses.end(&mut out)?;
    Ok(out.into())
}

/// The responses of one answer, read one after the other.
pub struct Responses {
    prompt_tokens: u32,
    tool_calls: u32,
    completion_chars: usize,
    reason: Option<String>,
    blocked: bool,
    usage: Option<wire::WireUsage>,
    extensions: Option<Extensions>,
}

impl Responses {
    pub fn new(prompt_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            tool_calls: 0,
            completion_chars: 0,
            reason: None,
            blocked: false,
            usage: None,
            extensions: None,
        }
    }

    fn read(&mut self, body: &[u8], out: &mut VecDeque<Event>) -> Result<(), UpstreamError> {
        let response = wire::response(body).map_err(|error| {
            let shown: String = String::from_utf8_lossy(body).chars().take(80).collect();
            malformed(format_args!("response {shown:?} is not a Gemini response: {error}"))
        })?;
        if let Some(error) = response.error {
            return Err(response_error(error));
        }
        for part in response.parts {
            if let Some(call) = part.function_call {
                if self.tool_calls as usize >= MAX_ITEMS {
                    return Err(malformed(format_args!("more than {MAX_ITEMS} function calls in one answer")));
                }
                let index = self.tool_calls;
                let arguments = call.args.map_or_else(|| "{}".to_owned(), |args| args.get().to_owned());
                self.completion_chars += arguments.chars().count();
                out.push_back(Event::ToolCall(ToolCallDelta {
                    index,
                    id: call.id.filter(|id| !id.is_empty()).unwrap_or_else(|| format!("call_{index}")),
                    name: call.name.unwrap_or_default(),
                    arguments,
                    signature: part.thought_signature.as_deref().map(wire::signature).unwrap_or_default(),
                }));
                self.tool_calls += 1;
            } else if part.thought == Some(true) {
                let text = part.text.unwrap_or_default();
                self.completion_chars += text.chars().count();
                let signature = part.thought_signature.as_deref().map(wire::signature).unwrap_or_default();
                out.push_back(Event::Reasoning(ReasoningDelta { index: 0, text, signature, ..Default::default() }));
            } else if let Some(text) = part.text.filter(|t| !t.is_empty()) {
                self.completion_chars += text.chars().count();
                out.push_back(Event::Delta(text));
            }
        }
        if response.finish_reason.is_some() {
            self.reason = response.finish_reason;
        }
        self.blocked |= response.blocked;
        if response.usage.is_some() {
            self.usage = response.usage;
        }
        if response.extensions.is_some() {
            self.extensions = response.extensions;
        }
        Ok(())
    }

    fn reason(&self) -> Option<FinishReason> {
        if self.blocked {
            return Some(FinishReason::ContentFilter);
        }
        self.reason.as_deref().map(|reason| wire::finish_reason(Some(reason), self.tool_calls > 0))
    }
}

impl Decoder for Responses {
    fn event(&mut self, data: &str, out: &mut VecDeque<Event>) -> Result<bool, UpstreamError> {
        self.read(data.as_bytes(), out)?;
        Ok(false)
    }

    fn end(&mut self, out: &mut VecDeque<Event>) -> Result<(), UpstreamError> {
        let Some(reason) = self.reason() else {
            return Err(UpstreamError::new(Kind::Unfinished, "the answer ended without a finish reason"));
        };
        let usage = self
            .usage
            .and_then(wire::WireUsage::usage)
            .unwrap_or_else(|| estimate(self.prompt_tokens, self.completion_chars));
        if let Some(extensions) = self.extensions.take() {
            out.push_back(Event::Extensions(extensions));
        }
        out.push_back(Event::Finish { reason, usage });
        Ok(())
    }
}

/// An `error` in a response, as its HTTP code would have been.
fn response_error(error: wire::WireError) -> UpstreamError {
    // An error without a code is a server's.
    let http = if error.code == 0 { 500 } else { error.code };
    let kind = status_kind(http, None);
    let message: String = error.message.chars().take(200).collect();
    UpstreamError::new(kind, format!("error {http} {}: {message}", error.status.chars().take(40).collect::<String>()))
}

//! Validation of generation requests. Every rule answers INVALID_ARGUMENT with a message that
//! starts with the field name, so a client can tell what to fix.

use llmesh_proto::{common::v1::CachePolicy, generation::v1::GenerateRequest};
use serde::{Deserialize, Serialize};
use tonic::Status;

pub const ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer"];

/// Size limits on what a client may ask for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Highest `max_tokens` a request may ask for.
    pub max_tokens: u32,
    /// `max_tokens` used when a request leaves it at 0.
    pub default_max_tokens: u32,
    /// Largest prompt (or sum of message contents), in bytes.
    pub max_prompt_bytes: usize,
    pub max_messages: usize,
    pub max_stop_sequences: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tokens: 4096,
            default_max_tokens: 256,
            max_prompt_bytes: 64 * 1024,
            max_messages: 256,
            max_stop_sequences: 4,
        }
    }
}

/// Checks `request` against `limits`. The model name is only checked for presence here; whether it
/// exists is for the service that routes it.
pub fn generate_request(request: &GenerateRequest, limits: &Limits) -> Result<(), Status> {
    let invalid = |msg: String| Err(Status::invalid_argument(msg));

    if request.model.trim().is_empty() {
        return invalid("model: required (ListModels lists the available models)".into());
    }
    match (request.prompt.is_empty(), request.messages.is_empty()) {
        (true, true) => return invalid("prompt: required (or messages)".into()),
        (false, false) => return invalid("prompt: set prompt or messages, not both".into()),
        (false, true) if request.prompt.trim().is_empty() => {
            return invalid("prompt: must not be blank".into());
        }
        _ => {}
    }
    if request.messages.len() > limits.max_messages {
        return invalid(format!(
            "messages: {} messages exceed the limit of {}",
            request.messages.len(),
            limits.max_messages
        ));
    }
    for (i, message) in request.messages.iter().enumerate() {
        if !ROLES.contains(&message.role.as_str()) {
            return invalid(format!("messages[{i}].role: {:?} is not one of {}", message.role, ROLES.join(", ")));
        }
    }
    if !request.messages.is_empty() && request.messages.iter().all(|m| m.content.trim().is_empty()) {
        return invalid("messages: every message content is blank".into());
    }
    let prompt_bytes = prompt_bytes(request);
    if prompt_bytes > limits.max_prompt_bytes {
        return invalid(format!("prompt: {prompt_bytes} bytes exceed the limit of {} bytes", limits.max_prompt_bytes));
    }
    if request.max_tokens > limits.max_tokens {
        return invalid(format!("max_tokens: {} exceeds the limit of {}", request.max_tokens, limits.max_tokens));
    }
    if let Some(t) = request.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return invalid(format!("temperature: {t} is outside 0..=2"));
    }
    if let Some(p) = request.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return invalid(format!("top_p: {p} is outside (0, 1]"));
    }
    if request.stop.len() > limits.max_stop_sequences {
        return invalid(format!(
            "stop: {} sequences exceed the limit of {}",
            request.stop.len(),
            limits.max_stop_sequences
        ));
    }
    if request.stop.iter().any(String::is_empty) {
        return invalid("stop: sequences must not be empty".into());
    }
    if CachePolicy::try_from(request.cache).is_err() {
        return invalid(format!("cache: {} is not a known cache policy", request.cache));
    }
    Ok(())
}

/// Bytes of prompt text the request carries.
pub fn prompt_bytes(request: &GenerateRequest) -> usize {
    request.prompt.len() + request.messages.iter().map(|m| m.content.len()).sum::<usize>()
}

/// About four characters a token (the usual rule of thumb for English text): what llmesh counts
/// where no tokenizer has counted (reservations before a call, text streamed to a client that went
/// away, usage an upstream did not report).
pub fn estimated_tokens(chars: usize) -> u32 {
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

/// The `max_tokens` to use: the request's, or the default when it left it at 0.
pub fn effective_max_tokens(request: &GenerateRequest, limits: &Limits) -> u32 {
    if request.max_tokens == 0 { limits.default_max_tokens } else { request.max_tokens }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmesh_proto::common::v1::ChatMessage;
    use tonic::Code;

    fn ok() -> GenerateRequest {
        GenerateRequest { model: "sim".into(), prompt: "hello".into(), ..Default::default() }
    }

    fn rejects(request: GenerateRequest, field: &str) {
        let status = generate_request(&request, &Limits::default()).expect_err("should be rejected");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{:?} does not name {field}", status.message());
    }

    #[test]
    fn accepts_a_plain_request() {
        assert!(generate_request(&ok(), &Limits::default()).is_ok());
    }

    #[test]
    fn names_the_field_at_fault() {
        rejects(GenerateRequest { model: String::new(), ..ok() }, "model");
        rejects(GenerateRequest { prompt: String::new(), ..ok() }, "prompt");
        rejects(GenerateRequest { prompt: "   ".into(), ..ok() }, "prompt");
        let message = ChatMessage { role: "user".into(), content: "hi".into() };
        rejects(GenerateRequest { messages: vec![message.clone()], ..ok() }, "prompt");
        let bad_role = ChatMessage { role: "robot".into(), content: "hi".into() };
        rejects(GenerateRequest { prompt: String::new(), messages: vec![bad_role], ..ok() }, "messages[0].role");
        rejects(GenerateRequest { prompt: "x".repeat(64 * 1024 + 1), ..ok() }, "prompt");
        rejects(GenerateRequest { max_tokens: 4097, ..ok() }, "max_tokens");
        rejects(GenerateRequest { temperature: Some(2.5), ..ok() }, "temperature");
        rejects(GenerateRequest { temperature: Some(f32::NAN), ..ok() }, "temperature");
        rejects(GenerateRequest { top_p: Some(0.0), ..ok() }, "top_p");
        rejects(GenerateRequest { stop: vec![String::new()], ..ok() }, "stop");
        rejects(GenerateRequest { stop: vec!["a".into(); 5], ..ok() }, "stop");
        rejects(GenerateRequest { cache: 99, ..ok() }, "cache");
    }

    #[test]
    fn messages_alone_are_fine() {
        let message = ChatMessage { role: "user".into(), content: "hi".into() };
        let request = GenerateRequest { prompt: String::new(), messages: vec![message], ..ok() };
        assert!(generate_request(&request, &Limits::default()).is_ok());
    }
}

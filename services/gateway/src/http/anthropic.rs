//! Anthropic's Messages API: `POST /v1/messages`, as the official SDKs call it (`x-api-key`;
//! `anthropic-version` and `anthropic-beta` are accepted and need nothing).
//!
//! Request fields taken: `model`, `max_tokens` (required, as Anthropic requires it), `system` (a
//! string or text blocks), `messages` (roles user, assistant and system; content as a string or
//! blocks: text, image, document, tool_use, tool_result, thinking, redacted_thinking, with their
//! `cache_control` kept), `tools`, `tool_choice`, `thinking` ([`super::anthropic_content`]),
//! `temperature`, `top_p`, `stop_sequences`, `metadata.user_id`, `stream`. Any other top-level
//! field (`top_k`, `output_config`, `context_management`, ...) is carried as the request's
//! `anthropic` extensions (into the cache key; dropped by the providers llmesh has, which speak
//! other dialects) and named in `x-llmesh-unmapped-fields`; an unknown block is a 400 naming it. With
//! `stream: true` the events are Anthropic's: `message_start`, `content_block_start`, `ping`,
//! `content_block_delta`…, `content_block_stop`, `message_delta` (stop reason and usage),
//! `message_stop`; a failure mid-way is an `error` event.

use http::{StatusCode, request::Parts};
use llmesh_proto::validate;
use llmesh_proto::{
    common::v1::{ChatMessage, FinishReason, Usage},
    gateway::v1::GenerateStreamResponse,
    generation::v1::GenerateRequest,
};
use serde_json::{Value, json};
use tonic::body::Body;

use super::{
    Class, Facts, Fields, Ingress, Problem, Unmapped, anthropic_content as content, finish_reason, json_response,
    sse::{self, Events},
};
use crate::service::Unary;

/// The one mapping of a failure to Anthropic's error body (its status is [`Class::http_status`]).
pub fn error(problem: &Problem) -> http::Response<Body> {
    problem.respond(
        &json!({ "type": "error", "error": { "type": error_type(problem.class), "message": problem.message } }),
    )
}

/// Anthropic's error `type` for a failure.
fn error_type(class: Class) -> &'static str {
    match class {
        Class::InvalidRequest | Class::MethodNotAllowed => "invalid_request_error",
        Class::Unauthenticated => "authentication_error",
        Class::PermissionDenied => "permission_error",
        Class::NotFound => "not_found_error",
        Class::TooLarge => "request_too_large",
        Class::RateLimited | Class::OverBudget => "rate_limit_error",
        Class::Overloaded => "overloaded_error",
        Class::Timeout { .. } => "timeout_error",
        Class::Unavailable | Class::Cancelled | Class::Internal => "api_error",
    }
}

/// Text blocks, or a string: the text.
fn text(value: Value, path: String) -> Result<String, Problem> {
    match value {
        Value::String(text) => Ok(text),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (i, block) in blocks.into_iter().enumerate() {
                let at = format!("{path}[{i}]");
                let Value::Object(block) = block else { return Err(Problem::invalid(at, "must be an object")) };
                let mut block = Fields::within(block, at.clone());
                let kind: String = block.take("type")?.unwrap_or_default();
                if kind != "text" {
                    return Err(Problem::invalid(
                        format!("{at}.type"),
                        format_args!("{kind:?} blocks are not supported by llmesh (only \"text\")"),
                    ));
                }
                let text: String = block.required("text")?;
                block.ignore("cache_control");
                block.ignore("citations");
                block.finish()?;
                texts.push(text);
            }
            Ok(texts.join("\n"))
        }
        _ => Err(Problem::invalid(path, "must be a string or a list of text blocks")),
    }
}

/// A messages request, parsed.
fn parse(mut body: Fields, cache: i32) -> Result<(GenerateRequest, bool, Unmapped), Problem> {
    let model: String = body.required("model")?;
    let max_tokens: u32 = body.required("max_tokens")?;
    if max_tokens == 0 {
        return Err(Problem::invalid("max_tokens", "must be at least 1"));
    }
    let mut messages = Vec::new();
    if let Some(system) = body.take::<Value>("system")? {
        messages.push(ChatMessage {
            role: "system".into(),
            content: text(system, "system".into())?,
            ..Default::default()
        });
    }
    let listed = body.objects("messages")?.ok_or_else(|| Problem::invalid("messages", "required"))?;
    for mut message in listed {
        let role: String = message.required("role")?;
        // Coding agents put a `system` turn inside the conversation too.
        if role != "user" && role != "assistant" && role != "system" {
            return Err(Problem::invalid(
                message.path("role"),
                format_args!("{role:?} is not one of user, assistant, system"),
            ));
        }
        let path = message.path("content");
        content::message(&role, message.required("content")?, &path, &mut messages)?;
        message.finish()?;
    }
    let tools = content::tools(&mut body)?;
    let (tool_choice, parallel_tool_calls) = content::tool_choice(&mut body)?;
    let reasoning = content::thinking(&mut body)?;
    let user = match body.object("metadata")? {
        None => String::new(),
        Some(mut metadata) => {
            let user = metadata.take::<String>("user_id")?.unwrap_or_default();
            metadata.finish()?;
            user
        }
    };
    let stream = body.take::<bool>("stream")?.unwrap_or(false);
    let request = GenerateRequest {
        model,
        messages,
        max_tokens,
        temperature: body.take("temperature")?,
        top_p: body.take("top_p")?,
        stop: body.take("stop_sequences")?.unwrap_or_default(),
        user,
        cache,
        tools,
        tool_choice,
        parallel_tool_calls,
        reasoning,
        ..Default::default()
    };
    // What is left is carried, not refused: a field Anthropic adds next month reaches an Anthropic
    // upstream (none yet: for the others it is dropped, and the header says so).
    let unmapped = Unmapped::of(body.rest_map(), "anthropic");
    let request = GenerateRequest { extensions: unmapped.extensions.clone(), ..request };
    Ok((request, stream, unmapped))
}

/// Anthropic's name of a finish reason.
fn stop_reason(value: i32) -> &'static str {
    match finish_reason(value) {
        FinishReason::Length => "max_tokens",
        FinishReason::ContentFilter => "refusal",
        FinishReason::ToolCalls => "tool_use",
        FinishReason::Stop | FinishReason::Fallback | FinishReason::Unspecified => "end_turn",
    }
}

fn usage(usage: Option<Usage>) -> Value {
    content::usage(usage)
}

fn message_id(id: &str) -> String {
    format!("msg_{id}")
}

/// `POST /v1/messages`.
pub async fn messages(ingress: &Ingress, parts: Parts, body: Body) -> Result<http::Response<Body>, Problem> {
    let deadline = ingress.deadline(&parts.headers)?;
    let cache = Ingress::cache_policy(&parts.headers)?;
    let (request, stream, unmapped) = parse(ingress.json(body, deadline).await?, cache)?;
    let model = request.model.clone();
    if stream {
        let input_tokens = validate::estimated_tokens(validate::prompt_bytes(&request));
        let streamed = ingress
            .gateway()
            .stream(&parts.extensions, request, deadline)
            .await
            .map_err(|e| ingress.call_problem(e, Some(&model), deadline))?;
        let (first, chunks) = Ingress::first_chunk(streamed.chunks, deadline).await?;
        let mut headers = http::HeaderMap::new();
        let facts = Facts {
            id: &first.id,
            cached: first.cached,
            provider: &first.provider,
            degraded: first.degraded.as_ref(),
            quota: streamed.quota,
        };
        facts.write(&mut headers);
        unmapped.write(&mut headers);
        let events = MessageEvents { input_tokens, open_block: 0, tool_blocks: Vec::new() };
        return Ok(sse::response(&first, chunks, events, deadline, headers));
    }
    let Unary { response, quota } = ingress
        .gateway()
        .unary(&parts.extensions, request, deadline, "/v1/messages")
        .await
        .map_err(|e| ingress.call_problem(e, Some(&model), deadline))?;
    let body = json!({
        "id": message_id(&response.id),
        "type": "message",
        "role": "assistant",
        "model": response.model,
        "content": content::blocks(&response.text, &response.tool_calls, &response.reasoning),
        "stop_reason": stop_reason(response.finish_reason),
        "stop_sequence": null,
        "usage": usage(response.usage),
    });
    let mut http = json_response(StatusCode::OK, &body);
    let facts = Facts {
        id: &response.id,
        cached: response.cached,
        provider: &response.provider,
        degraded: response.degraded.as_ref(),
        quota,
    };
    facts.write(http.headers_mut());
    unmapped.write(http.headers_mut());
    Ok(http)
}

/// Anthropic's stream events: a text block (index 0), then a `tool_use` block per tool call.
struct MessageEvents {
    /// The prompt's estimated tokens, for `message_start` (the real count comes with
    /// `message_delta`).
    input_tokens: u32,
    /// The index of the block open now.
    open_block: u32,
    /// The block index of each tool call, by the call's index.
    tool_blocks: Vec<(u32, u32)>,
}

impl MessageEvents {
    /// The block of tool call `index`: opened (closing the one before) on its first delta.
    fn tool_block(&mut self, index: u32, id: &str, name: &str, out: &mut Vec<u8>) -> u32 {
        if let Some((_, block)) = self.tool_blocks.iter().find(|(call, _)| *call == index) {
            return *block;
        }
        sse::event("content_block_stop", &json!({ "type": "content_block_stop", "index": self.open_block }), out);
        self.open_block += 1;
        let block = self.open_block;
        self.tool_blocks.push((index, block));
        let start = json!({
            "type": "content_block_start", "index": block,
            "content_block": { "type": "tool_use", "id": id, "name": name, "input": {} },
        });
        sse::event("content_block_start", &start, out);
        block
    }
}

impl Events for MessageEvents {
    fn open(&mut self, first: &GenerateStreamResponse, out: &mut Vec<u8>) {
        let message = json!({
            "id": message_id(&first.id), "type": "message", "role": "assistant", "model": first.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": { "input_tokens": self.input_tokens, "output_tokens": 0 },
        });
        sse::event("message_start", &json!({ "type": "message_start", "message": message }), out);
        let block =
            json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } });
        sse::event("content_block_start", &block, out);
        sse::event("ping", &json!({ "type": "ping" }), out);
    }

    fn chunk(&mut self, chunk: &GenerateStreamResponse, out: &mut Vec<u8>) {
        if !chunk.delta.is_empty() {
            let delta = json!({
                "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": chunk.delta },
            });
            sse::event("content_block_delta", &delta, out);
        }
        for call in &chunk.tool_calls {
            let block = self.tool_block(call.index, &call.id, &call.name, out);
            if !call.arguments.is_empty() {
                let delta = json!({
                    "type": "content_block_delta", "index": block,
                    "delta": { "type": "input_json_delta", "partial_json": call.arguments },
                });
                sse::event("content_block_delta", &delta, out);
            }
        }
        if chunk.finish_reason != 0 {
            let stop = json!({ "type": "content_block_stop", "index": self.open_block });
            sse::event("content_block_stop", &stop, out);
            let delta = json!({
                "type": "message_delta",
                "delta": { "stop_reason": stop_reason(chunk.finish_reason), "stop_sequence": null },
                "usage": usage(chunk.usage),
            });
            sse::event("message_delta", &delta, out);
        }
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        sse::event("message_stop", &json!({ "type": "message_stop" }), out);
    }

    fn fail(&mut self, problem: &Problem, out: &mut Vec<u8>) {
        let error =
            json!({ "type": "error", "error": { "type": error_type(problem.class), "message": problem.message } });
        sse::event("error", &error, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(body: Value) -> Result<(GenerateRequest, bool), Problem> {
        let Value::Object(map) = body else { unreachable!() };
        parse(Fields::new(map), 0).map(|(request, stream, _)| (request, stream))
    }

    #[test]
    fn system_messages_and_sampling_map_to_the_typed_request() {
        let (request, stream) = parsed(json!({
            "model": "sim", "max_tokens": 16, "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}],
            "temperature": 0.2, "top_p": 0.5, "stop_sequences": ["END"], "metadata": {"user_id": "u1"}, "stream": true,
        }))
        .unwrap();
        assert!(stream);
        let roles: Vec<_> = request.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        assert_eq!(roles, [("system", "be brief"), ("user", "hi"), ("assistant", "yes")]);
        assert_eq!((request.max_tokens, request.temperature, request.top_p), (16, Some(0.2), Some(0.5)));
        assert_eq!(request.stop, ["END"]);
        assert_eq!(request.user, "u1");
    }

    #[test]
    fn what_the_mesh_does_not_do_is_a_400_naming_it() {
        let base = || json!({"model": "sim", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
        for (name, value, param) in [
            ("tools", json!([{"type": "web_search_20250305", "name": "x"}]), "tools[0].type"),
            ("tool_choice", json!({"type": "sometimes"}), "tool_choice.type"),
            ("max_tokens", json!(0), "max_tokens"),
            ("metadata", json!({"user_id": "u", "other": 1}), "metadata.other"),
        ] {
            let mut body = base();
            body[name] = value;
            let problem = parsed(body).err().unwrap();
            assert_eq!(problem.param.as_deref(), Some(param), "{name}: {}", problem.message);
        }
        let no_max = json!({"model": "sim", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(parsed(no_max).err().unwrap().param.as_deref(), Some("max_tokens"));
        let image =
            json!({"model": "sim", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image"}]}]});
        assert_eq!(parsed(image).err().unwrap().param.as_deref(), Some("messages[0].content[0].source"));
        let audio =
            json!({"model": "sim", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "audio"}]}]});
        assert_eq!(parsed(audio).err().unwrap().param.as_deref(), Some("messages[0].content[0].type"));
        let robot = json!({"model": "sim", "max_tokens": 8, "messages": [{"role": "robot", "content": "x"}]});
        assert_eq!(parsed(robot).err().unwrap().param.as_deref(), Some("messages[0].role"));
        // A field llmesh does not act on is carried, not refused.
        let top_k =
            json!({"model": "sim", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "top_k": 5});
        let (request, _) = parsed(top_k).unwrap();
        let extensions = request.extensions.unwrap();
        assert_eq!((extensions.dialect.as_str(), extensions.json.as_str()), ("anthropic", r#"{"top_k":5}"#));
        // Coding agents send a system turn inside the conversation.
        let system_role = json!({"model": "sim", "max_tokens": 8, "messages": [{"role": "system", "content": "x"}]});
        assert!(parsed(system_role).is_ok());
    }

    #[test]
    fn errors_have_anthropics_shape() {
        let response = error(&Problem::from_status(&tonic::Status::unauthenticated("missing x-api-key")));
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
}

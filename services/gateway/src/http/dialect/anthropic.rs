//! Anthropic's Messages API: `POST /v1/messages`, as the official SDKs call it (`x-api-key`;
//! `anthropic-version` and `anthropic-beta` are accepted and need nothing).
//!
//! Request fields taken: `model`, `max_tokens` (required, as Anthropic requires it), `system` (a
//! string or text blocks, their `cache_control` kept), `messages` (roles user, assistant and
//! system; content as a string or blocks: text, image, document, tool_use, tool_result, thinking, redacted_thinking, with their
//! `cache_control` kept), `tools`, `tool_choice`, `thinking`, `output_config.format` (structured
//! output: the contract's JSON_SCHEMA response format) ([`super::anthropic_content`]),
//! `temperature`, `top_p`, `stop_sequences`, `metadata.user_id`, `stream`. Any other top-level
//! field (`top_k`, `output_config`'s other keys such as `effort`, `context_management`, ...) is
//! carried as the request's `anthropic` extensions (into the cache key; sent as they came to an
//! `anthropic` provider, dropped by the others) and named in `x-llmesh-unmapped-fields`; an
//! unknown block is a 400 naming it. With
//! `stream: true` the events are Anthropic's: `message_start`, `content_block_start`, `ping`,
//! `content_block_delta`…, `content_block_stop`, `message_delta` (stop reason and usage),
//! `message_stop`; a failure mid-way is an `error` event.

use llmesh_proto::validate;
use llmesh_proto::{
    common::v1::{ChatMessage, FinishReason, ReasoningDelta, Usage},
    gateway::v1::GenerateStreamResponse,
    generation::v1::{GenerateRequest, GenerateResponse},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{
    Class, Context, Dialect, Parsed, PrefixedId, Problem, Unmapped, anthropic_content as content, anthropic_dropped,
    fields::{self, Listed, TextOr, path, refuse_rest, required},
    finish_reason,
    sse::{self, Events},
};

/// Anthropic's Messages dialect.
#[derive(Debug, Clone, Copy)]
pub struct Anthropic;

/// The extensions' dialect name.
const DIALECT: &str = "anthropic";

impl Dialect for Anthropic {
    const ROUTE: &'static str = "/v1/messages";
    const CACHE_HEADER: bool = true;
    /// The prompt's estimated tokens, for `message_start` (the real count comes with
    /// `message_delta`).
    type Options = u32;
    type Events = MessageEvents;

    fn parse(body: &[u8], context: &Context<'_>) -> Result<Parsed<u32>, Problem> {
        let (request, stream, unmapped) = parse(fields::parse(body, context.max_objects)?, context.cache)?;
        let input_tokens = validate::estimated_tokens(validate::prompt_bytes(&request));
        Ok(Parsed { request, stream, options: input_tokens, unmapped })
    }

    type Rendered<'a> = Answer<'a>;

    fn render<'a>(response: &'a GenerateResponse, _: &u32, _: u64) -> Answer<'a> {
        Answer {
            id: PrefixedId { prefix: MESSAGE_ID_PREFIX, id: &response.id },
            kind: "message",
            role: "assistant",
            model: &response.model,
            content: content::blocks(&response.text, &response.tool_calls, &response.reasoning),
            stop_reason: stop_reason(response.finish_reason),
            stop_sequence: None,
            usage: usage(response.usage),
        }
    }

    fn events(_: &GenerateStreamResponse, input_tokens: u32, _: u64) -> MessageEvents {
        MessageEvents { input_tokens, open: None, next: 0, tool_blocks: Vec::new() }
    }

    fn error_body(problem: &Problem) -> Value {
        json!({ "type": "error", "error": { "type": error_type(problem.class), "message": problem.message } })
    }
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

/// A messages request, as the client sends it.
#[derive(Deserialize)]
struct Body {
    #[serde(default, deserialize_with = "fields::opt")]
    model: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "fields::opt")]
    system: Option<content::ContentBody>,
    #[serde(default, deserialize_with = "fields::objects")]
    messages: Option<Vec<Message>>,
    #[serde(default, deserialize_with = "fields::objects")]
    tools: Option<Vec<content::ToolBody>>,
    #[serde(default, deserialize_with = "fields::object")]
    tool_choice: Option<content::ChoiceBody>,
    #[serde(default, deserialize_with = "fields::object")]
    thinking: Option<content::ThinkingBody>,
    #[serde(default, deserialize_with = "fields::object")]
    output_config: Option<content::OutputConfigBody>,
    #[serde(default, deserialize_with = "fields::object")]
    metadata: Option<Metadata>,
    #[serde(default, deserialize_with = "fields::opt")]
    stream: Option<bool>,
    #[serde(default, deserialize_with = "fields::opt")]
    temperature: Option<f32>,
    #[serde(default, deserialize_with = "fields::opt")]
    top_p: Option<f32>,
    #[serde(default, deserialize_with = "fields::whole")]
    stop_sequences: Option<Vec<String>>,
    /// Carried, not refused: a field Anthropic adds next month reaches an Anthropic upstream (none
    /// yet: for the others it is dropped, and the header says so, as it names the parsed fields no
    /// upstream takes).
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// One of `messages`.
#[derive(Deserialize)]
struct Message {
    #[serde(default, deserialize_with = "fields::opt")]
    role: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    content: Option<content::ContentBody>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

impl Listed for Message {
    const LIST: &'static str = "messages";
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default, deserialize_with = "fields::opt")]
    user_id: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// A messages request, parsed.
fn parse(body: Body, cache: i32) -> Result<(GenerateRequest, bool, Unmapped), Problem> {
    let model = required(body.model, "", "model")?;
    let max_tokens = required(body.max_tokens, "", "max_tokens")?;
    if max_tokens == 0 {
        return Err(Problem::invalid("max_tokens", "must be at least 1"));
    }
    let mut messages = Vec::new();
    match body.system {
        None => {}
        Some(TextOr::Text(text)) => {
            messages.push(ChatMessage { role: "system".into(), content: text, ..Default::default() });
        }
        // Text blocks only (a mistake names its block); their `cache_control` is kept as the
        // parts', as a conversation's blocks keep theirs (without any, the text joined, as before).
        Some(TextOr::List(blocks)) => {
            content::system_blocks(&blocks)?;
            content::message("system", TextOr::List(blocks), "system", &mut messages)?;
        }
        Some(TextOr::Object(_) | TextOr::Other) => {
            return Err(Problem::invalid("system", "must be a string or a list of text blocks"));
        }
    }
    let listed = required(body.messages, "", "messages")?;
    for (i, message) in listed.into_iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = required(message.role, &at, "role")?;
        // Coding agents put a `system` turn inside the conversation too.
        if role != "user" && role != "assistant" && role != "system" {
            return Err(Problem::invalid(
                path(&at, "role"),
                format_args!("{role:?} is not one of user, assistant, system"),
            ));
        }
        let content = required(message.content, &at, "content")?;
        content::message(&role, content, &path(&at, "content"), &mut messages)?;
        refuse_rest(&at, &message.rest, &[])?;
    }
    let tools = content::tools(body.tools)?;
    let (tool_choice, parallel_tool_calls) = content::tool_choice(body.tool_choice)?;
    let reasoning = content::thinking(body.thinking)?;
    let (response_format, output_config) = content::output_config(body.output_config)?;
    let mut rest = body.rest;
    if let Some(output_config) = output_config {
        rest.insert("output_config".into(), Value::Object(output_config));
    }
    let user = match body.metadata {
        None => String::new(),
        Some(metadata) => {
            refuse_rest("metadata", &metadata.rest, &[])?;
            metadata.user_id.unwrap_or_default()
        }
    };
    let request = GenerateRequest {
        model,
        messages,
        max_tokens,
        temperature: body.temperature,
        top_p: body.top_p,
        stop: body.stop_sequences.unwrap_or_default(),
        user,
        cache,
        tools,
        tool_choice,
        parallel_tool_calls,
        reasoning,
        response_format,
        ..Default::default()
    };
    let unmapped = Unmapped::of(fields::present(rest), DIALECT).and_dropped(anthropic_dropped::dropped(&request));
    let request = GenerateRequest { extensions: unmapped.extensions_for(&request, DIALECT), ..request };
    Ok((request, body.stream.unwrap_or(false), unmapped))
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
    PrefixedId { prefix: MESSAGE_ID_PREFIX, id }.to_string()
}

/// What Anthropic's message ids begin with.
const MESSAGE_ID_PREFIX: &str = "msg_";

/// A `message`, serialized straight from the answer (as OpenAI's `Completion`, for the same reason).
#[derive(Serialize)]
pub struct Answer<'a> {
    id: PrefixedId<'a>,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<content::AnswerBlock<'a>>,
    stop_reason: &'static str,
    stop_sequence: Option<&'a str>,
    usage: Value,
}

/// Anthropic's stream events: the answer's blocks in order — thinking (or redacted thinking)
/// blocks, a text block (opened at once unless the answer begins with thinking, as Anthropic's
/// own streams do), a `tool_use` block per tool call — each opened by `content_block_start`,
/// filled by `thinking_delta` and `signature_delta`, `text_delta` or `input_json_delta`, and
/// closed by `content_block_stop` before the next one opens.
pub struct MessageEvents {
    input_tokens: u32,
    /// The block open now, and its index.
    open: Option<(Block, u32)>,
    /// The index of the next block.
    next: u32,
    /// The block index of each tool call, by the call's index.
    tool_blocks: Vec<(u32, u32)>,
}

/// What a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// Reasoning block `index` of the answer.
    Thinking(u32),
    Text,
    /// Tool call `index` of the answer.
    Tool(u32),
}

impl MessageEvents {
    /// Opens a block (closing the open one), returning its index.
    fn start(&mut self, block: Block, content_block: Value, out: &mut Vec<u8>) -> u32 {
        self.stop(out);
        let index = self.next;
        self.next += 1;
        self.open = Some((block, index));
        let start = json!({ "type": "content_block_start", "index": index, "content_block": content_block });
        sse::event("content_block_start", &start, out);
        index
    }

    /// Closes the open block, if any.
    fn stop(&mut self, out: &mut Vec<u8>) {
        if let Some((_, index)) = self.open.take() {
            sse::event("content_block_stop", &json!({ "type": "content_block_stop", "index": index }), out);
        }
    }

    /// The open block when it is `block`.
    fn open_as(&self, block: Block) -> Option<u32> {
        self.open.filter(|(open, _)| *open == block).map(|(_, index)| index)
    }

    fn text_block(&mut self, out: &mut Vec<u8>) -> u32 {
        match self.open_as(Block::Text) {
            Some(index) => index,
            None => self.start(Block::Text, json!({ "type": "text", "text": "" }), out),
        }
    }

    /// The block of reasoning delta `delta`: a `redacted_thinking` block holds its data whole.
    fn thinking_block(&mut self, delta: &ReasoningDelta, out: &mut Vec<u8>) -> u32 {
        if let Some(index) = self.open_as(Block::Thinking(delta.index)) {
            return index;
        }
        let block = if delta.text.is_empty() && !delta.redacted_content.is_empty() {
            json!({ "type": "redacted_thinking", "data": String::from_utf8_lossy(&delta.redacted_content) })
        } else {
            json!({ "type": "thinking", "thinking": "", "signature": "" })
        };
        self.start(Block::Thinking(delta.index), block, out)
    }

    /// The block of tool call `index`: opened (closing the one before) on its first delta.
    fn tool_block(&mut self, index: u32, id: &str, name: &str, out: &mut Vec<u8>) -> u32 {
        if let Some((_, block)) = self.tool_blocks.iter().find(|(call, _)| *call == index) {
            return *block;
        }
        let block =
            self.start(Block::Tool(index), json!({ "type": "tool_use", "id": id, "name": name, "input": {} }), out);
        self.tool_blocks.push((index, block));
        block
    }
}

fn delta(index: u32, delta: Value, out: &mut Vec<u8>) {
    sse::event("content_block_delta", &json!({ "type": "content_block_delta", "index": index, "delta": delta }), out);
}

impl Events for MessageEvents {
    fn open(&mut self, first: &GenerateStreamResponse, out: &mut Vec<u8>) {
        let message = json!({
            "id": message_id(&first.id), "type": "message", "role": "assistant", "model": first.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": { "input_tokens": self.input_tokens, "output_tokens": 0 },
        });
        sse::event("message_start", &json!({ "type": "message_start", "message": message }), out);
        match first.reasoning.first() {
            Some(reasoning) => self.thinking_block(reasoning, out),
            None => self.text_block(out),
        };
        sse::event("ping", &json!({ "type": "ping" }), out);
    }

    fn chunk(&mut self, chunk: &GenerateStreamResponse, out: &mut Vec<u8>) {
        for reasoning in &chunk.reasoning {
            let index = self.thinking_block(reasoning, out);
            if !reasoning.text.is_empty() {
                delta(index, json!({ "type": "thinking_delta", "thinking": reasoning.text }), out);
            }
            if !reasoning.signature.is_empty() {
                let signature = String::from_utf8_lossy(&reasoning.signature);
                delta(index, json!({ "type": "signature_delta", "signature": signature }), out);
            }
        }
        if !chunk.delta.is_empty() {
            let index = self.text_block(out);
            delta(index, json!({ "type": "text_delta", "text": chunk.delta }), out);
        }
        for call in &chunk.tool_calls {
            let index = self.tool_block(call.index, &call.id, &call.name, out);
            if !call.arguments.is_empty() {
                delta(index, json!({ "type": "input_json_delta", "partial_json": call.arguments }), out);
            }
        }
        if chunk.finish_reason != 0 {
            self.stop(out);
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
        sse::event("error", &Anthropic::error_body(problem), out);
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    fn parsed(body: Value) -> Result<(GenerateRequest, bool), Problem> {
        let body = fields::parse(&serde_json::to_vec(&body).unwrap(), usize::MAX)?;
        parse(body, 0).map(|(request, stream, _)| (request, stream))
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
        assert_eq!(roles, [("system", ""), ("user", "hi"), ("assistant", "yes")]);
        // The system block's cache mark is kept: the block is a part.
        let system = &request.messages[0].parts[0];
        assert_eq!(system.kind, Some(llmesh_proto::common::v1::content_part::Kind::Text("be brief".into())));
        assert_eq!(system.cache_control, r#"{"type":"ephemeral"}"#);
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
        let response = Anthropic::error(&Problem::from_status(&tonic::Status::unauthenticated("missing x-api-key")));
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
}

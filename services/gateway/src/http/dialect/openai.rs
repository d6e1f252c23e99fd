//! The OpenAI Chat Completions dialect: `POST /v1/chat/completions` (JSON, or server-sent events
//! ending in `data: [DONE]` with `stream: true`), as the official SDKs call it.
//!
//! Request fields taken: `model`, `messages` (roles system, developer, user, assistant, tool;
//! content as a string or as text and image parts; assistant `tool_calls`, a tool message's
//! `tool_call_id`), `max_completion_tokens` or `max_tokens`, `temperature`, `top_p`, `stop` (a
//! string or a list), `seed`, `user`, `metadata`, `stream`, `stream_options.include_usage`,
//! `tools`, `tool_choice`, `parallel_tool_calls`, `response_format`, `reasoning_effort`
//! ([`super::openai_content`]), and `n`, `presence_penalty`, `frequency_penalty`, `logprobs` at
//! their defaults only. Any other top-level field is carried as the request's `openai` extensions
//! (to an OpenAI-compatible upstream, and into the cache key) and named in
//! `x-llmesh-unmapped-fields`; a field of a part or message that llmesh does not know is a 400
//! naming it.
//!
//! The answer: `chat.completion` (or `chat.completion.chunk` events) with the text, `tool_calls`,
//! the finish reason and usage, plus the upstream's own answer fields when it spoke this dialect
//! (`system_fingerprint`, `service_tier`: the answer's `openai` extensions). Reasoning blocks are
//! not rendered: Chat Completions has no field for them.

use llmesh_proto::{
    common::v1::{ChatMessage, FinishReason, Usage, content_part},
    gateway::v1::GenerateStreamResponse,
    generation::v1::{GenerateRequest, GenerateResponse},
};
use std::collections::HashMap;

use serde::{Deserialize, Serialize, de::IgnoredAny};
use serde_json::{Map, Value, json};

use super::{
    Class, Context, Dialect, Parsed, PrefixedId, Problem, Unmapped, add_extensions, extension_fields,
    fields::{self, Listed, TextOr, path, refuse_rest, required},
    finish_reason, openai_content as content,
    sse::{self, Events},
};

/// The OpenAI Chat Completions dialect.
#[derive(Debug, Clone, Copy)]
pub struct OpenAi;

/// The extensions' dialect name.
const DIALECT: &str = "openai";

impl Dialect for OpenAi {
    const ROUTE: &'static str = "/v1/chat/completions";
    const CACHE_HEADER: bool = true;
    /// `stream_options.include_usage`.
    type Options = bool;
    type Events = ChunkEvents;

    fn parse(body: &[u8], context: &Context<'_>) -> Result<Parsed<bool>, Problem> {
        let Chat { request, stream, include_usage, unmapped } =
            parse(fields::parse(body, context.max_objects)?, context.cache)?;
        Ok(Parsed { request, stream, options: include_usage, unmapped })
    }

    type Rendered<'a> = Completion<'a>;

    fn render<'a>(response: &'a GenerateResponse, _: &bool, created: u64) -> Completion<'a> {
        Completion::of(response, created)
    }

    fn events(first: &GenerateStreamResponse, include_usage: bool, created: u64) -> ChunkEvents {
        ChunkEvents { id: completion_id(&first.id), created, include_usage }
    }

    fn error_body(problem: &Problem) -> Value {
        let (kind, code) = error_type(problem);
        json!({ "error": body(problem, kind, code) })
    }
}

/// OpenAI's error `type` and `code` for a failure.
pub(super) fn error_type(problem: &Problem) -> (&'static str, Option<&'static str>) {
    match problem.class {
        Class::InvalidRequest | Class::MethodNotAllowed => ("invalid_request_error", None),
        Class::Unauthenticated => ("authentication_error", Some("invalid_api_key")),
        Class::PermissionDenied => ("permission_error", None),
        Class::NotFound if problem.param.as_deref() == Some("model") => {
            ("invalid_request_error", Some("model_not_found"))
        }
        Class::NotFound => ("invalid_request_error", None),
        Class::TooLarge => ("invalid_request_error", Some("request_too_large")),
        Class::RateLimited => ("rate_limit_error", Some("rate_limit_exceeded")),
        // OpenAI's own answer when an account's quota or budget is spent.
        Class::OverBudget => ("insufficient_quota", Some("insufficient_quota")),
        Class::Overloaded => ("server_error", Some("overloaded")),
        Class::Timeout { .. } => ("timeout_error", Some("timeout")),
        Class::Unavailable | Class::Internal => ("server_error", None),
        Class::Cancelled => ("cancelled", None),
    }
}

fn body(problem: &Problem, kind: &str, code: Option<&str>) -> Value {
    json!({ "message": problem.message, "type": kind, "param": problem.param, "code": code })
}

/// A chat completion request, parsed.
struct Chat {
    request: GenerateRequest,
    stream: bool,
    include_usage: bool,
    unmapped: Unmapped,
}

/// `stop`: one sequence or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

/// A chat completion request, as the client sends it.
#[derive(Deserialize)]
struct Body {
    #[serde(default, deserialize_with = "fields::opt")]
    model: Option<String>,
    #[serde(default, deserialize_with = "fields::objects")]
    messages: Option<Vec<Message>>,
    #[serde(default, deserialize_with = "fields::opt")]
    max_completion_tokens: Option<u32>,
    #[serde(default, deserialize_with = "fields::opt")]
    max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "fields::opt")]
    stream: Option<bool>,
    #[serde(default, deserialize_with = "fields::object")]
    stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "fields::opt")]
    n: Option<u32>,
    #[serde(default, deserialize_with = "fields::opt")]
    presence_penalty: Option<f32>,
    #[serde(default, deserialize_with = "fields::opt")]
    frequency_penalty: Option<f32>,
    #[serde(default, deserialize_with = "fields::opt")]
    logprobs: Option<bool>,
    #[serde(default, deserialize_with = "fields::objects")]
    tools: Option<Vec<content::ToolBody>>,
    #[serde(default, deserialize_with = "fields::opt")]
    tool_choice: Option<content::ToolChoiceBody>,
    #[serde(default, deserialize_with = "fields::object")]
    response_format: Option<content::FormatBody>,
    #[serde(default, deserialize_with = "fields::opt")]
    reasoning_effort: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    temperature: Option<f32>,
    #[serde(default, deserialize_with = "fields::opt")]
    top_p: Option<f32>,
    #[serde(default, deserialize_with = "fields::opt")]
    stop: Option<Stop>,
    #[serde(default, deserialize_with = "fields::opt")]
    seed: Option<i64>,
    #[serde(default, deserialize_with = "fields::opt")]
    user: Option<String>,
    #[serde(default, deserialize_with = "fields::whole")]
    metadata: Option<HashMap<String, String>>,
    #[serde(default, deserialize_with = "fields::opt")]
    parallel_tool_calls: Option<bool>,
    /// Carried, not refused: a field OpenAI adds next month reaches an OpenAI upstream.
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default, deserialize_with = "fields::opt")]
    include_usage: Option<bool>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// One of `messages`.
#[derive(Deserialize)]
struct Message {
    #[serde(default, deserialize_with = "fields::opt")]
    role: Option<String>,
    #[serde(default, deserialize_with = "fields::objects")]
    tool_calls: Option<Vec<content::CallBody>>,
    #[serde(default, deserialize_with = "fields::opt")]
    content: Option<content::ContentBody>,
    #[serde(default, deserialize_with = "fields::opt")]
    tool_call_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    name: Option<String>,
    /// An answer's refusal, echoed back: nothing to ask for.
    #[serde(default, rename = "refusal")]
    _refusal: IgnoredAny,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

impl Listed for Message {
    const LIST: &'static str = "messages";
}

fn parse(body: Body, cache: i32) -> Result<Chat, Problem> {
    let model = required(body.model, "", "model")?;
    let messages = required(body.messages, "", "messages")?;
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, given)| message(given, &format!("messages[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let stream = body.stream.unwrap_or(false);
    let include_usage = match body.stream_options {
        None => false,
        Some(_) if !stream => return Err(Problem::invalid("stream_options", "only allowed when stream is true")),
        Some(options) => {
            refuse_rest("stream_options", &options.rest, &[])?;
            options.include_usage.unwrap_or(false)
        }
    };
    fields::only(body.n, "n", 1u32)?;
    fields::only(body.presence_penalty, "presence_penalty", 0.0f32)?;
    fields::only(body.frequency_penalty, "frequency_penalty", 0.0f32)?;
    fields::only(body.logprobs, "logprobs", false)?;
    let request = GenerateRequest {
        model,
        messages,
        max_tokens: body.max_completion_tokens.or(body.max_tokens).unwrap_or(0),
        temperature: body.temperature,
        top_p: body.top_p,
        stop: body.stop.map(Stop::into_vec).unwrap_or_default(),
        seed: body.seed,
        user: body.user.unwrap_or_default(),
        metadata: body.metadata.unwrap_or_default(),
        cache,
        tools: content::tools(body.tools)?,
        tool_choice: content::tool_choice(body.tool_choice)?,
        parallel_tool_calls: body.parallel_tool_calls,
        response_format: content::response_format(body.response_format)?,
        reasoning: content::reasoning(body.reasoning_effort),
        ..Default::default()
    };
    let unmapped = Unmapped::of(fields::present(body.rest), DIALECT);
    let request = GenerateRequest { extensions: unmapped.extensions_for(&request, DIALECT), ..request };
    Ok(Chat { request, stream, include_usage, unmapped })
}

/// One message (`at`: its path): its role; its content as a string, as text parts (joined by
/// newlines), or as parts with images; an assistant's tool calls, a tool result's call id, a
/// participant's name.
fn message(given: Message, at: &str) -> Result<ChatMessage, Problem> {
    let role = required(given.role, at, "role")?;
    let content_path = path(at, "content");
    let tool_calls = content::tool_calls(given.tool_calls, at)?;
    let (text, parts) = match given.content {
        // An assistant that only called tools sends no content.
        None if !tool_calls.is_empty() => (String::new(), Vec::new()),
        None => return Err(Problem::invalid(content_path, "required")),
        Some(TextOr::Text(text)) => (text, Vec::new()),
        Some(TextOr::List(listed)) => {
            let parts = content::parts(listed, &content_path)?;
            let texts: Option<Vec<&str>> = parts
                .iter()
                .map(|part| match &part.kind {
                    Some(content_part::Kind::Text(text)) => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            match texts {
                // Text alone stays plain text: the same request as before parts existed, so the same cache key.
                Some(texts) => (texts.join("\n"), Vec::new()),
                None => (String::new(), parts),
            }
        }
        Some(TextOr::Object(_) | TextOr::Other) => {
            return Err(Problem::invalid(content_path, "must be a string or a list of parts"));
        }
    };
    let message = ChatMessage {
        role,
        content: text,
        parts,
        tool_calls,
        tool_call_id: given.tool_call_id.unwrap_or_default(),
        name: given.name.unwrap_or_default(),
        ..Default::default()
    };
    refuse_rest(at, &given.rest, &[])?;
    Ok(message)
}

fn completion_id(id: &str) -> String {
    PrefixedId { prefix: COMPLETION_ID_PREFIX, id }.to_string()
}

/// What OpenAI's completion ids begin with.
const COMPLETION_ID_PREFIX: &str = "chatcmpl-";

/// OpenAI's name of a finish reason: a fallback's answer finished normally (the headers say it
/// was a fallback).
fn finish(value: i32) -> &'static str {
    match finish_reason(value) {
        FinishReason::Length => "length",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::Stop | FinishReason::Fallback | FinishReason::Unspecified => "stop",
    }
}

fn usage(usage: Option<Usage>) -> Value {
    content::usage(usage)
}

/// A `chat.completion`, serialized straight from the answer: it is what this dialect writes most,
/// and building it as a `Value` first (then dropping it) cost 9% of the gateway's instructions a
/// call on the HTTP path (`docs/BENCHMARKS.md` §25).
#[derive(Serialize)]
pub struct Completion<'a> {
    id: PrefixedId<'a>,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: Value,
    /// `null` unless the upstream's extensions give one.
    system_fingerprint: Value,
    /// The upstream's other fields (`service_tier`, …); never one named above.
    #[serde(flatten)]
    extensions: Map<String, Value>,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: AnswerMessage<'a>,
    logprobs: Option<Value>,
    finish_reason: &'static str,
}

/// The assistant's message: its text (`null` when it only called tools) and its tool calls.
#[derive(Serialize)]
struct AnswerMessage<'a> {
    role: &'static str,
    content: Option<&'a str>,
    refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Value>,
}

impl<'a> Completion<'a> {
    /// The fields an extension may not replace: each always has a value.
    const OWN: [&'static str; 6] = ["id", "object", "created", "model", "choices", "usage"];

    fn of(response: &'a GenerateResponse, created: u64) -> Self {
        let (text, tool_calls) = (response.text.as_str(), &response.tool_calls);
        let message = AnswerMessage {
            role: "assistant",
            content: (tool_calls.is_empty() || !text.is_empty()).then_some(text),
            refusal: None,
            tool_calls: (!tool_calls.is_empty()).then(|| content::render_tool_calls(tool_calls)),
        };
        let mut extensions = extension_fields(response.extensions.as_ref(), DIALECT).unwrap_or_default();
        extensions.retain(|name, _| !Self::OWN.contains(&name.as_str()));
        let system_fingerprint = extensions.remove("system_fingerprint").unwrap_or(Value::Null);
        Self {
            id: PrefixedId { prefix: COMPLETION_ID_PREFIX, id: &response.id },
            object: "chat.completion",
            created,
            model: &response.model,
            choices: [Choice { index: 0, message, logprobs: None, finish_reason: finish(response.finish_reason) }],
            usage: usage(response.usage),
            system_fingerprint,
            extensions,
        }
    }
}

/// `chat.completion.chunk` events: the assistant role first, a chunk per delta, the finish
/// reason, the usage (when asked for), then `[DONE]`.
pub struct ChunkEvents {
    id: String,
    created: u64,
    include_usage: bool,
}

impl ChunkEvents {
    fn make(&self, model: &str, choices: Value, usage: Option<Value>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model,
            "system_fingerprint": null,
            "choices": choices,
        });
        // With include_usage, every chunk has the field: null until the last.
        if self.include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        chunk
    }
}

impl Events for ChunkEvents {
    fn open(&mut self, first: &GenerateStreamResponse, out: &mut Vec<u8>) {
        let choices = json!([{
            "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null,
        }]);
        sse::data(&self.make(&first.model, choices, None), out);
    }

    fn chunk(&mut self, chunk: &GenerateStreamResponse, out: &mut Vec<u8>) {
        if !chunk.delta.is_empty() {
            let choices = json!([{
                "index": 0, "delta": { "content": chunk.delta }, "logprobs": null, "finish_reason": null,
            }]);
            sse::data(&self.make(&chunk.model, choices, None), out);
        }
        if !chunk.tool_calls.is_empty() {
            let calls = content::render_tool_call_deltas(&chunk.tool_calls);
            let choices = json!([{
                "index": 0, "delta": { "tool_calls": calls }, "logprobs": null, "finish_reason": null,
            }]);
            sse::data(&self.make(&chunk.model, choices, None), out);
        }
        if chunk.finish_reason != 0 {
            let choices = json!([{
                "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish(chunk.finish_reason),
            }]);
            let mut last = self.make(&chunk.model, choices, None);
            add_extensions(&mut last, chunk.extensions.as_ref(), DIALECT);
            sse::data(&last, out);
            if self.include_usage {
                sse::data(&self.make(&chunk.model, json!([]), Some(usage(chunk.usage))), out);
            }
        }
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"data: [DONE]\n\n");
    }

    fn fail(&mut self, problem: &Problem, out: &mut Vec<u8>) {
        // The SDKs raise an APIError on a data event with an `error` field.
        let (kind, code) = error_type(problem);
        sse::data(&json!({ "error": body(problem, kind, code) }), out);
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use serde_json::json;

    use super::*;

    fn parsed(body: Value) -> Result<Chat, Problem> {
        parse(fields::parse(&serde_json::to_vec(&body).unwrap(), usize::MAX)?, 0)
    }

    #[test]
    fn every_supported_field_maps_to_the_typed_request() {
        let chat = parsed(json!({
            "model": "sim",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "ok", "refusal": null, "tool_calls": null, "annotations": []},
            ],
            "max_completion_tokens": 12, "temperature": 0.5, "top_p": 0.9, "stop": "END", "seed": 7,
            "user": "u1", "metadata": {"team": "a"}, "n": 1, "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .unwrap();
        assert!(chat.stream && chat.include_usage);
        let r = chat.request;
        assert_eq!(r.model, "sim");
        assert_eq!(r.messages.len(), 3);
        assert_eq!(r.messages[1].content, "a\nb");
        assert_eq!((r.max_tokens, r.temperature, r.top_p, r.seed), (12, Some(0.5), Some(0.9), Some(7)));
        assert_eq!(r.stop, ["END"]);
        assert_eq!(r.user, "u1");
        assert_eq!(r.metadata["team"], "a");
        assert!(r.prompt.is_empty());
    }

    #[test]
    fn what_the_mesh_does_not_do_is_a_400_naming_it() {
        let base = || json!({"model": "sim", "messages": [{"role": "user", "content": "hi"}]});
        let cases = [
            ("tools", json!([{"type": "function"}]), "tools[0].function"),
            ("tools", json!([{"type": "web_search"}]), "tools[0].type"),
            ("n", json!(2), "n"),
            ("presence_penalty", json!(0.5), "presence_penalty"),
            ("temperature", json!("hot"), "temperature"),
            ("stream_options", json!({"include_usage": true}), "stream_options"),
        ];
        for (name, value, param) in cases {
            let mut body = base();
            body[name] = value;
            let problem = parsed(body).err().unwrap();
            assert_eq!(problem.class, Class::InvalidRequest, "{name}");
            assert_eq!(problem.param.as_deref(), Some(param), "{name}: {}", problem.message);
        }
        let image = json!({"model": "sim", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]});
        assert_eq!(parsed(image).err().unwrap().param.as_deref(), Some("messages[0].content[0].image_url"));
        let audio = json!({"model": "sim", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]});
        assert_eq!(parsed(audio).err().unwrap().param.as_deref(), Some("messages[0].content[0].type"));
        let missing = json!({"model": "sim"});
        assert_eq!(parsed(missing).err().unwrap().param.as_deref(), Some("messages"));
    }

    #[test]
    fn errors_have_openais_shape_and_status() {
        let problem = Problem::invalid("temperature", "5 is outside 0..=2");
        let response = OpenAi::error(&problem);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let mut problem = Problem::invalid("model", "unknown model");
        problem.class = Class::NotFound;
        assert_eq!(OpenAi::error(&problem).status(), StatusCode::NOT_FOUND);
        let limited = Problem::from_status(&tonic::Status::resource_exhausted("rate limit"));
        assert_eq!(OpenAi::error(&limited).status(), StatusCode::TOO_MANY_REQUESTS);
    }
}

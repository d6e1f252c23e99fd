//! The OpenAI chat completions wire format, both ways: the request body made from a
//! `GenerateRequest`, and the completion (or stream chunk) read back into events.
//!
//! What is sent, field by field:
//! - `messages`: role as is; `content` a string, or parts (`text`; `image_url` with the URL, or a
//!   `data:` URL made from inline bytes, and `detail`; a document as a `file` part with its
//!   `file_id`, or its inline bytes as `file_data`, its text as a `text` part, a URL as a text
//!   part naming it). Assistant `tool_calls` (`function` calls, arguments byte for byte), a tool
//!   message's `tool_call_id`, `name`. Not sent (the API has no field for them): `is_error`,
//!   reasoning blocks, `cache_control`, a tool call's `signature`.
//! - `tools` (`function`: name, description, parameters and strict; the schema's text is sent as
//!   it came, key order kept, which structured outputs follow), `tool_choice`,
//!   `parallel_tool_calls`, `response_format` (`text`, `json_object`, `json_schema` with name,
//!   description, schema and strict), `reasoning_effort` (a budget in tokens is not sent).
//! - `extensions` of dialect `openai`: each top-level field added to the body unless llmesh sets
//!   it itself; a part's or a tool's `extra` of that dialect merged into the part or tool object.
//!   Extensions of another dialect are not sent.
//!
//! What is read: text (`content`, else `refusal`), `tool_calls` (streamed by `index`, the first
//! fragment with id and name), reasoning (`reasoning_content` or `reasoning`, as vLLM, DeepSeek,
//! Ollama and OpenRouter send it), `finish_reason` (`tool_calls` and `function_call` are
//! TOOL_CALLS), usage with `prompt_tokens_details.cached_tokens` and
//! `completion_tokens_details.reasoning_tokens`, and every other top-level field of the
//! completion as `extensions` of dialect `openai`.

use llmesh_proto::{
    common::v1::{
        ChatMessage, ContentPart, Extensions, FinishReason, ImageDetail, ReasoningDelta, ResponseFormatType,
        ToolCallDelta, ToolChoiceMode, Usage, content_part::Kind, document, image,
    },
    generation::v1::GenerateRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json, value::RawValue};

use crate::provider::translate::{self, Refusal, base64, object, raw, text_of};

/// The dialect name of OpenAI's extensions.
pub const DIALECT: &str = "openai";

/// The body llmesh builds for a request, as JSON text.
pub fn body(request: &GenerateRequest, model: &str, max_tokens: u32, stream: bool) -> Result<String, Refusal> {
    let extras = request.extensions.as_ref().filter(|e| e.dialect == DIALECT);
    let ours = dialect_is_ours(request);
    let messages: Vec<Value> = if request.messages.is_empty() {
        vec![json!({"role": "user", "content": request.prompt})]
    } else {
        request.messages.iter().map(|m| message(m, ours)).collect()
    };
    let tools: Vec<Tool<'_>> = request
        .tools
        .iter()
        .map(|tool| {
            Ok(Tool {
                kind: "function",
                function: Function {
                    name: &tool.name,
                    description: Some(tool.description.as_str()).filter(|d| !d.is_empty()),
                    parameters: raw(&tool.parameters)?,
                    strict: tool.strict,
                },
                extra: if ours { object(&tool.extra) } else { Map::new() },
            })
        })
        .collect::<Result<_, Refusal>>()?;
    let response_format = match &request.response_format {
        None => None,
        Some(format) => Some(match ResponseFormatType::try_from(format.r#type) {
            Ok(ResponseFormatType::JsonSchema) => ResponseFormat {
                kind: "json_schema",
                json_schema: Some(JsonSchema {
                    name: if format.name.is_empty() { "response" } else { &format.name },
                    description: Some(format.description.as_str()).filter(|d| !d.is_empty()),
                    schema: raw(&format.schema)?,
                    strict: format.strict,
                }),
            },
            Ok(ResponseFormatType::JsonObject) => ResponseFormat { kind: "json_object", json_schema: None },
            _ => ResponseFormat { kind: "text", json_schema: None },
        }),
    };
    let tool_choice = request.tool_choice.as_ref().and_then(|choice| match ToolChoiceMode::try_from(choice.mode) {
        Ok(ToolChoiceMode::Auto) => Some(json!("auto")),
        Ok(ToolChoiceMode::None) => Some(json!("none")),
        Ok(ToolChoiceMode::Required) => Some(json!("required")),
        Ok(ToolChoiceMode::Tool) => Some(json!({"type": "function", "function": {"name": choice.name}})),
        _ => None,
    });
    let body = Body {
        model,
        messages,
        max_tokens,
        stream,
        temperature: request.temperature,
        top_p: request.top_p,
        stop: &request.stop,
        seed: request.seed,
        user: Some(request.user.as_str()).filter(|u| !u.is_empty()),
        stream_options: stream.then(|| json!({"include_usage": true})),
        tools,
        tool_choice,
        parallel_tool_calls: request.parallel_tool_calls.filter(|_| !request.tools.is_empty()),
        response_format,
        reasoning_effort: request.reasoning.as_ref().map(|r| r.effort.as_str()).filter(|e| !e.is_empty()),
    };
    let mut text = serde_json::to_string(&body)?;
    if let Some(extensions) = extras {
        add_extensions(&mut text, &extensions.json)?;
    }
    Ok(text)
}

/// Whether parts' and tools' `extra` are in this dialect.
fn dialect_is_ours(request: &GenerateRequest) -> bool {
    request.extensions.as_ref().is_some_and(|e| e.dialect == DIALECT)
}

/// The fields llmesh sets itself: an extension of the same name is not sent.
const OWN_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "stream",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "user",
    "stream_options",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning_effort",
];

/// Adds each field of the extensions' object to the body's text, before its closing brace; the
/// values are copied byte for byte.
fn add_extensions(body: &mut String, extensions: &str) -> Result<(), serde_json::Error> {
    if extensions.is_empty() {
        return Ok(());
    }
    let fields: std::collections::BTreeMap<String, &RawValue> = serde_json::from_str(extensions)?;
    translate::append_fields(body, fields.iter().map(|(name, value)| (name.as_str(), *value)), OWN_FIELDS)
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: Vec<Value>,
    max_tokens: u32,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<ResponseFormat<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<&'a str>,
}

#[derive(Serialize)]
struct Tool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: Function<'a>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Serialize)]
struct Function<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

#[derive(Serialize)]
struct ResponseFormat<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    json_schema: Option<JsonSchema<'a>>,
}

#[derive(Serialize)]
struct JsonSchema<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

fn message(message: &ChatMessage, ours: bool) -> Value {
    let mut out = Map::new();
    out.insert("role".into(), json!(message.role));
    let content = if message.parts.is_empty() {
        if message.content.is_empty() && !message.tool_calls.is_empty() { Value::Null } else { json!(message.content) }
    } else if message.role == "tool" || message.role == "system" || message.role == "developer" {
        // These roles take text only: their text parts as one string.
        json!(text_of(&message.parts))
    } else {
        Value::Array(message.parts.iter().map(|p| part(p, ours)).collect())
    };
    out.insert("content".into(), content);
    if !message.name.is_empty() && message.role != "tool" {
        out.insert("name".into(), json!(message.name));
    }
    if !message.tool_call_id.is_empty() {
        out.insert("tool_call_id".into(), json!(message.tool_call_id));
    }
    if !message.tool_calls.is_empty() {
        let calls: Vec<Value> = message
            .tool_calls
            .iter()
            .map(|call| {
                json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
            })
            .collect();
        out.insert("tool_calls".into(), Value::Array(calls));
    }
    Value::Object(out)
}

fn data_url(media_type: &str, data: &[u8]) -> String {
    format!("data:{media_type};base64,{}", base64(data))
}

fn part(part: &ContentPart, ours: bool) -> Value {
    let mut out = match &part.kind {
        Some(Kind::Text(text)) => json!({"type": "text", "text": text}),
        Some(Kind::Image(image)) => {
            let url = match &image.source {
                Some(image::Source::Url(url)) => url.clone(),
                Some(image::Source::Data(data)) => data_url(&image.media_type, data),
                Some(image::Source::FileId(id)) => {
                    return json!({"type": "file", "file": {"file_id": id}});
                }
                None => String::new(),
            };
            let mut image_url = json!({"url": url});
            match ImageDetail::try_from(image.detail) {
                Ok(ImageDetail::Low) => image_url["detail"] = json!("low"),
                Ok(ImageDetail::High) => image_url["detail"] = json!("high"),
                Ok(ImageDetail::Auto) => image_url["detail"] = json!("auto"),
                _ => {}
            }
            json!({"type": "image_url", "image_url": image_url})
        }
        Some(Kind::Document(document)) => match &document.source {
            Some(document::Source::FileId(id)) => json!({"type": "file", "file": {"file_id": id}}),
            Some(document::Source::Data(data)) => {
                let mut file = json!({"file_data": data_url(&document.media_type, data)});
                if !document.name.is_empty() {
                    file["filename"] = json!(document.name);
                }
                json!({"type": "file", "file": file})
            }
            Some(document::Source::Text(text)) => json!({"type": "text", "text": text}),
            Some(document::Source::Url(url)) => json!({"type": "text", "text": format!("[document] {url}")}),
            None => json!({"type": "text", "text": ""}),
        },
        None => json!({"type": "text", "text": ""}),
    };
    if ours && let Value::Object(fields) = &mut out {
        for (name, value) in object(&part.extra) {
            fields.entry(name).or_insert(value);
        }
    }
    out
}

/// OpenAI's `finish_reason`.
pub fn finish_reason(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("length") => FinishReason::Length,
        Some("content_filter") => FinishReason::ContentFilter,
        Some("tool_calls" | "function_call") => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    }
}

#[derive(Debug, Deserialize)]
pub struct WireUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    #[serde(default)]
    total_tokens: Option<u32>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u32>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens.unwrap_or(u.prompt_tokens.saturating_add(u.completion_tokens)),
            estimated: false,
            cached_prompt_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0),
            cache_write_tokens: 0,
            reasoning_tokens: u.completion_tokens_details.and_then(|d| d.reasoning_tokens).unwrap_or(0),
        }
    }
}

/// A unary completion.
#[derive(Debug, Deserialize)]
pub struct Completion {
    #[serde(default)]
    pub choices: Vec<Choice>,
    pub usage: Option<WireUsage>,
    /// Every other top-level field (`id`, `object`, `created` and `model` aside).
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct Choice {
    pub message: Option<Message>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Message {
    pub content: Option<String>,
    pub refusal: Option<String>,
    #[serde(default)]
    pub tool_calls: Vec<WireToolCall>,
    /// vLLM's and DeepSeek's reasoning.
    pub reasoning_content: Option<String>,
    /// Ollama's and OpenRouter's.
    pub reasoning: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct WireToolCall {
    /// Only in stream chunks.
    pub index: Option<u32>,
    pub id: Option<String>,
    pub function: Option<WireFunction>,
}

#[derive(Debug, Deserialize)]
pub struct WireFunction {
    pub name: Option<String>,
    pub arguments: Option<String>,
}

/// A stream chunk.
#[derive(Debug, Deserialize)]
pub struct Chunk {
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    pub usage: Option<WireUsage>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChunkChoice {
    pub delta: Option<Message>,
    pub finish_reason: Option<String>,
}

/// The top-level fields every completion has, not kept as extensions.
const COMMON_FIELDS: &[&str] = &["id", "object", "created", "model"];

/// The fields of `rest` worth keeping as extensions, if any.
pub fn extensions(rest: Map<String, Value>) -> Option<Extensions> {
    translate::extensions(rest, COMMON_FIELDS, DIALECT)
}

impl Message {
    /// The text: content, else a refusal.
    pub fn text(&mut self) -> Option<String> {
        self.content.take().filter(|t| !t.is_empty()).or_else(|| self.refusal.take().filter(|t| !t.is_empty()))
    }

    pub fn reasoning_text(&mut self) -> Option<String> {
        self.reasoning_content.take().or_else(|| self.reasoning.take()).filter(|t| !t.is_empty())
    }
}

/// A tool-call delta from a wire call; `index` when the upstream gives none.
pub fn tool_call_delta(call: WireToolCall, index: u32) -> ToolCallDelta {
    let function = call.function.unwrap_or(WireFunction { name: None, arguments: None });
    ToolCallDelta {
        index: call.index.unwrap_or(index),
        id: call.id.unwrap_or_default(),
        name: function.name.unwrap_or_default(),
        arguments: function.arguments.unwrap_or_default(),
        signature: Vec::new(),
    }
}

/// A reasoning delta of the one block an OpenAI-compatible answer has.
pub fn reasoning_delta(text: String) -> ReasoningDelta {
    ReasoningDelta { index: 0, text, ..Default::default() }
}

//! Anthropic's Messages API wire format, both ways: the body made from a `GenerateRequest`, and
//! the message (or stream event) read back.
//!
//! What is sent, field by field:
//! - `system`: every `system` and `developer` message's text, in order, as text blocks (each
//!   part's `cache_control` kept). The API has no system turn inside the conversation, so one
//!   there moves up here too.
//! - `messages`: `user` content as a string or blocks (`text`; `image` and `document` from inline
//!   bytes as `base64`, from a URL as `url`, from a file id as `file`; a text document as a `text`
//!   source; a document's name as its `title`), each block's `cache_control`. `assistant`:
//!   its reasoning blocks first (`thinking` with its signature, `redacted_thinking`), then its
//!   text, then its tool calls as `tool_use` blocks (the arguments, byte for byte, as `input`).
//!   A run of `tool` messages becomes one `user` message of `tool_result` blocks (`tool_use_id`,
//!   the content, `is_error`). Not sent (no field for them): a message's `name`, an image's
//!   `detail`, a tool call's `signature`.
//! - `tools` (`name`, `description`, `input_schema` as the client's text, `strict`,
//!   `cache_control`), `tool_choice` (`auto`, `none`, `any` for REQUIRED, `tool`;
//!   `disable_parallel_tool_use` when `parallel_tool_calls` is false), `stop_sequences`,
//!   `temperature`, `top_p`, `metadata.user_id`, `stream`. Not sent: `seed` (no such field).
//! - `response_format` JSON_SCHEMA: `output_config.format` (`json_schema` with the schema).
//!   JSON_OBJECT has no Anthropic form and is refused ([`Refusal`]).
//! - `reasoning`: a budget is `thinking` `enabled` with `budget_tokens`; effort `none` is
//!   `disabled`; otherwise `adaptive`, with `output_config.effort` when an effort is given
//!   (`minimal` as `low`, the API's lowest). `summary` `summarized` or `omitted` is
//!   `thinking.display`.
//! - `extensions` of dialect `anthropic` (what an Anthropic client sent that llmesh does not act
//!   on: `top_k`, `context_management`, `output_config`, ...): each top-level field added to the
//!   body, byte for byte; `output_config` and `metadata` merged key by key with llmesh's own (its
//!   keys win). A part's or a tool's `extra` of that dialect is merged into its block or tool.
//!   Extensions of another dialect are not sent.
//!
//! What is read: `text` blocks (joined), `thinking` and `redacted_thinking` blocks (as reasoning,
//! with their signatures), `tool_use` blocks (the `input` text as the arguments, byte for byte),
//! `stop_reason`, usage (the prompt is `input_tokens` plus the cache's reads and writes, as the
//! contract counts it), and every other top-level field of the message as `extensions` of
//! dialect `anthropic`. Blocks of other types (server tools' results) are skipped.

use std::collections::BTreeMap;

use llmesh_proto::{
    common::v1::{
        ChatMessage, ContentPart, Extensions, FinishReason, ReasoningDelta, ResponseFormatType, ToolCallDelta,
        ToolChoiceMode, Usage, content_part::Kind, document, image,
    },
    generation::v1::GenerateRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, value::RawValue};

use crate::provider::translate::{self, Refusal, arguments_object, base64, object, raw, refuse};

/// The dialect name of Anthropic's extensions.
pub const DIALECT: &str = "anthropic";

/// The body llmesh builds for a request, as JSON text.
pub fn body(request: &GenerateRequest, model: &str, max_tokens: u32, stream: bool) -> Result<String, Refusal> {
    // Parts' and tools' `extra` are ours with extensions of this dialect, even without `json`.
    let extensions = request.extensions.as_ref().filter(|e| e.dialect == DIALECT);
    let ours = extensions.is_some();
    let extensions = extensions.filter(|e| !e.json.is_empty());
    let (system, messages) = conversation(request, ours)?;
    let tools = request
        .tools
        .iter()
        .map(|tool| {
            Ok(Tool {
                name: &tool.name,
                description: Some(tool.description.as_str()).filter(|d| !d.is_empty()),
                input_schema: schema(&tool.parameters)?,
                strict: tool.strict,
                cache_control: raw(&tool.cache_control)?,
                extra: if ours { object(&tool.extra) } else { Map::new() },
            })
        })
        .collect::<Result<Vec<_>, Refusal>>()?;
    let mut output_config = BTreeMap::new();
    if let Some(format) = &request.response_format {
        match ResponseFormatType::try_from(format.r#type) {
            Ok(ResponseFormatType::JsonSchema) => {
                let schema = schema(&format.schema)?;
                output_config.insert("format", to_raw(&Format { kind: "json_schema", schema })?);
            }
            Ok(ResponseFormatType::JsonObject) => {
                return Err(refuse(
                    "response_format",
                    "the Anthropic API has no JSON mode without a schema: send a json_schema response format",
                ));
            }
            _ => {}
        }
    }
    let thinking = match &request.reasoning {
        None => None,
        Some(reasoning) if reasoning.effort == "none" => Some(Thinking { kind: "disabled", ..Thinking::default() }),
        Some(reasoning) => {
            let display = Some(reasoning.summary.as_str()).filter(|s| matches!(*s, "summarized" | "omitted"));
            if let Some(budget) = reasoning.budget_tokens {
                Some(Thinking { kind: "enabled", budget_tokens: Some(budget), display })
            } else {
                if !reasoning.effort.is_empty() {
                    let effort = if reasoning.effort == "minimal" { "low" } else { reasoning.effort.as_str() };
                    output_config.insert("effort", to_raw(effort)?);
                }
                Some(Thinking { kind: "adaptive", budget_tokens: None, display })
            }
        }
    };
    let mut metadata = BTreeMap::new();
    if !request.user.is_empty() {
        metadata.insert("user_id", to_raw(&request.user)?);
    }
    let mut rest = match extensions {
        Some(extensions) => serde_json::from_str::<BTreeMap<String, Box<RawValue>>>(&extensions.json)?,
        None => BTreeMap::new(),
    };
    let output_config = merged(output_config, rest.remove("output_config"));
    let metadata = merged(metadata, rest.remove("metadata"));
    let body = Body {
        model,
        max_tokens,
        system,
        messages,
        stream,
        temperature: request.temperature,
        top_p: request.top_p,
        stop_sequences: &request.stop,
        metadata,
        tool_choice: tool_choice(request),
        tools,
        thinking,
        output_config,
    };
    let mut text = serde_json::to_string(&body)?;
    translate::append_fields(&mut text, rest.iter().map(|(name, value)| (name.as_str(), &**value)), OWN_FIELDS)?;
    Ok(text)
}

/// The fields llmesh sets itself: an extension of the same name is not sent (`output_config` and
/// `metadata` are merged instead).
const OWN_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "system",
    "messages",
    "stream",
    "temperature",
    "top_p",
    "stop_sequences",
    "tool_choice",
    "tools",
    "thinking",
];

/// A schema's text, raw; an empty one (a tool without parameters) as the schema of any object:
/// the API wants one all the same.
fn schema(text: &str) -> Result<&RawValue, Refusal> {
    let text = if text.is_empty() { r#"{"type":"object"}"# } else { text };
    Ok(serde_json::from_str(text)?)
}

/// `ours` with the keys of the extension's object that `ours` lacks; `None` when both are empty.
/// An extension that is not an object is dropped: llmesh's own fields must stay valid.
fn merged(
    ours: BTreeMap<&str, Box<RawValue>>,
    extension: Option<Box<RawValue>>,
) -> Option<BTreeMap<String, Box<RawValue>>> {
    let mut all = match extension {
        Some(value) => serde_json::from_str::<BTreeMap<String, Box<RawValue>>>(value.get()).unwrap_or_default(),
        None => BTreeMap::new(),
    };
    all.extend(ours.into_iter().map(|(name, value)| (name.to_owned(), value)));
    if all.is_empty() { None } else { Some(all) }
}

fn to_raw(value: &(impl Serialize + ?Sized)) -> Result<Box<RawValue>, Refusal> {
    Ok(serde_json::value::to_raw_value(value)?)
}

fn tool_choice(request: &GenerateRequest) -> Option<ToolChoice<'_>> {
    let single = request.parallel_tool_calls == Some(false) && !request.tools.is_empty();
    let choice = request.tool_choice.as_ref().and_then(|choice| match ToolChoiceMode::try_from(choice.mode) {
        Ok(ToolChoiceMode::Auto) => Some(("auto", None)),
        Ok(ToolChoiceMode::None) => Some(("none", None)),
        Ok(ToolChoiceMode::Required) => Some(("any", None)),
        Ok(ToolChoiceMode::Tool) => Some(("tool", Some(choice.name.as_str()))),
        _ => None,
    });
    match (choice, single) {
        (Some(("none", _)), _) => Some(ToolChoice { kind: "none", name: None, disable_parallel_tool_use: None }),
        (Some((kind, name)), single) => {
            Some(ToolChoice { kind, name, disable_parallel_tool_use: single.then_some(true) })
        }
        (None, true) => Some(ToolChoice { kind: "auto", name: None, disable_parallel_tool_use: Some(true) }),
        (None, false) => None,
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<Block<'a>>,
    messages: Vec<Message<'a>>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<BTreeMap<String, Box<RawValue>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoice<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<Thinking<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_config: Option<BTreeMap<String, Box<RawValue>>>,
}

#[derive(Serialize)]
struct Tool<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<&'a RawValue>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Serialize)]
struct ToolChoice<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Serialize, Default)]
struct Thinking<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<&'a str>,
}

#[derive(Serialize)]
struct Format<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    schema: &'a RawValue,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Content<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Content<'a> {
    Text(&'a str),
    Blocks(Vec<Block<'a>>),
}

/// A content block. Its type's fields, then `cache_control` and, for a client of this dialect,
/// the block's other fields (`citations`, a document's `context`).
#[derive(Serialize)]
struct Block<'a> {
    #[serde(flatten)]
    kind: BlockKind<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<&'a RawValue>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockKind<'a> {
    Text {
        text: &'a str,
    },
    Image {
        source: Source<'a>,
    },
    Document {
        source: Source<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        title: Option<&'a str>,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: &'a RawValue,
    },
    ToolResult {
        tool_use_id: &'a str,
        content: Content<'a>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
    },
    Thinking {
        thinking: &'a str,
        signature: String,
    },
    RedactedThinking {
        data: String,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Source<'a> {
    Base64 { media_type: &'a str, data: String },
    Text { media_type: &'static str, data: &'a str },
    Url { url: &'a str },
    File { file_id: &'a str },
}

fn block(kind: BlockKind<'_>) -> Block<'_> {
    Block { kind, cache_control: None, extra: Map::new() }
}

/// The system blocks and the messages.
fn conversation(request: &GenerateRequest, ours: bool) -> Result<(Vec<Block<'_>>, Vec<Message<'_>>), Refusal> {
    if request.messages.is_empty() {
        return Ok((Vec::new(), vec![Message { role: "user", content: Content::Text(&request.prompt) }]));
    }
    let mut system = Vec::new();
    let mut messages: Vec<Message<'_>> = Vec::new();
    // The tool results waiting to go as one user message.
    let mut results: Vec<Block<'_>> = Vec::new();
    for (m, message) in request.messages.iter().enumerate() {
        let at = format!("messages[{m}]");
        if message.role != "tool" && !results.is_empty() {
            messages.push(Message { role: "user", content: Content::Blocks(std::mem::take(&mut results)) });
        }
        match message.role.as_str() {
            "system" | "developer" => system.extend(system_blocks(message, &at, ours)?),
            "tool" => results.push(block(BlockKind::ToolResult {
                tool_use_id: &message.tool_call_id,
                content: content(message, &at, ours)?,
                is_error: message.is_error,
            })),
            "assistant" => messages.push(Message { role: "assistant", content: assistant(message, &at, ours)? }),
            _ => messages.push(Message { role: "user", content: content(message, &at, ours)? }),
        }
    }
    if !results.is_empty() {
        messages.push(Message { role: "user", content: Content::Blocks(results) });
    }
    Ok((system, messages))
}

/// A message's content: its text, or its parts as blocks.
fn content<'a>(message: &'a ChatMessage, at: &str, ours: bool) -> Result<Content<'a>, Refusal> {
    if message.parts.is_empty() {
        return Ok(Content::Text(&message.content));
    }
    let blocks = message
        .parts
        .iter()
        .enumerate()
        .map(|(p, part)| part_block(part, &format!("{at}.parts[{p}]"), ours))
        .collect::<Result<_, _>>()?;
    Ok(Content::Blocks(blocks))
}

/// A system or developer message as system blocks: text only.
fn system_blocks<'a>(message: &'a ChatMessage, at: &str, ours: bool) -> Result<Vec<Block<'a>>, Refusal> {
    match content(message, at, ours)? {
        Content::Text("") => Ok(Vec::new()),
        Content::Text(text) => Ok(vec![block(BlockKind::Text { text })]),
        Content::Blocks(blocks) => {
            if let Some(p) = blocks.iter().position(|b| !matches!(b.kind, BlockKind::Text { .. })) {
                return Err(refuse(format!("{at}.parts[{p}]"), "the Anthropic API takes only text in a system prompt"));
            }
            Ok(blocks)
        }
    }
}

/// An assistant message's blocks: reasoning, text, tool calls.
fn assistant<'a>(message: &'a ChatMessage, at: &str, ours: bool) -> Result<Content<'a>, Refusal> {
    if message.reasoning.is_empty() && message.tool_calls.is_empty() {
        return content(message, at, ours);
    }
    let mut blocks: Vec<Block<'a>> = message
        .reasoning
        .iter()
        .map(|reasoning| {
            block(if reasoning.text.is_empty() && !reasoning.redacted_content.is_empty() {
                BlockKind::RedactedThinking { data: String::from_utf8_lossy(&reasoning.redacted_content).into_owned() }
            } else {
                BlockKind::Thinking {
                    thinking: &reasoning.text,
                    signature: String::from_utf8_lossy(&reasoning.signature).into_owned(),
                }
            })
        })
        .collect();
    match content(message, at, ours)? {
        Content::Text("") => {}
        Content::Text(text) => blocks.push(block(BlockKind::Text { text })),
        Content::Blocks(parts) => blocks.extend(parts),
    }
    for (c, call) in message.tool_calls.iter().enumerate() {
        let input = arguments_object(
            &call.arguments,
            &format!("{at}.tool_calls[{c}]"),
            "the Anthropic API takes a JSON object",
        )?;
        blocks.push(block(BlockKind::ToolUse { id: &call.id, name: &call.name, input }));
    }
    Ok(Content::Blocks(blocks))
}

fn part_block<'a>(part: &'a ContentPart, at: &str, ours: bool) -> Result<Block<'a>, Refusal> {
    let kind = match &part.kind {
        Some(Kind::Text(text)) => BlockKind::Text { text },
        Some(Kind::Image(image)) => BlockKind::Image {
            source: match &image.source {
                Some(image::Source::Url(url)) => Source::Url { url },
                Some(image::Source::Data(data)) => Source::Base64 { media_type: &image.media_type, data: base64(data) },
                Some(image::Source::FileId(file_id)) => Source::File { file_id },
                None => return Err(refuse(format!("{at}.image"), "has no source")),
            },
        },
        Some(Kind::Document(document)) => BlockKind::Document {
            source: match &document.source {
                Some(document::Source::Url(url)) => Source::Url { url },
                Some(document::Source::Data(data)) => {
                    Source::Base64 { media_type: &document.media_type, data: base64(data) }
                }
                Some(document::Source::FileId(file_id)) => Source::File { file_id },
                Some(document::Source::Text(text)) => Source::Text { media_type: "text/plain", data: text },
                None => return Err(refuse(format!("{at}.document"), "has no source")),
            },
            title: Some(document.name.as_str()).filter(|n| !n.is_empty()),
        },
        None => return Err(refuse(at, "has no kind")),
    };
    Ok(Block {
        kind,
        cache_control: raw(&part.cache_control)?,
        extra: if ours { object(&part.extra) } else { Map::new() },
    })
}

/// Anthropic's `stop_reason`.
pub fn finish_reason(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("max_tokens" | "model_context_window_exceeded") => FinishReason::Length,
        Some("tool_use") => FinishReason::ToolCalls,
        Some("refusal") => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    }
}

/// `usage`, whole (a message's) or in part (a stream's `message_start`, then `message_delta`).
#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u32>,
    #[serde(default)]
    cache_read_input_tokens: Option<u32>,
}

impl WireUsage {
    /// `self` with what `later` reports.
    pub fn update(self, later: WireUsage) -> Self {
        Self {
            input_tokens: later.input_tokens.or(self.input_tokens),
            output_tokens: later.output_tokens.or(self.output_tokens),
            cache_creation_input_tokens: later.cache_creation_input_tokens.or(self.cache_creation_input_tokens),
            cache_read_input_tokens: later.cache_read_input_tokens.or(self.cache_read_input_tokens),
        }
    }

    /// The contract's usage, when the upstream reported its input and output.
    pub fn usage(self) -> Option<Usage> {
        let (input, output) = (self.input_tokens?, self.output_tokens?);
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let written = self.cache_creation_input_tokens.unwrap_or(0);
        let prompt = input.saturating_add(read).saturating_add(written);
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: output,
            total_tokens: prompt.saturating_add(output),
            estimated: false,
            cached_prompt_tokens: read,
            cache_write_tokens: written,
            reasoning_tokens: 0,
        })
    }
}

/// A content block of an answer, or of a stream's `content_block_start` (unknown fields are
/// skipped).
#[derive(Debug, Deserialize)]
pub struct AnswerBlock<'a> {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub thinking: Option<String>,
    #[serde(default)]
    pub signature: Option<String>,
    #[serde(default)]
    pub data: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// Borrowed raw: the arguments go on byte for byte.
    #[serde(default, borrow)]
    pub input: Option<&'a RawValue>,
}

/// A message's fields llmesh reads; the others become extensions.
pub struct Answer<'a> {
    pub content: Vec<AnswerBlock<'a>>,
    pub stop_reason: Option<String>,
    pub usage: Option<WireUsage>,
    pub extensions: Option<Extensions>,
}

/// The top-level fields every message has, not kept as extensions.
const COMMON_FIELDS: &[&str] = &["id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"];

/// Reads a message. Field by field from its raw text, as the arguments must stay raw (serde's
/// `flatten` would buffer them into values).
pub fn answer(body: &[u8]) -> Result<Answer<'_>, serde_json::Error> {
    let fields: BTreeMap<&str, &RawValue> = serde_json::from_slice(body)?;
    let content = match fields.get("content") {
        Some(raw) => serde_json::from_str(raw.get())?,
        None => Vec::new(),
    };
    let stop_reason = match fields.get("stop_reason") {
        Some(raw) => serde_json::from_str(raw.get())?,
        None => None,
    };
    let usage = match fields.get("usage") {
        Some(raw) => serde_json::from_str(raw.get())?,
        None => None,
    };
    let rest = fields
        .into_iter()
        .filter(|(name, _)| !COMMON_FIELDS.contains(name))
        .map(|(name, raw)| Ok((name.to_owned(), serde_json::from_str::<Value>(raw.get())?)))
        .collect::<Result<Map<String, Value>, serde_json::Error>>()?;
    Ok(Answer { content, stop_reason, usage, extensions: extensions(rest) })
}

/// The fields of `rest` worth keeping as extensions, if any.
pub fn extensions(rest: Map<String, Value>) -> Option<Extensions> {
    translate::extensions(rest, COMMON_FIELDS, DIALECT)
}

/// One server-sent event of a streamed message.
#[derive(Debug)]
pub enum StreamEvent<'a> {
    MessageStart(StartMessage),
    ContentBlockStart {
        index: u32,
        block: AnswerBlock<'a>,
    },
    ContentBlockDelta {
        index: u32,
        delta: Delta,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        stop_reason: Option<String>,
        usage: Option<WireUsage>,
    },
    MessageStop,
    Error(WireError),
    /// `ping`, and any event type the API adds.
    Other,
}

/// An event's fields, each read as its type needs: a block's `input` stays raw (serde's tagged
/// enums would buffer it into values).
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    index: Option<u32>,
    #[serde(default, borrow)]
    content_block: Option<AnswerBlock<'a>>,
    #[serde(default, borrow)]
    delta: Option<&'a RawValue>,
    #[serde(default)]
    message: Option<StartMessage>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<WireError>,
}

/// Reads one event's data.
pub fn stream_event(data: &str) -> Result<StreamEvent<'_>, serde_json::Error> {
    use serde::de::Error as _;
    let envelope: Envelope<'_> = serde_json::from_str(data)?;
    let missing = serde_json::Error::missing_field;
    let index = envelope.index.ok_or_else(|| missing("index"));
    Ok(match envelope.kind.as_str() {
        "message_start" => StreamEvent::MessageStart(envelope.message.ok_or_else(|| missing("message"))?),
        "content_block_start" => StreamEvent::ContentBlockStart {
            index: index?,
            block: envelope.content_block.ok_or_else(|| missing("content_block"))?,
        },
        "content_block_delta" => StreamEvent::ContentBlockDelta {
            index: index?,
            delta: serde_json::from_str(envelope.delta.ok_or_else(|| missing("delta"))?.get())?,
        },
        "content_block_stop" => StreamEvent::ContentBlockStop { index: index? },
        "message_delta" => {
            let delta: MessageDelta = match envelope.delta {
                Some(raw) => serde_json::from_str(raw.get())?,
                None => MessageDelta::default(),
            };
            StreamEvent::MessageDelta { stop_reason: delta.stop_reason, usage: envelope.usage }
        }
        "message_stop" => StreamEvent::MessageStop,
        "error" => StreamEvent::Error(envelope.error.ok_or_else(|| missing("error"))?),
        _ => StreamEvent::Other,
    })
}

#[derive(Debug, Deserialize)]
pub struct StartMessage {
    #[serde(default)]
    pub usage: Option<WireUsage>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type")]
pub enum Delta {
    #[serde(rename = "text_delta")]
    Text { text: String },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: String },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: String },
    #[serde(rename = "signature_delta")]
    Signature { signature: String },
    /// `citations_delta`, and any delta type the API adds.
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Deserialize)]
struct MessageDelta {
    #[serde(default)]
    pub stop_reason: Option<String>,
}

/// An `error` event's (and an error body's) `error`.
#[derive(Debug, Deserialize)]
pub struct WireError {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub message: String,
}

/// A reasoning delta of block `index`.
pub fn reasoning_delta(index: u32) -> ReasoningDelta {
    ReasoningDelta { index, ..Default::default() }
}

/// A tool-call delta of call `index`.
pub fn tool_call_delta(index: u32) -> ToolCallDelta {
    ToolCallDelta { index, ..Default::default() }
}

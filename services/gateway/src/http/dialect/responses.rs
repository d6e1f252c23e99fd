//! OpenAI's Responses API: `POST /v1/responses`, as the official SDKs (`client.responses.create`,
//! `.stream`) and the Agents SDK call it, stateless.
//!
//! Request fields taken: `model`, `input` (a string, or items: messages with `input_text`,
//! `input_image`, `input_file`, `output_text` and `refusal` parts; `function_call`;
//! `function_call_output`; `reasoning` with its summary and `encrypted_content`), `instructions`
//! (a system message first), `tools` (function tools), `tool_choice`, `parallel_tool_calls`,
//! `text.format` (`text`, `json_object`, `json_schema`), `reasoning` (`effort`, `summary`),
//! `max_output_tokens`, `temperature`, `top_p`, `user`, `metadata`, `stream`. A conversation
//! llmesh would have to keep is refused, naming the field (`previous_response_id`,
//! `conversation`, `background`, a stored `prompt`), as are hosted tools and item types llmesh
//! does not serve; nothing is stored, whatever `store` says. Any other top-level field (`store`,
//! `include`, `truncation`, `service_tier`, ...) is kept as the request's `responses` extensions
//! (in the cache key; no upstream speaks this dialect, so none gets them) and named in
//! `x-llmesh-unmapped-fields`.
//!
//! The answer is a `response` object: `reasoning` items (their text as a summary), a `message`
//! with `output_text`, then `function_call` items. Streamed: `response.created`,
//! `response.in_progress`, then for each item `response.output_item.added`, its deltas
//! (`response.output_text.delta`, `response.function_call_arguments.delta`,
//! `response.reasoning_summary_text.delta`) and their `.done` events, `response.output_item.done`,
//! and `response.completed` with the whole response; a failure mid-way is an `error` event.

use std::collections::HashMap;

use base64::Engine as _;
use llmesh_proto::{
    common::v1::{
        ChatMessage, ContentPart, Document, FinishReason, ImageDetail, Reasoning, ReasoningOptions, ResponseFormat,
        ResponseFormatType, Tool, ToolCall, ToolChoice, ToolChoiceMode, Usage, content_part, document,
    },
    gateway::v1::GenerateStreamResponse,
    generation::v1::{GenerateRequest, GenerateResponse},
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{
    Context, Dialect, OpenAi, Parsed, Problem, Unmapped,
    fields::{self, Listed, Obj, TextOr, path, refuse_rest, required},
    finish_reason, openai_content,
    sse::{self, Events},
};

/// OpenAI's Responses dialect.
#[derive(Debug, Clone, Copy)]
pub struct Responses;

/// The extensions' dialect name: no upstream speaks it.
const DIALECT: &str = "responses";

impl Dialect for Responses {
    const ROUTE: &'static str = "/v1/responses";
    const CACHE_HEADER: bool = true;
    type Options = ();
    type Events = ResponseEvents;

    fn parse(body: &[u8], context: &Context<'_>) -> Result<Parsed<()>, Problem> {
        let (request, stream, unmapped) = parse(fields::parse(body, context.max_objects)?, context.cache)?;
        Ok(Parsed { request, stream, options: (), unmapped })
    }

    type Rendered<'a> = Value;

    fn render(response: &GenerateResponse, _: &(), created: u64) -> Value {
        let output = output_items(&response.id, &response.reasoning, &response.text, &response.tool_calls);
        response_object(
            &response.id,
            &response.model,
            created,
            "completed",
            response.finish_reason,
            output,
            response.usage,
        )
    }

    fn events(first: &GenerateStreamResponse, _: (), created: u64) -> ResponseEvents {
        ResponseEvents {
            id: first.id.clone(),
            model: first.model.clone(),
            created,
            sequence: 0,
            items: Vec::new(),
            open: false,
            finish: 0,
            usage: None,
        }
    }

    /// OpenAI's error body, as the Chat Completions route gives it.
    fn error_body(problem: &Problem) -> Value {
        OpenAi::error_body(problem)
    }
}

/// A responses request, as the client sends it.
#[derive(Deserialize)]
struct Body {
    #[serde(default, deserialize_with = "fields::opt")]
    model: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    input: Option<TextOr<Obj<Item>, serde::de::IgnoredAny>>,
    #[serde(default, deserialize_with = "fields::opt")]
    instructions: Option<String>,
    #[serde(default, deserialize_with = "fields::objects")]
    tools: Option<Vec<ToolBody>>,
    #[serde(default, deserialize_with = "fields::opt")]
    tool_choice: Option<TextOr<serde::de::IgnoredAny, ChoiceBody>>,
    #[serde(default, deserialize_with = "fields::opt")]
    parallel_tool_calls: Option<bool>,
    #[serde(default, deserialize_with = "fields::object")]
    text: Option<TextBody>,
    #[serde(default, deserialize_with = "fields::object")]
    reasoning: Option<ReasoningBody>,
    #[serde(default, deserialize_with = "fields::opt")]
    max_output_tokens: Option<u32>,
    #[serde(default, deserialize_with = "fields::opt")]
    temperature: Option<f32>,
    #[serde(default, deserialize_with = "fields::opt")]
    top_p: Option<f32>,
    #[serde(default, deserialize_with = "fields::opt")]
    user: Option<String>,
    #[serde(default, deserialize_with = "fields::whole")]
    metadata: Option<HashMap<String, String>>,
    #[serde(default, deserialize_with = "fields::opt")]
    stream: Option<bool>,
    #[serde(default, deserialize_with = "fields::opt")]
    previous_response_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    conversation: Option<Value>,
    #[serde(default, deserialize_with = "fields::opt")]
    background: Option<bool>,
    #[serde(default, deserialize_with = "fields::opt")]
    prompt: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// One of `input`: a message (with or without `type`), a function call or its output, or a
/// reasoning item.
#[derive(Deserialize)]
struct Item {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    role: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    content: Option<TextOr<Obj<PartBody>, serde::de::IgnoredAny>>,
    #[serde(default, deserialize_with = "fields::opt")]
    call_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    name: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    arguments: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    output: Option<TextOr<Obj<PartBody>, serde::de::IgnoredAny>>,
    #[serde(default, deserialize_with = "fields::objects")]
    summary: Option<Vec<SummaryBody>>,
    #[serde(default, deserialize_with = "fields::opt")]
    encrypted_content: Option<String>,
    /// An item's own id and status, echoed back from an answer: nothing to act on.
    #[serde(default, rename = "id")]
    _id: serde::de::IgnoredAny,
    #[serde(default, rename = "status")]
    _status: serde::de::IgnoredAny,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

impl Listed for Item {
    const LIST: &'static str = "input";
}

#[derive(Deserialize)]
struct PartBody {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    text: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    refusal: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    image_url: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    file_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    detail: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    file_data: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    file_url: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    filename: Option<String>,
    /// An answer's annotations and logprobs, echoed back.
    #[serde(default, rename = "annotations")]
    _annotations: serde::de::IgnoredAny,
    #[serde(default, rename = "logprobs")]
    _logprobs: serde::de::IgnoredAny,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
struct SummaryBody {
    #[serde(default, deserialize_with = "fields::opt")]
    text: Option<String>,
    #[serde(default, rename = "type")]
    _kind: serde::de::IgnoredAny,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

impl Listed for SummaryBody {
    const LIST: &'static str = "summary";
}

/// A function tool: `{type: "function", name, description, parameters, strict}`.
#[derive(Deserialize)]
struct ToolBody {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    name: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    description: Option<String>,
    #[serde(default, deserialize_with = "fields::json_text")]
    parameters: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    strict: Option<bool>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

impl Listed for ToolBody {
    const LIST: &'static str = "tools";
}

#[derive(Deserialize)]
struct ChoiceBody {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    name: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
struct TextBody {
    #[serde(default, deserialize_with = "fields::object")]
    format: Option<FormatBody>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// `text.format`: `{type, name, schema, strict, description}`.
#[derive(Deserialize)]
struct FormatBody {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    name: Option<String>,
    #[serde(default, deserialize_with = "fields::json_text")]
    schema: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    strict: Option<bool>,
    #[serde(default, deserialize_with = "fields::opt")]
    description: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
struct ReasoningBody {
    #[serde(default, deserialize_with = "fields::opt")]
    effort: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    summary: Option<String>,
    /// The older name of `summary`.
    #[serde(default, deserialize_with = "fields::opt")]
    generate_summary: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// A responses request, parsed.
fn parse(body: Body, cache: i32) -> Result<(GenerateRequest, bool, Unmapped), Problem> {
    let stateful = [
        ("previous_response_id", body.previous_response_id.is_some()),
        ("conversation", body.conversation.is_some()),
        ("background", body.background == Some(true)),
        ("prompt", body.prompt.is_some()),
    ];
    if let Some((name, _)) = stateful.iter().find(|(_, given)| *given) {
        return Err(Problem::invalid(
            *name,
            "llmesh keeps no responses, conversations or prompts: send the whole conversation in input",
        ));
    }
    let model = required(body.model, "", "model")?;
    let mut messages = Vec::new();
    if let Some(instructions) = body.instructions.filter(|i| !i.is_empty()) {
        messages.push(ChatMessage { role: "system".into(), content: instructions, ..Default::default() });
    }
    match required(body.input, "", "input")? {
        TextOr::Text(text) => messages.push(ChatMessage { role: "user".into(), content: text, ..Default::default() }),
        TextOr::List(items) => {
            for (i, Obj(item)) in items.into_iter().enumerate() {
                self::item(item, &format!("input[{i}]"), &mut messages)?;
            }
        }
        TextOr::Object(_) | TextOr::Other => {
            return Err(Problem::invalid("input", "must be a string or a list of items"));
        }
    }
    let tools = body
        .tools
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, tool)| self::tool(tool, &format!("tools[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rest = body.rest;
    let response_format = match body.text {
        None => None,
        Some(text) => {
            for (name, value) in fields::present(text.rest) {
                rest.insert(format!("text.{name}"), value);
            }
            text.format.map(format).transpose()?
        }
    };
    let reasoning = match body.reasoning {
        None => None,
        Some(reasoning) => {
            refuse_rest("reasoning", &reasoning.rest, &[])?;
            Some(ReasoningOptions {
                effort: reasoning.effort.unwrap_or_default(),
                summary: reasoning.summary.or(reasoning.generate_summary).unwrap_or_default(),
                ..Default::default()
            })
        }
    };
    let request = GenerateRequest {
        model,
        messages,
        max_tokens: body.max_output_tokens.unwrap_or(0),
        temperature: body.temperature,
        top_p: body.top_p,
        user: body.user.unwrap_or_default(),
        metadata: body.metadata.unwrap_or_default(),
        cache,
        tools,
        tool_choice: tool_choice(body.tool_choice)?,
        parallel_tool_calls: body.parallel_tool_calls,
        response_format,
        reasoning,
        ..Default::default()
    };
    let unmapped = Unmapped::of(fields::present(rest), DIALECT);
    let request = GenerateRequest { extensions: unmapped.extensions_for(&request, DIALECT), ..request };
    Ok((request, body.stream.unwrap_or(false), unmapped))
}

/// One input item into the conversation. What the assistant said, called and reasoned in a row
/// (a `reasoning`, a `message`, `function_call`s) is one assistant turn.
fn item(item: Item, at: &str, into: &mut Vec<ChatMessage>) -> Result<(), Problem> {
    let kind = item.kind.clone().unwrap_or_else(|| "message".into());
    let unread = |own: &[&str]| -> Vec<(&'static str, bool)> {
        [
            ("role", item.role.is_some()),
            ("content", item.content.is_some()),
            ("call_id", item.call_id.is_some()),
            ("name", item.name.is_some()),
            ("arguments", item.arguments.is_some()),
            ("output", item.output.is_some()),
            ("summary", item.summary.is_some()),
            ("encrypted_content", item.encrypted_content.is_some()),
        ]
        .into_iter()
        .filter(|(name, given)| *given && !own.contains(name))
        .collect()
    };
    match kind.as_str() {
        "message" => {
            refuse_rest(at, &item.rest, &unread(&["role", "content"]))?;
            let role = required(item.role, at, "role")?;
            if !matches!(role.as_str(), "user" | "assistant" | "system" | "developer") {
                return Err(Problem::invalid(
                    path(at, "role"),
                    format_args!("{role:?} is not one of user, assistant, system, developer"),
                ));
            }
            let (content, parts) = content(required(item.content, at, "content")?, &path(at, "content"))?;
            if role == "assistant" {
                append(assistant_turn(into), content, parts);
            } else {
                into.push(ChatMessage { role, content, parts, ..Default::default() });
            }
        }
        "function_call" => {
            refuse_rest(at, &item.rest, &unread(&["call_id", "name", "arguments"]))?;
            let call = ToolCall {
                id: required(item.call_id, at, "call_id")?,
                name: required(item.name, at, "name")?,
                arguments: item.arguments.unwrap_or_default(),
                ..Default::default()
            };
            assistant_turn(into).tool_calls.push(call);
        }
        "function_call_output" => {
            refuse_rest(at, &item.rest, &unread(&["call_id", "output"]))?;
            let call_id = required(item.call_id, at, "call_id")?;
            let (content, parts) = content(required(item.output, at, "output")?, &path(at, "output"))?;
            into.push(ChatMessage { role: "tool".into(), content, parts, tool_call_id: call_id, ..Default::default() });
        }
        "reasoning" => {
            refuse_rest(at, &item.rest, &unread(&["summary", "encrypted_content"]))?;
            let mut texts = Vec::new();
            for (j, summary) in item.summary.unwrap_or_default().into_iter().enumerate() {
                refuse_rest(&format!("{at}.summary[{j}]"), &summary.rest, &[])?;
                texts.extend(summary.text);
            }
            let reasoning = Reasoning {
                text: texts.join("\n\n"),
                redacted_content: item.encrypted_content.unwrap_or_default().into_bytes(),
                ..Default::default()
            };
            // A turn's reasoning comes before what it said: a new turn unless this one is bare.
            let bare = into.last().is_some_and(|m| {
                m.role == "assistant" && m.content.is_empty() && m.parts.is_empty() && m.tool_calls.is_empty()
            });
            if !bare {
                into.push(ChatMessage { role: "assistant".into(), ..Default::default() });
            }
            assistant_turn(into).reasoning.push(reasoning);
        }
        other => {
            return Err(Problem::invalid(
                path(at, "type"),
                format_args!(
                    "{other:?} items are not supported by llmesh (\"message\", \"function_call\", \"function_call_output\", \"reasoning\")"
                ),
            ));
        }
    }
    Ok(())
}

/// Adds a message's content to a turn that may hold some already: texts joined by a newline, as
/// a message's text parts are; parts, the turn's text first, when either has any (a message has
/// `content` or `parts`, never both).
fn append(turn: &mut ChatMessage, content: String, parts: Vec<ContentPart>) {
    if parts.is_empty() && turn.parts.is_empty() {
        if !turn.content.is_empty() && !content.is_empty() {
            turn.content.push('\n');
        }
        turn.content.push_str(&content);
        return;
    }
    if !turn.content.is_empty() {
        let text = std::mem::take(&mut turn.content);
        turn.parts.push(ContentPart { kind: Some(content_part::Kind::Text(text)), ..Default::default() });
    }
    if !content.is_empty() {
        turn.parts.push(ContentPart { kind: Some(content_part::Kind::Text(content)), ..Default::default() });
    }
    turn.parts.extend(parts);
}

/// The assistant turn being written: the last message when it is the assistant's, else a new one.
fn assistant_turn(into: &mut Vec<ChatMessage>) -> &mut ChatMessage {
    if into.last().is_none_or(|m| m.role != "assistant") {
        into.push(ChatMessage { role: "assistant".into(), ..Default::default() });
    }
    let last = into.len() - 1;
    &mut into[last]
}

/// A message's (or a function output's) content: plain text, or parts (text alone joined by
/// newlines, so that the cache key is the one of the same text sent plainly).
fn content(
    given: TextOr<Obj<PartBody>, serde::de::IgnoredAny>,
    at: &str,
) -> Result<(String, Vec<ContentPart>), Problem> {
    let listed = match given {
        TextOr::Text(text) => return Ok((text, Vec::new())),
        TextOr::List(listed) => listed,
        TextOr::Object(_) | TextOr::Other => return Err(Problem::invalid(at, "must be a string or a list of parts")),
    };
    let parts = listed
        .into_iter()
        .enumerate()
        .map(|(j, Obj(part))| self::part(part, &format!("{at}[{j}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let texts: Option<Vec<&str>> = parts
        .iter()
        .map(|part| match &part.kind {
            Some(content_part::Kind::Text(text)) => Some(text.as_str()),
            _ => None,
        })
        .collect();
    Ok(match texts {
        Some(texts) => (texts.join("\n"), Vec::new()),
        None => (String::new(), parts),
    })
}

fn part(part: PartBody, at: &str) -> Result<ContentPart, Problem> {
    let present = [
        ("text", part.text.is_some()),
        ("refusal", part.refusal.is_some()),
        ("image_url", part.image_url.is_some()),
        ("file_id", part.file_id.is_some()),
        ("detail", part.detail.is_some()),
        ("file_data", part.file_data.is_some()),
        ("file_url", part.file_url.is_some()),
        ("filename", part.filename.is_some()),
    ];
    let kind = required(part.kind, at, "type")?;
    let (parsed, own): (content_part::Kind, &[&str]) = match kind.as_str() {
        "input_text" | "output_text" => (content_part::Kind::Text(required(part.text, at, "text")?), &["text"]),
        "refusal" => (content_part::Kind::Text(required(part.refusal, at, "refusal")?), &["refusal"]),
        "input_image" => {
            let detail = match part.detail.as_deref() {
                None | Some("auto") => ImageDetail::Auto,
                Some("low") => ImageDetail::Low,
                Some("high") => ImageDetail::High,
                Some(other) => {
                    return Err(Problem::invalid(
                        path(at, "detail"),
                        format_args!("{other:?} is not one of auto, low, high"),
                    ));
                }
            };
            let image = match (part.image_url, part.file_id) {
                (Some(url), None) => openai_content::image_of(&url, detail, &path(at, "image_url"))?,
                (None, Some(id)) => llmesh_proto::common::v1::Image {
                    source: Some(llmesh_proto::common::v1::image::Source::FileId(id)),
                    detail: detail.into(),
                    ..Default::default()
                },
                _ => return Err(Problem::invalid(at, "needs one of image_url, file_id")),
            };
            (content_part::Kind::Image(image), &["image_url", "file_id", "detail"])
        }
        "input_file" => {
            let name = part.filename.unwrap_or_default();
            let document = match (part.file_id, part.file_data, part.file_url) {
                (Some(id), None, None) => {
                    Document { source: Some(document::Source::FileId(id)), name, ..Default::default() }
                }
                (None, Some(data), None) => {
                    let within = path(at, "file_data");
                    let (media_type, encoded) = data
                        .strip_prefix("data:")
                        .and_then(|d| d.split_once(";base64,"))
                        .ok_or_else(|| Problem::invalid(&within, "must be data:<media type>;base64,<data>"))?;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map_err(|error| Problem::invalid(&within, format_args!("not valid base64 ({error})")))?;
                    Document { source: Some(document::Source::Data(bytes)), media_type: media_type.to_string(), name }
                }
                (None, None, Some(url)) => {
                    Document { source: Some(document::Source::Url(url)), name, ..Default::default() }
                }
                _ => return Err(Problem::invalid(at, "needs one of file_id, file_data, file_url")),
            };
            (content_part::Kind::Document(document), &["file_id", "file_data", "file_url", "filename"])
        }
        other => {
            return Err(Problem::invalid(
                path(at, "type"),
                format_args!(
                    "{other:?} parts are not supported by llmesh (\"input_text\", \"input_image\", \"input_file\", \"output_text\", \"refusal\")"
                ),
            ));
        }
    };
    // A field of another kind of part is one this kind does not take.
    let unread: Vec<(&str, bool)> = present.into_iter().filter(|(name, given)| *given && !own.contains(name)).collect();
    refuse_rest(at, &part.rest, &unread)?;
    Ok(ContentPart { kind: Some(parsed), ..Default::default() })
}

fn tool(body: ToolBody, at: &str) -> Result<Tool, Problem> {
    let kind = required(body.kind, at, "type")?;
    if kind != "function" {
        return Err(Problem::invalid(
            path(at, "type"),
            format_args!("{kind:?} tools are not supported (only \"function\")"),
        ));
    }
    refuse_rest(at, &body.rest, &[])?;
    Ok(Tool {
        name: required(body.name, at, "name")?,
        description: body.description.unwrap_or_default(),
        parameters: body.parameters.unwrap_or_default(),
        strict: body.strict,
        ..Default::default()
    })
}

/// `tool_choice`: a mode's name, or `{type: "function", name}`.
fn tool_choice(body: Option<TextOr<serde::de::IgnoredAny, ChoiceBody>>) -> Result<Option<ToolChoice>, Problem> {
    let at = "tool_choice";
    match body {
        None => Ok(None),
        Some(TextOr::Text(name)) => openai_content::tool_mode(&name),
        Some(TextOr::Object(choice)) => {
            let kind = required(choice.kind, at, "type")?;
            if kind != "function" {
                return Err(Problem::invalid(path(at, "type"), "only \"function\" is supported"));
            }
            refuse_rest(at, &choice.rest, &[])?;
            Ok(Some(ToolChoice { mode: ToolChoiceMode::Tool.into(), name: required(choice.name, at, "name")? }))
        }
        Some(TextOr::List(_) | TextOr::Other) => Err(Problem::invalid(at, "must be a string or an object")),
    }
}

fn format(format: FormatBody) -> Result<ResponseFormat, Problem> {
    let at = "text.format";
    let kind = required(format.kind, at, "type")?;
    let kind = match kind.as_str() {
        "text" => ResponseFormatType::Text,
        "json_object" => ResponseFormatType::JsonObject,
        "json_schema" => ResponseFormatType::JsonSchema,
        other => {
            return Err(Problem::invalid(
                path(at, "type"),
                format_args!("{other:?} is not one of \"text\", \"json_object\", \"json_schema\""),
            ));
        }
    };
    refuse_rest(at, &format.rest, &[])?;
    let schema =
        if kind == ResponseFormatType::JsonSchema { required(format.schema, at, "schema")? } else { String::new() };
    Ok(ResponseFormat {
        r#type: kind.into(),
        name: format.name.unwrap_or_default(),
        schema,
        strict: format.strict,
        description: format.description.unwrap_or_default(),
    })
}

/// What a response's id is: the answer's under `resp_`.
fn response_id(id: &str) -> String {
    format!("resp_{id}")
}

/// The output items of an answer: reasoning, the message, the function calls.
fn output_items(id: &str, reasoning: &[Reasoning], text: &str, calls: &[ToolCall]) -> Vec<Value> {
    let mut items: Vec<Value> = reasoning.iter().enumerate().map(|(i, block)| reasoning_item(id, i, block)).collect();
    if !text.is_empty() || calls.is_empty() {
        items.push(message_item(id, text, "completed"));
    }
    items.extend(
        calls.iter().enumerate().map(|(i, call)| call_item(id, i, &call.id, &call.name, &call.arguments, "completed")),
    );
    items
}

fn reasoning_item(id: &str, index: usize, block: &Reasoning) -> Value {
    let mut item = json!({
        "type": "reasoning",
        "id": format!("rs_{id}_{index}"),
        "summary": if block.text.is_empty() { json!([]) } else { json!([{ "type": "summary_text", "text": block.text }]) },
    });
    if !block.redacted_content.is_empty() {
        item["encrypted_content"] = String::from_utf8_lossy(&block.redacted_content).into();
    }
    item
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "type": "message",
        "id": format!("msg_{id}"),
        "status": status,
        "role": "assistant",
        "content": [{ "type": "output_text", "text": text, "annotations": [] }],
    })
}

fn call_item(id: &str, index: usize, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "type": "function_call",
        "id": format!("fc_{id}_{index}"),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    })
}

/// A `response` object.
fn response_object(
    id: &str,
    model: &str,
    created: u64,
    status: &str,
    finish: i32,
    output: Vec<Value>,
    usage: Option<Usage>,
) -> Value {
    let (status, incomplete) = match finish_reason(finish) {
        FinishReason::Length if status == "completed" => ("incomplete", json!({ "reason": "max_output_tokens" })),
        FinishReason::ContentFilter if status == "completed" => ("incomplete", json!({ "reason": "content_filter" })),
        _ => (status, Value::Null),
    };
    json!({
        "id": response_id(id),
        "object": "response",
        "created_at": created,
        "status": status,
        "error": null,
        "incomplete_details": incomplete,
        "model": model,
        "output": output,
        "parallel_tool_calls": true,
        "tool_choice": "auto",
        "tools": [],
        "store": false,
        "usage": usage.map(usage_object),
    })
}

fn usage_object(usage: Usage) -> Value {
    json!({
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": { "cached_tokens": usage.cached_prompt_tokens },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": { "reasoning_tokens": usage.reasoning_tokens },
        "total_tokens": usage.total_tokens,
    })
}

/// What an item of a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputKind {
    Reasoning,
    Message,
    Call,
}

/// An item of a stream, as written so far. Its text grows by `push_str` (a copy of the whole
/// text per delta would make a long answer cost its length squared).
struct Output {
    kind: OutputKind,
    /// Its index among the items of its kind (a call's or a reasoning block's own index).
    index: u32,
    /// The message's text, the reasoning's summary, or the call's arguments.
    text: String,
    call_id: String,
    name: String,
    encrypted: Vec<u8>,
}

/// A stream's events (see the module's comment). The items are kept as they are written, for
/// their `.done` events and `response.completed`.
pub struct ResponseEvents {
    id: String,
    model: String,
    created: u64,
    sequence: u64,
    items: Vec<Output>,
    /// Whether the last item is still open.
    open: bool,
    finish: i32,
    usage: Option<Usage>,
}

impl ResponseEvents {
    fn send(&mut self, name: &str, mut value: Value, out: &mut Vec<u8>) {
        value["type"] = name.into();
        value["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        sse::event(name, &value, out);
    }

    /// Item `at` as the API writes it: whole, or `announced` (nothing in it yet).
    fn item(&self, at: usize, announced: bool) -> Value {
        let item = &self.items[at];
        let status = if announced { "in_progress" } else { "completed" };
        match item.kind {
            OutputKind::Reasoning => {
                let block = Reasoning {
                    text: item.text.clone(),
                    redacted_content: item.encrypted.clone(),
                    ..Default::default()
                };
                let mut value = reasoning_item(&self.id, item.index as usize, &block);
                if announced {
                    value["summary"] = json!([]);
                }
                value
            }
            OutputKind::Message => {
                let mut value = message_item(&self.id, &item.text, status);
                if announced {
                    value["content"] = json!([]);
                }
                value
            }
            OutputKind::Call => {
                let arguments = if announced { "" } else { item.text.as_str() };
                call_item(&self.id, item.index as usize, &item.call_id, &item.name, arguments, status)
            }
        }
    }

    fn object(&self, status: &str) -> Value {
        let output = (0..self.items.len()).map(|at| self.item(at, false)).collect();
        response_object(&self.id, &self.model, self.created, status, self.finish, output, self.usage)
    }

    /// The open item of `kind` and `index`, or a new one (the open item closed first).
    fn at(&mut self, kind: OutputKind, index: u32, out: &mut Vec<u8>) -> usize {
        if self.open && self.items.last().is_some_and(|item| item.kind == kind && item.index == index) {
            return self.items.len() - 1;
        }
        self.close_open(out);
        let at = self.items.len();
        let item = Output {
            kind,
            index,
            text: String::new(),
            call_id: String::new(),
            name: String::new(),
            encrypted: Vec::new(),
        };
        self.items.push(item);
        self.open = true;
        at
    }

    /// Announces item `at` (and, for a message or a reasoning block, its one part).
    fn announce(&mut self, at: usize, out: &mut Vec<u8>) {
        let item = self.item(at, true);
        let item_id = item["id"].clone();
        self.send("response.output_item.added", json!({ "output_index": at, "item": item }), out);
        match self.items[at].kind {
            OutputKind::Message => {
                let part = json!({ "type": "output_text", "text": "", "annotations": [] });
                let added = json!({ "item_id": item_id, "output_index": at, "content_index": 0, "part": part });
                self.send("response.content_part.added", added, out);
            }
            OutputKind::Reasoning => {
                let part = json!({ "type": "summary_text", "text": "" });
                let added = json!({ "item_id": item_id, "output_index": at, "summary_index": 0, "part": part });
                self.send("response.reasoning_summary_part.added", added, out);
            }
            OutputKind::Call => {}
        }
    }

    /// Ends the open item with its `.done` events.
    fn close_open(&mut self, out: &mut Vec<u8>) {
        if !std::mem::take(&mut self.open) {
            return;
        }
        let at = self.items.len() - 1;
        let item = self.item(at, false);
        let item_id = item["id"].clone();
        match self.items[at].kind {
            OutputKind::Message => {
                let part = item["content"][0].clone();
                let text = part["text"].clone();
                let done = json!({ "item_id": item_id, "output_index": at, "content_index": 0, "text": text });
                self.send("response.output_text.done", done, out);
                let done = json!({ "item_id": item_id, "output_index": at, "content_index": 0, "part": part });
                self.send("response.content_part.done", done, out);
            }
            OutputKind::Reasoning => {
                let part = json!({ "type": "summary_text", "text": self.items[at].text });
                let done = json!({ "item_id": item_id, "output_index": at, "summary_index": 0, "text": part["text"] });
                self.send("response.reasoning_summary_text.done", done, out);
                let done = json!({ "item_id": item_id, "output_index": at, "summary_index": 0, "part": part });
                self.send("response.reasoning_summary_part.done", done, out);
            }
            OutputKind::Call => {
                let done = json!({ "item_id": item_id, "output_index": at, "arguments": item["arguments"] });
                self.send("response.function_call_arguments.done", done, out);
            }
        }
        self.send("response.output_item.done", json!({ "output_index": at, "item": item }), out);
    }

    /// Item `at`'s id, as its events name it.
    fn item_id(&self, at: usize) -> String {
        let item = &self.items[at];
        match item.kind {
            OutputKind::Reasoning => format!("rs_{}_{}", self.id, item.index),
            OutputKind::Message => format!("msg_{}", self.id),
            OutputKind::Call => format!("fc_{}_{}", self.id, item.index),
        }
    }
}

impl Events for ResponseEvents {
    fn open(&mut self, _: &GenerateStreamResponse, out: &mut Vec<u8>) {
        let response = self.object("in_progress");
        self.send("response.created", json!({ "response": response }), out);
        self.send("response.in_progress", json!({ "response": response }), out);
    }

    fn chunk(&mut self, chunk: &GenerateStreamResponse, out: &mut Vec<u8>) {
        for delta in &chunk.reasoning {
            let at = self.at(OutputKind::Reasoning, delta.index, out);
            let new = self.items[at].text.is_empty() && self.items[at].encrypted.is_empty();
            if !delta.redacted_content.is_empty() {
                self.items[at].encrypted.clone_from(&delta.redacted_content);
            }
            if new {
                self.announce(at, out);
            }
            if !delta.text.is_empty() {
                self.items[at].text.push_str(&delta.text);
                let item_id = self.item_id(at);
                let event = json!({ "item_id": item_id, "output_index": at, "summary_index": 0, "delta": delta.text });
                self.send("response.reasoning_summary_text.delta", event, out);
            }
        }
        if !chunk.delta.is_empty() {
            let at = self.at(OutputKind::Message, 0, out);
            if self.items[at].text.is_empty() {
                self.announce(at, out);
            }
            self.items[at].text.push_str(&chunk.delta);
            let item_id = self.item_id(at);
            let event = json!({
                "item_id": item_id, "output_index": at, "content_index": 0, "delta": chunk.delta, "logprobs": [],
            });
            self.send("response.output_text.delta", event, out);
        }
        for delta in &chunk.tool_calls {
            let known = self.items.iter().rposition(|item| item.kind == OutputKind::Call && item.index == delta.index);
            let at = match known {
                Some(at) => at,
                None => {
                    let at = self.at(OutputKind::Call, delta.index, out);
                    self.items[at].call_id.clone_from(&delta.id);
                    self.items[at].name.clone_from(&delta.name);
                    self.announce(at, out);
                    at
                }
            };
            if !delta.arguments.is_empty() {
                self.items[at].text.push_str(&delta.arguments);
                let item_id = self.item_id(at);
                let event = json!({ "item_id": item_id, "output_index": at, "delta": delta.arguments });
                self.send("response.function_call_arguments.delta", event, out);
            }
        }
        if chunk.finish_reason != 0 {
            self.finish = chunk.finish_reason;
            self.usage = chunk.usage;
        }
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        self.close_open(out);
        if self.items.is_empty() {
            // An answer of nothing is an empty message, as the unary answer gives it.
            let at = self.at(OutputKind::Message, 0, out);
            self.announce(at, out);
            self.close_open(out);
        }
        let response = self.object("completed");
        let name = if response["status"] == "incomplete" { "response.incomplete" } else { "response.completed" };
        self.send(name, json!({ "response": response }), out);
    }

    fn fail(&mut self, problem: &Problem, out: &mut Vec<u8>) {
        let (_, code) = super::openai::error_type(problem);
        self.send("error", json!({ "code": code, "message": problem.message, "param": problem.param }), out);
    }
}

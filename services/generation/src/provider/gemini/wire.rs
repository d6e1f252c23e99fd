//! The Gemini API's wire format (`generateContent`), both ways: the body made from a
//! `GenerateRequest`, and the response (or each streamed response) read back.
//!
//! What is sent, field by field:
//! - `systemInstruction`: every `system` and `developer` message's text, in order.
//! - `contents`: `user` turns as `user`, `assistant` turns as `model`. Parts: `text`; images and
//!   documents from inline bytes as `inlineData`, from a URL or a file id (a Files API URI) as
//!   `fileData`, each with its media type (from the part, else from the URL's extension); a text
//!   document as text. An assistant's tool calls are `functionCall` parts (`id`, `name`, `args` the
//!   arguments byte for byte) with their `thoughtSignature` carried back. A run of `tool` messages
//!   is one `user` turn of `functionResponse` parts: the call's `id`, its function's name (from the
//!   call it answers), and `response` `{"output": TEXT}` (`{"error": TEXT}` when `is_error`).
//! - `tools` (`functionDeclarations`: `name`, `description`, `parametersJsonSchema` as the
//!   client's text), `toolConfig.functionCallingConfig` (`AUTO`, `NONE`, `ANY`; a named tool as
//!   `ANY` with `allowedFunctionNames`).
//! - `generationConfig`: `maxOutputTokens`, `temperature`, `topP`, `stopSequences`, `seed`;
//!   `responseMimeType` `application/json` for a JSON response format, with
//!   `responseJsonSchema` for a schema; `thinkingConfig` from the reasoning options
//!   (`thinkingBudget` from a budget, 0 for effort `none`; `thinkingLevel` from another effort;
//!   `includeThoughts` so that the reasoning comes back).
//! - Not sent (no field for them): `user`, `parallel_tool_calls`, `cache_control`, parts' and
//!   tools' `extra`, a message's `name`, an image's `detail`, reasoning blocks of the history, and
//!   every dialect's extensions.
//!
//! What is read: the first candidate's parts — `text` (with `thought: true` as reasoning),
//! `functionCall` (an id made up, `call_N`, when Gemini gives none; `args` byte for byte as the
//! arguments; `thoughtSignature` as the call's signature) —, `finishReason` (TOOL_CALLS when the
//! answer calls a tool), a prompt blocked by `promptFeedback` as CONTENT_FILTER, `usageMetadata`
//! (completion tokens count the thoughts, as the contract's do), an `error` as the failure its
//! code names, and the other top-level fields as `extensions` of dialect `gemini`.

use std::collections::BTreeMap;

use base64::Engine as _;
use llmesh_proto::{
    common::v1::{
        ChatMessage, ContentPart, Extensions, FinishReason, ResponseFormatType, ToolChoiceMode, Usage,
        content_part::Kind, document, image,
    },
    generation::v1::GenerateRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, value::RawValue};

use crate::provider::translate::{self, Refusal, arguments_object, base64, raw, refuse, text_of};

/// The dialect name of Gemini's extensions.
pub const DIALECT: &str = "gemini";

/// The body llmesh builds for a request, as JSON text (the model and the stream are in the URL).
pub fn body(request: &GenerateRequest, max_tokens: u32) -> Result<String, Refusal> {
    let (system, contents) = conversation(request)?;
    let declarations = request
        .tools
        .iter()
        .map(|tool| {
            Ok(Declaration {
                name: &tool.name,
                description: Some(tool.description.as_str()).filter(|d| !d.is_empty()),
                parameters_json_schema: raw(&tool.parameters)?,
            })
        })
        .collect::<Result<Vec<_>, Refusal>>()?;
    let tools = if declarations.is_empty() { Vec::new() } else { vec![Tools { function_declarations: declarations }] };
    let (response_mime_type, response_json_schema) = match &request.response_format {
        Some(format) => match ResponseFormatType::try_from(format.r#type) {
            Ok(ResponseFormatType::JsonSchema) => (Some("application/json"), raw(&format.schema)?),
            Ok(ResponseFormatType::JsonObject) => (Some("application/json"), None),
            _ => (None, None),
        },
        None => (None, None),
    };
    let thinking_config = request.reasoning.as_ref().map(|reasoning| {
        let off = reasoning.effort == "none";
        ThinkingConfig {
            thinking_budget: if off { Some(0) } else { reasoning.budget_tokens },
            thinking_level: Some(reasoning.effort.as_str())
                .filter(|effort| !effort.is_empty() && !off && reasoning.budget_tokens.is_none()),
            include_thoughts: !off,
        }
    });
    let body = Body {
        system_instruction: (!system.is_empty()).then_some(Content { role: None, parts: system }),
        contents,
        tool_config: tool_config(request),
        tools,
        generation_config: GenerationConfig {
            max_output_tokens: max_tokens,
            temperature: request.temperature,
            top_p: request.top_p,
            stop_sequences: &request.stop,
            seed: request.seed,
            response_mime_type,
            response_json_schema,
            thinking_config,
        },
    };
    Ok(serde_json::to_string(&body)?)
}

fn tool_config(request: &GenerateRequest) -> Option<ToolConfig<'_>> {
    let choice = request.tool_choice.as_ref()?;
    let (mode, allowed) = match ToolChoiceMode::try_from(choice.mode) {
        Ok(ToolChoiceMode::Auto) => ("AUTO", Vec::new()),
        Ok(ToolChoiceMode::None) => ("NONE", Vec::new()),
        Ok(ToolChoiceMode::Required) => ("ANY", Vec::new()),
        Ok(ToolChoiceMode::Tool) => ("ANY", vec![choice.name.as_str()]),
        _ => return None,
    };
    Some(ToolConfig { function_calling_config: CallingConfig { mode, allowed_function_names: allowed } })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Content<'a>>,
    contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tools<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<ToolConfig<'a>>,
    generation_config: GenerationConfig<'a>,
}

#[derive(Serialize)]
struct Content<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    parts: Vec<Part<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Part<'a> {
    #[serde(flatten)]
    data: PartData<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thought_signature: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum PartData<'a> {
    Text(&'a str),
    InlineData {
        #[serde(rename = "mimeType")]
        mime_type: &'a str,
        data: String,
    },
    FileData {
        #[serde(rename = "mimeType")]
        mime_type: &'a str,
        #[serde(rename = "fileUri")]
        file_uri: &'a str,
    },
    FunctionCall {
        #[serde(skip_serializing_if = "str::is_empty")]
        id: &'a str,
        name: &'a str,
        args: &'a RawValue,
    },
    FunctionResponse {
        #[serde(skip_serializing_if = "str::is_empty")]
        id: &'a str,
        name: &'a str,
        response: Map<String, Value>,
    },
}

fn part(data: PartData<'_>) -> Part<'_> {
    Part { data, thought_signature: None }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Tools<'a> {
    function_declarations: Vec<Declaration<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Declaration<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters_json_schema: Option<&'a RawValue>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolConfig<'a> {
    function_calling_config: CallingConfig<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CallingConfig<'a> {
    mode: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allowed_function_names: Vec<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig<'a> {
    max_output_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking_config: Option<ThinkingConfig<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ThinkingConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking_budget: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking_level: Option<&'a str>,
    include_thoughts: bool,
}

/// The system parts and the turns.
fn conversation(request: &GenerateRequest) -> Result<(Vec<Part<'_>>, Vec<Content<'_>>), Refusal> {
    if request.messages.is_empty() {
        let turn = Content { role: Some("user"), parts: vec![part(PartData::Text(&request.prompt))] };
        return Ok((Vec::new(), vec![turn]));
    }
    // Each tool call's function name, by its id: a function response must name its function.
    let names: BTreeMap<&str, &str> = request
        .messages
        .iter()
        .flat_map(|m| &m.tool_calls)
        .map(|call| (call.id.as_str(), call.name.as_str()))
        .collect();
    let mut system = Vec::new();
    let mut contents: Vec<Content<'_>> = Vec::new();
    let mut results: Vec<Part<'_>> = Vec::new();
    for (m, message) in request.messages.iter().enumerate() {
        let at = format!("messages[{m}]");
        if message.role != "tool" && !results.is_empty() {
            contents.push(Content { role: Some("user"), parts: std::mem::take(&mut results) });
        }
        match message.role.as_str() {
            "system" | "developer" => {
                for (p, part) in parts(message, &at)?.into_iter().enumerate() {
                    if !matches!(part.data, PartData::Text(_)) {
                        return Err(refuse(
                            format!("{at}.parts[{p}]"),
                            "Gemini takes only text in a system instruction",
                        ));
                    }
                    system.push(part);
                }
            }
            "tool" => results.push(function_response(message, &names, &at)?),
            "assistant" => contents.push(Content { role: Some("model"), parts: model_parts(message, &at)? }),
            _ => contents.push(Content { role: Some("user"), parts: parts(message, &at)? }),
        }
    }
    if !results.is_empty() {
        contents.push(Content { role: Some("user"), parts: results });
    }
    Ok((system, contents))
}

/// A message's content as parts.
fn parts<'a>(message: &'a ChatMessage, at: &str) -> Result<Vec<Part<'a>>, Refusal> {
    if message.parts.is_empty() {
        if message.content.is_empty() {
            return Ok(Vec::new());
        }
        return Ok(vec![part(PartData::Text(&message.content))]);
    }
    message.parts.iter().enumerate().map(|(p, content)| content_part(content, &format!("{at}.parts[{p}]"))).collect()
}

/// An assistant message's parts: its text, then its tool calls (reasoning is not sent back: the
/// signatures Gemini wants are the calls').
fn model_parts<'a>(message: &'a ChatMessage, at: &str) -> Result<Vec<Part<'a>>, Refusal> {
    let mut out = parts(message, at)?;
    for (c, call) in message.tool_calls.iter().enumerate() {
        let args = arguments_object(&call.arguments, &format!("{at}.tool_calls[{c}]"), "Gemini takes a JSON object")?;
        out.push(Part {
            data: PartData::FunctionCall { id: &call.id, name: &call.name, args },
            thought_signature: (!call.signature.is_empty()).then(|| base64(&call.signature)),
        });
    }
    Ok(out)
}

/// A tool message as a function response.
fn function_response<'a>(
    message: &'a ChatMessage,
    names: &BTreeMap<&str, &'a str>,
    at: &str,
) -> Result<Part<'a>, Refusal> {
    let name = names
        .get(message.tool_call_id.as_str())
        .copied()
        .or(Some(message.name.as_str()).filter(|n| !n.is_empty()))
        .ok_or_else(|| {
            refuse(format!("{at}.tool_call_id"), "answers no earlier tool call (Gemini needs the function's name)")
        })?;
    let text = if message.parts.is_empty() { message.content.clone() } else { text_of(&message.parts) };
    let key = if message.is_error { "error" } else { "output" };
    let response = Map::from_iter([(key.to_owned(), Value::String(text))]);
    Ok(part(PartData::FunctionResponse { id: &message.tool_call_id, name, response }))
}

fn content_part<'a>(content: &'a ContentPart, at: &str) -> Result<Part<'a>, Refusal> {
    let data = match &content.kind {
        Some(Kind::Text(text)) => PartData::Text(text),
        Some(Kind::Image(image)) => match &image.source {
            Some(image::Source::Data(data)) => {
                PartData::InlineData { mime_type: &image.media_type, data: base64(data) }
            }
            Some(image::Source::Url(uri) | image::Source::FileId(uri)) => {
                PartData::FileData { mime_type: media_type(&image.media_type, uri, at)?, file_uri: uri }
            }
            None => return Err(refuse(format!("{at}.image"), "has no source")),
        },
        Some(Kind::Document(document)) => match &document.source {
            Some(document::Source::Data(data)) => {
                PartData::InlineData { mime_type: &document.media_type, data: base64(data) }
            }
            Some(document::Source::Url(uri) | document::Source::FileId(uri)) => {
                PartData::FileData { mime_type: media_type(&document.media_type, uri, at)?, file_uri: uri }
            }
            Some(document::Source::Text(text)) => PartData::Text(text),
            None => return Err(refuse(format!("{at}.document"), "has no source")),
        },
        None => return Err(refuse(at, "has no kind")),
    };
    Ok(part(data))
}

/// The media type of a file Gemini fetches: the part's, else one the URL's extension names.
fn media_type<'a>(given: &'a str, uri: &str, at: &str) -> Result<&'a str, Refusal> {
    if !given.is_empty() {
        return Ok(given);
    }
    let path = uri.split(['?', '#']).next().unwrap_or_default().to_ascii_lowercase();
    let extension = path.rsplit_once('.').map(|(_, extension)| extension).unwrap_or_default();
    Ok(match extension {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "heic" => "image/heic",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        _ => return Err(refuse(format!("{at}.media_type"), "Gemini needs the media type of a file it fetches")),
    })
}

/// Gemini's `finishReason`; `calls` when the answer calls a tool (Gemini says STOP).
pub fn finish_reason(reason: Option<&str>, calls: bool) -> FinishReason {
    match reason {
        Some("MAX_TOKENS") => FinishReason::Length,
        Some("SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" | "LANGUAGE") => {
            FinishReason::ContentFilter
        }
        _ if calls => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    }
}

/// `usageMetadata`.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireUsage {
    #[serde(default)]
    prompt_token_count: Option<u32>,
    #[serde(default)]
    candidates_token_count: Option<u32>,
    #[serde(default)]
    total_token_count: Option<u32>,
    #[serde(default)]
    cached_content_token_count: Option<u32>,
    #[serde(default)]
    thoughts_token_count: Option<u32>,
}

impl WireUsage {
    /// The contract's usage, when Gemini counted the prompt.
    pub fn usage(self) -> Option<Usage> {
        let prompt = self.prompt_token_count?;
        let thoughts = self.thoughts_token_count.unwrap_or(0);
        let completion = self.candidates_token_count.unwrap_or(0).saturating_add(thoughts);
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: self.total_token_count.unwrap_or(prompt.saturating_add(completion)),
            estimated: false,
            cached_prompt_tokens: self.cached_content_token_count.unwrap_or(0),
            cache_write_tokens: 0,
            reasoning_tokens: thoughts,
        })
    }
}

/// A part of an answer (what llmesh reads of it).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnswerPart<'a> {
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub thought: Option<bool>,
    #[serde(default)]
    pub thought_signature: Option<String>,
    #[serde(default, borrow)]
    pub function_call: Option<FunctionCall<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct FunctionCall<'a> {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// Borrowed raw: the arguments go on byte for byte.
    #[serde(default, borrow)]
    pub args: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate<'a> {
    #[serde(default, borrow)]
    content: Option<CandidateContent<'a>>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CandidateContent<'a> {
    #[serde(default, borrow)]
    parts: Vec<AnswerPart<'a>>,
}

/// An `error` in a body.
#[derive(Debug, Deserialize)]
pub struct WireError {
    #[serde(default)]
    pub code: u16,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub status: String,
}

/// A response (whole, or one of a stream), as llmesh reads it.
pub struct Response<'a> {
    pub parts: Vec<AnswerPart<'a>>,
    pub finish_reason: Option<String>,
    /// `promptFeedback.blockReason`: the prompt was refused.
    pub blocked: bool,
    pub usage: Option<WireUsage>,
    pub error: Option<WireError>,
    pub extensions: Option<Extensions>,
}

/// The top-level fields not kept as extensions.
const READ_FIELDS: &[&str] = &["candidates", "usageMetadata", "promptFeedback", "error"];

/// Reads a response. Field by field from its raw text, as the arguments must stay raw (serde's
/// `flatten` would buffer them into values).
pub fn response(body: &[u8]) -> Result<Response<'_>, serde_json::Error> {
    let fields: BTreeMap<&str, &RawValue> = serde_json::from_slice(body)?;
    let candidates: Vec<Candidate<'_>> = match fields.get("candidates") {
        Some(raw) => serde_json::from_str(raw.get())?,
        None => Vec::new(),
    };
    let usage = match fields.get("usageMetadata") {
        Some(raw) => Some(serde_json::from_str(raw.get())?),
        None => None,
    };
    let error = match fields.get("error") {
        Some(raw) => Some(serde_json::from_str(raw.get())?),
        None => None,
    };
    let blocked = match fields.get("promptFeedback") {
        Some(raw) => serde_json::from_str::<Value>(raw.get())?.get("blockReason").is_some_and(|r| !r.is_null()),
        None => false,
    };
    let rest: Map<String, Value> = fields
        .into_iter()
        .filter(|(name, _)| !READ_FIELDS.contains(name))
        .map(|(name, raw)| Ok((name.to_owned(), serde_json::from_str::<Value>(raw.get())?)))
        .collect::<Result<_, serde_json::Error>>()?;
    let extensions = translate::extensions(rest, READ_FIELDS, DIALECT);
    let (parts, finish_reason) = match candidates.into_iter().next() {
        Some(candidate) => (candidate.content.map(|c| c.parts).unwrap_or_default(), candidate.finish_reason),
        None => (Vec::new(), None),
    };
    Ok(Response { parts, finish_reason, blocked, usage, error, extensions })
}

/// A thought signature as the bytes the contract carries (Gemini sends them base64-encoded);
/// one that is not base64 is kept as its text.
pub fn signature(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(text).unwrap_or_else(|_| text.as_bytes().to_vec())
}

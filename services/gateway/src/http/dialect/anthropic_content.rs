//! Anthropic Messages' content blocks, tools and thinking, to and from the contract
//! (`docs/CONTRACT.md`).
//!
//! In: `tools` (`{name, description, input_schema, cache_control}`; a tool's other fields, such as
//! `defer_loading`, are kept as its `extra`), `tool_choice` (`auto`, `any`, `tool`, `none`;
//! `disable_parallel_tool_use`), `thinking` (`enabled` with `budget_tokens`; another type, such as
//! `adaptive`, as reasoning at the provider's default effort), `output_config.format` (a JSON schema
//! the answer follows: the contract's response format); blocks `text`, `image` and
//! `document` (base64, URL or text sources), `tool_use` (assistant), `tool_result` (user: one
//! `tool` message per result, before the rest of the message), `thinking` and `redacted_thinking`
//! (carried back with their signatures).
//! Out: `thinking`, `text` and `tool_use` blocks (the input as the JSON object the arguments are),
//! stop reason `tool_use`, and usage with cache reads and writes.

use std::borrow::Cow;

use base64::Engine as _;
use llmesh_proto::common::v1::{
    ChatMessage, ContentPart, Document, Image, Reasoning, ReasoningOptions, ResponseFormat, ResponseFormatType, Tool,
    ToolCall, ToolChoice, ToolChoiceMode, Usage, content_part, document, image,
};
use serde::{Deserialize, Serialize, de::IgnoredAny};
use serde_json::{Map, Value, json};

use super::{
    Problem,
    fields::{self, Listed, Obj, TextOr, path, refuse_rest, required},
};

/// One of `tools`: `{name, description, input_schema, cache_control}`, the rest kept as its `extra`.
#[derive(Deserialize)]
pub struct ToolBody {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    name: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    description: Option<String>,
    #[serde(default, deserialize_with = "fields::json_text")]
    input_schema: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    cache_control: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

impl Listed for ToolBody {
    const LIST: &'static str = "tools";
}

/// `tool_choice`.
#[derive(Deserialize)]
pub struct ChoiceBody {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    name: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    disable_parallel_tool_use: Option<bool>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// `thinking`.
#[derive(Deserialize)]
pub struct ThinkingBody {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    budget_tokens: Option<u32>,
    #[serde(default, deserialize_with = "fields::opt")]
    display: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// `output_config`: its `format` is read; its other keys (`effort`, ...) are carried.
#[derive(Deserialize)]
pub struct OutputConfigBody {
    #[serde(default, deserialize_with = "fields::object")]
    format: Option<OutputFormatBody>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// `output_config.format`: `{type: "json_schema", schema}`.
#[derive(Deserialize)]
pub struct OutputFormatBody {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::json_text")]
    schema: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// A message's content (or `system`, or a tool result's): a string or blocks.
pub type ContentBody = TextOr<Obj<Block>, IgnoredAny>;

/// A content block of any type: the fields of every type, each type taking its own
/// ([`Block::unread`] names the others').
#[derive(Deserialize)]
pub struct Block {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    cache_control: Option<Value>,
    #[serde(default, deserialize_with = "fields::opt")]
    text: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    citations: Option<Value>,
    #[serde(default, deserialize_with = "fields::object")]
    source: Option<Source>,
    #[serde(default, deserialize_with = "fields::opt")]
    context: Option<Value>,
    #[serde(default, deserialize_with = "fields::opt")]
    title: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    name: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    input: Option<Value>,
    #[serde(default, deserialize_with = "fields::opt")]
    tool_use_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    is_error: Option<bool>,
    #[serde(default, deserialize_with = "fields::opt")]
    content: Option<ContentBody>,
    #[serde(default, deserialize_with = "fields::opt")]
    thinking: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    signature: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    data: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

impl Block {
    /// The fields present that a block of type `kind` does not take (all of them for a type llmesh
    /// does not know), by name.
    fn unread(&self, kind: &str) -> Vec<(&'static str, bool)> {
        let own: &[&str] = match kind {
            "text" => &["text", "citations"],
            "image" => &["source"],
            "document" => &["source", "context", "citations", "title"],
            "tool_use" => &["id", "name", "input"],
            "tool_result" => &["tool_use_id", "is_error", "content"],
            "thinking" => &["thinking", "signature"],
            "redacted_thinking" => &["data"],
            _ => &[],
        };
        [
            ("citations", self.citations.is_some()),
            ("content", self.content.is_some()),
            ("context", self.context.is_some()),
            ("data", self.data.is_some()),
            ("id", self.id.is_some()),
            ("input", self.input.is_some()),
            ("is_error", self.is_error.is_some()),
            ("name", self.name.is_some()),
            ("signature", self.signature.is_some()),
            ("source", self.source.is_some()),
            ("text", self.text.is_some()),
            ("thinking", self.thinking.is_some()),
            ("title", self.title.is_some()),
            ("tool_use_id", self.tool_use_id.is_some()),
        ]
        .into_iter()
        .filter(|(name, present)| *present && !own.contains(name))
        .collect()
    }
}

/// An image's or a document's `source`.
#[derive(Deserialize)]
pub struct Source {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    media_type: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    data: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    url: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// `tools`.
pub fn tools(listed: Option<Vec<ToolBody>>) -> Result<Vec<Tool>, Problem> {
    listed
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, tool)| {
            let at = format!("tools[{i}]");
            if let Some(kind) = tool.kind
                && kind != "custom"
            {
                return Err(Problem::invalid(
                    path(&at, "type"),
                    format_args!("{kind:?} tools are Anthropic's own and not served by llmesh (only custom tools)"),
                ));
            }
            Ok(Tool {
                name: required(tool.name, &at, "name")?,
                description: tool.description.unwrap_or_default(),
                parameters: tool.input_schema.unwrap_or_default(),
                cache_control: json_text(tool.cache_control),
                extra: fields::rest_text(tool.rest),
                ..Default::default()
            })
        })
        .collect()
}

/// `tool_choice`, and whether parallel tool use is allowed.
pub fn tool_choice(choice: Option<ChoiceBody>) -> Result<(Option<ToolChoice>, Option<bool>), Problem> {
    let Some(choice) = choice else { return Ok((None, None)) };
    let at = "tool_choice";
    let kind = required(choice.kind, at, "type")?;
    let named = kind == "tool";
    let (mode, name) = match kind.as_str() {
        "auto" => (ToolChoiceMode::Auto, String::new()),
        "any" => (ToolChoiceMode::Required, String::new()),
        "none" => (ToolChoiceMode::None, String::new()),
        "tool" => (ToolChoiceMode::Tool, required(choice.name.clone(), at, "name")?),
        _ => {
            return Err(Problem::invalid(
                path(at, "type"),
                format_args!("{kind:?} is not one of auto, any, tool, none"),
            ));
        }
    };
    let parallel = choice.disable_parallel_tool_use.map(|disabled| !disabled);
    refuse_rest(at, &choice.rest, &[("name", !named && choice.name.is_some())])?;
    Ok((Some(ToolChoice { mode: mode.into(), name }), parallel))
}

/// `thinking`: a token budget when enabled; another kind (`adaptive`: the model decides how much)
/// as reasoning at the provider's default effort — not as an effort of that name, which no
/// provider of another dialect knows —, its `display` as the summary.
pub fn thinking(thinking: Option<ThinkingBody>) -> Result<Option<ReasoningOptions>, Problem> {
    let Some(thinking) = thinking else { return Ok(None) };
    let at = "thinking";
    let kind = required(thinking.kind, at, "type")?;
    let enabled = kind == "enabled";
    let options = match kind.as_str() {
        "disabled" => None,
        "enabled" => Some(ReasoningOptions { budget_tokens: thinking.budget_tokens, ..Default::default() }),
        _ => Some(ReasoningOptions::default()),
    };
    let options = match (options, thinking.display) {
        (Some(options), Some(display)) => Some(ReasoningOptions { summary: display, ..options }),
        (options, _) => options,
    };
    refuse_rest(at, &thinking.rest, &[("budget_tokens", !enabled && thinking.budget_tokens.is_some())])?;
    Ok(options)
}

/// What `output_config` holds: its `format` as the contract's response format (structured
/// output), and its other keys, to be carried as they came (none: `None`).
type OutputConfig = (Option<ResponseFormat>, Option<Map<String, Value>>);

/// Reads `output_config`.
pub fn output_config(config: Option<OutputConfigBody>) -> Result<OutputConfig, Problem> {
    let Some(config) = config else { return Ok((None, None)) };
    let rest = Some(fields::present(config.rest)).filter(|rest| !rest.is_empty());
    let Some(format) = config.format else { return Ok((None, rest)) };
    let at = "output_config.format";
    let kind = required(format.kind, at, "type")?;
    if kind != "json_schema" {
        return Err(Problem::invalid(path(at, "type"), format_args!("{kind:?} is not \"json_schema\"")));
    }
    let schema = required(format.schema, at, "schema")?;
    refuse_rest(at, &format.rest, &[])?;
    let format = ResponseFormat { r#type: ResponseFormatType::JsonSchema.into(), schema, ..Default::default() };
    Ok((Some(format), rest))
}

/// `system` given as blocks: text blocks only (a mistake names its block).
pub fn system_blocks(blocks: &[Obj<Block>]) -> Result<(), Problem> {
    for (i, Obj(block)) in blocks.iter().enumerate() {
        let at = format!("system[{i}]");
        let kind = block.kind.as_deref().unwrap_or_default();
        if kind != "text" {
            return Err(Problem::invalid(
                path(&at, "type"),
                format_args!("{kind:?} blocks are not supported by llmesh (only \"text\")"),
            ));
        }
        required(block.text.as_ref(), &at, "text")?;
        refuse_rest(&at, &block.rest, &block.unread(kind))?;
    }
    Ok(())
}

/// One message of the conversation: its blocks sorted into the contract's messages (tool results
/// first, each a `tool` message; then the rest as one message of `role`).
pub fn message(role: &str, content: ContentBody, path_of: &str, into: &mut Vec<ChatMessage>) -> Result<(), Problem> {
    let blocks = match content {
        TextOr::Text(text) => {
            into.push(ChatMessage { role: role.to_string(), content: text, ..Default::default() });
            return Ok(());
        }
        TextOr::List(blocks) => blocks,
        TextOr::Object(_) | TextOr::Other => {
            return Err(Problem::invalid(path_of, "must be a string or a list of blocks"));
        }
    };
    let mut message = ChatMessage { role: role.to_string(), ..Default::default() };
    for (i, Obj(block)) in blocks.into_iter().enumerate() {
        let at = format!("{path_of}[{i}]");
        let kind = required(block.kind.clone(), &at, "type")?;
        let unread = block.unread(&kind);
        let rest = &block.rest;
        let cache_control = json_text(block.cache_control);
        let part = match kind.as_str() {
            "text" => Some((
                content_part::Kind::Text(required(block.text, &at, "text")?),
                carried([("citations", block.citations)]),
            )),
            "image" => Some((content_part::Kind::Image(image_of(block.source, &at)?), String::new())),
            "document" => {
                let mut document = document_of(block.source, &at)?;
                document.name = block.title.unwrap_or_default();
                let extra = carried([("context", block.context), ("citations", block.citations)]);
                Some((content_part::Kind::Document(document), extra))
            }
            _ => None,
        };
        if let Some((part, extra)) = part {
            message.parts.push(ContentPart { kind: Some(part), cache_control, extra });
            refuse_rest(&at, rest, &unread)?;
            continue;
        }
        match kind.as_str() {
            "tool_use" => message.tool_calls.push(ToolCall {
                id: required(block.id, &at, "id")?,
                name: required(block.name, &at, "name")?,
                arguments: block.input.unwrap_or_else(|| json!({})).to_string(),
                ..Default::default()
            }),
            "tool_result" => {
                let id = required(block.tool_use_id, &at, "tool_use_id")?;
                let is_error = block.is_error.unwrap_or(false);
                let mut result = ChatMessage { role: "tool".into(), tool_call_id: id, is_error, ..Default::default() };
                let content_path = path(&at, "content");
                match block.content {
                    None => {}
                    Some(TextOr::Text(text)) => result.content = text,
                    Some(nested @ TextOr::List(_)) => {
                        let mut inner = Vec::new();
                        message_blocks_only(nested, &content_path, &mut inner)?;
                        result.parts = inner.into_iter().flat_map(|m| m.parts).collect();
                    }
                    Some(TextOr::Object(_) | TextOr::Other) => {
                        return Err(Problem::invalid(content_path, "must be a string or a list of blocks"));
                    }
                }
                into.push(result);
            }
            "thinking" => message.reasoning.push(Reasoning {
                text: required(block.thinking, &at, "thinking")?,
                signature: block.signature.unwrap_or_default().into_bytes(),
                ..Default::default()
            }),
            "redacted_thinking" => message.reasoning.push(Reasoning {
                redacted_content: required(block.data, &at, "data")?.into_bytes(),
                ..Default::default()
            }),
            other => {
                return Err(Problem::invalid(
                    path(&at, "type"),
                    format_args!("{other:?} blocks are not supported by llmesh"),
                ));
            }
        }
        refuse_rest(&at, rest, &unread)?;
    }
    // Text alone stays plain text: the same request as before blocks existed, and one cache key.
    if message.parts.iter().all(|part| {
        part.cache_control.is_empty() && part.extra.is_empty() && matches!(part.kind, Some(content_part::Kind::Text(_)))
    }) {
        let texts: Vec<String> = message
            .parts
            .drain(..)
            .filter_map(|part| match part.kind {
                Some(content_part::Kind::Text(text)) => Some(text),
                _ => None,
            })
            .collect();
        message.content = texts.join("\n");
    }
    let empty = message.parts.is_empty()
        && message.content.is_empty()
        && message.tool_calls.is_empty()
        && message.reasoning.is_empty();
    if !empty {
        into.push(message);
    }
    Ok(())
}

/// A tool result's own blocks: text, images and documents only.
fn message_blocks_only(content: ContentBody, path_of: &str, into: &mut Vec<ChatMessage>) -> Result<(), Problem> {
    message("tool", content, path_of, into)?;
    if into.iter().any(|m| m.role != "tool" || !m.tool_calls.is_empty() || !m.tool_call_id.is_empty()) {
        return Err(Problem::invalid(path_of, "a tool result holds text, image and document blocks only"));
    }
    for message in into.iter_mut() {
        if !message.content.is_empty() {
            let text = std::mem::take(&mut message.content);
            message.parts.insert(0, ContentPart { kind: Some(content_part::Kind::Text(text)), ..Default::default() });
        }
    }
    Ok(())
}

/// A block's `source` (`at`: the block's path).
fn source_of(source: Option<Source>, at: &str) -> Result<(Source, String), Problem> {
    let source = required(source, at, "source")?;
    Ok((source, path(at, "source")))
}

fn image_of(source: Option<Source>, at: &str) -> Result<Image, Problem> {
    let (source, at) = source_of(source, at)?;
    let kind = required(source.kind, &at, "type")?;
    let (image, unread) = match kind.as_str() {
        "base64" => {
            let media_type = required(source.media_type, &at, "media_type")?;
            let data = base64_of(source.data, &at)?;
            let image = Image { media_type, source: Some(image::Source::Data(data)), ..Default::default() };
            (image, [("url", source.url.is_some())])
        }
        "url" => {
            let url = required(source.url, &at, "url")?;
            let unread = [("data", source.data.is_some()), ("media_type", source.media_type.is_some())];
            refuse_rest(&at, &source.rest, &unread)?;
            return Ok(Image { source: Some(image::Source::Url(url)), ..Default::default() });
        }
        _ => return Err(Problem::invalid(path(&at, "type"), "must be \"base64\" or \"url\"")),
    };
    refuse_rest(&at, &source.rest, &unread)?;
    Ok(image)
}

fn document_of(source: Option<Source>, at: &str) -> Result<Document, Problem> {
    let (source, at) = source_of(source, at)?;
    let kind = required(source.kind, &at, "type")?;
    let (document, unread) = match kind.as_str() {
        "base64" => {
            let media_type = required(source.media_type, &at, "media_type")?;
            let data = base64_of(source.data, &at)?;
            let document = Document { media_type, source: Some(document::Source::Data(data)), ..Default::default() };
            (document, vec![("url", source.url.is_some())])
        }
        "url" => {
            let url = required(source.url, &at, "url")?;
            let document = Document { source: Some(document::Source::Url(url)), ..Default::default() };
            (document, vec![("data", source.data.is_some()), ("media_type", source.media_type.is_some())])
        }
        "text" => {
            let media_type = source.media_type.unwrap_or_else(|| "text/plain".into());
            let text = required(source.data, &at, "data")?;
            let document = Document { media_type, source: Some(document::Source::Text(text)), ..Default::default() };
            (document, vec![("url", source.url.is_some())])
        }
        _ => return Err(Problem::invalid(path(&at, "type"), "must be \"base64\", \"url\" or \"text\"")),
    };
    refuse_rest(&at, &source.rest, &unread)?;
    Ok(document)
}

/// The fields of a block that llmesh carries without acting on them (`citations`, a document's
/// `context`), as the part's `extra`: sent to an upstream of this dialect, named in
/// `x-llmesh-unmapped-fields` for the others (`anthropic_dropped`).
fn carried<'a>(fields: impl IntoIterator<Item = (&'a str, Option<Value>)>) -> String {
    let extra: Map<String, Value> =
        fields.into_iter().filter_map(|(name, value)| Some((name.to_owned(), value?))).collect();
    if extra.is_empty() { String::new() } else { Value::Object(extra).to_string() }
}

/// A source's `data` (`at`: the source's path), base64.
fn base64_of(data: Option<String>, at: &str) -> Result<Vec<u8>, Problem> {
    let data = required(data, at, "data")?;
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|error| Problem::invalid(path(at, "data"), format_args!("not valid base64 ({error})")))
}

/// A JSON value as the contract's text (empty: none).
fn json_text(value: Option<Value>) -> String {
    value.map(|value| value.to_string()).unwrap_or_default()
}

/// The answer's blocks: its reasoning, its text (when there is any, or when nothing else is), its
/// tool calls (the input as the JSON object the arguments are; `{}` when they are not one).
pub fn blocks<'a>(text: &'a str, tool_calls: &'a [ToolCall], reasoning: &'a [Reasoning]) -> Vec<AnswerBlock<'a>> {
    let mut blocks = Vec::with_capacity(reasoning.len() + 1 + tool_calls.len());
    for block in reasoning {
        blocks.push(if block.text.is_empty() && !block.redacted_content.is_empty() {
            AnswerBlock::RedactedThinking { data: String::from_utf8_lossy(&block.redacted_content) }
        } else {
            AnswerBlock::Thinking { thinking: &block.text, signature: String::from_utf8_lossy(&block.signature) }
        });
    }
    if !text.is_empty() || tool_calls.is_empty() {
        blocks.push(AnswerBlock::Text { text });
    }
    for call in tool_calls {
        blocks.push(AnswerBlock::ToolUse { id: &call.id, name: &call.name, input: input_of(&call.arguments) });
    }
    blocks
}

/// One block of an answer's `content`, serialized straight from the answer.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AnswerBlock<'a> {
    RedactedThinking { data: Cow<'a, str> },
    Thinking { thinking: &'a str, signature: Cow<'a, str> },
    Text { text: &'a str },
    ToolUse { id: &'a str, name: &'a str, input: Value },
}

/// A call's arguments as the object Anthropic's `input` is.
fn input_of(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(object @ Value::Object(_)) => object,
        _ => json!({}),
    }
}

/// Usage, with the prompt cache's reads and writes.
/// Anthropic's `input_tokens` are the prompt's tokens the cache neither read nor wrote; the
/// contract's `prompt_tokens` count them all.
pub fn usage(usage: Option<Usage>) -> Value {
    let usage = usage.unwrap_or_default();
    let uncached =
        usage.prompt_tokens.saturating_sub(usage.cached_prompt_tokens).saturating_sub(usage.cache_write_tokens);
    json!({
        "input_tokens": uncached,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_prompt_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Body {
        #[serde(deserialize_with = "fields::opt")]
        content: Option<ContentBody>,
    }

    /// `value` read as a message's content.
    fn content(value: Value) -> ContentBody {
        let body: Body = fields::parse(&serde_json::to_vec(&json!({ "content": value })).unwrap(), usize::MAX).unwrap();
        body.content.unwrap()
    }

    #[test]
    fn tool_results_come_first_as_tool_messages_and_text_stays_plain() {
        let mut into = Vec::new();
        let given = json!([
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "hi", "is_error": true},
            {"type": "text", "text": "go on"},
        ]);
        message("user", content(given), "messages[2].content", &mut into).unwrap();
        assert_eq!(into.len(), 2);
        assert_eq!(
            (into[0].role.as_str(), into[0].tool_call_id.as_str(), into[0].content.as_str(), into[0].is_error),
            ("tool", "toolu_1", "hi", true)
        );
        assert_eq!((into[1].role.as_str(), into[1].content.as_str()), ("user", "go on"));
    }

    #[test]
    fn a_tool_use_and_its_thinking_are_carried_back() {
        let mut into = Vec::new();
        let given = json!([
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}},
        ]);
        message("assistant", content(given), "messages[1].content", &mut into).unwrap();
        assert_eq!(into[0].tool_calls[0].arguments, r#"{"command":"ls"}"#);
        assert_eq!(into[0].reasoning[0].signature, b"sig");
        let rendered = serde_json::to_value(blocks("", &into[0].tool_calls, &[])).unwrap();
        assert_eq!(rendered[0]["type"], "tool_use");
        assert_eq!(rendered[0]["input"]["command"], "ls");
    }

    #[test]
    fn an_unknown_block_names_its_field() {
        let error =
            message("user", content(json!([{"type": "audio"}])), "messages[0].content", &mut Vec::new()).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("messages[0].content[0].type"));
        // A field of another type of block is one this type does not take, named first by name.
        let given = json!([{"type": "text", "text": "a", "tool_use_id": "t", "id": "x"}]);
        let error = message("user", content(given), "messages[0].content", &mut Vec::new()).unwrap_err();
        assert_eq!(error.message, "messages[0].content[0].id: not supported by llmesh");
    }
}

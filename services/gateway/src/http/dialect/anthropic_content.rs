//! Anthropic Messages' content blocks, tools and thinking, to and from the contract
//! (`docs/CONTRACT.md`).
//!
//! In: `tools` (`{name, description, input_schema, cache_control}`; a tool's other fields, such as
//! `defer_loading`, are kept as its `extra`), `tool_choice` (`auto`, `any`, `tool`, `none`;
//! `disable_parallel_tool_use`), `thinking` (`enabled` with `budget_tokens`; another type, such as
//! `adaptive`, as reasoning at the provider's default effort); blocks `text`, `image` and
//! `document` (base64, URL or text sources), `tool_use` (assistant), `tool_result` (user: one
//! `tool` message per result, before the rest of the message), `thinking` and `redacted_thinking`
//! (carried back with their signatures).
//! Out: `thinking`, `text` and `tool_use` blocks (the input as the JSON object the arguments are),
//! stop reason `tool_use`, and usage with cache reads and writes.

use base64::Engine as _;
use llmesh_proto::common::v1::{
    ChatMessage, ContentPart, Document, Image, Reasoning, ReasoningOptions, Tool, ToolCall, ToolChoice, ToolChoiceMode,
    Usage, content_part, document, image,
};
use serde_json::{Value, json};

use super::{Fields, Problem};

/// `tools`.
pub fn tools(body: &mut Fields) -> Result<Vec<Tool>, Problem> {
    let Some(listed) = body.objects("tools")? else { return Ok(Vec::new()) };
    listed
        .into_iter()
        .map(|mut tool| {
            if let Some(kind) = tool.take::<String>("type")?
                && kind != "custom"
            {
                return Err(Problem::invalid(
                    tool.path("type"),
                    format_args!("{kind:?} tools are Anthropic's own and not served by llmesh (only custom tools)"),
                ));
            }
            Ok(Tool {
                name: tool.required("name")?,
                description: tool.take("description")?.unwrap_or_default(),
                parameters: tool.json_text("input_schema").unwrap_or_default(),
                cache_control: json_text(tool.take("cache_control")?),
                extra: tool.rest(),
                ..Default::default()
            })
        })
        .collect()
}

/// `tool_choice`, and whether parallel tool use is allowed.
pub fn tool_choice(body: &mut Fields) -> Result<(Option<ToolChoice>, Option<bool>), Problem> {
    let Some(mut choice) = body.object("tool_choice")? else { return Ok((None, None)) };
    let kind: String = choice.required("type")?;
    let (mode, name) = match kind.as_str() {
        "auto" => (ToolChoiceMode::Auto, String::new()),
        "any" => (ToolChoiceMode::Required, String::new()),
        "none" => (ToolChoiceMode::None, String::new()),
        "tool" => (ToolChoiceMode::Tool, choice.required("name")?),
        _ => {
            return Err(Problem::invalid(
                choice.path("type"),
                format_args!("{kind:?} is not one of auto, any, tool, none"),
            ));
        }
    };
    let parallel = choice.take::<bool>("disable_parallel_tool_use")?.map(|disabled| !disabled);
    choice.finish()?;
    Ok((Some(ToolChoice { mode: mode.into(), name }), parallel))
}

/// `thinking`: a token budget when enabled; another kind (`adaptive`: the model decides how much)
/// as reasoning at the provider's default effort — not as an effort of that name, which no
/// provider of another dialect knows —, its `display` as the summary.
pub fn thinking(body: &mut Fields) -> Result<Option<ReasoningOptions>, Problem> {
    let Some(mut thinking) = body.object("thinking")? else { return Ok(None) };
    let kind: String = thinking.required("type")?;
    let options = match kind.as_str() {
        "disabled" => None,
        "enabled" => Some(ReasoningOptions { budget_tokens: thinking.take("budget_tokens")?, ..Default::default() }),
        _ => Some(ReasoningOptions::default()),
    };
    let options = match (options, thinking.take::<String>("display")?) {
        (Some(options), Some(display)) => Some(ReasoningOptions { summary: display, ..options }),
        (options, _) => options,
    };
    thinking.finish()?;
    Ok(options)
}

/// One message of the conversation: its blocks sorted into the contract's messages (tool results
/// first, each a `tool` message; then the rest as one message of `role`).
pub fn message(role: &str, content: Value, path: &str, into: &mut Vec<ChatMessage>) -> Result<(), Problem> {
    let blocks = match content {
        Value::String(text) => {
            into.push(ChatMessage { role: role.to_string(), content: text, ..Default::default() });
            return Ok(());
        }
        Value::Array(blocks) => blocks,
        _ => return Err(Problem::invalid(path, "must be a string or a list of blocks")),
    };
    let mut message = ChatMessage { role: role.to_string(), ..Default::default() };
    for (i, block) in blocks.into_iter().enumerate() {
        let at = format!("{path}[{i}]");
        let Value::Object(block) = block else { return Err(Problem::invalid(at, "must be an object")) };
        let mut block = Fields::within(block, at);
        let kind: String = block.required("type")?;
        let cache_control = json_text(block.take("cache_control")?);
        let part = match kind.as_str() {
            "text" => Some((content_part::Kind::Text(block.required("text")?), carried(&mut block, &["citations"])?)),
            "image" => Some((content_part::Kind::Image(image_of(&mut block)?), String::new())),
            "document" => {
                let document = document_of(&mut block)?;
                Some((content_part::Kind::Document(document), carried(&mut block, &["context", "citations"])?))
            }
            _ => None,
        };
        if let Some((part, extra)) = part {
            message.parts.push(ContentPart { kind: Some(part), cache_control, extra });
            block.finish()?;
            continue;
        }
        match kind.as_str() {
            "tool_use" => message.tool_calls.push(ToolCall {
                id: block.required("id")?,
                name: block.required("name")?,
                arguments: block.take::<Value>("input")?.unwrap_or_else(|| json!({})).to_string(),
                ..Default::default()
            }),
            "tool_result" => {
                let id: String = block.required("tool_use_id")?;
                let is_error = block.take::<bool>("is_error")?.unwrap_or(false);
                let mut result = ChatMessage { role: "tool".into(), tool_call_id: id, is_error, ..Default::default() };
                let content_path = block.path("content");
                match block.take::<Value>("content")? {
                    None => {}
                    Some(Value::String(text)) => result.content = text,
                    Some(nested @ Value::Array(_)) => {
                        let mut inner = Vec::new();
                        message_blocks_only(nested, &content_path, &mut inner)?;
                        result.parts = inner.into_iter().flat_map(|m| m.parts).collect();
                    }
                    Some(_) => return Err(Problem::invalid(content_path, "must be a string or a list of blocks")),
                }
                into.push(result);
            }
            "thinking" => message.reasoning.push(Reasoning {
                text: block.required("thinking")?,
                signature: block.take::<String>("signature")?.unwrap_or_default().into_bytes(),
                ..Default::default()
            }),
            "redacted_thinking" => message.reasoning.push(Reasoning {
                redacted_content: block.required::<String>("data")?.into_bytes(),
                ..Default::default()
            }),
            other => {
                return Err(Problem::invalid(
                    block.path("type"),
                    format_args!("{other:?} blocks are not supported by llmesh"),
                ));
            }
        }
        block.finish()?;
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
fn message_blocks_only(content: Value, path: &str, into: &mut Vec<ChatMessage>) -> Result<(), Problem> {
    message("tool", content, path, into)?;
    if into.iter().any(|m| m.role != "tool" || !m.tool_calls.is_empty() || !m.tool_call_id.is_empty()) {
        return Err(Problem::invalid(path, "a tool result holds text, image and document blocks only"));
    }
    for message in into.iter_mut() {
        if !message.content.is_empty() {
            let text = std::mem::take(&mut message.content);
            message.parts.insert(0, ContentPart { kind: Some(content_part::Kind::Text(text)), ..Default::default() });
        }
    }
    Ok(())
}

fn image_of(block: &mut Fields) -> Result<Image, Problem> {
    let mut source = block.object("source")?.ok_or_else(|| Problem::invalid(block.path("source"), "required"))?;
    let kind: String = source.required("type")?;
    let image = match kind.as_str() {
        "base64" => Image {
            media_type: source.required("media_type")?,
            source: Some(image::Source::Data(base64_of(&mut source)?)),
            ..Default::default()
        },
        "url" => Image { source: Some(image::Source::Url(source.required("url")?)), ..Default::default() },
        _ => return Err(Problem::invalid(source.path("type"), "must be \"base64\" or \"url\"")),
    };
    source.finish()?;
    Ok(image)
}

fn document_of(block: &mut Fields) -> Result<Document, Problem> {
    let mut source = block.object("source")?.ok_or_else(|| Problem::invalid(block.path("source"), "required"))?;
    let kind: String = source.required("type")?;
    let mut document = match kind.as_str() {
        "base64" => Document {
            media_type: source.required("media_type")?,
            source: Some(document::Source::Data(base64_of(&mut source)?)),
            ..Default::default()
        },
        "url" => Document { source: Some(document::Source::Url(source.required("url")?)), ..Default::default() },
        "text" => Document {
            media_type: source.take("media_type")?.unwrap_or_else(|| "text/plain".into()),
            source: Some(document::Source::Text(source.required("data")?)),
            ..Default::default()
        },
        _ => return Err(Problem::invalid(source.path("type"), "must be \"base64\", \"url\" or \"text\"")),
    };
    source.finish()?;
    document.name = block.take("title")?.unwrap_or_default();
    Ok(document)
}

/// The fields `names` of a block that llmesh carries without acting on them (`citations`, a
/// document's `context`), as the part's `extra`: sent to an upstream of this dialect, named in
/// `x-llmesh-unmapped-fields` for the others (`anthropic_dropped`).
fn carried(block: &mut Fields, names: &[&str]) -> Result<String, Problem> {
    let mut extra = serde_json::Map::new();
    for name in names {
        if let Some(value) = block.take::<Value>(name)? {
            extra.insert((*name).to_owned(), value);
        }
    }
    Ok(if extra.is_empty() { String::new() } else { Value::Object(extra).to_string() })
}

fn base64_of(source: &mut Fields) -> Result<Vec<u8>, Problem> {
    let path = source.path("data");
    let data: String = source.required("data")?;
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|error| Problem::invalid(path, format_args!("not valid base64 ({error})")))
}

/// A JSON value as the contract's text (empty: none).
fn json_text(value: Option<Value>) -> String {
    value.map(|value| value.to_string()).unwrap_or_default()
}

/// The answer's blocks: its reasoning, its text (when there is any, or when nothing else is), its
/// tool calls (the input as the JSON object the arguments are; `{}` when they are not one).
pub fn blocks(text: &str, tool_calls: &[ToolCall], reasoning: &[Reasoning]) -> Value {
    let mut blocks = Vec::new();
    for block in reasoning {
        if block.text.is_empty() && !block.redacted_content.is_empty() {
            blocks
                .push(json!({ "type": "redacted_thinking", "data": String::from_utf8_lossy(&block.redacted_content) }));
        } else {
            blocks.push(json!({ "type": "thinking", "thinking": block.text, "signature": String::from_utf8_lossy(&block.signature) }));
        }
    }
    if !text.is_empty() || tool_calls.is_empty() {
        blocks.push(json!({ "type": "text", "text": text }));
    }
    for call in tool_calls {
        blocks
            .push(json!({ "type": "tool_use", "id": call.id, "name": call.name, "input": input_of(&call.arguments) }));
    }
    Value::Array(blocks)
}

/// A call's arguments as the object Anthropic's `input` is.
fn input_of(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(object @ Value::Object(_)) => object,
        _ => json!({}),
    }
}

/// Usage, with the prompt cache's reads and writes.
pub fn usage(usage: Option<Usage>) -> Value {
    let usage = usage.unwrap_or_default();
    json!({
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_prompt_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_results_come_first_as_tool_messages_and_text_stays_plain() {
        let mut into = Vec::new();
        let content = json!([
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "hi", "is_error": true},
            {"type": "text", "text": "go on"},
        ]);
        message("user", content, "messages[2].content", &mut into).unwrap();
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
        let content = json!([
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}},
        ]);
        message("assistant", content, "messages[1].content", &mut into).unwrap();
        assert_eq!(into[0].tool_calls[0].arguments, r#"{"command":"ls"}"#);
        assert_eq!(into[0].reasoning[0].signature, b"sig");
        let rendered = blocks("", &into[0].tool_calls, &[]);
        assert_eq!(rendered[0]["input"]["command"], "ls");
    }

    #[test]
    fn an_unknown_block_names_its_field() {
        let error = message("user", json!([{"type": "audio"}]), "messages[0].content", &mut Vec::new()).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("messages[0].content[0].type"));
    }
}

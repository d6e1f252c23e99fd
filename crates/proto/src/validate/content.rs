//! Checks of `messages`: counts and sizes first (no content read), then each message's shape.
//!
//! The shape rules: a message has `content` or `parts`, not both; a part has a kind; an image or
//! document has a source, inline data a media type; tool calls and reasoning blocks only on
//! assistant messages, `tool_call_id` (required) and `is_error` only on tool messages. Tool-call
//! arguments are not parsed: they are carried byte for byte, as the model wrote them.

use super::{
    limits::{Limits, MAX_ID_BYTES, MAX_MEDIA_TYPE_BYTES, MAX_NAME_BYTES},
    rules::{Invalid, at_most, echo, invalid, json_object, tool_name},
};
use crate::common::v1::{
    ChatMessage, ContentPart, ImageDetail, Reasoning, ToolCall, content_part::Kind, document, image,
};
use crate::generation::v1::GenerateRequest;

/// The roles a message may have.
pub const ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer"];

/// Parts of a message: its content parts, tool calls and reasoning blocks.
pub fn parts(message: &ChatMessage) -> usize {
    message.parts.len() + message.tool_calls.len() + message.reasoning.len()
}

/// Bytes of one content part that count in the prompt (all but inline data).
fn part_text_bytes(part: &ContentPart) -> usize {
    let kind = match &part.kind {
        None => 0,
        Some(Kind::Text(text)) => text.len(),
        Some(Kind::Image(image)) => {
            image.media_type.len()
                + match &image.source {
                    Some(image::Source::Url(s) | image::Source::FileId(s)) => s.len(),
                    Some(image::Source::Data(_)) | None => 0,
                }
        }
        Some(Kind::Document(document)) => {
            document.media_type.len()
                + document.name.len()
                + match &document.source {
                    Some(document::Source::Url(s) | document::Source::FileId(s) | document::Source::Text(s)) => s.len(),
                    Some(document::Source::Data(_)) | None => 0,
                }
        }
    };
    kind + part.cache_control.len() + part.extra.len()
}

/// Inline bytes of one content part.
pub fn inline_bytes(part: &ContentPart) -> usize {
    match &part.kind {
        Some(Kind::Image(image)) => match &image.source {
            Some(image::Source::Data(data)) => data.len(),
            _ => 0,
        },
        Some(Kind::Document(document)) => match &document.source {
            Some(document::Source::Data(data)) => data.len(),
            _ => 0,
        },
        _ => 0,
    }
}

fn tool_call_bytes(call: &ToolCall) -> usize {
    call.id.len() + call.name.len() + call.arguments.len() + call.signature.len()
}

fn reasoning_bytes(block: &Reasoning) -> usize {
    block.text.len() + block.redacted_content.len() + block.signature.len()
}

/// Bytes of one message that count in the prompt: every string and bytes field but `role` and
/// inline data.
pub fn message_bytes(message: &ChatMessage) -> usize {
    message.content.len()
        + message.name.len()
        + message.tool_call_id.len()
        + message.parts.iter().map(part_text_bytes).sum::<usize>()
        + message.tool_calls.iter().map(tool_call_bytes).sum::<usize>()
        + message.reasoning.iter().map(reasoning_bytes).sum::<usize>()
}

/// The counts: messages, parts per message and in all. Reads no content.
pub(crate) fn counts(request: &GenerateRequest, limits: &Limits) -> Result<(), Invalid> {
    if request.messages.len() > limits.max_messages {
        return invalid(format!(
            "messages: {} messages exceed the limit of {}",
            request.messages.len(),
            limits.max_messages
        ));
    }
    let mut total = 0usize;
    for (i, message) in request.messages.iter().enumerate() {
        let parts = parts(message);
        if parts > limits.max_parts_per_message {
            return invalid(format!(
                "messages[{i}]: {parts} parts (content parts, tool calls, reasoning blocks) exceed the limit of {}",
                limits.max_parts_per_message
            ));
        }
        total += parts;
    }
    if total > limits.max_parts {
        return invalid(format!("messages: {total} parts in all exceed the limit of {}", limits.max_parts));
    }
    Ok(())
}

/// The inline data: each part's and the sum. Bounded by [`counts`]; reads lengths only.
pub(crate) fn inline(request: &GenerateRequest, limits: &Limits) -> Result<(), Invalid> {
    let mut total = 0usize;
    for (i, message) in request.messages.iter().enumerate() {
        for (j, part) in message.parts.iter().enumerate() {
            let bytes = inline_bytes(part);
            at_most(&|| format!("messages[{i}].parts[{j}].data"), bytes, limits.max_inline_part_bytes)?;
            total += bytes;
        }
    }
    at_most(&|| "messages: inline data".into(), total, limits.max_inline_bytes)
}

/// Each message's role and shape, with the field path of the first fault.
pub(crate) fn shapes(request: &GenerateRequest, limits: &Limits) -> Result<(), Invalid> {
    for (i, message) in request.messages.iter().enumerate() {
        message_shape(i, message, limits)?;
    }
    if !request.messages.is_empty() && request.messages.iter().all(is_blank) {
        return invalid("messages: every message content is blank".into());
    }
    Ok(())
}

/// Whether a message says nothing: no content but whitespace, no parts, no tool calls.
fn is_blank(message: &ChatMessage) -> bool {
    message.content.trim().is_empty() && message.parts.is_empty() && message.tool_calls.is_empty()
}

fn message_shape(i: usize, message: &ChatMessage, limits: &Limits) -> Result<(), Invalid> {
    let role = message.role.as_str();
    if !ROLES.contains(&role) {
        return invalid(format!("messages[{i}].role: {} is not one of {}", echo(&message.role), ROLES.join(", ")));
    }
    at_most(&|| format!("messages[{i}].name"), message.name.len(), MAX_NAME_BYTES)?;
    at_most(&|| format!("messages[{i}].tool_call_id"), message.tool_call_id.len(), MAX_ID_BYTES)?;
    if !message.content.is_empty() && !message.parts.is_empty() {
        return invalid(format!("messages[{i}].content: set content or parts, not both"));
    }
    if role == "tool" {
        if message.tool_call_id.is_empty() {
            return invalid(format!("messages[{i}].tool_call_id: required on a tool message"));
        }
    } else {
        if !message.tool_call_id.is_empty() {
            return invalid(format!("messages[{i}].tool_call_id: only tool messages answer a tool call"));
        }
        if message.is_error {
            return invalid(format!("messages[{i}].is_error: only tool messages carry a tool's failure"));
        }
    }
    if role != "assistant" {
        if !message.tool_calls.is_empty() {
            return invalid(format!("messages[{i}].tool_calls: only assistant messages carry tool calls"));
        }
        if !message.reasoning.is_empty() {
            return invalid(format!("messages[{i}].reasoning: only assistant messages carry reasoning"));
        }
    }
    for (j, part) in message.parts.iter().enumerate() {
        part_shape(&|| format!("messages[{i}].parts[{j}]"), part, limits)?;
    }
    for (j, call) in message.tool_calls.iter().enumerate() {
        let path = || format!("messages[{i}].tool_calls[{j}]");
        at_most(&|| format!("{}.id", path()), call.id.len(), MAX_ID_BYTES)?;
        tool_name(&|| format!("{}.name", path()), &call.name)?;
        at_most(&|| format!("{}.arguments", path()), call.arguments.len(), limits.max_tool_arguments_bytes)?;
    }
    Ok(())
}

fn part_shape(path: &dyn Fn() -> String, part: &ContentPart, limits: &Limits) -> Result<(), Invalid> {
    at_most(&|| format!("{}.cache_control", path()), part.cache_control.len(), limits.max_extra_bytes)?;
    at_most(&|| format!("{}.extra", path()), part.extra.len(), limits.max_extra_bytes)?;
    match &part.kind {
        None => return invalid(format!("{}: a part needs text, an image or a document", path())),
        Some(Kind::Text(_)) => {}
        Some(Kind::Image(image)) => {
            let path = || format!("{}.image", path());
            media_type(&path, &image.media_type)?;
            match &image.source {
                None => return invalid(format!("{}: needs a url, data or a file_id", path())),
                Some(image::Source::Data(_)) if !image.media_type.starts_with("image/") => {
                    return invalid(format!("{}.media_type: inline data needs an image/* media type", path()));
                }
                Some(image::Source::FileId(id)) => at_most(&|| format!("{}.file_id", path()), id.len(), MAX_ID_BYTES)?,
                _ => {}
            }
            if ImageDetail::try_from(image.detail).is_err() {
                return invalid(format!("{}.detail: {} is not a known detail", path(), image.detail));
            }
        }
        Some(Kind::Document(document)) => {
            let path = || format!("{}.document", path());
            media_type(&path, &document.media_type)?;
            at_most(&|| format!("{}.name", path()), document.name.len(), limits.max_extra_bytes)?;
            match &document.source {
                None => return invalid(format!("{}: needs a url, data, a file_id or text", path())),
                Some(document::Source::Data(_)) if document.media_type.is_empty() => {
                    return invalid(format!("{}.media_type: required with inline data", path()));
                }
                Some(document::Source::FileId(id)) => {
                    at_most(&|| format!("{}.file_id", path()), id.len(), MAX_ID_BYTES)?;
                }
                _ => {}
            }
        }
    }
    json_object(&|| format!("{}.cache_control", path()), &part.cache_control)?;
    json_object(&|| format!("{}.extra", path()), &part.extra)
}

/// A media type: at most [`MAX_MEDIA_TYPE_BYTES`], `type/subtype` in printable ASCII.
fn media_type(path: &dyn Fn() -> String, value: &str) -> Result<(), Invalid> {
    at_most(&|| format!("{}.media_type", path()), value.len(), MAX_MEDIA_TYPE_BYTES)?;
    if !value.is_empty() && (!value.contains('/') || !value.bytes().all(|b| b.is_ascii_graphic())) {
        return invalid(format!("{}.media_type: {} is not a media type", path(), echo(value)));
    }
    Ok(())
}

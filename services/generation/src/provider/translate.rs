//! What every wire format's translation of the contract needs: refusing a field the API has no
//! form for, JSON carried as text kept byte for byte, inline bytes as base64, a tool message's
//! text, and an answer's unread fields as extensions.

use base64::Engine as _;
use llmesh_proto::common::v1::{ContentPart, Extensions, content_part::Kind, document};
use serde_json::{Map, Value, value::RawValue};

/// Why a request cannot be sent in a wire format.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A field the API has no form for: the client's to change (INVALID_ARGUMENT naming it).
    #[error("{field}: {why}")]
    Field { field: String, why: &'static str },
    /// Text the contract validated as JSON that is not: a bug, told as the upstream's.
    #[error("building the request body: {0}")]
    Json(#[from] serde_json::Error),
}

pub fn refuse(field: impl Into<String>, why: &'static str) -> Refusal {
    Refusal::Field { field: field.into(), why }
}

/// `text` (validated to be a JSON object, or empty) as raw JSON, kept byte for byte.
pub fn raw(text: &str) -> Result<Option<&RawValue>, Refusal> {
    if text.is_empty() { Ok(None) } else { Ok(Some(serde_json::from_str::<&RawValue>(text)?)) }
}

/// A tool call's arguments as the JSON object an API takes in their place (`{}` when empty),
/// byte for byte; `at` names the call when they are not one (the contract does not parse them).
pub fn arguments_object<'a>(arguments: &'a str, at: &str, why: &'static str) -> Result<&'a RawValue, Refusal> {
    let arguments = if arguments.trim().is_empty() { "{}" } else { arguments };
    serde_json::from_str::<&RawValue>(arguments)
        .ok()
        .filter(|raw| raw.get().trim_start().starts_with('{'))
        .ok_or_else(|| refuse(format!("{at}.arguments"), why))
}

/// Adds `fields` to the end of a JSON object's text, before its closing brace, their values byte
/// for byte; a field named in `own` (one llmesh sets itself) is left out.
pub fn append_fields<'a>(
    body: &mut String,
    fields: impl IntoIterator<Item = (&'a str, &'a RawValue)>,
    own: &[&str],
) -> Result<(), serde_json::Error> {
    for (name, value) in fields.into_iter().filter(|(name, _)| !own.contains(name)) {
        if body.ends_with('}') {
            body.pop();
            body.push(',');
            body.push_str(&serde_json::to_string(name)?);
            body.push(':');
            body.push_str(value.get());
            body.push('}');
        }
    }
    Ok(())
}

/// A JSON object's text as a map (empty when it is empty or not an object).
pub fn object(text: &str) -> Map<String, Value> {
    if text.is_empty() {
        return Map::new();
    }
    serde_json::from_str(text).unwrap_or_default()
}

pub fn base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The text of parts that must be text (a tool's result, a system prompt): the text parts and the
/// text documents, joined by newlines.
pub fn text_of(parts: &[ContentPart]) -> String {
    let texts: Vec<&str> = parts
        .iter()
        .filter_map(|p| match &p.kind {
            Some(Kind::Text(text)) => Some(text.as_str()),
            Some(Kind::Document(document)) => match &document.source {
                Some(document::Source::Text(text)) => Some(text.as_str()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    texts.join("\n")
}

/// An answer's top-level fields but the `read` ones (and nulls) as extensions of `dialect`, if any.
pub fn extensions(rest: Map<String, Value>, read: &[&str], dialect: &str) -> Option<Extensions> {
    let kept: Map<String, Value> =
        rest.into_iter().filter(|(name, value)| !read.contains(&name.as_str()) && !value.is_null()).collect();
    if kept.is_empty() {
        return None;
    }
    Some(Extensions { dialect: dialect.into(), json: Value::Object(kept).to_string() })
}

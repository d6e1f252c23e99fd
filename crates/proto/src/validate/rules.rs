//! The shapes of a refusal (INVALID_ARGUMENT, the field path first) and the small checks the
//! validation modules share.

use tonic::Status;

/// The most characters of a client's value that an error message repeats.
pub const ECHO_CHARS: usize = 64;

/// `value` for an error message: quoted, at most [`ECHO_CHARS`] characters of it, and `…` when
/// it was cut.
pub fn echo(value: &str) -> String {
    match value.char_indices().nth(ECHO_CHARS) {
        Some((cut, _)) => format!("{:?}…", &value[..cut]),
        None => format!("{value:?}"),
    }
}

/// A request that cannot be served as it is, and the field at fault: typed, so that no edge parses
/// it out of the words. As a `tonic::Status`: INVALID_ARGUMENT whose message starts with the field
/// (`"max_tokens: 5000 exceeds the limit of 4096"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The field's path (`messages[2].parts[0].image.media_type`).
    pub field: String,
    /// What is wrong with it, without the field's name.
    pub detail: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.detail)
    }
}

impl std::error::Error for Invalid {}

impl From<Invalid> for Status {
    fn from(invalid: Invalid) -> Self {
        Status::invalid_argument(invalid.to_string())
    }
}

/// A refusal written as `"{field}: {detail}"` (this module's convention for every rule): the
/// field path is typed here, where the words are made, so that nothing downstream reads them.
pub(crate) fn invalid(message: String) -> Result<(), Invalid> {
    let (field, detail) = message.split_once(": ").unwrap_or(("request", message.as_str()));
    Err(Invalid { field: field.to_string(), detail: detail.to_string() })
}

pub(crate) fn too_long(field: &str, bytes: usize, limit: usize) -> Result<(), Invalid> {
    Err(Invalid { field: field.to_string(), detail: format!("{bytes} bytes exceed the limit of {limit} bytes") })
}

pub(crate) fn at_most(field: &dyn Fn() -> String, bytes: usize, limit: usize) -> Result<(), Invalid> {
    if bytes > limit { too_long(&field(), bytes, limit) } else { Ok(()) }
}

/// Whether `text` is one JSON object (what every schema, `cache_control`, `extra` and
/// `extensions.json` must be). Checked without building the document: the text must start with
/// `{` and be one well-formed JSON value.
pub(crate) fn is_json_object(text: &str) -> bool {
    text.trim_start().starts_with('{') && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

/// An optional JSON object: empty, or [`is_json_object`]; the field path in the refusal.
pub(crate) fn json_object(field: &dyn Fn() -> String, text: &str) -> Result<(), Invalid> {
    if text.is_empty() || is_json_object(text) { Ok(()) } else { invalid(format!("{}: not a JSON object", field())) }
}

/// A tool or function name: 1 to [`super::limits::MAX_NAME_BYTES`] ASCII letters, digits and `_.:-`
/// (what OpenAI, Anthropic, Gemini and MCP's `server__tool` names have in common, and more).
pub(crate) fn tool_name(field: &dyn Fn() -> String, name: &str) -> Result<(), Invalid> {
    let limit = super::limits::MAX_NAME_BYTES;
    if name.len() > limit {
        return too_long(&field(), name.len(), limit);
    }
    if name.is_empty() {
        return invalid(format!("{}: required", field()));
    }
    if let Some(bad) = name.chars().find(|c| !c.is_ascii_alphanumeric() && !"_.:-".contains(*c)) {
        return invalid(format!(
            "{}: {} has {bad:?}; a tool name is ASCII letters, digits and _.:-",
            field(),
            echo(name)
        ));
    }
    Ok(())
}

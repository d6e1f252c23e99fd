//! The HTTP dialects (OpenAI Chat Completions, Anthropic Messages, the seed's `/generate`) and
//! their translation to and from the contract, behind one shape: [`Dialect`].
//!
//! A dialect is four pure translations, and nothing else — no I/O, no clock, no gateway:
//! - [`Dialect::parse`]: the client's JSON body — read into the dialect's serde structs, one per
//!   object of the provider's wire format, by the shared rules of [`fields`] — into the
//!   contract's `GenerateRequest`, whether it asked for a stream, what the answer's rendering
//!   needs to know ([`Dialect::Options`]), and the top-level fields llmesh does not act on ([`Unmapped`]: carried as the request's
//!   extensions in the dialect, and named in `x-llmesh-unmapped-fields`). A mistake is a
//!   [`Problem`] naming the field at fault (`messages[2].content[0].type`).
//! - [`Dialect::render`]: a `GenerateResponse` into the dialect's answer body.
//! - [`Dialect::events`]: the [`Events`] that turn `GenerateStreamResponse` chunks into the
//!   dialect's server-sent events.
//! - [`Dialect::error_body`]: a [`Problem`] as the dialect's error body (its status is the
//!   problem's class's).
//!
//! The routes ([`super::route`]) do the rest, once for every dialect: the body, the deadline, the
//! call, the response headers. The golden files under `services/gateway/tests/golden/` pin each
//! translation of each dialect byte for byte (`GOLDEN_UPDATE=1` rewrites them); `docs/CONTRACT.md`
//! says field by field what each dialect carries, drops or refuses.

mod anthropic;
mod anthropic_content;
mod anthropic_dropped;
mod fields;
#[cfg(test)]
mod golden;
mod openai;
mod openai_content;
mod responses;
mod seed;

use http::{HeaderMap, HeaderName, HeaderValue};
use llmesh_proto::{
    common::v1::Extensions,
    gateway::v1::GenerateStreamResponse,
    generation::v1::{GenerateRequest, GenerateResponse},
};
use serde_json::Value;

pub use self::{anthropic::Anthropic, openai::OpenAi, responses::Responses, seed::Seed};
use super::{
    CACHE_POLICIES, Class, Problem, cache_policy_named, finish_reason,
    sse::{self, Events},
};

/// One HTTP dialect: see the module docs.
pub trait Dialect {
    /// The route's path, as the call's label.
    const ROUTE: &'static str;
    /// Whether the dialect takes its cache policy from `x-llmesh-cache` (the seed has a field).
    const CACHE_HEADER: bool;
    /// What rendering the answer needs to know of the request.
    type Options: Send + 'static;
    /// The dialect's stream events.
    type Events: Events;

    /// The client's body (JSON text) as the contract's request.
    fn parse(body: &[u8], context: &Context<'_>) -> Result<Parsed<Self::Options>, Problem>;

    /// An answer's body, serialized as the response's JSON.
    type Rendered<'a>: serde::Serialize;

    /// An answer as the dialect's body. `created`: the Unix time of the answer, in seconds.
    fn render<'a>(response: &'a GenerateResponse, options: &Self::Options, created: u64) -> Self::Rendered<'a>;

    /// The events of a stream whose first chunk is `first`.
    fn events(first: &GenerateStreamResponse, options: Self::Options, created: u64) -> Self::Events;

    /// A failure as the dialect's error body.
    fn error_body(problem: &Problem) -> Value;

    /// A failure as the dialect's error response.
    fn error(problem: &Problem) -> http::Response<tonic::body::Body> {
        problem.respond(&Self::error_body(problem))
    }
}

/// What parsing needs besides the body.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The cache policy of `x-llmesh-cache` (for dialects with [`Dialect::CACHE_HEADER`]).
    pub cache: i32,
    /// `gateway.default_model`, for a body that names none (the seed's only).
    pub default_model: Option<&'a str>,
    /// The request limits' `max_messages`: no list of objects in a body is read past it.
    pub max_objects: usize,
}

/// A parsed request.
#[derive(Debug)]
pub struct Parsed<O> {
    pub request: GenerateRequest,
    pub stream: bool,
    pub options: O,
    pub unmapped: Unmapped,
}

/// Names the top-level fields of a request that llmesh does not act on (`x-llmesh-unmapped-fields`).
pub const UNMAPPED_HEADER: &str = "x-llmesh-unmapped-fields";
/// At most this many names in that header, each at most this long (the fields themselves are
/// bounded by `limits.max_extensions_bytes`).
const UNMAPPED_NAMES: usize = 16;
const UNMAPPED_NAME_BYTES: usize = 64;

/// The top-level fields of a body that llmesh does not act on: carried as the request's
/// extensions in `dialect` — to an upstream of the same dialect, dropped for another, and part of
/// the cache key either way — and named in a response header so that a client can tell.
#[derive(Debug, Default)]
pub struct Unmapped {
    extensions: Option<Extensions>,
    /// The top-level fields the header names: at most [`UNMAPPED_NAMES`], each a short printable
    /// name.
    names: Vec<String>,
    /// Fields parsed into the contract that only an upstream of the client's dialect takes, and
    /// that dialect: named too unless such an upstream answered.
    dropped: Vec<String>,
    dialect: &'static str,
}

impl Unmapped {
    pub fn of(rest: serde_json::Map<String, Value>, dialect: &'static str) -> Self {
        if rest.is_empty() {
            return Self { dialect, ..Self::default() };
        }
        let names = nameable(rest.keys());
        let json = Value::Object(rest).to_string();
        Self { extensions: Some(Extensions { dialect: dialect.into(), json }), names, dropped: Vec::new(), dialect }
    }

    /// Adds `dropped` to the header, unless the answer comes from a provider of the client's
    /// dialect: fields llmesh parsed into the contract that only such a provider takes (see
    /// `anthropic_dropped`). The header still holds at most 16 names.
    pub fn and_dropped(mut self, dropped: Vec<String>) -> Self {
        self.dropped = dropped;
        self
    }

    /// The extensions `request` carries: the top-level fields llmesh does not act on, in
    /// `dialect`. When it has none but a part or a tool has an `extra` (Anthropic `citations`, a
    /// tool's `defer_loading`), the dialect alone: it is what tells an upstream of the same dialect
    /// that those are its own fields to send.
    pub fn extensions_for(&self, request: &GenerateRequest, dialect: &str) -> Option<Extensions> {
        if self.extensions.is_some() {
            return self.extensions.clone();
        }
        let mut parts = request.messages.iter().flat_map(|m| &m.parts);
        let extra = parts.any(|p| !p.extra.is_empty()) || request.tools.iter().any(|t| !t.extra.is_empty());
        extra.then(|| Extensions { dialect: dialect.into(), json: String::new() })
    }

    /// The header's value for an answer of `provider`, if any field is unmapped.
    fn header(&self, provider: &str) -> Option<HeaderValue> {
        let dropped = if provider == self.dialect { &[][..] } else { &self.dropped[..] };
        let names = nameable(self.names.iter().chain(dropped));
        if names.is_empty() {
            return None;
        }
        HeaderValue::from_str(&names.join(", ")).ok()
    }

    /// Names the unmapped fields of a call `provider` answered.
    pub fn write(&self, headers: &mut HeaderMap, provider: &str) {
        if let Some(names) = self.header(provider) {
            headers.insert(HeaderName::from_static(UNMAPPED_HEADER), names);
        }
    }
}

/// The first [`UNMAPPED_NAMES`] of `names` that fit in the header (short, printable ASCII).
fn nameable<'a>(names: impl Iterator<Item = &'a String>) -> Vec<String> {
    names
        .filter(|name| name.len() <= UNMAPPED_NAME_BYTES && name.bytes().all(|b| b.is_ascii_graphic()))
        .take(UNMAPPED_NAMES)
        .cloned()
        .collect()
}

/// Adds an answer's extensions of `dialect` (the upstream's own fields, such as OpenAI's
/// `service_tier`) to `body`: a field the body has a value for stays as it is.
fn add_extensions(body: &mut Value, extensions: Option<&Extensions>, dialect: &str) {
    let Some(fields) = extension_fields(extensions, dialect) else { return };
    let Value::Object(body) = body else { return };
    for (name, value) in fields {
        match body.get(&name) {
            Some(Value::Null) | None => {
                body.insert(name, value);
            }
            Some(_) => {}
        }
    }
}

/// An answer's extensions of `dialect` as the fields they hold (none when they are another
/// dialect's, or not a JSON object).
fn extension_fields(extensions: Option<&Extensions>, dialect: &str) -> Option<serde_json::Map<String, Value>> {
    let extensions = extensions.filter(|e| e.dialect == dialect)?;
    match serde_json::from_str::<Value>(&extensions.json) {
        Ok(Value::Object(fields)) => Some(fields),
        _ => None,
    }
}

/// An id under a dialect's prefix (`chatcmpl-…`, `msg_…`), serialized without building the string.
#[derive(Debug, Clone, Copy)]
struct PrefixedId<'a> {
    prefix: &'static str,
    id: &'a str,
}

impl std::fmt::Display for PrefixedId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.prefix, self.id)
    }
}

impl serde::Serialize for PrefixedId<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

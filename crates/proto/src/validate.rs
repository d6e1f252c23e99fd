//! Validation of generation requests. Every field a client sets has a limit in [`Limits`], checked
//! before any work; every rule answers INVALID_ARGUMENT with a message that starts with the field
//! name, so a client can tell what to fix.
//!
//! What it promises:
//! - Sizes are checked before contents, and small fields before large ones: a 1 MB model name is
//!   refused by its length, without scanning or copying it. A message never echoes more than
//!   [`ECHO_CHARS`] characters of what the client sent (the rest is cut and marked `…`).
//! - [`Limits::max_request_bytes`] is the largest encoded request that can pass these checks (with
//!   a margin): servers refuse larger messages before decoding them (tonic's
//!   `max_decoding_message_size`), so an oversized field never reaches memory at all.
//!
//! What it does not check: whether a model exists (the service that routes it decides), the
//! `idempotency_key` (the job queue's rules; [`IDEMPOTENCY_KEY_ALLOWANCE`] is the room kept for it
//! in [`Limits::max_request_bytes`]).

use crate::{common::v1::CachePolicy, generation::v1::GenerateRequest};
use serde::{Deserialize, Serialize};
use tonic::Status;

pub const ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer"];

/// The characters a model name may contain, besides ASCII letters and digits.
pub const MODEL_PUNCTUATION: &str = "._:/@-";

/// The most characters of a client's value that an error message repeats.
pub const ECHO_CHARS: usize = 64;

/// Metadata keys with this prefix are the mesh's own: the gateway adds them after validating a
/// client's request (a queued job's trace context, [`RESERVED_METADATA_KEY`]; a private cache
/// scope, [`crate::cache_key::SCOPE_METADATA_KEY`]) and refuses them from clients
/// ([`no_reserved_metadata`]). They do not count against [`Limits::max_metadata_entries`], so a
/// request with the most entries a client may send still passes when generation validates it
/// again; their sizes are checked like any other entry's.
pub const RESERVED_METADATA_PREFIX: &str = "llmesh.";

/// Where a queued job's request carries its submitter's trace context (a W3C `traceparent`), so
/// that the worker's span continues the submitter's trace; see [`RESERVED_METADATA_PREFIX`].
pub const JOB_TRACEPARENT_KEY: &str = "llmesh.traceparent";

/// The metadata key the gateway adds to a queued job's request: [`JOB_TRACEPARENT_KEY`].
pub const RESERVED_METADATA_KEY: &str = JOB_TRACEPARENT_KEY;

/// The most reserved entries the mesh adds to one request (trace context, cache scope).
const RESERVED_METADATA_ENTRIES: usize = 2;

/// Room kept for `idempotency_key` in [`Limits::max_request_bytes`]: its rules are the job
/// queue's, which allows far less than this.
pub const IDEMPOTENCY_KEY_ALLOWANCE: usize = 1024;

/// Size limits on what a client may ask for: `limits.*` in the gateway's and generation's
/// configuration (and the cache's, which bounds the requests it accepts by them). Every field of a
/// generate request is bounded by one of these, by a fixed set (`messages[].role`, `cache`) or by
/// its type.
///
/// | field | limit | default |
/// | --- | --- | --- |
/// | `model` | `max_model_bytes`, ASCII letters, digits and `._:/@-` | 128 |
/// | `prompt` + every `messages[].content` | `max_prompt_bytes` | 65,536 |
/// | `messages` | `max_messages` entries; `role` one of [`ROLES`] | 256 |
/// | `max_tokens` | `max_tokens` (0: `default_max_tokens`) | 4,096 (256) |
/// | `temperature`, `top_p` | 0..=2, (0, 1] | |
/// | `stop` | `max_stop_sequences` entries, none empty, each at most `max_stop_bytes` | 4, 64 |
/// | `user` | `max_user_bytes` | 256 |
/// | `metadata` | `max_metadata_entries` entries ([`RESERVED_METADATA_KEY`] aside), keys at most `max_metadata_key_bytes`, values at most `max_metadata_value_bytes` | 16, 64, 512 |
///
/// A server refuses a message larger than [`Limits::max_request_bytes`] before decoding it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Highest `max_tokens` a request may ask for.
    pub max_tokens: u32,
    /// `max_tokens` used when a request leaves it at 0.
    pub default_max_tokens: u32,
    /// Largest prompt (or sum of message contents), in bytes.
    pub max_prompt_bytes: usize,
    /// Most entries in `messages`.
    pub max_messages: usize,
    /// Longest `model` name, in bytes.
    pub max_model_bytes: usize,
    /// Longest `user`, in bytes.
    pub max_user_bytes: usize,
    /// Most entries in `stop`.
    pub max_stop_sequences: usize,
    /// Longest `stop` entry, in bytes.
    pub max_stop_bytes: usize,
    /// Most `metadata` entries (not counting [`RESERVED_METADATA_KEY`]).
    pub max_metadata_entries: usize,
    /// Longest `metadata` key, in bytes.
    pub max_metadata_key_bytes: usize,
    /// Longest `metadata` value, in bytes.
    pub max_metadata_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tokens: 4096,
            default_max_tokens: 256,
            max_prompt_bytes: 64 * 1024,
            max_messages: 256,
            max_model_bytes: 128,
            max_user_bytes: 256,
            max_stop_sequences: 4,
            max_stop_bytes: 64,
            max_metadata_entries: 16,
            max_metadata_key_bytes: 64,
            max_metadata_value_bytes: 512,
        }
    }
}

/// Protobuf framing of a length-delimited field: a one-byte tag (field numbers below 16) and a
/// length varint of at most five bytes (lengths below 4 GiB).
const FIELD_FRAMING: usize = 1 + 5;

/// Every scalar field of a generate request at its longest encoding: `max_tokens` (varint),
/// `temperature` and `top_p` (fixed32), `seed` (varint of an int64) and `cache` (varint of an
/// enum; a negative one takes ten bytes), each after its tag.
const SCALAR_FIELDS_BYTES: usize = (1 + 5) + (1 + 4) + (1 + 4) + (1 + 10) + (1 + 10);

/// Longest role name in [`ROLES`].
const MAX_ROLE_BYTES: usize = 9;

/// Added to the exact sum in [`Limits::max_request_bytes`]: room for encodings other clients
/// choose (unknown fields are skipped by the decoder, but they travel), and for fields added later.
const REQUEST_MARGIN_BYTES: usize = 4 * 1024;

impl Limits {
    /// The largest encoded generate request (gateway or generation, unary or stream, or a
    /// `SubmitJob`) that can pass [`generate_request`], plus a margin: what a server's
    /// `max_decoding_message_size` should be. A larger message cannot be valid, so it is refused
    /// before it is read into memory. It grows with every limit here (94,291 bytes with the
    /// defaults).
    pub fn max_request_bytes(&self) -> usize {
        let field = |bytes: usize| bytes.saturating_add(FIELD_FRAMING);
        // Each message: its own framing, the role, and the content's framing (the content itself
        // is counted in the prompt bytes).
        let per_message = field(field(MAX_ROLE_BYTES).saturating_add(FIELD_FRAMING));
        let per_metadata_entry =
            field(field(self.max_metadata_key_bytes).saturating_add(field(self.max_metadata_value_bytes)));
        let exact = [
            field(self.max_model_bytes),
            field(self.max_prompt_bytes),
            per_message.saturating_mul(self.max_messages),
            field(self.max_stop_bytes).saturating_mul(self.max_stop_sequences),
            field(self.max_user_bytes),
            // The mesh's own entries are allowed beside the client's.
            per_metadata_entry.saturating_mul(self.max_metadata_entries.saturating_add(RESERVED_METADATA_ENTRIES)),
            field(IDEMPOTENCY_KEY_ALLOWANCE),
            SCALAR_FIELDS_BYTES,
        ]
        .into_iter()
        .fold(0usize, usize::saturating_add);
        exact.saturating_add(exact / 16).saturating_add(REQUEST_MARGIN_BYTES)
    }
}

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
    /// The field's path (`messages[2].role`).
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

fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Result<(), Invalid> {
    Err(Invalid { field: field.into(), detail: detail.into() })
}

fn too_long(field: &str, bytes: usize, limit: usize) -> Result<(), Invalid> {
    invalid(field, format!("{bytes} bytes exceed the limit of {limit} bytes"))
}

/// Checks a model name: present, at most `limits.max_model_bytes`, and only ASCII letters, digits
/// and [`MODEL_PUNCTUATION`]. The name is never copied before its length is known to be bounded.
pub fn model(model: &str, limits: &Limits) -> Result<(), Invalid> {
    if model.len() > limits.max_model_bytes {
        return too_long("model", model.len(), limits.max_model_bytes);
    }
    if model.trim().is_empty() {
        return invalid("model", "required (ListModels lists the available models)");
    }
    if let Some(bad) = model.chars().find(|c| !c.is_ascii_alphanumeric() && !MODEL_PUNCTUATION.contains(*c)) {
        return invalid(
            "model",
            format!("{} has {bad:?}; a model name is ASCII letters, digits and {MODEL_PUNCTUATION}", echo(model)),
        );
    }
    Ok(())
}

/// Checks `request` against `limits`, cheapest and smallest first: every length and count is
/// checked before any content is read. The model name is only checked for its form here; whether
/// it exists is for the service that routes it.
pub fn generate_request(request: &GenerateRequest, limits: &Limits) -> Result<(), Invalid> {
    model(&request.model, limits)?;
    if request.user.len() > limits.max_user_bytes {
        return too_long("user", request.user.len(), limits.max_user_bytes);
    }
    stop(&request.stop, limits)?;
    metadata(&request.metadata, limits)?;
    if request.messages.len() > limits.max_messages {
        return invalid(
            "messages",
            format!("{} messages exceed the limit of {}", request.messages.len(), limits.max_messages),
        );
    }
    // Bounded by the message count above: no content is read to sum its length.
    let prompt_bytes = prompt_bytes(request);
    if prompt_bytes > limits.max_prompt_bytes {
        return invalid(
            "prompt",
            format!("{prompt_bytes} bytes exceed the limit of {} bytes", limits.max_prompt_bytes),
        );
    }
    match (request.prompt.is_empty(), request.messages.is_empty()) {
        (true, true) => return invalid("prompt", "required (or messages)"),
        (false, false) => return invalid("prompt", "set prompt or messages, not both"),
        (false, true) if request.prompt.trim().is_empty() => {
            return invalid("prompt", "must not be blank");
        }
        _ => {}
    }
    for (i, message) in request.messages.iter().enumerate() {
        if !ROLES.contains(&message.role.as_str()) {
            return invalid(
                format!("messages[{i}].role"),
                format!("{} is not one of {}", echo(&message.role), ROLES.join(", ")),
            );
        }
    }
    if !request.messages.is_empty() && request.messages.iter().all(|m| m.content.trim().is_empty()) {
        return invalid("messages", "every message content is blank");
    }
    if request.max_tokens > limits.max_tokens {
        return invalid("max_tokens", format!("{} exceeds the limit of {}", request.max_tokens, limits.max_tokens));
    }
    if let Some(t) = request.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return invalid("temperature", format!("{t} is outside 0..=2"));
    }
    if let Some(p) = request.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return invalid("top_p", format!("{p} is outside (0, 1]"));
    }
    if CachePolicy::try_from(request.cache).is_err() {
        return invalid("cache", format!("{} is not a known cache policy", request.cache));
    }
    Ok(())
}

fn stop(stop: &[String], limits: &Limits) -> Result<(), Invalid> {
    if stop.len() > limits.max_stop_sequences {
        return invalid("stop", format!("{} sequences exceed the limit of {}", stop.len(), limits.max_stop_sequences));
    }
    for (i, sequence) in stop.iter().enumerate() {
        if sequence.is_empty() {
            return invalid(format!("stop[{i}]"), "sequences must not be empty");
        }
        if sequence.len() > limits.max_stop_bytes {
            return too_long(&format!("stop[{i}]"), sequence.len(), limits.max_stop_bytes);
        }
    }
    Ok(())
}

/// Refuses metadata keys a client may not set: those with [`RESERVED_METADATA_PREFIX`], which
/// the mesh sets itself (a client naming another key's cache scope would read its private
/// entries). For the gateway, on a client's request.
pub fn no_reserved_metadata(request: &GenerateRequest) -> Result<(), Invalid> {
    match request.metadata.keys().find(|key| key.starts_with(RESERVED_METADATA_PREFIX)) {
        Some(key) => invalid(
            "metadata",
            format!("keys starting with {RESERVED_METADATA_PREFIX:?} are the mesh's own; {} is not allowed", echo(key)),
        ),
        None => Ok(()),
    }
}

fn metadata(metadata: &std::collections::HashMap<String, String>, limits: &Limits) -> Result<(), Invalid> {
    let reserved = metadata.keys().filter(|key| key.starts_with(RESERVED_METADATA_PREFIX)).count();
    let entries = metadata.len() - reserved.min(RESERVED_METADATA_ENTRIES);
    if entries > limits.max_metadata_entries {
        return invalid("metadata", format!("{entries} entries exceed the limit of {}", limits.max_metadata_entries));
    }
    for (key, value) in metadata {
        if key.len() > limits.max_metadata_key_bytes {
            return invalid(
                "metadata",
                format!(
                    "key {} is {} bytes, over the limit of {} bytes",
                    echo(key),
                    key.len(),
                    limits.max_metadata_key_bytes
                ),
            );
        }
        if value.len() > limits.max_metadata_value_bytes {
            return invalid(
                format!("metadata[{}]", echo(key)),
                format!("{} bytes exceed the limit of {} bytes", value.len(), limits.max_metadata_value_bytes),
            );
        }
    }
    Ok(())
}

/// Bytes of prompt text the request carries.
pub fn prompt_bytes(request: &GenerateRequest) -> usize {
    request.prompt.len() + request.messages.iter().map(|m| m.content.len()).sum::<usize>()
}

/// About four characters a token (the usual rule of thumb for English text): what llmesh counts
/// where no tokenizer has counted (reservations before a call, text streamed to a client that went
/// away, usage an upstream did not report).
pub fn estimated_tokens(chars: usize) -> u32 {
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

/// The `max_tokens` to use: the request's, or the default when it left it at 0.
pub fn effective_max_tokens(request: &GenerateRequest, limits: &Limits) -> u32 {
    if request.max_tokens == 0 { limits.default_max_tokens } else { request.max_tokens }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::v1::ChatMessage;
    use prost::Message as _;
    use tonic::Code;

    fn ok() -> GenerateRequest {
        GenerateRequest { model: "sim".into(), prompt: "hello".into(), ..Default::default() }
    }

    fn rejected(request: GenerateRequest, field: &str) -> String {
        let invalid = generate_request(&request, &Limits::default()).expect_err("should be rejected");
        let status = Status::from(invalid);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{:?} does not name {field}", status.message());
        status.message().to_string()
    }

    fn rejects(request: GenerateRequest, field: &str) {
        rejected(request, field);
    }

    #[test]
    fn clients_may_not_set_the_meshs_own_metadata() {
        let mine = GenerateRequest { metadata: metadata(&[("llmesh.cache_scope", "team-b")]), ..ok() };
        let invalid = no_reserved_metadata(&mine).unwrap_err();
        assert_eq!(invalid.field, "metadata", "{invalid:?}");
        assert!(no_reserved_metadata(&GenerateRequest { metadata: metadata(&[("team", "a")]), ..ok() }).is_ok());
        // The mesh's own entries pass generation's check beside the most a client may send.
        let limits = Limits::default();
        let mut full = many_metadata(limits.max_metadata_entries);
        full.insert("llmesh.cache_scope".into(), "team-a".into());
        full.insert(RESERVED_METADATA_KEY.into(), "00-trace".into());
        assert!(generate_request(&GenerateRequest { metadata: full, ..ok() }, &limits).is_ok());
    }

    fn metadata(entries: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
        entries.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
    }

    fn many_metadata(n: usize) -> std::collections::HashMap<String, String> {
        (0..n).map(|i| (format!("k{i}"), "v".to_string())).collect()
    }

    /// How each field of a generate request is bounded (the table in the [`Limits`] docs). A field
    /// added to the contract fails this test until it is bounded and listed here.
    const BOUNDED_FIELDS: &[(&str, &str)] = &[
        ("model", "max_model_bytes, characters"),
        ("prompt", "max_prompt_bytes"),
        ("messages", "max_messages, roles, max_prompt_bytes"),
        ("max_tokens", "max_tokens"),
        ("temperature", "0..=2"),
        ("top_p", "(0, 1]"),
        ("stop", "max_stop_sequences, max_stop_bytes"),
        ("seed", "its type"),
        ("user", "max_user_bytes"),
        ("metadata", "max_metadata_entries, max_metadata_key_bytes, max_metadata_value_bytes"),
        ("cache", "the CachePolicy values"),
        ("idempotency_key", "the job queue's rules; IDEMPOTENCY_KEY_ALLOWANCE"),
    ];

    #[test]
    fn every_request_field_is_bounded() {
        let set = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).expect("descriptor set");
        for (package, message) in [
            ("llmesh.generation.v1", "GenerateRequest"),
            ("llmesh.generation.v1", "GenerateStreamRequest"),
            ("llmesh.gateway.v1", "GenerateRequest"),
            ("llmesh.gateway.v1", "GenerateStreamRequest"),
            ("llmesh.gateway.v1", "SubmitJobRequest"),
        ] {
            let descriptor = set
                .file
                .iter()
                .filter(|f| f.package() == package)
                .flat_map(|f| &f.message_type)
                .find(|m| m.name() == message)
                .expect("in the descriptor set");
            for field in &descriptor.field {
                assert!(
                    BOUNDED_FIELDS.iter().any(|(name, _)| *name == field.name()),
                    "{package}.{message}.{} has no limit",
                    field.name()
                );
            }
        }
    }

    #[test]
    fn accepts_a_plain_request() {
        assert!(generate_request(&ok(), &Limits::default()).is_ok());
    }

    #[test]
    fn names_the_field_at_fault() {
        rejects(GenerateRequest { model: String::new(), ..ok() }, "model");
        rejects(GenerateRequest { prompt: String::new(), ..ok() }, "prompt");
        rejects(GenerateRequest { prompt: "   ".into(), ..ok() }, "prompt");
        let message = ChatMessage { role: "user".into(), content: "hi".into() };
        rejects(GenerateRequest { messages: vec![message.clone()], ..ok() }, "prompt");
        let bad_role = ChatMessage { role: "robot".into(), content: "hi".into() };
        rejects(GenerateRequest { prompt: String::new(), messages: vec![bad_role], ..ok() }, "messages[0].role");
        rejects(GenerateRequest { prompt: "x".repeat(64 * 1024 + 1), ..ok() }, "prompt");
        rejects(GenerateRequest { max_tokens: 4097, ..ok() }, "max_tokens");
        rejects(GenerateRequest { temperature: Some(2.5), ..ok() }, "temperature");
        rejects(GenerateRequest { temperature: Some(f32::NAN), ..ok() }, "temperature");
        rejects(GenerateRequest { top_p: Some(0.0), ..ok() }, "top_p");
        rejects(GenerateRequest { stop: vec![String::new()], ..ok() }, "stop");
        rejects(GenerateRequest { stop: vec!["a".into(); 5], ..ok() }, "stop");
        rejects(GenerateRequest { cache: 99, ..ok() }, "cache");
    }

    #[test]
    fn model_names_are_short_and_plain() {
        let limits = Limits::default();
        for good in ["sim", "sim-flaky-3", "gpt-4o-mini", "meta-llama/Llama-3.1-8B", "qwen2.5:7b", "a@b_c.d"] {
            assert!(model(good, &limits).is_ok(), "{good}");
        }
        assert!(model(&"m".repeat(128), &limits).is_ok());
        let message = rejected(GenerateRequest { model: "m".repeat(129), ..ok() }, "model");
        assert_eq!(message, "model: 129 bytes exceed the limit of 128 bytes");
        rejects(GenerateRequest { model: "   ".into(), ..ok() }, "model: required");
        for bad in ["sim slow", "sim\n", "sím", "a;b", "a\"b", "${x}"] {
            rejects(GenerateRequest { model: bad.into(), ..ok() }, "model");
        }
    }

    #[test]
    fn a_huge_model_name_is_refused_by_its_length_and_not_echoed() {
        let message = rejected(GenerateRequest { model: "m".repeat(1 << 20), ..ok() }, "model");
        assert_eq!(message, format!("model: {} bytes exceed the limit of 128 bytes", 1 << 20));
        // A long name with a bad character is echoed, but only its first characters.
        let limits = Limits { max_model_bytes: 1 << 20, ..Limits::default() };
        let message = model(&format!("{} !", "m".repeat(1000)), &limits).expect_err("space").to_string();
        assert!(message.len() < 200, "{message}");
        assert!(message.contains('…'), "{message}");
    }

    #[test]
    fn user_is_bounded() {
        assert!(generate_request(&GenerateRequest { user: "u".repeat(256), ..ok() }, &Limits::default()).is_ok());
        let message = rejected(GenerateRequest { user: "u".repeat(257), ..ok() }, "user");
        assert_eq!(message, "user: 257 bytes exceed the limit of 256 bytes");
    }

    #[test]
    fn stop_sequences_are_bounded_in_number_and_length() {
        let four = vec!["a".repeat(64); 4];
        assert!(generate_request(&GenerateRequest { stop: four, ..ok() }, &Limits::default()).is_ok());
        let message = rejected(GenerateRequest { stop: vec!["a".into(), "b".repeat(65)], ..ok() }, "stop[1]");
        assert_eq!(message, "stop[1]: 65 bytes exceed the limit of 64 bytes");
        rejects(GenerateRequest { stop: vec!["a".into(), String::new()], ..ok() }, "stop[1]");
        rejects(GenerateRequest { stop: vec!["a".into(); 5], ..ok() }, "stop: 5 sequences");
    }

    #[test]
    fn metadata_is_bounded_in_entries_keys_and_values() {
        let limits = Limits::default();
        assert!(generate_request(&GenerateRequest { metadata: many_metadata(16), ..ok() }, &limits).is_ok());
        let message = rejected(GenerateRequest { metadata: many_metadata(17), ..ok() }, "metadata");
        assert_eq!(message, "metadata: 17 entries exceed the limit of 16");

        let long_key = "k".repeat(65);
        let message = rejected(GenerateRequest { metadata: metadata(&[(&long_key, "v")]), ..ok() }, "metadata");
        assert!(message.starts_with("metadata: key \"kkk"), "{message}");
        assert!(message.ends_with("is 65 bytes, over the limit of 64 bytes"), "{message}");

        let value = "v".repeat(2 << 20);
        let message = rejected(GenerateRequest { metadata: metadata(&[("team", &value)]), ..ok() }, "metadata");
        assert_eq!(message, format!("metadata[\"team\"]: {} bytes exceed the limit of 512 bytes", 2 << 20));
        let at_limit = "v".repeat(512);
        let request = GenerateRequest { metadata: metadata(&[(&"k".repeat(64), &at_limit)]), ..ok() };
        assert!(generate_request(&request, &limits).is_ok());
    }

    #[test]
    fn the_gateways_traceparent_entry_does_not_count() {
        // What SubmitJob sends on: the most entries a client may send, plus the trace context.
        let mut entries = many_metadata(16);
        entries.insert(RESERVED_METADATA_KEY.into(), format!("00-{}-{}-01", "a".repeat(32), "b".repeat(16)));
        assert!(generate_request(&GenerateRequest { metadata: entries.clone(), ..ok() }, &Limits::default()).is_ok());
        entries.insert("one-more".into(), "v".into());
        rejects(GenerateRequest { metadata: entries, ..ok() }, "metadata: 17 entries");
        // Its value is bounded like any other.
        let huge = metadata(&[(RESERVED_METADATA_KEY, &"0".repeat(513))]);
        rejects(GenerateRequest { metadata: huge, ..ok() }, "metadata[");
    }

    #[test]
    fn roles_are_not_echoed_whole() {
        let role = "r".repeat(100_000);
        let bad_role = ChatMessage { role, content: "hi".into() };
        let message =
            rejected(GenerateRequest { prompt: String::new(), messages: vec![bad_role], ..ok() }, "messages[0].role");
        assert!(message.len() < 200, "{message}");
    }

    #[test]
    fn echo_cuts_at_a_character_boundary() {
        assert_eq!(echo("short"), "\"short\"");
        assert_eq!(echo(&"é".repeat(64)), format!("{:?}", "é".repeat(64)));
        assert_eq!(echo(&"é".repeat(65)), format!("{:?}…", "é".repeat(64)));
    }

    #[test]
    fn messages_alone_are_fine() {
        let message = ChatMessage { role: "user".into(), content: "hi".into() };
        let request = GenerateRequest { prompt: String::new(), messages: vec![message], ..ok() };
        assert!(generate_request(&request, &Limits::default()).is_ok());
    }

    /// Every field at its limit, with either the prompt or the messages carrying the prompt bytes.
    fn largest_valid(limits: &Limits, with_messages: bool) -> GenerateRequest {
        let mut metadata: std::collections::HashMap<String, String> = (0..limits.max_metadata_entries)
            .map(|i| {
                let key = format!("{i:0width$}", width = limits.max_metadata_key_bytes);
                (key, "v".repeat(limits.max_metadata_value_bytes))
            })
            .collect();
        metadata.insert(RESERVED_METADATA_KEY.into(), "t".repeat(limits.max_metadata_value_bytes));
        let (prompt, messages) = if with_messages {
            let share = limits.max_prompt_bytes / limits.max_messages;
            let message = ChatMessage { role: "developer".into(), content: "c".repeat(share) };
            (String::new(), vec![message; limits.max_messages])
        } else {
            ("p".repeat(limits.max_prompt_bytes), Vec::new())
        };
        GenerateRequest {
            model: "m".repeat(limits.max_model_bytes),
            prompt,
            messages,
            max_tokens: limits.max_tokens,
            temperature: Some(2.0),
            top_p: Some(1.0),
            stop: vec!["s".repeat(limits.max_stop_bytes); limits.max_stop_sequences],
            seed: Some(i64::MIN),
            user: "u".repeat(limits.max_user_bytes),
            metadata,
            cache: i32::from(CachePolicy::OnlyIfCached),
            idempotency_key: "i".repeat(IDEMPOTENCY_KEY_ALLOWANCE),
        }
    }

    #[test]
    fn the_largest_valid_request_fits_max_request_bytes() {
        let bigger =
            Limits { max_prompt_bytes: 1 << 20, max_messages: 4096, max_metadata_entries: 64, ..Limits::default() };
        let small = Limits { max_prompt_bytes: 16, max_messages: 1, max_metadata_entries: 0, ..Limits::default() };
        for limits in [Limits::default(), bigger, small] {
            for with_messages in [false, true] {
                let request = largest_valid(&limits, with_messages);
                assert!(generate_request(&request, &limits).is_ok(), "{limits:?} {with_messages}");
                let encoded = request.encoded_len();
                let max = limits.max_request_bytes();
                assert!(encoded <= max, "{encoded} > {max} for {limits:?} {with_messages}");
                // Not wildly above what a valid request can be either: the margin is a margin.
                assert!(max < encoded * 2 + 8 * 1024, "{max} is far above {encoded} for {limits:?}");
            }
        }
        // The figure README and docs/OPERATIONS.md give.
        assert_eq!(Limits::default().max_request_bytes(), 94_291);
    }

    #[test]
    fn max_request_bytes_saturates() {
        let absurd = Limits { max_prompt_bytes: usize::MAX, max_messages: usize::MAX, ..Limits::default() };
        assert_eq!(absurd.max_request_bytes(), usize::MAX);
    }

    #[test]
    fn sizes_are_checked_before_contents() {
        // A request wrong in several ways is refused for the small field first, so a huge field
        // further down is never scanned.
        let request = GenerateRequest {
            model: "m".repeat(1000),
            prompt: " ".repeat(1 << 20),
            metadata: metadata(&[("k", &"v".repeat(1 << 20))]),
            ..ok()
        };
        rejects(request, "model");
        let request =
            GenerateRequest { metadata: metadata(&[("k", &"v".repeat(1 << 20))]), prompt: " ".into(), ..ok() };
        rejects(request, "metadata");
    }
}

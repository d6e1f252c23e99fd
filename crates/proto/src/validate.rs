//! Validation of generation requests. Every field a client sets has a limit in [`Limits`], checked
//! before any work; every rule answers INVALID_ARGUMENT with a message that starts with the field
//! path (`messages[3].parts[0].image.media_type`), so a client can tell what to fix.
//!
//! What it promises:
//! - Sizes are checked before contents, and small fields before large ones: a 1 MB model name is
//!   refused by its length, without scanning or copying it. A message never echoes more than
//!   [`ECHO_CHARS`] characters of what the client sent (the rest is cut and marked `…`).
//! - [`Limits::max_request_bytes`] is the largest encoded request that can pass these checks (with
//!   a margin): servers refuse larger messages before decoding them (tonic's
//!   `max_decoding_message_size`), so an oversized field never reaches memory at all.
//! - JSON the contract carries as text (schemas, `cache_control`, `extra`, `extensions.json`) is
//!   checked to be one JSON object; tool-call arguments are not parsed (carried byte for byte).
//!
//! What it does not check: whether a model exists (the service that routes it decides), the
//! `idempotency_key` (the job queue's rules; [`IDEMPOTENCY_KEY_ALLOWANCE`] is the room kept for it
//! in [`Limits::max_request_bytes`]), whether a schema is a valid JSON Schema, whether a tool
//! result answers a call made earlier in the conversation (the provider's rule).

mod content;
mod limits;
mod rules;
mod tools;

use crate::{common::v1::CachePolicy, generation::v1::GenerateRequest};

pub use content::{ROLES, inline_bytes, message_bytes, parts};
use limits::RESERVED_METADATA_ENTRIES;
pub use limits::{
    IDEMPOTENCY_KEY_ALLOWANCE, Limits, MAX_DIALECT_BYTES, MAX_ID_BYTES, MAX_LEVEL_BYTES, MAX_MEDIA_TYPE_BYTES,
    MAX_NAME_BYTES,
};
pub use rules::{ECHO_CHARS, Invalid, echo};
use rules::{invalid, too_long};
pub use tools::tool_bytes;

/// The characters a model name may contain, besides ASCII letters and digits.
pub const MODEL_PUNCTUATION: &str = "._:/@-";

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

/// Checks a model name: present, at most `limits.max_model_bytes`, and only ASCII letters, digits
/// and [`MODEL_PUNCTUATION`]. The name is never copied before its length is known to be bounded.
pub fn model(model: &str, limits: &Limits) -> Result<(), Invalid> {
    if model.len() > limits.max_model_bytes {
        return too_long("model", model.len(), limits.max_model_bytes);
    }
    if model.trim().is_empty() {
        return invalid("model: required (ListModels lists the available models)".into());
    }
    if let Some(bad) = model.chars().find(|c| !c.is_ascii_alphanumeric() && !MODEL_PUNCTUATION.contains(*c)) {
        return invalid(format!(
            "model: {} has {bad:?}; a model name is ASCII letters, digits and {MODEL_PUNCTUATION}",
            echo(model)
        ));
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
    content::counts(request, limits)?;
    // Bounded by the counts above: no content is read to sum its length.
    let prompt_bytes = prompt_bytes(request);
    if prompt_bytes > limits.max_prompt_bytes {
        return invalid(format!("prompt: {prompt_bytes} bytes exceed the limit of {} bytes", limits.max_prompt_bytes));
    }
    content::inline(request, limits)?;
    tools::tools(request, limits)?;
    tools::response_format(request, limits)?;
    tools::reasoning(request, limits)?;
    tools::extensions(request, limits)?;
    tools::tool_choice(request)?;
    match (request.prompt.is_empty(), request.messages.is_empty()) {
        (true, true) => return invalid("prompt: required (or messages)".into()),
        (false, false) => return invalid("prompt: set prompt or messages, not both".into()),
        (false, true) if request.prompt.trim().is_empty() => {
            return invalid("prompt: must not be blank".into());
        }
        _ => {}
    }
    content::shapes(request, limits)?;
    if request.max_tokens > limits.max_tokens {
        return invalid(format!("max_tokens: {} exceeds the limit of {}", request.max_tokens, limits.max_tokens));
    }
    if let Some(t) = request.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return invalid(format!("temperature: {t} is outside 0..=2"));
    }
    if let Some(p) = request.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return invalid(format!("top_p: {p} is outside (0, 1]"));
    }
    if CachePolicy::try_from(request.cache).is_err() {
        return invalid(format!("cache: {} is not a known cache policy", request.cache));
    }
    Ok(())
}

fn stop(stop: &[String], limits: &Limits) -> Result<(), Invalid> {
    if stop.len() > limits.max_stop_sequences {
        return invalid(format!("stop: {} sequences exceed the limit of {}", stop.len(), limits.max_stop_sequences));
    }
    for (i, sequence) in stop.iter().enumerate() {
        if sequence.is_empty() {
            return invalid(format!("stop[{i}]: sequences must not be empty"));
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
        Some(key) => invalid(format!(
            "metadata: keys starting with {RESERVED_METADATA_PREFIX:?} are the mesh's own; {} is not allowed",
            echo(key)
        )),
        None => Ok(()),
    }
}

fn metadata(metadata: &std::collections::HashMap<String, String>, limits: &Limits) -> Result<(), Invalid> {
    let reserved = metadata.keys().filter(|key| key.starts_with(RESERVED_METADATA_PREFIX)).count();
    let entries = metadata.len() - reserved.min(RESERVED_METADATA_ENTRIES);
    if entries > limits.max_metadata_entries {
        return invalid(format!("metadata: {entries} entries exceed the limit of {}", limits.max_metadata_entries));
    }
    for (key, value) in metadata {
        if key.len() > limits.max_metadata_key_bytes {
            return invalid(format!(
                "metadata: key {} is {} bytes, over the limit of {} bytes",
                echo(key),
                key.len(),
                limits.max_metadata_key_bytes
            ));
        }
        if value.len() > limits.max_metadata_value_bytes {
            return invalid(format!(
                "metadata[{}]: {} bytes exceed the limit of {} bytes",
                echo(key),
                value.len(),
                limits.max_metadata_value_bytes
            ));
        }
    }
    Ok(())
}

/// Bytes of prompt the request carries: `prompt`, and every string and bytes field of its
/// messages but roles and inline data (contents, text parts, URLs, tool calls, tool results,
/// reasoning blocks). What `limits.max_prompt_bytes` bounds.
pub fn prompt_bytes(request: &GenerateRequest) -> usize {
    request.prompt.len() + request.messages.iter().map(message_bytes).sum::<usize>()
}

/// About four characters a token (the usual rule of thumb for English text): what llmesh counts
/// where no tokenizer has counted (reservations before a call, text streamed to a client that went
/// away, usage an upstream did not report).
pub fn estimated_tokens(chars: usize) -> u32 {
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

/// Tokens an image counts for in estimates: [`IMAGE_TOKENS_LOW`] with detail LOW, else
/// [`IMAGE_TOKENS`], whatever its size (llmesh does not decode images). OpenAI charges 85 tokens
/// for a low-detail image and 85 + 170 a 512-pixel tile for high detail (a 1024×1024 image: 765);
/// Anthropic about width × height / 750 (1,568 for a 1092×1092 image): 1,024 sits between the
/// two for the images agents send, and budgets are settled with the provider's own count.
pub const IMAGE_TOKENS: u32 = 1024;
/// See [`IMAGE_TOKENS`].
pub const IMAGE_TOKENS_LOW: u32 = 85;

/// Tokens a document counts for in estimates: its text or URL as text, and inline data as
/// [`estimated_tokens`] of its bytes (a PDF's bytes are roughly its text's).
fn document_tokens(part: &crate::common::v1::ContentPart) -> u32 {
    estimated_tokens(inline_bytes(part))
}

/// The prompt tokens a request is estimated at before any tokenizer counted it: its text
/// ([`prompt_bytes`]), its tools and response format (name, description and schema, as text)
/// at [`estimated_tokens`], plus [`IMAGE_TOKENS`] per image and a document's inline bytes as text.
/// What reservations (token rate limits, budgets) hold before a call, and what `sim` reports.
pub fn estimated_prompt_tokens(request: &GenerateRequest) -> u32 {
    use crate::common::v1::{ImageDetail, content_part::Kind};
    let text = prompt_bytes(request)
        + request.tools.iter().map(tool_bytes).sum::<usize>()
        + request.response_format.as_ref().map_or(0, |f| f.name.len() + f.schema.len() + f.description.len());
    let media = request
        .messages
        .iter()
        .flat_map(|m| &m.parts)
        .map(|part| match &part.kind {
            Some(Kind::Image(image)) if image.detail == ImageDetail::Low as i32 => IMAGE_TOKENS_LOW,
            Some(Kind::Image(_)) => IMAGE_TOKENS,
            Some(Kind::Document(_)) => document_tokens(part),
            _ => 0,
        })
        .fold(0u32, u32::saturating_add);
    estimated_tokens(text).saturating_add(media)
}

/// Tokens a request's framing can add to its text, at most, in any provider's chat template:
/// begin-of-text, a default system preamble, the reply's priming (OpenAI counts 3, Llama 3.1's
/// template adds its knowledge-date preamble, about 25). See [`prompt_tokens_bound`].
pub const BOUND_REQUEST_TOKENS: u32 = 64;
/// Tokens a message's framing can add, at most (role, start and end markers: OpenAI counts 3 or
/// 4, Llama 3's template 5), and each of its parts (a content part's, tool call's or reasoning
/// block's type markers and ids).
pub const BOUND_MESSAGE_TOKENS: u32 = 16;
/// See [`BOUND_MESSAGE_TOKENS`].
pub const BOUND_PART_TOKENS: u32 = 16;
/// Tokens a provider can add, at most, to describe tools or a response format to the model:
/// Anthropic's tool-use system prompt is 159 to 530 tokens by model and `tool_choice`, OpenAI's
/// rendering of tools as a TypeScript namespace a few dozen. Once per request with tools, and once
/// with a response format, plus [`BOUND_PART_TOKENS`] per tool.
pub const BOUND_INSTRUCTIONS_TOKENS: u32 = 1_024;
/// Tokens an image can count for, at most, whatever its detail: providers count pixels, which
/// llmesh does not decode. OpenAI's largest is 1,445 (GPT-4o, high detail, 768×2048), Anthropic's
/// about 1,600 (it scales images down to 1.15 megapixels), a patch-counted OpenAI model's 3,779
/// (GPT-4.1 nano, 1,536 patches × 2.46). An allowance from published rules, not a proof: a
/// provider that counts more is held to the reservation when the call settles.
pub const BOUND_IMAGE_TOKENS: u32 = 4_096;
/// Tokens a document's pages can add as images, at most, on top of its bytes (Anthropic reads each
/// PDF page as text plus an image): an allowance like [`BOUND_IMAGE_TOKENS`].
pub const BOUND_DOCUMENT_TOKENS: u32 = 4_096;

/// The most prompt tokens any provider can count for `request`: what a spend budget reserves, so
/// that a call never costs more than it reserved (the token rate limits hold the closer
/// [`estimated_prompt_tokens`] instead: they charge an excess after the call).
///
/// Every tokenizer providers use (byte-level BPE such as `tiktoken`'s and Anthropic's,
/// SentencePiece with byte fallback) makes at least one byte of UTF-8 text per token, so a text's
/// bytes bound its tokens: a prompt of one-letter words (`"a a a …"`, two bytes a word) counts at
/// most its bytes, not the quarter that [`estimated_tokens`] says. The bound is therefore the bytes
/// of every text the upstream may read ([`prompt_bytes`], tools, response format, and the opaque
/// `extensions` carried to an upstream of the same dialect), plus the framing a chat template adds
/// ([`BOUND_REQUEST_TOKENS`], [`BOUND_MESSAGE_TOKENS`] per message, [`BOUND_PART_TOKENS`] per part
/// and tool, [`BOUND_INSTRUCTIONS_TOKENS`] for tools and for a response format), plus
/// [`BOUND_IMAGE_TOKENS`] per image and a document's inline bytes plus [`BOUND_DOCUMENT_TOKENS`].
/// Never below [`estimated_prompt_tokens`].
pub fn prompt_tokens_bound(request: &GenerateRequest) -> u32 {
    use crate::common::v1::content_part::Kind;
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let text = prompt_bytes(request)
        + request.tools.iter().map(tool_bytes).sum::<usize>()
        + request.response_format.as_ref().map_or(0, |f| f.name.len() + f.schema.len() + f.description.len())
        + request.extensions.as_ref().map_or(0, |e| e.json.len());
    let parts: usize = request.messages.iter().map(parts).sum();
    let framing = [
        BOUND_REQUEST_TOKENS,
        count(request.messages.len()).saturating_mul(BOUND_MESSAGE_TOKENS),
        count(parts.saturating_add(request.tools.len())).saturating_mul(BOUND_PART_TOKENS),
        if request.tools.is_empty() { 0 } else { BOUND_INSTRUCTIONS_TOKENS },
        if request.response_format.is_some() { BOUND_INSTRUCTIONS_TOKENS } else { 0 },
    ];
    let media = request.messages.iter().flat_map(|m| &m.parts).map(|part| match &part.kind {
        Some(Kind::Image(_)) => BOUND_IMAGE_TOKENS,
        Some(Kind::Document(_)) => count(inline_bytes(part)).saturating_add(BOUND_DOCUMENT_TOKENS),
        _ => 0,
    });
    framing.into_iter().chain(media).fold(count(text), u32::saturating_add).max(estimated_prompt_tokens(request))
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
        let status = generate_request(&request, &Limits::default())
            .map_err(tonic::Status::from)
            .expect_err("should be rejected");
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
        let status = no_reserved_metadata(&mine).map_err(tonic::Status::from).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("metadata"), "{status:?}");
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
        ("tools", "max_tools, max_schema_bytes, max_extra_bytes, max_tools_bytes, names"),
        ("tool_choice", "the ToolChoiceMode values, MAX_NAME_BYTES, one of tools"),
        ("parallel_tool_calls", "its type"),
        ("response_format", "max_schema_bytes, the ResponseFormatType values"),
        ("reasoning", "MAX_LEVEL_BYTES, max_tokens"),
        ("extensions", "MAX_DIALECT_BYTES, max_extensions_bytes"),
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
        let message = ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() };
        rejects(GenerateRequest { messages: vec![message.clone()], ..ok() }, "prompt");
        let bad_role = ChatMessage { role: "robot".into(), content: "hi".into(), ..Default::default() };
        rejects(GenerateRequest { prompt: String::new(), messages: vec![bad_role], ..ok() }, "messages[0].role");
        rejects(GenerateRequest { prompt: "x".repeat((4 << 20) + 1), ..ok() }, "prompt");
        rejects(GenerateRequest { max_tokens: 128 * 1024 + 1, ..ok() }, "max_tokens");
        rejects(GenerateRequest { temperature: Some(2.5), ..ok() }, "temperature");
        rejects(GenerateRequest { temperature: Some(f32::NAN), ..ok() }, "temperature");
        rejects(GenerateRequest { top_p: Some(0.0), ..ok() }, "top_p");
        rejects(GenerateRequest { stop: vec![String::new()], ..ok() }, "stop");
        rejects(GenerateRequest { stop: vec!["a".into(); 5], ..ok() }, "stop");
        rejects(GenerateRequest { cache: 99, ..ok() }, "cache");
    }

    fn conversation(messages: Vec<ChatMessage>) -> GenerateRequest {
        GenerateRequest { prompt: String::new(), messages, ..ok() }
    }

    fn user(parts: Vec<crate::common::v1::ContentPart>) -> ChatMessage {
        ChatMessage { role: "user".into(), parts, ..Default::default() }
    }

    fn image(data: usize, media_type: &str) -> crate::common::v1::ContentPart {
        use crate::common::v1::{ContentPart, Image, content_part::Kind, image::Source};
        let image = Image { source: Some(Source::Data(vec![0; data])), media_type: media_type.into(), detail: 0 };
        ContentPart { kind: Some(Kind::Image(image)), ..Default::default() }
    }

    fn text(text: &str) -> crate::common::v1::ContentPart {
        crate::common::v1::ContentPart {
            kind: Some(crate::common::v1::content_part::Kind::Text(text.into())),
            ..Default::default()
        }
    }

    fn tool(name: &str, parameters: &str) -> crate::common::v1::Tool {
        crate::common::v1::Tool { name: name.into(), parameters: parameters.into(), ..Default::default() }
    }

    #[test]
    fn a_tool_conversation_passes() {
        use crate::common::v1::{Reasoning, ToolCall, ToolChoice, ToolChoiceMode};
        let request = GenerateRequest {
            tools: vec![tool("Bash", r#"{"type":"object","required":["command"]}"#)],
            tool_choice: Some(ToolChoice { mode: ToolChoiceMode::Tool.into(), name: "Bash".into() }),
            ..conversation(vec![
                user(vec![text("run it"), image(100, "image/png")]),
                ChatMessage {
                    role: "assistant".into(),
                    tool_calls: vec![ToolCall {
                        id: "call_1".into(),
                        name: "Bash".into(),
                        // Not JSON: carried as the model wrote it, never parsed.
                        arguments: r#"{"command": "ec"#.into(),
                        signature: vec![],
                    }],
                    reasoning: vec![Reasoning { text: "thinking".into(), ..Default::default() }],
                    ..Default::default()
                },
                ChatMessage {
                    role: "tool".into(),
                    tool_call_id: "call_1".into(),
                    is_error: true,
                    parts: vec![text("no such command")],
                    ..Default::default()
                },
            ])
        };
        if let Err(status) = generate_request(&request, &Limits::default()) {
            panic!("{status:?}");
        }
    }

    #[test]
    fn new_fields_name_the_field_at_fault() {
        use crate::common::v1::{
            ContentPart, Extensions, ReasoningOptions, ResponseFormat, ToolCall, ToolChoice, ToolChoiceMode,
        };
        let limits = Limits::default();
        let both =
            ChatMessage { role: "user".into(), content: "a".into(), parts: vec![text("b")], ..Default::default() };
        rejects(conversation(vec![both]), "messages[0].content: set content or parts");
        rejects(conversation(vec![user(vec![ContentPart::default()])]), "messages[0].parts[0]: a part needs");
        rejects(conversation(vec![user(vec![text("a"), image(10, "")])]), "messages[0].parts[1].image.media_type");
        rejects(
            conversation(vec![user(vec![image(limits.max_inline_part_bytes + 1, "image/png")])]),
            "messages[0].parts[0].data",
        );
        let two_big = vec![image(5 << 20, "image/png"), image(5 << 20, "image/png")];
        rejects(conversation(vec![user(two_big)]), "messages: inline data");
        rejects(conversation(vec![user(vec![text("a"); 257])]), "messages[0]: 257 parts");
        let mut cached = text("a");
        cached.cache_control = "ephemeral".into();
        rejects(conversation(vec![user(vec![cached])]), "messages[0].parts[0].cache_control: not a JSON object");
        let call = |name: &str, arguments: String| ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![ToolCall { id: "c".into(), name: name.into(), arguments, signature: vec![] }],
            ..Default::default()
        };
        rejects(conversation(vec![call("a b", "{}".into())]), "messages[0].tool_calls[0].name");
        rejects(
            conversation(vec![call("f", "x".repeat(limits.max_tool_arguments_bytes + 1))]),
            "messages[0].tool_calls[0].arguments",
        );
        let mut on_user = call("f", "{}".into());
        on_user.role = "user".into();
        rejects(conversation(vec![on_user]), "messages[0].tool_calls: only assistant");
        let result = ChatMessage { role: "tool".into(), content: "42".into(), ..Default::default() };
        rejects(conversation(vec![result]), "messages[0].tool_call_id: required");

        let tools = |n: usize| (0..n).map(|i| tool(&format!("t{i}"), "")).collect::<Vec<_>>();
        rejects(GenerateRequest { tools: tools(129), ..ok() }, "tools: 129 tools");
        rejects(GenerateRequest { tools: vec![tool("f", "[]")], ..ok() }, "tools[0].parameters: not a JSON object");
        rejects(GenerateRequest { tools: vec![tool("f", "{")], ..ok() }, "tools[0].parameters: not a JSON object");
        rejects(
            GenerateRequest { tools: vec![tool("f", ""), tool("f", "")], ..ok() },
            "tools[1].name: \"f\" is named twice",
        );
        let schema = format!("{{\"d\":\"{}\"}}", "x".repeat(64 << 10));
        rejects(GenerateRequest { tools: vec![tool("f", &schema)], ..ok() }, "tools[0].parameters: ");
        let many = (0..20).map(|i| tool(&format!("t{i}"), &json_of(60 << 10))).collect();
        rejects(GenerateRequest { tools: many, ..ok() }, "tools: ");
        let named = |name: &str| Some(ToolChoice { mode: ToolChoiceMode::Tool.into(), name: name.into() });
        rejects(GenerateRequest { tools: tools(1), tool_choice: named("t9"), ..ok() }, "tool_choice.name");
        let required = Some(ToolChoice { mode: ToolChoiceMode::Required.into(), name: String::new() });
        rejects(GenerateRequest { tool_choice: required, ..ok() }, "tool_choice.mode: REQUIRED needs tools");
        let unknown = Some(ToolChoice { mode: 9, name: String::new() });
        rejects(GenerateRequest { tool_choice: unknown, ..ok() }, "tool_choice.mode");
        let format = |r#type: i32, schema: &str| {
            Some(ResponseFormat { r#type, name: "a".into(), schema: schema.into(), ..Default::default() })
        };
        rejects(GenerateRequest { response_format: format(3, ""), ..ok() }, "response_format.schema: required");
        rejects(GenerateRequest { response_format: format(3, "1"), ..ok() }, "response_format.schema: not a JSON");
        rejects(GenerateRequest { response_format: format(7, ""), ..ok() }, "response_format.type");
        let effort = |effort: &str| Some(ReasoningOptions { effort: effort.into(), ..Default::default() });
        rejects(GenerateRequest { reasoning: effort("HIGH"), ..ok() }, "reasoning.effort");
        rejects(GenerateRequest { reasoning: effort(&"a".repeat(17)), ..ok() }, "reasoning.effort");
        let budget = Some(ReasoningOptions { budget_tokens: Some(u32::MAX), ..Default::default() });
        rejects(GenerateRequest { reasoning: budget, ..ok() }, "reasoning.budget_tokens");
        let extensions = |dialect: &str, json: String| Some(Extensions { dialect: dialect.into(), json });
        rejects(GenerateRequest { extensions: extensions("", "{}".into()), ..ok() }, "extensions.dialect: required");
        rejects(GenerateRequest { extensions: extensions("Open AI", "{}".into()), ..ok() }, "extensions.dialect");
        rejects(GenerateRequest { extensions: extensions("openai", "[1]".into()), ..ok() }, "extensions.json");
        rejects(
            GenerateRequest { extensions: extensions("openai", json_of((64 << 10) + 1)), ..ok() },
            "extensions.json: 65537 bytes",
        );
        assert!(
            generate_request(&GenerateRequest { extensions: extensions("openai", json_of(100)), ..ok() }, &limits)
                .is_ok()
        );
    }

    #[test]
    fn estimates_count_text_tools_schemas_and_images() {
        use crate::common::v1::{ResponseFormat, image};
        let plain = conversation(vec![user(vec![text(&"a".repeat(400))])]);
        assert_eq!(estimated_prompt_tokens(&plain), 100);
        let with_tools = GenerateRequest { tools: vec![tool(&"t".repeat(40), &json_of(360))], ..plain.clone() };
        assert_eq!(estimated_prompt_tokens(&with_tools), 200);
        let format = ResponseFormat { r#type: 3, schema: json_of(400), ..Default::default() };
        let with_format = GenerateRequest { response_format: Some(format), ..plain.clone() };
        assert_eq!(estimated_prompt_tokens(&with_format), 200);
        let mut low = image(1 << 20, "image/png");
        if let Some(crate::common::v1::content_part::Kind::Image(image)) = &mut low.kind {
            image.detail = crate::common::v1::ImageDetail::Low.into();
        }
        let mut by_url = image(0, "");
        if let Some(crate::common::v1::content_part::Kind::Image(image)) = &mut by_url.kind {
            image.source = Some(image::Source::Url("https://example.com/a.png".into()));
        }
        // An image counts by the rule, not by its bytes; its URL and media type are text.
        let images = conversation(vec![user(vec![image(1 << 20, "image/png"), low, by_url])]);
        let text = "image/png".len() * 2 + "https://example.com/a.png".len();
        assert_eq!(estimated_prompt_tokens(&images), estimated_tokens(text) + IMAGE_TOKENS * 2 + IMAGE_TOKENS_LOW);
    }

    #[test]
    fn the_bound_counts_every_byte_and_the_framing() {
        use crate::common::v1::{Extensions, ResponseFormat};
        // One-letter words: two bytes a word, so a word-per-token tokenizer counts half the bytes,
        // twice the quarter-byte estimate. The bound holds every byte plus the framing.
        let words = "a ".repeat(390);
        let plain = GenerateRequest { prompt: words.clone(), ..ok() };
        assert_eq!(estimated_prompt_tokens(&plain), 195);
        assert_eq!(prompt_tokens_bound(&plain), 780 + BOUND_REQUEST_TOKENS);
        assert!(prompt_tokens_bound(&plain) >= words.split_whitespace().count() as u32);
        // Per message and part, tools, a format, and the opaque extensions.
        let chat = conversation(vec![user(vec![text("hi"), text("there")])]);
        assert_eq!(prompt_tokens_bound(&chat), 7 + BOUND_REQUEST_TOKENS + BOUND_MESSAGE_TOKENS + 2 * BOUND_PART_TOKENS);
        let tools = GenerateRequest { tools: vec![tool("t", &json_of(99))], ..chat.clone() };
        assert_eq!(
            prompt_tokens_bound(&tools) - prompt_tokens_bound(&chat),
            100 + BOUND_PART_TOKENS + BOUND_INSTRUCTIONS_TOKENS
        );
        let format = ResponseFormat { r#type: 3, schema: json_of(50), ..Default::default() };
        let formatted = GenerateRequest { response_format: Some(format), ..chat.clone() };
        assert_eq!(prompt_tokens_bound(&formatted) - prompt_tokens_bound(&chat), 50 + BOUND_INSTRUCTIONS_TOKENS);
        let extended = GenerateRequest {
            extensions: Some(Extensions { dialect: "openai".into(), json: json_of(30) }),
            ..chat.clone()
        };
        assert_eq!(prompt_tokens_bound(&extended) - prompt_tokens_bound(&chat), 30);
        // Media: the allowance per image whatever its detail; a document's bytes plus its allowance.
        let images = conversation(vec![user(vec![image(1 << 20, "image/png")])]);
        assert_eq!(
            prompt_tokens_bound(&images),
            9 + BOUND_REQUEST_TOKENS + BOUND_MESSAGE_TOKENS + BOUND_PART_TOKENS + BOUND_IMAGE_TOKENS
        );
        // Never below the estimate, and never wraps.
        for request in [plain, chat, tools, formatted, extended, images] {
            assert!(prompt_tokens_bound(&request) >= estimated_prompt_tokens(&request));
        }
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
        let status =
            model(&format!("{} !", "m".repeat(1000)), &limits).map_err(tonic::Status::from).expect_err("space");
        assert!(status.message().len() < 200, "{}", status.message());
        assert!(status.message().contains('…'), "{}", status.message());
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
        let bad_role = ChatMessage { role, content: "hi".into(), ..Default::default() };
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
        let message = ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() };
        let request = GenerateRequest { prompt: String::new(), messages: vec![message], ..ok() };
        assert!(generate_request(&request, &Limits::default()).is_ok());
    }

    /// A JSON object of exactly `bytes` bytes (at least 8).
    fn json_of(bytes: usize) -> String {
        format!("{{\"x\":\"{}\"}}", "x".repeat(bytes - 8))
    }

    /// Messages at every limit: `max_messages` of them, `max_parts` parts in all, the prompt
    /// bytes spread over text parts, and `max_inline_bytes` of images.
    fn largest_messages(limits: &Limits) -> Vec<ChatMessage> {
        use crate::common::v1::{ContentPart, Image, content_part::Kind, image};
        let per_message = (limits.max_parts / limits.max_messages).clamp(1, limits.max_parts_per_message);
        let images = if limits.max_inline_bytes == 0 {
            0
        } else {
            limits.max_inline_bytes.div_ceil(limits.max_inline_part_bytes)
        };
        let image_bytes = limits.max_inline_bytes.checked_div(images).unwrap_or(0);
        let media_type = "image/png";
        let parts = limits.max_messages * per_message;
        let share = (limits.max_prompt_bytes - images * media_type.len()) / parts;
        let mut made = 0;
        let mut part = || {
            made += 1;
            let kind = if made <= images {
                Kind::Image(Image {
                    source: Some(image::Source::Data(vec![0; image_bytes])),
                    media_type: media_type.into(),
                    detail: 3,
                })
            } else {
                Kind::Text("c".repeat(share))
            };
            ContentPart { kind: Some(kind), ..Default::default() }
        };
        (0..limits.max_messages)
            .map(|_| ChatMessage {
                role: "developer".into(),
                parts: (0..per_message).map(|_| part()).collect(),
                ..Default::default()
            })
            .collect()
    }

    /// Every field at its limit, with either the prompt or the messages carrying the prompt bytes.
    fn largest_valid(limits: &Limits, with_messages: bool) -> GenerateRequest {
        use crate::common::v1::{
            Extensions, ReasoningOptions, ResponseFormat, ResponseFormatType, Tool, ToolChoice, ToolChoiceMode,
        };
        let mut metadata: std::collections::HashMap<String, String> = (0..limits.max_metadata_entries)
            .map(|i| {
                let key = format!("{i:0width$}", width = limits.max_metadata_key_bytes);
                (key, "v".repeat(limits.max_metadata_value_bytes))
            })
            .collect();
        metadata.insert(RESERVED_METADATA_KEY.into(), "t".repeat(limits.max_metadata_value_bytes));
        let (prompt, messages) = if with_messages {
            (String::new(), largest_messages(limits))
        } else {
            ("p".repeat(limits.max_prompt_bytes), Vec::new())
        };
        let per_tool = limits.max_tools_bytes / limits.max_tools;
        let tools: Vec<Tool> = (0..limits.max_tools)
            .map(|i| Tool {
                name: format!("{i:0128}"),
                parameters: json_of(per_tool - MAX_NAME_BYTES),
                strict: Some(true),
                ..Default::default()
            })
            .collect();
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
            tool_choice: Some(ToolChoice { mode: ToolChoiceMode::Tool.into(), name: tools[0].name.clone() }),
            tools,
            parallel_tool_calls: Some(true),
            response_format: Some(ResponseFormat {
                r#type: ResponseFormatType::JsonSchema.into(),
                name: "n".repeat(MAX_NAME_BYTES),
                schema: json_of(limits.max_schema_bytes - MAX_NAME_BYTES),
                strict: Some(true),
                description: String::new(),
            }),
            reasoning: Some(ReasoningOptions {
                effort: "e".repeat(MAX_LEVEL_BYTES),
                budget_tokens: Some(limits.max_tokens),
                summary: "s".repeat(MAX_LEVEL_BYTES),
            }),
            extensions: Some(Extensions {
                dialect: "d".repeat(MAX_DIALECT_BYTES),
                json: json_of(limits.max_extensions_bytes),
            }),
        }
    }

    #[test]
    fn the_largest_valid_request_fits_max_request_bytes() {
        let bigger =
            Limits { max_prompt_bytes: 1 << 20, max_messages: 4096, max_metadata_entries: 64, ..Limits::default() };
        let small = Limits {
            max_prompt_bytes: 16,
            max_messages: 1,
            max_metadata_entries: 0,
            max_inline_bytes: 0,
            max_parts: 1,
            ..Limits::default()
        };
        for limits in [Limits::default(), bigger, small] {
            for with_messages in [false, true] {
                let request = largest_valid(&limits, with_messages);
                if let Err(status) = generate_request(&request, &limits) {
                    panic!("{status:?} for {limits:?} {with_messages}");
                }
                let encoded = request.encoded_len();
                let max = limits.max_request_bytes();
                assert!(encoded <= max, "{encoded} > {max} for {limits:?} {with_messages}");
                // Not wildly above what a valid request can be either: the margin is a margin.
                if with_messages {
                    assert!(max < encoded * 2 + 8 * 1024, "{max} is far above {encoded} for {limits:?}");
                }
                // The JSON body bound of the HTTP dialects holds the request's bytes.
                assert!(limits.max_json_body_bytes() >= encoded, "{limits:?}");
            }
        }
        // The figure docs/CONTRACT.md and docs/OPERATIONS.md give.
        assert_eq!(Limits::default().max_request_bytes(), 15_340_684);
        assert_eq!(Limits::default().max_json_body_bytes(), 50_275_828);
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

//! The cache key: SHA-256 over a canonical encoding of every request field that changes the
//! output. Each field of `llmesh.generation.v1.GenerateRequest` must be listed either in
//! [`KEY_FIELDS`] or in [`EXCLUDED_FIELDS`]; a test fails when a new field is in neither.
//!
//! The fields of the first contract (model, prompt, role and content of each message, sampling)
//! are encoded as they always were, so a plain request keeps its key across versions. What came
//! with content parts, tools and reasoning is keyed in a section of its own, present only when a
//! request uses any of it: each message that has parts, tool calls, a tool result, reasoning or a
//! name is keyed by its whole protobuf encoding (so a field added to a message later is keyed
//! without a change here), and so are the tools, tool choice, response format, reasoning options
//! and extensions. The extensions' JSON is keyed byte for byte: the dialects render it
//! deterministically, and two spellings of one object only cost a miss.

use crate::{common::v1::ChatMessage, generation::v1::GenerateRequest};
use prost::Message as _;
use sha2::{Digest, Sha256};

/// Fields that change the answer, in the order they are encoded.
pub const KEY_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning",
    "extensions",
];

/// Fields that do not change the answer.
pub const EXCLUDED_FIELDS: &[&str] = &[
    "user",            // who asked, not what
    "metadata",        // caller's labels (but for the scope below)
    "cache",           // how to use the cache, not what to generate
    "idempotency_key", // deduplication of submissions
];

/// A `metadata` entry that scopes a cache entry to one owner: the gateway sets it to the API key's
/// id for keys whose cache is private (clients cannot set `llmesh.` keys), so an equal request of
/// another key has another cache key. Requests without it keep the keys they always had.
pub const SCOPE_METADATA_KEY: &str = "llmesh.cache_scope";

/// Bumped whenever the encoding changes, so old entries are simply never found.
const VERSION: &[u8] = b"llmesh-cache-key-v1";

/// The hex key of `request`.
pub fn of(request: &GenerateRequest) -> String {
    let mut hasher = Canonical(Sha256::new());
    hasher.bytes(VERSION);
    hasher.bytes(request.model.as_bytes());
    hasher.bytes(request.prompt.as_bytes());
    hasher.count(request.messages.len());
    for message in &request.messages {
        hasher.bytes(message.role.as_bytes());
        hasher.bytes(message.content.as_bytes());
    }
    hasher.bytes(&request.max_tokens.to_le_bytes());
    hasher.optional(request.temperature.map(f32::to_le_bytes).as_ref().map(<[u8; 4]>::as_slice));
    hasher.optional(request.top_p.map(f32::to_le_bytes).as_ref().map(<[u8; 4]>::as_slice));
    hasher.count(request.stop.len());
    for stop in &request.stop {
        hasher.bytes(stop.as_bytes());
    }
    hasher.optional(request.seed.map(i64::to_le_bytes).as_ref().map(<[u8; 8]>::as_slice));
    if uses_the_contracts_second_part(request) {
        second_part(&mut hasher, request);
    }
    if let Some(scope) = request.metadata.get(SCOPE_METADATA_KEY) {
        hasher.bytes(SCOPE_METADATA_KEY.as_bytes());
        hasher.bytes(scope.as_bytes());
    }
    let digest = hasher.0.finalize();
    // Hex by hand: a `format!` per byte cost more than hashing the request (callgrind).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut key = String::with_capacity(2 * digest.len());
    for byte in digest {
        key.push(char::from(HEX[usize::from(byte >> 4)]));
        key.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    key
}

/// Starts the section of the fields added with content parts and tools; no first field of the
/// scope section has these bytes, so the sections cannot be mistaken for each other.
const SECOND_PART_TAG: &[u8] = b"llmesh.contract-v2";

fn has_more_than_text(message: &ChatMessage) -> bool {
    !message.parts.is_empty()
        || !message.tool_calls.is_empty()
        || !message.tool_call_id.is_empty()
        || message.is_error
        || !message.reasoning.is_empty()
        || !message.name.is_empty()
}

/// Whether `request` uses any field that came with content parts, tools and reasoning.
pub fn uses_the_contracts_second_part(request: &GenerateRequest) -> bool {
    request.messages.iter().any(has_more_than_text)
        || !request.tools.is_empty()
        || request.tool_choice.is_some()
        || request.parallel_tool_calls.is_some()
        || request.response_format.is_some()
        || request.reasoning.is_some()
        || request.extensions.is_some()
}

fn second_part(hasher: &mut Canonical, request: &GenerateRequest) {
    hasher.bytes(SECOND_PART_TAG);
    let rich: Vec<(usize, &ChatMessage)> =
        request.messages.iter().enumerate().filter(|(_, m)| has_more_than_text(m)).collect();
    hasher.count(rich.len());
    for (index, message) in rich {
        hasher.count(index);
        hasher.bytes(&message.encode_to_vec());
    }
    hasher.count(request.tools.len());
    for tool in &request.tools {
        hasher.bytes(&tool.encode_to_vec());
    }
    hasher.optional(request.tool_choice.as_ref().map(|m| m.encode_to_vec()).as_deref());
    hasher.optional(request.parallel_tool_calls.map(|p| [u8::from(p)]).as_ref().map(<[u8; 1]>::as_slice));
    hasher.optional(request.response_format.as_ref().map(|m| m.encode_to_vec()).as_deref());
    hasher.optional(request.reasoning.as_ref().map(|m| m.encode_to_vec()).as_deref());
    hasher.optional(request.extensions.as_ref().map(|m| m.encode_to_vec()).as_deref());
}

/// Whether `key` has the form [`of`] gives: 64 lowercase hex digits.
pub fn is_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Length-prefixed encoding: no two different field sequences produce the same bytes.
struct Canonical(Sha256);

impl Canonical {
    fn bytes(&mut self, bytes: &[u8]) {
        self.count(bytes.len());
        self.0.update(bytes);
    }

    fn count(&mut self, n: usize) {
        self.0.update((n as u64).to_le_bytes());
    }

    fn optional(&mut self, value: Option<&[u8]>) {
        match value {
            None => self.0.update([0]),
            Some(bytes) => {
                self.0.update([1]);
                self.bytes(bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::v1::{
        ContentPart, Extensions, Image, ReasoningOptions, ResponseFormat, Tool, ToolCall, ToolChoice, content_part,
        image,
    };

    fn base() -> GenerateRequest {
        GenerateRequest { model: "sim".into(), prompt: "hello".into(), ..Default::default() }
    }

    #[test]
    fn every_request_field_is_keyed_or_excluded() {
        let set = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
        let request = set
            .file
            .iter()
            .filter(|f| f.package() == "llmesh.generation.v1")
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == "GenerateRequest")
            .expect("GenerateRequest in the descriptor set");
        let mut fields: Vec<&str> = request.field.iter().map(|f| f.name()).collect();
        fields.sort_unstable();
        let mut listed: Vec<&str> = KEY_FIELDS.iter().chain(EXCLUDED_FIELDS).copied().collect();
        listed.sort_unstable();
        assert_eq!(fields, listed, "a GenerateRequest field is neither in KEY_FIELDS nor in EXCLUDED_FIELDS");
    }

    #[test]
    fn every_key_field_changes_the_key() {
        let variants = [
            GenerateRequest { model: "other".into(), ..base() },
            GenerateRequest { prompt: "hello!".into(), ..base() },
            GenerateRequest {
                prompt: String::new(),
                messages: vec![ChatMessage { role: "user".into(), content: "hello".into(), ..Default::default() }],
                ..base()
            },
            GenerateRequest { max_tokens: 9, ..base() },
            GenerateRequest { temperature: Some(0.0), ..base() },
            GenerateRequest { top_p: Some(0.5), ..base() },
            GenerateRequest { stop: vec!["x".into()], ..base() },
            GenerateRequest { seed: Some(0), ..base() },
            GenerateRequest { tools: vec![Tool { name: "f".into(), ..Default::default() }], ..base() },
            GenerateRequest { tool_choice: Some(ToolChoice { mode: 2, name: String::new() }), ..base() },
            GenerateRequest { parallel_tool_calls: Some(false), ..base() },
            GenerateRequest { response_format: Some(ResponseFormat { r#type: 2, ..Default::default() }), ..base() },
            GenerateRequest {
                reasoning: Some(ReasoningOptions { effort: "high".into(), ..Default::default() }),
                ..base()
            },
            GenerateRequest {
                extensions: Some(Extensions { dialect: "openai".into(), json: r#"{"logprobs":true}"#.into() }),
                ..base()
            },
        ];
        assert_eq!(variants.len(), KEY_FIELDS.len());
        let mut keys: Vec<String> = variants.iter().map(of).collect();
        keys.push(of(&base()));
        let count = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), count, "two different requests share a key");
    }

    fn with_part(source: image::Source) -> GenerateRequest {
        let part = ContentPart {
            kind: Some(content_part::Kind::Image(Image {
                source: Some(source),
                media_type: "image/png".into(),
                detail: 0,
            })),
            ..Default::default()
        };
        let message = ChatMessage { role: "user".into(), parts: vec![part], ..Default::default() };
        GenerateRequest { prompt: String::new(), messages: vec![message], ..base() }
    }

    #[test]
    fn every_new_message_field_changes_the_key() {
        let plain = ChatMessage { role: "assistant".into(), content: "x".into(), ..Default::default() };
        let call = ToolCall { id: "c".into(), name: "f".into(), arguments: "{}".into(), signature: vec![] };
        let variants = [
            plain.clone(),
            ChatMessage { tool_calls: vec![call.clone()], ..plain.clone() },
            // Arguments are keyed byte for byte: a space is another answer to cache.
            ChatMessage { tool_calls: vec![ToolCall { arguments: "{ }".into(), ..call }], ..plain.clone() },
            ChatMessage { tool_call_id: "c".into(), ..plain.clone() },
            ChatMessage { is_error: true, ..plain.clone() },
            ChatMessage { name: "n".into(), ..plain.clone() },
            ChatMessage { reasoning: vec![Default::default()], ..plain.clone() },
            ChatMessage { content: String::new(), parts: vec![ContentPart::default()], ..plain },
        ];
        let mut keys: Vec<String> = variants
            .into_iter()
            .map(|m| of(&GenerateRequest { prompt: String::new(), messages: vec![m], ..base() }))
            .collect();
        keys.push(of(&with_part(image::Source::Data(vec![1, 2]))));
        keys.push(of(&with_part(image::Source::Data(vec![1, 3]))));
        keys.push(of(&with_part(image::Source::Url("https://example.com/a.png".into()))));
        let count = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), count, "two different requests share a key");
    }

    #[test]
    fn a_plain_request_keeps_its_key() {
        // Computed with the first contract's encoding: entries stored by an older gateway are found.
        let request = GenerateRequest {
            prompt: String::new(),
            messages: vec![ChatMessage { role: "user".into(), content: "hello".into(), ..Default::default() }],
            ..base()
        };
        assert_eq!(of(&request), PLAIN_KEY);
    }

    #[test]
    fn a_private_scope_changes_the_key_and_only_it() {
        let scoped = |owner: &str| GenerateRequest {
            metadata: [(SCOPE_METADATA_KEY.to_string(), owner.to_string()), ("a".into(), "b".into())].into(),
            ..base()
        };
        assert_ne!(of(&scoped("team-a")), of(&base()));
        assert_ne!(of(&scoped("team-a")), of(&scoped("team-b")));
        assert_eq!(of(&scoped("team-a")), of(&scoped("team-a")));
    }

    #[test]
    fn excluded_fields_do_not_change_the_key() {
        let varied = GenerateRequest {
            user: "someone".into(),
            metadata: [("a".to_string(), "b".to_string())].into(),
            cache: 2,
            idempotency_key: "k".into(),
            ..base()
        };
        assert_eq!(of(&varied), of(&base()));
    }

    /// The key of `{model: "sim", messages: [{role: "user", content: "hello"}]}` before the contract grew.
    const PLAIN_KEY: &str = "ab6fb26c670cb20da9aca19645165d513bc2328e6e6672134e48c748298549cd";

    #[test]
    fn keys_have_one_form() {
        assert!(is_key(&of(&base())));
        assert!(!is_key(&of(&base()).to_uppercase()));
        assert!(!is_key(&of(&base())[1..]));
        assert!(!is_key(&format!("{}0", of(&base()))));
        assert!(!is_key(""));
    }

    #[test]
    fn field_boundaries_matter() {
        let a = GenerateRequest { model: "ab".into(), prompt: "c".into(), ..base() };
        let b = GenerateRequest { model: "a".into(), prompt: "bc".into(), ..base() };
        assert_ne!(of(&a), of(&b));
    }
}

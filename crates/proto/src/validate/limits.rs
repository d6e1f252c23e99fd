//! The size limits of a generate request ([`Limits`]) and the largest encoded request they allow
//! ([`Limits::max_request_bytes`]).

use serde::{Deserialize, Serialize};

/// Room kept for `idempotency_key` in [`Limits::max_request_bytes`]: its rules are the job
/// queue's, which allows far less than this.
pub const IDEMPOTENCY_KEY_ALLOWANCE: usize = 1024;

/// The most reserved entries the mesh adds to one request (trace context, cache scope).
pub(crate) const RESERVED_METADATA_ENTRIES: usize = 2;

/// Longest tool name, tool-call name, message `name` and response-format name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest tool-call id, `tool_call_id` and file id, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest `media_type`, in bytes.
pub const MAX_MEDIA_TYPE_BYTES: usize = 128;
/// Longest `reasoning.effort` and `reasoning.summary`, in bytes (lowercase ASCII letters).
pub const MAX_LEVEL_BYTES: usize = 16;
/// Longest `extensions.dialect`, in bytes (lowercase ASCII letters, digits and `_-`).
pub const MAX_DIALECT_BYTES: usize = 32;

/// Size limits on what a client may ask for: `limits.*` in the gateway's and generation's
/// configuration (and the cache's, which bounds the requests it accepts by them). Every field of a
/// generate request is bounded by one of these, by a fixed bound (the `MAX_*` constants), by a
/// fixed set (`messages[].role`, the enums) or by its type.
///
/// | field | limit | default |
/// | --- | --- | --- |
/// | `model` | `max_model_bytes`, ASCII letters, digits and `._:/@-` | 128 |
/// | `prompt` + every string of `messages` but `role` (contents, text parts, URLs, tool-call arguments, reasoning, ...) | `max_prompt_bytes` | 4 MiB |
/// | `messages` | `max_messages` entries; `role` one of [`super::ROLES`] | 2,048 |
/// | parts of one message (content parts, tool calls and reasoning blocks) | `max_parts_per_message` | 256 |
/// | parts of all messages | `max_parts` | 8,192 |
/// | one image's or document's inline `data` | `max_inline_part_bytes` | 5 MiB |
/// | all inline `data` | `max_inline_bytes` | 8 MiB |
/// | one tool call's `arguments` | `max_tool_arguments_bytes` | 1 MiB |
/// | `tools` | `max_tools` entries | 128 |
/// | one tool's description, or parameters; `response_format` (name, schema, description) | `max_schema_bytes` | 64 KiB |
/// | all of `tools` | `max_tools_bytes` | 1 MiB |
/// | `extensions.json` | `max_extensions_bytes` | 64 KiB |
/// | each `cache_control` and `extra` | `max_extra_bytes` | 16 KiB |
/// | `max_tokens` | `max_tokens` (0: `default_max_tokens`) | 131,072 (256) |
/// | `temperature`, `top_p` | 0..=2, (0, 1] | |
/// | `stop` | `max_stop_sequences` entries, none empty, each at most `max_stop_bytes` | 4, 64 |
/// | `user` | `max_user_bytes` | 256 |
/// | `metadata` | `max_metadata_entries` entries ([`super::RESERVED_METADATA_KEY`] aside), keys at most `max_metadata_key_bytes`, values at most `max_metadata_value_bytes` | 16, 64, 512 |
///
/// The defaults take a real agent's conversation: Claude Code's first request is about 50 KB with
/// 12 tools and `max_tokens` 32,000, and its conversations grow to megabytes. `max_tokens` is
/// bounded here for every model at once; a model's own output limit is the provider's to enforce.
///
/// A server refuses a message larger than [`Limits::max_request_bytes`] before decoding it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Highest `max_tokens` a request may ask for.
    pub max_tokens: u32,
    /// `max_tokens` used when a request leaves it at 0.
    pub default_max_tokens: u32,
    /// Largest prompt (or sum of the messages' strings), in bytes.
    pub max_prompt_bytes: usize,
    /// Most entries in `messages`.
    pub max_messages: usize,
    /// Most parts (content parts, tool calls, reasoning blocks) in one message.
    pub max_parts_per_message: usize,
    /// Most parts in all messages together.
    pub max_parts: usize,
    /// Largest inline image or document, in bytes.
    pub max_inline_part_bytes: usize,
    /// Largest sum of inline images and documents, in bytes.
    pub max_inline_bytes: usize,
    /// Largest `arguments` of one tool call, in bytes.
    pub max_tool_arguments_bytes: usize,
    /// Most entries in `tools`.
    pub max_tools: usize,
    /// Largest tool description, tool parameter schema or response format, in bytes.
    pub max_schema_bytes: usize,
    /// Largest sum of every tool's name, description, parameters, cache_control and extra.
    pub max_tools_bytes: usize,
    /// Largest `extensions.json`, in bytes.
    pub max_extensions_bytes: usize,
    /// Largest `cache_control` or `extra` (of a part or a tool), in bytes.
    pub max_extra_bytes: usize,
    /// Longest `model` name, in bytes.
    pub max_model_bytes: usize,
    /// Longest `user`, in bytes.
    pub max_user_bytes: usize,
    /// Most entries in `stop`.
    pub max_stop_sequences: usize,
    /// Longest `stop` entry, in bytes.
    pub max_stop_bytes: usize,
    /// Most `metadata` entries (not counting [`super::RESERVED_METADATA_KEY`]).
    pub max_metadata_entries: usize,
    /// Longest `metadata` key, in bytes.
    pub max_metadata_key_bytes: usize,
    /// Longest `metadata` value, in bytes.
    pub max_metadata_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tokens: 128 * 1024,
            default_max_tokens: 256,
            max_prompt_bytes: 4 << 20,
            max_messages: 2048,
            max_parts_per_message: 256,
            max_parts: 8192,
            max_inline_part_bytes: 5 << 20,
            max_inline_bytes: 8 << 20,
            max_tool_arguments_bytes: 1 << 20,
            max_tools: 128,
            max_schema_bytes: 64 << 10,
            max_tools_bytes: 1 << 20,
            max_extensions_bytes: 64 << 10,
            max_extra_bytes: 16 << 10,
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

/// Protobuf framing of a length-delimited field: a tag of at most two bytes (field numbers below
/// 2048) and a length varint of at most five bytes (lengths below 4 GiB).
const FIELD_FRAMING: usize = 2 + 5;

/// Every scalar field of a generate request at its longest encoding: `max_tokens` (varint),
/// `temperature` and `top_p` (fixed32), `seed` (varint of an int64), `cache` (varint of an enum; a
/// negative one takes ten bytes) and `parallel_tool_calls` (a bool), each after its tag.
const SCALAR_FIELDS_BYTES: usize = (2 + 5) + (2 + 4) + (2 + 4) + (2 + 10) + (2 + 10) + (2 + 1);

/// Longest role name in [`super::ROLES`].
const MAX_ROLE_BYTES: usize = 9;

/// The framing of one message besides its role and its parts: the message's own, and that of
/// each of its strings (`content`, `name`, `tool_call_id`; their bytes count in the prompt) and
/// `is_error`.
const MESSAGE_FRAMING: usize = FIELD_FRAMING + (FIELD_FRAMING + MAX_ROLE_BYTES) + 3 * FIELD_FRAMING + (2 + 1);

/// The framing of one part (content part, tool call or reasoning block) at most: the part's own,
/// its oneof member's, every string and bytes field in it (their bytes count in the prompt or
/// the inline bytes) and its enum.
const PART_FRAMING: usize = 2 * FIELD_FRAMING + 6 * FIELD_FRAMING + (2 + 10);

/// The framing of one tool: its own, its five strings' and `strict`.
const TOOL_FRAMING: usize = FIELD_FRAMING + 5 * FIELD_FRAMING + (2 + 1);

/// Added to the exact sum in [`Limits::max_request_bytes`]: room for encodings other clients
/// choose (unknown fields are skipped by the decoder, but they travel), and for fields added later.
const REQUEST_MARGIN_BYTES: usize = 4 * 1024;

impl Limits {
    /// The largest encoded generate request (gateway or generation, unary or stream, or a
    /// `SubmitJob`) that can pass [`super::generate_request`], plus a margin: what a server's
    /// `max_decoding_message_size` should be. A larger message cannot be valid, so it is refused
    /// before it is read into memory. It grows with every limit here (15,340,684 bytes with the
    /// defaults, of which 8 MiB are inline images).
    pub fn max_request_bytes(&self) -> usize {
        self.max_bytes(self.max_inline_bytes)
    }

    /// The largest JSON body an HTTP dialect can need for a valid request: JSON may write a byte
    /// of a string as six (`\u0000`), while inline images and documents travel as base64 (four
    /// bytes for three) in both dialects.
    pub fn max_json_body_bytes(&self) -> usize {
        const JSON_PER_BYTE: usize = 6;
        self.max_bytes(0)
            .saturating_mul(JSON_PER_BYTE)
            .saturating_add(self.max_inline_bytes.div_ceil(3).saturating_mul(4))
            // Each inline part's `data:image/png;base64,` prefix or media type field.
            .saturating_add(self.max_parts.saturating_mul(64))
    }

    fn max_bytes(&self, inline_bytes: usize) -> usize {
        let field = |bytes: usize| bytes.saturating_add(FIELD_FRAMING);
        let per_metadata_entry =
            field(field(self.max_metadata_key_bytes).saturating_add(field(self.max_metadata_value_bytes)));
        let tool_choice = field(2 + 1 + field(MAX_NAME_BYTES));
        let response_format = field(2 + 1 + 2 + 1 + 3 * FIELD_FRAMING + self.max_schema_bytes);
        let reasoning = field(field(MAX_LEVEL_BYTES) + (2 + 5) + field(MAX_LEVEL_BYTES));
        let extensions = field(field(MAX_DIALECT_BYTES) + field(self.max_extensions_bytes));
        let exact = [
            field(self.max_model_bytes),
            field(self.max_prompt_bytes),
            MESSAGE_FRAMING.saturating_mul(self.max_messages),
            PART_FRAMING.saturating_mul(self.max_parts),
            inline_bytes,
            TOOL_FRAMING.saturating_mul(self.max_tools),
            self.max_tools_bytes,
            tool_choice,
            response_format,
            reasoning,
            extensions,
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

//! The cache key: SHA-256 over a canonical encoding of every request field that changes the
//! output. Each field of `llmesh.generation.v1.GenerateRequest` must be listed either in
//! [`KEY_FIELDS`] or in [`EXCLUDED_FIELDS`]; a test fails when a new field is in neither.

use crate::generation::v1::GenerateRequest;
use sha2::{Digest, Sha256};

/// Fields that change the answer, in the order they are encoded.
pub const KEY_FIELDS: &[&str] = &["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed"];

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
    use crate::common::v1::ChatMessage;
    use prost::Message as _;

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
                messages: vec![ChatMessage { role: "user".into(), content: "hello".into() }],
                ..base()
            },
            GenerateRequest { max_tokens: 9, ..base() },
            GenerateRequest { temperature: Some(0.0), ..base() },
            GenerateRequest { top_p: Some(0.5), ..base() },
            GenerateRequest { stop: vec!["x".into()], ..base() },
            GenerateRequest { seed: Some(0), ..base() },
        ];
        assert_eq!(variants.len(), KEY_FIELDS.len());
        let mut keys: Vec<String> = variants.iter().map(of).collect();
        keys.push(of(&base()));
        let count = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), count, "two different requests share a key");
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

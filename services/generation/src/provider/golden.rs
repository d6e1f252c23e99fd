//! The golden-file drivers every HTTP provider's translation is pinned with, byte for byte
//! (`GOLDEN_UPDATE=1` rewrites the `.out.json` files, which a person then reads against the
//! provider's wire format before committing them). Under a provider's `golden/`:
//! - `request/`: the contract's `GenerateRequest` → the upstream body. The inputs are the
//!   requests every provider is pinned with (`provider/golden-requests/<case>.in.json`, canonical
//!   proto3 JSON), the provider's own `request/<case>.in.json`, and every request the gateway's own
//!   golden files make of a client's body (`services/gateway/tests/golden/<dialect>/request/`),
//!   so that every pair of client dialect and upstream is pinned: `<dialect>.<case>.out.json`.
//!   A request the provider refuses is pinned as `{"refused": MESSAGE}`.
//! - `response/`: an upstream's unary answer (`<case>.in.json`) → the provider's events.
//! - `stream/`: an upstream stream (`<case>.in.sse`, as the server sent it) → the events.

use std::path::{Path, PathBuf};

use futures::StreamExt as _;
use llmesh_proto::generation::v1::GenerateRequest;
use llmesh_testkit::golden::{check, inputs, read_json, report};
use prost_reflect::{DescriptorPool, DynamicMessage, prost::Message as _};
use serde_json::{Value, json};

use super::{
    Event, UpstreamError,
    http::{Decoder, ReadAnswer, SseStream, StreamLimits},
};

/// The prompt's estimated tokens, for answers without usage.
pub const PROMPT_TOKENS: u32 = 11;

/// A provider's golden directory.
pub fn root(provider: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/provider").join(provider).join("golden")
}

fn pool() -> DescriptorPool {
    DescriptorPool::decode(llmesh_proto::FILE_DESCRIPTOR_SET).unwrap()
}

fn proto_json(message: &impl prost_reflect::prost::Message, name: &str) -> Value {
    let descriptor = pool().get_message_by_name(name).unwrap();
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice()).unwrap();
    serde_json::to_value(&dynamic).unwrap()
}

fn from_proto_json<M: prost_reflect::prost::Message + Default>(value: &Value, name: &str) -> M {
    let descriptor = pool().get_message_by_name(name).unwrap();
    let dynamic = DynamicMessage::deserialize(descriptor, value).unwrap_or_else(|e| panic!("{name}: {e}: {value}"));
    M::decode(dynamic.encode_to_vec().as_slice()).unwrap()
}

fn event_json(event: Result<Event, UpstreamError>) -> Value {
    match event {
        Ok(Event::Delta(text)) => json!({ "delta": text }),
        Ok(Event::ToolCall(delta)) => json!({ "tool_call": proto_json(&delta, "llmesh.common.v1.ToolCallDelta") }),
        Ok(Event::Reasoning(delta)) => json!({ "reasoning": proto_json(&delta, "llmesh.common.v1.ReasoningDelta") }),
        Ok(Event::Extensions(extensions)) => {
            json!({ "extensions": proto_json(&extensions, "llmesh.common.v1.Extensions") })
        }
        Ok(Event::Finish { reason, usage }) => json!({ "finish": {
            "reason": reason.as_str_name(),
            "usage": proto_json(&usage, "llmesh.common.v1.Usage"),
        }}),
        Err(error) => json!({ "error": { "code": format!("{:?}", error.code()), "detail": error.detail() } }),
    }
}

/// Checks that the JSON texts the contract carries (schemas, arguments) are in `body` as they came,
/// byte for byte (key order and all), which the pretty-printed golden file cannot show.
pub fn assert_carried_verbatim(request: &GenerateRequest, body: &str) {
    let schemas = request.tools.iter().map(|tool| tool.parameters.as_str());
    let format = request.response_format.iter().map(|format| format.schema.as_str());
    for schema in schemas.chain(format).filter(|schema| !schema.is_empty()) {
        assert!(body.contains(schema), "{schema} is in {body}");
    }
}

/// Pins the body `body` makes of every request (see the module's comment); `body` gets the request
/// and whether it streams, and answers the body's JSON text or why it refuses the request.
pub fn requests(provider: &str, body: impl Fn(&GenerateRequest, bool) -> Result<String, String>) {
    let dir = root(provider).join("request");
    let pinned = |request: &GenerateRequest, stream: bool| match body(request, stream) {
        Ok(text) => {
            assert_carried_verbatim(request, &text);
            serde_json::from_str::<Value>(&text).unwrap()
        }
        Err(refusal) => json!({ "refused": refusal }),
    };
    let mut failures = Vec::new();
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/provider/golden-requests");
    // A provider may have cases of its own beside the shared ones.
    let own =
        std::fs::read_dir(&dir).unwrap().any(|entry| entry.unwrap().path().to_string_lossy().ends_with(".in.json"));
    let own = if own { inputs(&dir, ".in.json") } else { Vec::new() };
    for (name, path) in inputs(&shared, ".in.json").into_iter().chain(own) {
        let request = from_proto_json(&read_json(&path), "llmesh.generation.v1.GenerateRequest");
        failures.extend(check(&dir.join(format!("{name}.out.json")), &pinned(&request, false)));
    }
    let gateway = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/tests/golden");
    for dialect in ["openai", "anthropic", "responses"] {
        for (name, path) in inputs(&gateway.join(dialect).join("request"), ".out.json") {
            let translated = read_json(&path);
            let Some(request) = translated.get("request") else { continue };
            let request = from_proto_json(request, "llmesh.generation.v1.GenerateRequest");
            let stream = translated["stream"].as_bool().unwrap_or(false);
            failures.extend(check(&dir.join(format!("{dialect}.{name}.out.json")), &pinned(&request, stream)));
        }
    }
    report(failures);
}

/// Pins the events `read` makes of each unary answer.
pub fn responses(provider: &str, read: ReadAnswer) {
    let dir = root(provider).join("response");
    let mut failures = Vec::new();
    for (name, path) in inputs(&dir, ".in.json") {
        let body = std::fs::read(&path).unwrap();
        let events: Vec<Value> = match read(&body, PROMPT_TOKENS) {
            Ok(events) => events.into_iter().map(|e| event_json(Ok(e))).collect(),
            Err(error) => vec![event_json(Err(error))],
        };
        failures.extend(check(&dir.join(format!("{name}.out.json")), &Value::Array(events)));
    }
    report(failures);
}

/// Pins the events a fresh `decoder` makes of each stream, fed in pieces of 7 bytes: events and
/// lines split across reads, as the network splits them.
pub async fn streams<D: Decoder>(provider: &str, decoder: impl Fn() -> D) {
    let dir = root(provider).join("stream");
    let mut failures = Vec::new();
    for (name, path) in inputs(&dir, ".in.sse") {
        let text = std::fs::read(&path).unwrap();
        let pieces: Vec<Result<Vec<u8>, reqwest::Error>> = text.chunks(7).map(|piece| Ok(piece.to_vec())).collect();
        let limits = StreamLimits {
            first_token: std::time::Duration::from_secs(5),
            idle: std::time::Duration::from_secs(5),
            deadline: tokio::time::Instant::now() + std::time::Duration::from_secs(10),
            bytes: 1 << 20,
        };
        let stream = SseStream::new(futures::stream::iter(pieces), decoder(), limits).into_stream();
        let events: Vec<Value> = stream.map(event_json).collect().await;
        failures.extend(check(&dir.join(format!("{name}.out.json")), &Value::Array(events)));
    }
    report(failures);
}

//! Golden files of the OpenAI-compatible provider's translation, pinned byte for byte
//! (`GOLDEN_UPDATE=1` rewrites the `.out.json` files, which a person then reads against OpenAI's
//! wire format before committing them). Under `golden/`:
//! - `request/`: the contract's `GenerateRequest` → the upstream body. The inputs are this
//!   directory's `<case>.in.json` (canonical proto3 JSON) and every request the gateway's own
//!   golden files make of a client's body (`services/gateway/tests/golden/<dialect>/request/`),
//!   so that every dialect pair — OpenAI or Anthropic client, OpenAI upstream — is pinned:
//!   `<dialect>.<case>.out.json`.
//! - `response/`: an upstream completion (`<case>.in.json`) → the provider's events.
//! - `stream/`: an upstream stream (`<case>.in.sse`, as the server sent it) → the events.

use std::path::{Path, PathBuf};

use llmesh_testkit::golden::{check, inputs, read_json, report};

use futures::StreamExt as _;
use llmesh_proto::generation::v1::GenerateRequest;
use prost_reflect::{DescriptorPool, DynamicMessage, prost::Message as _};
use serde_json::{Value, json};

use super::{SseStream, StreamLimits, completion_events, wire};
use crate::provider::{Event, UpstreamError};

/// The upstream model name in every body.
const MODEL: &str = "gpt-4o";
/// The prompt's estimated tokens, for answers without usage.
const PROMPT_TOKENS: u32 = 11;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/provider/openai/golden")
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

/// The upstream body for `request`, streamed or not as it says in `stream`.
fn body_json(request: &GenerateRequest, stream: bool) -> Value {
    let max_tokens = if request.max_tokens == 0 { 1024 } else { request.max_tokens };
    let text = wire::body(request, MODEL, max_tokens, stream).unwrap();
    // JSON the contract carries as text goes as it came, byte for byte (key order and all), which
    // the pretty-printed golden file cannot show.
    let schemas = request.tools.iter().map(|tool| tool.parameters.as_str());
    let format = request.response_format.iter().map(|format| format.schema.as_str());
    for schema in schemas.chain(format).filter(|schema| !schema.is_empty()) {
        assert!(text.contains(schema), "{schema} is in {text}");
    }
    for call in request.messages.iter().flat_map(|message| &message.tool_calls) {
        let arguments = serde_json::to_string(&call.arguments).unwrap();
        assert!(text.contains(&arguments), "{arguments} is in {text}");
    }
    serde_json::from_str(&text).unwrap()
}

#[test]
fn requests() {
    let dir = root().join("request");
    let mut failures = Vec::new();
    for (name, path) in inputs(&dir, ".in.json") {
        let input = read_json(&path);
        let request = from_proto_json(&input, "llmesh.generation.v1.GenerateRequest");
        failures.extend(check(&dir.join(format!("{name}.out.json")), &body_json(&request, false)));
    }
    // Every request the gateway's dialects make, as this provider sends it.
    let gateway = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/tests/golden");
    for dialect in ["openai", "anthropic"] {
        for (name, path) in inputs(&gateway.join(dialect).join("request"), ".out.json") {
            let translated = read_json(&path);
            let Some(request) = translated.get("request") else { continue };
            let request = from_proto_json(request, "llmesh.generation.v1.GenerateRequest");
            let stream = translated["stream"].as_bool().unwrap_or(false);
            failures.extend(check(&dir.join(format!("{dialect}.{name}.out.json")), &body_json(&request, stream)));
        }
    }
    report(failures);
}

#[test]
fn responses() {
    let dir = root().join("response");
    let mut failures = Vec::new();
    for (name, path) in inputs(&dir, ".in.json") {
        let text = std::fs::read_to_string(&path).unwrap();
        let events: Vec<Value> = match serde_json::from_str::<wire::Completion>(&text) {
            Ok(completion) => match completion_events(completion, PROMPT_TOKENS) {
                Ok(events) => events.into_iter().map(|e| event_json(Ok(e))).collect(),
                Err(error) => vec![event_json(Err(error))],
            },
            Err(error) => vec![json!({ "malformed": error.to_string() })],
        };
        failures.extend(check(&dir.join(format!("{name}.out.json")), &Value::Array(events)));
    }
    report(failures);
}

#[tokio::test]
async fn streams() {
    let dir = root().join("stream");
    let mut failures = Vec::new();
    for (name, path) in inputs(&dir, ".in.sse") {
        let text = std::fs::read(&path).unwrap();
        // The body in pieces of 7 bytes: events and lines split across reads, as the network splits them.
        let pieces: Vec<Result<Vec<u8>, reqwest::Error>> = text.chunks(7).map(|piece| Ok(piece.to_vec())).collect();
        let limits = StreamLimits {
            first_token: std::time::Duration::from_secs(5),
            idle: std::time::Duration::from_secs(5),
            deadline: tokio::time::Instant::now() + std::time::Duration::from_secs(10),
            bytes: 1 << 20,
        };
        let stream = SseStream::new(futures::stream::iter(pieces), PROMPT_TOKENS, limits).into_stream();
        let events: Vec<Value> = stream.map(event_json).collect().await;
        failures.extend(check(&dir.join(format!("{name}.out.json")), &Value::Array(events)));
    }
    report(failures);
}

//! Golden files: every translation of every dialect, pinned byte for byte.
//!
//! `services/gateway/tests/golden/<dialect>/<direction>/<case>.in.json` is the input and
//! `<case>.out.json` what the translation makes of it, both as pretty-printed JSON (the contract's
//! messages as canonical proto3 JSON, by the descriptor set). The directions:
//! - `request`: the client's body → `{stream, options, unmapped_header, request}` (the contract's
//!   `GenerateRequest`), or `{error: {status, param, body}}` for a body the dialect refuses;
//! - `response`: `{request, response}` (the client's body, and the contract's `GenerateResponse`)
//!   → the dialect's answer body;
//! - `stream`: `{request, chunks, error?}` (the client's body, the contract's
//!   `GenerateStreamResponse` chunks, and a gRPC failure after them) → the server-sent events, each
//!   `{event?, data}`.
//!
//! `GOLDEN_UPDATE=1 cargo nextest run -p llmesh-gateway golden` writes the `.out.json` files from
//! the code; each rewritten file is then read by a person against the provider's wire format
//! before it is committed.

use std::path::{Path, PathBuf};

use llmesh_proto::{gateway::v1::GenerateStreamResponse, generation::v1::GenerateResponse};
use llmesh_testkit::golden::{check, inputs, read_json, report};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::{Value, json};

use super::{Anthropic, Context, Dialect, OpenAi, Parsed, Responses, Seed};
use crate::http::{Problem, sse::Events};

/// `created` in every rendered answer.
const CREATED: u64 = 1_700_000_000;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn proto_json(message: &impl prost::Message, name: &str) -> Value {
    let pool = DescriptorPool::decode(llmesh_proto::FILE_DESCRIPTOR_SET).unwrap();
    let descriptor = pool.get_message_by_name(name).unwrap();
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice()).unwrap();
    serde_json::to_value(&dynamic).unwrap()
}

fn from_proto_json<M: prost::Message + Default>(value: &Value, name: &str) -> M {
    let pool = DescriptorPool::decode(llmesh_proto::FILE_DESCRIPTOR_SET).unwrap();
    let descriptor = pool.get_message_by_name(name).unwrap();
    let dynamic = DynamicMessage::deserialize(descriptor, value).unwrap_or_else(|e| panic!("{name}: {e}: {value}"));
    M::decode(dynamic.encode_to_vec().as_slice()).unwrap()
}

/// What every case parses with.
const CONTEXT: Context<'static> = Context { cache: 0, default_model: Some("sim"), max_objects: usize::MAX };

fn parse<D: Dialect>(body: &Value) -> Result<Parsed<D::Options>, Problem> {
    assert!(body.is_object(), "a body is an object: {body}");
    D::parse(&serde_json::to_vec(body).unwrap(), &CONTEXT)
}

/// The cases of a direction: each input with its output's path.
fn cases(dialect: &str, direction: &str) -> Vec<(String, Value, PathBuf)> {
    let dir = root().join(dialect).join(direction);
    inputs(&dir, ".in.json")
        .into_iter()
        .map(|(name, path)| {
            let output = dir.join(format!("{name}.out.json"));
            (name, read_json(&path), output)
        })
        .collect()
}

fn problem_json<D: Dialect>(problem: &Problem) -> Value {
    json!({ "error": {
        "status": problem.class.http_status().as_u16(),
        "param": problem.param,
        "body": D::error_body(problem),
    }})
}

fn requests<D: Dialect>(dialect: &str)
where
    D::Options: std::fmt::Debug,
{
    let mut failures = Vec::new();
    for (name, _, out) in cases(dialect, "request") {
        // From the file's text, as a body comes: the key order of JSON carried as text is the client's.
        let text = std::fs::read(root().join(dialect).join("request").join(format!("{name}.in.json"))).unwrap();
        let actual = match D::parse(&text, &CONTEXT) {
            Ok(Parsed { request, stream, options, unmapped }) => json!({
                "stream": stream,
                "options": format!("{options:?}"),
                // As a provider of another dialect answers (the sim): see `Unmapped::header`.
                "unmapped_header": unmapped.header("sim").map(|h| h.to_str().unwrap().to_string()),
                "request": proto_json(&request, "llmesh.generation.v1.GenerateRequest"),
            }),
            Err(problem) => problem_json::<D>(&problem),
        };
        failures.extend(check(&out, &actual));
    }
    report(failures);
}

fn responses<D: Dialect>(dialect: &str) {
    let mut failures = Vec::new();
    for (name, input, out) in cases(dialect, "response") {
        let Ok(parsed) = parse::<D>(&input["request"]) else { panic!("{name}: the request does not parse") };
        let response: GenerateResponse = from_proto_json(&input["response"], "llmesh.generation.v1.GenerateResponse");
        // As the client reads it: the bytes the route writes, parsed.
        let body = serde_json::to_vec(&D::render(&response, &parsed.options, CREATED)).unwrap();
        failures.extend(check(&out, &serde_json::from_slice(&body).unwrap()));
    }
    report(failures);
}

/// The events `sse::response` writes for `chunks` (and a failure after them).
fn events<D: Dialect>(options: D::Options, chunks: &[GenerateStreamResponse], error: Option<&Value>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut events = D::events(&chunks[0], options, CREATED);
    events.open(&chunks[0], &mut out);
    for chunk in chunks {
        events.chunk(chunk, &mut out);
        if chunk.finish_reason != 0 {
            events.close(&mut out);
            return out;
        }
    }
    if let Some(error) = error {
        let code = tonic::Code::from_i32(error["code"].as_i64().unwrap() as i32);
        let status = tonic::Status::new(code, error["message"].as_str().unwrap());
        events.fail(&Problem::from_status(&status), &mut out);
    }
    out
}

/// Server-sent events' text as `{event?, data}` values (`data` parsed when it is JSON).
fn sse_json(text: &[u8]) -> Value {
    let text = std::str::from_utf8(text).unwrap();
    assert!(text.ends_with("\n\n"), "every event ends with a blank line: {text:?}");
    let events = text
        .strip_suffix("\n\n")
        .unwrap()
        .split("\n\n")
        .map(|event| {
            let mut out = serde_json::Map::new();
            for line in event.lines() {
                let (field, value) = line.split_once(": ").unwrap_or_else(|| panic!("a field line: {line:?}"));
                let value = match field {
                    "event" => Value::String(value.into()),
                    "data" => serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.into())),
                    _ => panic!("an unknown field: {line:?}"),
                };
                assert!(out.insert(field.into(), value).is_none(), "one {field} per event: {event:?}");
            }
            Value::Object(out)
        })
        .collect();
    Value::Array(events)
}

fn streams<D: Dialect>(dialect: &str) {
    let mut failures = Vec::new();
    for (name, input, out) in cases(dialect, "stream") {
        let Ok(parsed) = parse::<D>(&input["request"]) else { panic!("{name}: the request does not parse") };
        assert!(parsed.stream, "{name}: the request asks for a stream");
        let chunks: Vec<GenerateStreamResponse> = input["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|chunk| from_proto_json(chunk, "llmesh.gateway.v1.GenerateStreamResponse"))
            .collect();
        let text = events::<D>(parsed.options, &chunks, input.get("error"));
        failures.extend(check(&out, &sse_json(&text)));
    }
    report(failures);
}

#[test]
fn openai_requests() {
    requests::<OpenAi>("openai");
}

#[test]
fn openai_responses() {
    responses::<OpenAi>("openai");
}

#[test]
fn openai_streams() {
    streams::<OpenAi>("openai");
}

#[test]
fn anthropic_requests() {
    requests::<Anthropic>("anthropic");
}

#[test]
fn anthropic_responses() {
    responses::<Anthropic>("anthropic");
}

#[test]
fn anthropic_streams() {
    streams::<Anthropic>("anthropic");
}

#[test]
fn responses_requests() {
    requests::<Responses>("responses");
}

#[test]
fn responses_responses() {
    responses::<Responses>("responses");
}

#[test]
fn responses_streams() {
    streams::<Responses>("responses");
}

#[test]
fn seed_requests() {
    requests::<Seed>("seed");
}

#[test]
fn seed_responses() {
    responses::<Seed>("seed");
}

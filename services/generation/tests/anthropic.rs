//! The Anthropic provider against a real HTTP upstream (`upstream/`) speaking Anthropic's wire
//! format, and misbehaving on purpose: what goes out (the path, `x-api-key`, `anthropic-version`,
//! configured headers, the body), streamed tool input joined, a 429 with Retry-After, the 529 of
//! an overloaded API, an `error` event mid-stream, and a request with no Anthropic form refused
//! before anything is sent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod upstream;

use std::{collections::BTreeMap, sync::Arc};

use llmesh_generation::config::ModelConfig;
use llmesh_proto::{
    common::v1::{FinishReason, ResponseFormat, ResponseFormatType},
    generation::v1::{
        GenerateRequest, GenerateStreamRequest, GenerateStreamResponse, generation_client::GenerationClient,
    },
};
use tonic::{Code, transport::Channel};
use upstream::{Upstream, bash_request, from_upstream, json_response, keyed_model, serve_model, sse, sse_head};

const MESSAGE: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-test","content":[{"type":"text","text":"Let me run it."},{"type":"tool_use","id":"toolu_1","name":"Bash","input":{"command":"echo hi"}}],"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":20,"output_tokens":9,"cache_read_input_tokens":100}}"#;

/// A generation server whose model `up` is the Anthropic API at `upstream`, with an
/// `anthropic-beta` header.
async fn generation(upstream: &Upstream) -> (GenerationClient<Channel>, tempfile::TempDir) {
    let (mut config, key) = keyed_model(upstream.origin(), "claude-test", "sk-ant-test-123");
    config.headers = BTreeMap::from([("anthropic-beta".into(), "fine-grained-tool-streaming-2025-05-14".into())]);
    (serve_model(ModelConfig::Anthropic(config)).await, key)
}

async fn stream(
    client: &mut GenerationClient<Channel>,
    request: GenerateRequest,
) -> Result<Vec<GenerateStreamResponse>, tonic::Status> {
    let request = GenerateStreamRequest::from(request);
    let mut stream = client.generate_stream(request).await?.into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await? {
        chunks.push(chunk);
    }
    Ok(chunks)
}

#[tokio::test]
async fn a_unary_message_with_a_tool_call_and_what_went_out() {
    let upstream = Upstream::start(Arc::new(|_| vec![json_response("200 OK", "", MESSAGE)])).await;
    let (mut client, _key) = generation(&upstream).await;

    let response = client.generate(bash_request()).await.unwrap().into_inner();
    assert_eq!(response.provider, "anthropic");
    assert_eq!(response.text, "Let me run it.");
    assert_eq!(response.finish_reason, i32::from(FinishReason::ToolCalls));
    let call = &response.tool_calls[0];
    assert_eq!(
        (call.id.as_str(), call.name.as_str(), call.arguments.as_str()),
        ("toolu_1", "Bash", r#"{"command":"echo hi"}"#)
    );
    let usage = response.usage.unwrap();
    // The contract counts the cache's reads in the prompt.
    assert_eq!((usage.prompt_tokens, usage.cached_prompt_tokens, usage.completion_tokens), (120, 100, 9));

    let (head, body) = upstream.request(0);
    assert!(head.starts_with("post /v1/messages "), "{head}");
    assert!(head.contains("x-api-key: sk-ant-test-123"), "{head}");
    assert!(!head.contains("authorization:"), "{head}");
    assert!(head.contains("anthropic-version: 2023-06-01"), "{head}");
    assert!(head.contains("anthropic-beta: fine-grained-tool-streaming-2025-05-14"), "{head}");
    assert_eq!(body["model"], "claude-test");
    assert_eq!(body["max_tokens"], 64);
    assert_eq!(body["system"][0]["text"], "Be brief.");
    assert_eq!(body["messages"][0]["role"], "user");
    assert_eq!(body["tools"][0]["name"], "Bash");
    // The schema goes as the client wrote it.
    assert!(
        upstream.raw_body(0).contains(r#""input_schema":{"type":"object","properties":{"command":{"type":"string"}}}"#)
    );
}

#[tokio::test]
async fn streamed_tool_input_is_passed_on_by_index_and_joins() {
    let events = [
        r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-test","usage":{"input_tokens":20,"output_tokens":1}}}"#,
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_1","name":"Bash","input":{}}}"#,
        r#"{"type":"ping"}"#,
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"comm"}}"#,
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"and\": \"echo hi\"}"}}"#,
        r#"{"type":"content_block_stop","index":0}"#,
        r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":12}}"#,
        r#"{"type":"message_stop"}"#,
    ];
    let upstream =
        Upstream::start(Arc::new(move |_| std::iter::once(sse_head()).chain(events.iter().map(|e| sse(e))).collect()))
            .await;
    let (mut client, _key) = generation(&upstream).await;
    let chunks = stream(&mut client, bash_request()).await.unwrap();
    let fragments: Vec<_> = chunks.iter().flat_map(|c| &c.tool_calls).collect();
    assert_eq!((fragments[0].id.as_str(), fragments[0].name.as_str()), ("toolu_1", "Bash"));
    let arguments: String = fragments.iter().map(|f| f.arguments.as_str()).collect();
    assert_eq!(arguments, r#"{"command": "echo hi"}"#);
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, i32::from(FinishReason::ToolCalls));
    let usage = last.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.estimated), (20, 12, false));
    assert_eq!(upstream.request(0).1["stream"], true);
}

#[tokio::test]
async fn a_429_pushes_back_and_an_overloaded_api_is_unavailable() {
    let upstream = Upstream::start(Arc::new(|body| {
        let error = |kind: &str| {
            format!(r#"{{"type":"error","error":{{"type":"{kind}","message":"key sk-ant-test-123 busy"}}}}"#)
        };
        if body.contains("limited") {
            vec![json_response("429 Too Many Requests", "retry-after: 3\r\n", &error("rate_limit_error"))]
        } else {
            vec![json_response("529 Overloaded", "", &error("overloaded_error"))]
        }
    }))
    .await;
    let (mut client, _key) = generation(&upstream).await;
    let ask =
        |text: &str| GenerateRequest { prompt: text.into(), messages: Vec::new(), tools: Vec::new(), ..bash_request() };

    let status = client.generate(ask("limited")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "3000");
    assert!(from_upstream(&status));
    let status = client.generate(ask("overloaded")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "upstream failed (HTTP 529)");
    assert!(!format!("{status:?}").contains("sk-ant"), "{status:?}");
}

#[tokio::test]
async fn an_error_event_mid_stream_fails_the_stream_after_its_first_chunks() {
    let events = [
        r#"{"type":"message_start","message":{"id":"msg_1","usage":{"input_tokens":5,"output_tokens":1}}}"#,
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}"#,
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    ];
    let upstream =
        Upstream::start(Arc::new(move |_| std::iter::once(sse_head()).chain(events.iter().map(|e| sse(e))).collect()))
            .await;
    let (mut client, _key) = generation(&upstream).await;
    let request = GenerateStreamRequest::from(bash_request());
    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.delta, "Hel");
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(from_upstream(&status), "{status:?}");
}

#[tokio::test]
async fn a_request_with_no_anthropic_form_is_refused_before_anything_is_sent() {
    let upstream = Upstream::start(Arc::new(|_| vec![json_response("200 OK", "", MESSAGE)])).await;
    let (mut client, _key) = generation(&upstream).await;
    let json_mode = ResponseFormat { r#type: ResponseFormatType::JsonObject.into(), ..Default::default() };
    let status =
        client.generate(GenerateRequest { response_format: Some(json_mode), ..bash_request() }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("response_format: "), "{status:?}");
    assert!(!from_upstream(&status), "the client's request, not the upstream, failed");
    assert_eq!(upstream.received(), 0);
}

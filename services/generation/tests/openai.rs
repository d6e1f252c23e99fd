//! The OpenAI-compatible provider against a real HTTP upstream written here to misbehave on
//! purpose: 429 with Retry-After, 500, a stall after the first chunk, a reset mid-stream,
//! malformed SSE, answers past the size limit, a 401 whose body holds secrets, and a client that
//! goes away mid-stream. Every failure the upstream caused is marked `llmesh-failure-origin:
//! upstream` and says nothing the upstream said.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod upstream;

use std::{sync::Arc, time::Duration};

use llmesh_generation::{config::ModelConfig, provider::http::HttpModelConfig};
use llmesh_proto::{
    common::v1::FinishReason,
    generation::v1::{GenerateRequest, GenerateStreamRequest, generation_client::GenerationClient},
};
use tonic::{Code, transport::Channel};
use upstream::{Step, Upstream, from_upstream, json_response, serve_model, sse, sse_head};

fn delta(text: &str) -> String {
    format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{text}"}},"finish_reason":null}}]}}"#)
}

const FINISH: &str = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
const USAGE: &str = r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#;

/// A generation server in this process whose model "up" is the upstream at `base_url`.
async fn generation(base_url: String, key_file: Option<std::path::PathBuf>) -> GenerationClient<Channel> {
    generation_with(base_url, key_file, None).await
}

/// The same, with a size limit on the upstream's answers.
async fn generation_with(
    base_url: String,
    key_file: Option<std::path::PathBuf>,
    max_response_bytes: Option<u64>,
) -> GenerationClient<Channel> {
    let openai = HttpModelConfig {
        max_response_bytes,
        base_url: Some(base_url),
        upstream_model: "gpt-test".into(),
        api_key_env: Some("LLMESH_TEST_UNSET_KEY".into()),
        api_key_file: key_file,
        first_token_timeout_ms: 1_000,
        idle_timeout_ms: 300,
        total_timeout_ms: 5_000,
        ..HttpModelConfig::default()
    };
    serve_model(ModelConfig::Openai(openai)).await
}

fn unary() -> GenerateRequest {
    GenerateRequest { model: "up".into(), prompt: "hello upstream".into(), max_tokens: 5, ..Default::default() }
}

fn streaming() -> GenerateStreamRequest {
    GenerateStreamRequest { model: "up".into(), prompt: "hello upstream".into(), max_tokens: 5, ..Default::default() }
}

async fn collect_stream(
    client: &mut GenerationClient<Channel>,
) -> Result<Vec<llmesh_proto::generation::v1::GenerateStreamResponse>, tonic::Status> {
    let mut stream = client.generate_stream(streaming()).await?.into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await? {
        chunks.push(chunk);
    }
    Ok(chunks)
}

#[tokio::test]
async fn unary_completion_with_usage_and_key() {
    let upstream = Upstream::start(Arc::new(|_| {
        vec![json_response(
            "200 OK",
            "",
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hi there"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        )]
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "sk-test-123\n").unwrap();
    let mut client = generation(upstream.base_url(), Some(key)).await;

    let response = client.generate(unary()).await.unwrap().into_inner();
    assert_eq!(response.text, "Hi there");
    assert_eq!(response.provider, "openai");
    assert_eq!(response.finish_reason, i32::from(FinishReason::Length));
    let usage = response.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.estimated), (3, 2, 5, false));

    let (head, body) = upstream.request(0);
    assert!(head.starts_with("post /v1/chat/completions "), "{head}");
    assert!(head.contains("authorization: bearer sk-test-123"), "{head}");
    assert_eq!(body["model"], "gpt-test");
    assert_eq!(body["max_tokens"], 5);
    assert_eq!(body["stream"], false);
    assert_eq!(body["messages"][0]["content"], "hello upstream");
}

#[tokio::test]
async fn stream_relays_chunks_with_usage() {
    let upstream = Upstream::start(Arc::new(|_| {
        vec![sse_head(), sse(&delta("Hel")), sse(&delta("lo")), sse(FINISH), sse(USAGE), sse("[DONE]")]
    }))
    .await;
    let mut client = generation(upstream.base_url(), None).await;
    let chunks = collect_stream(&mut client).await.unwrap();
    let text: String = chunks.iter().map(|c| c.delta.as_str()).collect();
    assert_eq!(text, "Hello");
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, i32::from(FinishReason::Stop));
    let usage = last.usage.unwrap();
    assert_eq!((usage.total_tokens, usage.estimated), (9, false));

    let (head, body) = upstream.request(0);
    assert!(!head.contains("authorization:"), "no key configured, none sent");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn stream_without_usage_is_estimated() {
    let upstream =
        Upstream::start(Arc::new(|_| vec![sse_head(), sse(&delta("abcdefgh")), sse(FINISH), sse("[DONE]")])).await;
    let mut client = generation(upstream.base_url(), None).await;
    let chunks = collect_stream(&mut client).await.unwrap();
    let usage = chunks.last().unwrap().usage.unwrap();
    assert!(usage.estimated);
    assert_eq!(usage.completion_tokens, 2);
}

#[tokio::test]
async fn rate_limit_becomes_resource_exhausted_with_pushback() {
    let upstream = Upstream::start(Arc::new(|_| {
        vec![json_response("429 Too Many Requests", "retry-after: 2\r\n", r#"{"error":{"message":"slow down"}}"#)]
    }))
    .await;
    let mut client = generation(upstream.base_url(), None).await;
    let status = client.generate(unary()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "upstream rate limit (HTTP 429)");
    assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "2000");
    assert!(from_upstream(&status), "{status:?}");
    let status = collect_stream(&mut client).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(from_upstream(&status), "{status:?}");
}

#[tokio::test]
async fn a_401_reaches_the_caller_without_the_upstream_body() {
    const BODY: &str = r#"{"error":{"message":"Incorrect API key provided: sk-live-SECRET123. See http://billing.internal.corp:8080/admin"}}"#;
    let upstream = Upstream::start(Arc::new(|_| vec![json_response("401 Unauthorized", "", BODY)])).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "sk-live-SECRET123\n").unwrap();
    let mut client = generation(upstream.base_url(), Some(key)).await;

    let unary = client.generate(unary()).await.unwrap_err();
    let stream = collect_stream(&mut client).await.unwrap_err();
    for status in [unary, stream] {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(status.message(), "upstream authentication failed (HTTP 401)");
        assert!(from_upstream(&status), "{status:?}");
        let everything = format!("{status:?}");
        for secret in ["SECRET123", "internal.corp", "Incorrect", &upstream.addr.to_string()] {
            assert!(!everything.contains(secret), "{secret} reached the caller: {everything}");
        }
    }
}

#[tokio::test]
async fn an_unreachable_upstream_shows_neither_its_url_nor_its_credentials() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut client = generation(format!("http://llmesh:hunter2@127.0.0.1:{port}/v1"), None).await;
    let status = client.generate(unary()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "upstream unavailable");
    assert!(from_upstream(&status), "{status:?}");
    let everything = format!("{status:?}");
    assert!(!everything.contains("hunter2") && !everything.contains(&port.to_string()), "{everything}");
}

#[tokio::test]
async fn a_completion_past_the_size_limit_is_unavailable() {
    let big = format!(
        r#"{{"choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"finish_reason":"stop"}}]}}"#,
        "x".repeat(4_000)
    );
    // Declared too long up front, and (without a length) found too long as it is read.
    let declared = big.clone();
    let upstream = Upstream::start(Arc::new(move |_| vec![json_response("200 OK", "", &declared)])).await;
    let mut client = generation_with(upstream.base_url(), None, Some(1_000)).await;
    let status = client.generate(unary()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "upstream answer exceeds the size limit of 1000 bytes");
    assert!(from_upstream(&status), "{status:?}");

    let upstream = Upstream::start(Arc::new(move |_| {
        vec![Step::Write(format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{big}"
        ))]
    }))
    .await;
    let mut client = generation_with(upstream.base_url(), None, Some(1_000)).await;
    let status = client.generate(unary()).await.unwrap_err();
    assert_eq!(status.message(), "upstream answer exceeds the size limit of 1000 bytes", "{status:?}");

    // Under the limit, the same answer is fine.
    let mut client = generation_with(upstream.base_url(), None, Some(10_000)).await;
    assert_eq!(client.generate(unary()).await.unwrap().into_inner().text.len(), 4_000);
}

#[tokio::test]
async fn a_stream_past_the_size_limit_fails_and_drops_the_upstream() {
    let upstream = Upstream::start(Arc::new(|_| {
        let mut steps = vec![sse_head()];
        for _ in 0..1_000 {
            steps.push(sse(&delta("tick")));
            steps.push(Step::Sleep(5));
        }
        steps
    }))
    .await;
    let mut client = generation_with(upstream.base_url(), None, Some(2_000)).await;
    let mut stream = client.generate_stream(streaming()).await.unwrap().into_inner();
    let mut deltas = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => deltas += 1,
            Ok(None) => panic!("the stream ended without an error after {deltas} chunks"),
            Err(status) => break status,
        }
    };
    // 2000 bytes hold 25 of these 80-byte events: at most those pass (fewer when the reads
    // coalesce), then the error, in the trailers.
    assert!(deltas <= 25, "{deltas} chunks before the limit");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "upstream answer exceeds the size limit of 2000 bytes");
    assert!(from_upstream(&status), "{status:?}");
    // The upstream call was dropped: the upstream notices long before its 5 s script ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while !*upstream.broken.lock().unwrap() {
        assert!(std::time::Instant::now() < deadline, "the upstream kept streaming past the limit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn server_error_is_unavailable() {
    let upstream = Upstream::start(Arc::new(|_| vec![json_response("500 Internal Server Error", "", "boom")])).await;
    let mut client = generation(upstream.base_url(), None).await;
    let status = client.generate(unary()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "upstream failed (HTTP 500)");
    assert!(from_upstream(&status), "{status:?}");
}

#[tokio::test]
async fn stall_after_first_chunk_is_unavailable_not_a_hang() {
    let upstream =
        Upstream::start(Arc::new(|_| vec![sse_head(), sse(&delta("Hel")), Step::Sleep(10_000), sse(FINISH)])).await;
    let mut client = generation(upstream.base_url(), None).await;
    let started = std::time::Instant::now();
    let mut stream = client.generate_stream(streaming()).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().delta, "Hel");
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("stalled"), "{status:?}");
    // After the first chunk the status travels in the trailers, and so does its origin.
    assert!(from_upstream(&status), "{status:?}");
    // The idle timeout is 300 ms.
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[tokio::test]
async fn reset_mid_stream_is_unavailable() {
    let upstream = Upstream::start(Arc::new(|_| vec![sse_head(), sse(&delta("Hel")), Step::Reset])).await;
    let mut client = generation(upstream.base_url(), None).await;
    let mut stream = client.generate_stream(streaming()).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().delta, "Hel");
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(from_upstream(&status), "{status:?}");
}

#[tokio::test]
async fn early_close_is_unavailable() {
    let upstream = Upstream::start(Arc::new(|_| vec![sse_head(), sse(&delta("Hel"))])).await;
    let mut client = generation(upstream.base_url(), None).await;
    let status = collect_stream(&mut client).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("before finishing"), "{status:?}");
}

#[tokio::test]
async fn malformed_chunk_is_a_clear_error() {
    let upstream =
        Upstream::start(Arc::new(|_| vec![sse_head(), sse(&delta("ok")), sse("{not json"), Step::Sleep(5_000)])).await;
    let mut client = generation(upstream.base_url(), None).await;
    let started = std::time::Instant::now();
    let status = collect_stream(&mut client).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("malformed"), "{status:?}");
    assert!(!status.message().contains("not json"), "the upstream's text reached the caller: {status:?}");
    assert!(from_upstream(&status), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    let upstream = Upstream::start(Arc::new(|_| vec![json_response("200 OK", "", "<html>")])).await;
    let mut client = generation(upstream.base_url(), None).await;
    let status = client.generate(unary()).await.unwrap_err();
    assert!(status.message().contains("malformed"), "{status:?}");
}

#[tokio::test]
async fn client_cancel_stops_the_upstream() {
    let upstream = Upstream::start(Arc::new(|_| {
        let mut steps = vec![sse_head()];
        for _ in 0..100 {
            steps.push(sse(&delta("tick")));
            steps.push(Step::Sleep(50));
        }
        steps
    }))
    .await;
    let mut client = generation(upstream.base_url(), None).await;
    let mut stream = client.generate_stream(streaming()).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    drop(stream);
    // The upstream notices within a few of its 50 ms ticks, long before its 5 s script ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !*upstream.broken.lock().unwrap() {
        assert!(std::time::Instant::now() < deadline, "upstream kept streaming after the client left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A schema whose key order is not alphabetical: it must reach the upstream as written.
const SCHEMA: &str =
    r#"{"type":"object","properties":{"zone":{"type":"string"},"amount":{"type":"number"}},"required":["zone"]}"#;

#[tokio::test]
async fn tools_images_formats_and_extensions_go_upstream_and_tool_calls_come_back() {
    use llmesh_proto::common::v1::{
        ChatMessage, ContentPart, Extensions, Image, ReasoningOptions, Tool, ToolCall, ToolChoice, ToolChoiceMode,
        content_part::Kind, image::Source,
    };
    let answer = serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-test",
        "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": null, "reasoning_content": "let me look",
            "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "Bash", "arguments": "{\"command\":  \"ls\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "pay", "arguments": "{\"zone\":\"eu\"}"}}
            ]}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50,
            "prompt_tokens_details": {"cached_tokens": 16}, "completion_tokens_details": {"reasoning_tokens": 8}}
    })
    .to_string();
    let upstream = Upstream::start(Arc::new(move |_| vec![json_response("200 OK", "", &answer)])).await;
    let mut client = generation(upstream.base_url(), None).await;
    let part = |kind| ContentPart { kind: Some(kind), ..Default::default() };
    let request = GenerateRequest {
        model: "up".into(),
        messages: vec![
            ChatMessage { role: "system".into(), content: "be brief".into(), ..Default::default() },
            ChatMessage {
                role: "user".into(),
                parts: vec![
                    part(Kind::Text("what is in these?".into())),
                    part(Kind::Image(Image {
                        source: Some(Source::Data(vec![1, 2, 3])),
                        media_type: "image/png".into(),
                        detail: 3,
                    })),
                    part(Kind::Image(Image {
                        source: Some(Source::Url("https://example.com/a.jpg".into())),
                        ..Default::default()
                    })),
                ],
                ..Default::default()
            },
            ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![ToolCall {
                    id: "call_0".into(),
                    name: "Bash".into(),
                    arguments: "{\"command\": \"pwd\"}".into(),
                    signature: vec![],
                }],
                ..Default::default()
            },
            ChatMessage {
                role: "tool".into(),
                tool_call_id: "call_0".into(),
                parts: vec![part(Kind::Text("/home".into()))],
                ..Default::default()
            },
        ],
        tools: vec![
            Tool { name: "Bash".into(), description: "runs".into(), ..Default::default() },
            Tool { name: "pay".into(), parameters: SCHEMA.into(), strict: Some(true), ..Default::default() },
        ],
        tool_choice: Some(ToolChoice { mode: ToolChoiceMode::Required.into(), name: String::new() }),
        parallel_tool_calls: Some(true),
        reasoning: Some(ReasoningOptions { effort: "high".into(), ..Default::default() }),
        extensions: Some(Extensions {
            dialect: "openai".into(),
            json: r#"{"logprobs":true,"top_logprobs":2,"model":"not-this-one"}"#.into(),
        }),
        ..Default::default()
    };
    let response = client.generate(request).await.unwrap().into_inner();
    assert_eq!(response.finish_reason, i32::from(FinishReason::ToolCalls));
    let calls: Vec<(&str, &str, &str)> =
        response.tool_calls.iter().map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.as_str())).collect();
    assert_eq!(calls, [("call_a", "Bash", "{\"command\":  \"ls\"}"), ("call_b", "pay", "{\"zone\":\"eu\"}")]);
    assert_eq!(response.reasoning.len(), 1);
    assert_eq!(response.reasoning[0].text, "let me look");
    let usage = response.usage.unwrap();
    assert_eq!((usage.cached_prompt_tokens, usage.reasoning_tokens, usage.estimated), (16, 8, false));
    let extensions = response.extensions.unwrap();
    assert_eq!(extensions.dialect, "openai");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&extensions.json).unwrap()["system_fingerprint"], "fp_1");

    let (_, body) = upstream.request(0);
    let messages = &body["messages"];
    assert_eq!(messages[1]["content"][0], serde_json::json!({"type": "text", "text": "what is in these?"}));
    assert_eq!(
        messages[1]["content"][1],
        serde_json::json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AQID", "detail": "high"}})
    );
    assert_eq!(messages[1]["content"][2]["image_url"]["url"], "https://example.com/a.jpg");
    assert_eq!(messages[2]["tool_calls"][0]["function"]["arguments"], "{\"command\": \"pwd\"}");
    assert_eq!(messages[2]["tool_calls"][0]["type"], "function");
    assert_eq!(messages[3], serde_json::json!({"role": "tool", "content": "/home", "tool_call_id": "call_0"}));
    assert_eq!(
        body["tools"][0],
        serde_json::json!({"type": "function", "function": {"name": "Bash", "description": "runs"}})
    );
    assert_eq!(body["tools"][1]["function"]["strict"], true);
    assert_eq!(body["tool_choice"], "required");
    assert_eq!(body["parallel_tool_calls"], true);
    assert_eq!(body["reasoning_effort"], "high");
    assert_eq!(
        (body["logprobs"].clone(), body["top_logprobs"].clone()),
        (serde_json::json!(true), serde_json::json!(2))
    );
    assert_eq!(body["model"], "gpt-test", "an extension does not override what llmesh sets");
    // The schema reaches the upstream byte for byte (its key order is what structured outputs follow).
    assert!(upstream.raw_body(0).contains(&format!(r#""parameters":{SCHEMA}"#)), "{}", upstream.raw_body(0));
}

#[tokio::test]
async fn a_json_schema_response_format_and_a_named_tool_choice_go_upstream() {
    use llmesh_proto::common::v1::{ResponseFormat, ResponseFormatType, Tool, ToolChoice, ToolChoiceMode};
    let upstream = Upstream::start(Arc::new(|_| {
        vec![json_response("200 OK", "", r#"{"choices":[{"message":{"content":"{}"},"finish_reason":"stop"}]}"#)]
    }))
    .await;
    let mut client = generation(upstream.base_url(), None).await;
    let request = GenerateRequest {
        tools: vec![Tool { name: "pay".into(), parameters: SCHEMA.into(), ..Default::default() }],
        tool_choice: Some(ToolChoice { mode: ToolChoiceMode::Tool.into(), name: "pay".into() }),
        response_format: Some(ResponseFormat {
            r#type: ResponseFormatType::JsonSchema.into(),
            name: "answer".into(),
            schema: SCHEMA.into(),
            strict: Some(true),
            description: String::new(),
        }),
        ..unary()
    };
    let response = client.generate(request).await.unwrap().into_inner();
    assert_eq!(response.text, "{}");
    let (_, body) = upstream.request(0);
    assert_eq!(body["tool_choice"], serde_json::json!({"type": "function", "function": {"name": "pay"}}));
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(body["response_format"]["json_schema"]["name"], "answer");
    assert_eq!(body["response_format"]["json_schema"]["strict"], true);
    assert!(upstream.raw_body(0).contains(&format!(r#""schema":{SCHEMA}"#)));
    assert!(body.get("parallel_tool_calls").is_none());
}

#[tokio::test]
async fn streamed_tool_call_fragments_are_passed_on_by_index_and_join() {
    let chunk = |calls: serde_json::Value| {
        serde_json::json!({"choices": [{"index": 0, "delta": {"tool_calls": calls}, "finish_reason": null}]})
            .to_string()
    };
    let first = chunk(serde_json::json!([
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "Bash", "arguments": ""}}
    ]));
    let second = chunk(serde_json::json!([{"index": 0, "function": {"arguments": "{\"comm"}}]));
    let third = chunk(serde_json::json!([
        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "Read", "arguments": "{\"path\""}}
    ]));
    let fourth = chunk(serde_json::json!([
        {"index": 0, "function": {"arguments": "and\": \"ls\"}"}},
        {"index": 1, "function": {"arguments": ": \"a.txt\"}"}}
    ]));
    let finish = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#;
    let upstream = Upstream::start(Arc::new(move |_| {
        vec![
            sse_head(),
            sse(&delta("Calling. ")),
            sse(&first),
            sse(&second),
            sse(&third),
            sse(&fourth),
            sse(finish),
            sse(USAGE),
            sse("[DONE]"),
        ]
    }))
    .await;
    let mut client = generation(upstream.base_url(), None).await;
    let chunks = collect_stream(&mut client).await.unwrap();
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, i32::from(FinishReason::ToolCalls));
    let mut assembler = llmesh_proto::assemble::Assembler::default();
    for chunk in &chunks {
        assembler.add(chunk).unwrap();
    }
    let text: String = chunks.iter().map(|c| c.delta.as_str()).collect();
    let answer = assembler.finish(text, last);
    assert_eq!(answer.text, "Calling. ");
    let calls: Vec<(&str, &str, &str)> =
        answer.tool_calls.iter().map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.as_str())).collect();
    assert_eq!(calls, [("call_a", "Bash", "{\"command\": \"ls\"}"), ("call_b", "Read", "{\"path\": \"a.txt\"}")]);
    // Passed on as they came: more than one delta per call.
    assert!(chunks.iter().map(|c| c.tool_calls.len()).sum::<usize>() >= 5);
}

#[tokio::test]
async fn an_azure_model_calls_its_deployment_with_an_api_key_header() {
    let upstream = Upstream::start(Arc::new(|_| {
        vec![json_response(
            "200 OK",
            "",
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hi from Azure"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}"#,
        )]
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "azure-key-123\n").unwrap();
    let azure = HttpModelConfig {
        base_url: Some(upstream.origin()),
        upstream_model: "my-gpt-4o-deployment".into(),
        api_key_file: Some(key),
        ..HttpModelConfig::default()
    };
    let mut client = serve_model(ModelConfig::Azure(azure)).await;
    let response = client.generate(unary()).await.unwrap().into_inner();
    assert_eq!((response.text.as_str(), response.provider.as_str()), ("Hi from Azure", "azure"));
    let (head, body) = upstream.request(0);
    assert!(head.starts_with("post /openai/v1/chat/completions "), "{head}");
    assert!(head.contains("api-key: azure-key-123"), "{head}");
    assert!(!head.contains("authorization:"), "{head}");
    assert_eq!(body["model"], "my-gpt-4o-deployment");
}

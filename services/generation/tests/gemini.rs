//! The Gemini provider against a real HTTP upstream (`upstream/`) speaking the Gemini API's wire
//! format: the paths of a unary and a streamed call, `x-goog-api-key`, the body, a function call
//! and its thought signature carried back with its result, a 429, and an `error` mid-stream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod upstream;

use std::sync::Arc;

use llmesh_generation::config::ModelConfig;
use llmesh_proto::{
    common::v1::{ChatMessage, FinishReason, ToolCall},
    generation::v1::{GenerateRequest, GenerateStreamRequest, generation_client::GenerationClient},
};
use tonic::{Code, transport::Channel};
use upstream::{Upstream, bash_request, from_upstream, json_response, keyed_model, serve_model, sse, sse_head};

const CALL: &str = r#"{"candidates":[{"content":{"parts":[{"functionCall":{"name":"Bash","args":{"command":"echo hi"}},"thoughtSignature":"c2lnLTE="}],"role":"model"},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":30,"candidatesTokenCount":5,"totalTokenCount":35}}"#;

/// A generation server whose model `up` is the Gemini API at `upstream`.
async fn generation(upstream: &Upstream) -> (GenerationClient<Channel>, tempfile::TempDir) {
    let (config, key) = keyed_model(upstream.origin(), "gemini-2.5-flash", "gemini-key-123");
    (serve_model(ModelConfig::Gemini(config)).await, key)
}

#[tokio::test]
async fn a_function_call_comes_back_and_its_result_goes_out_with_its_signature() {
    let upstream = Upstream::start(Arc::new(|_| vec![json_response("200 OK", "", CALL)])).await;
    let (mut client, _key) = generation(&upstream).await;

    let response = client.generate(bash_request()).await.unwrap().into_inner();
    assert_eq!(response.provider, "gemini");
    assert_eq!(response.finish_reason, i32::from(FinishReason::ToolCalls));
    let call = &response.tool_calls[0];
    assert_eq!(
        (call.id.as_str(), call.name.as_str(), call.arguments.as_str()),
        ("call_0", "Bash", r#"{"command":"echo hi"}"#)
    );
    assert_eq!(call.signature, b"sig-1");

    let (head, body) = upstream.request(0);
    assert!(head.starts_with("post /v1beta/models/gemini-2.5-flash:generatecontent "), "{head}");
    assert!(head.contains("x-goog-api-key: gemini-key-123"), "{head}");
    assert_eq!(body["systemInstruction"]["parts"][0]["text"], "Be brief.");
    assert_eq!(body["contents"][0]["role"], "user");
    assert_eq!(body["generationConfig"]["maxOutputTokens"], 64);
    assert!(
        upstream
            .raw_body(0)
            .contains(r#""parametersJsonSchema":{"type":"object","properties":{"command":{"type":"string"}}}"#)
    );

    // The result of the call, by its id: Gemini gets the function's name and the signature back.
    let mut next = bash_request();
    next.messages.push(ChatMessage { role: "assistant".into(), tool_calls: vec![call.clone()], ..Default::default() });
    next.messages.push(ChatMessage {
        role: "tool".into(),
        tool_call_id: call.id.clone(),
        content: "hi".into(),
        ..Default::default()
    });
    client.generate(next).await.unwrap();
    let (_, body) = upstream.request(1);
    let model_turn = &body["contents"][1];
    assert_eq!(model_turn["role"], "model");
    assert_eq!(model_turn["parts"][0]["functionCall"]["name"], "Bash");
    assert_eq!(model_turn["parts"][0]["thoughtSignature"], "c2lnLTE=");
    let result = &body["contents"][2]["parts"][0]["functionResponse"];
    assert_eq!((result["id"].as_str(), result["name"].as_str()), (Some("call_0"), Some("Bash")));
    assert_eq!(result["response"]["output"], "hi");
}

#[tokio::test]
async fn a_stream_goes_to_the_streaming_path_and_relays_its_parts() {
    let events = [
        r#"{"candidates":[{"content":{"parts":[{"text":"Hel"}],"role":"model"}}]}"#,
        r#"{"candidates":[{"content":{"parts":[{"text":"lo"}],"role":"model"},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":2,"totalTokenCount":7}}"#,
    ];
    let upstream =
        Upstream::start(Arc::new(move |_| std::iter::once(sse_head()).chain(events.iter().map(|e| sse(e))).collect()))
            .await;
    let (mut client, _key) = generation(&upstream).await;
    let request = GenerateStreamRequest::from(GenerateRequest { tools: Vec::new(), ..bash_request() });
    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    let mut text = String::new();
    let mut last = None;
    while let Some(chunk) = stream.message().await.unwrap() {
        text.push_str(&chunk.delta);
        last = Some(chunk);
    }
    assert_eq!(text, "Hello");
    let last = last.unwrap();
    assert_eq!(last.finish_reason, i32::from(FinishReason::Stop));
    assert_eq!(last.usage.unwrap().total_tokens, 7);
    let (head, _) = upstream.request(0);
    assert!(head.starts_with("post /v1beta/models/gemini-2.5-flash:streamgeneratecontent?alt=sse "), "{head}");
}

#[tokio::test]
async fn a_429_and_an_error_mid_stream_are_the_upstreams_failures() {
    let upstream = Upstream::start(Arc::new(|body| {
        if body.contains("limited") {
            let error =
                r#"{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED"}}"#;
            vec![json_response("429 Too Many Requests", "retry-after: 1\r\n", error)]
        } else {
            vec![
                sse_head(),
                sse(r#"{"candidates":[{"content":{"parts":[{"text":"Hi"}],"role":"model"}}]}"#),
                sse(r#"{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#),
            ]
        }
    }))
    .await;
    let (mut client, _key) = generation(&upstream).await;
    let ask =
        |text: &str| GenerateRequest { prompt: text.into(), messages: Vec::new(), tools: Vec::new(), ..bash_request() };

    let status = client.generate(ask("limited")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "1000");
    assert!(from_upstream(&status));

    let mut stream = client.generate_stream(GenerateStreamRequest::from(ask("overloaded"))).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().delta, "Hi");
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(from_upstream(&status), "{status:?}");
}

#[tokio::test]
async fn a_tool_result_for_no_known_call_is_refused_before_anything_is_sent() {
    let upstream = Upstream::start(Arc::new(|_| vec![json_response("200 OK", "", CALL)])).await;
    let (mut client, _key) = generation(&upstream).await;
    let mut orphan = bash_request();
    let call = ToolCall { id: "call_9".into(), name: "Bash".into(), arguments: "{}".into(), ..Default::default() };
    orphan.messages.push(ChatMessage { role: "assistant".into(), tool_calls: vec![call], ..Default::default() });
    orphan.messages.push(ChatMessage {
        role: "tool".into(),
        tool_call_id: "call_other".into(),
        content: "?".into(),
        ..Default::default()
    });
    let status = client.generate(orphan).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("messages[3].tool_call_id: "), "{status:?}");
    assert_eq!(upstream.received(), 0);
}

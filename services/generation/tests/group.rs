//! A model group over real HTTP upstreams (`upstream/`): a deployment's 429 sends the call on to
//! the next and cools the deployment down; a stream that failed after its first chunk is not
//! resent; a request the upstream refuses is not either; every deployment cooling is
//! RESOURCE_EXHAUSTED with a pushback and no upstream call; a deployment without a form for the
//! request is passed over.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod upstream;

use std::sync::Arc;

use llmesh_generation::{
    config::ModelConfig,
    provider::{
        group::{DeploymentConfig, GroupConfig},
        http::HttpModelConfig,
    },
};
use llmesh_proto::{
    common::v1::{ResponseFormat, ResponseFormatType},
    generation::v1::{GenerateRequest, GenerateStreamRequest, generation_client::GenerationClient},
};
use tonic::{Code, transport::Channel};
use upstream::{Step, Upstream, from_upstream, json_response, serve_model, sse, sse_head};

const ANSWER: &str = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"from B"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;

fn openai_at(upstream: &Upstream) -> ModelConfig {
    ModelConfig::Openai(HttpModelConfig {
        base_url: Some(upstream.base_url()),
        api_key_env: Some(String::new()),
        first_token_timeout_ms: 1_000,
        idle_timeout_ms: 300,
        total_timeout_ms: 5_000,
        ..HttpModelConfig::default()
    })
}

async fn group(deployments: Vec<ModelConfig>) -> GenerationClient<Channel> {
    let deployments = deployments.into_iter().map(|model| DeploymentConfig { weight: 1, model }).collect();
    serve_model(ModelConfig::Group(GroupConfig { deployments, cooldown_ms: 60_000, ..GroupConfig::default() })).await
}

fn ask(text: &str) -> GenerateRequest {
    GenerateRequest { model: "up".into(), prompt: text.into(), max_tokens: 8, ..Default::default() }
}

#[tokio::test]
async fn a_429_fails_over_and_cools_the_deployment_down() {
    let a = Upstream::start(Arc::new(|_| {
        vec![json_response("429 Too Many Requests", "retry-after: 30\r\n", r#"{"error":{"message":"slow down"}}"#)]
    }))
    .await;
    let b = Upstream::start(Arc::new(|_| vec![json_response("200 OK", "", ANSWER)])).await;
    let mut client = group(vec![openai_at(&a), openai_at(&b)]).await;

    for call in 0..3 {
        let response = client.generate(ask("hello")).await.unwrap().into_inner();
        assert_eq!(response.text, "from B", "call {call}");
        assert_eq!(response.provider, "group");
    }
    assert_eq!(a.received(), 1, "a cooling deployment gets no call");
    assert_eq!(b.received(), 3);
}

#[tokio::test]
async fn every_deployment_cooling_is_resource_exhausted_without_a_call() {
    let a = Upstream::start(Arc::new(|_| {
        vec![json_response("429 Too Many Requests", "retry-after: 30\r\n", r#"{"error":{"message":"slow down"}}"#)]
    }))
    .await;
    let mut client = group(vec![openai_at(&a)]).await;
    let status = client.generate(ask("hello")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let status = client.generate(ask("hello")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(from_upstream(&status), "{status:?}");
    let pushback: u64 = status.metadata().get("grpc-retry-pushback-ms").unwrap().to_str().unwrap().parse().unwrap();
    assert!((50_000..=60_000).contains(&pushback), "the cool-down's rest: {pushback}");
    assert_eq!(a.received(), 1);
}

#[tokio::test]
async fn a_stream_that_began_is_not_resent_and_a_refused_request_is_not_failed_over() {
    let a = Upstream::start(Arc::new(|body| {
        if body.contains("reject") {
            return vec![json_response("400 Bad Request", "", r#"{"error":{"message":"bad"}}"#)];
        }
        let delta = r#"{"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#;
        vec![sse_head(), sse(delta), Step::Reset]
    }))
    .await;
    let b = Upstream::start(Arc::new(|_| vec![json_response("200 OK", "", ANSWER)])).await;
    // Weights 1 and 1 alternate: each test call below starts at `a` when it is `a`'s turn.
    let mut client = group(vec![openai_at(&a), openai_at(&b)]).await;

    let stream = GenerateStreamRequest::from(ask("hello"));
    let mut chunks = client.generate_stream(stream).await.unwrap().into_inner();
    assert_eq!(chunks.message().await.unwrap().unwrap().delta, "Hel");
    let status = chunks.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(b.received(), 0, "a stream that began is the call's");

    client.generate(ask("hello")).await.unwrap(); // b's turn
    let status = client.generate(ask("reject this")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(b.received(), 1, "the upstream refused the request itself: no other deployment is asked");
}

#[tokio::test]
async fn a_deployment_without_a_form_for_the_request_is_passed_over() {
    let claude = Upstream::start(Arc::new(|_| vec![json_response("500 Internal Server Error", "", "{}")])).await;
    let b = Upstream::start(Arc::new(|_| vec![json_response("200 OK", "", ANSWER)])).await;
    let anthropic = ModelConfig::Anthropic(HttpModelConfig {
        base_url: Some(claude.origin()),
        api_key_env: Some(String::new()),
        ..HttpModelConfig::default()
    });
    let mut client = group(vec![anthropic, openai_at(&b)]).await;
    let json_mode = ResponseFormat { r#type: ResponseFormatType::JsonObject.into(), ..Default::default() };
    let request = GenerateRequest { response_format: Some(json_mode), ..ask("json please") };
    assert_eq!(client.generate(request).await.unwrap().into_inner().text, "from B");
    assert_eq!(claude.received(), 0);
}

#[tokio::test]
async fn a_deployment_whose_headers_say_it_has_nothing_left_is_passed_over_before_its_429() {
    let spent = "x-ratelimit-remaining-requests: 0\r\nx-ratelimit-reset-requests: 30s\r\n";
    let a = Upstream::start(Arc::new(move |_| vec![json_response("200 OK", spent, ANSWER)])).await;
    let b =
        Upstream::start(Arc::new(|_| vec![json_response("200 OK", "x-ratelimit-remaining-requests: 99\r\n", ANSWER)]))
            .await;
    let mut client = group(vec![openai_at(&a), openai_at(&b)]).await;
    for _ in 0..4 {
        client.generate(ask("hello")).await.unwrap();
    }
    assert_eq!(a.received(), 1, "its last answer said it had no requests left for 30 s");
    assert_eq!(b.received(), 3);
}

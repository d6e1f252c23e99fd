//! Bad input gets INVALID_ARGUMENT naming the field, at the gateway and at generation, and the
//! services keep serving.

use llmesh_e2e::Mesh;
use llmesh_proto::{
    common::v1::{ChatMessage, Tool},
    gateway::v1::GenerateRequest,
    generation::v1 as generation,
};
use tonic::Code;

use crate::{prompt, stream_prompt};

fn cases() -> Vec<(&'static str, GenerateRequest)> {
    let tool = |parameters: &str| Tool { name: "f".into(), parameters: parameters.into(), ..Default::default() };
    let message = |role: &str| ChatMessage { role: role.into(), content: "hi".into(), ..Default::default() };
    vec![
        ("prompt", GenerateRequest { prompt: String::new(), ..prompt("") }),
        ("prompt", prompt("   ")),
        ("model", GenerateRequest { model: String::new(), ..prompt("hi") }),
        ("model", GenerateRequest { model: "no-such-model".into(), ..prompt("hi") }),
        ("max_tokens", GenerateRequest { max_tokens: 128 * 1024 + 1, ..prompt("hi") }),
        ("prompt", prompt(&"x".repeat((4 << 20) + 1))),
        ("tools[0].parameters", GenerateRequest { tools: vec![tool("[]")], ..prompt("hi") }),
        ("prompt", GenerateRequest { messages: vec![message("user")], ..prompt("hi") }),
        ("messages[0].role", GenerateRequest { messages: vec![message("wizard")], ..prompt("") }),
        ("temperature", GenerateRequest { temperature: Some(3.0), ..prompt("hi") }),
        ("top_p", GenerateRequest { top_p: Some(1.5), ..prompt("hi") }),
        ("stop", GenerateRequest { stop: vec![String::new()], ..prompt("hi") }),
        ("cache", GenerateRequest { cache: 42, ..prompt("hi") }),
    ]
}

#[tokio::test]
async fn gateway_names_the_field_and_keeps_serving() {
    let mesh = Mesh::start().await;
    let mut gateway = mesh.gateway().await;
    for (field, request) in cases() {
        let status = gateway.generate(request.clone()).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().starts_with(field), "{field}: {:?}", status.message());

        let stream_request: llmesh_proto::gateway::v1::GenerateStreamRequest =
            generation::GenerateStreamRequest::from(generation::GenerateRequest::from(request)).into_gateway();
        let status = gateway.generate_stream(stream_request).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "stream {field}: {status:?}");

        assert!(gateway.generate(prompt("still here?")).await.is_ok(), "gateway stopped serving after {field}");
    }
    assert!(gateway.generate_stream(stream_prompt("still streaming?")).await.is_ok());
}

#[tokio::test]
async fn generation_validates_too() {
    let mesh = Mesh::start().await;
    let mut client = mesh.generation().await;
    for (field, request) in cases() {
        let status = client.generate(generation::GenerateRequest::from(request)).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().starts_with(field), "{field}: {:?}", status.message());
    }
    let ok = client.generate(generation::GenerateRequest::from(prompt("fine"))).await;
    assert!(ok.is_ok());
}

#[tokio::test]
async fn cache_rejects_a_missing_request() {
    let mesh = Mesh::start().await;
    let status = mesh
        .cache()
        .await
        .lookup(llmesh_proto::cache::v1::LookupRequest { request: None, allow_stale: false })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("request"));
    let status =
        mesh.cache().await.invalidate(llmesh_proto::cache::v1::InvalidateRequest { target: None }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// Test-only: the gateway stream request with the same fields.
trait IntoGateway {
    fn into_gateway(self) -> llmesh_proto::gateway::v1::GenerateStreamRequest;
}

impl IntoGateway for generation::GenerateStreamRequest {
    fn into_gateway(self) -> llmesh_proto::gateway::v1::GenerateStreamRequest {
        // Same field numbers on both sides (see crates/proto/src/convert.rs).
        prost::Message::decode(prost::Message::encode_to_vec(&self).as_slice()).unwrap()
    }
}

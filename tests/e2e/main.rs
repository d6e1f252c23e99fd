//! End-to-end tests: the real binaries, real sockets, a real redis-server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admission;
mod bad_input;
mod cache;
mod chaos;
mod discovery;
mod fakellm;
mod jobs;
mod lifecycle;
mod mesh;
mod overload;
mod redis_cache;
mod telemetry;

use llmesh_proto::gateway::v1::{GenerateRequest, GenerateStreamRequest, GenerateStreamResponse};

pub fn prompt(text: &str) -> GenerateRequest {
    GenerateRequest { model: "sim".into(), prompt: text.into(), ..Default::default() }
}

pub fn stream_prompt(text: &str) -> GenerateStreamRequest {
    GenerateStreamRequest { model: "sim".into(), prompt: text.into(), ..Default::default() }
}

/// Reads a whole stream.
pub async fn chunks(
    client: &mut llmesh_proto::gateway::v1::gateway_client::GatewayClient<tonic::transport::Channel>,
    request: GenerateStreamRequest,
) -> Vec<GenerateStreamResponse> {
    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        chunks.push(chunk);
    }
    chunks
}

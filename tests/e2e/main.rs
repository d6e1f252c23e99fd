//! End-to-end tests: the real binaries, real sockets, a real redis-server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admission;
mod bad_input;
mod budgets;
mod cache;
mod chaos;
mod discovery;
mod fakellm;
mod generation_hardening;
mod http_ingress;
mod input_limits;
mod isolation;
mod job_isolation;
mod jobs;
mod keys_cli;
mod lifecycle;
mod mesh;
mod near_cache;
mod overload;
mod redis_cache;
mod telemetry;
mod tls;

use llmesh_proto::gateway::v1::{GenerateRequest, GenerateStreamRequest, GenerateStreamResponse};

/// The test key and its keys file (tests/fixtures/keys.toml: public keys, for tests only).
fn demo_keys() -> (String, String) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/keys.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let key = text.lines().find_map(|l| l.strip_prefix("# x-api-key: ")).unwrap().split_whitespace().next().unwrap();
    (key.to_string(), path.display().to_string())
}

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

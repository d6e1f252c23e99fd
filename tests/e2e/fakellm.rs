//! The openai provider against fakellm (PyPI), an OpenAI-compatible server no one here wrote,
//! through the whole mesh.

use std::time::Duration;

use llmesh_e2e::{Mesh, MeshOptions, free_port};
use llmesh_proto::{common::v1::FinishReason, gateway::v1::GenerateRequest};
use tonic::Code;

use crate::{chunks, stream_prompt};

const CONFIG: &str = r#"version: 1
defaults:
  fallback: deterministic_echo
rules:
  - name: greeting
    when:
      messages_contain: "hello"
    respond:
      content: "Hi there! This is a mock response from fakellm."
  - name: rate_limit_scenario
    when:
      messages_contain: "rate limit me"
    respond:
      status: 429
      error: "Rate limit exceeded (mock)"
"#;

/// fakellm on a free port, killed on drop.
struct FakeLlm {
    port: u16,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

async fn fakellm() -> FakeLlm {
    let venv = std::env::var("LLMESH_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    let exe = venv.join("bin/fakellm");
    assert!(exe.exists(), "{} is missing: scripts/test installs tests/python/requirements.txt", exe.display());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fakellm.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let port = free_port();
    let child = tokio::process::Command::new(exe)
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "fakellm did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    FakeLlm { port, _child: child, _dir: dir }
}

fn fake(prompt: &str) -> GenerateRequest {
    GenerateRequest { model: "fake".into(), prompt: prompt.into(), ..Default::default() }
}

#[tokio::test]
async fn generates_through_fakellm() {
    let upstream = fakellm().await;
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GENERATION_MODELS__FAKE__PROVIDER", "openai".into()),
            ("LLMESH_GENERATION_MODELS__FAKE__BASE_URL", format!("http://127.0.0.1:{}/v1", upstream.port)),
            ("LLMESH_GENERATION_MODELS__FAKE__UPSTREAM_MODEL", "gpt-4o-mini".into()),
        ],
        redis_url: None,
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let mut gateway = mesh.gateway().await;

    let unary = gateway.generate(fake("hello there")).await.unwrap().into_inner();
    assert_eq!(unary.text, "Hi there! This is a mock response from fakellm.");
    assert_eq!(unary.provider, "openai");
    assert_eq!(unary.finish_reason, i32::from(FinishReason::Stop));
    let usage = unary.usage.unwrap();
    assert!(!usage.estimated && usage.completion_tokens > 0, "{usage:?}");

    // fakellm streams word by word and sends no usage: llmesh counts it and says so.
    let mut request = stream_prompt("hello again");
    request.model = "fake".into();
    let streamed = chunks(&mut gateway, request).await;
    let text: String = streamed.iter().map(|c| c.delta.as_str()).collect();
    assert_eq!(text, "Hi there! This is a mock response from fakellm.");
    assert!(streamed.len() > 3, "not streamed chunk by chunk: {streamed:?}");
    let last = streamed.last().unwrap();
    assert_eq!(last.finish_reason, i32::from(FinishReason::Stop));
    assert!(last.usage.unwrap().estimated);

    // Generation reports the upstream's 429 as RESOURCE_EXHAUSTED ...
    let direct = llmesh_proto::generation::v1::GenerateRequest::from(fake("please rate limit me"));
    let status = mesh.generation().await.generate(direct).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // A fixed description: what the upstream said is for generation's log only.
    assert_eq!(status.message(), "upstream rate limit (HTTP 429)", "{status:?}");
    // ... and the gateway degrades gracefully, saying why.
    let degraded = gateway.generate(fake("please rate limit me")).await.unwrap().into_inner();
    assert_eq!(degraded.finish_reason, i32::from(FinishReason::Fallback));
    let why = degraded.degraded.unwrap();
    assert_eq!((why.reason.as_str(), why.source.as_str()), ("overloaded", "message"));
    assert!(!why.detail.contains("Rate limit exceeded"), "the upstream's words reached the client: {why:?}");
}

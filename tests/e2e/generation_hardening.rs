//! Generation against hostile input and hostile upstreams (issue 13), through the real binaries:
//! fault-injection models only when enabled, only canonical `sim-flaky-N` names, failures marked
//! with where they came from, no upstream body in what callers see, upstream answers bounded, and
//! no memory or metric label that grows with the names a client makes up.

use std::{sync::Arc, time::Duration};

use llmesh_e2e::{Mesh, MeshOptions, Proc};
use llmesh_proto::{
    failure::{ORIGIN_KEY, ORIGIN_UPSTREAM},
    gateway::v1::GenerateRequest as GatewayRequest,
    generation::v1::{GenerateRequest, GenerateStreamRequest, ListModelsRequest, generation_client::GenerationClient},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tonic::{Code, Status, transport::Channel};

fn request(model: &str) -> GenerateRequest {
    GenerateRequest { model: model.into(), prompt: "hello".into(), ..Default::default() }
}

fn stream_request(model: &str) -> GenerateStreamRequest {
    GenerateStreamRequest { model: model.into(), prompt: "hello".into(), ..Default::default() }
}

fn from_upstream(status: &Status) -> bool {
    status.metadata().get(ORIGIN_KEY).and_then(|v| v.to_str().ok()) == Some(ORIGIN_UPSTREAM)
}

/// Reads a stream to its end: the chunks' deltas, and the error it ended with, if any.
async fn read_stream(client: &mut GenerationClient<Channel>, model: &str) -> (Vec<String>, Option<Status>) {
    let mut stream = match client.generate_stream(stream_request(model)).await {
        Ok(response) => response.into_inner(),
        Err(status) => return (Vec::new(), Some(status)),
    };
    let mut deltas = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => deltas.push(chunk.delta),
            Ok(None) => return (deltas, None),
            Err(status) => return (deltas, Some(status)),
        }
    }
}

/// What the upstream writes for each request; `reset` closes with RST after the writes.
#[derive(Clone)]
pub(crate) struct Script {
    pub(crate) writes: Vec<String>,
    pub(crate) pause_ms: u64,
    pub(crate) reset: bool,
}

/// A one-route HTTP/1.1 upstream that answers every request with its script.
pub(crate) async fn upstream(script: Script) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(answer(socket, script.clone()));
        }
    });
    format!("http://{addr}/v1")
}

async fn answer(mut socket: TcpStream, script: Arc<Script>) {
    // Read the head and the body the head announces, then follow the script.
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = socket.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buffer.extend_from_slice(&chunk[..n]);
        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&buffer[..end]).to_lowercase();
        let length: usize =
            head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
        if buffer.len() >= end + 4 + length {
            break;
        }
    }
    for write in &script.writes {
        if socket.write_all(write.as_bytes()).await.is_err() {
            return;
        }
        if script.pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(script.pause_ms)).await;
        }
    }
    if script.reset {
        let _ = socket.set_zero_linger();
    }
}

pub(crate) fn json_response(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";

fn sse_delta(text: &str) -> String {
    format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":null}}]}}\n\n")
}

/// Environment for an `openai` model `up` at `base_url`, whose key is `LLMESH_E2E_UPSTREAM_KEY`.
pub(crate) fn openai_model(base_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("LLMESH_GENERATION_MODELS__UP__PROVIDER", "openai".into()),
        ("LLMESH_GENERATION_MODELS__UP__BASE_URL", base_url.into()),
        ("LLMESH_GENERATION_MODELS__UP__API_KEY_ENV", "LLMESH_E2E_UPSTREAM_KEY".into()),
        ("LLMESH_GENERATION_MODELS__UP__IDLE_TIMEOUT_MS", "2000".into()),
    ]
}

#[tokio::test]
async fn fault_models_are_unknown_unless_enabled() {
    let off = Proc::spawn("generation", &[("LLMESH_GENERATION_FAULT_MODELS", "false".into())]).await.unwrap();
    let mut client = GenerationClient::new(off.channel().await);
    for model in ["sim-error", "sim-429", "sim-slow", "sim-flaky-3"] {
        let status = client.generate(request(model)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{model}: {status:?}");
        assert!(status.message().starts_with("model: unknown model"), "{model}: {status:?}");
        let (_, status) = read_stream(&mut client, model).await;
        assert_eq!(status.map(|s| s.code()), Some(Code::InvalidArgument), "{model} streamed");
    }
    let models = client.list_models(ListModelsRequest {}).await.unwrap().into_inner().models;
    assert_eq!(models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["sim"]);
    assert!(client.generate(request("sim")).await.is_ok());

    // The harness (like `llmesh up`) turns them on.
    let on = Proc::spawn("generation", &[]).await.unwrap();
    let mut client = GenerationClient::new(on.channel().await);
    let status = client.generate(request("sim-error")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn only_canonical_flaky_names_exist() {
    let generation = Proc::spawn("generation", &[]).await.unwrap();
    let mut client = GenerationClient::new(generation.channel().await);
    for model in ["sim-flaky-007", "sim-flaky-+7", "sim-flaky-0", "sim-flaky-1001", "sim-flaky- 7"] {
        let status = client.generate(request(model)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{model}: {status:?}");
        assert!(!from_upstream(&status), "{model}: refusing a name is the replica's answer");
    }
    assert!(client.generate(request("sim-flaky-7")).await.is_ok());
}

#[tokio::test]
async fn upstream_failures_say_so_before_and_after_the_first_chunk() {
    let base_url =
        upstream(Script { writes: vec![SSE_HEAD.into(), sse_delta("Hel")], pause_ms: 50, reset: true }).await;
    let generation = Proc::spawn("generation", &openai_model(&base_url)).await.unwrap();
    let mut client = GenerationClient::new(generation.channel().await);

    // A stream that breaks after its first chunk: the error, and its origin, come in the trailers.
    let (deltas, status) = read_stream(&mut client, "up").await;
    assert_eq!(deltas, ["Hel"]);
    let status = status.expect("the stream ends with an error");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(from_upstream(&status), "{status:?}");

    // Injected failures are the model's too, on both RPCs.
    let unary = client.generate(request("sim-error")).await.unwrap_err();
    let (_, streamed) = read_stream(&mut client, "sim-error").await;
    for status in [unary, streamed.unwrap()] {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(from_upstream(&status), "{status:?}");
    }
    // The replica's own answers are not.
    let status = client.generate(request("no-such-model")).await.unwrap_err();
    assert!(!from_upstream(&status), "{status:?}");
}

#[tokio::test]
async fn an_upstream_401_reaches_the_caller_without_its_body() {
    const SECRET: &str = "sk-live-SECRET123";
    let body = format!(
        r#"{{"error":{{"message":"Incorrect API key provided: {SECRET}. Ask http://billing.internal.corp:8080/admin"}}}}"#
    );
    let base_url =
        upstream(Script { writes: vec![json_response("401 Unauthorized", &body)], pause_ms: 0, reset: false }).await;
    let mut env = openai_model(&base_url);
    env.push(("LLMESH_E2E_UPSTREAM_KEY", SECRET.into()));
    let mesh = Mesh::start_with(MeshOptions { env, ..Default::default() }).await;

    let mut generation = mesh.generation().await;
    let status = generation.generate(request("up")).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(status.message(), "upstream authentication failed (HTTP 401)");
    assert!(from_upstream(&status), "{status:?}");

    // Through the gateway it is the mesh's failure, not the client's: a fallback answers (the
    // message, here), never FAILED_PRECONDITION; and none of the body is in it.
    let mut gateway = mesh.gateway().await;
    let answer =
        gateway.generate(GatewayRequest { model: "up".into(), prompt: "hello".into(), ..Default::default() }).await;
    let degraded = answer.as_ref().ok().and_then(|answer| answer.get_ref().degraded.clone());
    assert_eq!(degraded.map(|d| (d.reason, d.source)), Some(("error".into(), "message".into())), "{answer:?}");
    let (_, streamed) = read_stream(&mut generation, "up").await;
    let seen = format!("{answer:?} {streamed:?}");
    for leak in [SECRET, "internal.corp", "Incorrect API key", base_url.as_str()] {
        assert!(!seen.contains(leak), "{leak:?} reached the caller: {seen}");
    }
    // The detail is in generation's log, with the key scrubbed.
    let logs = mesh.generation.logs();
    assert!(logs.contains("Incorrect API key provided: ***"), "no detail in the log:\n{logs}");
    assert!(!logs.contains(SECRET), "the key is in the log:\n{logs}");
}

#[tokio::test]
async fn a_stream_past_the_size_limit_is_unavailable() {
    let base_url = upstream(Script {
        writes: std::iter::once(SSE_HEAD.to_string()).chain((0..200).map(|_| sse_delta("tick"))).collect(),
        pause_ms: 2,
        reset: false,
    })
    .await;
    let mut env = openai_model(&base_url);
    env.push(("LLMESH_GENERATION_MAX_UPSTREAM_RESPONSE_BYTES", "4096".into()));
    let generation = Proc::spawn("generation", &env).await.unwrap();
    let mut client = GenerationClient::new(generation.channel().await);
    let (deltas, status) = read_stream(&mut client, "up").await;
    let status = status.expect("the stream ends with an error");
    assert!(deltas.len() < 60, "{} chunks passed a 4 KiB limit", deltas.len());
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "upstream answer exceeds the size limit of 4096 bytes");
    assert!(from_upstream(&status), "{status:?}");
}

#[tokio::test]
async fn names_a_client_makes_up_grow_nothing() {
    let generation =
        Proc::spawn("generation", &[("LLMESH_GENERATION_ADMIN__LISTEN", "127.0.0.1:0".into())]).await.unwrap();
    let mut client = GenerationClient::new(generation.channel().await);
    // Warm up, so that the first calls' one-off allocations are in the baseline.
    assert!(client.generate(request("sim")).await.is_ok());
    let before = generation.rss_kib();
    for i in 0..50 {
        // `sim-flaky-000…0N`: a megabyte each, and each a different name for the same N.
        let model = format!("sim-flaky-{}{}", "0".repeat(1_000_000), i % 7 + 1);
        let status = client.generate(request(&model)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status.code());
        assert!(status.message().len() < 1_000, "the name was echoed: {} bytes", status.message().len());
    }
    let after = generation.rss_kib();
    assert!(after < before + 32 * 1024, "generation's RSS grew from {before} KiB to {after} KiB");

    // The metrics know one `sim-flaky` model, whatever N was asked for.
    for model in ["sim-flaky-3", "sim-flaky-5", "sim-flaky-5"] {
        let _ = client.generate(request(model)).await;
    }
    let metric = "gen_ai_client_operation_duration_seconds_count";
    let family = generation.metric_sum(metric, "gen_ai_request_model=\"sim-flaky\"").await;
    assert_eq!(family, 3.0, "sim-flaky-N calls under one label");
    assert_eq!(generation.metric_sum(metric, "sim-flaky-").await, 0.0, "a label per N");
    assert_eq!(generation.metric_sum(metric, "000").await, 0.0, "a made-up name became a label");
}

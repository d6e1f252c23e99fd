//! One trace across the mesh, and the metrics, received by an OTLP collector written here.

use std::time::Duration;

use llmesh_e2e::{Mesh, MeshOptions, eventually, otlp};
use llmesh_proto::{common::v1::CachePolicy, gateway::v1::GenerateRequest};

use crate::{demo_keys, prompt};

#[tokio::test]
async fn one_generate_is_one_trace_across_gateway_cache_and_generation() {
    let (collector, received) = otlp::receiver().await;
    // With auth on: the caller's API key must not reach any span.
    let (key, keys_file) = demo_keys();
    let mut env = telemetry_env(format!("http://{collector}"));
    env.push(("LLMESH_GATEWAY_AUTH__KEYS_FILE", keys_file));
    let mesh = Mesh::start_with(MeshOptions { env, ..Default::default() }).await;
    one_trace_arrives(&mesh, &received, Some(&key)).await;
}

/// The same through rotel (PyPI `rotel`), an OTLP collector no one here wrote: the mesh exports to
/// rotel, rotel forwards to the receiver.
#[tokio::test]
async fn the_trace_crosses_rotel_an_independent_collector() {
    let (collector, received) = otlp::receiver().await;
    let rotel = std::env::var("LLMESH_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"))
        .join("lib/python3.11/site-packages/rotel/rotel-agent");
    assert!(rotel.exists(), "{} is missing: scripts/test installs tests/python/requirements.txt", rotel.display());
    let (grpc, http) = (llmesh_e2e::free_port(), llmesh_e2e::free_port());
    let _rotel = tokio::process::Command::new(&rotel)
        .args(["start", "--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
        .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http}")])
        .args(["--exporter", "otlp", "--otlp-exporter-protocol", "grpc"])
        .args(["--otlp-exporter-endpoint", &format!("http://{collector}"), "--batch-timeout", "100ms"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ready = eventually(Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", grpc)).await.ok().map(drop)
    })
    .await;
    assert!(ready.is_some(), "rotel did not start");
    let options = MeshOptions { env: telemetry_env(format!("http://127.0.0.1:{grpc}")), ..Default::default() };
    let mesh = Mesh::start_with(options).await;
    one_trace_arrives(&mesh, &received, None).await;
}

fn telemetry_env(endpoint: String) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300".into()),
        ("OTEL_LOGS_EXPORTER", "none".into()),
    ]
}

/// One Generate with a client traceparent: spans from gateway, cache and generation in that trace,
/// with the right parents and GenAI attributes, no prompt text, and the metrics by name.
async fn one_trace_arrives(mesh: &Mesh, received: &otlp::Received, api_key: Option<&str>) {
    // The client starts the trace; the gateway continues it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(GenerateRequest { cache: CachePolicy::Default.into(), ..prompt("trace me") });
    request.metadata_mut().insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap());
    if let Some(key) = api_key {
        request.metadata_mut().insert("x-api-key", key.parse().unwrap());
    }
    mesh.gateway().await.generate(request).await.unwrap();

    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let spans = eventually(Duration::from_secs(10), || {
        let received = received.clone();
        async move {
            let spans: Vec<_> = received.spans().into_iter().filter(|s| hex(&s.span.trace_id) == trace_id).collect();
            let services: std::collections::BTreeSet<_> = spans.iter().map(|s| s.service.clone()).collect();
            let expected = ["llmesh-cache", "llmesh-gateway", "llmesh-generation"];
            // Every span the checks below look at: a server span ends after its children, so it
            // may come in a later export batch than they do.
            let server_spans = ["llmesh-cache", "llmesh-generation"]
                .iter()
                .all(|e| spans.iter().any(|s| s.service == *e && s.span.kind == 2));
            let gateway_root = spans.iter().any(|s| hex(&s.span.parent_span_id) == "00f067aa0ba902b7");
            (expected.iter().all(|e| services.contains(*e))
                && server_spans
                && gateway_root
                && spans.iter().any(|s| s.span.name == "chat sim"))
            .then_some(spans)
        }
    })
    .await
    .unwrap_or_else(|| panic!("spans of the trace never arrived from every service: {:#?}", received.spans()));

    let by_id: std::collections::HashMap<String, &otlp::ReceivedSpan> =
        spans.iter().map(|s| (hex(&s.span.span_id), s)).collect();
    let parent_service =
        |span: &otlp::ReceivedSpan| by_id.get(&hex(&span.span.parent_span_id)).map(|p| p.service.clone());
    // The gateway's server span continues the client's span.
    let gateway_root = spans
        .iter()
        .find(|s| s.service == "llmesh-gateway" && hex(&s.span.parent_span_id) == "00f067aa0ba902b7")
        .expect("the gateway continues the client's traceparent");
    assert!(gateway_root.span.name.contains("Generate"), "{:?}", gateway_root.span.name);
    // Cache and generation server spans are children of gateway spans.
    for service in ["llmesh-cache", "llmesh-generation"] {
        let server = spans.iter().find(|s| s.service == service && s.span.kind == 2).expect("a server span");
        assert_eq!(parent_service(server).as_deref(), Some("llmesh-gateway"), "{service}'s parent");
    }
    // The GenAI span sits in generation, under its server span, with the GenAI attributes.
    let chat = spans.iter().find(|s| s.span.name == "chat sim").unwrap();
    assert_eq!(chat.service, "llmesh-generation");
    let attributes: Vec<&str> = chat.span.attributes.iter().map(|a| a.key.as_str()).collect();
    for key in
        ["gen_ai.operation.name", "gen_ai.request.model", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"]
    {
        assert!(attributes.contains(&key), "{key} missing from {attributes:?}");
    }
    // The prompt stays off the spans, and so does the key (its secret part or any of it).
    assert!(spans.iter().all(|s| !format!("{:?}", s.span.attributes).contains("trace me")));
    if let Some(key) = api_key {
        let secret = key.rsplit('_').next().unwrap();
        assert!(spans.iter().all(|s| !format!("{:?}", s.span).contains(secret)), "the API key reached a span");
    }

    let metrics = eventually(Duration::from_secs(10), || {
        let received = received.clone();
        async move {
            let gateway = received.metric_names("llmesh-gateway");
            let generation = received.metric_names("llmesh-generation");
            let want_gateway = ["llm_requests", "llm_response_time", "llm_active_requests", "llmesh.cache.requests"];
            let want_generation =
                ["gen_ai.client.operation.duration", "gen_ai.client.token.usage", "gen_ai.server.time_to_first_token"];
            (want_gateway.iter().all(|m| gateway.iter().any(|g| g == m))
                && want_generation.iter().all(|m| generation.iter().any(|g| g == m)))
            .then_some((gateway, generation))
        }
    })
    .await;
    assert!(metrics.is_some(), "metrics never arrived: gateway {:?}", received.metric_names("llmesh-gateway"));
}

#[tokio::test]
async fn a_dead_collector_slows_nothing() {
    let dead = format!("http://127.0.0.1:{}", llmesh_e2e::free_port());
    let options = MeshOptions { env: vec![("OTEL_EXPORTER_OTLP_ENDPOINT", dead)], ..Default::default() };
    let mesh = Mesh::start_with(options).await;
    let mut gateway = mesh.gateway().await;
    let started = std::time::Instant::now();
    for i in 0..50 {
        gateway.generate(prompt(&format!("nobody is collecting {i}"))).await.unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(5), "50 calls took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_job_continues_the_trace_of_its_submission() {
    let redis = llmesh_e2e::Redis::start().await.unwrap();
    let (collector, received) = otlp::receiver().await;
    let mut env = telemetry_env(format!("http://{collector}"));
    env.push(("LLMESH_GATEWAY_QUEUE__REDIS_URL", redis.url()));
    env.push(("LLMESH_GENERATION_QUEUE__REDIS_URL", redis.url()));
    let mesh = Mesh::start_with(MeshOptions { env, ..Default::default() }).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut request = tonic::Request::new(llmesh_proto::gateway::v1::SubmitJobRequest {
        model: "sim".into(),
        prompt: "a traced job".into(),
        ..Default::default()
    });
    request.metadata_mut().insert("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01").parse().unwrap());
    mesh.gateway().await.submit_job(request).await.unwrap();

    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let job_span = eventually(Duration::from_secs(10), || {
        let received = received.clone();
        async move {
            received.spans().into_iter().find(|s| {
                s.service == "llmesh-generation" && s.span.name == "job.run" && hex(&s.span.trace_id) == trace_id
            })
        }
    })
    .await;
    assert!(job_span.is_some(), "the worker's span is not in the submission's trace: {:#?}", received.spans());
    // Its GenAI span is part of the same trace.
    let chat =
        eventually(Duration::from_secs(5), || {
            let received = received.clone();
            async move {
                received.spans().into_iter().find(|s| s.span.name == "chat sim" && hex(&s.span.trace_id) == trace_id)
            }
        })
        .await;
    assert!(chat.is_some());
}

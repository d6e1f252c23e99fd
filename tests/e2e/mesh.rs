//! The happy path across processes: gateway → cache → generation, and the health picture.

use std::time::Duration;

use llmesh_e2e::{Mesh, MeshOptions, eventually};
use llmesh_proto::{
    common::v1::{CachePolicy, FinishReason},
    gateway::v1::{GenerateRequest, GenerateStreamRequest, ListModelsRequest},
    health::v1::{ServingStatus, StatusRequest, mesh_health_client::MeshHealthClient},
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response, health_client::HealthClient};

use crate::{chunks, prompt, stream_prompt};

#[tokio::test]
async fn generate_then_cached() {
    let mesh = Mesh::start().await;
    let mut gateway = mesh.gateway().await;

    let first = gateway.generate(prompt("what is a service mesh?")).await.unwrap().into_inner();
    assert!(!first.text.is_empty());
    assert!(!first.cached);
    assert_eq!(first.provider, "sim");
    assert_eq!(first.finish_reason, i32::from(FinishReason::Stop));
    let usage = first.usage.unwrap();
    assert_eq!(usage.prompt_tokens, 5);
    assert_eq!(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);

    // The gateway stores in the background, within a 20 ms budget; the identical request soon
    // comes from the cache. On a loaded machine the first store may miss its budget, so the hit
    // may be a later generation's answer: it must be one generation gave, not a new one.
    let generated = std::sync::Arc::new(std::sync::Mutex::new(vec![first.id.clone()]));
    let second = eventually(Duration::from_secs(3), || {
        let (mut gateway, generated) = (gateway.clone(), generated.clone());
        async move {
            let answer = gateway.generate(prompt("what is a service mesh?")).await.unwrap().into_inner();
            if !answer.cached {
                generated.lock().unwrap().push(answer.id.clone());
            }
            Some(answer).filter(|r| r.cached)
        }
    })
    .await
    .expect("second identical request served from cache");
    assert_eq!(second.text, first.text);
    assert!(generated.lock().unwrap().contains(&second.id), "the hit {} was never generated", second.id);
    assert_eq!(second.usage, first.usage);

    // A different request is not.
    let other = gateway.generate(prompt("something else")).await.unwrap().into_inner();
    assert!(!other.cached);
    assert_ne!(other.text, first.text);
}

#[tokio::test]
async fn cache_policies() {
    let mesh = Mesh::start().await;
    let mut gateway = mesh.gateway().await;
    let with = |policy: CachePolicy| GenerateRequest { cache: policy.into(), ..prompt("policies") };

    let status = gateway.generate(with(CachePolicy::OnlyIfCached)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    // BYPASS neither reads nor writes.
    gateway.generate(with(CachePolicy::Bypass)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gateway.generate(with(CachePolicy::OnlyIfCached)).await.unwrap_err().code(), Code::NotFound);

    // REFRESH writes without reading; then ONLY_IF_CACHED finds it.
    let fresh = gateway.generate(with(CachePolicy::Refresh)).await.unwrap().into_inner();
    assert!(!fresh.cached);
    let hit = eventually(Duration::from_secs(3), || {
        let mut gateway = gateway.clone();
        async move { gateway.generate(with(CachePolicy::OnlyIfCached)).await.ok().map(|r| r.into_inner()) }
    })
    .await
    .expect("entry written by REFRESH");
    assert!(hit.cached);
    assert_eq!(hit.text, fresh.text);
}

#[tokio::test]
async fn stream_relays_chunks_and_replays_from_cache() {
    let mesh = Mesh::start().await;
    let mut gateway = mesh.gateway().await;

    let unary = mesh
        .generation()
        .await
        .generate(llmesh_proto::generation::v1::GenerateRequest::from(prompt("stream me")))
        .await
        .unwrap()
        .into_inner();
    let first = chunks(&mut gateway, stream_prompt("stream me")).await;
    assert!(first.len() > 2, "{first:?}");
    let (last, deltas) = first.split_last().unwrap();
    assert!(deltas.iter().all(|c| c.finish_reason == i32::from(FinishReason::Unspecified) && !c.cached));
    assert_eq!(last.finish_reason, i32::from(FinishReason::Stop));
    assert_eq!(last.usage.unwrap().completion_tokens as usize, deltas.len());
    let text: String = deltas.iter().map(|c| c.delta.as_str()).collect();
    assert_eq!(text, unary.text, "streamed and unary answers differ");

    let replay =
        eventually(Duration::from_secs(3), || {
            let mut gateway = gateway.clone();
            async move {
                Some(chunks(&mut gateway, stream_prompt("stream me")).await).filter(|c| c.iter().all(|c| c.cached))
            }
        })
        .await
        .expect("stream replayed from cache");
    let replayed: Vec<&str> = replay.iter().map(|c| c.delta.as_str()).collect();
    let original: Vec<&str> = first.iter().map(|c| c.delta.as_str()).collect();
    assert_eq!(replayed, original, "replay keeps the chunk boundaries");
    assert_eq!(replay.last().unwrap().usage, last.usage);

    // A unary call for the same request is a hit too: one cache, both shapes. (A lookup past its
    // 20 ms budget on a loaded machine is a miss by design, so this gets a few tries too.)
    let unary_hit = eventually(Duration::from_secs(3), || {
        let mut gateway = gateway.clone();
        async move { gateway.generate(prompt("stream me")).await.ok().filter(|r| r.get_ref().cached) }
    })
    .await
    .expect("the streamed answer serves a unary call from cache")
    .into_inner();
    assert_eq!(unary_hit.text, text);
}

#[tokio::test]
async fn stream_length_limit() {
    let mesh = Mesh::start().await;
    let mut gateway = mesh.gateway().await;
    let mut request = stream_prompt("short one");
    request.max_tokens = 3;
    let got = chunks(&mut gateway, request).await;
    let last = got.last().unwrap();
    assert_eq!(last.finish_reason, i32::from(FinishReason::Length));
    assert_eq!(last.usage.unwrap().completion_tokens, 3);
    assert_eq!(got.len(), 4);
}

#[tokio::test]
async fn list_models() {
    let mesh = Mesh::start().await;
    let models = mesh.gateway().await.list_models(ListModelsRequest {}).await.unwrap().into_inner().models;
    let sim = models.iter().find(|m| m.name == "sim").expect("sim listed");
    assert_eq!(sim.provider, "sim");
    assert!(sim.deterministic);
}

#[tokio::test]
async fn deadlines_end_slow_calls() {
    // A model whose first token takes ten minutes, and a gateway whose own limit is 300 ms: only a
    // deadline can end these calls within the test. Each is given 20 s, far beyond its deadline,
    // so a loaded host cannot fail the test; a deadline that did not work would.
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GENERATION_MODELS__SLOW__PROVIDER", "sim".into()),
            ("LLMESH_GENERATION_MODELS__SLOW__TIME_TO_FIRST_TOKEN_MS", "600000".into()),
            ("LLMESH_GATEWAY_REQUEST_TIMEOUT_MS", "300".into()),
            ("LLMESH_GATEWAY_FALLBACK__ENABLED", "false".into()),
        ],
        redis_url: None,
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let mut gateway = mesh.gateway().await;
    let slow = || GenerateRequest { model: "slow".into(), ..prompt("slow please") };

    let status = tokio::time::timeout(Duration::from_secs(20), gateway.generate(slow()))
        .await
        .expect("a unary call was not ended by its deadline")
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // The gateway waits for generation's first chunk before answering, so the status may come as
    // the call's own or as the stream's first message.
    let stream = async {
        match gateway.generate_stream(GenerateStreamRequest::from_gateway(slow())).await {
            Err(status) => status,
            Ok(stream) => stream.into_inner().message().await.unwrap_err(),
        }
    };
    let status =
        tokio::time::timeout(Duration::from_secs(20), stream).await.expect("a stream was not ended by its deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // A client deadline shorter than the gateway's ends the call too. (tonic's client reports its
    // own expiry as CANCELLED; grpcio and grpc-go say DEADLINE_EXCEEDED.)
    let mut request = tonic::Request::new(slow());
    request.set_timeout(Duration::from_millis(100));
    let status = tokio::time::timeout(Duration::from_secs(20), gateway.generate(request))
        .await
        .expect("a call with a client deadline was not ended by it")
        .unwrap_err();
    assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{status:?}");

    // The gateway is still fine afterwards.
    assert!(gateway.generate(prompt("after the deadline")).await.is_ok());
}

#[tokio::test]
async fn every_service_reports_health_and_the_mesh_is_serving() {
    // The operator's token, which the health service presents to see where the replicas are.
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "operator-secret\n").unwrap();
    let token_file = token.path().display().to_string();
    let env = vec![
        ("LLMESH_GATEWAY_ADMIN__BEARER_TOKEN_FILE", token_file.clone()),
        ("LLMESH_HEALTH_ADMIN__BEARER_TOKEN_FILE", token_file),
    ];
    let mesh = Mesh::start_with(MeshOptions { env, ..Default::default() }).await;
    for (proc, service) in [
        (&mesh.gateway, "llmesh.gateway.v1.Gateway"),
        (&mesh.generation, "llmesh.generation.v1.Generation"),
        (&mesh.cache, "llmesh.cache.v1.Cache"),
        (&mesh.health, "llmesh.health.v1.MeshHealth"),
    ] {
        let mut client = HealthClient::new(proc.channel().await);
        let status = client.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(status.status(), health_check_response::ServingStatus::Serving, "{service}");
    }

    let mut health = HealthClient::new(mesh.health.channel().await);
    let serving = eventually(Duration::from_secs(5), || {
        let mut health = health.clone();
        async move {
            let status = health.check(HealthCheckRequest { service: String::new() }).await.ok()?.into_inner();
            (status.status() == health_check_response::ServingStatus::Serving).then_some(())
        }
    })
    .await;
    assert!(serving.is_some(), "the mesh never became SERVING");
    let per_service = health.check(HealthCheckRequest { service: "llmesh.cache.v1.Cache".into() }).await.unwrap();
    assert_eq!(per_service.into_inner().status(), health_check_response::ServingStatus::Serving);

    let status = mesh.mesh_health().await.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.status(), ServingStatus::Serving);
    let mut names: Vec<&str> = status.components.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    // The three services, and the generation replica as the gateway sees it (its breaker).
    assert_eq!(names, ["cache", "gateway", "generation", "generation-breaker"]);
    let breaker = status.components.iter().find(|c| c.name == "generation-breaker").unwrap();
    assert_eq!(breaker.status(), ServingStatus::Serving);
    assert_eq!(breaker.address, mesh.generation.uri());
    assert!(breaker.detail.contains("circuit breaker closed"), "{breaker:?}");

    // Asked on the public port, the gateway shows where its replicas are to the operator only.
    let gateway = mesh.gateway.channel().await;
    let replica_address = |token: Option<&'static str>| {
        let mut client = MeshHealthClient::new(gateway.clone());
        async move {
            let mut request = tonic::Request::new(StatusRequest {});
            if let Some(token) = token {
                request.metadata_mut().insert("authorization", token.parse().unwrap());
            }
            let status = client.status(request).await.unwrap().into_inner();
            let replica = status.components.iter().find(|c| c.name == "generation-breaker").unwrap();
            assert_eq!(replica.status(), ServingStatus::Serving, "{status:?}");
            replica.address.clone()
        }
    };
    assert_eq!(replica_address(Some("Bearer operator-secret")).await, mesh.generation.uri());
    for not_the_operator in [None, Some("Bearer guess"), Some("operator-secret")] {
        assert_eq!(replica_address(not_the_operator).await, "", "{not_the_operator:?}");
    }
}

#[tokio::test]
async fn health_sees_a_dead_service() {
    let mut mesh = Mesh::start().await;
    let mut watch =
        mesh.mesh_health().await.watch(llmesh_proto::health::v1::WatchRequest {}).await.unwrap().into_inner();
    mesh.cache.kill().await;
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(update) = watch.message().await.unwrap() {
            let status = update.status.unwrap();
            let cache = status.components.iter().find(|c| c.name == "cache").cloned();
            if status.status() == ServingStatus::NotServing
                && cache.is_some_and(|c| c.status() == ServingStatus::NotServing && !c.detail.is_empty())
            {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "Watch never reported the dead cache");
    let mut health = HealthClient::new(mesh.health.channel().await);
    let mesh_status = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(mesh_status.status(), health_check_response::ServingStatus::NotServing);

    // The gateway keeps answering without its cache.
    let answer = mesh.gateway().await.generate(prompt("no cache")).await;
    let answer = answer.unwrap_or_else(|e| panic!("{e:?}\nGATEWAY LOGS:\n{}", mesh.gateway.logs())).into_inner();
    assert!(!answer.cached);
}

trait FromGateway {
    fn from_gateway(request: GenerateRequest) -> Self;
}

impl FromGateway for GenerateStreamRequest {
    fn from_gateway(request: GenerateRequest) -> Self {
        // Same field numbers (crates/proto/src/convert.rs).
        prost::Message::decode(prost::Message::encode_to_vec(&request).as_slice()).unwrap()
    }
}

//! One tenant cannot starve or blind another, through the real gateway: failures are charged to
//! the model whose upstream failed (not to the replica, not to other models), a client's own
//! deadline counts against nothing, the fallback's secondary model obeys the key and is charged,
//! one key holding its bound of streams leaves room for the others, a stale answer and a model
//! list keep to what the key may read, and one key's degraded answer is not handed to another.

use std::time::Duration;

use llmesh_e2e::{Mesh, MeshOptions, Redis, eventually, free_port};
use llmesh_proto::{
    cache::v1::StoreRequest,
    common::v1::{CachePolicy, FinishReason},
    gateway::v1::{
        GenerateRequest, ListModelsRequest, SubmitJobRequest, WatchJobRequest, gateway_client::GatewayClient,
    },
    generation::v1::GenerateResponse,
    health::v1::{ServingStatus, StatusRequest, mesh_health_client::MeshHealthClient},
};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response, health_client::HealthClient};

use crate::{
    generation_hardening::{Script, json_response, openai_model, upstream},
    prompt, stream_prompt,
};

/// A request that always reaches generation (no cache).
fn fresh(model: &str, text: &str) -> GenerateRequest {
    GenerateRequest { model: model.into(), cache: CachePolicy::Bypass.into(), ..prompt(text) }
}

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-api-key", key.parse().unwrap());
    request
}

/// A key for `id` and its entry as an inline TOML table, with `extra` fields.
fn key(id: &str, extra: &str) -> (String, String) {
    let (key, entry) = llmesh_keys::generate_key(id);
    let table = format!(r#"{{id="{}",prefix="{}",sha256="{}"{extra}}}"#, entry.id, entry.prefix, entry.sha256);
    (key, table)
}

/// Whether every `sim` call now comes back undegraded.
async fn sim_is_served(gateway: &mut GatewayClient<Channel>, round: usize) -> bool {
    for i in 0..5 {
        let answer = gateway.generate(fresh("sim", &format!("other model {round} {i}"))).await.unwrap().into_inner();
        if answer.degraded.is_some() {
            return false;
        }
    }
    true
}

/// Checks the gateway's own view (every replica's breaker closed, `dead`'s open) and the health
/// service's `grpc.health.v1` answer for the whole mesh (SERVING).
async fn replicas_serve_and_model_is_open(mesh: &Mesh, dead: &str) {
    let mut view = MeshHealthClient::new(mesh.gateway.channel().await);
    let status = view.status(StatusRequest {}).await.unwrap().into_inner();
    let replicas: Vec<_> = status.components.iter().filter(|c| c.name == "generation-breaker").collect();
    assert_eq!(replicas.len(), 2, "{status:?}");
    assert!(replicas.iter().all(|c| c.status() == ServingStatus::Serving), "a replica was blamed: {status:?}");
    assert_ne!(status.status(), ServingStatus::NotServing, "{status:?}");
    let models: Vec<_> = status.components.iter().filter(|c| c.name == "generation-model-breaker").collect();
    assert!(
        models.iter().any(|c| c.detail == format!("model {dead}: circuit breaker open")),
        "MeshHealth shows the model's breaker: {status:?}"
    );
    let mut health = HealthClient::new(mesh.health.channel().await);
    let serving = eventually(Duration::from_secs(5), || {
        let mut health = health.clone();
        async move {
            let answer = health.check(HealthCheckRequest { service: String::new() }).await.ok()?.into_inner();
            (answer.status() == health_check_response::ServingStatus::Serving).then_some(())
        }
    })
    .await;
    assert!(serving.is_some(), "the health service does not say the mesh is SERVING");
    let _ = health.check(HealthCheckRequest { service: String::new() }).await;
}

#[tokio::test]
async fn a_dead_upstream_for_one_model_degrades_that_model_only() {
    // `dead` is an OpenAI-compatible model whose endpoint refuses connections; `sim-error` is the
    // fault model that always fails upstream. Two replicas, so the calls spread and retry.
    let refused = format!("http://127.0.0.1:{}/v1", free_port());
    let dead_model = vec![
        ("LLMESH_GENERATION_MODELS__DEAD__PROVIDER", "openai".to_string()),
        ("LLMESH_GENERATION_MODELS__DEAD__BASE_URL", refused),
        ("LLMESH_GENERATION_MODELS__DEAD__UPSTREAM_MODEL", "gpt-4o-mini".to_string()),
    ];
    let options = MeshOptions { env: dead_model.clone(), replicas: vec![dead_model], ..Default::default() };
    let mesh = Mesh::start_with(options).await;
    let mut gateway = mesh.gateway().await;

    for dead in ["sim-error", "dead"] {
        let mut reasons = Vec::new();
        for i in 0..30 {
            let answer = gateway.generate(fresh(dead, &format!("doomed {i}"))).await.unwrap().into_inner();
            assert_eq!(answer.finish_reason, i32::from(FinishReason::Fallback), "{answer:?}");
            reasons.push(answer.degraded.unwrap().reason);
        }
        assert!(reasons.iter().any(|r| r == "circuit_open"), "the model's breakers never opened: {reasons:?}");
        assert!(sim_is_served(&mut gateway, 0).await, "a dead upstream for {dead} degraded sim");
        replicas_serve_and_model_is_open(&mesh, dead).await;
    }
    // Streams of the other model too.
    let chunks = crate::chunks(&mut gateway, stream_prompt("a stream of another model")).await;
    assert!(chunks.iter().all(|c| c.degraded.is_none()), "{chunks:?}");
}

/// The gateway's DEADLINE_EXCEEDED, or the client's own timer when it fires first (the gateway
/// answers 5 ms before the client's deadline; a loaded machine can take longer than that).
fn gave_up(status: &tonic::Status) -> bool {
    status.code() == Code::DeadlineExceeded
        || (status.code() == Code::Cancelled && status.message() == "Timeout expired")
}

#[tokio::test]
async fn a_clients_own_deadline_counts_against_nothing() {
    let mesh = Mesh::start().await;
    let mut gateway = mesh.gateway().await;
    // sim-slow takes 2 s to its first token; each client gives up after 100 ms, on streams and
    // unary calls alike. None of that is the replica's fault, nor the model's.
    for i in 0..8 {
        let mut stream = tonic::Request::new(llmesh_proto::gateway::v1::GenerateStreamRequest {
            model: "sim-slow".into(),
            cache: CachePolicy::Bypass.into(),
            ..stream_prompt(&format!("impatient stream {i}"))
        });
        stream.set_timeout(Duration::from_millis(100));
        let status = gateway.generate_stream(stream).await.map(drop).unwrap_err();
        assert!(gave_up(&status), "{status:?}");
        let mut unary = tonic::Request::new(fresh("sim-slow", &format!("impatient call {i}")));
        unary.set_timeout(Duration::from_millis(100));
        let status = gateway.generate(unary).await.unwrap_err();
        assert!(gave_up(&status), "{status:?}");
    }
    assert!(sim_is_served(&mut gateway, 0).await, "a client's deadline opened the replica's breaker");
    let patient = gateway.generate(fresh("sim-slow", "a patient caller")).await.unwrap().into_inner();
    assert!(patient.degraded.is_none(), "a client's deadline opened sim-slow's breaker: {patient:?}");
    let mut view = MeshHealthClient::new(mesh.gateway.channel().await);
    let status = view.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.status(), ServingStatus::Serving, "{status:?}");
}

#[tokio::test]
async fn the_secondary_model_obeys_the_key_and_is_charged() {
    let (narrow, narrow_entry) = key("narrow", r#",models=["sim-error"]"#);
    let (wide, wide_entry) = key("wide", r#",models=["sim-error","sim"]"#);
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_AUTH__KEYS", format!("[{narrow_entry},{wide_entry}]")),
            ("LLMESH_GATEWAY_FALLBACK__SECONDARY_MODEL", "sim".into()),
            ("LLMESH_GATEWAY_RATE_LIMIT__TOKENS_PER_MINUTE", "1000".into()),
            ("LLMESH_GATEWAY_GENERATION__RETRY__MAX_ATTEMPTS", "1".into()),
        ],
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let mut gateway = mesh.gateway().await;

    // A key that may not use the secondary model gets the message, never the model's answer.
    let answer = gateway.generate(with_key(fresh("sim-error", "refused"), &narrow)).await.unwrap().into_inner();
    let degraded = answer.degraded.unwrap();
    assert_eq!((degraded.reason.as_str(), degraded.source.as_str()), ("error", "message"));

    // A key that may use it gets its answer, and pays for it.
    let response = gateway.generate(with_key(fresh("sim-error", "allowed"), &wide)).await.unwrap();
    let remaining: u64 =
        response.metadata().get("x-ratelimit-remaining-tokens").unwrap().to_str().unwrap().parse().unwrap();
    let answer = response.into_inner();
    assert_eq!(answer.degraded.as_ref().unwrap().source, "secondary_model", "{answer:?}");
    assert_eq!(answer.model, "sim");
    let used = u64::from(answer.usage.unwrap().total_tokens);
    assert!(used > 0);
    // Tokens flow back at about 17 a second: allow a couple for the time the call took.
    assert!(remaining <= 1000 - used + 2, "charged {} of {used} tokens (remaining {remaining})", 1000 - remaining);
}

#[tokio::test]
async fn one_key_holding_its_bound_of_streams_leaves_room_for_another() {
    let redis = Redis::start().await.unwrap();
    let (greedy, greedy_entry) = key("greedy", "");
    let (polite, polite_entry) = key("polite", "");
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_AUTH__KEYS", format!("[{greedy_entry},{polite_entry}]")),
            ("LLMESH_GATEWAY_SHED__MAX_CONCURRENCY", "4".into()),
            ("LLMESH_GATEWAY_SHED__MAX_IN_FLIGHT_PER_KEY", "2".into()),
            ("LLMESH_GATEWAY_QUEUE__REDIS_URL", redis.url()),
            ("LLMESH_GENERATION_QUEUE__REDIS_URL", redis.url()),
        ],
        redis_url: None,
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let mut gateway = mesh.gateway().await;
    // A slow job to watch: sim-slow takes 2 s to its first token and then streams for seconds.
    let job = SubmitJobRequest { model: "sim-slow".into(), prompt: "take your time".into(), ..Default::default() };
    let job = gateway.submit_job(with_key(job, &greedy)).await.unwrap().into_inner().job.unwrap();

    // The greedy key opens as many watches as the whole gateway has room for.
    let mut watches = Vec::new();
    let mut refused = 0;
    for _ in 0..4 {
        match gateway.watch_job(with_key(WatchJobRequest { job_id: job.id.clone() }, &greedy)).await {
            Ok(stream) => watches.push(stream.into_inner()),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.metadata().get("grpc-retry-pushback-ms").is_some(), "a retry hint: {status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((watches.len(), refused), (2, 2), "the greedy key got more than its bound");
    // Another key is still served.
    let answer = gateway.generate(with_key(fresh("sim", "my turn"), &polite)).await.unwrap().into_inner();
    assert!(answer.degraded.is_none());
    drop(watches);
}

#[tokio::test]
async fn huge_fields_are_refused_and_grow_no_service() {
    let redis = Redis::start().await.unwrap();
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_QUEUE__REDIS_URL", redis.url()),
            ("LLMESH_GENERATION_QUEUE__REDIS_URL", redis.url()),
        ],
        redis_url: None,
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let mut gateway = mesh.gateway().await;
    let services = [&mesh.gateway, &mesh.generation, &mesh.cache, &mesh.health];
    // Warm up, so the allocators have what a normal call needs.
    gateway.generate(fresh("sim", "warm up")).await.unwrap();
    let before: Vec<u64> = services.iter().map(|s| s.rss_kib()).collect();

    let huge = "x".repeat(1 << 20);
    for i in 0..50 {
        let status = match i % 5 {
            0 => gateway.generate(fresh(&format!("{huge}{i}"), "a 1 MB model name")).await.unwrap_err(),
            1 => gateway
                .generate(GenerateRequest { user: huge.clone(), ..fresh("sim", "a 1 MB user") })
                .await
                .unwrap_err(),
            2 => {
                let metadata = [("k".to_string(), huge.clone())].into();
                gateway.generate(GenerateRequest { metadata, ..fresh("sim", "1 MB of metadata") }).await.unwrap_err()
            }
            3 => {
                let stream = llmesh_proto::gateway::v1::GenerateStreamRequest {
                    stop: vec![huge.clone()],
                    ..stream_prompt("a 1 MB stop")
                };
                gateway.generate_stream(stream).await.map(drop).unwrap_err()
            }
            _ => {
                let job = SubmitJobRequest {
                    model: "sim".into(),
                    prompt: "a 1 MB idempotency key".into(),
                    idempotency_key: huge.clone(),
                    ..Default::default()
                };
                gateway.submit_job(job).await.unwrap_err()
            }
        };
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "call {i}: {}",
            &status.message()[..status.message().len().min(200)]
        );
        assert!(status.message().len() < 512, "call {i} echoed the value back ({} bytes)", status.message().len());
    }
    assert!(gateway.generate(fresh("sim", "still serving")).await.is_ok());
    for (service, before) in services.iter().zip(before) {
        let after = service.rss_kib();
        assert!(after < before + 32 * 1024, "{} grew from {before} KiB to {after} KiB", service.name);
    }
}

#[tokio::test]
async fn a_key_can_keep_its_cache_to_itself_or_off() {
    let (a, a_entry) = key("a", "");
    let (b, b_entry) = key("b", "");
    let (private, private_entry) = key("private", r#",cache="private""#);
    let (off, off_entry) = key("off", r#",cache="off""#);
    let keys = format!("[{a_entry},{b_entry},{private_entry},{off_entry}]");
    let mesh =
        Mesh::start_with(MeshOptions { env: vec![("LLMESH_GATEWAY_AUTH__KEYS", keys)], ..Default::default() }).await;
    let mut gateway = mesh.gateway().await;
    fn ask(key: &str) -> tonic::Request<GenerateRequest> {
        with_key(prompt("the same question"), key)
    }

    // The store after a miss runs in the background: ask until it has landed (bounded).
    let shared = gateway.clone();
    let cached_for = |key: String| {
        let gateway = shared.clone();
        eventually(Duration::from_secs(5), move || {
            let (mut gateway, key) = (gateway.clone(), key.clone());
            async move { gateway.generate(ask(&key)).await.ok()?.into_inner().cached.then_some(()) }
        })
    };
    // Shared by default: an equal request of another key is answered from the cache.
    assert!(!gateway.generate(ask(&a)).await.unwrap().into_inner().cached);
    assert!(cached_for(b.clone()).await.is_some(), "shared keys share the cache");
    // A private key neither reads the shared entry nor lets others read its own.
    assert!(!gateway.generate(ask(&private)).await.unwrap().into_inner().cached, "read a shared entry");
    assert!(cached_for(private.clone()).await.is_some(), "its own entry is kept");
    // Off: never cached.
    for _ in 0..2 {
        assert!(!gateway.generate(ask(&off)).await.unwrap().into_inner().cached);
    }
    let only_cached = GenerateRequest { cache: CachePolicy::OnlyIfCached.into(), ..prompt("the same question") };
    assert_eq!(gateway.generate(with_key(only_cached, &off)).await.unwrap_err().code(), Code::NotFound);
    // Nobody can name another key's scope.
    let sneaky = GenerateRequest {
        metadata: [("llmesh.cache_scope".to_string(), "private".to_string())].into(),
        ..prompt("the same question")
    };
    let status = gateway.generate(with_key(sneaky, &a)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("metadata"), "{status:?}");
}

#[tokio::test]
async fn a_stale_answer_goes_only_to_a_request_that_may_read_the_cache() {
    let (shared, shared_entry) = key("shared", "");
    let (off, off_entry) = key("off", r#",cache="off""#);
    let (narrow, narrow_entry) = key("narrow", r#",models=["sim-error"]"#);
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_AUTH__KEYS", format!("[{shared_entry},{off_entry},{narrow_entry}]")),
            ("LLMESH_GATEWAY_GENERATION__RETRY__MAX_ATTEMPTS", "1".into()),
        ],
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let mut gateway = mesh.gateway().await;

    // An answer the cache kept for a request to a model that now fails, already past its TTL.
    let request = GenerateRequest { model: "sim-error".into(), ..prompt("kept from better days") };
    let kept = GenerateResponse {
        text: "an old answer".into(),
        model: "sim-error".into(),
        finish_reason: FinishReason::Stop.into(),
        ..Default::default()
    };
    let store = StoreRequest { request: Some(request.clone().into()), response: Some(kept), chunks: vec![], ttl_ms: 1 };
    let stored = mesh.cache().await.store(store).await.unwrap().into_inner();
    assert!(stored.stored, "{stored:?}");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let source =
        |answer: &llmesh_proto::gateway::v1::GenerateResponse| answer.degraded.as_ref().map(|d| d.source.clone());

    // A request that may read the cache gets the stale answer, marked as such.
    let answer = gateway.generate(with_key(request.clone(), &shared)).await.unwrap().into_inner();
    assert_eq!(source(&answer).as_deref(), Some("stale_cache"), "{answer:?}");
    assert_eq!(answer.text, "an old answer");
    // One that asked not to read it, or whose key's answers are never cached, gets the message.
    for (policy, key) in [(CachePolicy::Bypass, &shared), (CachePolicy::Refresh, &shared), (CachePolicy::Default, &off)]
    {
        let asked = GenerateRequest { cache: policy.into(), ..request.clone() };
        let answer = gateway.generate(with_key(asked, key)).await.unwrap().into_inner();
        assert_eq!(source(&answer).as_deref(), Some("message"), "{policy:?}: {answer:?}");
        assert_ne!(answer.text, "an old answer");
    }

    // The models a key may use, over gRPC as over HTTP.
    let models = gateway.list_models(with_key(ListModelsRequest {}, &narrow)).await.unwrap().into_inner().models;
    assert_eq!(models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["sim-error"]);
    let all = gateway.list_models(with_key(ListModelsRequest {}, &shared)).await.unwrap().into_inner().models;
    assert!(all.iter().any(|m| m.name == "sim") && all.len() > 1, "{all:?}");
}

#[tokio::test]
async fn a_degraded_answer_is_not_shared_with_an_identical_call_of_another_key() {
    // The upstream fails every call, after a pause long enough for a second call to join the first.
    let base_url = upstream(Script {
        writes: vec![String::new(), json_response("503 Service Unavailable", "{}")],
        pause_ms: 600,
        reset: false,
    })
    .await;
    let (wide, wide_entry) = key("wide", r#",models=["up","sim"]"#);
    let (narrow, narrow_entry) = key("narrow", r#",models=["up"]"#);
    let mut env = openai_model(&base_url);
    env.extend([
        ("LLMESH_E2E_UPSTREAM_KEY", "e2e".to_string()),
        ("LLMESH_GATEWAY_AUTH__KEYS", format!("[{wide_entry},{narrow_entry}]")),
        ("LLMESH_GATEWAY_FALLBACK__SECONDARY_MODEL", "sim".into()),
        ("LLMESH_GATEWAY_GENERATION__RETRY__MAX_ATTEMPTS", "1".into()),
    ]);
    let mesh = Mesh::start_with(MeshOptions { env, ..Default::default() }).await;
    let gateway = mesh.gateway().await;
    // Cacheable (a seed), so identical calls in flight at once share one generation call.
    let request = GenerateRequest { model: "up".into(), seed: Some(7), ..prompt("one question, two keys") };

    let (mut first, mut second) = (gateway.clone(), gateway.clone());
    let leader = tokio::spawn({
        let request = with_key(request.clone(), &wide);
        async move { first.generate(request).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let follower = second.generate(with_key(request, &narrow)).await.unwrap().into_inner();
    let leader = leader.await.unwrap().unwrap().into_inner();

    // The wide key's call fell back to the secondary model it may use.
    let source =
        |answer: &llmesh_proto::gateway::v1::GenerateResponse| answer.degraded.as_ref().map(|d| d.source.clone());
    assert_eq!(source(&leader).as_deref(), Some("secondary_model"), "{leader:?}");
    // The narrow key may not use it: its call got its own fallback, never the other key's answer.
    assert_eq!(source(&follower).as_deref(), Some("message"), "{follower:?}");
    assert_ne!(follower.model, "sim", "{follower:?}");
}

#[tokio::test]
async fn a_request_that_never_finishes_arriving_gives_its_slot_back_at_the_deadline() {
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_REQUEST_TIMEOUT_MS", "500".into()),
            ("LLMESH_GATEWAY_SHED__MAX_IN_FLIGHT_PER_KEY", "1".into()),
        ],
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let channel = mesh.gateway.channel().await;
    // A unary call whose one message never comes, and no grpc-timeout: tonic's own deadline does
    // not apply, the handler never runs.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/llmesh.gateway.v1.Gateway/Generate");
    let codec = tonic_prost::ProstCodec::<GenerateRequest, llmesh_proto::gateway::v1::GenerateResponse>::default();
    let never = tonic::Request::new(futures::stream::pending::<GenerateRequest>());
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(30), grpc.client_streaming(never, path, codec))
        .await
        .expect("the gateway ended the call");
    let status = ended.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(500), "not before the limit: {:?}", started.elapsed());
    // Its slot (the only one its key has) is free again.
    let answer = GatewayClient::new(channel).generate(fresh("sim", "after the stalled one")).await;
    assert!(answer.is_ok(), "{answer:?}");
}

//! Admission through real gateways: API keys, per-key limits shared across gateway replicas via
//! Redis, the local limiter when Redis dies.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use llmesh_e2e::{Mesh, MeshOptions, Proc, Redis};
use llmesh_proto::{
    common::v1::CachePolicy,
    gateway::v1::{GenerateRequest, gateway_client::GatewayClient},
};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{demo_keys, prompt};

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-api-key", key.parse().unwrap());
    request
}

#[tokio::test]
async fn api_keys_from_the_shipped_keys_file() {
    let (key, file) = demo_keys();
    let restricted = r#"[{id="sim-only",prefix="lk_00000000",sha256="0000000000000000000000000000000000000000000000000000000000000000",models=["sim"]}]"#;
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_AUTH__KEYS_FILE", file),
            ("LLMESH_GATEWAY_AUTH__KEYS", restricted.into()),
            ("LLMESH_GATEWAY_RATE_LIMIT__REQUESTS_PER_MINUTE", "1000".into()),
            ("LLMESH_GATEWAY_RATE_LIMIT__TOKENS_PER_MINUTE", "100000".into()),
        ],
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let mut gateway = mesh.gateway().await;

    let missing = gateway.generate(prompt("no key")).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(missing.message().contains("missing x-api-key"), "{missing:?}");
    let wrong = gateway.generate(with_key(prompt("bad key"), "lk_00000000_not-the-right-secret")).await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let ok = gateway.generate(with_key(prompt("good key"), &key)).await.unwrap();
    assert!(!ok.get_ref().text.is_empty());
    let remaining = |name: &str| ok.metadata().get(name).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    assert_eq!(remaining("x-ratelimit-remaining-requests"), Some(999), "{:?}", ok.metadata());
    // Reserved before the call, settled with the real usage after (tokens flow back at 1,666 a
    // second, so after a slow call the bucket may be full again).
    assert!(remaining("x-ratelimit-remaining-tokens").is_some_and(|t| t <= 100_000), "{:?}", ok.metadata());
    assert!(!mesh.gateway.logs().contains(&key), "the key leaked into the gateway's logs");

    // Probes need no key.
    let mut health = HealthClient::new(mesh.gateway.channel().await);
    assert!(health.check(HealthCheckRequest { service: String::new() }).await.is_ok());
}

#[tokio::test]
async fn a_key_limited_to_some_models() {
    let (key, entry) = {
        let (key, mut entry) = llmesh_keys::generate_key("narrow");
        entry.models = vec!["sim".into()];
        (key, entry)
    };
    let keys = format!(r#"[{{id="{}",prefix="{}",sha256="{}",models=["sim"]}}]"#, entry.id, entry.prefix, entry.sha256);
    let mesh =
        Mesh::start_with(MeshOptions { env: vec![("LLMESH_GATEWAY_AUTH__KEYS", keys)], ..Default::default() }).await;
    let mut gateway = mesh.gateway().await;
    assert!(gateway.generate(with_key(prompt("allowed"), &key)).await.is_ok());
    let other = GenerateRequest { model: "sim-slow".into(), ..prompt("not allowed") };
    let denied = gateway.generate(with_key(other, &key)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().starts_with("model"), "{denied:?}");
}

/// A second gateway process in front of `mesh`'s generation and cache.
/// Sends calls at about `per_second` to each gateway for `run`; returns (allowed, limited).
async fn hammer(gateways: &[GatewayClient<Channel>], per_second: u64, run: Duration) -> (usize, usize) {
    let (allowed, limited) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = Instant::now() + run;
    let tasks: Vec<_> = gateways
        .iter()
        .enumerate()
        .map(|(g, gateway)| {
            let (gateway, allowed, limited) = (gateway.clone(), allowed.clone(), limited.clone());
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
                let mut i = 0;
                while Instant::now() < stop && i < 100_000 {
                    ticker.tick().await;
                    let request = GenerateRequest { cache: CachePolicy::Bypass.into(), ..prompt(&format!("g{g} {i}")) };
                    match gateway.clone().generate(request).await {
                        Ok(_) => allowed.fetch_add(1, Relaxed),
                        Err(status) => {
                            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                            assert!(status.metadata().get("grpc-retry-pushback-ms").is_some(), "{status:?}");
                            limited.fetch_add(1, Relaxed)
                        }
                    };
                    i += 1;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (allowed.load(Relaxed), limited.load(Relaxed))
}

#[tokio::test]
async fn two_gateways_share_one_limit_and_fall_back_to_local_when_redis_dies() {
    let mut redis = Redis::start().await.unwrap();
    // 120 a minute: a burst of 120, then 2 a second, for the anonymous key.
    let limits = vec![
        ("LLMESH_GATEWAY_RATE_LIMIT__REDIS_URL", redis.url()),
        ("LLMESH_GATEWAY_RATE_LIMIT__REQUESTS_PER_MINUTE", "120".to_string()),
        ("LLMESH_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0".to_string()),
    ];
    let mesh = Mesh::start_with(MeshOptions { env: limits.clone(), ..Default::default() }).await;
    let other = mesh.second_gateway(&limits).await;
    let gateways = [mesh.gateway().await, GatewayClient::new(other.channel().await)];

    let run = Duration::from_secs(3);
    let (allowed, limited) = hammer(&gateways, 50, run).await;
    // One shared limit: the burst plus 2/s, not twice that.
    let expected = 120.0 + 2.0 * run.as_secs_f64();
    assert!(
        (allowed as f64 - expected).abs() <= 0.1 * expected,
        "two gateways allowed {allowed} (expected about {expected:.0}); {limited} were limited"
    );
    assert!(limited > 0);

    // Redis gone: each gateway limits on its own; calls keep being answered at once.
    redis.kill().await;
    let started = Instant::now();
    let (allowed_local, _) = hammer(&gateways[..1], 20, Duration::from_secs(1)).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(allowed_local > 0, "the local limiter let nothing through");

    // Redis back on its port, empty: both gateways return to one shared limit without a restart.
    let restarted = Instant::now();
    let _redis = Redis::start_on(redis.port).await.unwrap();
    let procs = [&mesh.gateway, &other];
    let shared_before = [redis_decisions(procs[0]).await, redis_decisions(procs[1]).await];
    let back = llmesh_e2e::eventually(Duration::from_secs(10), || {
        let gateways = gateways.clone();
        async move {
            for mut gateway in gateways {
                let _ = gateway.generate(prompt("probe")).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = [redis_decisions(procs[0]).await, redis_decisions(procs[1]).await];
            (now[0] > shared_before[0] && now[1] > shared_before[1]).then_some(())
        }
    })
    .await;
    assert!(back.is_some(), "the gateways did not go back to Redis within 10 s");
    let local_before = local_decisions(procs[0]).await + local_decisions(procs[1]).await;
    let (allowed, limited) = hammer(&gateways, 50, run).await;
    // Back on the shared limit: a decision falls back to the local limiter only when its Redis
    // call misses the time budget, which a loaded machine makes rare but not impossible.
    let local_during = local_decisions(procs[0]).await + local_decisions(procs[1]).await - local_before;
    assert!(
        local_during <= 0.02 * (allowed + limited) as f64,
        "{local_during} of {} decisions were local after Redis came back",
        allowed + limited
    );
    // One fresh bucket for both: at most its burst plus 2/s since Redis came back (each gateway
    // alone would have allowed about that much again).
    let most = 120.0 + 2.0 * restarted.elapsed().as_secs_f64();
    assert!(
        allowed as f64 <= 1.1 * most && limited > 0,
        "after Redis came back two gateways allowed {allowed} (at most about {most:.0}); {limited} were limited"
    );
}

async fn redis_decisions(gateway: &Proc) -> f64 {
    gateway.metric_sum("llmesh_ratelimit_decisions_total", "limiter=\"redis\"").await
}

async fn local_decisions(gateway: &Proc) -> f64 {
    gateway.metric_sum("llmesh_ratelimit_decisions_total", "limiter=\"local\"").await
}

#[tokio::test]
async fn a_stream_the_client_drops_pays_only_for_what_it_received() {
    let env = vec![
        ("LLMESH_GATEWAY_RATE_LIMIT__TOKENS_PER_MINUTE", "1000".to_string()),
        ("LLMESH_GENERATION_MODELS__PACED__PROVIDER", "sim".to_string()),
        ("LLMESH_GENERATION_MODELS__PACED__TOKENS_PER_SECOND", "20".to_string()),
        ("LLMESH_GENERATION_MODELS__PACED__OUTPUT_TOKENS", "400".to_string()),
    ];
    let mesh = Mesh::start_with(MeshOptions { env, ..Default::default() }).await;
    let mut gateway = mesh.gateway().await;
    let remaining = |metadata: &tonic::metadata::MetadataMap| {
        metadata.get("x-ratelimit-remaining-tokens").and_then(|v| v.to_str().ok()?.parse::<u64>().ok()).unwrap()
    };

    // A 400-token stream reserves its prompt and all 400 tokens up front.
    let request = llmesh_proto::gateway::v1::GenerateStreamRequest {
        model: "paced".into(),
        prompt: "a long answer, please".into(),
        max_tokens: 400,
        cache: CachePolicy::Bypass.into(),
        ..Default::default()
    };
    let response = gateway.generate_stream(request).await.unwrap();
    assert!(remaining(response.metadata()) < 600, "{:?}", response.metadata());
    let mut stream = response.into_inner();
    for _ in 0..2 {
        assert!(stream.message().await.unwrap().is_some());
    }
    // The client goes away after two chunks: the gateway settles with what it streamed.
    drop(stream);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let request = GenerateRequest { max_tokens: 10, cache: CachePolicy::Bypass.into(), ..prompt("short") };
    let answer = gateway.generate(request).await.unwrap();
    let left = remaining(answer.metadata());
    // Without the refund about 600 would be left (minus this call); with it, nearly all 1000.
    assert!(left > 900, "{left} tokens left after a dropped stream: its reservation was kept");
}

/// A busy key's requests are leased from Redis in slices (300 a minute: slices of up to 3, see
/// `admission/rate_limit/lease.rs`): two gateways still share one limit within ±10%.
#[tokio::test]
async fn two_gateways_leasing_slices_still_share_one_limit() {
    let redis = Redis::start().await.unwrap();
    let limits = vec![
        ("LLMESH_GATEWAY_RATE_LIMIT__REDIS_URL", redis.url()),
        ("LLMESH_GATEWAY_RATE_LIMIT__REQUESTS_PER_MINUTE", "300".to_string()),
        ("LLMESH_GATEWAY_RATE_LIMIT__REDIS_TIMEOUT_MS", "2000".to_string()),
        ("LLMESH_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0".to_string()),
    ];
    let mesh = Mesh::start_with(MeshOptions { env: limits.clone(), ..Default::default() }).await;
    let other = mesh.second_gateway(&limits).await;
    let gateways = [mesh.gateway().await, GatewayClient::new(other.channel().await)];

    let started = Instant::now();
    let (allowed, limited) = hammer(&gateways, 200, Duration::from_secs(4)).await;
    assert!(limited > 0, "the limit was never reached ({allowed} allowed): the test proves nothing");
    // The burst plus 5 a second while the calls ran, not twice that; the slices a gateway held
    // back unused at the end (at most 3 each) are within the margin.
    let expected = 300.0 + 5.0 * started.elapsed().as_secs_f64();
    assert!(
        (allowed as f64 - expected).abs() <= 0.1 * expected,
        "two gateways allowed {allowed} (expected about {expected:.0}); {limited} were limited"
    );
    assert_eq!(local_decisions(&mesh.gateway).await + local_decisions(&other).await, 0.0, "Redis decided");
}

//! The cache as a user sees it: single flight, TTL, what is cacheable, and Redis dying mid-run.

use std::time::{Duration, Instant};

use llmesh_e2e::{Mesh, MeshOptions, Redis, eventually};
use llmesh_proto::{
    cache::v1::StatsRequest,
    gateway::v1::{GenerateRequest, gateway_client::GatewayClient},
    health::v1::{ServingStatus, StatusRequest},
};
use tonic::transport::Channel;

use crate::prompt;

async fn cached_soon(gateway: &GatewayClient<Channel>, request: GenerateRequest) -> bool {
    eventually(Duration::from_secs(5), || {
        let mut gateway = gateway.clone();
        let request = request.clone();
        async move { gateway.generate(request).await.ok().filter(|r| r.get_ref().cached).map(drop) }
    })
    .await
    .is_some()
}

#[tokio::test]
async fn hundred_identical_misses_make_one_upstream_call() {
    // A slow first token keeps all hundred calls in flight together.
    let options = MeshOptions {
        env: vec![("LLMESH_GENERATION_MODELS__SIM__TIME_TO_FIRST_TOKEN_MS", "400".into())],
        redis_url: None,
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let gateway = mesh.gateway().await;
    let calls = (0..100).map(|_| {
        let mut gateway = gateway.clone();
        tokio::spawn(async move { gateway.generate(prompt("everyone at once")).await.map(|r| r.into_inner()) })
    });
    let answers: Vec<_> = futures::future::join_all(calls).await.into_iter().map(|r| r.unwrap().unwrap()).collect();
    let mut ids: Vec<&str> = answers.iter().map(|a| a.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    // Each generation call has its own id: one id means one call.
    assert_eq!(ids.len(), 1, "{} upstream calls for 100 identical requests", ids.len());
    assert!(answers.iter().all(|a| a.text == answers[0].text));
}

/// Untraced stores go to the cache service in batches (`StoreMany`): a burst of distinct misses
/// is stored whole, every store counted once.
#[tokio::test]
async fn a_burst_of_misses_is_stored_whole() {
    let options = MeshOptions {
        env: vec![("LLMESH_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0".to_string())],
        redis_url: None,
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let gateway = mesh.gateway().await;
    let mut cache = mesh.cache().await;
    gateway.clone().generate(prompt("warm up")).await.unwrap();
    // Under the 256 calls in flight one key may have.
    let burst: u32 = 200;
    let calls = (0..burst).map(|i| {
        let mut gateway = gateway.clone();
        tokio::spawn(async move { gateway.generate(prompt(&format!("burst {i}"))).await.map(drop) })
    });
    for call in futures::future::join_all(calls).await {
        call.unwrap().unwrap();
    }
    let entries = eventually(Duration::from_secs(5), || {
        let mut cache = cache.clone();
        async move {
            let stats = cache.stats(StatsRequest {}).await.ok()?.into_inner();
            Some(stats.entries).filter(|&entries| entries == u64::from(burst) + 1)
        }
    })
    .await;
    let stats = cache.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(entries, Some(u64::from(burst) + 1), "{stats:?}\nGATEWAY LOGS:\n{}", mesh.gateway.logs());
    let stored = mesh.gateway.metric_sum("llmesh_cache_stores_total", "result=\"stored\"").await;
    let other = mesh.gateway.metric_sum("llmesh_cache_stores_total", "").await - stored;
    assert_eq!(
        (stored, other),
        (f64::from(burst + 1), 0.0),
        "stores counted by result\nGATEWAY LOGS:\n{}",
        mesh.gateway.logs()
    );
    assert!(cached_soon(&gateway, prompt("burst 7")).await, "a stored answer is not served");
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let redis = Redis::start().await.unwrap();
    for redis_url in [None, Some(redis.url())] {
        let options = MeshOptions {
            env: vec![("LLMESH_CACHE_TTL_MS", "500".into())],
            redis_url: redis_url.clone(),
            ..Default::default()
        };
        let mesh = Mesh::start_with(options).await;
        let gateway = mesh.gateway().await;
        let request = prompt("short lived");
        assert!(!gateway.clone().generate(request.clone()).await.unwrap().into_inner().cached);
        assert!(cached_soon(&gateway, request.clone()).await, "never cached ({redis_url:?})");
        tokio::time::sleep(Duration::from_millis(900)).await;
        let after = gateway.clone().generate(request).await.unwrap().into_inner();
        assert!(!after.cached, "still cached after its TTL ({redis_url:?})");
    }
}

#[tokio::test]
async fn only_deterministic_requests_are_cached_by_default() {
    let sampler = vec![
        ("LLMESH_GENERATION_MODELS__SAMPLER__PROVIDER", "sim".to_string()),
        ("LLMESH_GENERATION_MODELS__SAMPLER__DETERMINISTIC", "false".to_string()),
    ];
    let mesh = Mesh::start_with(MeshOptions { env: sampler.clone(), redis_url: None, ..Default::default() }).await;
    let gateway = mesh.gateway().await;
    let sampled = GenerateRequest { model: "sampler".into(), temperature: Some(0.8), ..prompt("roll the dice") };
    gateway.clone().generate(sampled.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !gateway.clone().generate(sampled.clone()).await.unwrap().into_inner().cached,
        "a sampling request was cached"
    );

    let greedy = GenerateRequest { temperature: Some(0.0), ..sampled.clone() };
    gateway.clone().generate(greedy.clone()).await.unwrap();
    assert!(cached_soon(&gateway, greedy).await, "temperature 0 is deterministic");
    let seeded = GenerateRequest { seed: Some(7), ..sampled.clone() };
    gateway.clone().generate(seeded.clone()).await.unwrap();
    assert!(cached_soon(&gateway, seeded).await, "a seed is deterministic");

    let mut env = sampler;
    env.push(("LLMESH_GATEWAY_CACHE__CACHE_NONDETERMINISTIC", "true".to_string()));
    let mesh = Mesh::start_with(MeshOptions { env, redis_url: None, ..Default::default() }).await;
    let gateway = mesh.gateway().await;
    gateway.clone().generate(sampled.clone()).await.unwrap();
    assert!(cached_soon(&gateway, sampled).await, "cache_nondeterministic caches sampling requests");
}

#[tokio::test]
async fn redis_dies_requests_go_on_and_hits_resume_when_it_returns() {
    let mut redis = Redis::start().await.unwrap();
    let port = redis.port;
    let mesh = Mesh::start_with(MeshOptions { redis_url: Some(redis.url()), ..Default::default() }).await;
    let gateway = mesh.gateway().await;
    gateway.clone().generate(prompt("before")).await.unwrap();
    assert!(cached_soon(&gateway, prompt("before")).await);

    redis.kill().await;
    let mut took = Vec::new();
    for i in 0..50 {
        let started = Instant::now();
        let answer = gateway.clone().generate(prompt(&format!("while redis is down {i}"))).await;
        took.push(started.elapsed());
        assert!(!answer.unwrap().into_inner().cached);
    }
    // The cache budget is 20 ms and the sim answers at once: calls do not wait on a dead Redis
    // (Redis' connect timeout is a second). The median, as one call on a loaded host may be late
    // for reasons of its own.
    took.sort_unstable();
    let median = took[took.len() / 2];
    assert!(median < Duration::from_millis(250), "calls took {median:?} (median) with Redis down");

    let mut health = mesh.mesh_health().await;
    let degraded = eventually(Duration::from_secs(5), || {
        let mut health = health.clone();
        async move {
            let status = health.status(StatusRequest {}).await.ok()?.into_inner();
            let redis = status.components.iter().find(|c| c.name == "redis")?;
            (status.status() == ServingStatus::Degraded && redis.status() == ServingStatus::NotServing).then_some(())
        }
    })
    .await;
    assert!(degraded.is_some(), "health never showed the mesh degraded by Redis");

    let _redis = Redis::start_on(port).await.unwrap();
    gateway.clone().generate(prompt("after")).await.unwrap();
    assert!(cached_soon(&gateway, prompt("after")).await, "hits did not resume after Redis returned");
    let serving = eventually(Duration::from_secs(5), || {
        let mut health = health.clone();
        async move {
            (health.status(StatusRequest {}).await.ok()?.into_inner().status() == ServingStatus::Serving).then_some(())
        }
    })
    .await;
    assert!(serving.is_some());
    let _ = health.status(StatusRequest {}).await;
}

#[tokio::test]
async fn a_client_that_cancels_thousands_of_calls_at_once_keeps_its_connection() {
    // The gateway cancels every cache call past its budget: on a loaded host, hundreds at once,
    // before the cache service has taken them up. The connection, and the calls on it, must live.
    let cache = llmesh_e2e::Proc::spawn("cache", &[]).await.unwrap();
    let channel = cache.channel().await;
    let mut client = llmesh_proto::cache::v1::cache_client::CacheClient::new(channel.clone());
    let mut feed = client.watch_changes(llmesh_proto::cache::v1::WatchChangesRequest {}).await.unwrap().into_inner();
    assert!(feed.message().await.unwrap().is_some(), "the feed starts");
    // Rounds of 500: whether the cache service has taken a call up before its cancel arrives
    // depends on scheduling, so one round may pass by luck.
    for round in 0..20 {
        let lookups = (0..500).map(|i| {
            let mut client = client.clone();
            let request = llmesh_proto::cache::v1::LookupRequest {
                request: Some(prompt(&format!("cancelled {round} {i}")).into()),
                allow_stale: false,
            };
            // Sent, then given up on at once.
            async move { tokio::time::timeout(Duration::from_micros(1), client.lookup(request)).await.ok() }
        });
        futures::future::join_all(lookups).await;
    }
    // The same connection still answers, and the feed on it still runs.
    let stats = client.stats(StatsRequest {}).await;
    assert!(stats.is_ok(), "{stats:?}\nCACHE LOGS:\n{}", cache.logs());
    let next = tokio::time::timeout(Duration::from_secs(5), feed.message()).await.expect("a heartbeat within 5 s");
    assert!(next.is_ok_and(|message| message.is_some()), "the feed ended\nCACHE LOGS:\n{}", cache.logs());
}

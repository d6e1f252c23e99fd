//! The cache on a real redis-server.

use std::time::Duration;

use llmesh_e2e::{Mesh, MeshOptions, Redis, eventually};
use llmesh_proto::cache::v1::{InvalidateRequest, StatsRequest, invalidate_request::Target};

use crate::prompt;

#[tokio::test]
async fn gateway_hits_through_redis_and_invalidate_by_model() {
    let redis = Redis::start().await.unwrap();
    let mesh = Mesh::start_with(MeshOptions { redis_url: Some(redis.url()), ..Default::default() }).await;
    let mut gateway = mesh.gateway().await;

    let first = gateway.generate(prompt("redis please")).await.unwrap().into_inner();
    assert!(!first.cached);
    let hit = eventually(Duration::from_secs(3), || {
        let mut gateway = gateway.clone();
        async move { Some(gateway.generate(prompt("redis please")).await.unwrap().into_inner()).filter(|r| r.cached) }
    })
    .await
    .expect("hit from redis");
    assert_eq!(hit.text, first.text);

    let mut cache = mesh.cache().await;
    let stats = cache.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.backend, "redis");
    assert_eq!(stats.entries, 1);
    assert!(stats.bytes > 0);
    assert!(stats.hits >= 1 && stats.misses >= 1, "{stats:?}");

    let removed = cache.invalidate(InvalidateRequest { target: Some(Target::Model("sim".into())) }).await.unwrap();
    assert_eq!(removed.into_inner().removed, 1);
    let after = gateway.generate(prompt("redis please")).await.unwrap().into_inner();
    assert!(!after.cached);
}

#[tokio::test]
async fn entries_survive_a_cache_restart_on_redis() {
    let redis = Redis::start().await.unwrap();
    let mesh = Mesh::start_with(MeshOptions { redis_url: Some(redis.url()), ..Default::default() }).await;
    let mut gateway = mesh.gateway().await;
    gateway.generate(prompt("persist me")).await.unwrap();
    eventually(Duration::from_secs(3), || {
        let mut gateway = gateway.clone();
        async move { gateway.generate(prompt("persist me")).await.ok().filter(|r| r.get_ref().cached) }
    })
    .await
    .expect("cached");

    // A second mesh on the same Redis finds the entry (its first lookup may miss its 20 ms budget
    // on a loaded machine, so it gets a few tries; it never generates the entry itself, since its
    // own answers are not needed for the hit).
    let other = Mesh::start_with(MeshOptions { redis_url: Some(redis.url()), ..Default::default() }).await;
    let gateway = other.gateway().await;
    let hit = eventually(Duration::from_secs(3), || {
        let mut gateway = gateway.clone();
        let only_cached = llmesh_proto::gateway::v1::GenerateRequest {
            cache: llmesh_proto::common::v1::CachePolicy::OnlyIfCached.into(),
            ..prompt("persist me")
        };
        async move { gateway.generate(only_cached).await.ok().filter(|r| r.get_ref().cached) }
    })
    .await;
    assert!(hit.is_some(), "the second mesh never found the entry in Redis");
}

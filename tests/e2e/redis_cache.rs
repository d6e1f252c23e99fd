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
    // The gateway connects to the cache on first use, which may not fit in the first lookup's
    // 20 ms budget on a loaded machine: open that connection first.
    gateway.generate(prompt("warm up")).await.unwrap();
    // The store happens in the background: wait until the warm-up entry is in Redis.
    let mut cache = mesh.cache().await;
    let warm = eventually(Duration::from_secs(3), || {
        let mut cache = cache.clone();
        async move { Some(cache.stats(StatsRequest {}).await.ok()?.into_inner()).filter(|s| s.entries == 1) }
    })
    .await
    .expect("the warm-up answer stored");

    let first = gateway.generate(prompt("redis please")).await.unwrap().into_inner();
    assert!(!first.cached);
    let hit = eventually(Duration::from_secs(3), || {
        let mut gateway = gateway.clone();
        async move { Some(gateway.generate(prompt("redis please")).await.unwrap().into_inner()).filter(|r| r.cached) }
    })
    .await
    .expect("hit from redis");
    assert_eq!(hit.text, first.text);

    let stats = cache.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.backend, "redis");
    assert_eq!(stats.entries, 1 + warm.entries);
    assert!(stats.bytes > 0);
    // The first call's lookup may have been given up on by the gateway (its lookup budget is
    // 20 ms) before the cache counted it: a miss is not certain, the hit is.
    assert!(stats.hits >= 1 && stats.misses >= warm.misses, "{stats:?} after {warm:?}");

    let removed = cache.invalidate(InvalidateRequest { target: Some(Target::Model("sim".into())) }).await.unwrap();
    assert_eq!(removed.into_inner().removed, 1 + warm.entries);
    crate::near_cache::until_uncached(&gateway, &prompt("redis please"), "Invalidate(model)").await;
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

#[tokio::test]
async fn the_cache_on_a_redis_cluster() {
    let cluster = llmesh_e2e::RedisCluster::start().await.unwrap();
    let options =
        MeshOptions { env: vec![("LLMESH_CACHE_REDIS_CLUSTER_NODES", cluster.seed_urls())], ..Default::default() };
    let mesh = Mesh::start_with(options).await;
    let gateway = mesh.gateway().await;
    // Enough different requests that their keys land on every node's slots.
    for i in 0..12 {
        let request = prompt(&format!("clustered {i}"));
        let first = gateway.clone().generate(request.clone()).await.unwrap().into_inner();
        assert!(!first.cached);
        let hit = eventually(Duration::from_secs(3), || {
            let (mut gateway, request) = (gateway.clone(), request.clone());
            async move { gateway.generate(request).await.ok().filter(|r| r.get_ref().cached) }
        })
        .await
        .unwrap_or_else(|| panic!("request {i} never came from the cluster:\n{}", mesh.cache.logs()));
        assert_eq!(hit.into_inner().text, first.text);
    }
    let mut cache = mesh.cache().await;
    let stats = cache.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.backend, "redis");
    // Counted on every primary: the entries alone (not the model's index), and their bytes.
    assert_eq!(stats.entries, 12, "{stats:?}");
    assert!(stats.bytes > 12 * 100, "{stats:?}");
    let removed = cache.invalidate(InvalidateRequest { target: Some(Target::Model("sim".into())) }).await.unwrap();
    assert_eq!(removed.into_inner().removed, 12);
    crate::near_cache::until_uncached(&gateway, &prompt("clustered 0"), "Invalidate(model) on the cluster").await;
}

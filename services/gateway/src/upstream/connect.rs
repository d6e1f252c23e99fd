//! Start-up: find the generation replicas and the cache, and check that they answer.

use std::{sync::Arc, time::Duration};

use anyhow::bail;
use llmesh_common::deps;
use llmesh_proto::cache::v1::cache_client::CacheClient;

use super::{
    Upstream,
    discovery::{self, Source},
    endpoint::EndpointSettings,
    pool::Pool,
    retry::Retry,
};
use crate::config::Config;

const GENERATION_SERVICE: &str = "llmesh.generation.v1.Generation";
const CACHE_SERVICE: &str = "llmesh.cache.v1.Cache";

/// Connects to the generation replicas and the cache. At least one replica, and the cache when
/// one is configured, must answer SERVING within `startup_timeout_ms`; otherwise the error names
/// what could not be reached and why.
pub async fn connect(config: &Config) -> anyhow::Result<Upstream> {
    let generation = &config.generation;
    let within = Duration::from_millis(config.startup_timeout_ms);
    if generation.endpoints.is_empty() {
        bail!("no generation endpoints configured (gateway.generation.endpoints)");
    }
    let sources = generation.endpoints.iter().map(|e| Source::parse(e)).collect::<anyhow::Result<Vec<_>>>()?;
    let addrs = discovery::resolve(&sources).await;
    if addrs.is_empty() {
        bail!("cannot reach generation: {:?} resolve to no address", generation.endpoints);
    }
    let checks = addrs.iter().map(|uri| deps::wait_serving("generation", uri, GENERATION_SERVICE, within));
    let failures: Vec<String> =
        futures::future::join_all(checks).await.into_iter().filter_map(|r| r.err().map(|e| format!("{e:#}"))).collect();
    if failures.len() == addrs.len() {
        bail!("no generation replica is reachable: {}", failures.join("; "));
    }
    for failure in &failures {
        tracing::warn!("{failure}; keeping the replica, its breaker will tell");
    }

    let settings = EndpointSettings {
        connect_timeout: Duration::from_millis(generation.connect_timeout_ms),
        ewma_decay: Duration::from_millis(generation.ewma_decay_ms),
        penalty: Duration::from_millis(generation.failure_penalty_ms),
        breaker: generation.breaker.clone(),
    };
    let pool = Arc::new(Pool::new(settings));
    pool.set(&addrs);
    discovery::keep_fresh(pool.clone(), sources, Duration::from_millis(generation.dns_refresh_ms));

    let cache = if config.cache.endpoint.is_empty() {
        tracing::info!("cache disabled (gateway.cache.endpoint is empty)");
        None
    } else {
        let uri = &config.cache.endpoint;
        deps::wait_serving("cache", uri, CACHE_SERVICE, within).await?;
        let channel = deps::endpoint(uri, Duration::from_millis(generation.connect_timeout_ms))?.connect_lazy();
        Some(CacheClient::new(channel))
    };
    let per_try_timeout =
        (generation.per_try_timeout_ms > 0).then(|| Duration::from_millis(generation.per_try_timeout_ms));
    Ok(Upstream { pool, retry: Retry::new(generation.retry.clone()), per_try_timeout, cache })
}

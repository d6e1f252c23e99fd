//! Connections to the services behind the gateway, checked at start-up.

use std::time::Duration;

use anyhow::bail;
use llmesh_common::deps;
use llmesh_proto::{cache::v1::cache_client::CacheClient, generation::v1::generation_client::GenerationClient};
use tonic::transport::Channel;

use crate::config::Config;

const GENERATION_SERVICE: &str = "llmesh.generation.v1.Generation";
const CACHE_SERVICE: &str = "llmesh.cache.v1.Cache";

#[derive(Debug, Clone)]
pub struct Upstream {
    pub generation: GenerationClient<Channel>,
    pub cache: Option<CacheClient<Channel>>,
}

impl Upstream {
    /// Connects to every generation replica and the cache. At least one replica, and the cache
    /// when one is configured, must answer SERVING within `startup_timeout_ms`.
    pub async fn connect(config: &Config) -> anyhow::Result<Self> {
        let within = Duration::from_millis(config.startup_timeout_ms);
        let connect_timeout = Duration::from_millis(config.generation.connect_timeout_ms);
        if config.generation.endpoints.is_empty() {
            bail!("no generation endpoints configured (gateway.generation.endpoints)");
        }

        let checks = config
            .generation
            .endpoints
            .iter()
            .map(|uri| deps::wait_serving("generation", uri, GENERATION_SERVICE, within));
        let results = futures::future::join_all(checks).await;
        let failures: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}"))).collect();
        if failures.len() == results.len() {
            bail!("no generation replica is reachable: {}", failures.join("; "));
        }
        for failure in &failures {
            tracing::warn!("{failure}; starting without this replica for now");
        }
        let endpoints = config
            .generation
            .endpoints
            .iter()
            .map(|uri| deps::endpoint(uri, connect_timeout))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let generation = GenerationClient::new(Channel::balance_list(endpoints.into_iter()));

        let cache = if config.cache.endpoint.is_empty() {
            tracing::info!("cache disabled (gateway.cache.endpoint is empty)");
            None
        } else {
            let uri = &config.cache.endpoint;
            deps::wait_serving("cache", uri, CACHE_SERVICE, within).await?;
            let channel = deps::endpoint(uri, connect_timeout)?.connect_lazy();
            Some(CacheClient::new(channel))
        };
        Ok(Self { generation, cache })
    }
}

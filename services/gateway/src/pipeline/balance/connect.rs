//! Start-up: find the generation replicas and check that at least one answers.

use std::{sync::Arc, time::Duration};

use anyhow::bail;
use llmesh_common::deps;
use llmesh_proto::generation::v1::generation_server::SERVICE_NAME;

use super::{
    discovery::{self, Source},
    endpoint::EndpointSettings,
    pool::Pool,
};
use crate::pipeline::GenerationConfig;

/// The replicas `config` names. At least one must answer SERVING within `within`; otherwise the
/// error names what could not be reached and why. DNS sources are kept fresh in the background.
pub async fn connect(config: &GenerationConfig, within: Duration) -> anyhow::Result<Arc<Pool>> {
    if config.endpoints.is_empty() {
        bail!("no generation endpoints configured (gateway.generation.endpoints)");
    }
    let sources = config.endpoints.iter().map(|e| Source::parse(e)).collect::<anyhow::Result<Vec<_>>>()?;
    let addrs = discovery::resolve(&sources).await;
    if addrs.is_empty() {
        bail!("cannot reach generation: {:?} resolve to no address", config.endpoints);
    }
    let checks = addrs.iter().map(|uri| deps::wait_serving("generation", uri, SERVICE_NAME, within));
    let failures: Vec<String> =
        futures::future::join_all(checks).await.into_iter().filter_map(|r| r.err().map(|e| format!("{e:#}"))).collect();
    if failures.len() == addrs.len() {
        bail!("no generation replica is reachable: {}", failures.join("; "));
    }
    for failure in &failures {
        tracing::warn!("{failure}; keeping the replica, its breaker will tell");
    }

    let settings = EndpointSettings {
        connect_timeout: Duration::from_millis(config.connect_timeout_ms),
        ewma_decay: Duration::from_millis(config.ewma_decay_ms),
        penalty: Duration::from_millis(config.failure_penalty_ms),
        breaker: config.breaker.clone(),
    };
    let pool = Arc::new(Pool::new(settings));
    pool.set(&addrs);
    discovery::keep_fresh(pool.clone(), sources, Duration::from_millis(config.dns_refresh_ms));
    Ok(pool)
}

//! Gateway configuration: `[gateway]` in the mesh file, `LLMESH_GATEWAY_*` in the environment.

use std::net::SocketAddr;

use llmesh_common::validate::Limits;
use serde::{Deserialize, Serialize};

use llmesh_queue::QueueSettings;

use crate::{
    admission::{AuthConfig, RateLimitConfig, ShedConfig},
    fallback::FallbackConfig,
    upstream::{BreakerConfig, RetryConfig},
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    /// After SIGTERM: still serving, but NOT_SERVING, for this long (let balancers notice).
    /// `/metrics` and profiling over HTTP; off unless `listen` is set.
    pub admin: llmesh_common::config::AdminConfig,
    pub shutdown_drain_ms: u64,
    pub shutdown_grace_ms: u64,
    pub limits: Limits,
    /// Longest a call may take; a client's shorter grpc-timeout wins.
    pub request_timeout_ms: u64,
    /// How long to wait at start-up for generation (and the cache) to answer SERVING.
    pub startup_timeout_ms: u64,
    pub generation: GenerationConfig,
    pub cache: CacheConfig,
    pub auth: AuthConfig,
    pub rate_limit: RateLimitConfig,
    pub shed: ShedConfig,
    /// The job queue behind SubmitJob and friends.
    pub queue: QueueSettings,
    pub fallback: FallbackConfig,
    /// Price per model, for the `llmesh_cost_usd_total` metric.
    pub prices: std::collections::BTreeMap<String, Price>,
}

/// What a model costs, in US dollars per million tokens.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Price {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    /// Generation replicas: `http://host:port`, or `dns://name:port` for every address the name
    /// resolves to, re-resolved every `dns_refresh_ms`.
    pub endpoints: Vec<String>,
    pub connect_timeout_ms: u64,
    pub dns_refresh_ms: u64,
    /// Longest one attempt may take (0: only the call's deadline).
    pub per_try_timeout_ms: u64,
    /// How fast a replica's latency estimate forgets a spike.
    pub ewma_decay_ms: u64,
    /// The latency a failed or rate-limited call counts as, so it steers traffic away.
    pub failure_penalty_ms: u64,
    pub breaker: BreakerConfig,
    pub retry: RetryConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// The cache service, as `http://host:port`; empty turns caching off.
    pub endpoint: String,
    /// Time budget of one cache call; past it the gateway goes on without the cache.
    pub budget_ms: u64,
    /// Cache sampling requests too. By default only deterministic ones are cached: temperature 0,
    /// a seed, or a model generation declares deterministic.
    pub cache_nondeterministic: bool,
    /// Longest an identical request waits for the one already in flight before calling on its own.
    pub single_flight_wait_ms: u64,
    /// The near cache: recent hits kept in the gateway's memory and answered without calling the
    /// cache service, kept in step with it by its change feed. Bounded by entries and by bytes;
    /// 0 in either turns it off.
    pub near_max_entries: u64,
    pub near_max_bytes: u64,
    /// Longest a near copy is kept, however long the entry stays fresh in the cache service: the
    /// bound on serving an answer whose change never reached the feed.
    pub near_max_ttl_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 50051).into(),
            admin: llmesh_common::config::AdminConfig::default(),
            shutdown_drain_ms: 0,
            shutdown_grace_ms: 10_000,
            limits: Limits::default(),
            request_timeout_ms: 30_000,
            startup_timeout_ms: 5_000,
            generation: GenerationConfig::default(),
            cache: CacheConfig::default(),
            auth: AuthConfig::default(),
            rate_limit: RateLimitConfig::default(),
            shed: ShedConfig::default(),
            queue: QueueSettings::default(),
            fallback: FallbackConfig::default(),
            prices: std::collections::BTreeMap::new(),
        }
    }
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:50052".into()],
            connect_timeout_ms: 1_000,
            dns_refresh_ms: 5_000,
            per_try_timeout_ms: 0,
            ewma_decay_ms: 10_000,
            failure_penalty_ms: 1_000,
            breaker: BreakerConfig::default(),
            retry: RetryConfig::default(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:50053".into(),
            budget_ms: 20,
            cache_nondeterministic: false,
            single_flight_wait_ms: 30_000,
            near_max_entries: 10_000,
            near_max_bytes: 64 * 1024 * 1024,
            near_max_ttl_ms: 60_000,
        }
    }
}

impl llmesh_common::ServiceConfig for Config {
    const SECTION: &'static str = "gateway";

    fn listen(&self) -> SocketAddr {
        self.listen
    }
}

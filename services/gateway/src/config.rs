//! Gateway configuration: `[gateway]` in the mesh file, `LLMESH_GATEWAY_*` in the environment.
//! Each section's type lives beside the module it configures; this file only assembles them.

use std::{collections::BTreeMap, net::SocketAddr};

use llmesh_proto::validate::Limits;
use llmesh_queue::QueueSettings;
use serde::{Deserialize, Serialize};

pub use crate::{
    admission::{AuthConfig, BudgetConfig, Price, RateLimitConfig, ShedConfig},
    cache::CacheConfig,
    http::HttpConfig,
    pipeline::{GenerationConfig, breaker::BreakerConfig, fallback::FallbackConfig, retry::RetryConfig},
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    /// `/metrics` and profiling over HTTP; off unless `listen` is set.
    pub admin: llmesh_common::config::AdminConfig,
    /// TLS on this service's port (and mTLS with `client_ca`); off unless `cert` is set.
    pub tls: llmesh_common::tls::TlsConfig,
    /// TLS for the calls this service makes inside the mesh; off unless `ca` is set.
    pub client_tls: llmesh_common::tls::ClientTlsConfig,
    /// After SIGTERM: still serving, but NOT_SERVING, for this long (let balancers notice).
    pub shutdown_drain_ms: u64,
    /// How long in-flight calls may take to finish after SIGTERM.
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
    /// Spend budgets (the limits are in the keys file; the state in `rate_limit.redis_url`).
    pub budget: BudgetConfig,
    pub shed: ShedConfig,
    /// The job queue behind SubmitJob and friends.
    pub queue: QueueSettings,
    pub fallback: FallbackConfig,
    /// Price per model, for the `llmesh_cost_usd_total` metric and spend budgets.
    pub prices: BTreeMap<String, Price>,
    /// The model `POST /generate` asks for when its body names none (`sim` under `llmesh up`);
    /// unset, the body must name one.
    pub default_model: Option<String>,
    /// The OpenAI- and Anthropic-compatible HTTP routes on the gateway's port.
    pub http: HttpConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 50051).into(),
            admin: llmesh_common::config::AdminConfig::default(),
            tls: llmesh_common::tls::TlsConfig::default(),
            client_tls: llmesh_common::tls::ClientTlsConfig::default(),
            shutdown_drain_ms: 0,
            shutdown_grace_ms: 10_000,
            limits: Limits::default(),
            request_timeout_ms: 30_000,
            startup_timeout_ms: 5_000,
            generation: GenerationConfig::default(),
            cache: CacheConfig::default(),
            auth: AuthConfig::default(),
            rate_limit: RateLimitConfig::default(),
            budget: BudgetConfig::default(),
            shed: ShedConfig::default(),
            queue: QueueSettings::default(),
            fallback: FallbackConfig::default(),
            prices: BTreeMap::new(),
            default_model: None,
            http: HttpConfig::default(),
        }
    }
}

impl llmesh_common::ServiceConfig for Config {
    const SECTION: &'static str = "gateway";

    fn listen(&self) -> SocketAddr {
        self.listen
    }
}

//! Generation service configuration: `[generation]` in the mesh file, `LLMESH_GENERATION_*` in the
//! environment.

use std::{collections::BTreeMap, net::SocketAddr};

use llmesh_proto::validate::Limits;
use llmesh_queue::QueueSettings;
use serde::{Deserialize, Serialize};

pub use crate::provider::ModelConfig;
use crate::provider::{failure::Failure, http::DEFAULT_MAX_RESPONSE_BYTES, sim::SimConfig};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    /// How long in-flight calls may take to finish after SIGTERM.
    /// After SIGTERM: still serving, but NOT_SERVING, for this long (let balancers notice).
    /// `/metrics` and profiling over HTTP; off unless `listen` is set.
    pub admin: llmesh_common::config::AdminConfig,
    /// TLS on this service's port (and mTLS with `client_ca`); off unless `cert` is set.
    pub tls: llmesh_common::tls::TlsConfig,
    pub shutdown_drain_ms: u64,
    pub shutdown_grace_ms: u64,
    pub limits: Limits,
    /// Model name (as clients send it) to provider settings.
    pub models: BTreeMap<String, ModelConfig>,
    /// The fault-injection models: `sim-slow`, `sim-error`, `sim-429` (see [`fault_models`]) and
    /// `sim-flaky-N` for N from 1 to 1000, failing every Nth call. Off unless set: they make a
    /// mesh fail on purpose, which only a test or a trial wants (`llmesh up` and the e2e harness
    /// set it; `deploy/` does not). A configured model of the same name wins over a fault model.
    pub fault_models: bool,
    /// Largest answer an upstream may send to one call, in bytes (a unary body, or the total of a
    /// stream), for an `openai` model that sets no `max_response_bytes` of its own. Past it the
    /// call fails UNAVAILABLE and the upstream call is dropped.
    pub max_upstream_response_bytes: u64,
    /// The job queue this process works on (no workers when `redis_url` is unset).
    pub queue: QueueSettings,
    /// Where the workers settle the token reservations of the jobs they end.
    pub rate_limit: RateLimitSettings,
}

/// `[generation.rate_limit]`: the Redis of the gateways' rate limiter
/// (`gateway.rate_limit.redis_url`), where a job's token reservation is settled once the job ends:
/// the unused part given back, an excess charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Unset: the queue's Redis (`queue.redis_url`), where the gateways' limiter usually is too.
    /// Set it when the gateways limit on another Redis: settling elsewhere would change nothing
    /// the gateways see.
    pub redis_url: Option<String>,
    /// Longest wait for one settlement; past it the reservation stays charged (the way of the
    /// limit) and the worker goes on.
    pub timeout_ms: u64,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self { redis_url: None, timeout_ms: 1_000 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 50052).into(),
            admin: llmesh_common::config::AdminConfig::default(),
            tls: llmesh_common::tls::TlsConfig::default(),
            shutdown_drain_ms: 0,
            shutdown_grace_ms: 10_000,
            limits: Limits::default(),
            models: default_models(),
            fault_models: false,
            max_upstream_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            queue: QueueSettings::default(),
            rate_limit: RateLimitSettings::default(),
        }
    }
}

/// `sim`, for trying the mesh out and for load tests.
fn default_models() -> BTreeMap<String, ModelConfig> {
    BTreeMap::from([("sim".to_string(), ModelConfig::Sim(SimConfig::default()))])
}

/// The fault-injecting sims chaos tests use by name, when `fault_models` is set (`sim-flaky-N`
/// needs no entry: see `provider::sim::Flaky`).
pub fn fault_models() -> BTreeMap<String, ModelConfig> {
    let sim = SimConfig::default();
    let failing = |failure| SimConfig { fail_every: 1, failure, ..sim.clone() };
    BTreeMap::from([
        (
            "sim-slow".to_string(),
            ModelConfig::Sim(SimConfig { time_to_first_token_ms: 2_000, tokens_per_second: 20.0, ..sim.clone() }),
        ),
        ("sim-error".to_string(), ModelConfig::Sim(failing(Failure::Unavailable))),
        ("sim-429".to_string(), ModelConfig::Sim(failing(Failure::RateLimited))),
    ])
}

impl llmesh_common::ServiceConfig for Config {
    const SECTION: &'static str = "generation";

    fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Every configured model's provider can be built (its URL, headers and key file).
    fn check(&self) -> anyhow::Result<()> {
        for (name, model) in &self.models {
            crate::provider::Provider::from_config(name, model, self.max_upstream_response_bytes)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use llmesh_common::ServiceConfig as _;

    use super::*;
    use crate::provider::http::HttpModelConfig;

    #[test]
    fn a_model_that_cannot_be_built_fails_the_check_naming_it() {
        assert!(Config::default().check().is_ok());
        let mut config = Config::default();
        let keyed = HttpModelConfig {
            headers: BTreeMap::from([("x-api-key".into(), "sk-secret".into())]),
            ..HttpModelConfig::default()
        };
        config.models.insert("claude".into(), ModelConfig::Anthropic(keyed));
        let error = format!("{:#}", config.check().unwrap_err());
        assert!(error.starts_with("model claude: headers: x-api-key"), "{error}");
        assert!(!error.contains("sk-secret"), "{error}");
    }
}

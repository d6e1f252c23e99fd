//! Generation service configuration: `[generation]` in the mesh file, `LLMESH_GENERATION_*` in the
//! environment.

use std::{collections::BTreeMap, net::SocketAddr};

use llmesh_common::validate::Limits;
use llmesh_queue::QueueSettings;
use serde::{Deserialize, Serialize};

use crate::provider::{
    openai::OpenAiConfig,
    sim::{Failure, SimConfig},
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    /// How long in-flight calls may take to finish after SIGTERM.
    /// After SIGTERM: still serving, but NOT_SERVING, for this long (let balancers notice).
    /// `/metrics` and profiling over HTTP; off unless `listen` is set.
    pub admin: llmesh_common::config::AdminConfig,
    pub shutdown_drain_ms: u64,
    pub shutdown_grace_ms: u64,
    pub limits: Limits,
    /// Model name (as clients send it) to provider settings.
    pub models: BTreeMap<String, ModelConfig>,
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
            shutdown_drain_ms: 0,
            shutdown_grace_ms: 10_000,
            limits: Limits::default(),
            models: default_models(),
            queue: QueueSettings::default(),
            rate_limit: RateLimitSettings::default(),
        }
    }
}

/// `sim` for trying the mesh out and for load tests, and the fault-injecting variants chaos tests
/// use by name (`sim-flaky-N`, failing every Nth call, needs no entry: see `provider::sim`).
fn default_models() -> BTreeMap<String, ModelConfig> {
    let sim = SimConfig::default();
    let failing = |failure| SimConfig { fail_every: 1, failure, ..sim.clone() };
    BTreeMap::from([
        ("sim".to_string(), ModelConfig::Sim(sim.clone())),
        (
            "sim-slow".to_string(),
            ModelConfig::Sim(SimConfig { time_to_first_token_ms: 2_000, tokens_per_second: 20.0, ..sim.clone() }),
        ),
        ("sim-error".to_string(), ModelConfig::Sim(failing(Failure::Unavailable))),
        ("sim-429".to_string(), ModelConfig::Sim(failing(Failure::RateLimited))),
    ])
}

/// Which provider serves a model, and how.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "provider", rename_all = "lowercase")]
pub enum ModelConfig {
    /// The built-in simulated model: deterministic text, no network, no key.
    Sim(SimConfig),
    /// Any OpenAI-compatible chat completions endpoint.
    Openai(OpenAiConfig),
}

impl llmesh_common::ServiceConfig for Config {
    const SECTION: &'static str = "generation";

    fn listen(&self) -> SocketAddr {
        self.listen
    }
}

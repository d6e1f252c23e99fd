//! Generation service configuration: `[generation]` in the mesh file, `LLMESH_GENERATION_*` in the
//! environment.

use std::{collections::BTreeMap, net::SocketAddr};

use llmesh_common::validate::Limits;
use serde::{Deserialize, Serialize};

use crate::provider::sim::SimConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    /// How long in-flight calls may take to finish after SIGTERM.
    pub shutdown_grace_ms: u64,
    pub limits: Limits,
    /// Model name (as clients send it) to provider settings.
    pub models: BTreeMap<String, ModelConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 50052).into(),
            shutdown_grace_ms: 10_000,
            limits: Limits::default(),
            models: BTreeMap::from([("sim".to_string(), ModelConfig::Sim(SimConfig::default()))]),
        }
    }
}

/// Which provider serves a model, and how.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "provider", rename_all = "lowercase")]
pub enum ModelConfig {
    /// The built-in simulated model: deterministic text, no network, no key.
    Sim(SimConfig),
}

//! Admission: who may call, how often, and whether the gateway has room. Three tower layers on
//! the HTTP requests, outermost first: auth, rate limit, load shed. Each rejection is a gRPC
//! status response (never an error tonic would turn into UNKNOWN). Token quotas need the decoded
//! request, so the typed handler reserves them through [`TokenLimiter`].
//!
//! (Work in progress: the configuration below is the interface the rest of the gateway uses.)

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[gateway.auth]`. With no keys at all, auth is off and every caller is `anonymous`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// TOML file with `[[keys]]` tables (same shape as `keys`), e.g. a mounted secret.
    pub keys_file: Option<PathBuf>,
    pub keys: Vec<ApiKey>,
}

/// One API key, stored as the SHA-256 of the key; `prefix` (the key's first characters) is public
/// and finds the candidate to compare.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKey {
    /// Public name, used in metrics and logs.
    pub id: String,
    pub prefix: String,
    /// Hex SHA-256 of the whole key.
    pub sha256: String,
    /// Overrides `rate_limit.requests_per_minute` for this key.
    pub requests_per_minute: Option<u32>,
    /// Overrides `rate_limit.tokens_per_minute` for this key.
    pub tokens_per_minute: Option<u32>,
    /// Models this key may use; empty means all.
    pub models: Vec<String>,
}

/// `[gateway.rate_limit]`: per key, across every gateway replica sharing `redis_url`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Shared limiter state; unset means each replica limits on its own.
    pub redis_url: Option<String>,
    /// Per key, unless the key says otherwise; 0 means unlimited.
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    /// Longest wait for Redis before the local limiter decides instead.
    pub redis_timeout_ms: u64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self { redis_url: None, requests_per_minute: 0, tokens_per_minute: 0, redis_timeout_ms: 20 }
    }
}

/// `[gateway.shed]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShedConfig {
    /// Calls in flight at once (streams count until they end); more are refused at once with
    /// RESOURCE_EXHAUSTED.
    pub max_concurrency: usize,
}

impl Default for ShedConfig {
    fn default() -> Self {
        Self { max_concurrency: 1024 }
    }
}

//! Admission: who may call, how often, and whether the gateway has room. Three tower layers on
//! the HTTP requests, outermost first:
//!
//! 1. [`AuthLayer`]: checks `x-api-key` and puts the caller's [`Principal`] into the request
//!    extensions (UNAUTHENTICATED otherwise).
//! 2. [`RateLimitLayer`]: one request against the principal's requests-per-minute (GCRA, shared
//!    across replicas through Redis; RESOURCE_EXHAUSTED with `retry-after-ms` otherwise).
//! 3. [`ShedLayer`]: a bound on calls in flight, streams included until their body ends
//!    (RESOURCE_EXHAUSTED at once otherwise, never queued).
//!
//! Each rejection is a gRPC status response (never an error tonic would turn into UNKNOWN).
//! Health checks and reflection pass every layer untouched. Token quotas need the decoded
//! request, so the typed handler admits it through [`TokenAdmission`] ([`tokens`]), whose
//! [`Tokens`] are settled once the usage is known, in the background so that the answer does not
//! wait for that Redis round trip; a call that ends without settling pays for what it received.

pub mod auth;
pub mod rate_limit;
pub mod shed;
pub mod tokens;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use auth::{AuthLayer, KeyStore, Principal, generate_key};

pub use rate_limit::{Held, Quota, RateLimitLayer, RateLimiter};
pub use shed::ShedLayer;
pub use tokens::{Admitted, Price, TokenAdmission, Tokens};

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
    /// The team the key belongs to, if any (`llmesh keys new --team`); a key in no team stands
    /// alone. Recorded for listings now; budgets per team build on it.
    pub team: Option<String>,
    pub prefix: String,
    /// Hex SHA-256 of the whole key.
    pub sha256: String,
    /// Overrides `rate_limit.requests_per_minute` for this key.
    pub requests_per_minute: Option<u32>,
    /// Overrides `rate_limit.tokens_per_minute` for this key.
    pub tokens_per_minute: Option<u32>,
    /// Models this key may use; empty means all.
    pub models: Vec<String>,
    /// Overrides `shed.max_in_flight_per_key` for this key (0: no bound of its own).
    pub max_in_flight: Option<u32>,
    /// Whether this key's answers are cached with everyone's (`shared`, the default), only for
    /// itself (`private`), or not at all (`off`).
    pub cache: CacheScope,
}

/// Whose cache a key's calls read and write.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    /// One cache for every key: an equal request from any key is answered from it.
    #[default]
    Shared,
    /// Entries of this key's own, which no other key reads (nor this key another's).
    Private,
    /// Never cached, never answered from the cache.
    Off,
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
    /// Calls in flight at once for one key (a key's `max_in_flight` overrides it; 0: no bound), so
    /// that one key cannot take the whole of `max_concurrency` from the others.
    pub max_in_flight_per_key: u32,
}

impl Default for ShedConfig {
    fn default() -> Self {
        Self { max_concurrency: 1024, max_in_flight_per_key: 256 }
    }
}

/// Calls every layer lets through untouched: health probes, the mesh's health and reflection
/// (grpcurl's discovery) must work without a key and even when the gateway is saturated. The
/// server runner's list ([`llmesh_common::server::EXEMPT_SERVICES`]), which it also gives the
/// tracing layer.
pub fn is_exempt(path: &str) -> bool {
    llmesh_common::server::is_exempt(path)
}

#[cfg(test)]
mod tests {
    use super::is_exempt;

    #[test]
    fn probes_and_reflection_are_exempt() {
        assert!(is_exempt("/grpc.health.v1.Health/Check"));
        assert!(is_exempt("/grpc.health.v1.Health/Watch"));
        assert!(is_exempt("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(is_exempt("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
        assert!(!is_exempt("/llmesh.gateway.v1.Gateway/Generate"));
        assert!(!is_exempt("/grpc.health.v1.HealthX/Check"));
        // The gateway's view of its replicas is health, polled by the health service without a key.
        assert!(is_exempt("/llmesh.health.v1.MeshHealth/Status"));
        assert!(!is_exempt("/llmesh.health.v1.MeshHealthX/Status"));
    }
}

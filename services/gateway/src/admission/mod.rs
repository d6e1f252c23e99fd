//! Admission: who may call, how often, and whether the gateway has room. Four tower layers on
//! the HTTP requests, outermost first:
//!
//! 1. [`AuthLayer`]: checks `x-api-key` and puts the caller's [`Principal`] into the request
//!    extensions (UNAUTHENTICATED otherwise).
//! 2. [`RateLimitLayer`]: one request against the principal's requests-per-minute (GCRA, shared
//!    across replicas through Redis; RESOURCE_EXHAUSTED with `retry-after-ms` otherwise).
//! 3. [`ShedLayer`]: a bound on calls in flight, streams included until their body ends
//!    (RESOURCE_EXHAUSTED at once otherwise, never queued).
//! 4. [`CallDeadlineLayer`]: inside shedding, so that a call it ends gives its slots back; ends a
//!    call whose answer has not begun within the gateway's limit (DEADLINE_EXCEEDED).
//!
//! Spend budgets per key and team ([`budget`]) are reserved with the tokens, by [`TokenAdmission`].
//!
//! Each rejection is a [`CallError`](crate::error::CallError), answered as a gRPC status response
//! (never an error tonic would turn into UNKNOWN) that carries the typed error in its extensions.
//! Health checks and reflection pass every layer untouched. Token quotas need the decoded
//! request, so the answer step's first layer ([`crate::answer::admit`]) admits it through
//! [`TokenAdmission`] ([`tokens`]), whose
//! [`Tokens`] are settled once the usage is known, in the background so that the answer does not
//! wait for that Redis round trip; a call that ends without settling pays for what it received.

pub mod auth;
pub mod budget;
mod call_deadline;
pub mod rate_limit;
mod redis_health;
pub mod shed;
pub mod tokens;

pub use auth::{AuthConfig, AuthLayer, CacheScope, KeyStore, generate_key};
pub use budget::{BudgetConfig, Budgets};
pub use call_deadline::CallDeadlineLayer;
pub use rate_limit::{Held, Quota, RateLimitConfig, RateLimitLayer, RateLimiter};
pub use shed::{ShedConfig, ShedLayer};
pub use tokens::{Admitted, Bill, Price, TokenAdmission, Tokens};

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

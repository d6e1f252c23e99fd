//! The failures a fault-injection model injects. A module of its own so that the sim (which
//! injects them) and `error` (which maps them to statuses) both depend on it and not on each other.

use serde::{Deserialize, Serialize};

/// An injected failure, as a real upstream would fail.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// UNAVAILABLE, like a provider outage.
    #[default]
    Unavailable,
    /// RESOURCE_EXHAUSTED with a one-second retry pushback, like an upstream 429.
    RateLimited,
}

/// The retry pushback an injected rate limit asks for.
pub const RATE_LIMIT_PUSHBACK_MS: u64 = 1_000;

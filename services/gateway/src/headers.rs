//! The names of the metadata (gRPC) and headers (HTTP) the gateway writes on its answers and
//! refusals, in one place: the limiter, the budgets, the error mapping and the HTTP routes all
//! write or read them, and none of those should depend on another for a name.

/// Requests the key may still send right now.
pub const REMAINING_REQUESTS: &str = "x-ratelimit-remaining-requests";
/// Tokens the key may still use right now.
pub const REMAINING_TOKENS: &str = "x-ratelimit-remaining-tokens";
/// What the call's tightest budget has left, in dollars.
pub const REMAINING_USD: &str = "x-budget-remaining-usd";
/// On a refusal: milliseconds to wait before trying again.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";
/// On a refusal, read by gRPC clients' retry policies (negative: do not retry).
pub const RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";

//! The names of the metadata (gRPC) and headers (HTTP) the gateway writes on its answers and
//! refusals, in one place: the limiter, the budgets, the error mapping and the HTTP routes all
//! write or read them, and none of those should depend on another for a name. [`Quota`] is what
//! they say about a key's limits.

use http::{HeaderMap, HeaderValue};
use tonic::metadata::{MetadataMap, MetadataValue};

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

/// What a key has left, for the response metadata. `None`: that limit is off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    /// What the call's tightest spend budget (the key's or its team's) has left, in nano-dollars
    /// (`x-budget-remaining-usd`, in dollars).
    pub remaining_budget: Option<llmesh_ratelimit::budget::Nanos>,
}

impl Quota {
    /// Writes `x-ratelimit-remaining-requests` / `-tokens` and `x-budget-remaining-usd` (those
    /// that are limited).
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        for (name, value) in self.entries() {
            if let Ok(mut value) = HeaderValue::from_str(&value) {
                value.set_sensitive(true);
                headers.insert(name, value);
            }
        }
    }

    /// The same, into a tonic response's metadata.
    pub fn write_metadata(&self, metadata: &mut MetadataMap) {
        for (name, value) in self.entries() {
            if let Ok(mut value) = MetadataValue::try_from(value) {
                value.set_sensitive(true);
                metadata.insert(name, value);
            }
        }
    }

    /// The values change from call to call, so each is sent never indexed (as `grpc-timeout`:
    /// `deadline::set_timeout`).
    fn entries(&self) -> impl Iterator<Item = (&'static str, String)> {
        [
            (REMAINING_REQUESTS, self.remaining_requests.map(|n| n.to_string())),
            (REMAINING_TOKENS, self.remaining_tokens.map(|n| n.to_string())),
            (REMAINING_USD, self.remaining_budget.map(llmesh_ratelimit::budget::format_usd)),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a key has left changes from call to call: HPACK must not add it to its table.
    #[test]
    fn quotas_are_written_never_indexed() {
        let quota = Quota { remaining_requests: Some(9), remaining_tokens: Some(1_000), remaining_budget: None };
        let mut metadata = MetadataMap::new();
        quota.write_metadata(&mut metadata);
        let mut headers = HeaderMap::new();
        quota.write_headers(&mut headers);
        for (name, value) in [(REMAINING_REQUESTS, "9"), (REMAINING_TOKENS, "1000")] {
            let written = metadata.get(name).expect(name);
            assert_eq!(written, value);
            assert!(written.is_sensitive(), "{name}");
            let written = headers.get(name).expect(name);
            assert_eq!(written, value);
            assert!(written.is_sensitive(), "{name}");
        }
        assert!(metadata.get(REMAINING_USD).is_none() && headers.get(REMAINING_USD).is_none());
    }
}

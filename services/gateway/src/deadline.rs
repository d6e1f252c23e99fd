//! The call's deadline: the smaller of the client's `grpc-timeout` and the configured limit.
//! What remains of it is passed on to every downstream call.
//!
//! tonic's server enforces `grpc-timeout` itself, outside every layer of ours, and answers
//! CANCELLED when it fires. To give the client a real DEADLINE_EXCEEDED, the gateway's deadline
//! falls [`MARGIN`] before the client's.

use std::{future::Future, time::Duration};

use tokio::time::Instant;
use tonic::{Code, Status, metadata::MetadataMap};

/// How much earlier than the client's deadline the gateway gives up.
pub const MARGIN: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    /// The client's deadline is the one that binds: when it passes, nobody is listening.
    client_bound: bool,
}

impl Deadline {
    pub fn new(metadata: &MetadataMap, limit: Duration) -> Self {
        let client = metadata.get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        Self::within(client, limit)
    }

    /// The smaller of the client's own timeout (from whatever header its protocol sends it in)
    /// and `limit`, less [`MARGIN`] when the client's is the one that binds.
    pub fn within(client: Option<Duration>, limit: Duration) -> Self {
        let client = client.map(|c| c.saturating_sub(MARGIN));
        let (budget, client_bound) = match client {
            Some(client) if client <= limit => (client, true),
            _ => (limit, false),
        };
        Self { at: Instant::now() + budget, client_bound }
    }

    /// A deadline of the gateway's own, for calls no client waits on.
    pub fn after(limit: Duration) -> Self {
        Self { at: Instant::now() + limit, client_bound: false }
    }

    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// True when the client's own deadline is the one that binds (so past it, only
    /// DEADLINE_EXCEEDED makes sense); false when it is the gateway's configured limit (so a
    /// fallback answer can still reach the client).
    pub fn client_bound(&self) -> bool {
        self.client_bound
    }

    /// Runs `call` until the deadline. Expiry, here or reported by the callee as its own timeout,
    /// is DEADLINE_EXCEEDED.
    pub async fn run<T>(&self, what: &str, call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
        let exceeded = || Status::deadline_exceeded(format!("deadline exceeded waiting for {what}"));
        match tokio::time::timeout_at(self.at, call).await {
            Err(_) => Err(exceeded()),
            Ok(Err(status)) if status.code() == Code::Cancelled && self.remaining().is_zero() => Err(exceeded()),
            Ok(result) => result,
        }
    }
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_grpc_timeout("5"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("xS"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn client_timeout_wins_when_shorter() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "100m".parse().unwrap());
        assert_eq!(Deadline::new(&metadata, Duration::from_secs(30)).remaining(), Duration::from_millis(100) - MARGIN);
        assert_eq!(Deadline::new(&metadata, Duration::from_millis(50)).remaining(), Duration::from_millis(50));
        assert_eq!(Deadline::new(&MetadataMap::new(), Duration::from_secs(30)).remaining(), Duration::from_secs(30));
    }
}

#[cfg(test)]
mod run_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expiry_is_deadline_exceeded() {
        let deadline = Deadline::new(&MetadataMap::new(), Duration::from_millis(100));
        let slow = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, Status>(())
        };
        let status = deadline.run("generation", slow).await.unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(status.message().contains("generation"));
    }

    #[tokio::test(start_paused = true)]
    async fn callee_timeout_after_the_deadline_is_deadline_exceeded() {
        let deadline = Deadline::new(&MetadataMap::new(), Duration::ZERO);
        let cancelled = async { Err::<(), _>(Status::cancelled("Timeout expired")) };
        assert_eq!(deadline.run("x", cancelled).await.unwrap_err().code(), Code::DeadlineExceeded);
        let deadline = Deadline::new(&MetadataMap::new(), Duration::from_secs(1));
        let cancelled = async { Err::<(), _>(Status::cancelled("client went away")) };
        assert_eq!(deadline.run("x", cancelled).await.unwrap_err().code(), Code::Cancelled);
    }
}

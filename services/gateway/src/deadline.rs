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

/// `request.set_timeout(timeout)` without its `format!`: the same `grpc-timeout` value — the most
/// precise unit whose count fits the 8 digits gRPC allows (a test compares it with tonic's) —
/// written digit by digit. Every outgoing call sets one (three on a cache miss).
pub fn set_timeout<T>(request: &mut tonic::Request<T>, timeout: Duration) {
    const MAX: u32 = 99_999_999;
    // Counted in u64 and written from a u32 (at most 8 digits): their divisions are machine
    // instructions, a u128's is a call.
    let wide = |count: u128| u64::try_from(count).unwrap_or(u64::MAX);
    let secs = timeout.as_secs();
    let units = [
        (wide(timeout.as_nanos()), 'n'),
        (wide(timeout.as_micros()), 'u'),
        (wide(timeout.as_millis()), 'm'),
        (secs, 'S'),
        (secs / 60, 'M'),
        (secs / 3600, 'H'),
    ];
    let found =
        units.into_iter().find_map(|(count, unit)| u32::try_from(count).ok().filter(|c| *c <= MAX).zip(Some(unit)));
    let Some((count, unit)) = found else {
        // Over 11,000 years: tonic's own (which refuses it).
        request.set_timeout(timeout);
        return;
    };
    let mut digits = [0u8; 8];
    let mut start = digits.len();
    let mut rest = count;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut value = String::with_capacity(digits.len() - start + 1);
    value.extend(digits[start..].iter().map(|&d| char::from(d)));
    value.push(unit);
    match tonic::metadata::MetadataValue::try_from(value) {
        Ok(mut value) => {
            // A timeout measured off a deadline is never sent twice: it goes never indexed, or HPACK
            // would add each one to the connection's table, where no later call finds it, and
            // search it on every call. A whole number of milliseconds is a configured one (the
            // cache's budget), sent on every call: that one is worth indexing (docs/BENCHMARKS.md §27).
            value.set_sensitive(!timeout.subsec_nanos().is_multiple_of(1_000_000));
            request.metadata_mut().insert("grpc-timeout", value);
        }
        Err(_) => request.set_timeout(timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_written_as_tonic_writes_them() {
        let ours = |timeout| {
            let mut request = tonic::Request::new(());
            set_timeout(&mut request, timeout);
            request.metadata().get("grpc-timeout").cloned()
        };
        let tonics = |timeout| {
            let mut request = tonic::Request::new(());
            request.set_timeout(timeout);
            request.metadata().get("grpc-timeout").cloned()
        };
        let mut timeouts = vec![
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_nanos(99_999_999),
            Duration::from_nanos(100_000_000),
            Duration::from_millis(20),
            Duration::from_millis(30_005),
            Duration::from_secs(99_999),
            Duration::from_secs(100_000),
            Duration::from_secs(3600 * 99_999_999),
            Duration::new(1_234, 567_890_123),
        ];
        timeouts.extend((0..64).map(|shift| Duration::from_nanos(1u64 << shift)));
        for timeout in timeouts {
            assert_eq!(ours(timeout), tonics(timeout), "{timeout:?}");
        }
    }

    #[test]
    fn a_timeout_off_a_deadline_is_sent_never_indexed_and_a_configured_one_indexed() {
        let written = |timeout| {
            let mut request = tonic::Request::new(());
            set_timeout(&mut request, timeout);
            request.metadata().get("grpc-timeout").cloned().expect("grpc-timeout")
        };
        let measured = written(Duration::new(29, 999_123_456));
        assert_eq!(measured, "29999123u");
        assert!(measured.is_sensitive(), "HPACK must not add a value no later call sends to its table");
        let configured = written(Duration::from_millis(20));
        assert_eq!(configured, "20000000n");
        assert!(!configured.is_sensitive(), "a value every call sends is worth indexing");
    }

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

//! The GCRA script on Redis, with Redis' clock: one connection, each call within a timeout.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::gcra::{Cost, Decision, Limit, SCRIPT};

/// How long the first connection may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Reconnection attempts per failure: few, so that a failed attempt gives way to a fresh one soon
/// after Redis is back rather than sleeping through a long backoff.
const RECONNECT_RETRIES: usize = 1;

/// A lazy connection to `url` whose calls the caller bounds by `timeout` (the connection's own
/// response timeout is never below the connect timeout: a slow call fails the call, not the
/// connection).
pub(crate) fn connection(url: &str, timeout: Duration) -> Result<ConnectionManager, redis::RedisError> {
    let client = llmesh_util::redis::client(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(timeout.max(CONNECT_TIMEOUT)))
        .set_number_of_retries(RECONNECT_RETRIES)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client, config)
}

/// Runs [`SCRIPT`] on one Redis. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct RedisGcra {
    conn: ConnectionManager,
    script: redis::Script,
    timeout: Duration,
}

impl std::fmt::Debug for RedisGcra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisGcra").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// Why Redis did not decide.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply {0:?}")]
    Reply([i64; 5]),
    #[error("unexpected budget reply {0:?}")]
    BudgetReply(Vec<i64>),
}

impl RedisGcra {
    /// A lazy connection to `url`: nothing is sent until the first call. Each call waits at most
    /// `timeout`. Needs a Tokio runtime. Fails only on a malformed URL (the error may hold the
    /// URL: callers name it redacted).
    pub fn new(url: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        let conn = connection(url, timeout)?;
        Ok(Self { conn, script: redis::Script::new(SCRIPT), timeout: timeout.max(Duration::from_millis(1)) })
    }

    /// Connects and loads the script ahead of the first call, within the connect timeout.
    pub async fn warm_up(&self) -> Result<(), Failure> {
        let mut conn = self.conn.clone();
        let invocation = self.script.prepare_invoke();
        match tokio::time::timeout(CONNECT_TIMEOUT, invocation.load_async(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(Failure::Redis(error)),
            Err(_) => Err(Failure::Timeout(CONNECT_TIMEOUT)),
        }
    }

    /// One GCRA step on `key`, atomically, within the timeout.
    pub async fn decide(&self, key: &str, limit: Limit, cost: Cost) -> Result<Decision, Failure> {
        let (amount, force) = cost.as_args();
        let interval_ns = u64::try_from(limit.interval.as_nanos()).unwrap_or(u64::MAX);
        let mut conn = self.conn.clone();
        let mut invocation = self.script.key(key);
        invocation.arg(interval_ns).arg(limit.burst).arg(amount).arg(force);
        let reply: [i64; 5] = match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
            Ok(reply) => reply?,
            Err(_) => return Err(Failure::Timeout(self.timeout)),
        };
        decision_from_reply(reply).ok_or(Failure::Reply(reply))
    }
}

/// The script's reply `{allowed, new_tat, retry_after_us, remaining, now}` as a decision.
pub fn decision_from_reply([allowed, new_tat, retry_after, remaining, _now]: [i64; 5]) -> Option<Decision> {
    Some(Decision {
        allowed: match allowed {
            0 => false,
            1 => true,
            _ => return None,
        },
        new_tat: u64::try_from(new_tat).ok()?,
        retry_after: Duration::from_micros(u64::try_from(retry_after).ok()?),
        remaining: u64::try_from(remaining).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_checked() {
        let decision = decision_from_reply([1, 5, 0, 3, 4]).unwrap();
        assert_eq!((decision.allowed, decision.new_tat, decision.remaining), (true, 5, 3));
        assert_eq!(decision_from_reply([2, 5, 0, 3, 4]), None);
        assert_eq!(decision_from_reply([0, -5, 0, 3, 4]), None);
    }
}

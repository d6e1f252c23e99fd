//! A Redis connection whose every call has a deadline.
//!
//! The connection manager reconnects on its own, but a command sent while it reconnects waits for
//! the reconnection, and a response timeout alone does not bound that wait. So each call is also
//! wrapped in a timeout: when Redis is gone, callers hear `Unavailable` within the limit.

use std::{future::Future, time::Duration};

use redis::{Cmd, FromRedisValue, RedisResult, ScriptInvocation, aio::ConnectionManager};

use crate::{config::QueueConfig, error::QueueError};

/// Reconnection attempts per failure: few, so that a reconnection that failed gives way to a
/// fresh one soon after Redis is back, rather than sleeping through a long backoff.
const RECONNECT_RETRIES: usize = 1;
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub(crate) struct BoundedConnection {
    conn: ConnectionManager,
    limit: Duration,
}

impl std::fmt::Debug for BoundedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedConnection").field("limit", &self.limit).finish_non_exhaustive()
    }
}

impl BoundedConnection {
    /// A connection of its own, made on first use, whose calls may each take up to `limit`, and
    /// none longer than `longest_call` (a blocking read). A connection of its own matters for
    /// blocking reads: a blocked XREADGROUP holds up every command behind it on its connection.
    pub fn open(
        client: &redis::Client,
        config: &QueueConfig,
        limit: Duration,
        longest_call: Duration,
    ) -> Result<Self, QueueError> {
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout()))
            .set_response_timeout(Some(longest_call.max(limit)))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|cause| QueueError::from_redis("open a connection", cause))?;
        Ok(Self { conn, limit })
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    pub async fn query<T: FromRedisValue>(&self, operation: &'static str, cmd: &Cmd) -> Result<T, QueueError> {
        self.query_within(operation, cmd, self.limit).await
    }

    /// A call allowed longer than the usual limit: a blocking read, or the first call, which
    /// also connects.
    pub async fn query_within<T: FromRedisValue>(
        &self,
        operation: &'static str,
        cmd: &Cmd,
        limit: Duration,
    ) -> Result<T, QueueError> {
        let mut conn = self.conn.clone();
        bounded(operation, limit, cmd.query_async(&mut conn)).await
    }

    pub async fn invoke<T: FromRedisValue>(
        &self,
        operation: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, QueueError> {
        self.invoke_within(operation, invocation, self.limit).await
    }

    /// A script allowed a limit of its own (shorter, for a step on the way out).
    pub async fn invoke_within<T: FromRedisValue>(
        &self,
        operation: &'static str,
        invocation: &ScriptInvocation<'_>,
        limit: Duration,
    ) -> Result<T, QueueError> {
        let mut conn = self.conn.clone();
        bounded(operation, limit, invocation.invoke_async(&mut conn)).await
    }
}

async fn bounded<T>(
    operation: &'static str,
    limit: Duration,
    call: impl Future<Output = RedisResult<T>>,
) -> Result<T, QueueError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(cause)) => Err(QueueError::from_redis(operation, cause)),
        Err(_elapsed) => Err(QueueError::timeout(operation, limit)),
    }
}

/// Creates the consumer group (and the stream) if missing. From id 0, so that a group created
/// after jobs were submitted (Redis restarted, the group lost) still delivers them.
pub(crate) async fn ensure_group(
    conn: &BoundedConnection,
    stream: &str,
    group: &str,
    limit: Duration,
) -> Result<(), QueueError> {
    let create = redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(group).arg("0").arg("MKSTREAM").clone();
    match conn.query_within::<()>("create the consumer group", &create, limit).await {
        Err(QueueError::Rejected { cause, .. }) if cause.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// True when Redis says the consumer group does not exist (it restarted without data).
pub(crate) fn is_missing_group(error: &QueueError) -> bool {
    matches!(error, QueueError::Rejected { cause, .. } if cause.code() == Some("NOGROUP"))
}

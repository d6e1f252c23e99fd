//! What can go wrong, for callers of the queue ([`QueueError`]) and for the job a worker runs
//! ([`JobError`]).

use std::time::Duration;

use llmesh_proto::gateway::v1::JobState;

use crate::input::InvalidInput;

/// A failed queue operation.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis is down, unreachable or too slow: the operation may succeed later. The gateway maps
    /// this to `UNAVAILABLE`.
    #[error("the job queue is unavailable: {operation} failed")]
    Unavailable {
        operation: &'static str,
        #[source]
        cause: Outage,
    },
    /// No such job for this owner: never submitted, finished longer than the result TTL ago, or
    /// another owner's (which the caller must not be able to tell apart).
    #[error("job {id} does not exist (never submitted, expired, or not the caller's)")]
    NotFound { id: String },
    /// A job id or idempotency key no job could have: refused before any call to Redis.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The owner already has `limit` jobs that have not ended.
    #[error("{limit} jobs of this key have not ended yet (the most one key may have)")]
    TooManyUnfinished { limit: u64 },
    /// Only a job still waiting (queued, or waiting for a retry) can be cancelled.
    #[error("job {id} is {} and can no longer be cancelled", state.as_str_name())]
    NotCancellable { id: String, state: JobState },
    /// A job record in Redis that this code cannot read: written by something else, or damaged.
    #[error("job {id} has a corrupt record in redis")]
    Corrupt {
        id: String,
        #[source]
        cause: CorruptRecord,
    },
    /// Redis answered with an error that retrying will not fix (a wrong key type, a script
    /// error): a bug or a misconfigured Redis, not an outage.
    #[error("redis refused {operation}")]
    Rejected {
        operation: &'static str,
        #[source]
        cause: redis::RedisError,
    },
    #[error("invalid redis url {url}")]
    InvalidUrl {
        /// The URL with any password replaced.
        url: String,
        #[source]
        cause: redis::RedisError,
    },
}

/// Why Redis could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Outage {
    #[error("no answer from redis within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Redis(redis::RedisError),
}

/// Why a job record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CorruptRecord {
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    #[error("field `{field}` holds {value:?}, which is not {expected}")]
    Invalid { field: &'static str, value: String, expected: &'static str },
    #[error("field `{field}` is not a valid encoded message")]
    Undecodable {
        field: &'static str,
        #[source]
        cause: prost::DecodeError,
    },
    #[error("the stream entry {entry} names no job")]
    EntryWithoutJob { entry: String },
}

impl QueueError {
    /// True when the operation may succeed if tried again later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    /// Sorts a Redis error: connection trouble and a Redis that cannot serve right now are
    /// outages; anything else is a refusal.
    pub(crate) fn from_redis(operation: &'static str, cause: redis::RedisError) -> Self {
        if is_outage(&cause) {
            Self::Unavailable { operation, cause: Outage::Redis(cause) }
        } else {
            Self::Rejected { operation, cause }
        }
    }

    pub(crate) fn timeout(operation: &'static str, after: Duration) -> Self {
        Self::Unavailable { operation, cause: Outage::Timeout(after) }
    }
}

fn is_outage(error: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_unrecoverable_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
        )
}

pub(crate) use llmesh_util::errors::error_chain;

/// A failed attempt at a job, as reported by the worker's `execute` function.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    /// Whether trying again later may succeed (an overloaded or unreachable provider), as
    /// opposed to a request that will always fail (an unknown model, an invalid argument).
    pub retryable: bool,
    /// Stored on the job as its `error`, and shown to the client: no secrets.
    pub message: String,
}

impl JobError {
    /// A failure that a later attempt may not repeat.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self { retryable: true, message: message.into() }
    }

    /// A failure every attempt would repeat.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { retryable: false, message: message.into() }
    }
}

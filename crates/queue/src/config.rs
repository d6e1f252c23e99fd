//! Queue settings: names in Redis, the retry policy, and how long to wait on Redis.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// The stream jobs are queued on. Every other key of the queue is named after it, so two
    /// queues with different streams never see each other's jobs.
    pub stream: String,
    /// The consumer group all workers of this queue join.
    pub group: String,
    /// Retries after the first attempt, for failures that say a retry may help: at most
    /// `max_retries + 1` attempts. 3, as in the seed's Celery task.
    pub max_retries: u32,
    /// Retry `n` waits `backoff_base_ms * 2^(n-1)`, capped at `backoff_max_ms`, then ±20% jitter so
    /// jobs that failed together do not come back together.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// A job delivered to a worker that has not acknowledged it, nor sent a heartbeat, for this
    /// long is taken over by another worker: its worker is presumed dead.
    pub claim_idle_ms: u64,
    /// A job that ran shorter than this lets its worker read the next jobs ahead, so that a
    /// backlog of quick jobs costs one round trip to Redis a job; what was read ahead is given
    /// back, for any worker to take, once the job in hand runs longer (see `Worker`). At most a
    /// quarter of `claim_idle_ms`; 0: never read ahead.
    pub read_ahead_ms: u64,
    /// How long finished (and cancelled) jobs, with their results, stay readable.
    pub result_ttl_ms: u64,
    pub connect_timeout_ms: u64,
    /// Longest wait for one answer from Redis on the API path (submit, get, cancel, stats, watch).
    /// Small: when Redis is gone the caller should hear so at once, not after a TCP timeout.
    pub response_timeout_ms: u64,
    /// Longest wait for one answer on a worker's own connection. Larger than the API's: a worker
    /// is not latency-bound, and giving up on a slow answer after a job ran only delays its ack.
    pub worker_response_timeout_ms: u64,
    /// Most jobs one owner (an API key) may have that have not ended (queued, waiting for a
    /// retry, or running); past it `submit` refuses until one ends, so one key cannot fill Redis
    /// or bury the others' jobs. 0: no bound.
    pub max_unfinished_per_owner: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            stream: "llmesh:jobs".into(),
            group: "llmesh-workers".into(),
            max_retries: 3,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
            claim_idle_ms: 30_000,
            read_ahead_ms: 10,
            result_ttl_ms: 24 * 60 * 60 * 1_000,
            connect_timeout_ms: 1_000,
            response_timeout_ms: 50,
            worker_response_timeout_ms: 2_000,
            max_unfinished_per_owner: 1_000,
        }
    }
}

impl QueueConfig {
    /// Attempts a job gets in all: the first one and its retries.
    pub fn max_attempts(&self) -> u32 {
        self.max_retries.saturating_add(1)
    }

    pub(crate) fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms.max(1))
    }

    pub(crate) fn worker_response_timeout(&self) -> Duration {
        Duration::from_millis(self.worker_response_timeout_ms.max(1))
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }

    pub(crate) fn claim_idle(&self) -> Duration {
        Duration::from_millis(self.claim_idle_ms.max(1))
    }

    /// Below this, a job counts as quick and its worker reads ahead ([`Self::read_ahead_ms`]).
    pub(crate) fn quick_job(&self) -> Duration {
        Duration::from_millis(self.read_ahead_ms).min(self.claim_idle() / 4)
    }

    /// PEXPIRE takes at least 1 ms; 0 would delete a record the moment it finishes.
    pub(crate) fn result_ttl_ms(&self) -> u64 {
        self.result_ttl_ms.max(1)
    }
}

//! The client side of the queue: submit, read, cancel and count jobs.

use std::{sync::Arc, time::Duration};

use llmesh_common::redact::redact_url;
use llmesh_proto::{gateway::v1::Job, generation::v1::GenerateRequest};
use prost::Message as _;
use redis::FromRedisValue;

use crate::{
    config::QueueConfig,
    connection::{BoundedConnection, ensure_group},
    error::QueueError,
    keys::Keys,
    record::{SNAPSHOT_FIELDS, Snapshot, parse_snapshot},
    scripts::{CANCEL_SCRIPT, STATS_SCRIPT, SUBMIT_SCRIPT},
};

/// A handle on the queue. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct JobQueue {
    inner: Arc<Inner>,
}

struct Inner {
    /// Kept to open a connection per worker.
    client: redis::Client,
    api: BoundedConnection,
    keys: Keys,
    config: QueueConfig,
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobQueue").field("stream", &self.inner.keys.stream).finish_non_exhaustive()
    }
}

/// The answer to a submission.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    pub job: Job,
    /// True when the idempotency key named a job submitted earlier, which is the job returned.
    pub existing: bool,
}

/// How much work the queue holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Jobs on the stream not yet delivered to any worker (including cancelled jobs whose entry
    /// no worker has read yet).
    pub depth: u64,
    /// Jobs delivered to a worker and not yet acknowledged: running, or held by a dead worker
    /// until another claims them.
    pub pending: u64,
    /// Jobs waiting for a retry.
    pub delayed: u64,
    /// Entries in the dead-letter stream.
    pub dead_lettered: u64,
}

impl JobQueue {
    /// Connects to Redis and makes sure the stream and its consumer group exist. Fails with
    /// `Unavailable` when Redis does not answer within the connect timeout.
    pub async fn connect(url: &str, config: QueueConfig) -> Result<Self, QueueError> {
        let client =
            redis::Client::open(url).map_err(|cause| QueueError::InvalidUrl { url: redact_url(url), cause })?;
        let first_call = config.connect_timeout() + config.response_timeout();
        let api = BoundedConnection::open(&client, &config, config.response_timeout(), first_call)?;
        let keys = Keys::new(&config.stream);
        ensure_group(&api, &keys.stream, &config.group, first_call).await?;
        tracing::debug!(redis = %redact_url(url), stream = %keys.stream, group = %config.group, "job queue connected");
        Ok(Self { inner: Arc::new(Inner { client, api, keys, config }) })
    }

    pub fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// A new connection of its own, for a worker.
    pub(crate) fn open_connection(
        &self,
        limit: Duration,
        longest_call: Duration,
    ) -> Result<BoundedConnection, QueueError> {
        BoundedConnection::open(&self.inner.client, &self.inner.config, limit, longest_call)
    }

    /// Queues a request and returns at once with the job QUEUED. With a non-empty
    /// `idempotency_key` that an earlier submission used, and whose job is still kept, returns
    /// that job instead (`existing`), whatever its state; the check and the creation are one
    /// atomic step, so two racing submissions create one job.
    pub async fn submit(&self, request: &GenerateRequest, idempotency_key: &str) -> Result<Submitted, QueueError> {
        let keys = self.keys();
        let id = format!("job-{}", uuid::Uuid::now_v7().simple());
        let mut invocation = SUBMIT_SCRIPT.key(keys.job(&id));
        invocation.key(&keys.stream);
        if !idempotency_key.is_empty() {
            invocation.key(keys.idempotency(idempotency_key));
        }
        invocation.arg(&id).arg(request.encode_to_vec()).arg(&keys.job_prefix);
        let (id, existing, snapshot): (String, bool, Snapshot) = self.inner.api.invoke("submit", &invocation).await?;
        let job = self.job_from(&id, snapshot)?.ok_or(QueueError::NotFound { id })?;
        if !existing {
            tracing::debug!(job_id = %job.id, "job submitted");
        }
        Ok(Submitted { job, existing })
    }

    /// The job, or `None` when there is no such job (never submitted, or expired).
    pub async fn get(&self, id: &str) -> Result<Option<Job>, QueueError> {
        let mut hmget = redis::cmd("HMGET");
        hmget.arg(self.keys().job(id)).arg(&SNAPSHOT_FIELDS[..]);
        let snapshot: Snapshot = self.inner.api.query("get a job", &hmget).await?;
        self.job_from(id, snapshot)
    }

    /// Cancels a job that has not started, or is waiting for a retry. A running or finished job
    /// cannot be cancelled: `NotCancellable` says its state.
    pub async fn cancel(&self, id: &str) -> Result<Job, QueueError> {
        let keys = self.keys();
        let mut invocation = CANCEL_SCRIPT.key(keys.job(id));
        invocation.key(&keys.delayed).arg(id).arg(self.inner.config.result_ttl_ms());
        let (outcome, snapshot): (String, Snapshot) = self.inner.api.invoke("cancel a job", &invocation).await?;
        let job = self.job_from(id, snapshot)?;
        match (outcome.as_str(), job) {
            ("cancelled", Some(job)) => {
                tracing::debug!(job_id = %id, "job cancelled");
                Ok(job)
            }
            ("refused", Some(job)) => Err(QueueError::NotCancellable { id: id.to_owned(), state: job.state() }),
            _ => Err(QueueError::NotFound { id: id.to_owned() }),
        }
    }

    /// Counts the queue's jobs by where they are.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let keys = self.keys();
        let mut invocation = STATS_SCRIPT.key(&keys.stream);
        invocation.key(&keys.delayed).key(&keys.dead).arg(&self.inner.config.group);
        let counts: Counts = self.inner.api.invoke("count jobs", &invocation).await?;
        let Counts { entries, pending, delayed, dead_lettered } = counts;
        // Acknowledged entries are deleted, so the stream holds exactly the undelivered and the
        // pending ones.
        Ok(QueueStats { depth: entries.saturating_sub(pending), pending, delayed, dead_lettered })
    }

    fn job_from(&self, id: &str, snapshot: Snapshot) -> Result<Option<Job>, QueueError> {
        parse_snapshot(id, snapshot).map_err(|cause| QueueError::Corrupt { id: id.to_owned(), cause })
    }
}

/// The reply of the stats script.
struct Counts {
    entries: u64,
    pending: u64,
    delayed: u64,
    dead_lettered: u64,
}

impl FromRedisValue for Counts {
    fn from_redis_value(value: redis::Value) -> Result<Self, redis::ParsingError> {
        let (entries, pending, delayed, dead_lettered) = FromRedisValue::from_redis_value(value)?;
        Ok(Self { entries, pending, delayed, dead_lettered })
    }
}

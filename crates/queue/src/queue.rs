//! The client side of the queue: submit, read, cancel and count jobs.
//!
//! Every job has an owner (the API key id that submitted it), and every call about a job names
//! the caller: a job is only ever seen, found by idempotency key, or cancelled by its owner.
//! Another owner's job answers exactly as a job that does not exist (`None`, `NotFound`), so a
//! caller cannot learn that it exists. Job ids and idempotency keys are checked (see `input`)
//! before any call to Redis.

use std::{sync::Arc, time::Duration};

use llmesh_proto::{gateway::v1::Job, generation::v1::GenerateRequest};
use llmesh_util::redact::redact_url;
use prost::Message as _;
use redis::FromRedisValue;

use crate::{
    config::QueueConfig,
    connection::{BoundedConnection, ensure_group},
    error::QueueError,
    input::{check_idempotency_key, check_job_id, new_job_id},
    keys::Keys,
    record::{SNAPSHOT_FIELDS, Snapshot, Stored, parse_snapshot},
    reservation::{Settlement, TokenReservation, parse_reservation},
    scripts::{CANCEL_SCRIPT, STATS_SCRIPT, SUBMIT_CREATED, SUBMIT_EXISTING, SUBMIT_SCRIPT},
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

/// The answer to a cancellation.
#[derive(Debug, Clone, PartialEq)]
pub struct Cancelled {
    /// The job, now CANCELLED.
    pub job: Job,
    /// The job's token reservation, handed to this caller to refund (whole: the job used
    /// nothing). `None` when the job reserved nothing.
    pub settlement: Option<Settlement>,
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
            llmesh_util::redis::client(url).map_err(|cause| QueueError::InvalidUrl { url: redact_url(url), cause })?;
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

    /// Queues a request for `owner` and returns at once with the job QUEUED, storing `tokens`,
    /// the reservation the caller took for it, to be settled when the job ends. With a non-empty
    /// `idempotency_key` that an earlier submission of the same owner used, and whose job is
    /// still kept, returns that job instead (`existing`, and `tokens` is not stored: the caller
    /// gives it back), whatever its state; the check and the creation are one atomic step, so two
    /// racing submissions create one job. Another owner's use of the same key is no match.
    pub async fn submit(
        &self,
        owner: &str,
        request: &GenerateRequest,
        idempotency_key: &str,
        tokens: Option<&TokenReservation>,
    ) -> Result<Submitted, QueueError> {
        self.submit_with_budget(owner, request, idempotency_key, tokens, None).await
    }

    /// [`submit`](Self::submit), storing besides the job's money reservation (`budget`, text the
    /// queue hands back unread with the token reservation: see [`Settlement::budget`]).
    pub async fn submit_with_budget(
        &self,
        owner: &str,
        request: &GenerateRequest,
        idempotency_key: &str,
        tokens: Option<&TokenReservation>,
        budget: Option<&str>,
    ) -> Result<Submitted, QueueError> {
        check_idempotency_key(idempotency_key)?;
        let keys = self.keys();
        let id = new_job_id();
        let mut invocation = SUBMIT_SCRIPT.key(keys.job(&id));
        invocation.key(&keys.stream).key(keys.unfinished(owner));
        if !idempotency_key.is_empty() {
            invocation.key(keys.idempotency(owner, idempotency_key));
        }
        let (store, reserved, per_minute) = tokens.map(TokenReservation::fields).unwrap_or_default();
        let max_unfinished = self.inner.config.max_unfinished_per_owner;
        invocation.arg(&id).arg(request.encode_to_vec()).arg(&keys.job_prefix).arg(owner);
        invocation.arg(store).arg(reserved).arg(per_minute).arg(budget.unwrap_or_default()).arg(max_unfinished);
        let (id, outcome, snapshot): (String, u8, Snapshot) = self.inner.api.invoke("submit", &invocation).await?;
        let existing = match outcome {
            SUBMIT_CREATED => false,
            SUBMIT_EXISTING => true,
            _ => return Err(QueueError::TooManyUnfinished { limit: max_unfinished }),
        };
        let job = self.stored(&id, snapshot)?.ok_or(QueueError::NotFound { id })?.job;
        if !existing {
            tracing::debug!(job_id = %job.id, "job submitted");
        }
        Ok(Submitted { job, existing })
    }

    /// `owner`'s job, or `None` when it has no such job (never submitted, expired, or another
    /// owner's).
    pub async fn get(&self, owner: &str, id: &str) -> Result<Option<Job>, QueueError> {
        check_job_id(id)?;
        let mut hmget = redis::cmd("HMGET");
        hmget.arg(self.keys().job(id)).arg(&SNAPSHOT_FIELDS[..]);
        let snapshot: Snapshot = self.inner.api.query("get a job", &hmget).await?;
        Ok(self.stored(id, snapshot)?.filter(|stored| stored.owned_by(owner)).map(|stored| stored.job))
    }

    /// Cancels `owner`'s job that has not started, or is waiting for a retry, and hands its token
    /// reservation over to be refunded. A running or finished job cannot be cancelled:
    /// `NotCancellable` says its state. Another owner's job is `NotFound`, and untouched.
    pub async fn cancel(&self, owner: &str, id: &str) -> Result<Cancelled, QueueError> {
        check_job_id(id)?;
        let keys = self.keys();
        let mut invocation = CANCEL_SCRIPT.key(keys.job(id));
        invocation.key(&keys.delayed).arg(id).arg(self.inner.config.result_ttl_ms()).arg(owner);
        let (outcome, snapshot, reservation): (String, Snapshot, Snapshot) =
            self.inner.api.invoke("cancel a job", &invocation).await?;
        let stored = self.stored(id, snapshot)?;
        match (outcome.as_str(), stored) {
            ("cancelled", Some(stored)) => {
                tracing::debug!(job_id = %id, "job cancelled");
                let reservation =
                    parse_reservation(reservation).map_err(|cause| QueueError::Corrupt { id: id.to_owned(), cause })?;
                let settlement = reservation.map(|reserved| Settlement {
                    job_id: id.to_owned(),
                    owner: reserved.owner,
                    reservation: reserved.tokens,
                    used: 0,
                    succeeded: false,
                    usage: None,
                    budget: reserved.budget,
                });
                Ok(Cancelled { job: stored.job, settlement })
            }
            ("refused", Some(stored)) => {
                Err(QueueError::NotCancellable { id: id.to_owned(), state: stored.job.state() })
            }
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

    fn stored(&self, id: &str, snapshot: Snapshot) -> Result<Option<Stored>, QueueError> {
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

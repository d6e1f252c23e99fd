//! A worker's dealings with Redis: taking deliveries off the stream, and each step of one
//! delivery's life, from starting an attempt to acknowledging it.

use std::time::Duration;

use llmesh_proto::{common::v1::Usage, gateway::v1::JobState};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};

use crate::{
    config::QueueConfig,
    connection::{BoundedConnection, ensure_group, is_missing_group},
    error::{CorruptRecord, QueueError},
    keys::Keys,
    record::parse_state,
    reservation::{Settlement, parse_reservation},
    scripts::{
        BEGIN_ATTEMPT_SCRIPT, COMPLETE_SCRIPT, GIVE_BACK_SCRIPT, GIVE_UP_SCRIPT, PROMOTE_DUE_SCRIPT,
        SCHEDULE_RETRY_SCRIPT,
    },
};

/// Most due retries moved back onto the stream in one go; the rest follow on the next step.
const PROMOTE_BATCH: usize = 100;

/// One stream entry delivered to this worker: a job to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivery {
    pub entry: String,
    pub job_id: String,
}

/// What starting an attempt found.
#[derive(Debug)]
pub(crate) enum Begin {
    /// Run it: this is attempt `attempt` (from 1), with the stored request (`None` if missing);
    /// `since_created`: from the job's creation to this start (Redis's clock, whole ms).
    Run { attempt: u32, request: Option<Vec<u8>>, since_created: Duration },
    /// Already finished (the delivery is acknowledged): never run twice.
    Finished(JobState),
    /// The job record is gone (expired); the delivery is acknowledged.
    Gone,
    /// Every attempt was used, the last one lost with its worker: to dead-letter.
    Exhausted { attempts: u32 },
}

/// How an attempt ends.
#[derive(Debug)]
pub(crate) enum Ending {
    /// `usage`: what the answer reported using; `None` when it reported none (the token
    /// reservation then stands whole).
    Succeeded {
        result: Vec<u8>,
        usage: Option<Usage>,
    },
    Retry {
        delay: Duration,
        error: String,
    },
    GiveUp {
        state: JobState,
        error: String,
    },
}

/// What ending an attempt did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The job moved on; when that made it terminal and it had reserved tokens, they are this
    /// worker's to settle (and no one else's).
    Applied(Option<Settlement>),
    /// The job had finished meanwhile (another worker's result, or a cancel): nothing changed.
    AlreadyFinished(JobState),
    /// Another worker took the job over and started a newer attempt: nothing changed.
    Stale,
    Gone,
}

/// The worker's connection and the names it works with.
#[derive(Debug)]
pub(crate) struct Deliveries {
    conn: BoundedConnection,
    keys: Keys,
    group: String,
    consumer: String,
    claim_idle_ms: u64,
    result_ttl_ms: u64,
    max_attempts: u32,
    /// Where the next XAUTOCLAIM scan of the pending entries resumes.
    reclaim_cursor: String,
}

impl Deliveries {
    pub fn new(conn: BoundedConnection, keys: Keys, config: &QueueConfig, consumer: String) -> Self {
        Self {
            conn,
            keys,
            group: config.group.clone(),
            consumer,
            claim_idle_ms: config.claim_idle_ms.max(1),
            result_ttl_ms: config.result_ttl_ms(),
            max_attempts: config.max_attempts(),
            reclaim_cursor: "0-0".into(),
        }
    }

    /// How long one call may take.
    pub fn limit(&self) -> Duration {
        self.conn.limit()
    }

    /// Waits up to `block` for a job no worker has had yet.
    pub async fn read_new(&self, block: Duration) -> Result<Option<Delivery>, QueueError> {
        Ok(self.read(1, Some(block)).await?.into_iter().next())
    }

    /// Up to `count` jobs no worker has had yet, those already there: does not wait for more.
    pub async fn read_ready(&self, count: usize) -> Result<Vec<Delivery>, QueueError> {
        self.read(count, None).await
    }

    async fn read(&self, count: usize, block: Option<Duration>) -> Result<Vec<Delivery>, QueueError> {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP").arg(&self.group).arg(&self.consumer).arg("COUNT").arg(count);
        let mut limit = self.conn.limit();
        if let Some(block) = block {
            read.arg("BLOCK").arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1));
            limit += block;
        }
        read.arg("STREAMS").arg(&self.keys.stream).arg(">");
        let reply: Result<Option<StreamReadReply>, _> = self.conn.query_within("read the stream", &read, limit).await;
        let reply = self.recreate_group_if_missing(reply).await?.flatten();
        let entries = reply.and_then(|reply| reply.keys.into_iter().next()).map(|key| key.ids).unwrap_or_default();
        let mut deliveries = Vec::with_capacity(entries.len());
        for entry in entries {
            deliveries.extend(self.accept(entry).await?);
        }
        Ok(deliveries)
    }

    /// Gives back deliveries this worker holds and will not run, for any worker to take: each is
    /// queued again at the stream's end; `begun` is the attempt this worker started at the job,
    /// which is put back uncounted (see the script). Returns how many were queued again.
    pub async fn give_back(&self, deliveries: &[(Delivery, u32)], within: Duration) -> Result<u64, QueueError> {
        let mut invocation = GIVE_BACK_SCRIPT.key(&self.keys.stream);
        invocation.arg(&self.group);
        for (delivery, begun) in deliveries {
            invocation.key(self.keys.job(&delivery.job_id));
            invocation.arg(&delivery.entry).arg(&delivery.job_id).arg(*begun);
        }
        self.conn.invoke_within("give back jobs read ahead", &invocation, within).await
    }

    /// Takes over one job delivered to a worker that has not been heard of for the claim idle
    /// time: a worker that died, or hangs.
    pub async fn reclaim(&mut self) -> Result<Option<Delivery>, QueueError> {
        let mut claim = redis::cmd("XAUTOCLAIM");
        claim.arg(&self.keys.stream).arg(&self.group).arg(&self.consumer).arg(self.claim_idle_ms);
        claim.arg(&self.reclaim_cursor).arg("COUNT").arg(1);
        let reply: Result<StreamAutoClaimReply, _> = self.conn.query("claim idle jobs", &claim).await;
        let Some(reply) = self.recreate_group_if_missing(reply).await? else {
            return Ok(None);
        };
        self.reclaim_cursor = reply.next_stream_id;
        match reply.claimed.into_iter().next() {
            Some(entry) => self.accept(entry).await,
            None => Ok(None),
        }
    }

    /// True when the last look for abandoned jobs went through all pending deliveries.
    pub fn reclaim_scan_complete(&self) -> bool {
        self.reclaim_cursor == "0-0"
    }

    /// Tells the other workers this one is still at the job, so they do not take it over.
    /// False when the delivery is no longer pending (acknowledged by a worker that took over).
    pub async fn keep_alive(&self, delivery: &Delivery) -> Result<bool, QueueError> {
        let mut claim = redis::cmd("XCLAIM");
        claim.arg(&self.keys.stream).arg(&self.group).arg(&self.consumer).arg(0).arg(&delivery.entry).arg("JUSTID");
        let claimed: Vec<String> = self.conn.query("keep a job claimed", &claim).await?;
        Ok(!claimed.is_empty())
    }

    pub async fn begin(&self, delivery: &Delivery) -> Result<Begin, QueueError> {
        let mut invocation = BEGIN_ATTEMPT_SCRIPT.key(self.keys.job(&delivery.job_id));
        invocation.key(&self.keys.stream).arg(&self.group).arg(&delivery.entry).arg(self.max_attempts);
        let (outcome, state, attempts, request, since_created_ms): (String, Vec<u8>, u32, Option<Vec<u8>>, u64) =
            self.conn.invoke("start an attempt", &invocation).await?;
        let corrupt = |cause| QueueError::Corrupt { id: delivery.job_id.clone(), cause };
        match outcome.as_str() {
            "run" => {
                Ok(Begin::Run { attempt: attempts, request, since_created: Duration::from_millis(since_created_ms) })
            }
            "finished" => Ok(Begin::Finished(parse_state(state).map_err(corrupt)?)),
            "exhausted" => Ok(Begin::Exhausted { attempts }),
            _ => Ok(Begin::Gone),
        }
    }

    /// Ends attempt `attempt` and acknowledges the delivery, in one atomic step.
    pub async fn end(&self, delivery: &Delivery, attempt: u32, ending: &Ending) -> Result<Ended, QueueError> {
        let keys = &self.keys;
        let (operation, invocation) = match ending {
            Ending::Succeeded { result, .. } => {
                let mut invocation = COMPLETE_SCRIPT.key(keys.job(&delivery.job_id));
                invocation.key(&keys.stream).key(&keys.delayed);
                invocation.arg(&self.group).arg(&delivery.entry).arg(&delivery.job_id).arg(attempt);
                invocation.arg(result.as_slice()).arg(self.result_ttl_ms);
                ("store a result", invocation)
            }
            Ending::Retry { delay, error } => {
                let mut invocation = SCHEDULE_RETRY_SCRIPT.key(keys.job(&delivery.job_id));
                invocation.key(&keys.stream).key(&keys.delayed);
                invocation.arg(&self.group).arg(&delivery.entry).arg(&delivery.job_id).arg(attempt);
                invocation.arg(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)).arg(error);
                ("schedule a retry", invocation)
            }
            Ending::GiveUp { state, error } => {
                let mut invocation = GIVE_UP_SCRIPT.key(keys.job(&delivery.job_id));
                invocation.key(&keys.stream).key(&keys.dead);
                invocation.arg(&self.group).arg(&delivery.entry).arg(&delivery.job_id).arg(attempt);
                invocation.arg(state.as_str_name()).arg(error).arg(self.result_ttl_ms);
                ("give up on a job", invocation)
            }
        };
        let (outcome, reservation): (Vec<u8>, Vec<Option<Vec<u8>>>) = self.conn.invoke(operation, &invocation).await?;
        match outcome.as_slice() {
            b"applied" => {
                let reservation = parse_reservation(reservation)
                    .map_err(|cause| QueueError::Corrupt { id: delivery.job_id.clone(), cause })?;
                Ok(Ended::Applied(reservation.map(|reserved| {
                    let (used, usage, succeeded) = match ending {
                        Ending::Succeeded { usage, .. } => {
                            (usage.map_or(reserved.tokens.tokens, |usage| usage.total_tokens), *usage, true)
                        }
                        Ending::Retry { .. } | Ending::GiveUp { .. } => (0, None, false),
                    };
                    Settlement {
                        job_id: delivery.job_id.clone(),
                        owner: reserved.owner,
                        reservation: reserved.tokens,
                        used,
                        succeeded,
                        usage,
                        budget: reserved.budget,
                    }
                })))
            }
            b"stale" => Ok(Ended::Stale),
            b"gone" => Ok(Ended::Gone),
            _ => parse_state(outcome)
                .map(Ended::AlreadyFinished)
                .map_err(|cause| QueueError::Corrupt { id: delivery.job_id.clone(), cause }),
        }
    }

    /// Moves the retries that are due back onto the stream. Returns how long until the next one
    /// is due, if any is waiting.
    pub async fn promote_due(&self) -> Result<Option<Duration>, QueueError> {
        let mut invocation = PROMOTE_DUE_SCRIPT.key(&self.keys.delayed);
        invocation.key(&self.keys.stream).arg(PROMOTE_BATCH);
        let (moved, next_due_ms): (u64, i64) = self.conn.invoke("promote due retries", &invocation).await?;
        if moved > 0 {
            tracing::debug!(moved, "due retries queued again");
        }
        if moved as usize >= PROMOTE_BATCH {
            return Ok(Some(Duration::ZERO));
        }
        Ok(u64::try_from(next_due_ms).ok().map(Duration::from_millis))
    }

    /// The delivery in a stream entry. An entry this code did not write (no job field) is
    /// acknowledged and dropped, so that it does not come back forever.
    async fn accept(&self, entry: StreamId) -> Result<Option<Delivery>, QueueError> {
        if let Some(job_id) = entry.get::<String>("job") {
            return Ok(Some(Delivery { entry: entry.id, job_id }));
        }
        let cause = CorruptRecord::EntryWithoutJob { entry: entry.id.clone() };
        tracing::warn!(stream = %self.keys.stream, error = %cause, "dropping a stream entry");
        let mut ack = redis::cmd("XACK");
        ack.arg(&self.keys.stream).arg(&self.group).arg(&entry.id);
        self.conn.query::<()>("acknowledge a foreign entry", &ack).await?;
        let mut delete = redis::cmd("XDEL");
        delete.arg(&self.keys.stream).arg(&entry.id);
        self.conn.query::<()>("delete a foreign entry", &delete).await?;
        Ok(None)
    }

    /// Redis lost the group (it restarted empty): create it again, and report nothing read.
    async fn recreate_group_if_missing<T>(&self, reply: Result<T, QueueError>) -> Result<Option<T>, QueueError> {
        match reply {
            Ok(value) => Ok(Some(value)),
            Err(error) if is_missing_group(&error) => {
                tracing::warn!(stream = %self.keys.stream, group = %self.group, "consumer group missing; creating it again");
                ensure_group(&self.conn, &self.keys.stream, &self.group, self.conn.limit()).await?;
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use llmesh_proto::generation::v1::GenerateRequest;
    use llmesh_testkit::Redis;

    use super::*;
    use crate::JobQueue;

    const LIMIT: Duration = Duration::from_secs(2);
    const OWNER: &str = "alice";

    async fn queue_and_deliveries(redis: &Redis) -> (JobQueue, Deliveries) {
        let queue = JobQueue::connect(&redis.url(), QueueConfig::default()).await.unwrap();
        let conn = queue.open_connection(LIMIT, LIMIT * 2).unwrap();
        let deliveries = Deliveries::new(conn, queue.keys().clone(), queue.config(), "w1".into());
        (queue, deliveries)
    }

    fn request(prompt: &str) -> GenerateRequest {
        GenerateRequest { model: "sim".into(), prompt: prompt.into(), max_tokens: 8, ..Default::default() }
    }

    async fn pending(redis: &Redis) -> u64 {
        let mut conn = redis.connection().await.unwrap();
        let summary: Vec<redis::Value> =
            redis::cmd("XPENDING").arg("llmesh:jobs").arg("llmesh-workers").query_async(&mut conn).await.unwrap();
        redis::from_redis_value(summary[0].clone()).unwrap()
    }

    #[tokio::test]
    async fn a_started_job_given_back_is_queued_again_with_its_attempt_uncounted() {
        let redis = Redis::start().await.unwrap();
        let (queue, deliveries) = queue_and_deliveries(&redis).await;
        let job = queue.submit(OWNER, &request("x"), "", None).await.unwrap().job;
        let delivery = deliveries.read_new(Duration::from_millis(100)).await.unwrap().unwrap();
        let Begin::Run { attempt: 1, .. } = deliveries.begin(&delivery).await.unwrap() else {
            panic!("the first attempt starts")
        };

        assert_eq!(deliveries.give_back(&[(delivery.clone(), 1)], LIMIT).await.unwrap(), 1);
        let given_back = queue.get(OWNER, &job.id).await.unwrap().unwrap();
        assert_eq!((given_back.state(), given_back.attempts), (JobState::Queued, 0));
        assert_eq!(pending(&redis).await, 0, "the first delivery is acknowledged");

        let again = deliveries.read_ready(5).await.unwrap();
        assert_eq!(again.len(), 1, "queued once: {again:?}");
        assert_eq!(again[0].job_id, delivery.job_id);
        assert_ne!(again[0].entry, delivery.entry, "a new entry at the stream's end");
        assert!(matches!(deliveries.begin(&again[0]).await.unwrap(), Begin::Run { attempt: 1, .. }));
    }

    #[tokio::test]
    async fn a_delivery_given_back_twice_or_after_its_job_finished_is_not_queued_again() {
        let redis = Redis::start().await.unwrap();
        let (queue, deliveries) = queue_and_deliveries(&redis).await;
        let first = queue.submit(OWNER, &request("read ahead"), "", None).await.unwrap().job;
        let second = queue.submit(OWNER, &request("cancelled meanwhile"), "", None).await.unwrap().job;
        let read = deliveries.read_ready(2).await.unwrap();
        assert_eq!(read.iter().map(|d| d.job_id.as_str()).collect::<Vec<_>>(), [first.id.as_str(), second.id.as_str()]);
        queue.cancel(OWNER, &second.id).await.unwrap();

        let held: Vec<_> = read.iter().cloned().map(|delivery| (delivery, 0)).collect();
        assert_eq!(deliveries.give_back(&held, LIMIT).await.unwrap(), 1, "only the job still queued");
        assert_eq!(deliveries.give_back(&held, LIMIT).await.unwrap(), 0, "no longer pending: left alone");
        let again = deliveries.read_ready(5).await.unwrap();
        assert_eq!(again.iter().map(|d| d.job_id.as_str()).collect::<Vec<_>>(), [first.id.as_str()]);
        let job = queue.get(OWNER, &first.id).await.unwrap().unwrap();
        assert_eq!((job.state(), job.attempts), (JobState::Queued, 0), "never started: nothing to put back");
    }
}

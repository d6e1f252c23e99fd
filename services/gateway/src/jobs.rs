//! The gateway's job RPCs over the shared queue: `SubmitJob` answers at once with a job id, the
//! others read, follow or cancel the job's record.
//!
//! # What it promises
//! - A job belongs to the API key that submitted it (its [`Principal`]'s id; `anonymous` with
//!   auth off). `GetJob`, `WatchJob` and `CancelJob` on another key's job answer NOT_FOUND with
//!   the very message a job that does not exist gets, so no key can learn that another's job
//!   exists; an idempotency key only ever finds the same key's job. Jobs stored before jobs had
//!   owners are `anonymous`'s (see `llmesh_queue::LEGACY_OWNER`): with auth off they stay
//!   readable, with keys they are no one's.
//! - A job id is what `SubmitJob` issued (`job-` and 32 lowercase hex digits) and an
//!   idempotency key at most 128 bytes of printable ASCII; anything else is INVALID_ARGUMENT
//!   naming the field, before any call to Redis (and, for `SubmitJob`, before admission).
//! - `SubmitJob` reserves the key's tokens like `Generate` does (the prompt's estimate plus
//!   `max_tokens`), and the reservation outlives the call: it is stored with the job, and settled
//!   when the job ends, by the worker with the usage the answer reported (SUCCEEDED) or whole
//!   (FAILED, DEAD_LETTERED), and by this module when a caller cancels the job. A submission that
//!   fails, or finds an earlier job by idempotency key, gives its reservation back at once.
//!   Where the reservation was taken decides who can settle it: one taken in the limiter's Redis,
//!   any worker reaching that Redis; one this replica's local limiter took (no Redis for the
//!   limiter, or Redis failing then), only this replica, on cancel. Workers leave such a
//!   reservation charged, which errs on the side of the limit: the key's bucket on this replica
//!   fills again on its own within the minute.
//! - Under a spend budget, `SubmitJob` reserves the job's most expensive outcome too, exactly as
//!   `Generate` does, and the money reservation goes the tokens' way: stored with the job, handed
//!   over by the same step, settled by the worker with the cost of the usage the answer reported
//!   (the whole reservation when it reported none), and given back whole on FAILED,
//!   DEAD_LETTERED, or a cancel.
//! - A `WatchJob` lasts at most `queue.watch_max_ms`, then ends with DEADLINE_EXCEEDED telling the
//!   client to watch again: a watch never holds a call slot for as long as a job may wait.
//!
//! # What it does not
//! Admission itself (the model check and the token reservation) is the caller's, passed in:
//! jobs are admitted exactly as generate calls are.

use std::time::Duration;

use futures::{Stream, StreamExt as _};
use llmesh_proto::{
    gateway::v1::{
        CancelJobRequest, CancelJobResponse, GetJobRequest, GetJobResponse, SubmitJobRequest, SubmitJobResponse,
        WatchJobRequest, WatchJobResponse,
    },
    generation::v1::GenerateRequest,
};
use llmesh_queue::{
    JobQueue, QueueError, QueueSettings, ReservationStore, Settlement, TokenReservation, check_idempotency_key,
    check_job_id,
};
use tonic::{Request, Response, Status};

use llmesh_ratelimit::budget::StoredHold;

use crate::{
    admission::{
        Budgets, Held, Quota, RateLimiter,
        budget::Spend,
        rate_limit::{Reservation, Taken},
    },
    headers::{RETRY_AFTER_MS, RETRY_PUSHBACK_MS},
    principal::Principal,
};

/// The answer to `WatchJob`.
pub type WatchStream = futures::stream::BoxStream<'static, Result<WatchJobResponse, Status>>;

/// The queue, when one is configured, and how long a watch may last.
#[derive(Debug, Clone)]
pub struct Jobs {
    queue: Option<JobQueue>,
    watch_max: Duration,
}

impl Jobs {
    /// Connects when `queue.redis_url` is set. Redis unreachable at start-up is an error naming it.
    pub async fn connect(settings: &QueueSettings) -> anyhow::Result<Self> {
        let watch_max = Duration::from_millis(settings.watch_max_ms.max(1));
        let Some(url) = &settings.redis_url else { return Ok(Self { queue: None, watch_max }) };
        let queue = JobQueue::connect(url, settings.options.clone())
            .await
            .map_err(|error| anyhow::anyhow!("cannot reach the job queue's redis: {error}"))?;
        Ok(Self { queue: Some(queue), watch_max })
    }

    fn queue(&self) -> Result<&JobQueue, Status> {
        self.queue.as_ref().ok_or_else(|| {
            Status::failed_precondition("jobs: no job queue is configured (set gateway.queue.redis_url)")
        })
    }

    /// `SubmitJob`: checks the idempotency key, admits the request with `admit` (the key may use
    /// the model, and its tokens are reserved: the admission of a generate call), queues it for
    /// the caller with its token reservation, and answers with the job and what the key has left.
    pub async fn submit<A>(
        &self,
        request: Request<SubmitJobRequest>,
        limiter: &RateLimiter,
        budgets: &Budgets,
        admit: A,
    ) -> Result<Response<SubmitJobResponse>, Status>
    where
        A: AsyncFnOnce(Principal, &GenerateRequest) -> Result<(Principal, Held, Option<Spend>), Status>,
    {
        let queue = self.queue()?;
        let (_, extensions, request) = request.into_parts();
        check_idempotency_key(&request.idempotency_key).map_err(|error| Status::invalid_argument(error.to_string()))?;
        let idempotency_key = request.idempotency_key.clone();
        let mut generate: GenerateRequest = request.into();
        let (who, held, spend) = admit(Principal::of(&extensions), &generate).await?;
        // The worker's span continues this trace.
        generate.metadata.remove(llmesh_telemetry::JOB_TRACEPARENT_KEY);
        if let Some(traceparent) = llmesh_telemetry::current_traceparent() {
            generate.metadata.insert(llmesh_telemetry::JOB_TRACEPARENT_KEY.to_string(), traceparent);
        }
        let tokens = held.reservation().and_then(|reservation| stored(reservation, limiter.replica()));
        let remaining_budget = spend.as_ref().and_then(Spend::remaining);
        // Stored with the job; given back below when no job took it.
        let money = spend.and_then(|spend| budgets.store(spend));
        let encoded = money.as_ref().map(StoredHold::encode);
        let submitted =
            queue.submit_with_budget(&who.id, &generate, &idempotency_key, tokens.as_ref(), encoded.as_deref()).await;
        let submitted = match submitted {
            Ok(submitted) => submitted,
            Err(error) => {
                // `held` is dropped, and so refunded; the money goes back too: no job holds it.
                if let Some(money) = money {
                    budgets.settle_stored(money, 0).await;
                }
                return Err(status(error));
            }
        };
        let quota = if submitted.existing {
            // The earlier job holds its own reservations; these go back.
            if let Some(money) = money {
                budgets.settle_stored(money, 0).await;
            }
            held.settle(0)
        } else {
            let quota = Quota { remaining_budget, ..held.quota() };
            // Now the job's, settled when it ends.
            let _job_holds_it = held.detach();
            quota
        };
        let mut response = Response::new(SubmitJobResponse { job: Some(submitted.job), existing: submitted.existing });
        quota.write_metadata(response.metadata_mut());
        Ok(response)
    }

    /// `GetJob`: the caller's job.
    pub async fn get(&self, request: Request<GetJobRequest>) -> Result<Response<GetJobResponse>, Status> {
        let queue = self.queue()?;
        let who = Principal::of(request.extensions());
        let id = job_id(&request.get_ref().job_id)?;
        let job = queue.get(&who.id, id).await.map_err(status)?.ok_or_else(not_found)?;
        Ok(Response::new(GetJobResponse { job: Some(job) }))
    }

    /// `WatchJob`: the caller's job now and at each change, until it ends or the watch has lasted
    /// `watch_max`.
    pub async fn watch(&self, request: Request<WatchJobRequest>) -> Result<Response<WatchStream>, Status> {
        let queue = self.queue()?;
        let who = Principal::of(request.extensions());
        let id = job_id(&request.get_ref().job_id)?;
        let changes = queue
            .watch(&who.id, id)
            .map(|change| change.map(|job| WatchJobResponse { job: Some(job) }).map_err(status));
        Ok(Response::new(at_most(changes, self.watch_max).boxed()))
    }

    /// `CancelJob`: cancels the caller's waiting job and gives its token reservation back.
    pub async fn cancel(
        &self,
        request: Request<CancelJobRequest>,
        limiter: &RateLimiter,
        budgets: &Budgets,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let queue = self.queue()?;
        let who = Principal::of(request.extensions());
        let id = job_id(&request.get_ref().job_id)?;
        let cancelled = queue.cancel(&who.id, id).await.map_err(status)?;
        let quota = match cancelled.settlement {
            Some(settlement) => refund(limiter, budgets, settlement).await,
            None => Quota::default(),
        };
        let mut response = Response::new(CancelJobResponse { job: Some(cancelled.job) });
        quota.write_metadata(response.metadata_mut());
        Ok(response)
    }
}

fn job_id(id: &str) -> Result<&str, Status> {
    check_job_id(id).map_err(|error| Status::invalid_argument(error.to_string()))?;
    Ok(id)
}

/// What a job stores of its reservation; `None` when the key's tokens are unlimited.
fn stored(reservation: &Reservation, replica: &str) -> Option<TokenReservation> {
    let limit = reservation.limit()?;
    let store = match reservation.taken() {
        Taken::Shared => ReservationStore::Shared,
        Taken::Local => ReservationStore::Local { replica: replica.to_owned() },
    };
    Some(TokenReservation { store, tokens: reservation.tokens(), per_minute: limit.burst })
}

/// Gives a cancelled job's reservations back where they were taken, when this replica can reach them.
async fn refund(limiter: &RateLimiter, budgets: &Budgets, settlement: Settlement) -> Quota {
    let Settlement { owner, reservation, used, job_id, budget, .. } = settlement;
    match budget.as_deref().map(StoredHold::decode) {
        Some(Ok(money)) => budgets.settle_stored(money, 0).await,
        Some(Err(error)) => {
            tracing::warn!(%job_id, %error, "the cancelled job's money reservation is unreadable; it stays held")
        }
        None => {}
    }
    let taken = match reservation.store {
        ReservationStore::Shared => Taken::Shared,
        ReservationStore::Local { replica } if replica == limiter.replica() => Taken::Local,
        ReservationStore::Local { .. } => {
            tracing::debug!(%job_id, "the cancelled job's tokens were reserved on another replica; they stay charged");
            return Quota::default();
        }
    };
    limiter.settle(limiter.restore(&owner, reservation.tokens, reservation.per_minute, taken), used).await
}

/// Ends `changes` with DEADLINE_EXCEEDED once it has run for `limit`.
fn at_most(
    changes: impl Stream<Item = Result<WatchJobResponse, Status>> + Send + Unpin + 'static,
    limit: Duration,
) -> impl Stream<Item = Result<WatchJobResponse, Status>> + Send + 'static {
    let deadline = Box::pin(tokio::time::sleep(limit));
    futures::stream::unfold(Some((changes, deadline)), move |state| async move {
        let (mut changes, mut deadline) = state?;
        tokio::select! {
            biased;
            change = changes.next() => change.map(|change| (change, Some((changes, deadline)))),
            () = &mut deadline => Some((Err(watch_expired(limit)), None)),
        }
    })
}

fn watch_expired(limit: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "watch: a watch lasts at most {} ms (gateway.queue.watch_max_ms); the job goes on: call WatchJob again",
        limit.as_millis()
    ))
}

/// The one answer for a job the caller has no access to, whether it never existed, expired, or
/// is another key's: the same code and the same words, so the answer tells nothing.
fn not_found() -> Status {
    Status::not_found("job_id: no such job (never submitted with this key, or expired)")
}

/// The wait suggested to a key at its bound of unfinished jobs: when one ends cannot be known,
/// and polling faster than this gains nothing.
const UNFINISHED_RETRY_AFTER_MS: u64 = 1_000;

/// A queue failure as the status a client can act on.
fn status(error: QueueError) -> Status {
    match error {
        QueueError::NotFound { .. } => not_found(),
        QueueError::Invalid(invalid) => Status::invalid_argument(invalid.to_string()),
        QueueError::TooManyUnfinished { limit } => {
            let mut status = Status::resource_exhausted(format!(
                "jobs: this key already has {limit} jobs that have not ended (gateway.queue.options.max_unfinished_per_owner); submit again when one has"
            ));
            let wait = tonic::metadata::MetadataValue::from(UNFINISHED_RETRY_AFTER_MS);
            status.metadata_mut().insert(RETRY_AFTER_MS, wait.clone());
            status.metadata_mut().insert(RETRY_PUSHBACK_MS, wait);
            status
        }
        QueueError::NotCancellable { id, state } => {
            Status::failed_precondition(format!("job {id} is {} and can no longer be cancelled", state.as_str_name()))
        }
        error if error.is_unavailable() => Status::unavailable(format!("job queue unavailable: {error}")),
        error => Status::internal(format!("job queue: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;
    use llmesh_proto::gateway::v1::Job;
    use tonic::Code;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_watch_ends_with_deadline_exceeded_after_its_limit() {
        let update = || Ok(WatchJobResponse { job: Some(Job::default()) });
        // One update, then a job that never changes again.
        let changes = futures::stream::iter([update()]).chain(futures::stream::pending()).boxed();
        let started = tokio::time::Instant::now();
        let seen: Vec<_> = at_most(changes, Duration::from_secs(300)).collect().await;
        assert_eq!(started.elapsed(), Duration::from_secs(300));
        assert_eq!(seen.len(), 2);
        assert!(seen[0].is_ok());
        let status = seen[1].as_ref().unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(status.message().contains("call WatchJob again"), "{status:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_ends_on_its_own_ends_at_once() {
        let changes = futures::stream::iter([Ok(WatchJobResponse::default())]).boxed();
        let started = tokio::time::Instant::now();
        let seen: Vec<_> = at_most(changes, Duration::from_secs(300)).collect().await;
        assert_eq!((seen.len(), started.elapsed()), (1, Duration::ZERO));
    }

    #[test]
    fn every_way_of_not_having_a_job_reads_the_same() {
        let missing = status(QueueError::NotFound { id: "job-1".into() });
        let other = status(QueueError::NotFound { id: "job-2".into() });
        assert_eq!((missing.code(), missing.message()), (other.code(), other.message()));
        assert_eq!(missing.code(), Code::NotFound);
        assert_eq!(not_found().message(), missing.message());
    }

    #[test]
    fn bad_ids_are_invalid_arguments_naming_the_field() {
        let status = job_id("job-nope").unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("job_id: "), "{status:?}");
        assert!(job_id("job-0123456789abcdef0123456789abcdef").is_ok());
    }
}

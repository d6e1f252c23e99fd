//! Workers: take jobs off the queue, run them, and record how each attempt ended.
//!
//! A worker runs one job at a time; run several, each under its own consumer name, for more.
//! Each step of its loop:
//! 1. moves the retries that are due back onto the stream (while jobs keep coming, at most every
//!    20 ms: a due retry may wait that much longer);
//! 2. now and then, takes over a job delivered to a worker that stopped answering (XAUTOCLAIM);
//! 3. waits for a new job (XREADGROUP BLOCK on a connection of its own), no longer than until
//!    the next retry is due or the next look for abandoned jobs.
//!
//! While a job runs, the worker re-claims its delivery every third of the claim idle time: a long
//! job is not mistaken for one whose worker died.
//!
//! **Reading ahead.** While jobs are quick (the last one ran under `read_ahead_ms`, 10 ms by
//! default, and at most a quarter of the claim idle time), the worker reads ahead: as it records
//! how a job ended, it starts the job it read ahead and reads the one after, three commands sent
//! together in one round trip to Redis. A backlog of quick jobs then costs one round trip a job instead of three.
//! The worker holds at most two jobs besides the one it runs, one in steady state. What it read
//! ahead waits in its hand no longer than the quick-job bound: when the job it runs takes longer,
//! the worker gives back what it read ahead (acknowledged, then queued again at the stream's end,
//! in one script) for any worker to take, so a slow job never holds up another behind it. A
//! stopping worker gives back what it holds but has not run, a job it started but did not run put
//! back uncounted. A worker that crashes leaves what it held pending, like the job it ran, for
//! another worker to take over after the claim idle time.
//!
//! When the worker's step makes a job terminal, and the job reserved tokens, the worker settles
//! them through the function given to [`Worker::settling_with`] (without one they stay charged):
//! with the usage the answer reported, or none for a job that failed or was dead-lettered.
//!
//! When it starts a job's first attempt, the worker tells the function given to
//! [`Worker::observing_waits`] how long the job waited in the queue: from its submission to that
//! start, both on Redis's clock (whole milliseconds), so workers on skewed hosts agree. Later
//! attempts (retries, take-overs) are not reported: their time since submission holds earlier
//! attempts and retry delays, not a wait in the queue alone.

mod delivery;

use std::{
    collections::VecDeque, convert::Infallible, future::Future, panic::AssertUnwindSafe, pin::pin, sync::Arc,
    time::Duration,
};

use futures::{FutureExt as _, future::BoxFuture};
use llmesh_proto::{
    gateway::v1::JobState,
    generation::v1::{GenerateRequest, GenerateResponse},
};
use prost::Message as _;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument as _;

use self::delivery::{Begin, Deliveries, Delivery, Ended, Ending};
use crate::{
    JobQueue,
    backoff::{Backoff, OutageBackoff},
    error::{JobError, QueueError, error_chain},
    reservation::Settlement,
};

/// Longest a single blocking read waits. Shutdown does not wait for it (the loop is dropped);
/// it bounds how stale the worker's view of the delayed set can get.
const MAX_BLOCK: Duration = Duration::from_secs(1);
/// Shortest wait between steps when a retry is due right away, so the loop never spins.
const MIN_BLOCK: Duration = Duration::from_millis(5);
/// While jobs keep coming, due retries are moved back onto the stream at most this often (a
/// script call each time, once a job before): a busy worker spends its round trips on jobs, and a
/// due retry waits at most this much longer for it. A worker that wakes from waiting looks at once.
const PROMOTE_EVERY: Duration = Duration::from_millis(20);
/// Most jobs a worker holds besides the one it runs: started while the last one ended, or read.
const READ_AHEAD: usize = 2;
/// Longest a stopping worker spends giving back what it holds; after that, what it held is taken
/// over after the claim idle time, as a crashed worker's.
const GIVE_BACK_ON_SHUTDOWN: Duration = Duration::from_millis(250);
/// Pauses after a failed step (Redis down): from 100 ms, doubling, up to 5 s.
const OUTAGE_PAUSE: Backoff = Backoff::from_millis(100, 5_000);

/// Settles the token reservation of a job this worker ended.
type Settle = Arc<dyn Fn(Settlement) -> BoxFuture<'static, ()> + Send + Sync>;

/// Hears how long each job waited in the queue before its first attempt.
type ObserveWait = Arc<dyn Fn(Duration) + Send + Sync>;

/// Takes jobs off a queue and runs them.
pub struct Worker {
    queue: JobQueue,
    consumer: String,
    settle: Option<Settle>,
    observe_wait: Option<ObserveWait>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue)
            .field("consumer", &self.consumer)
            .field("settles", &self.settle.is_some())
            .field("observes_waits", &self.observe_wait.is_some())
            .finish()
    }
}

impl Worker {
    /// `consumer_name` names this worker in the consumer group: unique among live workers, and
    /// best stable across restarts of the same worker (a host name and an index).
    pub fn new(queue: JobQueue, consumer_name: impl Into<String>) -> Self {
        Self { queue, consumer: consumer_name.into(), settle: None, observe_wait: None }
    }

    /// Tells `observe` how long each job this worker starts waited in the queue: from its
    /// submission to the start of its first attempt (see the module doc). Called on the worker's
    /// task before the job runs, so keep it quick (a metric, not a call over the network).
    #[must_use]
    pub fn observing_waits(mut self, observe: impl Fn(Duration) + Send + Sync + 'static) -> Self {
        self.observe_wait = Some(Arc::new(observe));
        self
    }

    /// Settles the token reservations of the jobs this worker ends with `settle`, awaited before
    /// the worker takes its next job (so bound it in time). Each reservation comes once, to one
    /// worker (see [`Settlement`]). Failures are `settle`'s to log: the job has ended either way.
    #[must_use]
    pub fn settling_with<S, Fut>(mut self, settle: S) -> Self
    where
        S: Fn(Settlement) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.settle = Some(Arc::new(move |settlement| settle(settlement).boxed()));
        self
    }

    /// Runs jobs until `shutdown` resolves. `execute` runs one attempt; its error says whether
    /// another attempt may help.
    ///
    /// On shutdown the job in hand, if any, is abandoned: its delivery stays pending, and another
    /// worker takes it over after the claim idle time. The jobs read ahead are given back first
    /// (within 250 ms; past that they too are taken over after the claim idle time). While Redis
    /// is down the worker pauses
    /// between tries, from 100 ms up to 5 s. Returns an error only when the worker cannot
    /// start (its connection cannot be set up); a Redis outage never ends it.
    pub async fn run<F, Fut>(self, execute: F, shutdown: impl Future<Output = ()>) -> Result<(), QueueError>
    where
        F: Fn(GenerateRequest) -> Fut,
        Fut: Future<Output = Result<GenerateResponse, JobError>>,
    {
        let span = tracing::info_span!("worker", consumer = %self.consumer, stream = %self.queue.keys().stream);
        let worker = WorkerLoop::new(&self.queue, self.consumer, execute, self.settle, self.observe_wait)?;
        worker.run(shutdown).instrument(span).await;
        Ok(())
    }
}

/// The state of a running worker.
struct WorkerLoop<F> {
    deliveries: Deliveries,
    execute: F,
    settle: Option<Settle>,
    observe_wait: Option<ObserveWait>,
    max_attempts: u32,
    retry_backoff: Backoff,
    rng: fastrand::Rng,
    /// Longest an attempt's end is retried while Redis is unreachable: half the claim idle time,
    /// after which another worker may take the job over anyway.
    end_patience: Duration,
    reclaim_every: Duration,
    heartbeat_every: Duration,
    next_reclaim: Instant,
    /// When due retries are next moved back onto the stream ([`PROMOTE_EVERY`]).
    next_promote: Instant,
    /// When the earliest retry this worker knows of is due (as of its last look).
    next_due: Option<Instant>,
    /// A job that ran shorter than this lets the worker read ahead (`read_ahead_ms`); zero: never.
    quick_job: Duration,
    /// The job started as the last one ended: the next to run.
    started: Option<(Delivery, Begin)>,
    /// Deliveries read ahead, not started, oldest first.
    ahead: VecDeque<Delivery>,
}

impl<F, Fut> WorkerLoop<F>
where
    F: Fn(GenerateRequest) -> Fut,
    Fut: Future<Output = Result<GenerateResponse, JobError>>,
{
    fn new(
        queue: &JobQueue,
        consumer: String,
        execute: F,
        settle: Option<Settle>,
        observe_wait: Option<ObserveWait>,
    ) -> Result<Self, QueueError> {
        let config = queue.config();
        let limit = config.worker_response_timeout();
        let conn = queue.open_connection(limit, MAX_BLOCK + limit)?;
        let claim_idle = config.claim_idle();
        Ok(Self {
            deliveries: Deliveries::new(conn, queue.keys().clone(), config, consumer),
            execute,
            settle,
            observe_wait,
            max_attempts: config.max_attempts(),
            retry_backoff: Backoff::new(
                Duration::from_millis(config.backoff_base_ms),
                Duration::from_millis(config.backoff_max_ms),
            ),
            rng: fastrand::Rng::new(),
            end_patience: claim_idle / 2,
            reclaim_every: (claim_idle / 2).max(MIN_BLOCK),
            heartbeat_every: (claim_idle / 3).max(MIN_BLOCK),
            next_reclaim: Instant::now(),
            next_promote: Instant::now(),
            next_due: None,
            quick_job: config.quick_job(),
            started: None,
            ahead: VecDeque::with_capacity(READ_AHEAD),
        })
    }

    async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = pin!(shutdown);
        let mut outages = OutageBackoff::new(OUTAGE_PAUSE);
        tracing::info!("worker started");
        loop {
            let step = tokio::select! {
                biased;
                () = &mut shutdown => break,
                step = self.step() => step,
            };
            match step {
                Ok(()) if outages.failures() > 0 => {
                    tracing::info!(failed_steps = outages.failures(), "redis answers again");
                    outages.reset();
                }
                Ok(()) => {}
                Err(error) => {
                    let pause = outages.next_pause();
                    tracing::warn!(error = %error_chain(&error), pause_ms = pause.as_millis(), "worker step failed");
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
        self.give_back_held().await;
        tracing::info!("worker stopped");
    }

    /// On the way out: gives back the jobs this worker holds but has not run.
    async fn give_back_held(&mut self) {
        let mut held: Vec<(Delivery, u32)> = self
            .started
            .take()
            .and_then(|(delivery, begun)| match begun {
                Begin::Run { attempt, .. } => Some((delivery, attempt)),
                Begin::Exhausted { .. } => Some((delivery, 0)),
                // Already acknowledged.
                Begin::Finished(_) | Begin::Gone => None,
            })
            .into_iter()
            .collect();
        held.extend(self.ahead.drain(..).map(|delivery| (delivery, 0)));
        if held.is_empty() {
            return;
        }
        match self.deliveries.give_back(&held, GIVE_BACK_ON_SHUTDOWN).await {
            Ok(queued) => tracing::info!(held = held.len(), queued, "gave back the jobs held but not run"),
            Err(error) => tracing::warn!(
                error = %error_chain(&error),
                held = held.len(),
                "cannot give back the jobs held; they are taken over after the claim idle time"
            ),
        }
    }

    async fn step(&mut self) -> Result<(), QueueError> {
        let now = Instant::now();
        let looked = now >= self.next_promote;
        if looked {
            let next_due = self.deliveries.promote_due().await?;
            self.next_due = next_due.map(|wait| now + wait);
            // More were due than one script moves: look again at the next step.
            self.next_promote = if next_due == Some(Duration::ZERO) { now } else { now + PROMOTE_EVERY };
        }
        if let Some((delivery, begun)) = self.started.take() {
            return self.handle(delivery, begun).await;
        }
        if now >= self.next_reclaim {
            let reclaimed = self.deliveries.reclaim().await?;
            // Look again at once while there is more to look at; otherwise after a while.
            if reclaimed.is_none() && self.deliveries.reclaim_scan_complete() {
                self.next_reclaim = now + self.reclaim_every;
            }
            if let Some(delivery) = reclaimed {
                tracing::info!(job_id = %delivery.job_id, "taking over a job whose worker stopped answering");
                return self.start(delivery).await;
            }
        }
        if let Some(delivery) = self.ahead.pop_front() {
            return self.start(delivery).await;
        }
        let until = |at: Instant| at.saturating_duration_since(now);
        let mut block = self.next_due.map_or(MAX_BLOCK, until).min(until(self.next_reclaim));
        if !looked {
            // What this worker knows of the retries may be stale (it, or another worker, may have
            // scheduled one since): wait no longer than until the next look.
            block = block.min(until(self.next_promote));
        }
        let block = block.clamp(MIN_BLOCK, MAX_BLOCK);
        match self.deliveries.read_new(block).await? {
            Some(delivery) => self.start(delivery).await,
            None => Ok(()),
        }
    }

    /// Starts an attempt at the delivery and runs it. When the start fails (Redis down), the
    /// delivery is kept to start at the next step.
    async fn start(&mut self, delivery: Delivery) -> Result<(), QueueError> {
        match self.deliveries.begin(&delivery).await {
            Ok(begun) => self.handle(delivery, begun).await,
            Err(error) => {
                self.ahead.push_front(delivery);
                Err(error)
            }
        }
    }

    async fn handle(&mut self, delivery: Delivery, begun: Begin) -> Result<(), QueueError> {
        let span = tracing::info_span!("job", job_id = %delivery.job_id);
        async {
            match begun {
                Begin::Run { attempt, request, since_created } => {
                    tracing::debug!(attempt, since_created_ms = since_created.as_millis(), "attempt started");
                    if let (1, Some(observe)) = (attempt, &self.observe_wait) {
                        observe(since_created);
                    }
                    let ran = Instant::now();
                    let started = read_request(request).and_then(|request| {
                        std::panic::catch_unwind(AssertUnwindSafe(|| (self.execute)(request))).map_err(|_| panicked())
                    });
                    let outcome = match started {
                        Ok(attempt) => {
                            let running = run_claimed(attempt, &self.deliveries, &delivery, self.heartbeat_every);
                            give_back_when_slow(running, &self.deliveries, &mut self.ahead, self.quick_job).await
                        }
                        Err(error) => Err(error),
                    };
                    let quick = ran.elapsed() < self.quick_job;
                    let ending = self.ending(attempt, outcome);
                    self.end(&delivery, attempt, ending, quick).await
                }
                Begin::Finished(state) => {
                    tracing::info!(state = state.as_str_name(), "job already finished; acknowledged, not run again");
                    Ok(())
                }
                Begin::Gone => {
                    tracing::info!("job record gone (expired); acknowledged");
                    Ok(())
                }
                Begin::Exhausted { attempts } => {
                    let error = format!("no attempts left: the worker running attempt {attempts} stopped answering");
                    let ending = Ending::GiveUp { state: JobState::DeadLettered, error };
                    self.end(&delivery, attempts, ending, !self.quick_job.is_zero()).await
                }
            }
        }
        .instrument(span)
        .await
    }

    fn ending(&mut self, attempt: u32, outcome: Result<GenerateResponse, JobError>) -> Ending {
        match outcome {
            Ok(response) => Ending::Succeeded { result: response.encode_to_vec(), usage: response.usage },
            Err(JobError { retryable: true, message }) if attempt < self.max_attempts => {
                Ending::Retry { delay: self.retry_backoff.delay(attempt, &mut self.rng), error: message }
            }
            // Retries used up: dead-lettered, to look at and maybe replay. A failure no retry
            // would fix (the request itself is wrong) just fails: replaying it would fail again.
            Err(JobError { retryable, message }) => {
                let state = if retryable { JobState::DeadLettered } else { JobState::Failed };
                Ending::GiveUp { state, error: message }
            }
        }
    }

    /// Records how the attempt ended; meanwhile, after a quick job, reads ahead (see the module
    /// doc). (`&mut self`, like every method awaited in the loop: the loop's future then needs
    /// `F: Send` only, not `F: Sync`.)
    async fn end(&mut self, delivery: &Delivery, attempt: u32, ending: Ending, quick: bool) -> Result<(), QueueError> {
        let (ended, started) = tokio::join!(
            record_ending(&self.deliveries, delivery, attempt, &ending, self.end_patience),
            read_ahead(&self.deliveries, &mut self.ahead, quick),
        );
        self.started = started;
        let ended = ended?;
        log_ending(attempt, &ending, &ended);
        if let Ended::Applied(Some(settlement)) = ended {
            match &self.settle {
                Some(settle) => settle(settlement).await,
                None => {
                    tracing::debug!(tokens = settlement.reservation.tokens, "no settler: the reservation stays charged")
                }
            }
        }
        Ok(())
    }
}

/// Records how the attempt ended. When Redis is unreachable, keeps trying for a while: otherwise
/// the job, though it ran, would run again once another worker takes it over.
async fn record_ending(
    deliveries: &Deliveries,
    delivery: &Delivery,
    attempt: u32,
    ending: &Ending,
    patience: Duration,
) -> Result<Ended, QueueError> {
    let give_up_at = Instant::now() + patience;
    let mut outages = OutageBackoff::new(OUTAGE_PAUSE);
    loop {
        match deliveries.end(delivery, attempt, ending).await {
            Err(error) if error.is_unavailable() && Instant::now() < give_up_at => {
                let pause = outages.next_pause().min(give_up_at.saturating_duration_since(Instant::now()));
                tracing::warn!(error = %error_chain(&error), pause_ms = pause.as_millis(), "cannot record the attempt yet");
                tokio::time::sleep(pause).await;
            }
            other => return other,
        }
    }
}

/// Starts the job read ahead, if any, and, after a `quick` job, reads more ahead: to hold
/// [`READ_AHEAD`] in all, the started one included. Returns the started job. Failures (Redis
/// down) are left to the next step: a delivery that could not be started stays ahead.
async fn read_ahead(deliveries: &Deliveries, ahead: &mut VecDeque<Delivery>, quick: bool) -> Option<(Delivery, Begin)> {
    let next = ahead.pop_front();
    let wanted = if quick { READ_AHEAD.saturating_sub(ahead.len() + usize::from(next.is_some())) } else { 0 };
    let begin = async {
        match &next {
            Some(delivery) => Some(deliveries.begin(delivery).await),
            None => None,
        }
    };
    let read = async {
        match wanted {
            0 => Ok(Vec::new()),
            count => deliveries.read_ready(count).await,
        }
    };
    let (begun, read) = tokio::join!(begin, read);
    match read {
        Ok(read) => ahead.extend(read),
        Err(error) => tracing::debug!(error = %error_chain(&error), "cannot read ahead"),
    }
    match (next, begun) {
        (Some(delivery), Some(Ok(begun))) => Some((delivery, begun)),
        (Some(delivery), Some(Err(error))) => {
            tracing::debug!(error = %error_chain(&error), "cannot start the job read ahead yet");
            ahead.push_front(delivery);
            None
        }
        _ => None,
    }
}

/// Runs `running`; when it takes longer than `quick`, gives back what was read `ahead` meanwhile,
/// so that no job waits behind a slow one. Once a give-back was sent the deliveries are dropped
/// from `ahead` whatever its outcome: one whose give-back failed may have been queued again, and
/// must not also run here (one not given back is taken over after the claim idle time).
async fn give_back_when_slow<T>(
    running: impl Future<Output = T>,
    deliveries: &Deliveries,
    ahead: &mut VecDeque<Delivery>,
    quick: Duration,
) -> T {
    let mut running = pin!(running);
    if ahead.is_empty() {
        return running.await;
    }
    tokio::select! {
        biased;
        outcome = &mut running => outcome,
        () = tokio::time::sleep(quick) => {
            let held: Vec<(Delivery, u32)> = ahead.drain(..).map(|delivery| (delivery, 0)).collect();
            let (outcome, given) = tokio::join!(running, deliveries.give_back(&held, deliveries.limit()));
            match given {
                Ok(queued) => tracing::debug!(held = held.len(), queued, "a slow job: gave back the jobs read ahead"),
                Err(error) => tracing::warn!(
                    error = %error_chain(&error),
                    "cannot give back the jobs read ahead; they are taken over after the claim idle time"
                ),
            }
            outcome
        }
    }
}

/// The stored request. A record without a readable one fails for good: no retry would fix it.
fn read_request(stored: Option<Vec<u8>>) -> Result<GenerateRequest, JobError> {
    let bytes = stored.ok_or_else(|| JobError::permanent("the job record holds no request"))?;
    GenerateRequest::decode(bytes.as_slice())
        .map_err(|cause| JobError::permanent(format!("the stored request cannot be read: {cause}")))
}

/// A panic in `execute` fails the job for good: it is a bug, and the next attempt would hit it
/// too. The worker goes on with other jobs.
fn panicked() -> JobError {
    JobError::permanent("the job panicked")
}

/// Runs the attempt, keeping its delivery claimed meanwhile.
async fn run_claimed(
    attempt: impl Future<Output = Result<GenerateResponse, JobError>>,
    deliveries: &Deliveries,
    delivery: &Delivery,
    heartbeat_every: Duration,
) -> Result<GenerateResponse, JobError> {
    tokio::select! {
        outcome = AssertUnwindSafe(attempt).catch_unwind() => {
            outcome.unwrap_or_else(|_| Err(panicked()))
        }
        never = keep_claimed(deliveries, delivery, heartbeat_every) => match never {},
    }
}

/// Re-claims the delivery now and then, for as long as the attempt runs (the caller drops this
/// when the attempt ends).
async fn keep_claimed(deliveries: &Deliveries, delivery: &Delivery, every: Duration) -> Infallible {
    let mut beats = tokio::time::interval_at(Instant::now() + every, every);
    beats.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        beats.tick().await;
        match deliveries.keep_alive(delivery).await {
            Ok(true) => {}
            Ok(false) => tracing::info!("delivery no longer pending: the job was settled elsewhere"),
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "heartbeat failed; another worker may take the job over");
            }
        }
    }
}

fn log_ending(attempt: u32, ending: &Ending, ended: &Ended) {
    match (ended, ending) {
        (Ended::Applied(_), Ending::Succeeded { .. }) => tracing::debug!(attempt, "job succeeded"),
        (Ended::Applied(_), Ending::Retry { delay, error }) => {
            tracing::info!(attempt, delay_ms = delay.as_millis(), %error, "attempt failed; retry scheduled");
        }
        (Ended::Applied(_), Ending::GiveUp { state, error }) => {
            tracing::warn!(attempt, state = state.as_str_name(), %error, "job failed for good");
        }
        (Ended::AlreadyFinished(state), _) => {
            tracing::info!(
                attempt,
                state = state.as_str_name(),
                "job had already finished; this attempt's outcome dropped"
            );
        }
        (Ended::Stale, _) => {
            tracing::info!(attempt, "another worker took the job over; this attempt's outcome dropped");
        }
        (Ended::Gone, _) => tracing::info!(attempt, "job record gone; this attempt's outcome dropped"),
    }
}

//! The queue workers a generation process runs beside its gRPC service.
//!
//! Each job's token reservation, taken by the gateway when the job was submitted, is settled by
//! the worker that ends the job ([`JobTokens`]): on the gateways' limiter Redis, with the same
//! GCRA and the same key as the gateways' own reservations, so the next reservation any gateway
//! takes for that API key sees what the job really used. A reservation a gateway replica took in
//! its own memory (no Redis for its limiter) cannot be reached from here and stays charged there.
//!
//! A job's money reservation against its owner's spend budgets is settled the same way, on the
//! same Redis, with the budget scripts the gateways use (`llmesh_ratelimit::budget`): at the cost
//! of the usage the answer reported, at the price stored with the reservation (the whole
//! reservation when the answer reported no usage), and nothing for a job that FAILED or was
//! DEAD_LETTERED. A settlement that fails is retried a few times; settling twice is harmless (each
//! reservation settles once), so a retry never double-counts.
//!
//! Metrics, without per-job or per-key labels: `llmesh_queue_jobs{state}` (the shared backlog),
//! `llmesh_queue_jobs_completed_total{outcome}` (attempts this process's workers finished), and
//! `llmesh_queue_wait_seconds` (how long each job this process's workers started had waited, from
//! its submission to its first attempt, on Redis's clock: see `llmesh_queue::Worker::observing_waits`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use llmesh_proto::common::v1::Usage;
use llmesh_queue::{JobQueue, QueueSettings, ReservationStore, Settlement, Worker};
use llmesh_ratelimit::{
    Kind, Limit, RedisGcra,
    budget::{self, RedisBudget, StoredHold},
};
use llmesh_util::redact::redact_url;
use opentelemetry::KeyValue;
use tokio::sync::watch;

use crate::{GenerationService, config::RateLimitSettings};

/// Buckets of `llmesh_queue_wait_seconds`, in seconds: the queue measures whole milliseconds
/// (Redis's clock), and a backlog can hold a job for many minutes.
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// Starts `settings.workers` workers when a queue is configured, settling the token reservations
/// of the jobs they end on `rate_limit`'s Redis (the queue's by default). They stop when `stop`
/// turns true (a job in hand is abandoned and taken over by another worker later).
pub async fn start(
    settings: &QueueSettings,
    rate_limit: &RateLimitSettings,
    service: &GenerationService,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Some(url) = &settings.redis_url else { return Ok(()) };
    let queue = JobQueue::connect(url, settings.options.clone())
        .await
        .map_err(|error| anyhow::anyhow!("cannot reach the job queue's redis: {error}"))?;
    let tokens = JobTokens::new(rate_limit.redis_url.as_deref().unwrap_or(url), rate_limit.timeout_ms)?;
    watch_backlog(queue.clone(), stop.clone());
    let completed = llmesh_telemetry::meter()
        .u64_counter("llmesh.queue.jobs_completed")
        .with_description("Jobs finished by this process's workers, by outcome")
        .build();
    let waited = llmesh_telemetry::meter()
        .f64_histogram("llmesh.queue.wait")
        .with_unit("s")
        .with_description("Time jobs waited in the queue, from submission to the start of their first attempt")
        .with_boundaries(WAIT_BUCKETS.to_vec())
        .build();
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "generation".into());
    for i in 0..settings.workers {
        let consumer = format!("{host}-{}-{i}", std::process::id());
        let tokens = tokens.clone();
        let waited = waited.clone();
        let worker = Worker::new(queue.clone(), consumer)
            .settling_with(move |settlement| tokens.clone().settle(settlement))
            .observing_waits(move |wait| waited.record(wait.as_secs_f64(), &[]));
        let service = service.clone();
        let completed = completed.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let execute = move |request| {
                let (service, completed) = (service.clone(), completed.clone());
                async move {
                    let result = service.run_job(request).await;
                    let outcome = match &result {
                        Ok(_) => "succeeded",
                        Err(error) if error.retryable => "retried",
                        Err(_) => "failed",
                    };
                    completed.add(1, &[KeyValue::new("outcome", outcome)]);
                    result
                }
            };
            let stopped = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            if let Err(error) = worker.run(execute, stopped).await {
                tracing::error!(%error, "queue worker stopped");
            }
        });
    }
    tracing::info!(workers = settings.workers, "working on the job queue");
    Ok(())
}

/// Settles job token and money reservations on the gateways' limiter Redis.
#[derive(Debug, Clone)]
struct JobTokens {
    gcra: RedisGcra,
    budget: RedisBudget,
}

/// Tries at settling a job's money reservation before leaving it held.
const BUDGET_TRIES: u32 = 3;

impl JobTokens {
    /// A lazy connection to `url`: a Redis that is down fails settlements, not the start-up.
    fn new(url: &str, timeout_ms: u64) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(timeout_ms.max(1));
        let invalid = |error| anyhow::anyhow!("invalid rate_limit.redis_url {}: {error}", redact_url(url));
        let gcra = RedisGcra::new(url, timeout).map_err(invalid)?;
        let budget = RedisBudget::new(url, timeout).map_err(invalid)?;
        Ok(Self { gcra, budget })
    }

    /// Settles the job's money reservation with the cost of what it used.
    async fn settle_money(&self, job_id: &str, stored: &str, used: Option<Usage>) {
        let stored = match StoredHold::decode(stored) {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(%job_id, %error, "the job's money reservation is unreadable; it stays held");
                return;
            }
        };
        if let Some(replica) = &stored.local_replica {
            tracing::debug!(%job_id, %replica, "the job's money was reserved in a gateway's memory: it stays held there");
            return;
        }
        let cost = match used {
            Some(usage) => budget::cost(usage.prompt_tokens, usage.completion_tokens, stored.rate),
            None => stored.hold.amount,
        };
        for attempt in 1..=BUDGET_TRIES {
            match self.budget.settle(&stored.hold, cost).await {
                Ok(settled) => {
                    tracing::debug!(%job_id, reserved = stored.hold.amount, cost, applied = settled.applied, "job money settled");
                    return;
                }
                Err(failure) if attempt < BUDGET_TRIES => {
                    tracing::debug!(%job_id, error = %failure, "cannot settle the job's money yet");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                Err(failure) => tracing::warn!(
                    %job_id,
                    error = %failure,
                    "cannot settle the job's money; its reservation stays held until the period ends"
                ),
            }
        }
    }

    /// Gives back what the job did not use, or charges what it used beyond its reservation. Once
    /// per job: the queue hands each reservation to one worker.
    async fn settle(self, settlement: Settlement) {
        let Settlement { job_id, owner, reservation, used, succeeded, usage, budget } = settlement;
        if let Some(stored) = &budget {
            // A job that did not succeed costs nothing; one that reported no usage, its reservation.
            let usage = if succeeded { usage } else { Some(Usage::default()) };
            self.settle_money(&job_id, stored, usage).await;
        }
        if let ReservationStore::Local { replica } = &reservation.store {
            tracing::debug!(%job_id, %replica, "the job's tokens were reserved in a gateway's memory: they stay charged there");
            return;
        }
        let (Some(limit), Some(cost)) =
            (Limit::per_minute(reservation.per_minute), llmesh_ratelimit::settlement(reservation.tokens, used))
        else {
            return;
        };
        match self.gcra.decide(&llmesh_ratelimit::key(Kind::Tokens, &owner), limit, cost).await {
            Ok(decision) => {
                tracing::debug!(%job_id, reserved = reservation.tokens, used, remaining = decision.remaining, "job tokens settled");
            }
            Err(failure) => tracing::warn!(
                %job_id,
                error = %failure,
                "cannot settle the job's tokens; its reservation stays charged until the key's bucket fills again"
            ),
        }
    }
}

/// Polls the queue's backlog every few seconds for the `llmesh_queue_jobs{state}` gauge (the
/// queue is shared: every replica reports the same numbers).
fn watch_backlog(queue: JobQueue, mut stop: watch::Receiver<bool>) {
    let backlog: Arc<[AtomicU64; 4]> = Arc::default();
    let read = backlog.clone();
    let gauge = llmesh_telemetry::meter()
        .u64_observable_gauge("llmesh.queue.jobs")
        .with_description("The job queue's backlog, by state")
        .with_callback(move |gauge| {
            for (state, value) in ["queued", "pending", "delayed", "dead_lettered"].into_iter().zip(read.iter()) {
                gauge.observe(value.load(Ordering::Relaxed), &[KeyValue::new("state", state)]);
            }
        })
        .build();
    tokio::spawn(async move {
        let _gauge = gauge;
        let mut ticker = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            if let Ok(stats) = queue.stats().await {
                for (slot, value) in
                    backlog.iter().zip([stats.depth, stats.pending, stats.delayed, stats.dead_lettered])
                {
                    slot.store(value, Ordering::Relaxed);
                }
            }
        }
    });
}

//! The queue workers a generation process runs beside its gRPC service.
//!
//! Each job's token reservation, taken by the gateway when the job was submitted, is settled by
//! the worker that ends the job ([`JobTokens`]): on the gateways' limiter Redis, with the same
//! GCRA and the same key as the gateways' own reservations, so the next reservation any gateway
//! takes for that API key sees what the job really used. A reservation a gateway replica took in
//! its own memory (no Redis for its limiter) cannot be reached from here and stays charged there.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use llmesh_queue::{JobQueue, QueueSettings, ReservationStore, Settlement, Worker};
use llmesh_ratelimit::{Kind, Limit, RedisGcra};
use llmesh_util::redact::redact_url;
use opentelemetry::KeyValue;
use tokio::sync::watch;

use crate::{GenerationService, config::RateLimitSettings};

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
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "generation".into());
    for i in 0..settings.workers {
        let consumer = format!("{host}-{}-{i}", std::process::id());
        let tokens = tokens.clone();
        let worker =
            Worker::new(queue.clone(), consumer).settling_with(move |settlement| tokens.clone().settle(settlement));
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

/// Settles job token reservations on the gateways' limiter Redis.
#[derive(Debug, Clone)]
struct JobTokens {
    gcra: RedisGcra,
}

impl JobTokens {
    /// A lazy connection to `url`: a Redis that is down fails settlements, not the start-up.
    fn new(url: &str, timeout_ms: u64) -> anyhow::Result<Self> {
        let gcra = RedisGcra::new(url, Duration::from_millis(timeout_ms.max(1)))
            .map_err(|error| anyhow::anyhow!("invalid rate_limit.redis_url {}: {error}", redact_url(url)))?;
        Ok(Self { gcra })
    }

    /// Gives back what the job did not use, or charges what it used beyond its reservation. Once
    /// per job: the queue hands each reservation to one worker.
    async fn settle(self, settlement: Settlement) {
        let Settlement { job_id, owner, reservation, used } = settlement;
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

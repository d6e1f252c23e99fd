//! The queue workers a generation process runs beside its gRPC service.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use llmesh_queue::{JobQueue, QueueSettings, Worker};
use opentelemetry::KeyValue;
use tokio::sync::watch;

use crate::GenerationService;

/// Starts `settings.workers` workers when a queue is configured. They stop when `stop` turns true
/// (a job in hand is abandoned and taken over by another worker later).
pub async fn start(
    settings: &QueueSettings,
    service: &GenerationService,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Some(url) = &settings.redis_url else { return Ok(()) };
    let queue = JobQueue::connect(url, settings.options.clone())
        .await
        .map_err(|error| anyhow::anyhow!("cannot reach the job queue's redis: {error}"))?;
    watch_backlog(queue.clone(), stop.clone());
    let completed = llmesh_telemetry::meter()
        .u64_counter("llmesh.queue.jobs_completed")
        .with_description("Jobs finished by this process's workers, by outcome")
        .build();
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "generation".into());
    for i in 0..settings.workers {
        let consumer = format!("{host}-{}-{i}", std::process::id());
        let worker = Worker::new(queue.clone(), consumer);
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

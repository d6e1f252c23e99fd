//! The queue workers a generation process runs beside its gRPC service.

use llmesh_queue::{JobQueue, QueueSettings, Worker};
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
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "generation".into());
    for i in 0..settings.workers {
        let consumer = format!("{host}-{}-{i}", std::process::id());
        let worker = Worker::new(queue.clone(), consumer);
        let service = service.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let execute = move |request| {
                let service = service.clone();
                async move { service.run_job(request).await }
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

//! The gateway's job RPCs over the shared queue: submit answers at once with a job id, the rest
//! read or change the job's record.

use llmesh_proto::gateway::v1::Job;
use llmesh_queue::{JobQueue, QueueError, QueueSettings};
use tonic::Status;

/// The queue, when one is configured.
#[derive(Debug, Clone, Default)]
pub struct Jobs(Option<JobQueue>);

impl Jobs {
    /// Connects when `queue.redis_url` is set. Redis unreachable at start-up is an error naming it.
    pub async fn connect(settings: &QueueSettings) -> anyhow::Result<Self> {
        let Some(url) = &settings.redis_url else { return Ok(Self(None)) };
        let queue = JobQueue::connect(url, settings.options.clone())
            .await
            .map_err(|error| anyhow::anyhow!("cannot reach the job queue's redis: {error}"))?;
        Ok(Self(Some(queue)))
    }

    pub fn queue(&self) -> Result<&JobQueue, Status> {
        self.0.as_ref().ok_or_else(|| {
            Status::failed_precondition("jobs: no job queue is configured (set gateway.queue.redis_url)")
        })
    }
}

pub fn job_id(id: &str) -> Result<&str, Status> {
    if id.trim().is_empty() { Err(Status::invalid_argument("job_id: required")) } else { Ok(id) }
}

/// A queue failure as the status a client can act on.
pub fn status(error: QueueError) -> Status {
    match error {
        QueueError::NotFound { id } => Status::not_found(format!("job_id: no job {id:?} (finished jobs expire)")),
        QueueError::NotCancellable { id, state } => {
            Status::failed_precondition(format!("job {id} is {} and can no longer be cancelled", state.as_str_name()))
        }
        error if error.is_unavailable() => Status::unavailable(format!("job queue unavailable: {error}")),
        error => Status::internal(format!("job queue: {error}")),
    }
}

/// The record, or NOT_FOUND.
pub fn found(job: Option<Job>, id: &str) -> Result<Job, Status> {
    job.ok_or_else(|| status(QueueError::NotFound { id: id.to_string() }))
}

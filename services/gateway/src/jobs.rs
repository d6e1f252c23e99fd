//! The gateway's job RPCs over the shared queue: submit answers at once with a job id, the rest
//! read or change the job's record.

use futures::StreamExt as _;
use llmesh_proto::{
    gateway::v1::{
        CancelJobRequest, CancelJobResponse, GetJobRequest, GetJobResponse, Job, SubmitJobRequest, SubmitJobResponse,
        WatchJobRequest, WatchJobResponse,
    },
    generation::v1::GenerateRequest,
};
use llmesh_queue::{JobQueue, QueueError, QueueSettings};
use tonic::{Request, Response, Status};

use crate::admission::TokenAdmission;

pub type WatchStream = futures::stream::BoxStream<'static, Result<WatchJobResponse, Status>>;

/// Queues a generation request for a worker.
pub async fn submit(
    jobs: &Jobs,
    admission: &TokenAdmission,
    request: Request<SubmitJobRequest>,
) -> Result<Response<SubmitJobResponse>, Status> {
    let queue = jobs.queue()?;
    let idempotency_key = request.get_ref().idempotency_key.clone();
    let (_, extensions, request) = request.into_parts();
    let generate: GenerateRequest = request.into();
    // The job's tokens stay reserved: the work happens later, on a worker.
    let admitted = admission.admit(&extensions, generate).await?;
    let mut generate = std::sync::Arc::unwrap_or_clone(admitted.request);
    // The worker's span continues this trace.
    generate.metadata.remove(llmesh_telemetry::JOB_TRACEPARENT_KEY);
    if let Some(traceparent) = llmesh_telemetry::current_traceparent() {
        generate.metadata.insert(llmesh_telemetry::JOB_TRACEPARENT_KEY.to_string(), traceparent);
    }
    let submitted = queue.submit(&generate, &idempotency_key).await.map_err(status)?;
    Ok(Response::new(SubmitJobResponse { job: Some(submitted.job), existing: submitted.existing }))
}

pub async fn get(jobs: &Jobs, request: Request<GetJobRequest>) -> Result<Response<GetJobResponse>, Status> {
    let queue = jobs.queue()?;
    let id = job_id(&request.get_ref().job_id)?;
    let job = found(queue.get(id).await.map_err(status)?, id)?;
    Ok(Response::new(GetJobResponse { job: Some(job) }))
}

pub async fn watch(jobs: &Jobs, request: Request<WatchJobRequest>) -> Result<Response<WatchStream>, Status> {
    let queue = jobs.queue()?;
    let id = job_id(&request.get_ref().job_id)?;
    let changes = queue.watch(id).map(|change| change.map(|job| WatchJobResponse { job: Some(job) }).map_err(status));
    Ok(Response::new(changes.boxed()))
}

pub async fn cancel(jobs: &Jobs, request: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
    let queue = jobs.queue()?;
    let id = job_id(&request.get_ref().job_id)?;
    let job = queue.cancel(id).await.map_err(status)?;
    Ok(Response::new(CancelJobResponse { job: Some(job) }))
}

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

//! Shared by the integration tests: a private redis-server per test (the workspace's fixture,
//! `llmesh-testkit`), a queue on it, workers that stop on demand, and waiting for a job to get
//! somewhere.

// Test support: panicking on a broken setup is the point, and each test binary uses only some helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use llmesh_proto::{
    gateway::v1::Job,
    generation::v1::{GenerateRequest, GenerateResponse},
};
use llmesh_queue::{JobError, JobQueue, QueueConfig, QueueError, Settlement, Worker};
use tokio::{sync::oneshot, task::JoinHandle};

/// The redis-server fixture every test crate shares: one of the test's own per test.
pub use llmesh_testkit::Redis;

/// Reads one job off the stream the way a worker does, then "crashes": never acknowledges it.
pub async fn read_and_crash(redis: &Redis) -> (String, String) {
    let mut raw = redis.connection().await.unwrap();
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("llmesh-workers")
        .arg("crashed-worker")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg("llmesh:jobs")
        .arg(">")
        .query_async(&mut raw)
        .await
        .unwrap();
    let entry = reply.keys[0].ids[0].clone();
    (entry.id.clone(), entry.get("job").unwrap())
}

/// Who submits the tests' jobs.
pub const OWNER: &str = "alice";

/// A well-formed job id that no job has.
pub const NO_SUCH_JOB: &str = "job-00000000000000000000000000000000";

/// Settings for tests: quick retries, a roomy response timeout (a busy test machine is slow).
pub fn config() -> QueueConfig {
    QueueConfig {
        backoff_base_ms: 10,
        backoff_max_ms: 200,
        response_timeout_ms: 1_000,
        worker_response_timeout_ms: 2_000,
        ..QueueConfig::default()
    }
}

pub async fn connect(redis: &Redis, config: QueueConfig) -> JobQueue {
    JobQueue::connect(&redis.url(), config).await.unwrap()
}

pub fn request(prompt: &str) -> GenerateRequest {
    GenerateRequest { model: "sim".into(), prompt: prompt.into(), max_tokens: 8, ..Default::default() }
}

/// The answer an echo worker gives.
pub fn echo(request: &GenerateRequest) -> GenerateResponse {
    GenerateResponse { model: request.model.clone(), text: format!("echo: {}", request.prompt), ..Default::default() }
}

pub async fn echo_execute(request: GenerateRequest) -> Result<GenerateResponse, JobError> {
    Ok(echo(&request))
}

/// A worker running on its own task.
pub struct RunningWorker {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), QueueError>>,
}

pub fn spawn_worker<F, Fut>(queue: &JobQueue, name: &str, execute: F) -> RunningWorker
where
    F: Fn(GenerateRequest) -> Fut + Send + 'static,
    Fut: Future<Output = Result<GenerateResponse, JobError>> + Send + 'static,
{
    run_worker(Worker::new(queue.clone(), name), execute)
}

/// The settlements workers handed over, in order.
pub type Settled = Arc<Mutex<Vec<Settlement>>>;

/// A worker that records the settlements it is handed in `settled`.
pub fn spawn_settling_worker<F, Fut>(queue: &JobQueue, name: &str, execute: F, settled: &Settled) -> RunningWorker
where
    F: Fn(GenerateRequest) -> Fut + Send + 'static,
    Fut: Future<Output = Result<GenerateResponse, JobError>> + Send + 'static,
{
    let settled = settled.clone();
    let worker = Worker::new(queue.clone(), name).settling_with(move |settlement| {
        settled.lock().unwrap().push(settlement);
        async {}
    });
    run_worker(worker, execute)
}

/// The queue waits a worker reported, in order.
pub type Waits = Arc<Mutex<Vec<Duration>>>;

/// A worker that records the queue waits it reports in `waits`.
pub fn spawn_observing_worker<F, Fut>(queue: &JobQueue, name: &str, execute: F, waits: &Waits) -> RunningWorker
where
    F: Fn(GenerateRequest) -> Fut + Send + 'static,
    Fut: Future<Output = Result<GenerateResponse, JobError>> + Send + 'static,
{
    let waits = waits.clone();
    let worker = Worker::new(queue.clone(), name).observing_waits(move |wait| waits.lock().unwrap().push(wait));
    run_worker(worker, execute)
}

fn run_worker<F, Fut>(worker: Worker, execute: F) -> RunningWorker
where
    F: Fn(GenerateRequest) -> Fut + Send + 'static,
    Fut: Future<Output = Result<GenerateResponse, JobError>> + Send + 'static,
{
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(execute, async move {
        let _ = stopped.await;
    }));
    RunningWorker { stop, task }
}

impl RunningWorker {
    /// Asks the worker to stop and waits for it; returns how long it took.
    pub async fn stop(self) -> Duration {
        let start = Instant::now();
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(5), self.task).await.expect("worker did not stop").unwrap().unwrap();
        start.elapsed()
    }
}

/// Polls the job until `done` holds; fails the test after `within`.
pub async fn wait_for(queue: &JobQueue, id: &str, within: Duration, done: impl Fn(&Job) -> bool) -> Job {
    let deadline = Instant::now() + within;
    loop {
        let job = queue.get(OWNER, id).await.unwrap();
        match job {
            Some(job) if done(&job) => return job,
            _ if Instant::now() > deadline => panic!("job {id} did not get there within {within:?}: {job:?}"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

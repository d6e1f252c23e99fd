//! Reading ahead (see `Worker`): a worker that reads the next jobs while it ends a quick one
//! never holds them up behind a slow one, nor keeps them when it stops; a backlog drained this
//! way runs every job once.

// The helpers below panic on a broken setup, as the tests do.
#![allow(clippy::unwrap_used)]

mod common;

use std::{sync::Arc, time::Duration};

use common::{OWNER, Redis, config, connect, echo, request, spawn_worker, wait_for};
use llmesh_proto::{
    gateway::v1::{Job, JobState},
    generation::v1::{GenerateRequest, GenerateResponse},
};
use llmesh_queue::{JobError, JobQueue, QueueConfig, QueueStats};
use tokio::sync::Notify;

const SOON: Duration = Duration::from_secs(5);

fn state_is(state: JobState) -> impl Fn(&Job) -> bool {
    move |job| job.state() == state
}

/// Echoes every job but the one whose prompt is "slow", which waits for `gate`.
fn slow_one(
    gate: &Arc<Notify>,
) -> impl Fn(GenerateRequest) -> futures::future::BoxFuture<'static, Result<GenerateResponse, JobError>> + Send + 'static
{
    let gate = gate.clone();
    move |request: GenerateRequest| {
        let gate = gate.clone();
        Box::pin(async move {
            if request.prompt == "slow" {
                gate.notified().await;
            }
            Ok(echo(&request))
        })
    }
}

/// Three jobs queued before any worker runs: a quick one (after which the worker reads the next
/// two ahead), a slow one, and one behind it.
async fn quick_slow_behind(queue: &JobQueue) -> [Job; 3] {
    let mut jobs = Vec::new();
    for prompt in ["quick", "slow", "behind"] {
        jobs.push(queue.submit(OWNER, &request(prompt), "", None).await.unwrap().job);
    }
    jobs.try_into().unwrap()
}

/// Every XADD Redis ran, the scripts' included.
async fn stream_appends(redis: &Redis) -> u64 {
    let mut conn = redis.connection().await.unwrap();
    let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
    stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_xadd:calls="))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

#[tokio::test]
async fn a_job_read_ahead_is_given_back_when_the_one_before_it_is_slow() {
    let redis = Redis::start().await.unwrap();
    // Quick: under 300 ms, which the echo is however busy the machine.
    let queue = connect(&redis, QueueConfig { read_ahead_ms: 300, ..config() }).await;
    let gate = Arc::new(Notify::new());
    let [_, slow, behind] = quick_slow_behind(&queue).await;
    let first = spawn_worker(&queue, "first", slow_one(&gate));
    wait_for(&queue, &slow.id, SOON, state_is(JobState::Running)).await;

    // The first worker read "behind" ahead; it gives it back once "slow" has run 300 ms, and a
    // second worker runs it while "slow" still runs.
    let second = spawn_worker(&queue, "second", slow_one(&gate));
    let done = wait_for(&queue, &behind.id, SOON, state_is(JobState::Succeeded)).await;
    assert_eq!(done.attempts, 1);
    assert_eq!(queue.get(OWNER, &slow.id).await.unwrap().unwrap().state(), JobState::Running);
    assert_eq!(stream_appends(&redis).await, 4, "three submissions and one give-back");

    gate.notify_one();
    wait_for(&queue, &slow.id, SOON, state_is(JobState::Succeeded)).await;
    assert_eq!(queue.stats().await.unwrap(), QueueStats::default());
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_stopping_worker_gives_back_what_it_read_ahead() {
    let redis = Redis::start().await.unwrap();
    // Never slow enough to give back while it runs, and no take-over within the test.
    let queue = connect(&redis, QueueConfig { read_ahead_ms: 60_000, claim_idle_ms: 600_000, ..config() }).await;
    let gate = Arc::new(Notify::new());
    let [_, slow, behind] = quick_slow_behind(&queue).await;
    let first = spawn_worker(&queue, "first", slow_one(&gate));
    wait_for(&queue, &slow.id, SOON, state_is(JobState::Running)).await;

    first.stop().await;
    assert_eq!(stream_appends(&redis).await, 4, "three submissions and one give-back");
    let second = spawn_worker(&queue, "second", slow_one(&gate));
    let done = wait_for(&queue, &behind.id, SOON, state_is(JobState::Succeeded)).await;
    assert_eq!(done.attempts, 1);
    // "slow" was in hand: abandoned as before, for a take-over after the claim idle time.
    assert_eq!(queue.get(OWNER, &slow.id).await.unwrap().unwrap().state(), JobState::Running);
    second.stop().await;
}

#[tokio::test]
async fn a_backlog_drained_by_one_worker_reading_ahead_runs_every_job_once() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { read_ahead_ms: 1_000, ..config() }).await;
    let mut jobs = Vec::new();
    for index in 0..300 {
        jobs.push(queue.submit(OWNER, &request(&format!("job {index}")), "", None).await.unwrap().job);
    }
    let worker = spawn_worker(&queue, "w1", |request: GenerateRequest| async move { Ok(echo(&request)) });
    for job in &jobs {
        let done = wait_for(&queue, &job.id, Duration::from_secs(30), state_is(JobState::Succeeded)).await;
        assert_eq!(done.attempts, 1, "{}", job.id);
    }
    assert_eq!(queue.stats().await.unwrap(), QueueStats::default(), "nothing left pending");
    assert_eq!(stream_appends(&redis).await, 300, "nothing given back");
    worker.stop().await;
}

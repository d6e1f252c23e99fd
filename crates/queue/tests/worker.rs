//! Workers against a real redis-server: success, watch, retries with backoff, dead letters,
//! taking over from crashed workers, never running a finished job again, shutdown, and Redis
//! outages.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    NO_SUCH_JOB, OWNER, Redis, Waits, config, connect, echo, echo_execute, read_and_crash, request,
    spawn_observing_worker, spawn_worker, wait_for,
};
use futures::StreamExt as _;
use llmesh_proto::{
    gateway::v1::{Job, JobState},
    generation::v1::{GenerateRequest, GenerateResponse},
};
use llmesh_queue::{JobError, QueueConfig, QueueError, QueueStats};
use prost::Message as _;
use redis::AsyncCommands as _;
use tokio::sync::Notify;

const SOON: Duration = Duration::from_secs(5);

fn state_is(state: JobState) -> impl Fn(&Job) -> bool {
    move |job| job.state() == state
}

#[tokio::test]
async fn a_worker_runs_a_job_stores_its_result_and_leaves_nothing_behind() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { result_ttl_ms: 500, ..config() }).await;
    let worker = spawn_worker(&queue, "w1", echo_execute);
    let sent = request("hi");

    let job = queue.submit(OWNER, &sent, "", None).await.unwrap().job;
    let done = wait_for(&queue, &job.id, SOON, state_is(JobState::Succeeded)).await;

    assert_eq!(done.attempts, 1);
    assert_eq!(done.result, Some(echo(&sent).into()));
    assert!(done.error.is_empty());
    assert!(done.updated_at_unix_ms >= done.created_at_unix_ms);
    assert_eq!(queue.stats().await.unwrap(), QueueStats::default(), "acknowledged and off the stream");
    let mut raw = redis.connection().await.unwrap();
    let ttl: i64 = raw.pttl(format!("llmesh:jobs:job:{}", job.id)).await.unwrap();
    assert!((1..=500).contains(&ttl), "the finished job expires after the result ttl: pttl {ttl}");
    tokio::time::sleep(Duration::from_millis(650)).await;
    assert_eq!(queue.get(OWNER, &job.id).await.unwrap(), None, "expired");
    worker.stop().await;
}

#[tokio::test]
async fn watch_yields_the_current_state_then_each_change_and_ends_when_finished() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;
    let release = Arc::new(Notify::new());
    let job = queue.submit(OWNER, &request("slow"), "", None).await.unwrap().job;

    let watch = tokio::spawn(queue.watch(OWNER, &job.id).collect::<Vec<_>>());
    tokio::time::sleep(Duration::from_millis(150)).await;
    let gate = release.clone();
    let worker = spawn_worker(&queue, "w1", move |request: GenerateRequest| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            Ok(echo(&request))
        }
    });
    wait_for(&queue, &job.id, SOON, state_is(JobState::Running)).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    release.notify_one();

    let seen = tokio::time::timeout(SOON, watch).await.expect("the watch ends").unwrap();
    let states: Vec<JobState> = seen.iter().map(|job| job.as_ref().unwrap().state()).collect();
    assert_eq!(states, [JobState::Queued, JobState::Running, JobState::Succeeded], "each change once");
    assert!(seen.last().unwrap().as_ref().unwrap().result.is_some());
    worker.stop().await;

    let mut missing = queue.watch(OWNER, NO_SUCH_JOB);
    assert!(matches!(missing.next().await, Some(Err(QueueError::NotFound { .. }))));
    assert!(missing.next().await.is_none(), "the watch ends after its error");
}

#[tokio::test]
async fn retryable_failures_wait_with_backoff_then_succeed() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { backoff_base_ms: 100, backoff_max_ms: 1_000, ..config() }).await;
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let worker = spawn_worker(&queue, "w1", move |request: GenerateRequest| {
        let attempt = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if attempt <= 2 { Err(JobError::retryable(format!("overloaded ({attempt})"))) } else { Ok(echo(&request)) }
        }
    });

    let start = Instant::now();
    let job = queue.submit(OWNER, &request("flaky"), "", None).await.unwrap().job;
    // Between attempts the job waits, QUEUED with the last error, in the delayed set.
    let waiting = wait_for(&queue, &job.id, SOON, |job| job.state() == JobState::Queued && job.attempts == 1).await;
    assert_eq!(waiting.error, "overloaded (1)");
    assert_eq!(queue.stats().await.unwrap().delayed, 1);

    let done = wait_for(&queue, &job.id, SOON, state_is(JobState::Succeeded)).await;
    let elapsed = start.elapsed();
    assert_eq!(done.attempts, 3);
    assert!(done.error.is_empty(), "success clears the error");
    // Waits of 100 ms then 200 ms, each at least 80% of that.
    assert!(elapsed >= Duration::from_millis(240), "backoff was respected: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "and bounded: {elapsed:?}");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(queue.stats().await.unwrap(), QueueStats::default());
    worker.stop().await;
}

#[tokio::test]
async fn a_started_job_records_its_latest_attempts_start_and_its_wait_before_the_first() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;
    let job = queue.submit(OWNER, &request("flaky"), "", None).await.unwrap().job;
    assert_eq!(job.started_at_unix_ms, 0, "not started yet");
    // Waits in the queue a while before any worker is there.
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(queue.get(OWNER, &job.id).await.unwrap().unwrap().started_at_unix_ms, 0, "still not started");

    let (attempts, release) = (Arc::new(AtomicU32::new(0)), Arc::new(Notify::new()));
    let (counter, gate) = (attempts.clone(), release.clone());
    let waits = Waits::default();
    let worker = spawn_observing_worker(
        &queue,
        "w1",
        move |request: GenerateRequest| {
            let attempt = counter.fetch_add(1, Ordering::SeqCst) + 1;
            let gate = gate.clone();
            async move {
                if attempt == 1 {
                    gate.notified().await;
                    return Err(JobError::retryable("overloaded"));
                }
                Ok(echo(&request))
            }
        },
        &waits,
    );

    let first = wait_for(&queue, &job.id, SOON, state_is(JobState::Running)).await;
    assert_eq!(first.attempts, 1);
    assert!(first.created_at_unix_ms <= first.started_at_unix_ms, "{first:?}");
    assert_eq!(first.started_at_unix_ms, first.updated_at_unix_ms, "the start is the latest change: {first:?}");
    release.notify_one();

    let done = wait_for(&queue, &job.id, SOON, state_is(JobState::Succeeded)).await;
    assert_eq!(done.attempts, 2);
    assert_eq!(done.created_at_unix_ms, first.created_at_unix_ms);
    // The retry waited its backoff (at least 8 ms) after the first attempt failed.
    assert!(done.started_at_unix_ms > first.started_at_unix_ms, "the latest attempt's start: {first:?} {done:?}");
    assert!(done.started_at_unix_ms <= done.updated_at_unix_ms, "{done:?}");

    // One wait, the first attempt's, on Redis's clock: its start less the submission.
    let first_wait = u64::try_from(first.started_at_unix_ms - first.created_at_unix_ms).unwrap();
    assert!(first_wait >= 30, "it waited for its worker: {first_wait} ms");
    assert_eq!(*waits.lock().unwrap(), [Duration::from_millis(first_wait)], "the retry is no wait in the queue");
    worker.stop().await;
}

#[tokio::test]
async fn a_poison_job_is_dead_lettered_after_its_retries_and_does_not_block_others() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { max_retries: 2, backoff_base_ms: 50, ..config() }).await;
    let worker = spawn_worker(&queue, "w1", |request: GenerateRequest| async move {
        if request.prompt == "poison" { Err(JobError::retryable("provider down")) } else { Ok(echo(&request)) }
    });

    let poison = queue.submit(OWNER, &request("poison"), "", None).await.unwrap().job;
    let mut healthy = Vec::new();
    for i in 0..3 {
        healthy.push(queue.submit(OWNER, &request(&format!("fine {i}")), "", None).await.unwrap().job);
    }
    for job in &healthy {
        wait_for(&queue, &job.id, SOON, state_is(JobState::Succeeded)).await;
    }
    let dead = wait_for(&queue, &poison.id, SOON, state_is(JobState::DeadLettered)).await;

    assert_eq!(dead.attempts, 3, "max_retries 2: three attempts");
    assert_eq!(dead.error, "provider down");
    let mut raw = redis.connection().await.unwrap();
    let letters: redis::streams::StreamRangeReply = raw.xrange_all("llmesh:jobs:dead").await.unwrap();
    assert_eq!(letters.ids.len(), 1);
    let letter = &letters.ids[0];
    assert_eq!(letter.get::<String>("job").unwrap(), poison.id);
    assert_eq!(letter.get::<String>("error").unwrap(), "provider down");
    assert_eq!(letter.get::<u32>("attempts").unwrap(), 3);
    assert_eq!(queue.stats().await.unwrap(), QueueStats { dead_lettered: 1, ..QueueStats::default() });
    worker.stop().await;
}

#[tokio::test]
async fn a_failure_no_retry_can_fix_fails_at_once_without_a_dead_letter() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let worker = spawn_worker(&queue, "w1", move |_request: GenerateRequest| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<GenerateResponse, _>(JobError::permanent("unknown model")) }
    });

    let job = queue.submit(OWNER, &request("bad"), "", None).await.unwrap().job;
    let failed = wait_for(&queue, &job.id, SOON, state_is(JobState::Failed)).await;

    assert_eq!((failed.attempts, failed.error.as_str()), (1, "unknown model"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "never retried");
    assert_eq!(queue.stats().await.unwrap(), QueueStats::default());
    worker.stop().await;
}

#[tokio::test]
async fn a_panicking_job_fails_and_the_worker_goes_on() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;
    let worker = spawn_worker(&queue, "w1", |request: GenerateRequest| {
        assert_ne!(request.prompt, "boom before the future", "simulated bug");
        async move {
            assert_ne!(request.prompt, "boom inside the future", "simulated bug");
            Ok(echo(&request))
        }
    });

    let before = queue.submit(OWNER, &request("boom before the future"), "", None).await.unwrap().job;
    let inside = queue.submit(OWNER, &request("boom inside the future"), "", None).await.unwrap().job;
    let fine = queue.submit(OWNER, &request("fine"), "", None).await.unwrap().job;

    for boom in [before, inside] {
        let failed = wait_for(&queue, &boom.id, SOON, state_is(JobState::Failed)).await;
        assert_eq!(failed.error, "the job panicked");
    }
    wait_for(&queue, &fine.id, SOON, state_is(JobState::Succeeded)).await;
    worker.stop().await;
}

#[tokio::test]
async fn jobs_of_a_crashed_worker_are_taken_over_after_the_claim_idle_time() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { claim_idle_ms: 200, ..config() }).await;
    let job = queue.submit(OWNER, &request("orphan"), "", None).await.unwrap().job;

    // The crashed worker got as far as starting its attempt.
    let (_entry, job_id) = read_and_crash(&redis).await;
    assert_eq!(job_id, job.id);
    let mut raw = redis.connection().await.unwrap();
    let key = format!("llmesh:jobs:job:{}", job.id);
    let _: () = raw.hset_multiple(&key, &[("state", "JOB_STATE_RUNNING"), ("attempts", "1")]).await.unwrap();
    assert_eq!(queue.stats().await.unwrap().pending, 1);

    let start = Instant::now();
    let worker = spawn_worker(&queue, "live", echo_execute);
    let done = wait_for(&queue, &job.id, SOON, state_is(JobState::Succeeded)).await;

    assert!(start.elapsed() >= Duration::from_millis(150), "not before the claim idle time: {:?}", start.elapsed());
    assert_eq!(done.attempts, 2, "the lost attempt counts");
    assert_eq!(queue.stats().await.unwrap(), QueueStats::default());
    worker.stop().await;
}

#[tokio::test]
async fn a_job_whose_last_attempt_died_with_its_worker_is_dead_lettered_not_run_again() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { claim_idle_ms: 200, max_retries: 1, ..config() }).await;
    let job = queue.submit(OWNER, &request("crashes its worker"), "", None).await.unwrap().job;

    // Its second and last attempt took its worker down with it.
    read_and_crash(&redis).await;
    let mut raw = redis.connection().await.unwrap();
    let key = format!("llmesh:jobs:job:{}", job.id);
    let _: () = raw.hset_multiple(&key, &[("state", "JOB_STATE_RUNNING"), ("attempts", "2")]).await.unwrap();

    let runs = Arc::new(AtomicU32::new(0));
    let counter = runs.clone();
    let worker = spawn_worker(&queue, "live", move |request: GenerateRequest| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move { Ok(echo(&request)) }
    });
    let dead = wait_for(&queue, &job.id, SOON, state_is(JobState::DeadLettered)).await;

    assert_eq!(runs.load(Ordering::SeqCst), 0, "no third attempt");
    assert_eq!(dead.attempts, 2);
    assert!(dead.error.contains("stopped answering"), "{}", dead.error);
    assert_eq!(queue.stats().await.unwrap(), QueueStats { dead_lettered: 1, ..QueueStats::default() });
    worker.stop().await;
}

#[tokio::test]
async fn a_job_that_finished_before_its_worker_crashed_is_acknowledged_not_run_again() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { claim_idle_ms: 200, ..config() }).await;
    let job = queue.submit(OWNER, &request("done already"), "", None).await.unwrap().job;

    // The crashed worker stored its result (and SUCCEEDED, as one step), then died before XACK.
    let (_entry, _) = read_and_crash(&redis).await;
    let first_result = GenerateResponse { text: "the first and only result".into(), ..Default::default() };
    let mut raw = redis.connection().await.unwrap();
    let key = format!("llmesh:jobs:job:{}", job.id);
    let _: () = redis::pipe()
        .atomic()
        .hset(&key, "state", "JOB_STATE_SUCCEEDED")
        .hset(&key, "attempts", 1)
        .hset(&key, "result", first_result.encode_to_vec())
        .query_async(&mut raw)
        .await
        .unwrap();
    // And a cancelled job's entry is waiting on the stream too.
    let cancelled = queue.submit(OWNER, &request("cancelled"), "", None).await.unwrap().job;
    queue.cancel(OWNER, &cancelled.id).await.unwrap();

    let runs = Arc::new(AtomicU32::new(0));
    let counter = runs.clone();
    let worker = spawn_worker(&queue, "live", move |request: GenerateRequest| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move { Ok(echo(&request)) }
    });
    let deadline = Instant::now() + SOON;
    while queue.stats().await.unwrap() != QueueStats::default() {
        assert!(Instant::now() < deadline, "entries left: {:?}", queue.stats().await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert_eq!(runs.load(Ordering::SeqCst), 0, "neither job ran");
    let kept = queue.get(OWNER, &job.id).await.unwrap().unwrap();
    assert_eq!((kept.state(), kept.attempts), (JobState::Succeeded, 1));
    assert_eq!(kept.result.unwrap().text, "the first and only result");
    assert_eq!(queue.get(OWNER, &cancelled.id).await.unwrap().unwrap().state(), JobState::Cancelled);
    worker.stop().await;
}

#[tokio::test]
async fn a_long_job_keeps_its_claim_and_is_not_run_twice() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { claim_idle_ms: 150, ..config() }).await;
    let runs = Arc::new(AtomicU32::new(0));
    let execute = {
        let runs = runs.clone();
        move |request: GenerateRequest| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                Ok(echo(&request))
            }
        }
    };
    let workers = [spawn_worker(&queue, "w1", execute.clone()), spawn_worker(&queue, "w2", execute)];

    let job = queue.submit(OWNER, &request("takes a while"), "", None).await.unwrap().job;
    let done = wait_for(&queue, &job.id, SOON, state_is(JobState::Succeeded)).await;

    assert_eq!((done.attempts, runs.load(Ordering::SeqCst)), (1, 1), "the heartbeat kept the other worker off");
    for worker in workers {
        worker.stop().await;
    }
}

#[tokio::test]
async fn cancel_refuses_a_running_job_and_takes_one_out_of_its_retry_wait() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { backoff_base_ms: 60_000, backoff_max_ms: 60_000, ..config() }).await;
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let worker = spawn_worker(&queue, "w1", move |_request: GenerateRequest| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            Err::<GenerateResponse, _>(JobError::retryable("try later"))
        }
    });

    let job = queue.submit(OWNER, &request("x"), "", None).await.unwrap().job;
    wait_for(&queue, &job.id, SOON, state_is(JobState::Running)).await;
    let error = queue.cancel(OWNER, &job.id).await.unwrap_err();
    assert!(matches!(error, QueueError::NotCancellable { state: JobState::Running, .. }), "{error:?}");
    assert_eq!(queue.stats().await.unwrap().pending, 1);

    release.notify_one();
    wait_for(&queue, &job.id, SOON, |job| job.state() == JobState::Queued && job.attempts == 1).await;
    assert_eq!(queue.stats().await.unwrap().delayed, 1);
    let cancelled = queue.cancel(OWNER, &job.id).await.unwrap().job;
    assert_eq!(cancelled.state(), JobState::Cancelled);
    assert_eq!(cancelled.error, "try later", "the last error stays");
    assert_eq!(queue.stats().await.unwrap(), QueueStats::default(), "out of the delayed set");
    worker.stop().await;
}

#[tokio::test]
async fn shutdown_is_prompt_and_the_abandoned_job_is_taken_over() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { claim_idle_ms: 300, ..config() }).await;
    let stuck = spawn_worker(&queue, "stuck", |_request: GenerateRequest| async {
        tokio::time::sleep(Duration::from_secs(3_600)).await;
        Err::<GenerateResponse, _>(JobError::retryable("unreachable"))
    });
    let job = queue.submit(OWNER, &request("handed over"), "", None).await.unwrap().job;
    wait_for(&queue, &job.id, SOON, state_is(JobState::Running)).await;

    let took = stuck.stop().await;
    assert!(took < Duration::from_millis(200), "stopped in {took:?}");

    let successor = spawn_worker(&queue, "successor", echo_execute);
    let done = wait_for(&queue, &job.id, SOON, state_is(JobState::Succeeded)).await;
    assert_eq!(done.attempts, 2);

    // An idle worker, blocked in its read, stops at once too.
    let took = successor.stop().await;
    assert!(took < Duration::from_millis(200), "stopped in {took:?}");
}

/// Counts the warnings logged while it is the thread's subscriber.
#[derive(Clone, Default)]
struct WarningCounter(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WarningCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _context: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::WARN {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

// Current-thread runtime: the worker's task runs on this thread, under this thread's subscriber.
#[tokio::test]
async fn a_worker_pauses_while_redis_is_down_then_resumes_where_it_left_off() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let warnings = WarningCounter::default();
    let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));

    let mut redis = Redis::start().await.unwrap();
    let port = redis.port;
    let queue = connect(&redis, config()).await;
    let worker = spawn_worker(&queue, "w1", echo_execute);
    let job = queue.submit(OWNER, &request("before"), "", None).await.unwrap().job;
    wait_for(&queue, &job.id, SOON, state_is(JobState::Succeeded)).await;

    redis.kill().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let failed_steps = warnings.0.load(Ordering::SeqCst);
    // Pauses of ~100, 200, 400, 800 ms: a handful of failed steps, not thousands.
    assert!((1..=8).contains(&failed_steps), "{failed_steps} failed steps in 1.5 s");

    // Redis comes back empty (no persistence): the worker recreates its group and goes on.
    let _redis = Redis::start_on(port).await.unwrap();
    let deadline = Instant::now() + SOON;
    let job = loop {
        match queue.submit(OWNER, &request("after"), "", None).await {
            Ok(submitted) => break submitted.job,
            Err(error) => {
                assert!(error.is_unavailable() && Instant::now() < deadline, "{error:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for(&queue, &job.id, Duration::from_secs(10), state_is(JobState::Succeeded)).await;
    worker.stop().await;
}

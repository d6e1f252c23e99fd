//! A job's token reservation is handed over once, by the step that makes the job terminal:
//! with the usage of its answer, or whole for a failure or a cancel; never to a worker that ran
//! the job a second time or took it over after it finished. Against a real redis-server.

// Test helpers: a broken set-up should fail the test where it happens.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    OWNER, Redis, Settled, config, connect, echo, echo_execute, read_and_crash, request, spawn_settling_worker,
    wait_for,
};
use llmesh_proto::{
    common::v1::Usage,
    gateway::v1::{Job, JobState},
    generation::v1::{GenerateRequest, GenerateResponse},
};
use llmesh_queue::{JobError, JobQueue, QueueConfig, ReservationStore, Settlement, TokenReservation};
use prost::Message as _;
use redis::AsyncCommands as _;

const SOON: Duration = Duration::from_secs(5);

fn reserved(tokens: u32) -> TokenReservation {
    TokenReservation { store: ReservationStore::Shared, tokens, per_minute: 1_000 }
}

fn state_is(state: JobState) -> impl Fn(&Job) -> bool {
    move |job| job.state() == state
}

/// An answer that reports `total` tokens used.
fn answer(request: &GenerateRequest, total: u32) -> GenerateResponse {
    GenerateResponse { usage: Some(Usage { total_tokens: total, ..Default::default() }), ..echo(request) }
}

/// Waits until `count` settlements were handed over (bounded), then a little longer to catch any
/// extra one, and returns them all.
async fn settlements(settled: &Settled, count: usize) -> Vec<Settlement> {
    let deadline = Instant::now() + SOON;
    while settled.lock().unwrap().len() < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    settled.lock().unwrap().clone()
}

async fn submit(queue: &JobQueue, prompt: &str, tokens: Option<u32>) -> Job {
    queue.submit(OWNER, &request(prompt), "", tokens.map(reserved).as_ref()).await.unwrap().job
}

#[tokio::test]
async fn a_finished_job_is_settled_once_with_what_its_answer_used() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { max_retries: 0, ..config() }).await;
    let settled = Settled::default();
    let worker = spawn_settling_worker(
        &queue,
        "w1",
        |request: GenerateRequest| async move {
            match request.prompt.as_str() {
                "fails" => Err(JobError::permanent("bad request")),
                "dies" => Err(JobError::retryable("provider down")),
                "no usage" => Ok(echo(&request)),
                _ => Ok(answer(&request, 30)),
            }
        },
        &settled,
    );

    let used = submit(&queue, "uses 30", Some(600)).await;
    let no_usage = submit(&queue, "no usage", Some(500)).await;
    let failed = submit(&queue, "fails", Some(400)).await;
    let dead = submit(&queue, "dies", Some(300)).await;
    let unlimited = submit(&queue, "unlimited", None).await;
    for (job, state) in [
        (&used, JobState::Succeeded),
        (&no_usage, JobState::Succeeded),
        (&failed, JobState::Failed),
        (&dead, JobState::DeadLettered),
        (&unlimited, JobState::Succeeded),
    ] {
        wait_for(&queue, &job.id, SOON, state_is(state)).await;
    }

    let mut seen = settlements(&settled, 4).await;
    seen.sort_by_key(|settlement| settlement.reservation.tokens);
    let used_job = used.id.clone();
    let expected =
        [(&dead, 300, 0), (&failed, 400, 0), (&no_usage, 500, 500), (&used, 600, 30)].map(|(job, tokens, used)| {
            // Only the job whose answer reported its usage hands that usage over.
            let usage = (job.id == used_job).then(|| Usage { total_tokens: 30, ..Default::default() });
            Settlement {
                job_id: job.id.clone(),
                owner: OWNER.into(),
                reservation: reserved(tokens),
                used,
                succeeded: used > 0,
                usage,
                budget: None,
            }
        });
    assert_eq!(seen, expected, "one each, none for the job that reserved nothing");
    worker.stop().await;
}

#[tokio::test]
async fn a_cancelled_job_is_settled_by_the_canceller_not_by_the_worker_that_reads_it_later() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;
    let local =
        TokenReservation { store: ReservationStore::Local { replica: "gw-1".into() }, tokens: 700, per_minute: 900 };
    let job = queue.submit(OWNER, &request("never mind"), "", Some(&local)).await.unwrap().job;

    let cancelled = queue.cancel(OWNER, &job.id).await.unwrap();
    let settlement = cancelled.settlement.expect("the canceller refunds it");
    let expected = Settlement {
        job_id: job.id.clone(),
        owner: OWNER.into(),
        reservation: local,
        used: 0,
        succeeded: false,
        usage: None,
        budget: None,
    };
    assert_eq!(settlement, expected);

    // A worker then reads the cancelled job's entry: acknowledged, not run, nothing to settle.
    let settled = Settled::default();
    let worker = spawn_settling_worker(&queue, "w1", echo_execute, &settled);
    let deadline = Instant::now() + SOON;
    while queue.stats().await.unwrap().depth + queue.stats().await.unwrap().pending > 0 {
        assert!(Instant::now() < deadline, "the entry was never read");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(settlements(&settled, 0).await, []);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_run_twice_at_once_by_two_workers_is_settled_once() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;
    let job = submit(&queue, "twice", Some(600)).await;
    // A second delivery of the same job (as after a takeover whose first worker was only slow).
    let mut raw = redis.connection().await.unwrap();
    let _: String = raw.xadd("llmesh:jobs", "*", &[("job", job.id.as_str())]).await.unwrap();

    let settled = Settled::default();
    let started = Arc::new(AtomicU32::new(0));
    let execute = {
        let started = started.clone();
        move |request: GenerateRequest| {
            let started = started.clone();
            async move {
                // Both runs are under way before either ends (bounded, should one never come).
                started.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + SOON;
                while started.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(answer(&request, 40))
            }
        }
    };
    let workers = [
        spawn_settling_worker(&queue, "w1", execute.clone(), &settled),
        spawn_settling_worker(&queue, "w2", execute, &settled),
    ];
    let done = wait_for(&queue, &job.id, SOON, state_is(JobState::Succeeded)).await;
    let deadline = Instant::now() + SOON;
    while queue.stats().await.unwrap().pending > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    assert_eq!(started.load(Ordering::SeqCst), 2, "both deliveries ran");
    assert_eq!(done.attempts, 2);
    let seen = settlements(&settled, 1).await;
    assert_eq!(seen.len(), 1, "two results came in, one settlement went out: {seen:?}");
    assert_eq!(seen[0].used, 40);
    for worker in workers {
        worker.stop().await;
    }
}

#[tokio::test]
async fn a_worker_that_takes_over_a_finished_job_settles_nothing_and_one_that_finishes_it_settles_once() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { claim_idle_ms: 200, ..config() }).await;
    let mut raw = redis.connection().await.unwrap();

    // Job one: its worker stored the result (terminal, settlement handed to it), then died before
    // settling or acknowledging. The settlement went with it: the reservation stays charged.
    let finished = submit(&queue, "finished", Some(600)).await;
    read_and_crash(&redis).await;
    let result = answer(&request("finished"), 10).encode_to_vec();
    let key = format!("llmesh:jobs:job:{}", finished.id);
    let fields = [("state", "JOB_STATE_SUCCEEDED".as_bytes()), ("attempts", b"1"), ("result", result.as_slice())];
    let _: () = raw.hset_multiple(&key, &fields).await.unwrap();
    // Job two: its worker died while running it.
    let orphan = submit(&queue, "orphan", Some(500)).await;
    read_and_crash(&redis).await;
    let key = format!("llmesh:jobs:job:{}", orphan.id);
    let _: () = raw.hset_multiple(&key, &[("state", "JOB_STATE_RUNNING"), ("attempts", "1")]).await.unwrap();

    let settled = Settled::default();
    let worker = spawn_settling_worker(
        &queue,
        "live",
        |request: GenerateRequest| async move { Ok(answer(&request, 20)) },
        &settled,
    );
    wait_for(&queue, &orphan.id, SOON, state_is(JobState::Succeeded)).await;
    let deadline = Instant::now() + SOON;
    while queue.stats().await.unwrap().pending > 0 {
        assert!(Instant::now() < deadline, "the finished job's delivery was never taken over");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let seen = settlements(&settled, 1).await;
    let expected = Settlement {
        job_id: orphan.id.clone(),
        owner: OWNER.into(),
        reservation: reserved(500),
        used: 20,
        succeeded: true,
        usage: Some(Usage { total_tokens: 20, ..Default::default() }),
        budget: None,
    };
    assert_eq!(seen, [expected]);
    worker.stop().await;
}

#[tokio::test]
async fn a_money_reservation_is_handed_over_with_the_tokens_even_without_tokens() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { max_retries: 0, ..config() }).await;
    let settled = Settled::default();
    let worker = spawn_settling_worker(
        &queue,
        "w1",
        |request: GenerateRequest| async move { Ok(answer(&request, 12)) },
        &settled,
    );
    let job =
        queue.submit_with_budget(OWNER, &request("money only"), "", None, Some("{\"hold\":1}")).await.unwrap().job;
    wait_for(&queue, &job.id, SOON, state_is(JobState::Succeeded)).await;
    let seen = settlements(&settled, 1).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].budget.as_deref(), Some("{\"hold\":1}"));
    assert_eq!(seen[0].usage.map(|usage| usage.total_tokens), Some(12));
    assert!(seen[0].succeeded);
    assert_eq!((seen[0].reservation.tokens, seen[0].reservation.per_minute), (0, 0), "no tokens reserved");

    // Cancelled: the canceller gets it, whole.
    worker.stop().await;
    let waiting =
        queue.submit_with_budget(OWNER, &request("cancel me"), "", None, Some("{\"hold\":2}")).await.unwrap().job;
    let settlement = queue.cancel(OWNER, &waiting.id).await.unwrap().settlement.unwrap();
    assert_eq!(
        (settlement.budget.as_deref(), settlement.usage, settlement.succeeded),
        (Some("{\"hold\":2}"), None, false)
    );
}

//! The client side against a real redis-server: submit, idempotency, get, cancel, stats, expiry,
//! and failing fast when Redis is gone.

mod common;

use std::time::{Duration, Instant};

use common::{NO_SUCH_JOB, OWNER, Redis, config, connect, request};
use llmesh_proto::{gateway::v1::JobState, generation::v1::GenerateRequest};
use llmesh_queue::{JobQueue, QueueConfig, QueueError, QueueStats};
use prost::Message as _;
use redis::AsyncCommands as _;

#[tokio::test]
async fn submit_returns_a_queued_job_at_once_and_stores_its_record() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;
    let sent = request("hello");

    let submitted = queue.submit(OWNER, &sent, "", None).await.unwrap();

    let job = submitted.job;
    assert!(!submitted.existing);
    assert!(job.id.starts_with("job-") && job.id.len() == 4 + 32, "uuid v7, simple form: {}", job.id);
    assert_eq!(job.state(), JobState::Queued);
    assert_eq!(job.attempts, 0);
    assert!(job.result.is_none() && job.error.is_empty());
    assert!(job.created_at_unix_ms > 1_600_000_000_000 && job.created_at_unix_ms == job.updated_at_unix_ms);
    assert_eq!(queue.get(OWNER, &job.id).await.unwrap(), Some(job.clone()));

    let mut raw = redis.connection().await.unwrap();
    let key = format!("llmesh:jobs:job:{}", job.id);
    let stored_request: Vec<u8> = raw.hget(&key, "request").await.unwrap();
    assert_eq!(GenerateRequest::decode(stored_request.as_slice()).unwrap(), sent);
    let state: String = raw.hget(&key, "state").await.unwrap();
    assert_eq!(state, "JOB_STATE_QUEUED");
    let ttl: i64 = raw.pttl(&key).await.unwrap();
    assert_eq!(ttl, -1, "a job that has not finished does not expire");

    let entries: redis::streams::StreamRangeReply = raw.xrange_all("llmesh:jobs").await.unwrap();
    let queued: Vec<String> = entries.ids.iter().filter_map(|entry| entry.get("job")).collect();
    assert_eq!(queued, std::slice::from_ref(&job.id));
    assert_eq!(queue.stats().await.unwrap(), QueueStats { depth: 1, pending: 0, delayed: 0, dead_lettered: 0 });
}

#[tokio::test]
async fn an_unknown_job_is_none_and_cannot_be_cancelled() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;
    assert_eq!(queue.get(OWNER, NO_SUCH_JOB).await.unwrap(), None);
    let error = queue.cancel(OWNER, NO_SUCH_JOB).await.unwrap_err();
    assert!(matches!(error, QueueError::NotFound { ref id } if id == NO_SUCH_JOB), "{error:?}");
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_existing_job() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;

    let first = queue.submit(OWNER, &request("a"), "key-1", None).await.unwrap();
    let again = queue.submit(OWNER, &request("a, again"), "key-1", None).await.unwrap();
    let other = queue.submit(OWNER, &request("b"), "key-2", None).await.unwrap();

    assert!(!first.existing && again.existing && !other.existing);
    assert_eq!(again.job, first.job);
    assert_ne!(other.job.id, first.job.id);

    // An empty key means no idempotency: two submissions, two jobs.
    let one = queue.submit(OWNER, &request("c"), "", None).await.unwrap();
    let two = queue.submit(OWNER, &request("c"), "", None).await.unwrap();
    assert!(!one.existing && !two.existing && one.job.id != two.job.id);
    assert_eq!(queue.stats().await.unwrap().depth, 4);
}

#[tokio::test]
async fn racing_submissions_with_one_key_create_one_job() {
    let redis = Redis::start().await.unwrap();
    // Two handles, two connections: the race is between connections, as between gateways.
    let queues = [connect(&redis, config()).await, connect(&redis, config()).await];

    let submissions = (0..40).map(|i| {
        let queue = queues[i % 2].clone();
        tokio::spawn(async move { queue.submit(OWNER, &request("same"), "racy-key", None).await.unwrap() })
    });
    let results: Vec<_> = futures::future::join_all(submissions).await.into_iter().map(Result::unwrap).collect();

    let created: Vec<_> = results.iter().filter(|submitted| !submitted.existing).collect();
    assert_eq!(created.len(), 1, "exactly one submission creates the job");
    assert!(results.iter().all(|submitted| submitted.job.id == created[0].job.id));
    assert_eq!(queues[0].stats().await.unwrap().depth, 1, "and queues it once");
}

#[tokio::test]
async fn cancel_takes_a_waiting_job_out_and_refuses_a_finished_one() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;
    let job = queue.submit(OWNER, &request("never mind"), "", None).await.unwrap().job;

    let cancelled = queue.cancel(OWNER, &job.id).await.unwrap().job;
    assert_eq!(cancelled.state(), JobState::Cancelled);
    assert!(cancelled.updated_at_unix_ms >= job.updated_at_unix_ms);
    assert_eq!(queue.get(OWNER, &job.id).await.unwrap(), Some(cancelled));

    let error = queue.cancel(OWNER, &job.id).await.unwrap_err();
    assert!(
        matches!(error, QueueError::NotCancellable { state: JobState::Cancelled, .. }),
        "a cancelled job cannot be cancelled again: {error:?}"
    );
    assert!(error.to_string().contains("JOB_STATE_CANCELLED"), "the message says the state: {error}");
}

#[tokio::test]
async fn finished_jobs_and_their_idempotency_keys_expire_after_the_result_ttl() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { result_ttl_ms: 300, ..config() }).await;
    let job = queue.submit(OWNER, &request("short-lived"), "idem", None).await.unwrap().job;
    queue.cancel(OWNER, &job.id).await.unwrap();

    let mut raw = redis.connection().await.unwrap();
    let ttl: i64 = raw.pttl(format!("llmesh:jobs:job:{}", job.id)).await.unwrap();
    assert!((1..=300).contains(&ttl), "the finished job expires: pttl {ttl}");
    let idem_ttl: i64 = raw.pttl("llmesh:jobs:idem:5:alice:idem").await.unwrap();
    assert!((1..=300).contains(&idem_ttl), "and so does its idempotency key: pttl {idem_ttl}");

    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(queue.get(OWNER, &job.id).await.unwrap(), None);
    let resubmitted = queue.submit(OWNER, &request("short-lived"), "idem", None).await.unwrap();
    assert!(!resubmitted.existing, "once the job expired, its key is free again");
}

#[tokio::test]
async fn queues_on_different_streams_do_not_see_each_other() {
    let redis = Redis::start().await.unwrap();
    let blue = connect(&redis, QueueConfig { stream: "blue".into(), ..config() }).await;
    let green = connect(&redis, QueueConfig { stream: "green".into(), ..config() }).await;

    let job = blue.submit(OWNER, &request("x"), "shared-key", None).await.unwrap().job;
    let other = green.submit(OWNER, &request("x"), "shared-key", None).await.unwrap();

    assert!(!other.existing);
    assert_eq!(green.get(OWNER, &job.id).await.unwrap(), None);
    assert_eq!(blue.stats().await.unwrap().depth, 1);
    assert_eq!(green.stats().await.unwrap().depth, 1);
}

#[tokio::test]
async fn calls_fail_fast_with_unavailable_once_redis_is_gone() {
    let mut redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { response_timeout_ms: 50, ..config() }).await;
    let job = queue.submit(OWNER, &request("before"), "", None).await.unwrap().job;
    redis.kill().await;

    // Each call, including the first ones that find the connection dead, answers in time.
    let after = request("after");
    for round in 0..3 {
        let calls = [
            ("submit", timed(queue.submit(OWNER, &after, "", None)).await),
            ("get", timed(queue.get(OWNER, &job.id)).await),
            ("cancel", timed(queue.cancel(OWNER, &job.id)).await),
            ("stats", timed(queue.stats()).await),
        ];
        for (name, (result, elapsed)) in calls {
            let error = result.expect_err(name);
            assert!(error.is_unavailable(), "round {round}, {name}: {error:?}");
            assert!(elapsed < Duration::from_millis(100), "round {round}, {name} took {elapsed:?}");
        }
    }
}

async fn timed<T>(call: impl Future<Output = Result<T, QueueError>>) -> (Result<(), QueueError>, Duration) {
    let start = Instant::now();
    let result = call.await.map(drop);
    (result, start.elapsed())
}

#[tokio::test]
async fn connecting_to_a_dead_redis_fails_within_the_connect_timeout() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let start = Instant::now();
    let error =
        JobQueue::connect(&format!("redis://127.0.0.1:{port}/"), QueueConfig { connect_timeout_ms: 200, ..config() })
            .await
            .unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    assert!(start.elapsed() < Duration::from_millis(1_500), "took {:?}", start.elapsed());

    let error = JobQueue::connect("not a url", config()).await.unwrap_err();
    assert!(matches!(error, QueueError::InvalidUrl { .. }), "{error:?}");
}

//! Jobs belong to the key that submitted them, against a real redis-server: another owner's job
//! is not found, exactly like a missing one; idempotency keys are per owner; ids and keys are
//! checked before Redis is asked; records from before owners are `anonymous`'s; an owner holds at
//! most its bound of unfinished jobs.

mod common;

use std::time::Duration;

use common::{NO_SUCH_JOB, OWNER, Redis, config, connect, echo_execute, request, spawn_worker, wait_for};
use futures::StreamExt as _;
use llmesh_proto::gateway::v1::JobState;
use llmesh_queue::{InvalidInput, LEGACY_OWNER, QueueConfig, QueueError};
use redis::AsyncCommands as _;

const OTHER: &str = "bob";

fn not_found(error: &QueueError) -> bool {
    matches!(error, QueueError::NotFound { .. })
}

#[tokio::test]
async fn another_owners_job_is_not_found_exactly_like_a_missing_one() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;
    let job = queue.submit(OWNER, &request("alice's"), "", None).await.unwrap().job;

    // Read.
    assert_eq!(queue.get(OTHER, &job.id).await.unwrap(), None);
    assert_eq!(queue.get(OTHER, NO_SUCH_JOB).await.unwrap(), None);
    // Watch: one NotFound, then the end, as for a job that does not exist.
    for id in [job.id.as_str(), NO_SUCH_JOB] {
        let seen: Vec<_> = queue.watch(OTHER, id).collect().await;
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(not_found(seen[0].as_ref().unwrap_err()), "{seen:?}");
    }
    // Cancel: NotFound, not NotCancellable, and the job is left alone.
    let theirs = queue.cancel(OTHER, &job.id).await.unwrap_err();
    let missing = queue.cancel(OTHER, NO_SUCH_JOB).await.unwrap_err();
    assert!(not_found(&theirs) && not_found(&missing), "{theirs:?} / {missing:?}");
    assert_eq!(queue.get(OWNER, &job.id).await.unwrap(), Some(job.clone()), "untouched");

    // Once it is finished too: a cancel by its owner would say NotCancellable; another's, NotFound.
    queue.cancel(OWNER, &job.id).await.unwrap();
    let owner = queue.cancel(OWNER, &job.id).await.unwrap_err();
    assert!(matches!(owner, QueueError::NotCancellable { .. }), "{owner:?}");
    assert!(not_found(&queue.cancel(OTHER, &job.id).await.unwrap_err()));
    assert_eq!(queue.get(OWNER, &job.id).await.unwrap().unwrap().state(), JobState::Cancelled);
}

#[tokio::test]
async fn idempotency_keys_are_per_owner() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;

    let alice = queue.submit(OWNER, &request("a"), "order-42", None).await.unwrap();
    let bob = queue.submit(OTHER, &request("b"), "order-42", None).await.unwrap();
    assert!(!alice.existing && !bob.existing, "bob's use of alice's key makes bob's own job");
    assert_ne!(alice.job.id, bob.job.id);
    assert_eq!(queue.get(OTHER, &alice.job.id).await.unwrap(), None, "and does not give him alice's");

    let alice_again = queue.submit(OWNER, &request("a again"), "order-42", None).await.unwrap();
    let bob_again = queue.submit(OTHER, &request("b again"), "order-42", None).await.unwrap();
    assert!(alice_again.existing && bob_again.existing);
    assert_eq!((alice_again.job.id, bob_again.job.id), (alice.job.id, bob.job.id));

    // Owners and keys holding the separator never meet: ("a:b", "c") is not ("a", "b:c").
    let first = queue.submit("a:b", &request("x"), "c", None).await.unwrap();
    let second = queue.submit("a", &request("y"), "b:c", None).await.unwrap();
    assert!(!first.existing && !second.existing);
    assert_ne!(first.job.id, second.job.id);
    let mut raw = redis.connection().await.unwrap();
    let record: String = raw.get("llmesh:jobs:idem:3:a:b:c").await.unwrap();
    assert_eq!(record, first.job.id);
}

#[tokio::test]
async fn ids_and_idempotency_keys_are_checked_before_redis_is_asked() {
    let mut redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;
    // With Redis gone, any call that reached it would be Unavailable.
    redis.kill().await;

    let invalid = |error: QueueError| match error {
        QueueError::Invalid(InvalidInput { field, .. }) => field,
        other => panic!("expected Invalid, got {other:?}"),
    };
    for id in ["", "job-nope", "job-0123", "../etc", "job-0123456789ABCDEF0123456789ABCDEF"] {
        assert_eq!(invalid(queue.get(OWNER, id).await.unwrap_err()), "job_id");
        assert_eq!(invalid(queue.cancel(OWNER, id).await.unwrap_err()), "job_id");
        let seen: Vec<_> = queue.watch(OWNER, id).collect().await;
        assert!(matches!(seen.as_slice(), [Err(QueueError::Invalid(_))]), "{seen:?}");
    }
    let long = "k".repeat(129);
    for key in [long.as_str(), "line\nbreak", "caf\u{e9}"] {
        let error = queue.submit(OWNER, &request("x"), key, None).await.unwrap_err();
        assert_eq!(error.to_string(), "idempotency_key: at most 128 bytes of printable ASCII");
    }
    // A well-formed call does reach Redis, and finds it gone.
    assert!(queue.get(OWNER, NO_SUCH_JOB).await.unwrap_err().is_unavailable());
}

#[tokio::test]
async fn records_from_before_owners_belong_to_anonymous_only() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, config()).await;
    // A record as the queue wrote them before jobs had owners.
    let id = "job-0190000000007000800000000000000a";
    let mut raw = redis.connection().await.unwrap();
    let fields = [("state", "JOB_STATE_QUEUED"), ("attempts", "0"), ("created_at_ms", "1"), ("updated_at_ms", "1")];
    let _: () = raw.hset_multiple(format!("llmesh:jobs:job:{id}"), &fields).await.unwrap();

    assert_eq!(queue.get(OWNER, id).await.unwrap(), None);
    assert!(not_found(&queue.cancel(OWNER, id).await.unwrap_err()));
    let job = queue.get(LEGACY_OWNER, id).await.unwrap().expect("anonymous keeps its jobs across the upgrade");
    assert_eq!(job.state(), JobState::Queued);
    let cancelled = queue.cancel(LEGACY_OWNER, id).await.unwrap();
    assert_eq!(cancelled.job.state(), JobState::Cancelled);
    assert_eq!(cancelled.settlement, None, "it reserved nothing");
}

#[tokio::test]
async fn an_owner_holds_at_most_its_bound_of_unfinished_jobs() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { max_unfinished_per_owner: 3, ..config() }).await;
    let full = |error: &QueueError| matches!(error, QueueError::TooManyUnfinished { limit: 3 });
    let mut jobs = Vec::new();
    for i in 0..3 {
        jobs.push(queue.submit(OWNER, &request(&format!("job {i}")), &format!("key-{i}"), None).await.unwrap().job);
    }
    let error = queue.submit(OWNER, &request("one too many"), "", None).await.unwrap_err();
    assert!(full(&error), "{error:?}");
    // Another owner is not held back by it.
    queue.submit(OTHER, &request("bob's"), "", None).await.unwrap();
    // A resubmission with an idempotency key still finds its job: it adds nothing.
    let again = queue.submit(OWNER, &request("job 0"), "key-0", None).await.unwrap();
    assert!(again.existing && again.job.id == jobs[0].id, "{again:?}");

    // A job that ends makes room for one more.
    queue.cancel(OWNER, &jobs[0].id).await.unwrap();
    let fourth = queue.submit(OWNER, &request("fourth"), "", None).await.unwrap().job;
    assert!(full(&queue.submit(OWNER, &request("fifth"), "", None).await.unwrap_err()));
    // So do jobs that finish on a worker (it runs all three).
    let worker = spawn_worker(&queue, "w1", echo_execute);
    for job in [&jobs[1], &jobs[2], &fourth] {
        wait_for(&queue, &job.id, Duration::from_secs(10), |job| job.state() == JobState::Succeeded).await;
    }
    worker.stop().await;
    let mut raw = redis.connection().await.unwrap();
    let unfinished: u64 = raw.zcard(format!("llmesh:jobs:unfinished:{OWNER}")).await.unwrap();
    assert_eq!(unfinished, 0);

    // A record that vanished without ending (deleted by hand, evicted) does not hold its place.
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(queue.submit(OWNER, &request(&format!("again {i}")), "", None).await.unwrap().job.id);
    }
    assert!(full(&queue.submit(OWNER, &request("full again"), "", None).await.unwrap_err()));
    let _: () = raw.del(format!("llmesh:jobs:job:{}", ids[0])).await.unwrap();
    queue.submit(OWNER, &request("in its place"), "", None).await.unwrap();
    assert!(full(&queue.submit(OWNER, &request("and no more"), "", None).await.unwrap_err()));
}

//! Jobs between tenants, through the real binaries and a real Redis, with two API keys: a key
//! cannot see, watch, cancel or claim (by idempotency key) another key's job, and each of those
//! answers NOT_FOUND exactly as for a job that does not exist; a job's tokens are reserved from
//! its key's budget until the job ends, then the unused part comes back (the worker settles it, or
//! the cancel); a watch ends after the configured maximum; a key at its bound of unfinished jobs
//! is told to wait, and the others are not.

use std::time::{Duration, Instant};

use llmesh_e2e::{Mesh, MeshOptions, Proc, Redis};
use llmesh_proto::gateway::v1::{
    CancelJobRequest, GetJobRequest, Job, JobState, SubmitJobRequest, SubmitJobResponse, WatchJobRequest,
    gateway_client::GatewayClient,
};
use tonic::{Code, Status, transport::Channel};

/// A well-formed job id no job has.
const NO_SUCH_JOB: &str = "job-0190ffffffff7fffbfffffffffffffff";

/// A key of its own: the key to send, and its `[[keys]]` entry as inline TOML.
struct Tenant {
    key: String,
    entry: String,
}

impl Tenant {
    fn new(id: &str, tokens_per_minute: Option<u32>) -> Self {
        let (key, entry) = llmesh_keys::generate_key(id);
        let limit = tokens_per_minute.map(|tokens| format!(",tokens_per_minute={tokens}")).unwrap_or_default();
        let entry = format!(r#"{{id="{}",prefix="{}",sha256="{}"{limit}}}"#, entry.id, entry.prefix, entry.sha256);
        Self { key, entry }
    }

    fn call<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("x-api-key", self.key.parse().unwrap());
        request
    }

    async fn submit(
        &self,
        gateway: &mut GatewayClient<Channel>,
        job: SubmitJobRequest,
    ) -> Result<SubmitJobResponse, Status> {
        gateway.submit_job(self.call(job)).await.map(tonic::Response::into_inner)
    }

    async fn get(&self, gateway: &mut GatewayClient<Channel>, id: &str) -> Result<Job, Status> {
        let response = gateway.get_job(self.call(GetJobRequest { job_id: id.into() })).await?;
        Ok(response.into_inner().job.unwrap())
    }

    async fn cancel(&self, gateway: &mut GatewayClient<Channel>, id: &str) -> Result<Job, Status> {
        let response = gateway.cancel_job(self.call(CancelJobRequest { job_id: id.into() })).await?;
        Ok(response.into_inner().job.unwrap())
    }

    /// How a watch of `id` ends when it yields nothing: the call's status, or its stream's first.
    async fn watch_refusal(&self, gateway: &mut GatewayClient<Channel>, id: &str) -> Status {
        let watch = gateway.watch_job(self.call(WatchJobRequest { job_id: id.into() })).await;
        let mut stream = match watch {
            Ok(response) => response.into_inner(),
            Err(status) => return status,
        };
        let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("the watch answers");
        first.expect_err("the watch yields no job")
    }
}

fn job(prompt: &str, max_tokens: u32) -> SubmitJobRequest {
    SubmitJobRequest { model: "sim".into(), prompt: prompt.into(), max_tokens, ..Default::default() }
}

/// A mesh on `redis` (queue, and the limiter shared with the workers) with these keys, and
/// `extra` environment for every service.
async fn mesh(redis: &Redis, tenants: &[&Tenant], extra: &[(&'static str, &str)]) -> Mesh {
    let mut env = queue_env(redis);
    let keys: Vec<&str> = tenants.iter().map(|tenant| tenant.entry.as_str()).collect();
    env.push(("LLMESH_GATEWAY_AUTH__KEYS", format!("[{}]", keys.join(","))));
    env.extend(extra.iter().map(|(name, value)| (*name, value.to_string())));
    Mesh::start_with(MeshOptions { env, redis_url: None, ..Default::default() }).await
}

fn queue_env(redis: &Redis) -> Vec<(&'static str, String)> {
    vec![
        ("LLMESH_GATEWAY_QUEUE__REDIS_URL", redis.url()),
        ("LLMESH_GENERATION_QUEUE__REDIS_URL", redis.url()),
        ("LLMESH_GATEWAY_RATE_LIMIT__REDIS_URL", redis.url()),
        // Roomy: a reservation Redis is too slow for falls back to the gateway's own memory,
        // where no worker can settle it.
        ("LLMESH_GATEWAY_RATE_LIMIT__REDIS_TIMEOUT_MS", "1000".into()),
        // Who sees a job is under test here, not how fast Redis answers: a loaded host can miss
        // the job API's 50 ms budget, which is UNAVAILABLE (retryable) by design.
        ("LLMESH_GATEWAY_QUEUE__OPTIONS__RESPONSE_TIMEOUT_MS", "1000".into()),
    ]
}

/// No workers in the mesh: jobs stay queued until a test starts a worker process.
const NO_WORKERS: (&str, &str) = ("LLMESH_GENERATION_QUEUE__WORKERS", "0");

fn same_answer(seen: &Status, missing: &Status) -> bool {
    seen.code() == missing.code() && seen.message() == missing.message()
}

#[tokio::test]
async fn another_key_cannot_see_watch_cancel_or_claim_a_job() {
    let redis = Redis::start().await.unwrap();
    let (alice, bob) = (Tenant::new("tenant-a", None), Tenant::new("tenant-b", None));
    let mesh = mesh(&redis, &[&alice, &bob], &[NO_WORKERS]).await;
    let mut gateway = mesh.gateway().await;

    let submitted = alice
        .submit(&mut gateway, SubmitJobRequest { idempotency_key: "order-42".into(), ..job("alice's secret", 16) });
    let alice_job = submitted.await.unwrap().job.unwrap();

    // See.
    let seen = bob.get(&mut gateway, &alice_job.id).await.unwrap_err();
    let missing = bob.get(&mut gateway, NO_SUCH_JOB).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(same_answer(&seen, &missing), "GetJob on another key's job: {seen:?}, on no job: {missing:?}");
    // Watch.
    let seen = bob.watch_refusal(&mut gateway, &alice_job.id).await;
    let missing = bob.watch_refusal(&mut gateway, NO_SUCH_JOB).await;
    assert_eq!(missing.code(), Code::NotFound);
    assert!(same_answer(&seen, &missing), "WatchJob on another key's job: {seen:?}, on no job: {missing:?}");
    // Cancel: refused as missing, and the job is left as it was.
    let seen = bob.cancel(&mut gateway, &alice_job.id).await.unwrap_err();
    let missing = bob.cancel(&mut gateway, NO_SUCH_JOB).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(same_answer(&seen, &missing), "CancelJob on another key's job: {seen:?}, on no job: {missing:?}");
    assert_eq!(alice.get(&mut gateway, &alice_job.id).await.unwrap().state(), JobState::Queued);
    // Claim by idempotency key: bob's submission with alice's key is bob's own new job.
    let claimed = bob.submit(&mut gateway, SubmitJobRequest { idempotency_key: "order-42".into(), ..job("bob's", 16) });
    let claimed = claimed.await.unwrap();
    assert!(!claimed.existing, "{claimed:?}");
    let bob_job = claimed.job.unwrap();
    assert_ne!(bob_job.id, alice_job.id);
    assert!(same_answer(&alice.get(&mut gateway, &bob_job.id).await.unwrap_err(), &missing), "and it is bob's alone");

    // Each key still has its own job under the one idempotency key.
    let again = alice.submit(&mut gateway, SubmitJobRequest { idempotency_key: "order-42".into(), ..job("again", 16) });
    let again = again.await.unwrap();
    assert!(again.existing);
    assert_eq!(again.job.unwrap().id, alice_job.id);
    assert_eq!(alice.cancel(&mut gateway, &alice_job.id).await.unwrap().state(), JobState::Cancelled);
}

#[tokio::test]
async fn a_key_cannot_submit_jobs_past_its_token_limit() {
    let redis = Redis::start().await.unwrap();
    let (small, other) = (Tenant::new("small", Some(1_000)), Tenant::new("other", Some(1_000)));
    let mesh = mesh(&redis, &[&small, &other], &[NO_WORKERS]).await;
    let mut gateway = mesh.gateway().await;

    // Each job reserves its prompt's estimate plus max_tokens: about 301 tokens.
    for i in 0..3 {
        small.submit(&mut gateway, job(&format!("job {i}"), 300)).await.unwrap();
    }
    let refused = small.submit(&mut gateway, job("one too many", 300)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let hint = |name: &str| refused.metadata().get(name).and_then(|v| v.to_str().ok()?.parse::<i64>().ok());
    assert!(hint("retry-after-ms").is_some_and(|ms| ms > 0), "{refused:?}");
    assert!(hint("grpc-retry-pushback-ms").is_some_and(|ms| ms > 0), "{refused:?}");
    // Another key's budget is its own.
    other.submit(&mut gateway, job("fine", 300)).await.unwrap();
}

#[tokio::test]
async fn the_unused_part_of_a_finished_jobs_reservation_comes_back() {
    let redis = Redis::start().await.unwrap();
    let tenant = Tenant::new("budgeted", Some(1_000));
    let mesh = mesh(&redis, &[&tenant], &[NO_WORKERS]).await;
    let mut gateway = mesh.gateway().await;

    // About 991 of the key's 1,000 tokens are reserved; a second such job does not fit (the bucket
    // refills at about 17 tokens a second: a minute away).
    let first = tenant.submit(&mut gateway, job("a short answer", 990)).await.unwrap().job.unwrap();
    let refused = tenant.submit(&mut gateway, job("a second", 990)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // A worker runs the first job, which uses a few dozen tokens, and settles its reservation.
    let _worker = Proc::spawn("generation", &queue_env(&redis)).await.unwrap();
    let finished = eventually(Duration::from_secs(20), async || {
        let job = tenant.get(&mut gateway.clone(), &first.id).await.ok()?;
        (job.state() == JobState::Succeeded).then_some(job)
    })
    .await
    .expect("the job finishes");
    let used = finished.result.unwrap().usage.unwrap().total_tokens;
    assert!(used < 100, "the sim answer is short: {used}");

    let second = eventually(Duration::from_secs(10), async || {
        tenant.submit(&mut gateway.clone(), job("a second", 990)).await.ok()
    })
    .await
    .expect("the reservation that did not fit fits once the first job's unused tokens are back");
    assert!(!second.existing);
}

#[tokio::test]
async fn a_cancelled_jobs_reservation_comes_back() {
    let redis = Redis::start().await.unwrap();
    let tenant = Tenant::new("budgeted", Some(1_000));
    let mesh = mesh(&redis, &[&tenant], &[NO_WORKERS]).await;
    let mut gateway = mesh.gateway().await;

    let first = tenant.submit(&mut gateway, job("never mind", 990)).await.unwrap().job.unwrap();
    let refused = tenant.submit(&mut gateway, job("instead", 990)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // The cancel gives the reservation back before it answers.
    assert_eq!(tenant.cancel(&mut gateway, &first.id).await.unwrap().state(), JobState::Cancelled);
    let instead = tenant.submit(&mut gateway, job("instead", 990)).await;
    assert!(instead.is_ok(), "{instead:?}");
}

#[tokio::test]
async fn a_watch_ends_after_the_configured_maximum() {
    let redis = Redis::start().await.unwrap();
    let tenant = Tenant::new("watcher", None);
    let mesh = mesh(&redis, &[&tenant], &[NO_WORKERS, ("LLMESH_GATEWAY_QUEUE__WATCH_MAX_MS", "1000")]).await;
    let mut gateway = mesh.gateway().await;
    let queued = tenant.submit(&mut gateway, job("waits forever", 16)).await.unwrap().job.unwrap();

    let mut watch =
        gateway.watch_job(tenant.call(WatchJobRequest { job_id: queued.id.clone() })).await.unwrap().into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        let mut states = Vec::new();
        loop {
            match watch.message().await {
                Ok(Some(update)) => states.push(update.job.unwrap().state()),
                Ok(None) => return (states, None),
                Err(status) => return (states, Some(status)),
            }
        }
    })
    .await
    .expect("a watch of a job that never changes still ends");
    let (states, status) = ended;
    assert_eq!(states, [JobState::Queued]);
    let status = status.expect("the watch ends with a status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("WatchJob again"), "{status:?}");
    // The job goes on.
    assert_eq!(tenant.get(&mut gateway, &queued.id).await.unwrap().state(), JobState::Queued);
}

/// Polls `check` every 100 ms until it returns `Some`, at most `within`.
async fn eventually<T>(within: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_key_at_its_bound_of_unfinished_jobs_is_told_to_wait_and_others_are_not() {
    let redis = Redis::start().await.unwrap();
    let (alice, bob) = (Tenant::new("tenant-a", None), Tenant::new("tenant-b", None));
    let bound = ("LLMESH_GATEWAY_QUEUE__OPTIONS__MAX_UNFINISHED_PER_OWNER", "2");
    let mesh = mesh(&redis, &[&alice, &bob], &[NO_WORKERS, bound]).await;
    let mut gateway = mesh.gateway().await;

    let first = alice.submit(&mut gateway, job("one", 8)).await.unwrap().job.unwrap();
    alice.submit(&mut gateway, job("two", 8)).await.unwrap();
    let refused = alice.submit(&mut gateway, job("three", 8)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.metadata().get("retry-after-ms").is_some(), "a retry hint: {refused:?}");
    assert!(refused.message().contains("max_unfinished_per_owner"), "{refused:?}");
    // Another key still queues.
    bob.submit(&mut gateway, job("bob's", 8)).await.unwrap();
    // A job of alice's that ends makes room.
    alice.cancel(&mut gateway, &first.id).await.unwrap();
    alice.submit(&mut gateway, job("three, later", 8)).await.unwrap();
}

//! The job queue through the gateway: life cycle, idempotency, cancel, Redis down, and workers
//! killed with SIGKILL while 1,000 jobs run.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use llmesh_e2e::{Mesh, MeshOptions, Proc, Redis};
use llmesh_proto::gateway::v1::{
    CancelJobRequest, GetJobRequest, Job, JobState, SubmitJobRequest, WatchJobRequest, gateway_client::GatewayClient,
};
use tonic::{Code, transport::Channel};

fn job(prompt: &str) -> SubmitJobRequest {
    SubmitJobRequest { model: "sim".into(), prompt: prompt.into(), ..Default::default() }
}

fn queue_env(redis: &Redis, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env =
        vec![("LLMESH_GATEWAY_QUEUE__REDIS_URL", redis.url()), ("LLMESH_GENERATION_QUEUE__REDIS_URL", redis.url())];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    env
}

async fn get(gateway: &mut GatewayClient<Channel>, id: &str) -> Job {
    gateway.get_job(GetJobRequest { job_id: id.into() }).await.unwrap().into_inner().job.unwrap()
}

#[tokio::test]
async fn submit_watch_succeed() {
    let redis = Redis::start().await.unwrap();
    let env = queue_env(&redis, &[("LLMESH_GENERATION_ADMIN__LISTEN", "127.0.0.1:0")]);
    let mesh = Mesh::start_with(MeshOptions { env, redis_url: None, ..Default::default() }).await;
    let mut gateway = mesh.gateway().await;

    let submitted = gateway.submit_job(job("a job")).await.unwrap().into_inner();
    let id = submitted.job.unwrap().id;
    assert!(!submitted.existing);
    let mut watch = gateway.watch_job(WatchJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    let mut states = Vec::new();
    let last = tokio::time::timeout(Duration::from_secs(10), async {
        let mut last = None;
        while let Some(update) = watch.message().await.unwrap() {
            let job = update.job.unwrap();
            states.push(job.state());
            last = Some(job);
        }
        last
    })
    .await
    .expect("the watch ends after a terminal state")
    .unwrap();
    assert_eq!(last.state(), JobState::Succeeded, "{states:?}");
    assert_eq!(states.last(), Some(&JobState::Succeeded));
    let direct = gateway.generate(crate::prompt("a job")).await.unwrap().into_inner();
    // When its attempt started, between its submission and its end; and generation's worker
    // counted the job's wait in the queue.
    assert!(
        last.created_at_unix_ms <= last.started_at_unix_ms && last.started_at_unix_ms <= last.updated_at_unix_ms,
        "{last:?}"
    );
    assert_eq!(mesh.generation.metric_sum("llmesh_queue_wait_seconds_count", "").await, 1.0);
    assert_eq!(last.result.unwrap().text, direct.text);
    assert_eq!(last.attempts, 1);
}

#[tokio::test]
async fn idempotency_cancel_and_bad_input() {
    let redis = Redis::start().await.unwrap();
    // No workers: jobs stay queued.
    let env = queue_env(&redis, &[("LLMESH_GENERATION_QUEUE__WORKERS", "0")]);
    let mesh = Mesh::start_with(MeshOptions { env, redis_url: None, ..Default::default() }).await;
    let mut gateway = mesh.gateway().await;

    let keyed = SubmitJobRequest { idempotency_key: "order-42".into(), ..job("once only") };
    let first = gateway.submit_job(keyed.clone()).await.unwrap().into_inner();
    let again = gateway.submit_job(keyed).await.unwrap().into_inner();
    assert!(again.existing);
    assert_eq!(first.job.as_ref().unwrap().id, again.job.as_ref().unwrap().id);

    let id = first.job.unwrap().id;
    let cancelled = gateway.cancel_job(CancelJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(cancelled.job.unwrap().state(), JobState::Cancelled);
    let status = gateway.cancel_job(CancelJobRequest { job_id: id.clone() }).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(get(&mut gateway, &id).await.state(), JobState::Cancelled);

    let status = gateway.get_job(GetJobRequest { job_id: "job-00000000000000000000000000000000".into() }).await;
    assert_eq!(status.unwrap_err().code(), Code::NotFound);
    for malformed in ["", "job-nope"] {
        let status = gateway.get_job(GetJobRequest { job_id: malformed.into() }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("job_id"), "{status:?}");
    }
    let status = gateway.submit_job(job("")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("prompt"));
}

#[tokio::test]
async fn without_a_queue_jobs_are_a_failed_precondition() {
    let mesh = Mesh::start().await;
    let status = mesh.gateway().await.submit_job(job("x")).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("queue"));
}

#[tokio::test]
async fn redis_down_submit_fails_fast() {
    let mut redis = Redis::start().await.unwrap();
    let mesh =
        Mesh::start_with(MeshOptions { env: queue_env(&redis, &[]), redis_url: None, ..Default::default() }).await;
    let mut gateway = mesh.gateway().await;
    gateway.submit_job(job("warm up")).await.unwrap();
    redis.kill().await;
    for i in 0..5 {
        let started = Instant::now();
        let status = gateway.submit_job(job(&format!("while down {i}"))).await.unwrap_err();
        let took = started.elapsed();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(took < Duration::from_millis(100), "SubmitJob took {took:?} with Redis down");
    }
    // The gateway still generates.
    assert!(gateway.generate(crate::prompt("still here")).await.is_ok());
}

#[tokio::test]
async fn thousand_jobs_survive_killed_workers() {
    let redis = Redis::start().await.unwrap();
    // Each kill costs the jobs its worker was running an attempt (their next one starts once the
    // delivery has been idle for CLAIM_IDLE_MS). With more attempts than kills, no job can run
    // out of them through kills alone, whatever the machine's load makes of the timing: with the
    // default four, a job that met four kills in a row was dead-lettered, rarely, on a loaded CI
    // host. The poison job shows the limit still holds.
    const KILLS: usize = 12;
    let max_retries = KILLS.to_string();
    let tuning: &[(&'static str, &str)] = &[
        ("LLMESH_GENERATION_QUEUE__OPTIONS__MAX_RETRIES", &max_retries),
        ("LLMESH_GENERATION_QUEUE__OPTIONS__CLAIM_IDLE_MS", "500"),
        ("LLMESH_GENERATION_QUEUE__OPTIONS__BACKOFF_BASE_MS", "20"),
        ("LLMESH_GENERATION_QUEUE__OPTIONS__BACKOFF_MAX_MS", "200"),
        ("LLMESH_GENERATION_MODELS__SIM__TIME_TO_FIRST_TOKEN_MS", "40"),
    ];
    // The mesh's own generation takes no jobs: only the processes this test kills do.
    let mut mesh_env = queue_env(&redis, tuning);
    mesh_env.push(("LLMESH_GENERATION_QUEUE__WORKERS", "0".into()));
    let mesh = Mesh::start_with(MeshOptions { env: mesh_env, redis_url: None, ..Default::default() }).await;
    let worker_env = queue_env(&redis, tuning);
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(Proc::spawn("generation", &worker_env).await.unwrap());
    }

    let gateway = mesh.gateway().await;
    let poison = gateway.clone().submit_job(SubmitJobRequest { model: "sim-error".into(), ..job("poison") }).await;
    let poison = poison.unwrap().into_inner().job.unwrap().id;
    let ids: Vec<String> = futures::stream::iter(0..1000)
        .map(|i| {
            let mut gateway = gateway.clone();
            async move {
                submit_retrying(
                    &mut gateway,
                    SubmitJobRequest { idempotency_key: format!("k{i}"), ..job(&format!("job {i}")) },
                )
                .await
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;

    // Kill a worker process every 200 ms, round robin, and start a new one in its place.
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let all_terminal = loop {
        if kills >= 3 {
            let pending = unfinished(&gateway, &ids).await;
            if pending == 0 {
                break true;
            }
        }
        if Instant::now() > deadline {
            break false;
        }
        if kills < KILLS {
            let victim = kills % workers.len();
            workers[victim].kill().await;
            workers[victim] = Proc::spawn("generation", &worker_env).await.unwrap();
            kills += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(all_terminal, "{} jobs never finished", unfinished(&gateway, &ids).await);
    assert!(kills >= 3, "the run ended before workers were killed ({kills} kills)");

    let mut gateway = gateway;
    for id in &ids {
        let job = get(&mut gateway, id).await;
        assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
        assert!(!job.result.unwrap().text.is_empty());
    }
    let poisoned = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let job = get(&mut gateway, &poison).await;
            if job.state() == JobState::DeadLettered {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the poison job is dead-lettered");
    assert_eq!(poisoned.attempts as usize, KILLS + 1);
    assert!(poisoned.error.contains("injected"), "{poisoned:?}");
}

/// Submits as a careful client does: the gateway gives each Redis call a small budget, so on a
/// loaded machine a submit can be UNAVAILABLE; the client tries again (bounded) with the same
/// idempotency key, which also covers a submit that was stored but answered too late.
async fn submit_retrying(gateway: &mut GatewayClient<Channel>, request: SubmitJobRequest) -> String {
    assert!(!request.idempotency_key.is_empty());
    for _ in 0..20 {
        match gateway.submit_job(request.clone()).await {
            Ok(response) => return response.into_inner().job.unwrap().id,
            Err(status) if status.code() == Code::Unavailable => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(status) => panic!("{status:?}"),
        }
    }
    panic!("SubmitJob was UNAVAILABLE 20 times in a row")
}

/// How many of `ids` are not in a terminal state yet.
async fn unfinished(gateway: &GatewayClient<Channel>, ids: &[String]) -> usize {
    futures::stream::iter(ids.iter().cloned())
        .map(|id| {
            let mut gateway = gateway.clone();
            async move {
                // A GetJob that times out on a loaded machine says nothing about the job: it counts
                // as not finished yet, and the next round asks again.
                let Ok(response) = gateway.get_job(GetJobRequest { job_id: id }).await else { return true };
                let state = response.into_inner().job.map_or(JobState::Unspecified, |job| job.state());
                !matches!(state, JobState::Succeeded | JobState::Failed | JobState::DeadLettered | JobState::Cancelled)
            }
        })
        .buffer_unordered(50)
        .filter(|pending| std::future::ready(*pending))
        .count()
        .await
}

//! Many jobs, several workers, retries and poison jobs at once, against a real redis-server.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{OWNER, Redis, config, connect, echo, request, spawn_worker};
use llmesh_proto::{gateway::v1::JobState, generation::v1::GenerateRequest};
use llmesh_queue::{JobError, QueueConfig, QueueStats, is_terminal};
use redis::AsyncCommands as _;

const JOBS: usize = 200;
const WORKERS: usize = 4;
const POISON: [usize; 3] = [7, 77, 177];

/// Every 5th job fails (retryably) on its first attempt; poison jobs fail every attempt.
fn flaky(index: usize) -> bool {
    index.is_multiple_of(5)
}

#[derive(Default)]
struct Executions {
    attempts: HashMap<usize, u32>,
    successes: HashMap<usize, u32>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_jobs_four_workers_retries_and_poison() {
    let redis = Redis::start().await.unwrap();
    let queue = connect(&redis, QueueConfig { backoff_base_ms: 10, backoff_max_ms: 100, ..config() }).await;
    let executions: Arc<Mutex<Executions>> = Arc::default();

    let workers: Vec<_> = (0..WORKERS)
        .map(|n| {
            let executions = executions.clone();
            spawn_worker(&queue, &format!("worker-{n}"), move |request: GenerateRequest| {
                let index: usize = request.prompt.trim_start_matches("job ").parse().unwrap();
                let attempt = {
                    let mut executions = executions.lock().unwrap();
                    let attempt = executions.attempts.entry(index).or_default();
                    *attempt += 1;
                    *attempt
                };
                let executions = executions.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..3))).await;
                    if POISON.contains(&index) {
                        return Err(JobError::retryable("poison"));
                    }
                    if flaky(index) && attempt == 1 {
                        return Err(JobError::retryable("first attempt fails"));
                    }
                    *executions.lock().unwrap().successes.entry(index).or_default() += 1;
                    Ok(echo(&request))
                }
            })
        })
        .collect();

    let start = Instant::now();
    let mut ids = Vec::with_capacity(JOBS);
    for index in 0..JOBS {
        ids.push(queue.submit(OWNER, &request(&format!("job {index}")), "", None).await.unwrap().job.id);
    }

    let deadline = start + Duration::from_secs(30);
    let jobs = loop {
        let mut jobs = Vec::with_capacity(JOBS);
        for id in &ids {
            jobs.push(queue.get(OWNER, id).await.unwrap().unwrap());
        }
        if jobs.iter().all(|job| is_terminal(job.state())) {
            break jobs;
        }
        let open = jobs.iter().filter(|job| !is_terminal(job.state())).count();
        assert!(Instant::now() < deadline, "{open} jobs still open after 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let elapsed = start.elapsed();

    for worker in workers {
        worker.stop().await;
    }
    let executions = std::mem::take(&mut *executions.lock().unwrap());
    for (index, job) in jobs.iter().enumerate() {
        let poison = POISON.contains(&index);
        let expected = if poison { JobState::DeadLettered } else { JobState::Succeeded };
        assert_eq!(job.state(), expected, "job {index}");
        let attempts = if poison {
            4
        } else if flaky(index) {
            2
        } else {
            1
        };
        assert_eq!(job.attempts, attempts, "job {index}: attempts");
        assert_eq!(executions.attempts.get(&index), Some(&attempts), "job {index}: executions");
        let successes = executions.successes.get(&index).copied().unwrap_or(0);
        assert_eq!(successes, u32::from(!poison), "job {index}: successful executions");
    }

    let mut raw = redis.connection().await.unwrap();
    let letters: redis::streams::StreamRangeReply = raw.xrange_all("llmesh:jobs:dead").await.unwrap();
    let mut dead: Vec<String> = letters.ids.iter().map(|letter| letter.get("job").unwrap()).collect();
    let mut poison_ids: Vec<String> = POISON.iter().map(|&index| ids[index].clone()).collect();
    dead.sort();
    poison_ids.sort();
    assert_eq!(dead, poison_ids, "exactly the poison jobs are dead-lettered, once each");
    assert_eq!(queue.stats().await.unwrap(), QueueStats { dead_lettered: 3, ..QueueStats::default() });
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
}

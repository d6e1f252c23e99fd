//! Chaos with real processes: a replica killed under load, an upstream failing for a while, a slow
//! replica. Every loop is bounded in count and time, and all traffic stays on loopback.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use llmesh_e2e::{Mesh, MeshOptions, Proc};
use llmesh_proto::{
    common::v1::{CachePolicy, FinishReason},
    gateway::v1::GenerateRequest,
};

use crate::prompt;

/// A request that always reaches generation (no cache).
fn fresh(text: &str) -> GenerateRequest {
    GenerateRequest { cache: CachePolicy::Bypass.into(), ..prompt(text) }
}

#[tokio::test]
async fn a_replica_killed_mid_run_costs_almost_nothing() {
    let paced = || vec![("LLMESH_GENERATION_MODELS__SIM__TIME_TO_FIRST_TOKEN_MS", "5".to_string())];
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GENERATION_MODELS__SIM__TIME_TO_FIRST_TOKEN_MS", "5".to_string()),
            ("LLMESH_GATEWAY_FALLBACK__ENABLED", "false".to_string()),
        ],
        replicas: vec![paced(), paced()],
        ..Default::default()
    };
    let mut mesh = Mesh::start_with(options).await;
    let gateway = mesh.gateway().await;
    let deadline = Duration::from_secs(2);
    let (ok, failed, late) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // Counted, not timed, so that a slow host still sends enough calls to judge: 1,200 calls,
    // the replica killed after the first 400 (bounded at 60 s).
    const CALLS: usize = 1_200;
    let stop_at = Instant::now() + Duration::from_secs(60);
    let done = move |ok: &AtomicUsize, failed: &AtomicUsize| ok.load(Relaxed) + failed.load(Relaxed);
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (gateway, ok, failed, late) = (gateway.clone(), ok.clone(), failed.clone(), late.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while Instant::now() < stop_at && done(&ok, &failed) < CALLS {
                    let mut request = tonic::Request::new(fresh(&format!("client {c} call {i}")));
                    request.set_timeout(deadline);
                    let started = Instant::now();
                    let result = gateway.clone().generate(request).await;
                    if started.elapsed() > deadline + Duration::from_millis(100) {
                        late.fetch_add(1, Relaxed);
                    }
                    match result {
                        Ok(_) => ok.fetch_add(1, Relaxed),
                        Err(_) => failed.fetch_add(1, Relaxed),
                    };
                    i += 1;
                }
            })
        })
        .collect();
    while done(&ok, &failed) < CALLS / 3 && Instant::now() < stop_at {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    mesh.replicas[0].kill().await;
    for client in clients {
        client.await.unwrap();
    }
    let (ok, failed, late) = (ok.load(Relaxed), failed.load(Relaxed), late.load(Relaxed));
    let total = ok + failed;
    assert!(total >= CALLS, "too little traffic to judge: {total}");
    assert!(ok as f64 >= 0.999 * total as f64, "{failed} of {total} calls failed after a replica died");
    assert_eq!(late, 0, "{late} calls outlived their deadline by more than 100 ms");
}

#[tokio::test]
async fn the_breaker_opens_falls_back_fast_and_closes_after_recovery() {
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_GENERATION__BREAKER__RECOVERY_MS", "1000".to_string()),
            ("LLMESH_GATEWAY_GENERATION__RETRY__MAX_ATTEMPTS", "1".to_string()),
        ],
        ..Default::default()
    };
    let mut mesh = Mesh::start_with(options).await;
    let mut gateway = mesh.gateway().await;
    assert!(gateway.generate(fresh("warm")).await.unwrap().into_inner().degraded.is_none());
    let port = mesh.generation.addr.port();

    // Generation gone: every call fails upstream, and the fallback answers.
    mesh.generation.kill().await;
    let mut reasons = Vec::new();
    for i in 0..8 {
        let answer = gateway.generate(fresh(&format!("during outage {i}"))).await.unwrap().into_inner();
        assert_eq!(answer.finish_reason, i32::from(FinishReason::Fallback));
        reasons.push(answer.degraded.unwrap().reason);
    }
    // Five consecutive failures open it; from then on the breaker answers without trying.
    assert!(reasons[..5].iter().all(|r| r == "error"), "{reasons:?}");
    assert!(reasons[5..].iter().all(|r| r == "circuit_open"), "{reasons:?}");
    // "circuit_open" is the breaker's own answer: the call made no attempt.
    let open = gateway.generate(fresh("while open")).await.unwrap().into_inner();
    assert_eq!(open.degraded.unwrap().reason, "circuit_open");
    // The health service shows the breaker, as the gateway sees it.
    assert!(breaker_shown(&mesh, "open").await, "health never showed the open breaker");

    // Generation back on the same port: after the recovery time one probe goes through and closes it.
    let env = [("LLMESH_GENERATION_LISTEN", format!("127.0.0.1:{port}"))];
    let _back = Proc::spawn_at("generation", &env, &format!("127.0.0.1:{port}")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let recovered = gateway.generate(fresh("after recovery")).await.unwrap().into_inner();
    assert!(recovered.degraded.is_none(), "still degraded after recovery: {recovered:?}");
    for i in 0..5 {
        let answer = gateway.generate(fresh(&format!("closed again {i}"))).await.unwrap().into_inner();
        assert!(answer.degraded.is_none());
    }
    assert!(breaker_shown(&mesh, "closed").await, "health never showed the breaker closed again");
}

/// Whether the health service comes to list a generation replica whose breaker is `state`.
async fn breaker_shown(mesh: &Mesh, state: &str) -> bool {
    let health = mesh.mesh_health().await;
    let wanted = format!("circuit breaker {state}");
    llmesh_e2e::eventually(Duration::from_secs(5), || {
        let (mut health, wanted) = (health.clone(), wanted.clone());
        async move {
            let status = health.status(llmesh_proto::health::v1::StatusRequest {}).await.ok()?.into_inner();
            status.components.iter().any(|c| c.name == "generation-breaker" && c.detail.contains(&wanted)).then_some(())
        }
    })
    .await
    .is_some()
}

#[tokio::test]
async fn traffic_moves_off_a_slow_replica() {
    let slow = vec![("LLMESH_GENERATION_MODELS__SIM__TIME_TO_FIRST_TOKEN_MS", "2000".to_string())];
    let options = MeshOptions { replicas: vec![slow], ..Default::default() };
    let mesh = Mesh::start_with(options).await;
    let gateway = mesh.gateway().await;
    let slow_calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop_at = Instant::now() + Duration::from_secs(10);
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (gateway, slow_calls) = (gateway.clone(), slow_calls.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while Instant::now() < stop_at && i < 100_000 {
                    let sent = Instant::now();
                    gateway.clone().generate(fresh(&format!("client {c} call {i}"))).await.unwrap();
                    if sent.elapsed() > Duration::from_millis(1500) {
                        slow_calls.lock().unwrap().push(sent);
                    }
                    i += 1;
                }
                i
            })
        })
        .collect();
    let mut total = 0;
    for client in clients {
        total += client.await.unwrap();
    }
    let slow_calls = slow_calls.lock().unwrap().clone();
    let started = stop_at - Duration::from_secs(10);
    let late_slow = slow_calls.iter().filter(|sent| sent.duration_since(started) > Duration::from_secs(3)).count();
    // The slow replica had its chance at the start; after that, p2c over peak EWMA keeps it idle.
    assert!(total > 1000, "too little traffic: {total}");
    assert!(late_slow * 100 <= total, "{late_slow} of {total} calls still went to the slow replica after 3 s");
}

#[tokio::test]
async fn retries_stay_within_their_budget() {
    // Every call fails upstream; the breaker is told never to open, so only the budget holds
    // retries back: 20% of calls, no floor.
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0".to_string()),
            ("LLMESH_GATEWAY_GENERATION__BREAKER__CONSECUTIVE_FAILURES", "1000000".to_string()),
            ("LLMESH_GATEWAY_GENERATION__BREAKER__FAILURE_RATE", "2.0".to_string()),
            ("LLMESH_GATEWAY_GENERATION__RETRY__BUDGET_MIN_PER_SECOND", "0".to_string()),
            ("LLMESH_GATEWAY_GENERATION__RETRY__BACKOFF_BASE_MS", "1".to_string()),
        ],
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let mut gateway = mesh.gateway().await;
    let calls = 200;
    for i in 0..calls {
        let request = GenerateRequest { model: "sim-error".into(), ..fresh(&format!("doomed {i}")) };
        let answer = gateway.generate(request).await.unwrap().into_inner();
        assert_eq!(answer.finish_reason, i32::from(FinishReason::Fallback));
    }
    let retries = mesh.gateway.metric_sum("llmesh_retries_total", "").await;
    let refused = mesh.gateway.metric_sum("llmesh_retry_budget_exhausted_total", "").await;
    assert!(retries > 0.0, "no retry at all");
    assert!(retries <= 0.25 * f64::from(calls), "{retries} retries for {calls} calls");
    assert!(refused > 0.0, "the budget never refused a retry");
}

//! What each layer of the way to generation costs, per call: the pipeline built up one layer at a
//! time over a balancer stand-in that answers at once (no network, no generation), each stage
//! timed over the same number of calls on one thread. Not a test: it asserts nothing. Run with
//!
//!     cargo bench -p llmesh-gateway --bench pipeline
//!
//! and read the added nanoseconds per call of each layer (docs/BENCHMARKS.md reports one run).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use llmesh_gateway::{
    pipeline::{
        Ask, Attempt, Call, Generation, Reply, UpstreamError,
        breaker::BreakerLayer,
        fallback::{FallbackConfig, FallbackLayer},
        retry::{RetryConfig, RetryPolicy},
        timeout::PerTryTimeoutLayer,
    },
    principal::Principal,
};
use llmesh_proto::generation::v1::{GenerateRequest, GenerateResponse};
use tower::{ServiceBuilder, ServiceExt as _, retry::RetryLayer, service_fn, util::BoxCloneSyncService};

const CALLS: u32 = 200_000;

/// The balancer's stand-in: an answer at once. It takes the breaker layer's attempts, as the
/// balancer does, so the layers below the breaker are measured with it.
fn instant()
-> impl tower::Service<Attempt, Response = Reply, Error = UpstreamError, Future: Send> + Clone + Send + Sync + 'static {
    service_fn(|_: Attempt| async { Ok::<_, UpstreamError>(Reply::Generated(GenerateResponse::default())) })
}

fn stages() -> Vec<(&'static str, Generation)> {
    let per_try = PerTryTimeoutLayer::new(Some(Duration::from_secs(30)));
    let retry = || RetryLayer::new(RetryPolicy::new(RetryConfig::default()));
    let fallback = || FallbackLayer::new(FallbackConfig::default(), llmesh_gateway::pipeline::disabled_cache());
    vec![
        // The balancer takes only the breaker layer's attempts: the stages start with both.
        (
            "balance (stand-in) + breaker",
            BoxCloneSyncService::new(ServiceBuilder::new().layer(BreakerLayer).service(instant())),
        ),
        (
            "+ per-try timeout",
            BoxCloneSyncService::new(ServiceBuilder::new().layer(BreakerLayer).layer(per_try).service(instant())),
        ),
        (
            "+ retry",
            BoxCloneSyncService::new(
                ServiceBuilder::new().layer(retry()).layer(BreakerLayer).layer(per_try).service(instant()),
            ),
        ),
        (
            "+ fallback (the whole stack)",
            BoxCloneSyncService::new(
                ServiceBuilder::new()
                    .layer(fallback())
                    .layer(retry())
                    .layer(BreakerLayer)
                    .layer(per_try)
                    .service(instant()),
            ),
        ),
    ]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let request = Arc::new(GenerateRequest { model: "sim".into(), prompt: "hello".into(), ..Default::default() });
    let deadline = llmesh_gateway::pipeline::deadline_after(Duration::from_secs(30));
    let call = Call::new(Ask::Generate(request), deadline, Principal::anonymous());
    runtime.block_on(async {
        let mut previous = None;
        println!("{:<30} {:>12} {:>12}", "stage", "ns/call", "added ns");
        for (name, stage) in stages() {
            // Warm up, then time.
            for _ in 0..CALLS / 10 {
                stage.clone().oneshot(call.clone()).await.unwrap();
            }
            let started = Instant::now();
            for _ in 0..CALLS {
                stage.clone().oneshot(call.clone()).await.unwrap();
            }
            let per_call = started.elapsed().as_nanos() as f64 / f64::from(CALLS);
            let added = previous.map_or(String::from("–"), |p: f64| format!("{:.0}", per_call - p));
            println!("{name:<30} {per_call:>12.0} {added:>12}");
            previous = Some(per_call);
        }
    });
}

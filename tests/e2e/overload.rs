//! Overload at about three times capacity: with every slot taken, the excess is refused with
//! RESOURCE_EXHAUSTED at once (it never waits for a slot), the admitted calls stay in flight
//! untouched, the gateway's memory stays flat, and a slot a client gives up is free again.
//!
//! Shown by order, not by timing: the admitted calls' first token never comes within the test, so
//! a refusal that waited for a slot would never arrive while they are in flight.

use std::time::{Duration, Instant};

use llmesh_e2e::{Mesh, MeshOptions};
use llmesh_proto::{common::v1::CachePolicy, gateway::v1::GenerateRequest};
use tonic::Code;

use crate::prompt;

/// The gateway's bound of calls in flight.
const CAPACITY: usize = 8;

fn bypass(text: &str) -> GenerateRequest {
    GenerateRequest { cache: CachePolicy::Bypass.into(), ..prompt(text) }
}

#[tokio::test]
async fn three_times_capacity() {
    // The sim's first token comes after ten minutes: an admitted call holds its slot until the
    // gateway's own limit (30 s) or the test ends it.
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_SHED__MAX_CONCURRENCY", CAPACITY.to_string()),
            ("LLMESH_GENERATION_MODELS__SIM__TIME_TO_FIRST_TOKEN_MS", "600000".into()),
            ("LLMESH_GENERATION_ADMIN__LISTEN", "127.0.0.1:0".into()),
        ],
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let gateway = mesh.gateway().await;

    // Fill every slot, and wait until generation has all of them.
    let holders: Vec<_> = (0..CAPACITY)
        .map(|i| {
            let mut gateway = gateway.clone();
            tokio::spawn(async move { gateway.generate(bypass(&format!("holder {i}"))).await })
        })
        .collect();
    let waiting = Instant::now() + Duration::from_secs(20);
    while mesh.generation.metric_sum("llm_active_requests", "").await < CAPACITY as f64 {
        assert!(Instant::now() < waiting, "generation never had all {CAPACITY} calls in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_before = mesh.gateway.rss_kib();

    // Three times capacity keeps asking: 24 clients, 100 calls each. Every one is refused while
    // the holders are still in flight; a refusal that queued for a slot would not come back
    // before the holders end, 30 s from now, and the timeout below would fail the test.
    let clients: Vec<_> = (0..3 * CAPACITY)
        .map(|c| {
            let gateway = gateway.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    let status = gateway.clone().generate(bypass(&format!("c{c} {i}"))).await.unwrap_err();
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                }
            })
        })
        .collect();
    let refused = tokio::time::timeout(Duration::from_secs(20), futures::future::try_join_all(clients)).await;
    refused.expect("refusals waited for a slot").unwrap();
    assert!(holders.iter().all(|h| !h.is_finished()), "an admitted call ended while the excess was refused");
    let rss_after = mesh.gateway.rss_kib();
    assert!(rss_after < rss_before + 32 * 1024, "gateway RSS grew from {rss_before} KiB to {rss_after} KiB");

    // The holders' clients go away: their slots are free again, and a new call is admitted (it
    // then waits for its first token until its own deadline).
    for holder in &holders {
        holder.abort();
    }
    let waiting = Instant::now() + Duration::from_secs(20);
    loop {
        let mut request = tonic::Request::new(bypass("after the holders left"));
        request.set_timeout(Duration::from_millis(300));
        let status = gateway.clone().generate(request).await.unwrap_err();
        if status.code() != Code::ResourceExhausted {
            assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{status:?}");
            break;
        }
        assert!(Instant::now() < waiting, "the slots of calls whose clients left were never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

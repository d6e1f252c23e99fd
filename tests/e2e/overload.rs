//! Overload at about three times capacity: admitted calls keep their latency, the rest are
//! refused with RESOURCE_EXHAUSTED at once, and the gateway's memory stays flat.

use std::time::{Duration, Instant};

use llmesh_e2e::{Mesh, MeshOptions};
use llmesh_proto::{common::v1::CachePolicy, gateway::v1::GenerateRequest};
use tonic::Code;

use crate::prompt;

fn p99(mut values: Vec<Duration>) -> Duration {
    values.sort_unstable();
    values.get(values.len() * 99 / 100).copied().unwrap_or_default()
}

#[tokio::test]
async fn three_times_capacity() {
    // Capacity: 8 calls in flight at 200 ms each, about 40 calls/s. 24 clients offer three times
    // that. The service time is long against what a loaded host adds to a call (tens of
    // milliseconds), so that "waited for a slot" and "answered at once" stay apart.
    let service = Duration::from_millis(200);
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_SHED__MAX_CONCURRENCY", "8".into()),
            ("LLMESH_GENERATION_MODELS__SIM__TIME_TO_FIRST_TOKEN_MS", service.as_millis().to_string()),
        ],
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let gateway = mesh.gateway().await;
    let rss_before = mesh.gateway.rss_kib();

    let stop = Instant::now() + Duration::from_secs(4);
    let clients: Vec<_> = (0..24)
        .map(|c| {
            let gateway = gateway.clone();
            tokio::spawn(async move {
                let (mut admitted, mut refused) = (Vec::new(), Vec::new());
                let mut i = 0;
                while Instant::now() < stop && i < 10_000 {
                    let request = GenerateRequest { cache: CachePolicy::Bypass.into(), ..prompt(&format!("c{c} {i}")) };
                    let sent = Instant::now();
                    match gateway.clone().generate(request).await {
                        Ok(_) => admitted.push(sent.elapsed()),
                        Err(status) => {
                            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                            refused.push(sent.elapsed());
                            // A polite client backs off a little before trying again.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    i += 1;
                }
                (admitted, refused)
            })
        })
        .collect();
    let (mut admitted, mut refused) = (Vec::new(), Vec::new());
    for client in clients {
        let (a, r) = client.await.unwrap();
        admitted.extend(a);
        refused.extend(r);
    }
    let rss_after = mesh.gateway.rss_kib();

    assert!(admitted.len() > 80 && refused.len() > 300, "admitted {}, refused {}", admitted.len(), refused.len());
    let (admitted_p99, refused_p99) = (p99(admitted), p99(refused));
    // Admitted calls are not queued behind the excess (queued, they would wait about two more
    // service times), and the excess is refused without waiting for a slot.
    assert!(admitted_p99 < 2 * service, "admitted p99 {admitted_p99:?}");
    assert!(refused_p99 < service, "refused p99 {refused_p99:?}");
    assert!(rss_after < rss_before + 32 * 1024, "gateway RSS grew from {rss_before} KiB to {rss_after} KiB");
}

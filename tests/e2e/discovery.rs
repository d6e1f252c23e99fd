//! Replicas found by DNS come and go without a restart: a gateway on `dns://name:port` follows
//! the name as its addresses change. The gateway runs in a mount namespace of its own with a
//! hosts file the test rewrites (the system resolver reads it on every lookup); the replicas are
//! real generation processes on 127.0.0.2 and 127.0.0.3, both loopback on Linux.

use std::{path::Path, time::Duration};

use llmesh_e2e::{Proc, eventually};
use llmesh_proto::{
    common::v1::CachePolicy,
    gateway::v1::{GenerateRequest, gateway_client::GatewayClient},
    health::v1::{StatusRequest, mesh_health_client::MeshHealthClient},
};
use tonic::transport::Channel;

use crate::prompt;

const NAME: &str = "replicas.llmesh.test";

/// Generate calls a replica has answered.
async fn served(replica: &Proc) -> f64 {
    replica.metric_sum("llm_requests_total", "endpoint=\"Generate\"").await
}

/// Rewrites the hosts file in place (the gateway's bind mount follows the inode, not the name).
fn point_name_at(hosts: &Path, addresses: &[&str]) {
    let lines: String = addresses.iter().map(|a| format!("{a} {NAME}\n")).collect();
    std::fs::write(hosts, format!("127.0.0.1 localhost\n{lines}")).unwrap();
}

/// Sends `n` uncached calls, all of which must succeed.
async fn send(gateway: &mut GatewayClient<Channel>, n: usize, tag: &str) {
    for i in 0..n {
        let request = GenerateRequest { cache: CachePolicy::Bypass.into(), ..prompt(&format!("{tag} {i}")) };
        gateway.generate(request).await.unwrap_or_else(|status| panic!("{tag} call {i}: {status:?}"));
    }
}

#[tokio::test]
async fn replicas_are_added_and_removed_as_dns_changes() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let admin = [("LLMESH_GENERATION_ADMIN__LISTEN", "127.0.0.1:0".to_string())];
    let first = Proc::spawn_at("generation", &admin, "127.0.0.2:0").await.unwrap();
    let port = first.addr.port();
    let second = Proc::spawn_at("generation", &admin, &format!("127.0.0.3:{port}")).await.unwrap();
    point_name_at(&hosts, &["127.0.0.2"]);
    let env = [
        ("LLMESH_GATEWAY_GENERATION__ENDPOINTS", format!("[\"dns://{NAME}:{port}\"]")),
        ("LLMESH_GATEWAY_GENERATION__DNS_REFRESH_MS", "100".into()),
        ("LLMESH_GATEWAY_CACHE__ENDPOINT", String::new()),
    ];
    let gateway_proc = Proc::spawn_with_hosts("gateway", &env, &hosts).await.unwrap();
    let mut gateway = GatewayClient::new(gateway_proc.channel().await);

    // One address: every call goes to the first replica.
    send(&mut gateway, 20, "one").await;
    assert_eq!((served(&first).await, served(&second).await), (20.0, 0.0));

    // A second address appears: the second replica gets traffic, with no restart.
    point_name_at(&hosts, &["127.0.0.2", "127.0.0.3"]);
    let added = eventually(Duration::from_secs(10), || {
        let mut gateway = gateway.clone();
        let second = &second;
        async move {
            send(&mut gateway, 10, "two").await;
            (served(second).await > 0.0).then_some(())
        }
    })
    .await;
    assert!(added.is_some(), "the second replica got no calls within 10 s:\n{}", gateway_proc.logs());

    // The first address goes away: once the gateway has re-resolved, it lists one replica (its
    // MeshHealth, one component a replica), and the first replica gets no more calls. (Which
    // replica a call goes to follows their latency, so a round of calls that all went to the second
    // would not show that the first is gone.)
    point_name_at(&hosts, &["127.0.0.3"]);
    let view = MeshHealthClient::new(gateway_proc.channel().await);
    let removed = eventually(Duration::from_secs(10), || {
        let mut view = view.clone();
        async move {
            let status = view.status(StatusRequest {}).await.ok()?.into_inner();
            let replicas = status.components.iter().filter(|c| c.name == "generation-breaker").count();
            (replicas == 1).then_some(())
        }
    })
    .await;
    assert!(removed.is_some(), "the gateway still had two replicas 10 s after one left DNS:\n{}", gateway_proc.logs());
    let before = (served(&first).await, served(&second).await);
    send(&mut gateway, 30, "after").await;
    assert_eq!((served(&first).await, served(&second).await), (before.0, before.1 + 30.0));
}

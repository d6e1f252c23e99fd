//! The health service: polls `grpc.health.v1` of every process in the mesh and serves the result
//! as `grpc.health.v1` (service "" for the whole mesh, and each watched service name) and as the
//! richer `llmesh.health.v1.MeshHealth`; and on its admin listener, the mesh's live status page
//! ([`status`]).

pub mod config;
mod monitor;
mod service;
pub mod status;

use std::future::Future;

use anyhow::Context as _;

use llmesh_common::{ServiceArgs, server};
use llmesh_proto::health::v1::mesh_health_server::MeshHealthServer;
use tokio::net::TcpListener;

pub use config::Config;
pub use service::MeshHealthService;

/// Loads the configuration and serves until SIGTERM or Ctrl-C.
pub async fn run(args: ServiceArgs) -> anyhow::Result<()> {
    llmesh_common::run_service(args, serve).await
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn serve(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Before the first probe: every check of a mesh service uses it.
    llmesh_common::deps::use_client_tls(&config.client_tls).context("[health.client_tls]")?;
    let mut base = server::Base::new()?;
    base.tls(&config.tls, server::Audience::Mesh)?;
    let operator = base.operator_token(&config.admin).context("[health.admin] bearer_token_file")?;
    let monitor = monitor::Monitor::new(&config, base.health.clone(), operator.clone())?;
    let status = monitor.subscribe();
    if config.admin.listen.is_some() {
        let page = status::StatusPage::start(&config.status, operator, status.clone()).context("[health.status]")?;
        base.admin_routes(page.routes());
    }
    base.admin(&config.admin).await?;
    // The mesh ("") is not SERVING until the first round of checks says so: tonic-health starts
    // it at SERVING, which would tell probes and `llmesh up` the mesh is ready before anything
    // was checked.
    base.health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    base.serving::<MeshHealthServer<MeshHealthService>>().await;
    let poller = tokio::spawn(monitor.run());
    // Stop polling before the server reports NOT_SERVING, so the poller cannot flip it back.
    let shutdown = async move {
        shutdown.await;
        poller.abort();
    };
    let service =
        MeshHealthServer::new(MeshHealthService::new(status)).max_decoding_message_size(server::CONTROL_MESSAGE_BYTES);
    base.route(|router| router.add_service(service))
        .serve(listener, shutdown, server::ShutdownTiming::from_ms(config.shutdown_drain_ms, config.shutdown_grace_ms))
        .await
}

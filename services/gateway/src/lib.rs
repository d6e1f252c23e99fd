//! The gateway: the mesh's public entry. Validates requests, answers from the cache when it can,
//! and otherwise calls a generation replica and stores the answer.

pub mod admission;
mod cache;
mod catalog;
pub mod config;
mod deadline;
mod fallback;
mod jobs;
mod service;
mod single_flight;
mod upstream;

use std::{future::Future, time::Duration};

use llmesh_common::{ServiceArgs, server};
use llmesh_proto::gateway::v1::gateway_server::GatewayServer;
use tokio::net::TcpListener;

pub use config::Config;
pub use service::GatewayService;

/// Loads the configuration and serves until SIGTERM or Ctrl-C.
pub async fn run(args: ServiceArgs) -> anyhow::Result<()> {
    let config: Config = llmesh_common::config::load("gateway", &args)?;
    let shutdown = llmesh_common::shutdown::signal();
    let listener = server::bind(config.listen).await?;
    serve(config, listener, shutdown).await
}

/// Serves on `listener` until `shutdown` resolves. Fails when no generation replica (or the
/// configured cache) answers within the start-up timeout.
pub async fn serve(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let upstream = upstream::connect(&config).await?;
    let catalog = catalog::Catalog::default();
    if let Err(status) = catalog.refresh(&upstream).await {
        tracing::warn!(code = ?status.code(), message = status.message(), "cannot list models yet; will retry");
    }
    catalog.keep_fresh(upstream.clone(), Duration::from_secs(30));
    let jobs = jobs::Jobs::connect(&config.queue).await?;
    let service = GatewayService::new(&config, upstream, catalog, jobs);
    let mut base = server::Base::new()?;
    base.serving::<GatewayServer<GatewayService>>().await;
    base.route(|router| router.add_service(GatewayServer::new(service)))
        .serve(listener, shutdown, Duration::from_millis(config.shutdown_grace_ms))
        .await
}

//! The generation service: routes each model name to a provider and serves `Generate`,
//! `GenerateStream` and `ListModels` over gRPC.

mod capabilities;
pub mod config;
mod observe;
pub mod provider;
mod service;
mod workers;

use std::future::Future;

use llmesh_common::{ServiceArgs, server};
use llmesh_proto::generation::v1::generation_server::GenerationServer;
use tokio::net::TcpListener;

pub use config::Config;
pub use service::GenerationService;

/// Loads the configuration and serves until SIGTERM or Ctrl-C.
pub async fn run(args: ServiceArgs) -> anyhow::Result<()> {
    llmesh_common::run_service(args, serve).await
}

/// Serves on `listener` until `shutdown` resolves, and works on the job queue when one is
/// configured (Redis unreachable at start-up is then an error naming it).
pub async fn serve(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let service = GenerationService::new(&config)?;
    let (stop_workers, workers_stop) = tokio::sync::watch::channel(false);
    workers::start(&config.queue, &config.rate_limit, &service, workers_stop).await?;
    let shutdown = async move {
        shutdown.await;
        let _ = stop_workers.send(true);
    };
    let mut base = server::Base::new()?;
    base.tls(&config.tls, server::Audience::Mesh)?;
    base.admin(&config.admin).await?;
    base.serving::<GenerationServer<GenerationService>>().await;
    let service = GenerationServer::new(service).max_decoding_message_size(config.limits.max_request_bytes());
    base.route(|router| router.add_service(service))
        .serve(listener, shutdown, server::ShutdownTiming::from_ms(config.shutdown_drain_ms, config.shutdown_grace_ms))
        .await
}

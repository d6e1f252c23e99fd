//! The cache service: stores generation responses under a key derived from every request field
//! that changes the output, in Redis or in a bounded in-memory store.

pub mod config;
mod service;
pub mod store;

use std::future::Future;

use llmesh_common::{ServiceArgs, server};
use llmesh_proto::cache::v1::cache_server::CacheServer;
use tokio::net::TcpListener;

pub use config::Config;
pub use service::CacheService;

/// Loads the configuration and serves until SIGTERM or Ctrl-C.
pub async fn run(args: ServiceArgs) -> anyhow::Result<()> {
    let config: Config = llmesh_common::config::load("cache", &args)?;
    let shutdown = llmesh_common::shutdown::signal();
    let listener = server::bind(config.listen).await?;
    serve(config, listener, shutdown).await
}

/// Serves on `listener` until `shutdown` resolves. Fails at once when Redis is configured and
/// cannot be reached.
pub async fn serve(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let store = store::Store::open(&config).await?;
    tracing::info!(backend = store.backend(), "cache store ready");
    let service = CacheService::new(store, &config);
    let mut base = server::Base::new()?;
    base.serving::<CacheServer<CacheService>>().await;
    base.route(|router| router.add_service(CacheServer::new(service)))
        .serve(listener, shutdown, server::ShutdownTiming::from_ms(config.shutdown_drain_ms, config.shutdown_grace_ms))
        .await
}

//! The cache service: stores generation responses under a key derived from every request field
//! that changes the output, in Redis or in a bounded in-memory store.

mod changes;
pub mod config;
mod service;
pub mod store;

use std::{future::Future, time::Duration};

use llmesh_common::{ServiceArgs, server};
use llmesh_proto::cache::v1::cache_server::CacheServer;
use tokio::net::TcpListener;

pub use config::Config;
pub use service::CacheService;

/// Loads the configuration and serves until SIGTERM or Ctrl-C.
pub async fn run(args: ServiceArgs) -> anyhow::Result<()> {
    llmesh_common::run_service(args, serve).await
}

/// Serves on `listener` until `shutdown` resolves. Fails at once when Redis is configured and
/// cannot be reached.
pub async fn serve(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let store = store::Store::open(&config).await?;
    tracing::info!(backend = store.backend(), "cache store ready");
    let _size = watch_size(store.clone());
    // Where the change channel is subscribed: the Redis, or a cluster's seed nodes in turn.
    let subscribe_urls = if config.redis_cluster_nodes.is_empty() {
        config.redis_url.iter().cloned().collect()
    } else {
        config.redis_cluster_nodes.clone()
    };
    let changes = changes::Changes::new(store.clone(), subscribe_urls);
    let service = CacheService::new(store, changes, &config);
    let mut base = server::Base::new()?;
    base.tls(&config.tls, server::Audience::Mesh)?;
    base.admin(&config.admin).await?;
    base.serving::<CacheServer<CacheService>>().await;
    let service = CacheServer::new(service).max_decoding_message_size(config.max_message_bytes());
    base.route(|router| router.add_service(service))
        .serve(listener, shutdown, server::ShutdownTiming::from_ms(config.shutdown_drain_ms, config.shutdown_grace_ms))
        .await
}

/// `llmesh_cache_entries` and `llmesh_cache_bytes`, refreshed every 10 s (a Redis store is counted
/// with SCAN, not on every collection). The instruments live as long as the returned guard.
fn watch_size(store: store::Store) -> impl Sized {
    let size: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]> = std::sync::Arc::default();
    let backend = store.backend();
    let meter = llmesh_telemetry::meter();
    let label = [opentelemetry::KeyValue::new("backend", backend)];
    let (entries_read, bytes_read, labels) = (size.clone(), size.clone(), label.clone());
    let entries = meter
        .u64_observable_gauge("llmesh.cache.entries")
        .with_description("Entries stored")
        .with_callback(move |gauge| gauge.observe(entries_read[0].load(std::sync::atomic::Ordering::Relaxed), &label))
        .build();
    let bytes = meter
        .u64_observable_gauge("llmesh.cache.bytes")
        .with_description("Bytes stored")
        .with_callback(move |gauge| gauge.observe(bytes_read[1].load(std::sync::atomic::Ordering::Relaxed), &labels))
        .build();
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(10));
        loop {
            ticker.tick().await;
            if let Ok(now) = store.size().await {
                size[0].store(now.entries, std::sync::atomic::Ordering::Relaxed);
                size[1].store(now.bytes, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    SizeWatch { _entries: entries, _bytes: bytes, task }
}

struct SizeWatch {
    _entries: opentelemetry::metrics::ObservableGauge<u64>,
    _bytes: opentelemetry::metrics::ObservableGauge<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SizeWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! The gateway: the mesh's public entry. Validates requests, answers from the cache when it can,
//! and otherwise calls a generation replica and stores the answer.

pub mod admission;
mod cache;
mod catalog;
pub mod config;
mod deadline;
mod fallback;
mod jobs;
mod metrics;
mod near_cache;
mod replicas;
mod service;
mod single_flight;
mod upstream;

use std::{future::Future, sync::Arc, time::Duration};

use llmesh_common::{
    ServiceArgs,
    server::{self, HttpLayer},
};
use llmesh_proto::{gateway::v1::gateway_server::GatewayServer, health::v1::mesh_health_server::MeshHealthServer};
use opentelemetry::{
    KeyValue,
    metrics::{ObservableCounter, ObservableGauge},
};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, util::BoxCloneSyncService};

pub use config::Config;
pub use service::GatewayService;

/// The admission layers (outermost first: auth, rate limit, load shed) and the limiter the
/// handlers reserve tokens with.
struct Admission {
    keys: Arc<admission::KeyStore>,
    limiter: Arc<admission::RateLimiter>,
    shed: admission::ShedLayer,
}

impl Admission {
    fn new(config: &Config) -> anyhow::Result<Self> {
        let keys = Arc::new(admission::KeyStore::load(&config.auth)?);
        if keys.is_empty() {
            tracing::warn!("no API keys configured: auth is off and every caller shares the anonymous limits");
        }
        let limiter = Arc::new(admission::RateLimiter::new(&config.rate_limit)?);
        Ok(Self { keys, limiter, shed: admission::ShedLayer::new(config.shed.max_concurrency) })
    }

    fn layer(&self) -> HttpLayer {
        let (keys, limiter, shed) = (self.keys.clone(), self.limiter.clone(), self.shed.clone());
        HttpLayer::new(move |inner| {
            BoxCloneSyncService::new(
                ServiceBuilder::new()
                    .layer(admission::AuthLayer::new(keys.clone()))
                    .layer(admission::RateLimitLayer::new(limiter.clone()))
                    .layer(shed.clone())
                    .service(inner),
            )
        })
    }
}

/// Gauges read when metrics are collected: each replica's breaker, how many replicas are ready,
/// and how many calls were shed. Kept alive for as long as the server runs.
fn gauges(upstream: &upstream::Upstream, admission: &Admission) -> Gauges {
    let meter = llmesh_telemetry::meter();
    let replicas = upstream.clone();
    let breakers = meter
        .u64_observable_gauge("llmesh.breaker_state")
        .with_description("Circuit breaker per generation replica: 0 closed, 1 half-open, 2 open")
        .with_callback(move |gauge| {
            for (addr, state) in replicas.replicas() {
                let value = match state {
                    "closed" => 0,
                    "half_open" => 1,
                    _ => 2,
                };
                gauge.observe(value, &[KeyValue::new("endpoint", addr)]);
            }
        })
        .build();
    let replicas = upstream.clone();
    let ready = meter
        .u64_observable_gauge("llmesh.upstream_replicas")
        .with_description("Generation replicas the balancer knows, by state")
        .with_callback(move |gauge| {
            let all = replicas.replicas();
            let ready = all.iter().filter(|(_, state)| *state == "closed").count() as u64;
            gauge.observe(ready, &[KeyValue::new("state", "ready")]);
            gauge.observe(all.len() as u64 - ready, &[KeyValue::new("state", "ejected")]);
        })
        .build();
    let shed = admission.shed.clone();
    let shed = meter
        .u64_observable_counter("llmesh.shed")
        .with_description("Calls refused by load shedding")
        .with_callback(move |counter| counter.observe(shed.shed_count(), &[KeyValue::new("reason", "concurrency")]))
        .build();
    Gauges { _breakers: breakers, _ready: ready, _shed: shed }
}

/// Held so the observable instruments live as long as the server.
struct Gauges {
    _breakers: ObservableGauge<u64>,
    _ready: ObservableGauge<u64>,
    _shed: ObservableCounter<u64>,
}

/// Loads the configuration and serves until SIGTERM or Ctrl-C.
pub async fn run(args: ServiceArgs) -> anyhow::Result<()> {
    llmesh_common::run_service(args, serve).await
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
    let admission = Admission::new(&config)?;
    let _gauges = gauges(&upstream, &admission);
    let replicas = replicas::Replicas(upstream.clone());
    let service = GatewayService::new(&config, upstream, catalog, jobs, admission.limiter.clone());
    let mut base = server::Base::with_layer(admission.layer())?;
    base.admin(&config.admin).await?;
    base.serving::<GatewayServer<GatewayService>>().await;
    base.route(|router| router.add_service(GatewayServer::new(service)).add_service(MeshHealthServer::new(replicas)))
        .serve(listener, shutdown, server::ShutdownTiming::from_ms(config.shutdown_drain_ms, config.shutdown_grace_ms))
        .await
}

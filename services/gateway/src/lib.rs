//! The gateway: the mesh's public entry. Validates requests, answers from the cache when it can,
//! and otherwise calls a generation replica and stores the answer.

mod admission;
mod answer;
mod cache;
mod catalog;
pub mod config;
mod deadline;
pub mod error;
mod headers;
pub mod http;
mod jobs;
mod metrics;
pub mod pipeline;
pub mod principal;
mod replicas;
mod service;
pub mod stack;

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context as _;

use llmesh_common::{ServiceArgs, server};
use llmesh_proto::{gateway::v1::gateway_server::GatewayServer, health::v1::mesh_health_server::MeshHealthServer};
use opentelemetry::{
    KeyValue,
    metrics::{ObservableCounter, ObservableGauge},
};
use tokio::net::TcpListener;

use crate::admission::budget::Shown;

pub use config::Config;
pub use service::GatewayService;

/// The admission layers and the rate limit's arithmetic, reached from outside the crate by its own
/// integration tests alone (`tests/admission.rs`: the GCRA script on a real redis-server, the
/// layers in a real server). Only what those tests name; not an API.
#[doc(hidden)]
pub mod for_tests {
    pub mod admission {
        pub use crate::admission::{
            AuthLayer, KeyStore, RateLimitConfig, RateLimitLayer, RateLimiter, ShedConfig, ShedLayer, generate_key,
        };

        pub mod rate_limit {
            pub use crate::admission::rate_limit::{Cost, Limit, decision_from_reply, gcra};
        }
    }
}

/// The admission layers ([`stack::admission`]) and the budgets the handlers reserve money with.
struct Admission {
    layers: stack::AdmissionLayers,
    budgets: Arc<admission::Budgets>,
}

impl Admission {
    fn new(config: &Config) -> anyhow::Result<Self> {
        // Budgets live beside the rate limits, in the limiter's Redis.
        let budgets = admission::Budgets::new(
            &config.budget,
            config.rate_limit.redis_url.as_deref(),
            Duration::from_millis(config.rate_limit.redis_timeout_ms),
        )?;
        // Whether any key or team has a budget follows the keys file through every reload.
        let in_use = budgets.clone();
        let keys = admission::KeyStore::watch(&config.auth, move |keys| in_use.set_in_use(keys.has_budgets()))?;
        if keys.load().is_empty() {
            tracing::warn!("no API keys configured: auth is off and every caller shares the anonymous limits");
        }
        let limiter = Arc::new(admission::RateLimiter::new(&config.rate_limit)?);
        let deadline = admission::CallDeadlineLayer::new(Duration::from_millis(config.request_timeout_ms));
        let layers = stack::AdmissionLayers { keys, limiter, shed: admission::ShedLayer::new(&config.shed), deadline };
        Ok(Self { layers, budgets })
    }
}

/// Gauges read when metrics are collected: each breaker (a replica's, or a model's on it), how
/// many replicas are ready, how many calls were shed, and each budget's levels. Kept alive for as
/// long as the server runs.
fn gauges(pool: &Arc<pipeline::balance::Pool>, admission: &Admission) -> Gauges {
    let meter = llmesh_telemetry::meter();
    let replicas = pool.clone();
    let breakers = meter
        .u64_observable_gauge("llmesh.breaker_state")
        .with_description("Circuit breaker per generation replica (and per model on it): 0 closed, 1 half-open, 2 open")
        .with_callback(move |gauge| {
            for endpoint in replicas.snapshot().iter() {
                let breakers = endpoint.breakers();
                gauge.observe(breakers.replica().state().gauge(), &[KeyValue::new("endpoint", endpoint.addr.clone())]);
                for breaker in breakers.models() {
                    let model = breaker.scope().model.as_deref().unwrap_or_default().to_string();
                    let labels = [KeyValue::new("endpoint", endpoint.addr.clone()), KeyValue::new("model", model)];
                    gauge.observe(breaker.state().gauge(), &labels);
                }
            }
        })
        .build();
    let replicas = pool.clone();
    let ready = meter
        .u64_observable_gauge("llmesh.upstream_replicas")
        .with_description("Generation replicas the balancer knows, by state")
        .with_callback(move |gauge| {
            let all = replicas.snapshot();
            let ready =
                all.iter().filter(|e| e.breakers().replica().state() == pipeline::breaker::State::Closed).count();
            gauge.observe(ready as u64, &[KeyValue::new("state", "ready")]);
            gauge.observe((all.len() - ready) as u64, &[KeyValue::new("state", "ejected")]);
        })
        .build();
    let budgets = admission.budgets.clone();
    let pending = meter
        .u64_observable_gauge("llmesh.budget.pending_settlements")
        .with_description("Budget settlements waiting for Redis to answer again")
        .with_callback(move |gauge| gauge.observe(budgets.pending_count() as u64, &[]))
        .build();
    let shed = admission.layers.shed.clone();
    let shed = meter
        .u64_observable_counter("llmesh.shed")
        .with_description("Calls refused by load shedding")
        .with_callback(move |counter| {
            counter.observe(shed.shed_count(), &[KeyValue::new("reason", "concurrency")]);
            counter.observe(shed.shed_per_key_count(), &[KeyValue::new("reason", "key_concurrency")]);
        })
        .build();
    let budget_levels = [
        ("llmesh.budget.spent_usd", "Spend settled in the budget's current period, in USD", Shown::Spent),
        (
            "llmesh.budget.remaining_usd",
            "Budget left to reserve in the current period (limit - spent - held), in USD",
            Shown::Remaining,
        ),
        ("llmesh.budget.limit_usd", "The budget's limit per period, in USD", Shown::Limit),
    ]
    .map(|(name, description, shown)| {
        let budgets = admission.budgets.clone();
        meter
            .f64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |gauge| budgets.observe_levels(shown, gauge))
            .build()
    });
    Gauges { _breakers: breakers, _ready: ready, _shed: shed, _pending: pending, _budget_levels: budget_levels }
}

/// Held so the observable instruments live as long as the server.
struct Gauges {
    _breakers: ObservableGauge<u64>,
    _ready: ObservableGauge<u64>,
    _shed: ObservableCounter<u64>,
    _pending: ObservableGauge<u64>,
    _budget_levels: [ObservableGauge<f64>; 3],
}

/// Loads the configuration and serves until SIGTERM or Ctrl-C.
pub async fn run(args: ServiceArgs) -> anyhow::Result<()> {
    llmesh_common::run_service(args, serve).await
}

/// Serves on `listener` until `shutdown` resolves. Fails when no generation replica (or the
/// configured cache) answers within the start-up timeout.
pub async fn serve(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Keys first: a keys file that is configured but broken stops start-up before any connection.
    let admission = Admission::new(&config)?;
    // Before the first call to generation or the cache: every mesh call uses it.
    llmesh_common::deps::use_client_tls(&config.client_tls).context("[gateway.client_tls]")?;
    let startup = Duration::from_millis(config.startup_timeout_ms);
    let pool = pipeline::balance::connect(&config.generation, startup).await?;
    let cache = cache::Cache::connect(&config.cache, startup).await?;
    let generation = stack::generation(&config.generation, config.fallback.clone(), cache.clone(), pool.clone());
    let catalog = catalog::Catalog::default();
    if let Err(error) = catalog.refresh(&generation).await {
        tracing::warn!(%error, "cannot list models yet; will retry");
    }
    catalog.keep_fresh(generation.clone(), Duration::from_secs(30));
    let jobs = jobs::Jobs::connect(&config.queue).await?;
    let _gauges = gauges(&pool, &admission);
    let tokens = admission::TokenAdmission::new(
        config.limits.clone(),
        admission.layers.limiter.clone(),
        config.prices.clone(),
        catalog.clone(),
        admission.budgets.clone(),
        config.fallback.secondary_model.clone().filter(|_| config.fallback.enabled),
    );
    let answers = stack::answers(tokens.clone(), generation.clone(), cache, catalog.clone(), &config.cache);
    let request_timeout = Duration::from_millis(config.request_timeout_ms);
    let service = GatewayService::new(tokens, answers, generation, jobs, request_timeout);
    // The HTTP routes share the port, the layers and the service's one path to an answer.
    let routes = config.http.enabled.then(|| {
        http::Ingress::new(service.clone(), catalog, config.default_model.clone(), &config.http, &config.limits)
    });
    let mut base = match routes {
        Some(routes) => server::Base::with_layer_and_http1(stack::admission(&admission.layers, Some(routes)))?,
        None => server::Base::with_layer(stack::admission(&admission.layers, None))?,
    };
    base.tls(&config.tls, server::Audience::Public)?;
    base.admin(&config.admin).await?;
    let operator = base.operator_token(&config.admin).context("[gateway.admin] bearer_token_file")?;
    let replicas = replicas::Replicas::new(pool, admission.budgets.clone(), operator);
    base.serving::<GatewayServer<GatewayService>>().await;
    base.lists::<MeshHealthServer<replicas::Replicas>>();
    let gateway = GatewayServer::new(service).max_decoding_message_size(config.limits.max_request_bytes());
    let replicas = MeshHealthServer::new(replicas).max_decoding_message_size(server::CONTROL_MESSAGE_BYTES);
    let served = base
        .route(|router| router.add_service(gateway).add_service(replicas))
        .serve(listener, shutdown, server::ShutdownTiming::from_ms(config.shutdown_drain_ms, config.shutdown_grace_ms))
        .await;
    // The calls have ended: the money reserved ahead for them goes back.
    admission.budgets.close().await;
    served
}

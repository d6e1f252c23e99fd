//! llmesh telemetry: OpenTelemetry traces, metrics and logs, W3C trace propagation across gRPC
//! hops, a Prometheus `/metrics` exposition and CPU profiling.
//!
//! Wiring a service:
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let telemetry = llmesh_telemetry::init("gateway")?; // inside the Tokio runtime, first thing
//!
//! // /metrics, /healthz, /debug/pprof/profile
//! let admin = llmesh_telemetry::AdminServer::bind("0.0.0.0:9464".parse()?).await?;
//! let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
//! let admin_task = tokio::spawn(admin.serve(async move {
//!     let _ = stop_rx.await;
//! }));
//!
//! // Server side: one span per call (continuing the caller's trace) and the seed's metrics.
//! // tonic::transport::Server::builder()
//! //     .layer(llmesh_telemetry::GrpcTraceLayer::new().with_routes(routes))
//! //     .add_service(...)
//!
//! // Client side: propagate the current span to the next hop.
//! let mut request = tonic::Request::new(());
//! llmesh_telemetry::inject(&mut request);
//!
//! // On the way out.
//! let _ = stop_tx.send(());
//! let _ = admin_task.await;
//! telemetry.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! Metrics are recorded through `opentelemetry::global::meter("llmesh")` ([`meter`]); the
//! Prometheus names follow `docs/METRICS.md` (see [`prometheus`] for the naming rules).

mod admin;
mod config;
mod logging;
pub mod metrics;
pub mod prometheus;
mod propagation;
mod providers;
mod server;

pub use admin::{AdminIo, AdminResponse, AdminRoutes, AdminServer, BearerToken, Upgrade, presents, serve_admin};
pub use config::{LogFormat, SamplerConfig, TelemetryConfig};
pub use logging::build_subscriber;
pub use metrics::{InFlight, METER_NAME, ProcessMetrics, SeedMetrics, code_name, meter, register_process_metrics};
pub use prometheus::PrometheusReader;
pub use propagation::{
    JOB_TRACEPARENT_KEY, context_from_traceparent, current_context, current_trace_id, current_traceparent,
    extract_headers, extract_metadata, inject, inject_headers, inject_interceptor, inject_metadata,
    set_parent_from_traceparent,
};
pub use providers::{Providers, SHUTDOWN_TIMEOUT, Telemetry, init, init_with_config, render_prometheus};
pub use server::{
    GrpcTrace, GrpcTraceLayer, HTTP_ROUTES, ResponseFuture, Routes, TracedBody, UNKNOWN_ENDPOINT, UNKNOWN_SPAN_NAME,
    code_of_http_status, http_route,
};

/// Whether the current call has a span, so that its steps' spans have a parent to belong to. It
/// has none when nothing samples it and its caller sent no trace context (see [`GrpcTraceLayer`]),
/// or when spans are filtered out: its steps then create none either — each would be dropped
/// unread, after formatting its fields.
pub fn in_a_span() -> bool {
    tracing::dispatcher::get_default(|dispatch| dispatch.current_span().id().is_some())
}

/// Puts who called on the current call's span (the server span [`GrpcTraceLayer`] opened): the API
/// key's public id and its team, so a trace can be searched by key (`llmesh.api_key.id`). Never the
/// key itself. Does nothing for a call without a span.
pub fn record_caller(key_id: &str, team: Option<&str>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    span.set_attribute("llmesh.api_key.id", key_id.to_owned());
    if let Some(team) = team {
        span.set_attribute("llmesh.team", team.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::in_a_span;

    #[test]
    fn steps_make_spans_only_inside_a_calls_span() {
        tracing::subscriber::with_default(tracing_subscriber::registry(), || {
            assert!(!in_a_span(), "no span is current");
            tracing::info_span!("grpc.server").in_scope(|| assert!(in_a_span()));
            tracing::Span::none().in_scope(|| assert!(!in_a_span(), "a call without a span"));
        });
    }
}

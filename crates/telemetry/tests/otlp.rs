//! Exporting to an OTLP/gRPC receiver that runs in the test, built the way `init` builds it, and
//! exporting to collectors that are down.

// Test helpers outside #[test] functions unwrap too (as in the other crates' integration tests).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmesh_telemetry::{Providers, TelemetryConfig, build_subscriber};
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

#[derive(Clone, Default)]
struct Receiver {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    logs: Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.logs.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse { partial_success: None }))
    }
}

async fn start_receiver() -> (Receiver, SocketAddr) {
    let receiver = Receiver::default();
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .add_service(MetricsServiceServer::new(receiver.clone()))
        .add_service(LogsServiceServer::new(receiver.clone()))
        .serve_with_incoming(incoming);
    tokio::spawn(server);
    (receiver, addr)
}

fn service_name(resource: Option<&ProtoResource>) -> Option<String> {
    resource?.attributes.iter().find(|kv| kv.key == "service.name").and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_metrics_and_logs_reach_an_otlp_receiver() {
    let (receiver, addr) = tokio::time::timeout(Duration::from_secs(5), start_receiver()).await.unwrap();
    let config = TelemetryConfig::new("otlp-test").with_otlp_endpoint(format!("http://{addr}"));
    let providers = Providers::build(&config).unwrap();
    assert!(providers.logger_provider.is_some());

    let (subscriber, _) =
        build_subscriber(&config, providers.tracer(), providers.logger_provider.as_ref(), std::io::sink, false);
    let trace_id = {
        let _guard = tracing::subscriber::set_default(subscriber);
        let span = tracing::info_span!("otlp test span", otel.kind = "server", llmesh.test = "yes");
        let trace_id = span.context().span().span_context().trace_id();
        span.in_scope(|| tracing::info!(answer = 42, "hello from the test"));
        trace_id
    };
    let counter = opentelemetry::metrics::MeterProvider::meter(&providers.meter_provider, "llmesh")
        .u64_counter("llmesh.test.requests")
        .build();
    counter.add(7, &[KeyValue::new("result", "ok")]);

    // The SDK's flush calls block until their exporter threads are done, and those need this
    // runtime's gRPC channel: keep them off the async workers.
    let tracer_provider = providers.tracer_provider.clone();
    let meter_provider = providers.meter_provider.clone();
    let logger_provider = providers.logger_provider.clone().unwrap();
    tokio::task::spawn_blocking(move || {
        tracer_provider.force_flush().unwrap();
        logger_provider.force_flush().unwrap();
        meter_provider.force_flush().unwrap();
    })
    .await
    .unwrap();

    wait_for("spans", || !receiver.traces.lock().unwrap().is_empty()).await;
    wait_for("logs", || !receiver.logs.lock().unwrap().is_empty()).await;
    wait_for("metrics", || !receiver.metrics.lock().unwrap().is_empty()).await;

    {
        let traces = receiver.traces.lock().unwrap();
        let rs = &traces[0].resource_spans[0];
        assert_eq!(service_name(rs.resource.as_ref()).as_deref(), Some("llmesh-otlp-test"));
        let span = rs.scope_spans.iter().flat_map(|s| &s.spans).find(|s| s.name == "otlp test span").unwrap();
        assert_eq!(span.trace_id, trace_id.to_bytes().to_vec());
        assert_eq!(span.kind, 2, "SPAN_KIND_SERVER");
        assert!(span.attributes.iter().any(|kv| kv.key == "llmesh.test"));
    }
    {
        let logs = receiver.logs.lock().unwrap();
        let rl = &logs[0].resource_logs[0];
        assert_eq!(service_name(rl.resource.as_ref()).as_deref(), Some("llmesh-otlp-test"));
        let record = rl
            .scope_logs
            .iter()
            .flat_map(|s| &s.log_records)
            .find(|r| {
                matches!(r.body.as_ref().and_then(|b| b.value.as_ref()), Some(AnyValue::StringValue(s)) if s == "hello from the test")
            })
            .unwrap();
        assert_eq!(record.trace_id, trace_id.to_bytes().to_vec(), "the log carries the span's trace id");
    }
    {
        let metrics = receiver.metrics.lock().unwrap();
        let rm = &metrics[0].resource_metrics[0];
        assert_eq!(service_name(rm.resource.as_ref()).as_deref(), Some("llmesh-otlp-test"));
        let metric =
            rm.scope_metrics.iter().flat_map(|s| &s.metrics).find(|m| m.name == "llmesh.test.requests").unwrap();
        let Some(Data::Sum(sum)) = &metric.data else { panic!("not a sum: {metric:?}") };
        assert!(sum.is_monotonic);
        assert_eq!(sum.aggregation_temporality, 2, "cumulative");
    }

    let started = Instant::now();
    providers.shutdown(Duration::from_secs(2)).await;
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// Records as fast as it can for a while against `endpoint`; returns how long that took.
async fn hammer(endpoint: String) -> Duration {
    let mut config = TelemetryConfig::new("dead-collector").with_otlp_endpoint(endpoint);
    config.metric_export_interval = Duration::from_millis(100);
    let providers = Providers::build(&config).unwrap();
    let (subscriber, _) =
        build_subscriber(&config, providers.tracer(), providers.logger_provider.as_ref(), std::io::sink, false);
    let meter = opentelemetry::metrics::MeterProvider::meter(&providers.meter_provider, "llmesh");
    let seed = llmesh_telemetry::SeedMetrics::new(&meter);

    let started = Instant::now();
    {
        let _guard = tracing::subscriber::set_default(subscriber);
        // More spans and logs than the batch queues hold (2048): the surplus must be dropped, not
        // waited for.
        for i in 0..5_000u32 {
            let span = tracing::info_span!("request", i);
            span.in_scope(|| tracing::info!(i, "handled"));
            seed.record("Generate", tonic::Code::Ok, Duration::from_millis(u64::from(i % 100)));
        }
    }
    let elapsed = started.elapsed();
    // Let the periodic metrics export and the batch exporters try (and fail) a few times.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let shutdown = Instant::now();
    providers.shutdown(Duration::from_secs(2)).await;
    assert!(shutdown.elapsed() < Duration::from_millis(2_500), "shutdown took {:?}", shutdown.elapsed());
    elapsed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_refuses_connections_never_slows_recording() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }; // dropped: connections are refused
    let elapsed = hammer(format!("http://{dead}")).await;
    assert!(elapsed < Duration::from_secs(10), "recording took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_never_slows_recording() {
    // Accepts connections and then says nothing: exports hang until their own timeout.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    let elapsed = hammer(format!("http://{addr}")).await;
    assert!(elapsed < Duration::from_secs(10), "recording took {elapsed:?}");
    held.abort();
}

#[tokio::test]
async fn no_endpoint_builds_no_exporter() {
    let config = TelemetryConfig::new("quiet");
    assert!(!config.otlp_enabled());
    let providers = Providers::build(&config).unwrap();
    assert!(providers.logger_provider.is_none());
    // Spans are not recorded when they go nowhere, but still have ids (for logs and propagation).
    {
        use opentelemetry::trace::{Span as _, Tracer as _};
        let span = providers.tracer().start("unexported");
        assert!(!span.is_recording());
        assert!(span.span_context().is_valid());
    }
    let started = Instant::now();
    providers.shutdown(Duration::from_secs(2)).await;
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[test]
fn an_endpoint_outside_a_runtime_is_an_error_not_a_panic() {
    let config = TelemetryConfig::new("no-runtime").with_otlp_endpoint("http://127.0.0.1:4317");
    assert!(Providers::build(&config).is_err());
}

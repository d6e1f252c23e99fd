//! Trace propagation through a real tonic server over loopback: the client injects its span's
//! context into the metadata, `GrpcTraceLayer` continues it on the server.

// Test helpers outside #[test] functions unwrap too (as in the other crates' integration tests).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use llmesh_telemetry::{GrpcTraceLayer, PrometheusReader, Routes, SeedMetrics, TelemetryConfig, build_subscriber};
use opentelemetry::trace::{SpanKind, TraceContextExt as _, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tower::ServiceExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

#[derive(Clone, Debug, Default)]
struct Spans(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Spans {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        self.0.lock().unwrap().extend(batch);
        std::future::ready(Ok(()))
    }
}

/// A hand-written gRPC service (no codegen): `/test.Echo/Say` answers one empty message and
/// `grpc-status: 0` in the trailers; `/test.Echo/Fail` answers NOT_FOUND, trailers-only. It notes
/// the trace id its handler runs under.
#[derive(Clone, Default)]
struct Echo {
    seen_trace_ids: Arc<Mutex<Vec<Option<String>>>>,
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

impl tower::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        self.seen_trace_ids.lock().unwrap().push(llmesh_telemetry::current_trace_id());
        let response = match request.uri().path() {
            "/test.Echo/Say" => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let body =
                    Full::new(Bytes::from_static(b"\0\0\0\0\0")).with_trailers(async move { Some(Ok(trailers)) });
                http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(tonic::body::Body::new(body))
                    .unwrap()
            }
            _ => tonic::Status::not_found("no such thing").into_http(),
        };
        std::future::ready(Ok(response))
    }
}

/// A raw unary gRPC call (one empty message) over a tonic `Channel`, with `metadata` as headers.
async fn call(
    channel: &tonic::transport::Channel,
    path: &str,
    metadata: tonic::metadata::MetadataMap,
) -> (http::StatusCode, Option<String>) {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(Full::new(Bytes::from_static(b"\0\0\0\0\0"))))
        .unwrap();
    request.headers_mut().extend(metadata.into_headers());
    let response = channel.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let header_status = response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    let collected = response.into_body().collect().await.unwrap();
    let trailer_status =
        collected.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.to_str().unwrap().to_owned());
    (status, header_status.or(trailer_status))
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv: &KeyValue| &kv.value)
}

#[tokio::test]
async fn the_server_span_continues_the_clients_trace() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let spans = Spans::default();
    let tracer_provider = SdkTracerProvider::builder().with_simple_exporter(spans.clone()).build();
    let reader = PrometheusReader::new();
    let meter_provider = SdkMeterProvider::builder().with_reader(reader.clone()).build();
    let meter = opentelemetry::metrics::MeterProvider::meter(&meter_provider, "llmesh");
    let (subscriber, _) =
        build_subscriber(&TelemetryConfig::new("test"), tracer_provider.tracer("test"), None, std::io::sink, false);
    // A current-thread runtime: the server's tasks run on this thread and see this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let echo = Echo::default();
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .layer(
            GrpcTraceLayer::with_metrics(SeedMetrics::new(&meter))
                .with_routes(Routes::new().serve("test.Echo", ["Say", "Fail"])),
        )
        .add_service(echo.clone())
        .serve_with_incoming(incoming);
    let server = tokio::spawn(server);

    let channel = tokio::time::timeout(
        Duration::from_secs(5),
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect(),
    )
    .await
    .unwrap()
    .unwrap();

    // The client's span, injected with the public client helper.
    let client_span = tracing::info_span!("client", otel.kind = "client");
    let mut outgoing = tonic::Request::new(());
    client_span.in_scope(|| llmesh_telemetry::inject(&mut outgoing));
    assert!(outgoing.metadata().get("traceparent").is_some());
    let client_cx = client_span.context();
    let client_sc = client_cx.span().span_context().clone();

    let (http_status, grpc_status) =
        tokio::time::timeout(Duration::from_secs(5), call(&channel, "/test.Echo/Say", outgoing.metadata().clone()))
            .await
            .unwrap();
    assert_eq!((http_status, grpc_status.as_deref()), (http::StatusCode::OK, Some("0")));

    // A call without a traceparent, failing: a new root trace, status from the headers.
    let (_, grpc_status) =
        tokio::time::timeout(Duration::from_secs(5), call(&channel, "/test.Echo/Fail", Default::default()))
            .await
            .unwrap();
    assert_eq!(grpc_status.as_deref(), Some("5"));

    // The server side closes its span when the response body ends; give it a moment.
    let find = |name: &str| spans.0.lock().unwrap().iter().find(|s| s.name == name).cloned();
    for _ in 0..100 {
        if find("test.Echo/Say").is_some() && find("test.Echo/Fail").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let say = find("test.Echo/Say").expect("server span for Say");
    assert_eq!(say.span_kind, SpanKind::Server);
    assert_eq!(say.span_context.trace_id(), client_sc.trace_id(), "same trace");
    assert_eq!(say.parent_span_id, client_sc.span_id(), "parent is the client span");
    assert!(say.parent_span_is_remote);
    assert_eq!(attr(&say, "rpc.system"), Some(&Value::from("grpc")));
    assert_eq!(attr(&say, "rpc.service"), Some(&Value::from("test.Echo")));
    assert_eq!(attr(&say, "rpc.method"), Some(&Value::from("Say")));
    assert_eq!(attr(&say, "rpc.grpc.status_code"), Some(&Value::I64(0)));

    let fail = find("test.Echo/Fail").expect("server span for Fail");
    assert_ne!(fail.span_context.trace_id(), client_sc.trace_id());
    assert_eq!(fail.parent_span_id, opentelemetry::trace::SpanId::INVALID);
    assert_eq!(attr(&fail, "rpc.grpc.status_code"), Some(&Value::I64(5)));

    // The handler ran inside the server span: its trace id is the client's.
    let seen = echo.seen_trace_ids.lock().unwrap().clone();
    assert_eq!(seen[0], Some(client_sc.trace_id().to_string()));

    let text = reader.render();
    assert!(text.contains("llm_requests_total{endpoint=\"Say\",status=\"OK\"} 1\n"), "{text}");
    assert!(text.contains("llm_requests_total{endpoint=\"Fail\",status=\"NOT_FOUND\"} 1\n"), "{text}");
    assert!(text.contains("llm_active_requests 0\n"), "{text}");

    server.abort();
}

#[test]
fn a_queued_job_carries_its_submitters_context() {
    let tracer_provider = SdkTracerProvider::builder().build();
    let (subscriber, _) =
        build_subscriber(&TelemetryConfig::new("test"), tracer_provider.tracer("test"), None, std::io::sink, false);
    tracing::subscriber::with_default(subscriber, || {
        assert_eq!(llmesh_telemetry::current_traceparent(), None, "no trace outside a span");

        let submit = tracing::info_span!("submit");
        let traceparent = submit.in_scope(llmesh_telemetry::current_traceparent).expect("traceparent");
        let submit_cx = submit.context();
        let submit_sc = submit_cx.span().span_context().clone();
        assert_eq!(traceparent, format!("00-{}-{}-01", submit_sc.trace_id(), submit_sc.span_id()));

        let cx = llmesh_telemetry::context_from_traceparent(&traceparent).expect("parses");
        assert_eq!(cx.span().span_context().trace_id(), submit_sc.trace_id());
        assert!(cx.span().span_context().is_remote());
        assert!(llmesh_telemetry::context_from_traceparent("garbage").is_none());

        let work = tracing::info_span!("work");
        assert!(llmesh_telemetry::set_parent_from_traceparent(&work, &traceparent));
        let work_cx = work.context();
        assert_eq!(work_cx.span().span_context().trace_id(), submit_sc.trace_id());
        assert_eq!(work.in_scope(llmesh_telemetry::current_trace_id), Some(submit_sc.trace_id().to_string()));
    });
}

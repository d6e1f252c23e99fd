use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use opentelemetry::trace::{SpanKind, TraceContextExt as _, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tower::{Layer as _, ServiceExt as _};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::*;
use crate::config::TelemetryConfig;
use crate::prometheus::PrometheusReader;

#[derive(Clone, Debug, Default)]
struct Spans(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Spans {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        self.0.lock().expect("lock").extend(batch);
        std::future::ready(Ok(()))
    }
}

impl Spans {
    fn named(&self, name: &str) -> Vec<SpanData> {
        self.0.lock().expect("lock").iter().filter(|s| s.name == name).cloned().collect()
    }
}

struct Harness {
    spans: Spans,
    metrics: PrometheusReader,
    layer: GrpcTraceLayer,
    _guard: tracing::subscriber::DefaultGuard,
    _tracer_provider: SdkTracerProvider,
    _meter_provider: SdkMeterProvider,
}

fn harness() -> Harness {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let spans = Spans::default();
    let tracer_provider = SdkTracerProvider::builder().with_simple_exporter(spans.clone()).build();
    let metrics = PrometheusReader::new();
    let meter_provider = SdkMeterProvider::builder().with_reader(metrics.clone()).build();
    let meter = opentelemetry::metrics::MeterProvider::meter(&meter_provider, "llmesh");
    let (subscriber, _) = crate::logging::build_subscriber(
        &TelemetryConfig::new("test"),
        tracer_provider.tracer("test"),
        None,
        std::io::sink,
        false,
    );
    let guard = tracing::subscriber::set_default(subscriber);
    Harness {
        spans,
        metrics,
        layer: GrpcTraceLayer::with_metrics(SeedMetrics::new(&meter)).with_routes(routes()),
        _guard: guard,
        _tracer_provider: tracer_provider,
        _meter_provider: meter_provider,
    }
}

/// What a gateway-like server would pass: health and reflection exempt, two services served.
fn routes() -> Routes {
    Routes::new()
        .exempt_service("grpc.health.v1.Health")
        .exempt_service("grpc.reflection.v1.ServerReflection")
        .serve("llmesh.gateway.v1.Gateway", ["Generate", "GenerateStream"])
        .serve("x.Y", ["Unavailable", "Stream"])
}

fn grpc_request(path: &str, headers: http::HeaderMap) -> http::Request<tonic::body::Body> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .body(tonic::body::Body::empty())
        .expect("request");
    request.headers_mut().extend(headers);
    request
}

/// A unary success: headers, one message, trailers with `grpc-status: 0`.
fn ok_response() -> http::Response<tonic::body::Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let body = Full::new(Bytes::from_static(b"\0\0\0\0\0")).with_trailers(async move { Some(Ok(trailers)) });
    http::Response::builder()
        .header("content-type", "application/grpc")
        .body(tonic::body::Body::new(body))
        .expect("response")
}

/// An error as tonic sends it: trailers-only, the status in the headers.
fn error_response(code: tonic::Code) -> http::Response<tonic::body::Body> {
    tonic::Status::new(code, "nope").into_http()
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv: &KeyValue| &kv.value)
}

#[tokio::test]
async fn continues_the_callers_trace_and_records_the_seed_metrics() {
    let h = harness();
    let service = h.layer.layer(tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
        Ok::<_, std::convert::Infallible>(ok_response())
    }));

    let client = tracing::info_span!("client call");
    let mut headers = http::HeaderMap::new();
    client.in_scope(|| crate::propagation::inject_headers(&mut headers));
    let client_cx = client.context();
    let client_sc = client_cx.span().span_context().clone();
    assert!(headers.contains_key("traceparent"));

    let response = service.oneshot(grpc_request("/llmesh.gateway.v1.Gateway/Generate", headers)).await.expect("call");
    // The status arrives in the trailers, so nothing is counted before the body ends.
    assert!(h.metrics.render().contains("llm_active_requests 1\n"), "{}", h.metrics.render());
    let collected = response.into_body().collect().await.expect("body");
    assert_eq!(collected.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.as_bytes()), Some(&b"0"[..]));

    let server = h.spans.named("llmesh.gateway.v1.Gateway/Generate");
    assert_eq!(server.len(), 1, "{:?}", h.spans.0.lock().expect("lock"));
    let server = &server[0];
    assert_eq!(server.span_kind, SpanKind::Server);
    assert_eq!(server.span_context.trace_id(), client_sc.trace_id());
    assert_eq!(server.parent_span_id, client_sc.span_id());
    assert!(server.parent_span_is_remote);
    assert_eq!(attr(server, "rpc.system"), Some(&Value::from("grpc")));
    assert_eq!(attr(server, "rpc.service"), Some(&Value::from("llmesh.gateway.v1.Gateway")));
    assert_eq!(attr(server, "rpc.method"), Some(&Value::from("Generate")));
    assert_eq!(attr(server, "rpc.grpc.status_code"), Some(&Value::I64(0)));

    let text = h.metrics.render();
    assert!(text.contains("llm_requests_total{endpoint=\"Generate\",status=\"OK\"} 1\n"), "{text}");
    assert!(text.contains("llm_response_time_bucket{endpoint=\"Generate\",le=\"0.1\"} 1\n"), "{text}");
    assert!(text.contains("llm_response_time_count{endpoint=\"Generate\"} 1\n"), "{text}");
    assert!(text.contains("llm_active_requests 0\n"), "{text}");
}

#[tokio::test]
async fn trailers_only_errors_are_recorded_from_the_headers() {
    let h = harness();
    let service = h.layer.layer(tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
        Ok::<_, std::convert::Infallible>(error_response(tonic::Code::InvalidArgument))
    }));
    let response = service.oneshot(grpc_request("/llmesh.gateway.v1.Gateway/Generate", http::HeaderMap::new())).await;
    let response = response.expect("call");
    // Recorded as soon as the headers are known, before the (empty) body is read.
    let text = h.metrics.render();
    assert!(text.contains("llm_requests_total{endpoint=\"Generate\",status=\"INVALID_ARGUMENT\"} 1\n"), "{text}");
    drop(response);

    let server = h.spans.named("llmesh.gateway.v1.Gateway/Generate");
    assert_eq!(server.len(), 1);
    assert_eq!(attr(&server[0], "rpc.grpc.status_code"), Some(&Value::I64(3)));
    // No incoming traceparent: a root span.
    assert_eq!(server[0].parent_span_id, opentelemetry::trace::SpanId::INVALID);
    assert_eq!(server[0].status, opentelemetry::trace::Status::Unset);
}

#[tokio::test]
async fn server_errors_mark_the_span_and_dropped_bodies_count_as_cancelled() {
    let h = harness();
    let unavailable = h.layer.layer(tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
        Ok::<_, std::convert::Infallible>(error_response(tonic::Code::Unavailable))
    }));
    drop(unavailable.oneshot(grpc_request("/x.Y/Unavailable", http::HeaderMap::new())).await.expect("call"));
    let span = &h.spans.named("x.Y/Unavailable")[0];
    assert!(matches!(span.status, opentelemetry::trace::Status::Error { .. }), "{:?}", span.status);

    let streaming = h.layer.layer(tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
        Ok::<_, std::convert::Infallible>(ok_response())
    }));
    let response = streaming.oneshot(grpc_request("/x.Y/Stream", http::HeaderMap::new())).await.expect("call");
    drop(response); // the client hung up before the end of the stream
    let text = h.metrics.render();
    assert!(text.contains("llm_requests_total{endpoint=\"Stream\",status=\"CANCELLED\"} 1\n"), "{text}");
    assert!(text.contains("llm_requests_total{endpoint=\"Unavailable\",status=\"UNAVAILABLE\"} 1\n"), "{text}");
    assert!(text.contains("llm_active_requests 0\n"), "{text}");
}

#[tokio::test]
async fn unknown_methods_do_not_mint_series() {
    let h = harness();
    let service = h.layer.layer(tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
        Ok::<_, std::convert::Infallible>(error_response(tonic::Code::Unimplemented))
    }));
    for path in ["/evil.Service/aaaa", "/evil.Service/bbbb"] {
        drop(service.clone().oneshot(grpc_request(path, http::HeaderMap::new())).await.expect("call"));
    }
    let text = h.metrics.render();
    assert!(text.contains("llm_requests_total{endpoint=\"unknown\",status=\"UNIMPLEMENTED\"} 2\n"), "{text}");
    assert!(!text.contains("aaaa") && !text.contains("bbbb"), "{text}");
    let spans = h.spans.named(UNKNOWN_SPAN_NAME);
    assert_eq!(spans.len(), 2);
    assert_eq!(attr(&spans[0], "rpc.service"), Some(&Value::from("unknown")));
    assert_eq!(attr(&spans[0], "rpc.method"), Some(&Value::from("unknown")));
    assert!(h.spans.named("evil.Service/aaaa").is_empty());
}

/// An auth layer in front of the router refuses unknown paths before the router could answer
/// UNIMPLEMENTED: they must still land on `unknown`, never on a label of their own.
#[tokio::test]
async fn unknown_methods_refused_by_auth_land_on_unknown() {
    let h = harness();
    let auth = h.layer.layer(tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
        Ok::<_, std::convert::Infallible>(error_response(tonic::Code::Unauthenticated))
    }));
    let paths = ["/x.Y/Z", "/llmesh.gateway.v1.Gateway/NoSuch", "/llmesh.gateway.v1.Gateway/Generate/x", "/weird"];
    for path in paths {
        drop(auth.clone().oneshot(grpc_request(path, http::HeaderMap::new())).await.expect("call"));
    }
    // A served method refused the same way keeps its name.
    drop(
        auth.oneshot(grpc_request("/llmesh.gateway.v1.Gateway/Generate", http::HeaderMap::new())).await.expect("call"),
    );

    let text = h.metrics.render();
    assert!(text.contains("llm_requests_total{endpoint=\"unknown\",status=\"UNAUTHENTICATED\"} 4\n"), "{text}");
    assert!(text.contains("llm_requests_total{endpoint=\"Generate\",status=\"UNAUTHENTICATED\"} 1\n"), "{text}");
    assert!(!text.contains("NoSuch") && !text.contains("endpoint=\"Z\""), "{text}");
    let series = text.lines().filter(|l| l.starts_with("llm_requests_total{")).count();
    assert_eq!(series, 2, "{text}");
    assert_eq!(h.spans.named(UNKNOWN_SPAN_NAME).len(), 4);
    assert_eq!(h.spans.named("llmesh.gateway.v1.Gateway/Generate").len(), 1);
    assert!(h.spans.named("x.Y/Z").is_empty() && h.spans.named("llmesh.gateway.v1.Gateway/NoSuch").is_empty());
}

#[tokio::test]
async fn without_routes_every_call_is_unknown() {
    let h = harness();
    let layer = GrpcTraceLayer::with_metrics(SeedMetrics::new(&opentelemetry::global::meter("unused")));
    let service = layer.layer(tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
        Ok::<_, std::convert::Infallible>(error_response(tonic::Code::InvalidArgument))
    }));
    drop(service.oneshot(grpc_request("/llmesh.gateway.v1.Gateway/Generate", http::HeaderMap::new())).await);
    assert_eq!(h.spans.named(UNKNOWN_SPAN_NAME).len(), 1);
}

#[tokio::test]
async fn health_and_reflection_are_exempt() {
    let h = harness();
    let service = h.layer.layer(tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
        Ok::<_, std::convert::Infallible>(ok_response())
    }));
    for path in ["/grpc.health.v1.Health/Check", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"] {
        let response = service.clone().oneshot(grpc_request(path, http::HeaderMap::new())).await.expect("call");
        response.into_body().collect().await.expect("body");
    }
    assert!(h.spans.0.lock().expect("lock").is_empty());
    let text = h.metrics.render();
    assert!(!text.contains("llm_requests_total"), "{text}");

    // Only what the server says is exempt: without routes, health checks are traced (as unknown).
    let plain =
        GrpcTraceLayer::without_metrics().layer(tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
            Ok::<_, std::convert::Infallible>(ok_response())
        }));
    let response = plain.oneshot(grpc_request("/grpc.health.v1.Health/Check", http::HeaderMap::new())).await;
    response.expect("call").into_body().collect().await.expect("body");
    assert_eq!(h.spans.named(UNKNOWN_SPAN_NAME).len(), 1);
}

#[test]
fn paths_and_http_codes() {
    assert_eq!(split_path("/llmesh.cache.v1.Cache/Lookup"), ("llmesh.cache.v1.Cache", "Lookup"));
    assert_eq!(split_path("/weird"), ("unknown", "/weird"));
    assert_eq!(code_from_http(http::StatusCode::NOT_FOUND), tonic::Code::Unimplemented);
    assert_eq!(code_from_http(http::StatusCode::SERVICE_UNAVAILABLE), tonic::Code::Unavailable);
    assert_eq!(code_from_http(http::StatusCode::IM_A_TEAPOT), tonic::Code::Unknown);
}

/// The gateway's HTTP routes: labelled by route, a whole JSON answer is OK once sent, an error's
/// code comes from its extensions (else its HTTP status), a stream's failure from its trailer.
#[tokio::test]
async fn http_routes_are_labelled_by_route_and_read_their_outcome() {
    let h = harness();
    let answer = |status: u16, code: Option<tonic::Code>| {
        let mut response = http::Response::new(tonic::body::Body::new(Full::new(Bytes::from_static(b"{}"))));
        *response.status_mut() = http::StatusCode::from_u16(status).expect("status");
        if let Some(code) = code {
            response.extensions_mut().insert(code);
        }
        response
    };
    let request = |path: &str| {
        http::Request::builder().method("POST").uri(format!("http://localhost{path}")).body(tonic::body::Body::empty())
    };
    for (path, status, code) in [
        ("/v1/chat/completions", 200, None),
        ("/generate", 404, Some(tonic::Code::InvalidArgument)),
        ("/generate", 429, None),
    ] {
        let service = h.layer.layer(tower::service_fn(move |_req: http::Request<tonic::body::Body>| async move {
            Ok::<_, std::convert::Infallible>(answer(status, code))
        }));
        let response = service.oneshot(request(path).expect("request")).await.expect("call");
        // Read as hyper does: up to the frame after which the body says it has ended.
        response.into_body().frame().await.expect("a frame").expect("data");
    }
    let failing = h.layer.layer(tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from(tonic::Code::Unavailable as i32));
        let body = Full::new(Bytes::from_static(b"data: {}\n\n")).with_trailers(async { Some(Ok(trailers)) });
        Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::new(body)))
    }));
    let response = failing.oneshot(request("/v1/messages").expect("request")).await.expect("call");
    response.into_body().collect().await.expect("body");
    let text = h.metrics.render();
    for line in [
        "llm_requests_total{endpoint=\"/v1/chat/completions\",status=\"OK\"} 1\n",
        "llm_requests_total{endpoint=\"/generate\",status=\"INVALID_ARGUMENT\"} 1\n",
        "llm_requests_total{endpoint=\"/generate\",status=\"RESOURCE_EXHAUSTED\"} 1\n",
        "llm_requests_total{endpoint=\"/v1/messages\",status=\"UNAVAILABLE\"} 1\n",
        "llm_active_requests 0\n",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    assert_eq!(h.spans.named("POST /generate").len(), 2);
}

/// With nothing sampling (as `init` sets up without a traces endpoint), a call gets no span but a
/// trace id — its caller's, or without one a fresh one — visible to the inner service (for its
/// logs, error messages and next hop). Metrics count every call.
#[tokio::test]
async fn unsampled_calls_get_trace_ids_but_no_span() {
    let h = harness();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let layer = h.layer.clone().with_unsampled_spans(false);
    let service = layer.layer(tower::service_fn({
        let seen = seen.clone();
        move |_req: http::Request<tonic::body::Body>| {
            let seen = seen.clone();
            async move {
                seen.lock().expect("lock").push(crate::propagation::current_trace_id());
                Ok::<_, std::convert::Infallible>(ok_response())
            }
        }
    }));

    for path in ["/llmesh.gateway.v1.Gateway/Generate", "/v1/chat/completions"] {
        let response = service.clone().oneshot(grpc_request(path, http::HeaderMap::new())).await.expect("call");
        response.into_body().collect().await.expect("body");
    }
    assert!(h.spans.0.lock().expect("lock").is_empty(), "no span: {:?}", h.spans.0.lock().expect("lock"));
    let ids = seen.lock().expect("lock").clone();
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|id| id.as_ref().is_some_and(|id| id.len() == 32)), "{ids:?}");
    assert_ne!(ids[0], ids[1], "each call is a trace of its own");

    let trace = "0af7651916cd43dd8448eb211c80319c";
    let mut headers = http::HeaderMap::new();
    headers.insert("traceparent", format!("00-{trace}-b7ad6b7169203331-00").parse().expect("header"));
    let response = service.oneshot(grpc_request("/llmesh.gateway.v1.Gateway/Generate", headers)).await.expect("call");
    response.into_body().collect().await.expect("body");
    assert_eq!(seen.lock().expect("lock").last().cloned().flatten().as_deref(), Some(trace));
    assert!(h.spans.0.lock().expect("lock").is_empty(), "no span: {:?}", h.spans.0.lock().expect("lock"));

    let text = h.metrics.render();
    assert!(text.contains("llm_requests_total{endpoint=\"Generate\",status=\"OK\"} 2\n"), "{text}");
    assert!(text.contains("llm_requests_total{endpoint=\"/v1/chat/completions\",status=\"OK\"} 1\n"), "{text}");
}

/// A call without a span sends the same context on every hop: its headers are written once and
/// copied, and name the caller's trace (or the call's fresh one) exactly as the propagator would.
#[tokio::test]
async fn unsampled_calls_send_one_traceparent_on_every_hop() {
    let h = harness();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let layer = h.layer.clone().with_unsampled_spans(false);
    let service = layer.layer(tower::service_fn({
        let sent = sent.clone();
        move |_req: http::Request<tonic::body::Body>| {
            let sent = sent.clone();
            async move {
                let mut hops = Vec::new();
                for _ in 0..3 {
                    let mut outgoing = tonic::Request::new(());
                    crate::propagation::inject(&mut outgoing);
                    let header = |name| outgoing.metadata().get(name).map(|v| v.to_str().expect("ascii").to_owned());
                    hops.push((header("traceparent"), header("tracestate")));
                }
                let trace_id = crate::propagation::current_trace_id();
                sent.lock().expect("lock").push((hops, trace_id));
                Ok::<_, std::convert::Infallible>(ok_response())
            }
        }
    }));

    let trace = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace}-b7ad6b7169203331-00");
    let mut headers = http::HeaderMap::new();
    headers.insert("traceparent", traceparent.parse().expect("header"));
    for headers in [http::HeaderMap::new(), headers] {
        let response = service.clone().oneshot(grpc_request("/llmesh.gateway.v1.Gateway/Generate", headers)).await;
        response.expect("call").into_body().collect().await.expect("body");
    }
    let sent = sent.lock().expect("lock").clone();
    for (hops, trace_id) in &sent {
        let trace_id = trace_id.as_deref().expect("a trace id");
        let (first, state) = &hops[0];
        let first = first.as_deref().expect("a traceparent");
        assert!(first.starts_with(&format!("00-{trace_id}-")) && first.ends_with("-00"), "{first}");
        assert_eq!(state.as_deref(), Some(""), "tracestate as the propagator writes it");
        assert!(hops.iter().all(|hop| hop == &hops[0]), "one context on every hop: {hops:?}");
    }
    assert_eq!(sent[1].0[0].0.as_deref(), Some(traceparent.as_str()), "the caller's traceparent, continued");
}

/// A client that hangs up before its request has arrived: tonic answers UNKNOWN (a transport
/// error reading the body), which nobody receives; the call is the client's cancellation, not a
/// server error. A handler that answers OK regardless stays OK.
#[tokio::test]
async fn a_request_body_cut_off_counts_as_cancelled() {
    let h = harness();
    let service = h.layer.layer(tower::service_fn(|req: http::Request<tonic::body::Body>| async move {
        match req.into_body().collect().await {
            Ok(_) => Ok::<_, std::convert::Infallible>(ok_response()),
            // What tonic does with an h2 or I/O error while decoding the request.
            Err(_) => Ok(error_response(tonic::Code::Unknown)),
        }
    }));
    let broken = || {
        let mut request = grpc_request("/llmesh.gateway.v1.Gateway/Generate", http::HeaderMap::new());
        *request.body_mut() = tonic::body::Body::new(CutOff { sent: false });
        request
    };
    let response = service.clone().oneshot(broken()).await.expect("call");
    drop(response.into_body().collect().await);
    let whole = service.clone().oneshot(grpc_request("/llmesh.gateway.v1.Gateway/Generate", http::HeaderMap::new()));
    drop(whole.await.expect("call").into_body().collect().await);

    let text = h.metrics.render();
    assert!(text.contains("llm_requests_total{endpoint=\"Generate\",status=\"CANCELLED\"} 1\n"), "{text}");
    assert!(text.contains("llm_requests_total{endpoint=\"Generate\",status=\"OK\"} 1\n"), "{text}");
    assert!(!text.contains("UNKNOWN"), "{text}");
    let span = &h.spans.named("llmesh.gateway.v1.Gateway/Generate")[0];
    assert_eq!(attr(span, "rpc.grpc.status_code"), Some(&Value::I64(tonic::Code::Cancelled as i64)));
    assert_eq!(span.status, opentelemetry::trace::Status::Unset, "a client's cancellation is no server error");
}

/// A request body whose connection breaks after its first bytes.
struct CutOff {
    sent: bool,
}

impl hyper::body::Body for CutOff {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        if self.sent {
            return std::task::Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset",
            ))));
        }
        self.sent = true;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(b"\0\0\0\0\x10partial")))))
    }
}

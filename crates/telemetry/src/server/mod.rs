//! The server side of trace propagation, and the seed's metrics, as one tower layer for tonic:
//! `Server::builder().layer(GrpcTraceLayer::new().with_routes(routes))`.
//!
//! For every call except those to exempt services (health checks, reflection: see [`Routes`]) it
//! 1. extracts `traceparent` / `tracestate` with the global propagator;
//! 2. opens an INFO span `grpc.server` whose OpenTelemetry name is `{service}/{method}`
//!    (`otel.kind = "server"`, `rpc.system = "grpc"`, `rpc.service`, `rpc.method`) with the extracted
//!    context as its parent, and runs the inner service in it;
//! 3. counts `llm_active_requests`, and when the gRPC status is known records `llm_requests_total`
//!    `{endpoint=<method>, status=<code name>}`, `llm_response_time{endpoint}` and the span's
//!    `rpc.grpc.status_code`.
//!
//! The status comes from the `grpc-status` header of a trailers-only response (errors), else from
//! the trailers at the end of the body (unary successes, streams): the response body is wrapped, and
//! the span stays open until the body ends, so a stream's span and `llm_response_time` cover the
//! whole stream. A body that ends without a status counts as `UNKNOWN`; one dropped before its end
//! (the client went away) as `CANCELLED`, and so does a failed call whose request body broke off
//! (the client hung up before its request arrived; see `request.rs`). A non-200 HTTP status
//! without `grpc-status` maps to the code gRPC clients derive from it.
//!
//! A path that is not a method the process serves ([`Routes::serve`]) is recorded under
//! `endpoint="unknown"`, in a span named `grpc.unknown` whose `rpc.service` and `rpc.method` are
//! `unknown` too, however it is answered: the method name comes from the request path before
//! routing and auth, so a client sending random paths could otherwise create unbounded metric
//! series and span names (an auth layer refuses them with UNAUTHENTICATED before the router could
//! say UNIMPLEMENTED).
//!
//! Plain HTTP routes ([`http_routes`]: the gateway's OpenAI-compatible API and friends) get an
//! INFO span `http.server` named `{METHOD} {route}`, and the route as their `endpoint` label.
//!
//! **No span when nothing samples.** When [`crate::init`] found that no span can be sampled (no
//! traces endpoint), a layer built afterwards by [`GrpcTraceLayer::new`] creates no span: it
//! would be dropped unread, and creating it — the log formatter writes out its fields, the
//! OpenTelemetry layer builds its context, and both run again at every poll — was the layer's
//! largest cost per call. The call runs in its caller's trace context instead, or, when the caller
//! sent none, in a fresh unsampled one: its JSON log lines, its error messages, its
//! `x-llmesh-trace-id` and the next hop's `traceparent` carry a trace id as before (the caller's,
//! when it sent one). Every hop of such a call carries the same context, so its headers are written
//! once per call, on the first outgoing call, and copied onto the others
//! ([`crate::inject`]). Text log lines lose the span's name and fields. Metrics are recorded either
//! way.
//!
//! The layer never fails a call of its own: errors are the inner service's.

mod body;
mod future;
mod http_routes;
mod request;
mod routes;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use opentelemetry::KeyValue;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanContext, TraceContextExt as _, TraceFlags, TraceState};
use opentelemetry_sdk::trace::{IdGenerator as _, RandomIdGenerator};
use tower::{Layer, Service};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

pub use self::body::TracedBody;
pub use self::future::ResponseFuture;
pub use self::http_routes::{HTTP_ROUTES, code_of_http_status, http_route};
use self::request::{ClientGone, WatchedBody};
pub use self::routes::Routes;
use crate::metrics::SeedMetrics;
use crate::propagation::{CallHeaders, extract_headers};

/// The `endpoint` label (and `rpc.service`, `rpc.method`) of calls to paths the process does not
/// serve.
pub const UNKNOWN_ENDPOINT: &str = "unknown";
/// The span name of calls to paths the process does not serve.
pub const UNKNOWN_SPAN_NAME: &str = "grpc.unknown";

/// Whether spans can be sampled at all, as [`crate::init`] found (true until it says otherwise, so
/// that a layer used without `init`, as in tests, behaves as it always did).
static SAMPLING: AtomicBool = AtomicBool::new(true);

/// Called by [`crate::init`] with whether any span can be sampled; see the module docs.
pub(crate) fn set_sampling(on: bool) {
    SAMPLING.store(on, Ordering::Relaxed);
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`).
fn split_path(path: &str) -> (&str, &str) {
    path.strip_prefix('/').and_then(|p| p.split_once('/')).unwrap_or(("unknown", path))
}

/// The tower layer; see the module docs.
#[derive(Clone, Debug)]
pub struct GrpcTraceLayer {
    metrics: Option<SeedMetrics>,
    routes: Arc<Routes>,
    /// Whether calls get a span when nothing samples them (see the module docs).
    unsampled_spans: bool,
}

impl Default for GrpcTraceLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcTraceLayer {
    /// Spans plus the seed's metrics on the global meter. Build it after [`crate::init`]. Until
    /// [`GrpcTraceLayer::with_routes`] says what is served, every call is recorded as `unknown`.
    /// Calls get no span when `init` found that nothing can sample one (see the module docs).
    pub fn new() -> Self {
        Self::with_metrics(SeedMetrics::global()).with_unsampled_spans(SAMPLING.load(Ordering::Relaxed))
    }

    /// Spans (for every call) plus the seed's metrics on the given instruments.
    pub fn with_metrics(metrics: SeedMetrics) -> Self {
        Self { metrics: Some(metrics), routes: Arc::default(), unsampled_spans: true }
    }

    /// Spans only (for a service that should not report the seed's metrics).
    pub fn without_metrics() -> Self {
        Self { metrics: None, routes: Arc::default(), unsampled_spans: true }
    }

    /// The same layer; `false`: calls get no span, only their caller's trace context or a fresh
    /// unsampled one (for a process whose spans nothing samples).
    pub fn with_unsampled_spans(self, on: bool) -> Self {
        Self { unsampled_spans: on, ..self }
    }

    /// The same layer, with what the process serves and what it exempts.
    pub fn with_routes(self, routes: impl Into<Arc<Routes>>) -> Self {
        Self { routes: routes.into(), ..self }
    }
}

impl<S> Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace {
            inner,
            metrics: self.metrics.clone(),
            routes: self.routes.clone(),
            unsampled_spans: self.unsampled_spans,
        }
    }
}

/// The service [`GrpcTraceLayer`] builds.
#[derive(Clone, Debug)]
pub struct GrpcTrace<S> {
    inner: S,
    metrics: Option<SeedMetrics>,
    routes: Arc<Routes>,
    unsampled_spans: bool,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcTrace<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    ReqBody: hyper::body::Body<Data = hyper::body::Bytes> + Send + Unpin + 'static,
    ReqBody::Error: Into<body::BoxError>,
    ResBody: hyper::body::Body<Data = hyper::body::Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<body::BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // The request moves on below; its URI's clone shares the bytes (a reference count).
        let uri = request.uri().clone();
        let path = uri.path();
        if self.routes.is_exempt(path) {
            return ResponseFuture::passthrough(self.inner.call(request.map(tonic::body::Body::new)));
        }
        // Whether the client hangs up before its request has arrived (see `request`).
        let gone = ClientGone::default();
        let request = request.map(|body| tonic::body::Body::new(WatchedBody::new(body, gone.clone())));
        let parent = extract_headers(request.headers());
        let route = http_route(path);
        // Built once per served method (`Routes`): a call clones it, never formats it.
        let endpoint = match (route, self.routes.endpoint(path)) {
            (Some(route), _) => KeyValue::new("endpoint", route),
            (None, Some(endpoint)) => endpoint.clone(),
            (None, None) => KeyValue::new("endpoint", UNKNOWN_ENDPOINT),
        };
        let in_flight = self.metrics.as_ref().map(|m| m.start_labelled(endpoint));
        if !self.unsampled_spans {
            // Nothing would read the span (see the module docs): only a trace context, whose
            // headers each outgoing call then copies, written once (`CallHeaders`).
            let cx = if parent.span().span_context().is_valid() {
                parent
            } else {
                parent.with_remote_span_context(fresh_span_context())
            };
            let cx = cx.with_value(CallHeaders::default());
            let inner = {
                let _attached = cx.clone().attach();
                self.inner.call(request)
            };
            let future = inner.instrument(tracing::Span::none()).with_context(cx);
            let record = match route {
                Some(_) => CallRecord::http(tracing::Span::none(), in_flight, gone),
                None => CallRecord::new(tracing::Span::none(), in_flight, gone),
            };
            return ResponseFuture::traced(future, record);
        }
        if let Some(route) = route {
            let span = tracing::info_span!(
                "http.server",
                otel.name = %format_args!("{} {route}", request.method()),
                otel.kind = "server",
                http.request.method = %request.method(),
                http.route = route,
                http.response.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            let _ = span.set_parent(parent.clone());
            let inner = span.in_scope(|| self.inner.call(request));
            let future = inner.instrument(span.clone()).with_context(parent);
            return ResponseFuture::traced(future, CallRecord::http(span, in_flight, gone));
        }
        // Names come only from the served methods: anything else is one `unknown`.
        let (service, method, name) = if self.routes.is_served(path) {
            let (service, method) = split_path(path);
            // `/{service}/{method}` without its slash is the span's name, `{service}/{method}`.
            (service, method, path.strip_prefix('/').unwrap_or(path))
        } else {
            (UNKNOWN_ENDPOINT, UNKNOWN_ENDPOINT, UNKNOWN_SPAN_NAME)
        };
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %name,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        // Only fails when the span is disabled (RUST_LOG above info) or no OpenTelemetry layer is
        // installed; the parent is still attached below, so outgoing calls keep the caller's trace.
        let _ = span.set_parent(parent.clone());
        let inner = span.in_scope(|| self.inner.call(request));
        // Order matters: the parent context is attached first, then the span is entered on top.
        let future = inner.instrument(span.clone()).with_context(parent);
        ResponseFuture::traced(future, CallRecord::new(span, in_flight, gone))
    }
}

/// A new trace's context that is not sampled: ids for a call that has no span.
fn fresh_span_context() -> SpanContext {
    let ids = RandomIdGenerator::default();
    SpanContext::new(ids.new_trace_id(), ids.new_span_id(), TraceFlags::default(), false, TraceState::default())
}

/// Where the status code is known, it is recorded on the span and in the metrics exactly once.
#[derive(Debug)]
pub(crate) struct CallRecord {
    span: tracing::Span,
    in_flight: Option<crate::metrics::InFlight>,
    finished: bool,
    /// A plain HTTP route's call (see [`http_routes`]), not a gRPC one.
    http: bool,
    /// Set if the request failed to arrive: a failure is then the client's cancellation.
    client_gone: ClientGone,
}

impl CallRecord {
    pub(crate) fn new(span: tracing::Span, in_flight: Option<crate::metrics::InFlight>, gone: ClientGone) -> Self {
        Self { span, in_flight, finished: false, http: false, client_gone: gone }
    }

    pub(crate) fn http(span: tracing::Span, in_flight: Option<crate::metrics::InFlight>, gone: ClientGone) -> Self {
        Self { span, in_flight, finished: false, http: true, client_gone: gone }
    }

    /// The outcome a response head tells, if it tells one: its `grpc-status`; on an HTTP route
    /// the code its extensions carry, else its HTTP status's; on gRPC a non-200 status's.
    pub(crate) fn code_of_head(&self, parts: &http::response::Parts) -> Option<tonic::Code> {
        if self.http {
            self.span.record("http.response.status_code", parts.status.as_u16());
            let code = parts.extensions.get::<tonic::Code>().copied();
            return Some(code.unwrap_or_else(|| code_of_http_status(parts.status))).filter(|c| *c != tonic::Code::Ok);
        }
        grpc_status(&parts.headers)
            .or_else(|| (parts.status != http::StatusCode::OK).then(|| code_from_http(parts.status)))
    }

    /// The outcome of a body that ended without a status: an HTTP route's ended well; a gRPC
    /// call without trailers is UNKNOWN.
    pub(crate) fn code_at_end(&self) -> tonic::Code {
        if self.http { tonic::Code::Ok } else { tonic::Code::Unknown }
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    pub(crate) fn is_http(&self) -> bool {
        self.http
    }

    pub(crate) fn finish(&mut self, code: tonic::Code) {
        if self.finished {
            return;
        }
        self.finished = true;
        let code = self.client_gone.code(code);
        self.span.record("rpc.grpc.status_code", code as i64);
        if is_server_error(code) {
            self.span.record("otel.status_code", "error");
        }
        if let Some(in_flight) = &mut self.in_flight {
            in_flight.finish(code);
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        // Dropped before any status: the client cancelled (or the connection went).
        self.finish(tonic::Code::Cancelled);
    }
}

/// Server span status per the RPC semantic conventions: these codes are server errors.
fn is_server_error(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// `grpc-status` from headers or trailers.
pub(crate) fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers.get("grpc-status").map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

/// The code a gRPC client derives from an HTTP status when there is no `grpc-status`
/// (grpc/doc/http-grpc-status-mapping.md).
pub(crate) fn code_from_http(status: http::StatusCode) -> tonic::Code {
    use tonic::Code;
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

#[cfg(test)]
mod tests;

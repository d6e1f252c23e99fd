//! W3C trace-context propagation across gRPC hops and queued jobs.
//!
//! Outgoing calls: [`inject`] (or [`inject_interceptor`] as a tonic interceptor) writes the current
//! `tracing` span's OpenTelemetry context into the request metadata with the global propagator
//! (`traceparent` / `tracestate`, installed by [`crate::init`]). Incoming calls are handled by
//! [`crate::GrpcTraceLayer`].

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The OpenTelemetry context of the current `tracing` span, or the attached OTel context when the
/// current span has none (no span, a disabled span, or no OpenTelemetry layer installed).
pub fn current_context() -> Context {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() { cx } else { Context::current() }
}

/// Writes the current span's context into an outgoing request's metadata.
pub fn inject<T>(request: &mut tonic::Request<T>) {
    inject_metadata(request.metadata_mut());
}

/// Writes the current span's context into `metadata`.
pub fn inject_metadata(metadata: &mut MetadataMap) {
    let cx = current_context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(metadata)));
}

/// Writes the current span's context into HTTP headers (for tower-level clients).
pub fn inject_headers(headers: &mut http::HeaderMap) {
    let cx = current_context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(headers)));
}

/// A tonic interceptor that injects the caller's context:
/// `GatewayClient::with_interceptor(channel, llmesh_telemetry::inject_interceptor)`.
pub fn inject_interceptor(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    inject(&mut request);
    Ok(request)
}

/// Extracts a remote parent from HTTP headers with the global propagator.
pub fn extract_headers(headers: &http::HeaderMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Extracts a remote parent from incoming request metadata with the global propagator.
pub fn extract_metadata(metadata: &MetadataMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)))
}

/// Where a queued job's request carries its submitter's trace context (a contract rule: reserved
/// `metadata`, not part of the cache key).
pub use llmesh_proto::validate::JOB_TRACEPARENT_KEY;

/// The current context as a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), for a job that is
/// queued now and run later; `None` outside any trace.
pub fn current_traceparent() -> Option<String> {
    let cx = current_context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The hex trace id of the current span (e.g. for a response header or an error message).
pub fn current_trace_id() -> Option<String> {
    let cx = current_context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The remote context a `traceparent` describes; `None` when it does not parse. Make it the parent
/// of the job's span with `span.set_parent(cx)` (before the span is first entered).
pub fn context_from_traceparent(traceparent: &str) -> Option<Context> {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.trim().to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `traceparent` the parent of `span`; `false` if it does not parse or the span was already
/// started (entered) or is disabled.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) -> bool {
    context_from_traceparent(traceparent).is_some_and(|cx| span.set_parent(cx).is_ok())
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

pub(crate) struct HeaderInjector<'a>(pub(crate) &'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}

pub(crate) struct HeaderExtractor<'a>(pub(crate) &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

//! W3C trace-context propagation across gRPC hops and queued jobs.
//!
//! Outgoing calls: [`inject`] (or [`inject_interceptor`] as a tonic interceptor) writes the current
//! `tracing` span's OpenTelemetry context into the request metadata with the global propagator
//! (`traceparent` / `tracestate`, installed by [`crate::init`]). Incoming calls are handled by
//! [`crate::GrpcTraceLayer`].
//!
//! A call without a span of its own (nothing samples it: see [`crate::GrpcTraceLayer`]) sends the
//! same context on every hop — its caller's, or the fresh one the layer made — so [`inject`]
//! writes that context's headers once per call ([`CallHeaders`], without a `format!`) and copies
//! them onto each outgoing call, instead of running the propagator again for every hop.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{Ascii, MetadataKey, MetadataMap, MetadataValue};
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
    if let Some(written) = cx.get::<CallHeaders>().and_then(|headers| headers.of(&cx)) {
        for (key, value) in written {
            metadata.insert(key.clone(), value.clone());
        }
        return;
    }
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(metadata)));
}

/// The trace context headers of a call that has no span, written at most once and then copied
/// onto every outgoing call of it. The server layer puts one in the context of each such call (an
/// empty one: a call that makes no outgoing call writes nothing).
///
/// They are what the W3C propagator [`crate::init`] installs writes (`traceparent`, `tracestate`),
/// hex-encoded by hand instead of by its `format!` — the same bytes, which a test checks. Kept for
/// the span context they were written for: a context derived from the call's with another span
/// in it (a span made after all) is written by the global propagator, every time, as before.
#[derive(Debug, Default)]
pub(crate) struct CallHeaders(OnceLock<Written>);

#[derive(Debug)]
struct Written {
    trace_id: TraceId,
    span_id: SpanId,
    headers: Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>,
}

impl CallHeaders {
    /// The headers for `cx` (written now, the first time), unless `cx` is not the context they are
    /// kept for.
    fn of(&self, cx: &Context) -> Option<&[(MetadataKey<Ascii>, MetadataValue<Ascii>)]> {
        let span = cx.span();
        let now = span.span_context();
        let written = self.0.get_or_init(|| Written {
            trace_id: now.trace_id(),
            span_id: now.span_id(),
            headers: w3c_headers(now),
        });
        (written.trace_id == now.trace_id() && written.span_id == now.span_id()).then_some(written.headers.as_slice())
    }
}

/// The header that carries a call's trace and span ids. Its value differs on every call, so it is
/// sent never indexed: HPACK would add each one to the connection's table, where no later call
/// finds it, and search that table on every call (docs/BENCHMARKS.md §27).
const TRACEPARENT: &str = "traceparent";

/// What `TraceContextPropagator::inject_context` writes for `span`: nothing for an invalid one,
/// else `traceparent` (`00-<trace id>-<span id>-<sampled flag>`, lowercase hex) and `tracestate`.
fn w3c_headers(span: &SpanContext) -> Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)> {
    if !span.is_valid() {
        return Vec::new();
    }
    let mut traceparent = String::with_capacity(55);
    traceparent.push_str("00-");
    push_hex(&mut traceparent, &span.trace_id().to_bytes());
    traceparent.push('-');
    push_hex(&mut traceparent, &span.span_id().to_bytes());
    traceparent.push('-');
    push_hex(&mut traceparent, &[(span.trace_flags() & TraceFlags::SAMPLED).to_u8()]);
    let mut headers = Vec::with_capacity(2);
    if let Ok(mut value) = MetadataValue::try_from(traceparent) {
        value.set_sensitive(true);
        headers.push((MetadataKey::from_static(TRACEPARENT), value));
    }
    if let Ok(value) = MetadataValue::try_from(span.trace_state().header()) {
        headers.push((MetadataKey::from_static("tracestate"), value));
    }
    headers
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
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
        if let (Ok(key), Ok(mut value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            value.set_sensitive(key == TRACEPARENT);
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
        if let (Ok(name), Ok(mut value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            value.set_sensitive(name == TRACEPARENT);
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

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceState;

    use super::*;

    fn context(trace_id: u128, span_id: u64) -> Context {
        let span = SpanContext::new(
            TraceId::from(trace_id),
            SpanId::from(span_id),
            TraceFlags::default(),
            true,
            TraceState::default(),
        );
        Context::new().with_remote_span_context(span)
    }

    fn traceparent(metadata: &MetadataMap) -> Option<&str> {
        metadata.get("traceparent").and_then(|v| v.to_str().ok())
    }

    #[test]
    fn call_headers_are_written_once_for_their_context_only() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let cx = context(0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331).with_value(CallHeaders::default());
        let expected = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        for _ in 0..2 {
            let mut metadata = MetadataMap::new();
            let _attached = cx.clone().attach();
            inject_metadata(&mut metadata);
            assert_eq!(traceparent(&metadata), Some(expected));
        }
        let headers = cx.get::<CallHeaders>().and_then(|h| h.of(&cx)).expect("written");
        assert_eq!(headers.len(), 2, "traceparent and tracestate: {headers:?}");

        // A context derived from the call's (its values kept) with another span in it: written by
        // the propagator, for that span.
        let other = context(0x0af7651916cd43dd8448eb211c80319c, 0x1111);
        let derived = cx.with_remote_span_context(other.span().span_context().clone());
        assert!(derived.get::<CallHeaders>().is_some_and(|h| h.of(&derived).is_none()), "kept for the call's only");
        let mut metadata = MetadataMap::new();
        let _attached = derived.attach();
        inject_metadata(&mut metadata);
        assert_eq!(traceparent(&metadata), Some("00-0af7651916cd43dd8448eb211c80319c-0000000000001111-00"));
    }

    /// The headers written by hand are the bytes the SDK's W3C propagator writes.
    #[test]
    fn call_headers_are_what_the_w3c_propagator_writes() {
        let state = TraceState::from_key_value([("vendor", "value"), ("other", "1")]).expect("trace state");
        let spans = [
            (0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331, TraceFlags::SAMPLED, TraceState::default()),
            (1, 1, TraceFlags::default(), state.clone()),
            (u128::MAX, u64::MAX, TraceFlags::new(0xff), state),
            (0, 0, TraceFlags::SAMPLED, TraceState::default()),
        ];
        for (trace_id, span_id, flags, state) in spans {
            let span = SpanContext::new(TraceId::from(trace_id), SpanId::from(span_id), flags, true, state);
            let mut expected = MetadataMap::new();
            let cx = Context::new().with_remote_span_context(span.clone());
            TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(&mut expected));
            let mut written = MetadataMap::new();
            for (key, value) in w3c_headers(&span) {
                written.insert(key, value);
            }
            // Either way, the value that changes on every call is sent never indexed.
            for headers in [&written, &expected] {
                assert!(headers.get(TRACEPARENT).is_none_or(|value| value.is_sensitive()), "{span:?}");
                assert!(headers.get("tracestate").is_none_or(|value| !value.is_sensitive()), "{span:?}");
            }
            assert_eq!(written.into_headers(), expected.into_headers(), "{span:?}");
        }
    }
}

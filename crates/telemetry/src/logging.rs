//! The `tracing` subscriber: filter, stderr formatter, OpenTelemetry trace layer and log bridge.

use std::fmt;

use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::trace::SdkTracer;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::{Layer as _, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, filter};

use crate::config::{LogFormat, TelemetryConfig};

/// Builds the subscriber `init` installs, writing formatted lines to `writer`.
///
/// - `EnvFilter` from `config.log_filter` (a global filter: disabled spans are never created);
/// - the tracing-opentelemetry layer on `tracer`, always present so that trace ids exist for log
///   correlation and propagation even when traces are not exported;
/// - the OpenTelemetry log bridge when `logger_provider` is given (OTLP logs), minus the events of
///   the exporter's own stack (`opentelemetry*`, `tonic`, `h2`, `hyper`, `tower`), which would
///   otherwise feed back into the exporter;
/// - a text (`ansi` colours as asked) or JSON formatter per `config.log_format`.
///
/// An invalid filter falls back to `info` and is reported in the returned warning.
pub fn build_subscriber<W>(
    config: &TelemetryConfig,
    tracer: SdkTracer,
    logger_provider: Option<&SdkLoggerProvider>,
    writer: W,
    ansi: bool,
) -> (impl Subscriber + Send + Sync + for<'a> LookupSpan<'a>, Option<String>)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let (env_filter, warning) = match EnvFilter::try_new(&config.log_filter) {
        Ok(f) => (f, None),
        Err(err) => {
            (EnvFilter::new("info"), Some(format!("RUST_LOG {:?} is invalid ({err}); using info", config.log_filter)))
        }
    };
    let otel_traces = tracing_opentelemetry::layer().with_tracer(tracer).with_tracked_inactivity(false);
    let otel_logs = logger_provider.map(|provider| {
        OpenTelemetryTracingBridge::new(provider)
            .with_filter(filter::filter_fn(|meta| !is_exporter_target(meta.target())))
    });
    let (text, json) = match config.log_format {
        LogFormat::Text => (Some(tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi)), None),
        LogFormat::Json => {
            let format = Format::default().json().flatten_event(true).with_current_span(true).with_span_list(false);
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false)
                .fmt_fields(JsonFields::new())
                .event_format(JsonWithTraceIds { inner: format });
            (None, Some(layer))
        }
    };
    let subscriber =
        tracing_subscriber::registry().with(env_filter).with(otel_traces).with(otel_logs).with(text).with(json);
    (subscriber, warning)
}

fn is_exporter_target(target: &str) -> bool {
    ["opentelemetry", "tonic", "h2", "hyper", "tower"].iter().any(|prefix| {
        target.starts_with(prefix) && target[prefix.len()..].chars().next().is_none_or(|c| c == ':' || c == '_')
    })
}

/// tracing-subscriber's JSON line plus `"trace_id"` and `"span_id"` of the current span.
///
/// The ids come from the current OpenTelemetry context, which the tracing-opentelemetry layer
/// attaches whenever a span is entered.
struct JsonWithTraceIds {
    inner: Format<Json>,
}

impl<S, N> FormatEvent<S, N> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut line = String::with_capacity(256);
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;

        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let sc = span.span_context();
        let head = line.trim_end().strip_suffix('}');
        match head {
            Some(head) if sc.is_valid() => {
                writer.write_str(head)?;
                if !head.ends_with('{') {
                    writer.write_char(',')?;
                }
                writeln!(writer, "\"trace_id\":\"{}\",\"span_id\":\"{}\"}}", sc.trace_id(), sc.span_id())
            }
            _ => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Capture {
        type Writer = Capture;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    impl Capture {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf8").lines().map(str::to_owned).collect()
        }
    }

    #[test]
    fn json_lines_carry_trace_and_span_ids() {
        let provider = SdkTracerProvider::builder().build();
        let mut config = TelemetryConfig::new("test");
        config.log_format = LogFormat::Json;
        let capture = Capture::default();
        let (subscriber, warning) = build_subscriber(&config, provider.tracer("test"), None, capture.clone(), false);
        assert!(warning.is_none());

        let (trace_id, span_id) = tracing::subscriber::with_default(subscriber, || {
            tracing::info!(answer = 42, "outside any span");
            let span = tracing::info_span!("work", job = "x");
            let _entered = span.enter();
            tracing::info!(user = "a\"b", "inside a span");
            let cx = span.context();
            let sc = cx.span().span_context().clone();
            (sc.trace_id().to_string(), sc.span_id().to_string())
        });

        let lines = capture.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with('{') && lines[0].ends_with('}'), "{}", lines[0]);
        assert!(lines[0].contains("\"message\":\"outside any span\""), "{}", lines[0]);
        assert!(!lines[0].contains("trace_id"), "{}", lines[0]);
        assert!(lines[1].starts_with('{') && lines[1].ends_with('}'), "{}", lines[1]);
        assert!(lines[1].contains(&format!("\"trace_id\":\"{trace_id}\"")), "{}", lines[1]);
        assert!(lines[1].contains(&format!("\"span_id\":\"{span_id}\"")), "{}", lines[1]);
        assert!(lines[1].contains("\"user\":\"a\\\"b\""), "{}", lines[1]);
        assert_eq!(trace_id.len(), 32);
    }

    #[test]
    fn text_format_and_bad_filter() {
        let provider = SdkTracerProvider::builder().build();
        let mut config = TelemetryConfig::new("test");
        config.log_filter = "info,=[".to_owned();
        let capture = Capture::default();
        let (subscriber, warning) = build_subscriber(&config, provider.tracer("test"), None, capture.clone(), false);
        assert!(warning.is_some());
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!("hidden");
            tracing::info!("shown");
        });
        let lines = capture.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("shown") && !lines[0].contains('{'));
    }

    #[test]
    fn exporter_targets() {
        assert!(is_exporter_target("opentelemetry_sdk"));
        assert!(is_exporter_target("opentelemetry"));
        assert!(is_exporter_target("h2::codec"));
        assert!(is_exporter_target("tonic::transport"));
        assert!(!is_exporter_target("h2o"));
        assert!(!is_exporter_target("llmesh_gateway"));
    }
}

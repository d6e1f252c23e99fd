//! Prometheus text exposition (format 0.0.4) of a `MeterProvider`'s metrics, collected on demand.
//!
//! Names follow the OpenTelemetry Collector's Prometheus exporter (the `otlptranslator` rules with
//! suffixes on), so `/metrics` and the collector produce the same series:
//!
//! - the name is split on every character outside `[a-zA-Z0-9:]` and re-joined with `_` (dots
//!   become underscores, runs of separators collapse);
//! - the unit adds a suffix unless the name already has that word: `s` → `_seconds`,
//!   `By` → `_bytes`, `ms` → `_milliseconds`, ... `x/y` → `_x_per_y`; units in braces (`{token}`)
//!   and `1` add nothing;
//! - monotonic sums end in `_total` (moved to the end, never doubled); gauges with unit `1` end in
//!   `_ratio`;
//! - histograms give `_bucket{le=...}` (cumulative, with `+Inf`), `_sum` and `_count`;
//!   non-monotonic sums and gauges are plain gauges; exponential histograms are skipped (the
//!   collector turns them into native histograms, which the text format cannot carry);
//! - attribute keys: characters outside `[a-zA-Z0-9]` become `_` (runs collapse), a leading digit
//!   gets `key_`; keys that collide are merged with their values joined by `;`.
//!
//! The collector also adds `otel_scope_*` labels and turns `service.name` / `service.instance.id`
//! into `job` / `instance`; here Prometheus's scrape sets `job` / `instance`, and the remaining
//! resource attributes go to `target_info` as the spec asks of SDK exporters.
//!
//! **Why hand-written** (checked 2026-12-06 against the crates' sources). `opentelemetry-prometheus`
//! 0.33.1 (for opentelemetry 0.33, on the `prometheus` 0.14 crate) appends the unit's suffix and
//! `_total` without looking at the name, so `process_cpu_seconds_total`,
//! `process_resident_memory_bytes` and `process_start_time_seconds` would become
//! `process_cpu_seconds_total_seconds_total`, `process_resident_memory_bytes_bytes` and
//! `process_start_time_seconds_seconds` (the memory alert in `deploy/prometheus/rules` and the CPU
//! and uptime panels of the overview dashboard query the present names); it also adds `_ratio` to
//! counters with unit `1`, keeps runs of `_`, does not prefix a label that starts with a digit,
//! keeps `service_name` on `target_info`, and puts `otel_scope_*` labels on every series unless
//! told not to. Its `without_units` / `without_counter_suffixes` would cure the doubling only by
//! dropping `_seconds` and `_total` everywhere else; renaming the instruments instead would change
//! the OTLP names and still leave `/metrics` differing from the collector's translation, which this
//! module promises to match. `prometheus-client` (0.26) has no OpenTelemetry bridge: fed through one,
//! it would take over only the text writing below (the naming rules and the walk over the SDK's data
//! stay ours), and it writes OpenMetrics (`# EOF`, `# UNIT`, a counter's `# TYPE` without `_total`),
//! a different exposition from the 0.0.4 text the tests and scrapes read today. So the translation
//! stays here, with its tests against the collector's names.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt::Write as _;
use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, Temporality};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A pull `MetricReader` (cumulative) that renders Prometheus text on demand. Cheap to clone; all
/// clones read the same provider. Register it with `MeterProviderBuilder::with_reader` once.
#[derive(Clone, Debug)]
pub struct PrometheusReader {
    inner: Arc<ManualReader>,
}

impl Default for PrometheusReader {
    fn default() -> Self {
        Self::new()
    }
}

impl PrometheusReader {
    pub fn new() -> Self {
        Self { inner: Arc::new(ManualReader::builder().with_temporality(Temporality::Cumulative).build()) }
    }

    /// Collects the provider's current metrics.
    pub fn collect(&self) -> Result<ResourceMetrics, OTelSdkError> {
        let mut rm = ResourceMetrics::default();
        self.inner.collect(&mut rm)?;
        Ok(rm)
    }

    /// Collects and renders the text exposition; an empty string when the provider is gone.
    pub fn render(&self) -> String {
        match self.collect() {
            Ok(rm) => encode(&rm),
            Err(err) => {
                tracing::debug!(error = %err, "metrics collection failed");
                String::new()
            }
        }
    }
}

impl MetricReader for PrometheusReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.inner.register_pipeline(pipeline);
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.inner.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.inner.temporality(kind)
    }
}

/// The translator's metric types (they decide the suffixes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MetricType {
    Gauge,
    MonotonicCounter,
    NonMonotonicCounter,
    Histogram,
}

impl MetricType {
    fn type_line(self) -> &'static str {
        match self {
            Self::Gauge | Self::NonMonotonicCounter => "gauge",
            Self::MonotonicCounter => "counter",
            Self::Histogram => "histogram",
        }
    }
}

/// One `# HELP` / `# TYPE` block.
struct Family {
    help: String,
    kind: MetricType,
    samples: String,
}

/// Renders collected metrics as Prometheus text.
pub fn encode(rm: &ResourceMetrics) -> String {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for scope in rm.scope_metrics() {
        for metric in scope.metrics() {
            match metric.data() {
                AggregatedMetrics::F64(data) => add_metric(&mut families, metric, data),
                AggregatedMetrics::U64(data) => add_metric(&mut families, metric, data),
                AggregatedMetrics::I64(data) => add_metric(&mut families, metric, data),
            }
        }
    }

    let mut out = String::new();
    write_target_info(&mut out, rm);
    for (name, family) in &families {
        if family.samples.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# HELP {name} {}", escape_help(&family.help));
        let _ = writeln!(out, "# TYPE {name} {}", family.kind.type_line());
        out.push_str(&family.samples);
    }
    out
}

/// A number as Prometheus prints it.
trait SampleValue: Copy {
    fn render(self) -> String;
}

impl SampleValue for f64 {
    fn render(self) -> String {
        format_float(self)
    }
}

impl SampleValue for u64 {
    fn render(self) -> String {
        self.to_string()
    }
}

impl SampleValue for i64 {
    fn render(self) -> String {
        self.to_string()
    }
}

fn add_metric<T: SampleValue>(families: &mut BTreeMap<String, Family>, metric: &Metric, data: &MetricData<T>) {
    let kind = match data {
        MetricData::Gauge(_) => MetricType::Gauge,
        MetricData::Sum(sum) if sum.is_monotonic() => MetricType::MonotonicCounter,
        MetricData::Sum(_) => MetricType::NonMonotonicCounter,
        MetricData::Histogram(_) => MetricType::Histogram,
        MetricData::ExponentialHistogram(_) => return,
    };
    let name = metric_name(metric.name(), metric.unit(), kind);
    if name.is_empty() {
        return;
    }
    let family = families.entry(name.clone()).or_insert_with(|| Family {
        help: if metric.description().is_empty() { metric.name().to_owned() } else { metric.description().to_owned() },
        kind,
        samples: String::new(),
    });
    if family.kind != kind {
        // Two instruments map to one name with different types: Prometheus would reject the
        // scrape, so keep the first.
        tracing::debug!(metric = metric.name(), "metric name collides with another type; skipped");
        return;
    }
    let out = &mut family.samples;
    match data {
        MetricData::Gauge(gauge) => {
            for dp in gauge.data_points() {
                write_sample(out, &name, &labels(dp.attributes()), None, &dp.value().render());
            }
        }
        MetricData::Sum(sum) => {
            for dp in sum.data_points() {
                write_sample(out, &name, &labels(dp.attributes()), None, &dp.value().render());
            }
        }
        MetricData::Histogram(hist) => {
            for dp in hist.data_points() {
                let labels = labels(dp.attributes());
                let bucket = format!("{name}_bucket");
                let mut cumulative = 0u64;
                let mut counts = dp.bucket_counts();
                for bound in dp.bounds() {
                    cumulative += counts.next().unwrap_or(0);
                    write_sample(out, &bucket, &labels, Some(&format_float(bound)), &cumulative.to_string());
                }
                write_sample(out, &bucket, &labels, Some("+Inf"), &dp.count().to_string());
                write_sample(out, &format!("{name}_sum"), &labels, None, &dp.sum().render());
                write_sample(out, &format!("{name}_count"), &labels, None, &dp.count().to_string());
            }
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn write_sample(out: &mut String, name: &str, labels: &[(String, String)], le: Option<&str>, value: &str) {
    out.push_str(name);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        let mut first = true;
        let le_pair = le.map(|le| ("le", le));
        for (k, v) in labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(le_pair) {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

fn write_target_info(out: &mut String, rm: &ResourceMetrics) {
    // These become `job` / `instance` on the scrape (and in the collector), not target_info labels.
    const IDENTIFYING: [&str; 3] = ["service.name", "service.namespace", "service.instance.id"];
    let attrs = rm
        .resource()
        .iter()
        .filter(|(k, _)| !IDENTIFYING.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str().to_owned(), v.as_str().into_owned()));
    let labels = sanitize_labels(attrs);
    if labels.is_empty() {
        return;
    }
    out.push_str("# HELP target_info Target metadata\n# TYPE target_info gauge\n");
    write_sample(out, "target_info", &labels, None, "1");
}

fn labels<'a>(attributes: impl Iterator<Item = &'a opentelemetry::KeyValue>) -> Vec<(String, String)> {
    sanitize_labels(attributes.map(|kv| (kv.key.as_str().to_owned(), kv.value.as_str().into_owned())))
}

/// Sanitises keys, merges colliding keys (values joined with `;`, in original-key order), sorts.
fn sanitize_labels(attributes: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut sorted: Vec<(String, String)> = attributes.collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut merged: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in sorted {
        let Some(key) = label_name(&key) else { continue };
        match merged.entry(key) {
            Entry::Occupied(mut slot) => {
                let joined = slot.get_mut();
                joined.push(';');
                joined.push_str(&value);
            }
            Entry::Vacant(slot) => {
                slot.insert(value);
            }
        }
    }
    merged.into_iter().collect()
}

/// A metric name under the translator's rules (empty when nothing valid is left).
fn metric_name(name: &str, unit: &str, kind: MetricType) -> String {
    let mut tokens: Vec<String> = name
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == ':'))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();

    let (main_unit, per_unit) = unit_suffixes(unit);
    let main_unit = clean_up_unit(&main_unit);
    let per_unit = clean_up_unit(&per_unit);
    add_unit_tokens(&mut tokens, main_unit, per_unit);

    if kind == MetricType::MonotonicCounter {
        tokens.retain(|t| t != "total");
        tokens.push("total".to_owned());
    }
    if unit == "1" && kind == MetricType::Gauge {
        tokens.retain(|t| t != "ratio");
        tokens.push("ratio".to_owned());
    }
    let mut joined = tokens.join("_");
    if joined.starts_with(|c: char| c.is_ascii_digit()) {
        joined.insert(0, '_');
    }
    joined
}

fn add_unit_tokens(tokens: &mut Vec<String>, mut main_unit: String, mut per_unit: String) {
    if tokens.contains(&main_unit) {
        main_unit.clear();
    }
    if per_unit == "per_" {
        per_unit.clear();
    } else {
        per_unit = per_unit.trim_end_matches('_').to_owned();
        if tokens.contains(&per_unit) {
            per_unit.clear();
        }
    }
    if !per_unit.is_empty() {
        main_unit = main_unit.trim_end_matches('_').to_owned();
    }
    if !main_unit.is_empty() {
        tokens.push(main_unit);
    }
    if !per_unit.is_empty() {
        tokens.push(per_unit);
    }
}

fn unit_suffixes(unit: &str) -> (String, String) {
    let mut parts = unit.splitn(2, '/');
    let main = parts.next().unwrap_or("").trim();
    let main_suffix =
        if !main.is_empty() && !main.contains(['{', '}']) { map_unit(main).to_owned() } else { String::new() };
    let per_suffix = match parts.next() {
        Some(per) if !per.is_empty() => {
            let per = per.trim();
            if !per.is_empty() && !per.contains(['{', '}']) {
                format!("per_{}", map_per_unit(per))
            } else {
                String::new()
            }
        }
        _ => String::new(),
    };
    (main_suffix, per_suffix)
}

fn map_unit(unit: &str) -> &str {
    match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "TiBy" => "tibibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "GBy" => "gigabytes",
        "TBy" => "terabytes",
        "m" => "meters",
        "V" => "volts",
        "A" => "amperes",
        "J" => "joules",
        "W" => "watts",
        "g" => "grams",
        "Cel" => "celsius",
        "Hz" => "hertz",
        "1" => "",
        "%" => "percent",
        other => other,
    }
}

fn map_per_unit(unit: &str) -> &str {
    match unit {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        "w" => "week",
        "mo" => "month",
        "y" => "year",
        other => other,
    }
}

/// Invalid characters → `_`, runs of `_` collapse, a leading `_` goes.
fn clean_up_unit(unit: &str) -> String {
    let mut out = String::with_capacity(unit.len());
    for c in unit.chars() {
        let c = if c.is_ascii_alphanumeric() || c == ':' { c } else { '_' };
        if c == '_' && out.ends_with('_') {
            continue;
        }
        out.push(c);
    }
    out.trim_start_matches('_').to_owned()
}

/// A label name under the translator's rules; `None` when nothing but underscores is left.
fn label_name(key: &str) -> Option<String> {
    if key.is_empty() {
        return None;
    }
    let (reserved, body) = match key.strip_prefix("__").and_then(|k| k.strip_suffix("__")) {
        Some(inner) if key.len() >= 4 => (true, inner),
        _ => (false, key),
    };
    let mut out = String::with_capacity(key.len() + 4);
    let mut prev_underscore = false;
    for c in body.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
            prev_underscore = false;
        } else if !prev_underscore {
            out.push('_');
            prev_underscore = true;
        }
    }
    if reserved {
        out = format!("__{out}__");
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "key_");
    }
    if out.chars().all(|c| c == '_') { None } else { Some(out) }
}

fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Formats a float the way Go's `strconv.FormatFloat(v, 'g', -1, 64)` does (what the collector
/// writes), so `le` label values are identical on both paths: `0.1`, `1`, `5`, `1e+06`.
pub fn format_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".to_owned();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf".to_owned() } else { "-Inf".to_owned() };
    }
    if v == 0.0 {
        return "0".to_owned();
    }
    let sci = format!("{v:e}");
    let Some((mantissa, exp)) = sci.split_once('e') else { return v.to_string() };
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::KeyValue;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::metrics::SdkMeterProvider;

    use super::*;
    use crate::metrics::SeedMetrics;

    #[test]
    fn names_follow_the_collector() {
        use MetricType::*;
        let cases = [
            ("http.server.request.duration", "s", Histogram, "http_server_request_duration_seconds"),
            ("requests.count", "1", MonotonicCounter, "requests_count_total"),
            ("memory.usage", "By", Gauge, "memory_usage_bytes"),
            ("llm_requests", "", MonotonicCounter, "llm_requests_total"),
            ("llmesh_shed_total", "", MonotonicCounter, "llmesh_shed_total"),
            ("total.things.total", "", MonotonicCounter, "things_total"),
            ("llm_response_time", "", Histogram, "llm_response_time"),
            ("llm_active_requests", "", NonMonotonicCounter, "llm_active_requests"),
            ("gen_ai.client.token.usage", "{token}", Histogram, "gen_ai_client_token_usage"),
            ("gen_ai.client.operation.duration", "s", Histogram, "gen_ai_client_operation_duration_seconds"),
            ("process_cpu_seconds_total", "s", MonotonicCounter, "process_cpu_seconds_total"),
            ("process_resident_memory_bytes", "By", Gauge, "process_resident_memory_bytes"),
            ("cache.hit", "1", Gauge, "cache_hit_ratio"),
            ("cache.hit.ratio", "1", Gauge, "cache_hit_ratio"),
            ("throughput", "By/s", Gauge, "throughput_bytes_per_second"),
            ("rate", "{req}/s", Gauge, "rate_per_second"),
            ("latency", "ms", Histogram, "latency_milliseconds"),
            ("odd__name..x", "", Gauge, "odd_name_x"),
            ("2xx.count", "", MonotonicCounter, "_2xx_count_total"),
            ("temp", "Cel", Gauge, "temp_celsius"),
            ("size", "KiBy", Gauge, "size_kibibytes"),
        ];
        for (name, unit, kind, want) in cases {
            assert_eq!(metric_name(name, unit, kind), want, "{name} [{unit}] {kind:?}");
        }
    }

    #[test]
    fn label_names() {
        assert_eq!(label_name("gen_ai.request.model").as_deref(), Some("gen_ai_request_model"));
        assert_eq!(label_name("a..b").as_deref(), Some("a_b"));
        assert_eq!(label_name("a__b").as_deref(), Some("a_b"));
        assert_eq!(label_name("123abc").as_deref(), Some("key_123abc"));
        assert_eq!(label_name("__name__").as_deref(), Some("__name__"));
        assert_eq!(label_name("...").as_deref(), None);
    }

    #[test]
    fn floats_print_like_go() {
        let cases = [
            (0.1, "0.1"),
            (0.5, "0.5"),
            (1.0, "1"),
            (2.0, "2"),
            (5.0, "5"),
            (100_000.0, "100000"),
            (1_000_000.0, "1e+06"),
            (1_234_567.0, "1.234567e+06"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-2.5, "-2.5"),
            (0.0, "0"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (f64::NAN, "NaN"),
        ];
        for (v, want) in cases {
            assert_eq!(format_float(v), want, "{v}");
        }
    }

    fn provider() -> (SdkMeterProvider, PrometheusReader) {
        let reader = PrometheusReader::new();
        let resource = Resource::builder_empty()
            .with_service_name("llmesh-test")
            .with_attribute(KeyValue::new("deployment.environment", "test"))
            .build();
        let provider = SdkMeterProvider::builder().with_resource(resource).with_reader(reader.clone()).build();
        (provider, reader)
    }

    #[test]
    fn renders_every_kind() {
        let (provider, reader) = provider();
        let meter = provider.meter("llmesh");

        let counter = meter.u64_counter("llmesh.cache.requests").with_description("cache lookups").build();
        counter.add(3, &[KeyValue::new("result", "hit")]);
        counter.add(1, &[KeyValue::new("result", "miss")]);
        let updown = meter.i64_up_down_counter("llmesh.queue.jobs").with_unit("{job}").build();
        updown.add(5, &[KeyValue::new("state", "queued")]);
        updown.add(-2, &[KeyValue::new("state", "queued")]);
        let gauge = meter.f64_gauge("llmesh.cache.bytes").with_unit("By").build();
        gauge.record(1536.0, &[KeyValue::new("backend", "memory")]);
        let ratio = meter.f64_gauge("llmesh.ratelimit.remaining").with_unit("1").build();
        ratio.record(0.25, &[KeyValue::new("api_key", "k1"), KeyValue::new("kind", "requests")]);
        let hist = meter
            .f64_histogram("gen_ai.client.operation.duration")
            .with_unit("s")
            .with_boundaries(vec![0.5, 1.0])
            .build();
        let attrs = [KeyValue::new("gen_ai.request.model", "sim-1"), KeyValue::new("gen_ai.operation.name", "chat")];
        hist.record(0.2, &attrs);
        hist.record(0.7, &attrs);
        hist.record(3.0, &attrs);
        let escaped = meter.u64_counter("escapes").with_description("line one\nback\\slash").build();
        escaped.add(1, &[KeyValue::new("v", "quote\" backslash\\ newline\n")]);

        let text = reader.render();
        let expect = [
            "# HELP llmesh_cache_requests_total cache lookups\n# TYPE llmesh_cache_requests_total counter\n",
            "llmesh_cache_requests_total{result=\"hit\"} 3\n",
            "llmesh_cache_requests_total{result=\"miss\"} 1\n",
            "# TYPE llmesh_queue_jobs gauge\nllmesh_queue_jobs{state=\"queued\"} 3\n",
            "# TYPE llmesh_cache_bytes gauge\nllmesh_cache_bytes{backend=\"memory\"} 1536\n",
            "# TYPE llmesh_ratelimit_remaining_ratio gauge\n",
            "llmesh_ratelimit_remaining_ratio{api_key=\"k1\",kind=\"requests\"} 0.25\n",
            "# TYPE gen_ai_client_operation_duration_seconds histogram\n",
            "gen_ai_client_operation_duration_seconds_bucket{gen_ai_operation_name=\"chat\",gen_ai_request_model=\"sim-1\",le=\"0.5\"} 1\n",
            "gen_ai_client_operation_duration_seconds_bucket{gen_ai_operation_name=\"chat\",gen_ai_request_model=\"sim-1\",le=\"1\"} 2\n",
            "gen_ai_client_operation_duration_seconds_bucket{gen_ai_operation_name=\"chat\",gen_ai_request_model=\"sim-1\",le=\"+Inf\"} 3\n",
            "gen_ai_client_operation_duration_seconds_sum{gen_ai_operation_name=\"chat\",gen_ai_request_model=\"sim-1\"} 3.9\n",
            "gen_ai_client_operation_duration_seconds_count{gen_ai_operation_name=\"chat\",gen_ai_request_model=\"sim-1\"} 3\n",
            "# HELP escapes_total line one\\nback\\\\slash\n",
            "escapes_total{v=\"quote\\\" backslash\\\\ newline\\n\"} 1\n",
            "# TYPE target_info gauge\ntarget_info{deployment_environment=\"test\"} 1\n",
        ];
        for want in expect {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("service_name"), "service.name belongs to job, not target_info:\n{text}");
        // Each family's HELP and TYPE appear once, and every non-comment line is `name{..} value`.
        assert_eq!(text.matches("# TYPE llmesh_cache_requests_total ").count(), 1);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("sample line");
            assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{line}");
        }
        let _ = provider.shutdown();
    }

    #[test]
    fn seed_and_process_metrics_keep_their_exact_names() {
        let (provider, reader) = provider();
        let meter = provider.meter("llmesh");
        let seed = SeedMetrics::new(&meter);
        assert!(reader.render().contains("llm_active_requests 0\n"), "present before any call");
        let _process = crate::metrics::register_process_metrics(&meter);
        seed.record("Generate", tonic::Code::Ok, Duration::from_millis(300));
        seed.record("Generate", tonic::Code::InvalidArgument, Duration::from_millis(50));
        let mut in_flight = seed.start("Generate");

        let text = reader.render();
        let expect = [
            "# TYPE llm_requests_total counter\n",
            "llm_requests_total{endpoint=\"Generate\",status=\"OK\"} 1\n",
            "llm_requests_total{endpoint=\"Generate\",status=\"INVALID_ARGUMENT\"} 1\n",
            "# TYPE llm_response_time histogram\n",
            "llm_response_time_bucket{endpoint=\"Generate\",le=\"0.1\"} 1\n",
            "llm_response_time_bucket{endpoint=\"Generate\",le=\"0.5\"} 2\n",
            "llm_response_time_bucket{endpoint=\"Generate\",le=\"1\"} 2\n",
            "llm_response_time_bucket{endpoint=\"Generate\",le=\"2\"} 2\n",
            "llm_response_time_bucket{endpoint=\"Generate\",le=\"5\"} 2\n",
            "llm_response_time_bucket{endpoint=\"Generate\",le=\"+Inf\"} 2\n",
            "llm_response_time_count{endpoint=\"Generate\"} 2\n",
            "# TYPE llm_active_requests gauge\nllm_active_requests 1\n",
            "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total ",
            "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes ",
            "# TYPE process_open_fds gauge\nprocess_open_fds ",
            "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds ",
        ];
        for want in expect {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(text.contains("llm_response_time_sum{endpoint=\"Generate\"} 0.35"), "{text}");

        in_flight.finish(tonic::Code::Ok);
        assert!(reader.render().contains("llm_active_requests 0\n"));
        let _ = provider.shutdown();
        // After shutdown the reader renders nothing rather than failing.
        assert_eq!(reader.render(), "");
    }
}

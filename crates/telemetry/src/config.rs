//! Telemetry settings, resolved once from the standard OpenTelemetry environment variables.
//!
//! Everything that reads the environment lives in [`TelemetryConfig::from_lookup`], so tests can
//! build a config from a map (or by hand) and never touch the process environment.

use std::time::Duration;

use opentelemetry_sdk::trace::Sampler;

/// The default sampler argument for the ratio samplers when `OTEL_TRACES_SAMPLER_ARG` is missing.
const DEFAULT_RATIO: f64 = 1.0;

/// The spec's default `OTEL_METRIC_EXPORT_INTERVAL` (60 s).
const DEFAULT_METRIC_EXPORT_INTERVAL: Duration = Duration::from_secs(60);

/// How the stderr log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable text; ANSI colours only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line, with `trace_id` / `span_id` of the current span.
    Json,
}

/// `OTEL_TRACES_SAMPLER` (+ `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum SamplerConfig {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    /// The spec's default: follow the caller's decision, sample every root.
    #[default]
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

impl SamplerConfig {
    /// Parses the spec's sampler names; `None` for an unknown name.
    pub fn parse(name: &str, arg: Option<&str>) -> Option<Self> {
        let ratio = || arg.and_then(|a| a.trim().parse::<f64>().ok()).filter(|r| (0.0..=1.0).contains(r));
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "always_on" => Self::AlwaysOn,
            "always_off" => Self::AlwaysOff,
            "traceidratio" => Self::TraceIdRatio(ratio().unwrap_or(DEFAULT_RATIO)),
            "parentbased_always_on" => Self::ParentBasedAlwaysOn,
            "parentbased_always_off" => Self::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => Self::ParentBasedTraceIdRatio(ratio().unwrap_or(DEFAULT_RATIO)),
            _ => return None,
        })
    }

    /// The SDK sampler.
    pub fn to_sampler(self) -> Sampler {
        match self {
            Self::AlwaysOn => Sampler::AlwaysOn,
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
            Self::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            Self::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Self::ParentBasedTraceIdRatio(r) => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r))),
        }
    }
}

/// Everything `init` needs, resolved from the environment in one place.
///
/// An endpoint of `None` means that signal is not exported over OTLP: no exporter is built and no
/// connection is attempted. `/metrics` works regardless.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` (`OTEL_SERVICE_NAME`, else `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, else
    /// `llmesh-<service>`).
    pub service_name: String,
    /// Extra resource attributes (`OTEL_RESOURCE_ATTRIBUTES`, plus a default `service.instance.id`).
    pub resource_attributes: Vec<(String, String)>,
    /// OTLP/gRPC endpoint for traces.
    pub traces_endpoint: Option<String>,
    /// OTLP/gRPC endpoint for metrics.
    pub metrics_endpoint: Option<String>,
    /// OTLP/gRPC endpoint for logs.
    pub logs_endpoint: Option<String>,
    pub sampler: SamplerConfig,
    pub log_format: LogFormat,
    /// An `EnvFilter` directive string (`RUST_LOG`, default `info`).
    pub log_filter: String,
    /// How often the OTLP metrics exporter pushes (`OTEL_METRIC_EXPORT_INTERVAL`, ms).
    pub metric_export_interval: Duration,
    /// Problems found while reading the environment (bad values are ignored, as the spec asks);
    /// `init` logs them once the subscriber is up.
    pub warnings: Vec<String>,
}

impl TelemetryConfig {
    /// Defaults for `service` with every OTLP signal off.
    pub fn new(service: &str) -> Self {
        Self {
            service_name: default_service_name(service),
            resource_attributes: Vec::new(),
            traces_endpoint: None,
            metrics_endpoint: None,
            logs_endpoint: None,
            sampler: SamplerConfig::default(),
            log_format: LogFormat::Text,
            log_filter: "info".to_owned(),
            metric_export_interval: DEFAULT_METRIC_EXPORT_INTERVAL,
            warnings: Vec::new(),
        }
    }

    /// Sends all three signals to `endpoint` (e.g. `http://127.0.0.1:4317`).
    pub fn with_otlp_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        let endpoint = endpoint.into();
        self.traces_endpoint = Some(endpoint.clone());
        self.metrics_endpoint = Some(endpoint.clone());
        self.logs_endpoint = Some(endpoint);
        self
    }

    /// The sampler spans really get: the configured one when traces are exported; without a
    /// traces endpoint every span is dropped, unrecorded (its ids still exist, for the trace ids
    /// in logs and for propagation), since a recorded span would go nowhere.
    pub fn effective_sampler(&self) -> SamplerConfig {
        if self.traces_endpoint.is_some() { self.sampler } else { SamplerConfig::AlwaysOff }
    }

    /// Whether any signal is exported over OTLP.
    pub fn otlp_enabled(&self) -> bool {
        self.traces_endpoint.is_some() || self.metrics_endpoint.is_some() || self.logs_endpoint.is_some()
    }

    /// Reads the process environment.
    pub fn from_env(service: &str) -> Self {
        Self::from_lookup(service, |key| std::env::var(key).ok())
    }

    /// Resolves the config from `lookup` (an environment stand-in).
    ///
    /// Honoured: `OTEL_SDK_DISABLED`, `OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// `OTEL_EXPORTER_OTLP_{TRACES,METRICS,LOGS}_ENDPOINT`, `OTEL_{TRACES,METRICS,LOGS}_EXPORTER`
    /// (`otlp` default, `none` turns the signal off), `OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`,
    /// `OTEL_METRIC_EXPORT_INTERVAL`, `RUST_LOG`, `LLMESH_LOG_FORMAT` (`text` | `json`), `HOSTNAME`.
    /// The exporters themselves also read `OTEL_EXPORTER_OTLP_*_{HEADERS,TIMEOUT,COMPRESSION,INSECURE}`
    /// and the batch processors `OTEL_BSP_*` / `OTEL_BLRP_*`.
    pub fn from_lookup(service: &str, lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |key: &str| lookup(key).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let mut config = Self::new(service);

        // Resource.
        if let Some(raw) = get("OTEL_RESOURCE_ATTRIBUTES") {
            config.resource_attributes = parse_resource_attributes(&raw, &mut config.warnings);
        }
        let attr_service_name = config
            .resource_attributes
            .iter()
            .find(|(k, _)| k == "service.name")
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty());
        config.resource_attributes.retain(|(k, _)| k != "service.name");
        if let Some(name) = get("OTEL_SERVICE_NAME").or(attr_service_name) {
            config.service_name = name;
        }
        if !config.resource_attributes.iter().any(|(k, _)| k == "service.instance.id") {
            let host = get("HOSTNAME").or_else(read_hostname).unwrap_or_else(|| "localhost".to_owned());
            config
                .resource_attributes
                .push(("service.instance.id".to_owned(), format!("{host}:{}", std::process::id())));
        }

        // Endpoints, per signal.
        let disabled = get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let general = get("OTEL_EXPORTER_OTLP_ENDPOINT");
        let mut endpoint_for = |signal: &str| -> Option<String> {
            if disabled {
                return None;
            }
            let exporter_var = format!("OTEL_{signal}_EXPORTER");
            let exporters = get(&exporter_var).unwrap_or_else(|| "otlp".to_owned());
            let mut otlp = false;
            for name in exporters.split(',').map(|s| s.trim().to_ascii_lowercase()) {
                match name.as_str() {
                    "otlp" => otlp = true,
                    "none" => return None,
                    // `/metrics` is always served; `prometheus` only means "no OTLP push".
                    "prometheus" if signal == "METRICS" => {}
                    other => config.warnings.push(format!("{exporter_var}: unsupported exporter {other:?} ignored")),
                }
            }
            if !otlp {
                return None;
            }
            get(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")).or_else(|| general.clone())
        };
        let traces = endpoint_for("TRACES");
        let metrics = endpoint_for("METRICS");
        let logs = endpoint_for("LOGS");
        config.traces_endpoint = traces;
        config.metrics_endpoint = metrics;
        config.logs_endpoint = logs;

        // Sampler.
        if let Some(name) = get("OTEL_TRACES_SAMPLER") {
            let arg = get("OTEL_TRACES_SAMPLER_ARG");
            match SamplerConfig::parse(&name, arg.as_deref()) {
                Some(sampler) => config.sampler = sampler,
                None => config
                    .warnings
                    .push(format!("OTEL_TRACES_SAMPLER: unsupported sampler {name:?}; using parentbased_always_on")),
            }
        }

        // Metric push interval.
        if let Some(raw) = get("OTEL_METRIC_EXPORT_INTERVAL") {
            match raw.parse::<u64>() {
                Ok(ms) if ms > 0 => config.metric_export_interval = Duration::from_millis(ms),
                _ => config.warnings.push(format!("OTEL_METRIC_EXPORT_INTERVAL: invalid value {raw:?} ignored")),
            }
        }

        // Logging.
        if let Some(filter) = get("RUST_LOG") {
            config.log_filter = filter;
        }
        match get("LLMESH_LOG_FORMAT").map(|f| f.to_ascii_lowercase()).as_deref() {
            None | Some("text") => {}
            Some("json") => config.log_format = LogFormat::Json,
            Some(other) => config.warnings.push(format!("LLMESH_LOG_FORMAT: unknown format {other:?}; using text")),
        }
        config
    }
}

fn default_service_name(service: &str) -> String {
    if service.starts_with("llmesh") { service.to_owned() } else { format!("llmesh-{service}") }
}

fn read_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty())
}

/// `key1=value1,key2=value2`, values percent-decoded (W3C Baggage octet rules, as the spec says).
fn parse_resource_attributes(raw: &str, warnings: &mut Vec<String>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((key, value)) = entry.split_once('=') else {
            warnings.push(format!("OTEL_RESOURCE_ATTRIBUTES: entry {entry:?} has no '=' and is ignored"));
            continue;
        };
        let key = key.trim();
        if key.is_empty() {
            warnings.push(format!("OTEL_RESOURCE_ATTRIBUTES: entry {entry:?} has an empty key and is ignored"));
            continue;
        }
        let value = percent_decode(value.trim());
        match out.iter_mut().find(|(k, _)| k == key) {
            Some(existing) => existing.1 = value,
            None => out.push((key.to_owned(), value)),
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> TelemetryConfig {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        TelemetryConfig::from_lookup("gateway", |k| map.get(k).cloned())
    }

    #[test]
    fn defaults_have_no_otlp() {
        let c = config(&[]);
        assert_eq!(c.service_name, "llmesh-gateway");
        assert!(!c.otlp_enabled());
        assert_eq!(c.sampler, SamplerConfig::ParentBasedAlwaysOn);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.log_filter, "info");
        assert!(c.resource_attributes.iter().any(|(k, _)| k == "service.instance.id"));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn endpoints_per_signal_and_none() {
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://tempo:4317"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ]);
        assert_eq!(c.traces_endpoint.as_deref(), Some("http://tempo:4317"));
        assert_eq!(c.metrics_endpoint, None);
        assert_eq!(c.logs_endpoint.as_deref(), Some("http://collector:4317"));

        let only_traces = config(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://tempo:4317")]);
        assert!(only_traces.traces_endpoint.is_some());
        assert!(only_traces.metrics_endpoint.is_none() && only_traces.logs_endpoint.is_none());

        let disabled =
            config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"), ("OTEL_SDK_DISABLED", "true")]);
        assert!(!disabled.otlp_enabled());
    }

    #[test]
    fn service_name_and_resource_attributes() {
        let c = config(&[("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs,deployment.environment=prod%20eu,bad")]);
        assert_eq!(c.service_name, "from-attrs");
        assert!(c.resource_attributes.contains(&("deployment.environment".to_owned(), "prod eu".to_owned())));
        assert!(!c.resource_attributes.iter().any(|(k, _)| k == "service.name"));
        assert_eq!(c.warnings.len(), 1);

        let c = config(&[
            ("OTEL_SERVICE_NAME", "explicit"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs,service.instance.id=pod-1"),
        ]);
        assert_eq!(c.service_name, "explicit");
        assert!(c.resource_attributes.contains(&("service.instance.id".to_owned(), "pod-1".to_owned())));
    }

    #[test]
    fn samplers() {
        let s = |name: &str, arg: Option<&str>| SamplerConfig::parse(name, arg);
        assert_eq!(s("always_on", None), Some(SamplerConfig::AlwaysOn));
        assert_eq!(s("always_off", None), Some(SamplerConfig::AlwaysOff));
        assert_eq!(s("traceidratio", Some("0.25")), Some(SamplerConfig::TraceIdRatio(0.25)));
        assert_eq!(s("traceidratio", Some("7")), Some(SamplerConfig::TraceIdRatio(1.0)));
        assert_eq!(s("parentbased_traceidratio", Some("0.5")), Some(SamplerConfig::ParentBasedTraceIdRatio(0.5)));
        assert_eq!(s("parentbased_always_on", None), Some(SamplerConfig::ParentBasedAlwaysOn));
        assert_eq!(s("parentbased_always_off", None), Some(SamplerConfig::ParentBasedAlwaysOff));
        assert_eq!(s("jaeger_remote", None), None);

        let c = config(&[("OTEL_TRACES_SAMPLER", "bogus")]);
        assert_eq!(c.sampler, SamplerConfig::ParentBasedAlwaysOn);
        assert_eq!(c.warnings.len(), 1);

        // Spans are only recorded when they are exported.
        let c = config(&[("OTEL_TRACES_SAMPLER", "always_on")]);
        assert_eq!(c.effective_sampler(), SamplerConfig::AlwaysOff);
        assert_eq!(c.with_otlp_endpoint("http://collector:4317").effective_sampler(), SamplerConfig::AlwaysOn);
    }

    #[test]
    fn logging_and_interval() {
        let c = config(&[
            ("LLMESH_LOG_FORMAT", "JSON"),
            ("RUST_LOG", "debug,h2=warn"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "15000"),
        ]);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.log_filter, "debug,h2=warn");
        assert_eq!(c.metric_export_interval, Duration::from_secs(15));
    }
}

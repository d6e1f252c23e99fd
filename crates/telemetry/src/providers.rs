//! Building the OpenTelemetry providers from a [`TelemetryConfig`], installing them globally, and
//! shutting them down.

use std::io::IsTerminal as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::resource::TelemetryResourceDetector;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracer, SdkTracerProvider};
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{SamplerConfig, TelemetryConfig};
use crate::metrics::{METER_NAME, ProcessMetrics, register_process_metrics};
use crate::prometheus::PrometheusReader;

/// How long [`Telemetry::shutdown`] waits for the exporters to flush.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// The instrumentation scope of llmesh's spans.
const TRACER_NAME: &str = "llmesh";

/// The providers one process uses. `init` builds them from the environment and installs them
/// globally; tests build them from a config pointing at their own receiver.
#[derive(Debug)]
pub struct Providers {
    /// Always present: it gives spans their ids (log correlation, propagation) even when it has no
    /// exporter.
    pub tracer_provider: SdkTracerProvider,
    /// Always present, with the `/metrics` reader and, when configured, a periodic OTLP reader.
    pub meter_provider: SdkMeterProvider,
    /// Present only when OTLP logs are configured.
    pub logger_provider: Option<SdkLoggerProvider>,
    /// The pull reader behind `/metrics`.
    pub prometheus: PrometheusReader,
    pub resource: Resource,
}

impl Providers {
    /// Builds the providers. Exporters are gRPC (tonic) with batch processors that drop on a full
    /// queue; a collector that is down costs a background thread's time, never a request's. With no
    /// endpoint configured nothing is exported and nothing connects.
    ///
    /// Needs a Tokio runtime when any endpoint is set (the gRPC channel's worker runs on it).
    pub fn build(config: &TelemetryConfig) -> anyhow::Result<Self> {
        if config.otlp_enabled() && tokio::runtime::Handle::try_current().is_err() {
            anyhow::bail!("OTLP export needs a Tokio runtime: call init from within the runtime");
        }
        let resource = resource(config);

        let mut tracer_builder = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_sampler(config.effective_sampler().to_sampler());
        if let Some(endpoint) = &config.traces_endpoint {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .with_context(|| format!("building the OTLP span exporter for {endpoint}"))?;
            tracer_builder = tracer_builder.with_span_processor(BatchSpanProcessor::builder(exporter).build());
        }
        let tracer_provider = tracer_builder.build();

        let prometheus = PrometheusReader::new();
        let mut meter_builder =
            SdkMeterProvider::builder().with_resource(resource.clone()).with_reader(prometheus.clone());
        if let Some(endpoint) = &config.metrics_endpoint {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .with_context(|| format!("building the OTLP metric exporter for {endpoint}"))?;
            meter_builder = meter_builder
                .with_reader(PeriodicReader::builder(exporter).with_interval(config.metric_export_interval).build());
        }
        let meter_provider = meter_builder.build();

        let logger_provider = match &config.logs_endpoint {
            Some(endpoint) => {
                let exporter = opentelemetry_otlp::LogExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .build()
                    .with_context(|| format!("building the OTLP log exporter for {endpoint}"))?;
                Some(SdkLoggerProvider::builder().with_resource(resource.clone()).with_batch_exporter(exporter).build())
            }
            None => None,
        };

        Ok(Self { tracer_provider, meter_provider, logger_provider, prometheus, resource })
    }

    /// The tracer the tracing-opentelemetry layer uses.
    pub fn tracer(&self) -> SdkTracer {
        self.tracer_provider.tracer(TRACER_NAME)
    }

    /// The `llmesh` meter of this provider (not the global one).
    pub fn meter(&self) -> Meter {
        self.meter_provider.meter(METER_NAME)
    }

    /// Flushes and shuts every provider down, waiting at most `timeout` in total. The SDK's
    /// shutdown calls block, so they run on a separate thread; if the collector does not answer in
    /// time the thread is left to finish on its own.
    pub async fn shutdown(self, timeout: Duration) {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("telemetry-shutdown".into()).spawn(move || {
            let mut errors = Vec::new();
            if let Err(err) = self.tracer_provider.shutdown_with_timeout(timeout) {
                errors.push(format!("traces: {err}"));
            }
            if let Some(logger_provider) = &self.logger_provider
                && let Err(err) = logger_provider.shutdown_with_timeout(timeout)
            {
                errors.push(format!("logs: {err}"));
            }
            if let Err(err) = self.meter_provider.shutdown_with_timeout(timeout) {
                errors.push(format!("metrics: {err}"));
            }
            let _ = done_tx.send(errors);
        });
        if spawned.is_err() {
            tracing::warn!("could not start the telemetry shutdown thread; telemetry not flushed");
            return;
        }
        match tokio::time::timeout(timeout, done_rx).await {
            Ok(Ok(errors)) if errors.is_empty() => {}
            Ok(Ok(errors)) => tracing::debug!(?errors, "telemetry shutdown reported errors"),
            Ok(Err(_)) => tracing::debug!("telemetry shutdown thread ended without a report"),
            Err(_) => {
                tracing::warn!(timeout_ms = timeout.as_millis() as u64, "telemetry flush timed out; data dropped")
            }
        }
    }
}

fn resource(config: &TelemetryConfig) -> Resource {
    Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attributes(config.resource_attributes.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())))
        .with_service_name(config.service_name.clone())
        .build()
}

static INITIALISED: AtomicBool = AtomicBool::new(false);
static GLOBAL_PROMETHEUS: OnceLock<PrometheusReader> = OnceLock::new();

/// What [`init`] installed. Keep it for the life of the process and call
/// [`Telemetry::shutdown`] on the way out to flush the exporters.
#[derive(Debug)]
pub struct Telemetry {
    inner: Option<(Providers, ProcessMetrics)>,
}

impl Telemetry {
    /// `false` for the inert value a second `init` returns.
    pub fn is_active(&self) -> bool {
        self.inner.is_some()
    }

    /// The `/metrics` reader (also reachable through [`render_prometheus`]).
    pub fn prometheus(&self) -> Option<&PrometheusReader> {
        self.inner.as_ref().map(|(p, _)| &p.prometheus)
    }

    /// Flushes the exporters and shuts the providers down, waiting at most [`SHUTDOWN_TIMEOUT`].
    pub async fn shutdown(self) {
        if let Some((providers, _process)) = self.inner {
            providers.shutdown(SHUTDOWN_TIMEOUT).await;
        }
    }
}

/// Sets up telemetry for `service` (`gateway`, `generation`, `cache`, `health`) from the
/// environment; see [`TelemetryConfig::from_lookup`] for the variables. Call it once, early, inside
/// the Tokio runtime.
///
/// Installs: the global `tracing` subscriber (see [`crate::build_subscriber`]), the W3C
/// TraceContext propagator, the global tracer provider, the global meter provider (read by
/// `/metrics`, plus an OTLP push when configured) and the process metrics.
///
/// A second call in the same process (tests running several services) changes nothing and returns
/// an inert [`Telemetry`]. If another `tracing` subscriber is already global, it is kept (with a
/// warning) and the rest is installed.
///
/// Errors: an OTLP endpoint the exporter cannot use (e.g. `https://` — no TLS is compiled in), or
/// an endpoint set outside a Tokio runtime.
pub fn init(service: &str) -> anyhow::Result<Telemetry> {
    init_with_config(TelemetryConfig::from_env(service))
}

/// [`init`] with an explicit config.
pub fn init_with_config(config: TelemetryConfig) -> anyhow::Result<Telemetry> {
    if INITIALISED.swap(true, Ordering::SeqCst) {
        tracing::debug!(service = %config.service_name, "telemetry already initialised; keeping the first setup");
        return Ok(Telemetry { inner: None });
    }
    let providers = match Providers::build(&config) {
        Ok(providers) => providers,
        Err(err) => {
            // Nothing global was touched: a later call may try again.
            INITIALISED.store(false, Ordering::SeqCst);
            return Err(err);
        }
    };

    let (subscriber, filter_warning) = crate::logging::build_subscriber(
        &config,
        providers.tracer(),
        providers.logger_provider.as_ref(),
        std::io::stderr,
        std::io::stderr().is_terminal(),
    );
    let subscriber_result = subscriber.try_init();

    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(providers.tracer_provider.clone());
    opentelemetry::global::set_meter_provider(providers.meter_provider.clone());
    let _ = GLOBAL_PROMETHEUS.set(providers.prometheus.clone());
    let process = register_process_metrics(&providers.meter());

    // With no span sampled, calls that bring no trace context need none (see `server`): unless
    // another subscriber was already installed, which may want them.
    if subscriber_result.is_ok() {
        crate::server::set_sampling(config.effective_sampler() != SamplerConfig::AlwaysOff);
    }
    if let Err(err) = subscriber_result {
        tracing::warn!(error = %err, "a tracing subscriber was already installed; keeping it (log settings ignored)");
    }
    for warning in config.warnings.iter().chain(filter_warning.iter()) {
        tracing::warn!("{warning}");
    }
    let show = |endpoint: &Option<String>| endpoint.clone().unwrap_or_else(|| "off".to_owned());
    tracing::info!(
        service.name = %config.service_name,
        otlp.traces = %show(&config.traces_endpoint),
        otlp.metrics = %show(&config.metrics_endpoint),
        otlp.logs = %show(&config.logs_endpoint),
        sampler = ?config.effective_sampler(),
        "telemetry initialised"
    );
    Ok(Telemetry { inner: Some((providers, process)) })
}

/// The Prometheus text exposition of the global meter provider (empty before [`init`]).
pub fn render_prometheus() -> String {
    GLOBAL_PROMETHEUS.get().map(PrometheusReader::render).unwrap_or_default()
}

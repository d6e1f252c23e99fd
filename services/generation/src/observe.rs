//! What a generation looks like from outside: an OpenTelemetry GenAI span (`chat {model}`) and the
//! GenAI metrics (operation duration, token usage, time to first token, time per output token).
//! One adapter over the provider's events serves unary and streaming calls alike. Prompts and
//! completions never go on spans or logs; of tool calls only their number
//! (`llmesh.response.tool_calls`, beside `gen_ai.response.finish_reasons`), never names or
//! arguments.
//!
//! Metric labels are built once per model at start-up ([`ModelLabels`]): the model label is a
//! configured model's name, or `sim-flaky` for the whole `sim-flaky-N` family, never a name a
//! client made up (unknown models are refused before they get here).

use std::{sync::Arc, time::Instant};

use futures::StreamExt as _;
use opentelemetry::{
    KeyValue,
    metrics::{Histogram, Meter},
};
use tracing::field::Empty;

use crate::provider::{Event, EventStream};

/// GenAI latency buckets, in seconds (the semantic conventions' advice).
const DURATION_BUCKETS: &[f64] =
    &[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];
const TOKEN_BUCKETS: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0];

#[derive(Debug)]
pub struct GenAiMetrics {
    duration: Histogram<f64>,
    tokens: Histogram<u64>,
    time_to_first_token: Histogram<f64>,
    time_per_output_token: Histogram<f64>,
}

impl GenAiMetrics {
    pub fn new(meter: &Meter) -> Self {
        Self {
            duration: meter
                .f64_histogram("gen_ai.client.operation.duration")
                .with_unit("s")
                .with_description("GenAI operation duration")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            tokens: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Tokens used per operation, by type")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            time_to_first_token: meter
                .f64_histogram("gen_ai.server.time_to_first_token")
                .with_unit("s")
                .with_description("Time to the first output token")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            time_per_output_token: meter
                .f64_histogram("gen_ai.server.time_per_output_token")
                .with_unit("s")
                .with_description("Time per output token after the first")
                .with_boundaries(vec![0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
                .build(),
        }
    }
}

/// The label sets of one model's metrics.
#[derive(Debug)]
pub struct ModelLabels {
    base: Vec<KeyValue>,
    input: Vec<KeyValue>,
    output: Vec<KeyValue>,
}

impl ModelLabels {
    /// `model` must come from a known set (see the module doc).
    pub fn new(model: &str, provider: &'static str) -> Arc<Self> {
        let base = vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.request.model", model.to_string()),
            KeyValue::new("gen_ai.provider.name", provider),
        ];
        let with_type = |kind: &'static str| {
            let mut labels = base.clone();
            labels.push(KeyValue::new("gen_ai.token.type", kind));
            labels
        };
        let (input, output) = (with_type("input"), with_type("output"));
        Arc::new(Self { base, input, output })
    }
}

/// What a generation is about, for its span and metrics.
pub struct Call<'a> {
    pub id: &'a str,
    /// The model's name as requested (a known one: the span is per call, not a metric).
    pub model: &'a str,
    pub provider: &'static str,
    pub max_tokens: u32,
    pub labels: Arc<ModelLabels>,
}

/// Wraps `events` so that its span and metrics are recorded as it runs.
pub fn observe(events: EventStream, metrics: Arc<GenAiMetrics>, call: Call<'_>) -> EventStream {
    // A call without a span (nothing samples it and its caller sent no trace context, see
    // `llmesh_telemetry::GrpcTraceLayer`; or spans filtered out) gets none here either: it would
    // be dropped unread, after formatting its fields.
    let in_a_span = tracing::dispatcher::get_default(|dispatch| dispatch.current_span().id().is_some());
    // Counts are recorded as i64: tracing-opentelemetry exports unsigned integers as text, and a
    // backend compares text as text (`gen_ai.usage.output_tokens > 100` would not match).
    let span = if !in_a_span {
        tracing::Span::none()
    } else {
        tracing::info_span!(
        "gen_ai.chat",
        otel.name = %format!("chat {}", call.model),
        otel.kind = "client",
        gen_ai.operation.name = "chat",
        gen_ai.request.model = %call.model,
        gen_ai.provider.name = call.provider,
        gen_ai.request.max_tokens = i64::from(call.max_tokens),
        gen_ai.response.id = %call.id,
        gen_ai.response.finish_reasons = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        llmesh.response.tool_calls = Empty,
        error.type = Empty,
        otel.status_code = Empty,
        )
    };
    let labels = call.labels;
    let started = Instant::now();
    let mut first_token: Option<Instant> = None;
    // Calls are counted by their first delta's index: one more than the highest seen.
    let mut tool_calls: u32 = 0;
    let observed = events.map(move |event| {
        if let Ok(Event::ToolCall(delta)) = &event {
            tool_calls = tool_calls.max(delta.index.saturating_add(1));
        }
        match &event {
            Ok(Event::Delta(_) | Event::ToolCall(_) | Event::Reasoning(_)) => {
                if first_token.is_none() {
                    first_token = Some(Instant::now());
                    metrics.time_to_first_token.record(started.elapsed().as_secs_f64(), &labels.base);
                }
            }
            Ok(Event::Finish { reason, usage }) => {
                let now = Instant::now();
                metrics.duration.record(started.elapsed().as_secs_f64(), &labels.base);
                metrics.tokens.record(u64::from(usage.prompt_tokens), &labels.input);
                metrics.tokens.record(u64::from(usage.completion_tokens), &labels.output);
                if let Some(first) = first_token
                    && usage.completion_tokens > 1
                {
                    let per_token = now.duration_since(first).as_secs_f64() / f64::from(usage.completion_tokens - 1);
                    metrics.time_per_output_token.record(per_token, &labels.base);
                }
                span.record("gen_ai.response.finish_reasons", reason.as_str_name());
                span.record("gen_ai.usage.input_tokens", i64::from(usage.prompt_tokens));
                span.record("gen_ai.usage.output_tokens", i64::from(usage.completion_tokens));
                span.record("llmesh.response.tool_calls", i64::from(tool_calls));
            }
            Ok(Event::Extensions(_)) => {}
            Err(error) => {
                let kind = llmesh_telemetry::code_name(error.code());
                let mut with_error = labels.base.clone();
                with_error.push(KeyValue::new("error.type", kind));
                metrics.duration.record(started.elapsed().as_secs_f64(), &with_error);
                span.record("error.type", kind);
                // The span's status, not only its attribute: what Jaeger's `error=true` and
                // Tempo's `status = error` search by.
                span.record("otel.status_code", "error");
            }
        }
        event
    });
    Box::pin(observed)
}

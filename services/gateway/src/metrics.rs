//! The gateway's own instruments (docs/METRICS.md): cache, fallbacks, retries, breakers,
//! replicas, tokens and cost per key, spend budgets per key and team, rate limits, shedding, and
//! its own overhead. Created once,
//! on first use, from the global meter provider that telemetry installs at start-up.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock, RwLock},
};

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Gauge, Histogram},
};

#[derive(Debug)]
pub struct GatewayMetrics {
    /// `result`: hit, miss, error, timeout, bypass.
    pub cache_requests: Counter<u64>,
    /// `result`: stored, refused, failed, timeout, dropped.
    pub cache_stores: Counter<u64>,
    /// `reason`: ended (the feed ended or failed), silent (no message for 3 s).
    pub near_cache_resets: Counter<u64>,
    /// `reason`, `source`.
    pub fallbacks: Counter<u64>,
    /// `endpoint` (RPC method), `reason` (gRPC code name).
    pub retries: Counter<u64>,
    pub retry_budget_exhausted: Counter<u64>,
    /// `endpoint` (replica address), `to`.
    pub breaker_transitions: Counter<u64>,
    /// `api_key`, `model`, `type` (input, output).
    pub tokens: Counter<u64>,
    /// `api_key`, `model`.
    pub cost_usd: Counter<f64>,
    /// `api_key`, `result` (allowed, rejected), `limiter` (redis, local).
    pub ratelimit_decisions: Counter<u64>,
    /// `api_key`, `kind` (requests, tokens).
    pub ratelimit_remaining_ratio: Gauge<f64>,
    // The budget gauges (`llmesh.budget.spent_usd`, `remaining_usd`, `limit_usd`) are observed at
    // collection from what the budgets keep (`crate::gauges`).
    /// `scope`, `name`: calls refused for that budget.
    pub budget_refusals: Counter<u64>,
    /// `store` (redis, local): budget reservations and settlements, by who decided.
    pub budget_decisions: Counter<u64>,
    /// `endpoint`.
    pub overhead: Histogram<f64>,
}

/// The instruments.
pub fn metrics() -> &'static GatewayMetrics {
    static METRICS: OnceLock<GatewayMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = llmesh_telemetry::meter();
        GatewayMetrics {
            cache_requests: meter
                .u64_counter("llmesh.cache.requests")
                .with_description("Cache lookups by result")
                .build(),
            cache_stores: meter
                .u64_counter("llmesh.cache.stores")
                .with_description("Answers the gateway sent to the cache service to keep, by result")
                .build(),
            near_cache_resets: meter
                .u64_counter("llmesh.cache.near.resets")
                .with_description("Times the near cache dropped its copies because its change feed ended")
                .build(),
            fallbacks: meter.u64_counter("llmesh.fallbacks").with_description("Degraded answers given").build(),
            retries: meter.u64_counter("llmesh.retries").with_description("Retry attempts made").build(),
            retry_budget_exhausted: meter
                .u64_counter("llmesh.retry_budget_exhausted")
                .with_description("Retries refused by the budget")
                .build(),
            breaker_transitions: meter
                .u64_counter("llmesh.breaker.transitions")
                .with_description("Circuit breaker state changes")
                .build(),
            tokens: meter.u64_counter("llmesh.tokens").with_description("Tokens used, per key and model").build(),
            cost_usd: meter
                .f64_counter("llmesh.cost_usd")
                .with_description("Tokens times the configured price")
                .build(),
            ratelimit_decisions: meter
                .u64_counter("llmesh.ratelimit.decisions")
                .with_description("Rate-limit decisions")
                .build(),
            ratelimit_remaining_ratio: meter
                .f64_gauge("llmesh.ratelimit.remaining_ratio")
                .with_description("Share of the per-minute quota left")
                .build(),
            budget_refusals: meter
                .u64_counter("llmesh.budget.refusals")
                .with_description("Calls refused because a key's or a team's budget was spent")
                .build(),
            budget_decisions: meter
                .u64_counter("llmesh.budget.decisions")
                .with_description("Budget reservations and settlements, by where they were decided")
                .build(),
            overhead: meter
                .f64_histogram("llmesh.gateway.overhead")
                .with_unit("s")
                .with_description("Time spent in the gateway itself (total minus upstream)")
                .with_boundaries(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1])
                .build(),
        }
    })
}

pub fn label(key: &'static str, value: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(key, value)
}

/// One label's values built once per name and then shared: a call clones one (a reference count),
/// never formats or allocates it. Bounded, as every label from a caller must be: past `capacity`
/// names, a name not yet kept is labelled `overflow` — one shared value, as a model nobody knows is
/// labelled `other`.
#[derive(Debug)]
pub struct Labels {
    key: &'static str,
    kept: RwLock<HashMap<Box<str>, KeyValue>>,
    capacity: usize,
    overflow: KeyValue,
}

impl Labels {
    pub fn new(key: &'static str, capacity: usize, overflow: &'static str) -> Self {
        Self { key, kept: RwLock::default(), capacity, overflow: KeyValue::new(key, overflow) }
    }

    /// The label whose value is `name` (`overflow` once `capacity` other names are kept).
    pub fn get(&self, name: &str) -> KeyValue {
        if let Ok(kept) = self.kept.read()
            && let Some(label) = kept.get(name)
        {
            return label.clone();
        }
        let Ok(mut kept) = self.kept.write() else {
            return self.overflow.clone();
        };
        if let Some(label) = kept.get(name) {
            return label.clone();
        }
        if kept.len() >= self.capacity {
            return self.overflow.clone();
        }
        let label = KeyValue::new(self.key, Arc::<str>::from(name));
        kept.insert(name.into(), label.clone());
        label
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_built_once_and_bounded() {
        let labels = Labels::new("model", 2, "other");
        let sim = labels.get("sim");
        assert_eq!((sim.key.as_str(), sim.value.as_str().as_ref()), ("model", "sim"));
        // The same value, shared (not built again).
        let again = labels.get("sim");
        let (opentelemetry::Value::String(a), opentelemetry::Value::String(b)) = (&sim.value, &again.value) else {
            panic!("string labels")
        };
        assert!(std::ptr::eq(a.as_str(), b.as_str()), "one allocation per name");
        assert_eq!(labels.get("echo").value.as_str(), "echo");
        // Full: a new name is the overflow value; the names kept stay theirs.
        assert_eq!(labels.get("made-up").value.as_str(), "other");
        assert_eq!(labels.get("another").value.as_str(), "other");
        assert_eq!(labels.get("sim").value.as_str(), "sim");
        assert_eq!(labels.kept.read().unwrap().len(), 2);
    }
}

//! What the status page shows, derived from the services' scraped metrics.
//!
//! Each round of scrapes ([`Deriver::round`]) gives one [`Point`] for the 15-minute charts and the
//! current figures per model, replica breaker and budget ([`Current`]). Rates and latency
//! quantiles are over the last [`WINDOW`] rounds: counters are differenced per source (a source
//! that restarted, or was not scraped, adds nothing rather than a negative rate), histograms'
//! buckets likewise, and quantiles interpolated within a bucket as PromQL's `histogram_quantile`.
//!
//! Which service's metrics count: the caller's view is the gateway's (`llm_requests_total`,
//! cache lookups, rate limits, shedding, budgets, breakers); the model calls (the GenAI client
//! duration per model) and the queue's depth are generation's. Labels come from known sets in the services; the page still
//! keeps at most [`MAX_ROWS`] models, replicas and budgets.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use super::exposition::Sample;

/// Rounds that rates and quantiles are taken over.
pub const WINDOW: usize = 5;
/// Most rows in each table of the page.
pub const MAX_ROWS: usize = 64;

/// One scrape of one source: its service's name and the samples, or `None` when it failed.
#[derive(Debug)]
pub struct Scrape {
    pub source: usize,
    pub service: String,
    pub samples: Option<Vec<Sample>>,
}

/// One round's figures for the charts. Rates are per second; ratios 0 to 1; `None` where there
/// was nothing to measure (no calls, no lookups).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Point {
    pub seq: u64,
    pub t_ms: i64,
    pub requests_per_s: f64,
    pub error_ratio: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub cache_hit_ratio: Option<f64>,
    pub near_hit_ratio: Option<f64>,
    pub service_hit_ratio: Option<f64>,
    pub ratelimit_allowed_per_s: f64,
    pub ratelimit_rejected_per_s: f64,
    pub ratelimit_local_per_s: f64,
    pub shed_per_s: f64,
    pub fallbacks_per_s: f64,
    pub queued: f64,
    pub dead_letters: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelRow {
    pub model: String,
    pub calls_per_s: f64,
    pub error_ratio: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The worst state of its breakers over the replicas: `closed`, `half_open`, `open`.
    pub breaker: &'static str,
    /// The providers (deployments) generation called for it.
    pub providers: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReplicaRow {
    pub endpoint: String,
    pub breaker: &'static str,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BudgetRow {
    /// `key` or `team`.
    pub scope: String,
    /// The key's public id or the team's name.
    pub name: String,
    pub spent_usd: f64,
    pub limit_usd: Option<f64>,
    pub remaining_usd: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SourceRow {
    pub service: String,
    pub up: bool,
}

/// The figures that are shown as they are now (not charted).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Current {
    pub models: Vec<ModelRow>,
    pub replicas: Vec<ReplicaRow>,
    pub budgets: Vec<BudgetRow>,
    pub sources: Vec<SourceRow>,
    pub queue: BTreeMap<String, f64>,
    pub active_requests: f64,
}

/// Counter totals of one source in one round, by a name of the deriver's own.
type Totals = BTreeMap<String, f64>;

#[derive(Debug, Default)]
pub struct Deriver {
    /// Each source's totals at its last successful scrape.
    previous: BTreeMap<usize, Totals>,
    /// The increases of the last [`WINDOW`] rounds, summed over sources, and each round's length.
    window: VecDeque<(Totals, f64)>,
    seq: u64,
}

const LATENCY: &str = "latency_le ";
const MODEL_CALLS: &str = "model_calls ";
const MODEL_ERRORS: &str = "model_errors ";
const MODEL_LE: &str = "model_le ";
/// `model_provider MODEL\tPROVIDER`: which providers serve a model.
const MODEL_PROVIDER: &str = "model_provider ";

impl Deriver {
    /// One round: `scrapes` of every source, `elapsed_s` since the previous round.
    pub fn round(&mut self, t_ms: i64, elapsed_s: f64, scrapes: &[Scrape]) -> (Point, Current) {
        let mut increase = Totals::new();
        let mut current = Current::default();
        let mut breakers: BTreeMap<(String, String), f64> = BTreeMap::new();
        let mut budgets: BTreeMap<(String, String), [Option<f64>; 3]> = BTreeMap::new();
        for scrape in scrapes {
            current.sources.push(SourceRow { service: scrape.service.clone(), up: scrape.samples.is_some() });
            let Some(samples) = &scrape.samples else { continue };
            let totals = totals(&scrape.service, samples);
            let before = self.previous.insert(scrape.source, totals.clone());
            if let Some(before) = before {
                for (name, now) in &totals {
                    let was = before.get(name).copied().unwrap_or(0.0);
                    // A counter that went down belongs to a restarted process: all of it is new.
                    let delta = if *now >= was { now - was } else { *now };
                    *increase.entry(name.clone()).or_default() += delta;
                }
            }
            gauges(&scrape.service, samples, &mut current, &mut breakers, &mut budgets);
        }
        self.window.push_back((increase, elapsed_s.max(0.001)));
        while self.window.len() > WINDOW {
            self.window.pop_front();
        }
        let mut sum = Totals::new();
        let mut seconds = 0.0;
        for (round, length) in &self.window {
            seconds += length;
            for (name, value) in round {
                *sum.entry(name.clone()).or_default() += value;
            }
        }
        let get = |name: &str| sum.get(name).copied().unwrap_or(0.0);
        let ratio = |part: f64, whole: f64| (whole > 0.0).then(|| part / whole);
        let (p50_ms, p99_ms) = quantiles(&sum, LATENCY);
        let lookups = get("cache_lookups");
        self.seq += 1;
        let point = Point {
            seq: self.seq,
            t_ms,
            requests_per_s: get("requests") / seconds,
            error_ratio: ratio(get("errors"), get("requests")),
            p50_ms,
            p99_ms,
            cache_hit_ratio: ratio(get("cache_hit_near") + get("cache_hit_service"), lookups),
            near_hit_ratio: ratio(get("cache_hit_near"), lookups),
            service_hit_ratio: ratio(get("cache_hit_service"), lookups),
            ratelimit_allowed_per_s: get("ratelimit_allowed") / seconds,
            ratelimit_rejected_per_s: get("ratelimit_rejected") / seconds,
            ratelimit_local_per_s: get("ratelimit_local") / seconds,
            shed_per_s: get("shed") / seconds,
            fallbacks_per_s: get("fallbacks") / seconds,
            queued: current.queue.get("queued").copied().unwrap_or(0.0),
            dead_letters: current.queue.get("dead_lettered").copied().unwrap_or(0.0),
        };

        let mut models: BTreeMap<String, &'static str> = BTreeMap::new();
        for ((_, model), state) in &breakers {
            if !model.is_empty() {
                let worst = models.entry(model.clone()).or_insert("closed");
                *worst = worse(worst, breaker_name(*state));
            }
        }
        for name in sum.keys().chain(self.previous.values().flat_map(|totals| totals.keys())) {
            if let Some(model) = name.strip_prefix(MODEL_CALLS) {
                models.entry(model.to_string()).or_insert("closed");
            }
        }
        current.models = models
            .into_iter()
            .take(MAX_ROWS)
            .map(|(model, breaker)| {
                let calls = get(&format!("{MODEL_CALLS}{model}"));
                let (p50_ms, p99_ms) = quantiles(&sum, &format!("{MODEL_LE}{model} "));
                let prefix = format!("{MODEL_PROVIDER}{model}\t");
                let mut providers: Vec<String> = self
                    .previous
                    .values()
                    .flat_map(|totals| totals.range(prefix.clone()..).take_while(|(name, _)| name.starts_with(&prefix)))
                    .map(|(name, _)| name[prefix.len()..].to_string())
                    .collect();
                providers.sort_unstable();
                providers.dedup();
                ModelRow {
                    providers,
                    calls_per_s: calls / seconds,
                    error_ratio: ratio(get(&format!("{MODEL_ERRORS}{model}")), calls),
                    p50_ms,
                    p99_ms,
                    breaker,
                    model,
                }
            })
            .collect();
        current.replicas = breakers
            .iter()
            .filter(|((_, model), _)| model.is_empty())
            .take(MAX_ROWS)
            .map(|((endpoint, _), state)| ReplicaRow { endpoint: endpoint.clone(), breaker: breaker_name(*state) })
            .collect();
        current.budgets = budgets
            .into_iter()
            .take(MAX_ROWS)
            .map(|((scope, name), [spent, limit, remaining])| BudgetRow {
                scope,
                name,
                spent_usd: spent.unwrap_or(0.0),
                limit_usd: limit,
                remaining_usd: remaining,
            })
            .collect();
        (point, current)
    }
}

/// The counters one source contributes, under the deriver's names.
fn totals(service: &str, samples: &[Sample]) -> Totals {
    let mut totals = Totals::new();
    let mut add = |name: String, value: f64| *totals.entry(name).or_default() += value;
    for sample in samples {
        let value = sample.value;
        match (service, sample.name.as_str()) {
            ("gateway", "llm_requests_total") => {
                add("requests".into(), value);
                if sample.label("status") != "OK" {
                    add("errors".into(), value);
                }
            }
            ("gateway", "llm_response_time_seconds_bucket" | "llm_response_time_bucket") => {
                add(format!("{LATENCY}{}", sample.label("le")), value);
            }
            ("gateway", "llmesh_cache_requests_total") => match (sample.label("result"), sample.label("tier")) {
                ("bypass", _) => {}
                ("hit", "near") => {
                    add("cache_hit_near".into(), value);
                    add("cache_lookups".into(), value);
                }
                ("hit", _) => {
                    add("cache_hit_service".into(), value);
                    add("cache_lookups".into(), value);
                }
                _ => add("cache_lookups".into(), value),
            },
            ("gateway", "llmesh_ratelimit_decisions_total") => {
                let result = if sample.label("result") == "rejected" { "rejected" } else { "allowed" };
                add(format!("ratelimit_{result}"), value);
                if sample.label("limiter") == "local" {
                    add("ratelimit_local".into(), value);
                }
            }
            ("gateway", "llmesh_shed_total") => add("shed".into(), value),
            ("gateway", "llmesh_fallbacks_total") => add("fallbacks".into(), value),
            // The model calls generation made to the providers (a call the gateway's open breaker
            // stopped never gets there).
            ("generation", "gen_ai_client_operation_duration_seconds_count") => {
                let model = sample.label("gen_ai_request_model");
                add(format!("{MODEL_CALLS}{model}"), value);
                add(format!("{MODEL_PROVIDER}{model}\t{}", sample.label("gen_ai_provider_name")), value);
                if !sample.label("error_type").is_empty() {
                    add(format!("{MODEL_ERRORS}{model}"), value);
                }
            }
            ("generation", "gen_ai_client_operation_duration_seconds_bucket") => {
                add(format!("{MODEL_LE}{} {}", sample.label("gen_ai_request_model"), sample.label("le")), value);
            }
            _ => {}
        }
    }
    totals
}

/// The gauges one source reports: breakers and budgets (the gateway's), the queue (generation's).
fn gauges(
    service: &str,
    samples: &[Sample],
    current: &mut Current,
    breakers: &mut BTreeMap<(String, String), f64>,
    budgets: &mut BTreeMap<(String, String), [Option<f64>; 3]>,
) {
    for sample in samples {
        let value = sample.value;
        match (service, sample.name.as_str()) {
            ("gateway", "llmesh_breaker_state") => {
                let key = (sample.label("endpoint").to_string(), sample.label("model").to_string());
                let state = breakers.entry(key).or_insert(value);
                *state = state.max(value);
            }
            ("gateway", "llm_active_requests") => current.active_requests += value,
            (
                "gateway",
                name @ ("llmesh_budget_spent_usd" | "llmesh_budget_limit_usd" | "llmesh_budget_remaining_usd"),
            ) => {
                let slot = match name {
                    "llmesh_budget_spent_usd" => 0,
                    "llmesh_budget_limit_usd" => 1,
                    _ => 2,
                };
                // Every gateway reports what the shared Redis said: the largest is the latest.
                let row =
                    budgets.entry((sample.label("scope").to_string(), sample.label("name").to_string())).or_default();
                row[slot] = Some(row[slot].map_or(value, |seen: f64| seen.max(value)));
            }
            ("generation", "llmesh_queue_jobs") => {
                let depth = current.queue.entry(sample.label("state").to_string()).or_insert(value);
                *depth = depth.max(value);
            }
            _ => {}
        }
    }
}

fn breaker_name(state: f64) -> &'static str {
    match state {
        s if s >= 2.0 => "open",
        s if s >= 1.0 => "half_open",
        _ => "closed",
    }
}

fn worse(a: &'static str, b: &'static str) -> &'static str {
    let rank = |s: &str| match s {
        "open" => 2,
        "half_open" => 1,
        _ => 0,
    };
    if rank(b) > rank(a) { b } else { a }
}

/// p50 and p99, in milliseconds, of the histogram whose cumulative buckets are `sum`'s entries
/// named `prefix` + `le`.
fn quantiles(sum: &Totals, prefix: &str) -> (Option<f64>, Option<f64>) {
    let mut buckets: Vec<(f64, f64)> = sum
        .range(prefix.to_string()..)
        .take_while(|(name, _)| name.starts_with(prefix))
        .filter_map(|(name, count)| {
            let le = &name[prefix.len()..];
            // A model name may hold a space: its buckets are not this prefix's.
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((bound, *count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let ms = |q: f64| quantile(q, &buckets).map(|seconds| seconds * 1000.0);
    (ms(0.5), ms(0.99))
}

/// PromQL's `histogram_quantile` over cumulative `(upper bound, count)` buckets sorted by bound.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last().filter(|(bound, _)| bound.is_infinite())?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let within = count - lower.1;
            let share = if within > 0.0 { (rank - lower.1) / within } else { 1.0 };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::exposition::parse;

    fn scrape(source: usize, service: &str, text: &str) -> Scrape {
        Scrape { source, service: service.into(), samples: Some(parse(text)) }
    }

    #[test]
    fn quantiles_interpolate_within_buckets_like_promql() {
        let buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.5, &buckets), Some(0.1));
        assert!((quantile(0.7, &buckets).unwrap() - 0.3).abs() < 1e-9);
        assert!((quantile(0.99, &buckets).unwrap() - 0.95).abs() < 1e-9);
        // Past the last finite bucket: its bound, as PromQL.
        assert_eq!(quantile(0.99, &[(0.1, 1.0), (f64::INFINITY, 10.0)]), Some(0.1));
        assert_eq!(quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
    }

    #[test]
    fn rates_ratios_breakers_budgets_and_the_queue() {
        let mut deriver = Deriver::default();
        let gateway = |requests: u32, errors: u32, hits: u32, state: u32, spent: f64| {
            format!(
                r#"
llm_requests_total{{endpoint="Generate",status="OK"}} {requests}
llm_requests_total{{endpoint="Generate",status="UNAVAILABLE"}} {errors}
llm_response_time_bucket{{endpoint="Generate",le="0.1"}} {requests}
llm_response_time_bucket{{endpoint="Generate",le="+Inf"}} {total}
llmesh_cache_requests_total{{result="hit",tier="near"}} {hits}
llmesh_cache_requests_total{{result="miss"}} {requests}
llmesh_cache_requests_total{{result="bypass"}} 1000
llmesh_breaker_state{{endpoint="http://10.0.0.1:50052"}} 0
llmesh_breaker_state{{endpoint="http://10.0.0.1:50052",model="sim-error"}} {state}
llmesh_budget_spent_usd{{scope="key",name="alice"}} {spent}
llmesh_budget_limit_usd{{scope="key",name="alice"}} 1
"#,
                total = requests + errors
            )
        };
        let generation = |calls: u32, errors: u32| {
            format!(
                r#"
llmesh_queue_jobs{{state="queued"}} 3
llmesh_queue_jobs{{state="dead_lettered"}} 1
gen_ai_client_operation_duration_seconds_count{{gen_ai_request_model="sim",gen_ai_provider_name="sim"}} {calls}
gen_ai_client_operation_duration_seconds_count{{gen_ai_request_model="sim-error",error_type="UNAVAILABLE"}} {errors}
"#
            )
        };
        let first = [scrape(0, "gateway", &gateway(10, 0, 0, 0, 0.25)), scrape(1, "generation", &generation(10, 0))];
        let (point, current) = deriver.round(1_000, 1.0, &first);
        // The first round has nothing to difference against.
        assert_eq!(point.requests_per_s, 0.0);
        assert_eq!(point.error_ratio, None);
        assert_eq!(point.queued, 3.0);
        assert_eq!(point.dead_letters, 1.0);
        assert_eq!(current.budgets[0].spent_usd, 0.25);
        assert_eq!(current.budgets[0].limit_usd, Some(1.0));

        let second = [scrape(0, "gateway", &gateway(30, 20, 20, 2, 0.5)), scrape(1, "generation", &generation(30, 20))];
        let (point, current) = deriver.round(3_000, 2.0, &second);
        assert_eq!(point.seq, 2);
        // 40 calls (20 failed) over the window's 3 s.
        assert!((point.requests_per_s - 40.0 / 3.0).abs() < 1e-9, "{point:?}");
        assert_eq!(point.error_ratio, Some(0.5));
        // 20 of 40 within 0.1 s: the median at that bound; p99 past the last finite bound.
        assert_eq!(point.p50_ms, Some(100.0));
        assert_eq!(point.p99_ms, Some(100.0));
        // 20 near hits of 40 lookups; bypasses are no lookups.
        assert_eq!(point.cache_hit_ratio, Some(0.5));
        assert_eq!(point.near_hit_ratio, Some(0.5));
        assert_eq!(point.service_hit_ratio, Some(0.0));
        let error_model = current.models.iter().find(|m| m.model == "sim-error").unwrap();
        assert_eq!(error_model.breaker, "open");
        assert_eq!(error_model.error_ratio, Some(1.0));
        let sim = current.models.iter().find(|m| m.model == "sim").unwrap();
        assert_eq!((sim.breaker, sim.error_ratio), ("closed", Some(0.0)));
        assert_eq!(sim.providers, vec!["sim".to_string()]);
        assert_eq!(current.replicas, vec![ReplicaRow { endpoint: "http://10.0.0.1:50052".into(), breaker: "closed" }]);
        assert_eq!(current.budgets[0].spent_usd, 0.5);
        // A restarted gateway (its counters start again) adds what it counted, never less; a
        // source not reached adds nothing and shows as down.
        let third = [
            scrape(0, "gateway", &gateway(5, 0, 0, 0, 0.5)),
            Scrape { source: 1, service: "generation".into(), samples: None },
        ];
        let (point, current) = deriver.round(4_000, 1.0, &third);
        assert_eq!(
            current.sources,
            vec![
                SourceRow { service: "gateway".into(), up: true },
                SourceRow { service: "generation".into(), up: false }
            ]
        );
        assert!((point.requests_per_s - 45.0 / 4.0).abs() < 1e-9, "{point:?}");
    }
}

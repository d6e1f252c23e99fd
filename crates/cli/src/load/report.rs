//! The end-of-run report: a human summary, and the same figures as JSON.

use std::{collections::BTreeMap, io::Write};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{
    args::Plan,
    recorder::Recorder,
    runner::{Mode, RunSummary},
};

/// The figures of one `llmesh load` run. `--json` writes exactly this object; its field names and
/// meanings are stable (a change of meaning or a removal bumps `schema`; new fields may appear).
///
/// - `schema`: `"llmesh.load.v1"`.
/// - `target`, `service` (`"gateway"` | `"generation"`), `rpc` (`"Generate"` | `"GenerateStream"`:
///   its HTTP equivalent with `protocol` `"http"`), `protocol` (`"grpc"`, or `"http"`: OpenAI chat
///   completions over HTTP/1.1, status codes counted under the gRPC code they stand for), `model`:
///   what was called.
/// - `mode`: `"open"` (fixed `rate`, requests per second) or `"closed"` (fixed `concurrency`, calls
///   in flight); the other of `rate` / `concurrency` is `null`. `connections`: HTTP/2 connections.
/// - `unique`: whether each prompt carried a nonce (cache misses). `seed`: the prompt choice's seed.
/// - `duration_s`: wall time of the run, in seconds. `interrupted`: stopped early by Ctrl-C.
/// - `scheduled` (open loop, else `null`): calls the timetable made due; `sent`: calls started;
///   `requests`: calls finished (success or error); `abandoned`: calls still in flight at the hard
///   stop, given up with no result.
/// - `throughput_rps`: `requests / duration_s`.
/// - `successes`, `errors`: `requests` split by outcome. `codes`: finished calls by status name:
///   gRPC code names (`"OK"`, `"UNAVAILABLE"`, `"RESOURCE_EXHAUSTED"`, `"DEADLINE_EXCEEDED"`, ...;
///   a call past `--timeout` counts as `"DEADLINE_EXCEEDED"`) and `"STREAM_INCOMPLETE"` (a
///   stream that ended OK without its final chunk).
/// - `cache_hits`: successes answered from the cache; `cache_hit_share`: `cache_hits / successes`
///   (0 when there are none).
/// - `tokens`: `prompt`, `completion`, `total` summed over successes' usage, and
///   `completion_per_s`, `total_per_s` over `duration_s`.
/// - `latency_ms`: successful calls, from intended start (open loop: the timetable's start time,
///   so a late start counts against latency) to the end of the answer. `ttft_ms` (streams):
///   intended start to the first chunk with text. `start_lag_ms` (open loop): how late calls
///   started against the timetable. Each is `null` when it has no values, else
///   `{count, min, mean, p50, p90, p99, p99_9, max}` in milliseconds, to the microsecond (HDR
///   histograms with 4 significant figures).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// The full gRPC service name, for the human summary.
    #[serde(skip)]
    pub grpc_service: &'static str,
    pub target: String,
    pub service: &'static str,
    pub rpc: &'static str,
    pub protocol: &'static str,
    pub model: String,
    pub mode: &'static str,
    pub rate: Option<f64>,
    pub concurrency: Option<u64>,
    pub connections: u64,
    pub unique: bool,
    pub seed: u64,
    pub duration_s: f64,
    pub interrupted: bool,
    pub scheduled: Option<u64>,
    pub sent: u64,
    pub requests: u64,
    pub abandoned: u64,
    pub throughput_rps: f64,
    pub successes: u64,
    pub errors: u64,
    pub codes: BTreeMap<String, u64>,
    pub cache_hits: u64,
    pub cache_hit_share: f64,
    pub tokens: Tokens,
    pub latency_ms: Option<Percentiles>,
    pub ttft_ms: Option<Percentiles>,
    pub start_lag_ms: Option<Percentiles>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
    pub completion_per_s: f64,
    pub total_per_s: f64,
}

/// A latency distribution in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl Percentiles {
    /// The distribution of a histogram of microseconds; `None` when it is empty.
    pub fn of(micros: &Histogram<u64>) -> Option<Self> {
        if micros.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Self {
            count: micros.len(),
            min: ms(micros.min()),
            mean: round(micros.mean() / 1000.0, 3),
            p50: ms(micros.value_at_quantile(0.50)),
            p90: ms(micros.value_at_quantile(0.90)),
            p99: ms(micros.value_at_quantile(0.99)),
            p99_9: ms(micros.value_at_quantile(0.999)),
            max: ms(micros.max()),
        })
    }
}

fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 { round(count as f64 / seconds, 3) } else { 0.0 }
}

impl Report {
    pub fn new(plan: &Plan, summary: &RunSummary, recorder: &Recorder) -> Self {
        let duration_s = round(summary.duration.as_secs_f64(), 6);
        let (mode, rate, concurrency) = match plan.run.mode {
            Mode::Open { rate, .. } => ("open", Some(rate), None),
            Mode::Closed { concurrency } => ("closed", None, Some(concurrency as u64)),
        };
        let cache_hit_share = if recorder.successes == 0 {
            0.0
        } else {
            round(recorder.cache_hits as f64 / recorder.successes as f64, 6)
        };
        Self {
            schema: "llmesh.load.v1",
            grpc_service: plan.service.grpc_name(),
            target: plan.target.clone(),
            service: plan.service.name(),
            rpc: if plan.stream { "GenerateStream" } else { "Generate" },
            protocol: plan.protocol.name(),
            model: plan.model.clone(),
            mode,
            rate,
            concurrency,
            connections: plan.connections as u64,
            unique: plan.unique,
            seed: plan.seed,
            duration_s,
            interrupted: summary.interrupted,
            scheduled: summary.scheduled,
            sent: summary.sent,
            requests: recorder.completed,
            abandoned: summary.abandoned,
            throughput_rps: per_second(recorder.completed, duration_s),
            successes: recorder.successes,
            errors: recorder.errors(),
            codes: recorder.codes.iter().map(|(name, n)| ((*name).to_string(), *n)).collect(),
            cache_hits: recorder.cache_hits,
            cache_hit_share,
            tokens: Tokens {
                prompt: recorder.prompt_tokens,
                completion: recorder.completion_tokens,
                total: recorder.total_tokens,
                completion_per_s: per_second(recorder.completion_tokens, duration_s),
                total_per_s: per_second(recorder.total_tokens, duration_s),
            },
            latency_ms: Percentiles::of(&recorder.latency),
            ttft_ms: if plan.stream { Percentiles::of(&recorder.ttft) } else { None },
            start_lag_ms: if rate.is_some() { Percentiles::of(&recorder.start_lag) } else { None },
        }
    }

    /// The human summary.
    pub fn write_human(&self, out: &mut impl Write) -> std::io::Result<()> {
        if self.protocol == "http" {
            let stream = if self.rpc == "GenerateStream" { " (stream)" } else { "" };
            writeln!(
                out,
                "llmesh load: POST /v1/chat/completions{stream} over HTTP/1.1 at {}, model {}",
                self.target, self.model
            )?;
        } else {
            writeln!(out, "llmesh load: {}/{} at {}, model {}", self.grpc_service, self.rpc, self.target, self.model)?;
        }
        let prompts = if self.unique { "unique prompts (cache misses)" } else { "repeated prompts" };
        match (self.rate, self.concurrency) {
            (Some(rate), _) => writeln!(
                out,
                "  load          open loop at {rate} req/s, {} connection(s), {prompts}",
                self.connections
            )?,
            (None, concurrency) => writeln!(
                out,
                "  load          closed loop, {} in flight, {} connection(s), {prompts}",
                concurrency.unwrap_or(0),
                self.connections
            )?,
        }
        let interrupted = if self.interrupted { " (interrupted)" } else { "" };
        writeln!(out, "  duration      {:.3} s{interrupted}", self.duration_s)?;
        let scheduled = self.scheduled.map(|n| format!(" of {n} scheduled")).unwrap_or_default();
        writeln!(
            out,
            "  requests      {} finished, {} abandoned ({} sent{scheduled})",
            self.requests, self.abandoned, self.sent
        )?;
        writeln!(out, "  throughput    {:.1} req/s", self.throughput_rps)?;
        writeln!(out, "  successes     {} ({:.2}%)", self.successes, percent(self.successes, self.requests))?;
        writeln!(out, "  codes         {}", self.codes_line())?;
        writeln!(out, "  cache hits    {} ({:.2}% of successes)", self.cache_hits, self.cache_hit_share * 100.0)?;
        writeln!(
            out,
            "  tokens        {} completion ({:.1}/s), {} total ({:.1}/s)",
            self.tokens.completion, self.tokens.completion_per_s, self.tokens.total, self.tokens.total_per_s
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "  {:<14}{:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "", "p50", "p90", "p99", "p99.9", "max", "mean"
        )?;
        let origin = if self.rate.is_some() { "latency ms*" } else { "latency ms" };
        row(out, origin, self.latency_ms.as_ref(), "no successful calls")?;
        if self.rpc == "GenerateStream" {
            row(out, "ttft ms", self.ttft_ms.as_ref(), "no stream sent text")?;
        }
        if self.rate.is_some() {
            row(out, "start lag ms", self.start_lag_ms.as_ref(), "no calls")?;
            writeln!(out, "  * from each call's intended start on the timetable")?;
        }
        Ok(())
    }

    /// `OK 990, UNAVAILABLE 10`: OK first, then by count.
    fn codes_line(&self) -> String {
        if self.codes.is_empty() {
            return "none".to_string();
        }
        let mut codes: Vec<(&String, &u64)> = self.codes.iter().collect();
        codes.sort_by(|a, b| (a.0 != "OK").cmp(&(b.0 != "OK")).then(b.1.cmp(a.1)).then(a.0.cmp(b.0)));
        codes.iter().map(|(name, n)| format!("{name} {n}")).collect::<Vec<_>>().join(", ")
    }

    pub fn write_json(&self, out: &mut impl Write) -> anyhow::Result<()> {
        serde_json::to_writer_pretty(&mut *out, self)?;
        writeln!(out)?;
        Ok(())
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 * 100.0 / whole as f64 }
}

fn row(out: &mut impl Write, label: &str, p: Option<&Percentiles>, empty: &str) -> std::io::Result<()> {
    match p {
        Some(p) => writeln!(
            out,
            "  {label:<14}{:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
            p.p50, p.p90, p.p99, p.p99_9, p.max, p.mean
        ),
        None => writeln!(out, "  {label:<14}({empty})"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;
    use tonic::Code;

    use super::*;
    use crate::load::{
        args::{Plan, Service},
        outcome::{CallResult, Failure, Success, Timed},
        runner::RunPlan,
    };

    fn plan(mode: Mode, stream: bool) -> Plan {
        Plan {
            target: "http://127.0.0.1:50051".into(),
            tls: None,
            service: Service::Gateway,
            protocol: crate::load::args::Protocol::Grpc,
            model: "sim".into(),
            api_key: None,
            stream,
            max_tokens: 0,
            connections: 2,
            prompts: None,
            unique: false,
            seed: 7,
            run: RunPlan {
                mode,
                duration: Some(Duration::from_secs(10)),
                requests: None,
                timeout: Duration::from_secs(30),
                grace: Duration::from_secs(5),
                pacing: crate::load::pacer::Pacing::Precise,
            },
            json: None,
        }
    }

    /// 100 calls: 90 answered in 0.3, 0.6, ... 27 ms (45 from the cache), 10 UNAVAILABLE. All the
    /// values are below 32.768 ms, where the histograms are exact to the microsecond.
    fn recorder(stream: bool) -> Recorder {
        let mut r = Recorder::new().unwrap();
        let t0 = Instant::now();
        for i in 1..=90u64 {
            let success = Success { cached: i % 2 == 0, prompt_tokens: 4, completion_tokens: 10, total_tokens: 14 };
            let mut result = CallResult::ok(success);
            if stream {
                result.first_token = Some(t0 + Duration::from_micros(i * 100));
            }
            let finished = t0 + Duration::from_micros(i * 300);
            r.record(&Timed { intended: t0, started: t0 + Duration::from_micros(i), finished, result });
        }
        for _ in 0..10 {
            let result = CallResult::failed(Failure::Status(Code::Unavailable));
            r.record(&Timed { intended: t0, started: t0, finished: t0 + Duration::from_millis(2), result });
        }
        r
    }

    fn summary(scheduled: Option<u64>) -> RunSummary {
        RunSummary {
            started: Instant::now(),
            duration: Duration::from_secs(10),
            sent: 100,
            scheduled,
            abandoned: 0,
            interrupted: false,
        }
    }

    #[test]
    fn figures_come_from_the_recorder_and_the_run() {
        let report = Report::new(&plan(Mode::Closed { concurrency: 8 }, false), &summary(None), &recorder(false));
        assert_eq!((report.requests, report.successes, report.errors, report.sent), (100, 90, 10, 100));
        assert_eq!(report.throughput_rps, 10.0);
        assert_eq!(report.codes, BTreeMap::from([("OK".to_string(), 90), ("UNAVAILABLE".to_string(), 10)]));
        assert_eq!((report.cache_hits, report.cache_hit_share), (45, 0.5));
        assert_eq!(
            report.tokens,
            Tokens { prompt: 360, completion: 900, total: 1260, completion_per_s: 90.0, total_per_s: 126.0 }
        );
        let latency = report.latency_ms.unwrap();
        assert_eq!((latency.count, latency.min, latency.p50, latency.p90, latency.max), (90, 0.3, 13.5, 24.3, 27.0));
        assert_eq!((latency.p99, latency.p99_9, latency.mean), (27.0, 27.0, 13.65));
        assert_eq!((report.ttft_ms, report.start_lag_ms), (None, None));
    }

    #[test]
    fn renders_the_human_summary() {
        let report = Report::new(&plan(Mode::Closed { concurrency: 8 }, false), &summary(None), &recorder(false));
        let mut out = Vec::new();
        report.write_human(&mut out).unwrap();
        let expected = "\
llmesh load: llmesh.gateway.v1.Gateway/Generate at http://127.0.0.1:50051, model sim
  load          closed loop, 8 in flight, 2 connection(s), repeated prompts
  duration      10.000 s
  requests      100 finished, 0 abandoned (100 sent)
  throughput    10.0 req/s
  successes     90 (90.00%)
  codes         OK 90, UNAVAILABLE 10
  cache hits    45 (50.00% of successes)
  tokens        900 completion (90.0/s), 1260 total (126.0/s)

                       p50        p90        p99      p99.9        max       mean
  latency ms        13.500     24.300     27.000     27.000     27.000     13.650
";
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn open_loop_streams_add_ttft_and_start_lag() {
        let plan = plan(Mode::Open { rate: 10.0, max_in_flight: 100 }, true);
        let mut summary = summary(Some(100));
        summary.interrupted = true;
        let report = Report::new(&plan, &summary, &recorder(true));
        let ttft = report.ttft_ms.unwrap();
        assert_eq!((ttft.count, ttft.min, ttft.max), (90, 0.1, 9.0));
        let lag = report.start_lag_ms.unwrap();
        assert_eq!((lag.count, lag.p50, lag.max), (100, 0.04, 0.09));
        let mut out = Vec::new();
        report.write_human(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("GenerateStream"), "{text}");
        assert!(text.contains("  load          open loop at 10 req/s, 2 connection(s), repeated prompts\n"), "{text}");
        assert!(text.contains("  duration      10.000 s (interrupted)\n"), "{text}");
        assert!(text.contains("(100 sent of 100 scheduled)"), "{text}");
        assert!(
            text.contains("  ttft ms            4.500      8.100      9.000      9.000      9.000      4.550\n"),
            "{text}"
        );
        assert!(
            text.contains("  start lag ms       0.040      0.080      0.089      0.090      0.090      0.041\n"),
            "{text}"
        );
        assert!(text.contains("  latency ms*"), "{text}");
    }

    #[test]
    fn says_so_when_nothing_succeeded() {
        let mut r = Recorder::new().unwrap();
        let t0 = Instant::now();
        let result = CallResult::failed(Failure::Status(Code::ResourceExhausted));
        r.record(&Timed { intended: t0, started: t0, finished: t0, result });
        let report = Report::new(&plan(Mode::Closed { concurrency: 1 }, true), &summary(None), &r);
        assert_eq!((report.latency_ms, report.ttft_ms, report.cache_hit_share), (None, None, 0.0));
        let mut out = Vec::new();
        report.write_human(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("  codes         RESOURCE_EXHAUSTED 1\n"), "{text}");
        assert!(text.contains("  latency ms    (no successful calls)\n"), "{text}");
        assert!(text.contains("  ttft ms       (no stream sent text)\n"), "{text}");
    }

    #[test]
    fn json_has_the_documented_fields() {
        let plan = plan(Mode::Open { rate: 10.0, max_in_flight: 100 }, true);
        let report = Report::new(&plan, &summary(Some(100)), &recorder(true));
        let mut out = Vec::new();
        report.write_json(&mut out).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected = vec![
            "schema",
            "target",
            "service",
            "rpc",
            "protocol",
            "model",
            "mode",
            "rate",
            "concurrency",
            "connections",
            "unique",
            "seed",
            "duration_s",
            "interrupted",
            "scheduled",
            "sent",
            "requests",
            "abandoned",
            "throughput_rps",
            "successes",
            "errors",
            "codes",
            "cache_hits",
            "cache_hit_share",
            "tokens",
            "latency_ms",
            "ttft_ms",
            "start_lag_ms",
        ];
        let mut keys = keys;
        keys.sort_unstable();
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(json["schema"], "llmesh.load.v1");
        assert_eq!(json["mode"], "open");
        assert_eq!(json["concurrency"], serde_json::Value::Null);
        assert_eq!(json["codes"]["UNAVAILABLE"], 10);
        assert_eq!(json["latency_ms"]["p99_9"], 27.0);
        assert_eq!(json["tokens"]["completion_per_s"], 90.0);
        let percentile_keys: Vec<&str> = json["ttft_ms"].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(percentile_keys.len(), 8);
    }
}

//! Typed helpers for the seed's metrics and the process metrics.
//!
//! Instruments are bound to the meter provider that is global *when they are built*, so build them
//! after [`crate::init`] (the gRPC layer builds its [`SeedMetrics`] when it is constructed).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableCounter, ObservableGauge, UpDownCounter};

/// The meter name every llmesh instrument uses.
pub const METER_NAME: &str = "llmesh";

/// `opentelemetry::global::meter("llmesh")`.
pub fn meter() -> Meter {
    opentelemetry::global::meter(METER_NAME)
}

/// The gRPC code name used as the `status` label (`OK`, `INVALID_ARGUMENT`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The seed's three metrics:
///
/// | instrument | Prometheus |
/// | --- | --- |
/// | `llm_requests` counter `{endpoint, status}` | `llm_requests_total` |
/// | `llm_response_time` histogram `{endpoint}`, seconds, no unit | `llm_response_time_{bucket,sum,count}` |
/// | `llm_active_requests` up-down counter | `llm_active_requests` (gauge) |
#[derive(Clone, Debug)]
pub struct SeedMetrics {
    requests: Counter<u64>,
    response_time: Histogram<f64>,
    active: UpDownCounter<i64>,
}

impl SeedMetrics {
    /// The seed's buckets, in seconds.
    pub const DEFAULT_BUCKETS: [f64; 5] = [0.1, 0.5, 1.0, 2.0, 5.0];

    /// Builds the instruments on the global `llmesh` meter.
    pub fn global() -> Self {
        Self::new(&meter())
    }

    /// Builds the instruments on `meter` with the default buckets.
    pub fn new(meter: &Meter) -> Self {
        Self::with_buckets(meter, Self::DEFAULT_BUCKETS.to_vec())
    }

    /// Builds the instruments on `meter` with explicit `llm_response_time` buckets (seconds).
    pub fn with_buckets(meter: &Meter, buckets: Vec<f64>) -> Self {
        let metrics = Self {
            requests: meter
                .u64_counter("llm_requests")
                .with_description("LLM calls answered, by RPC method and gRPC status")
                .build(),
            // No unit on purpose: with unit "s" the exposition name would become
            // `llm_response_time_seconds`, and the seed's name is `llm_response_time`.
            response_time: meter
                .f64_histogram("llm_response_time")
                .with_description("Time to the full answer, in seconds")
                .with_boundaries(buckets)
                .build(),
            active: meter.i64_up_down_counter("llm_active_requests").with_description("LLM calls in flight").build(),
        };
        // Export `llm_active_requests 0` from the start rather than no series until the first call.
        metrics.active.add(0, &[]);
        metrics
    }

    /// Records one finished call: `llm_requests_total{endpoint,status}` and `llm_response_time{endpoint}`.
    pub fn record(&self, endpoint: &str, code: tonic::Code, elapsed: Duration) {
        self.record_labelled(&KeyValue::new("endpoint", endpoint.to_owned()), code, elapsed);
    }

    /// [`SeedMetrics::record`] with the `endpoint` label already built (cloning it is cheap: its
    /// value is a static or shared string).
    fn record_labelled(&self, endpoint: &KeyValue, code: tonic::Code, elapsed: Duration) {
        self.response_time.record(elapsed.as_secs_f64(), std::slice::from_ref(endpoint));
        self.requests.add(1, &[endpoint.clone(), KeyValue::new("status", code_name(code))]);
    }

    /// Counts a call in flight until the returned guard is finished or dropped. Dropping it without
    /// [`InFlight::finish`] records the call as `CANCELLED` (the caller went away).
    pub fn start(&self, endpoint: &str) -> InFlight {
        self.start_labelled(KeyValue::new("endpoint", endpoint.to_owned()))
    }

    /// [`SeedMetrics::start`] with the `endpoint` label (key `endpoint`) built once by the caller,
    /// so that a call neither formats nor allocates it.
    pub fn start_labelled(&self, endpoint: KeyValue) -> InFlight {
        self.active.add(1, &[]);
        InFlight { metrics: self.clone(), endpoint, started: Instant::now(), done: false }
    }
}

/// A call in flight: `llm_active_requests` is +1 until [`InFlight::finish`] (or drop).
#[derive(Debug)]
pub struct InFlight {
    metrics: SeedMetrics,
    /// The `endpoint` label.
    endpoint: KeyValue,
    started: Instant,
    done: bool,
}

impl InFlight {
    /// Records the call's outcome (only the first call counts).
    pub fn finish(&mut self, code: tonic::Code) {
        if self.done {
            return;
        }
        self.done = true;
        self.metrics.active.add(-1, &[]);
        self.metrics.record_labelled(&self.endpoint, code, self.started.elapsed());
    }

    /// Changes the `endpoint` label the outcome will be recorded under (e.g. to bound the label's
    /// cardinality when the method name came from an untrusted path).
    pub fn relabel(&mut self, endpoint: &str) {
        self.endpoint = KeyValue::new("endpoint", endpoint.to_owned());
    }

    /// Whether the outcome has been recorded.
    pub fn is_finished(&self) -> bool {
        self.done
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// Handles of the process metrics' observable instruments (their callbacks run on every collection).
#[derive(Debug)]
pub struct ProcessMetrics {
    _cpu: ObservableCounter<f64>,
    _rss: ObservableGauge<u64>,
    _fds: ObservableGauge<u64>,
    _start: ObservableGauge<f64>,
}

/// Registers `process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds` and
/// `process_start_time_seconds`, read from `/proc/self` at each collection. The names already carry
/// their Prometheus suffixes, and the translation rules do not add a suffix twice, so the same
/// names come out of `/metrics` and of the collector.
pub fn register_process_metrics(meter: &Meter) -> ProcessMetrics {
    let start_time = process_start_time()
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default());
    ProcessMetrics {
        _cpu: meter
            .f64_observable_counter("process_cpu_seconds_total")
            .with_description("Total user and system CPU time spent in seconds.")
            .with_unit("s")
            .with_callback(|observer| {
                if let Some(stat) = ProcStat::read() {
                    observer.observe(stat.cpu_seconds(), &[]);
                }
            })
            .build(),
        _rss: meter
            .u64_observable_gauge("process_resident_memory_bytes")
            .with_description("Resident memory size in bytes.")
            .with_unit("By")
            .with_callback(|observer| {
                if let Some(rss) = resident_memory_bytes() {
                    observer.observe(rss, &[]);
                }
            })
            .build(),
        _fds: meter
            .u64_observable_gauge("process_open_fds")
            .with_description("Number of open file descriptors.")
            .with_unit("{fd}")
            .with_callback(|observer| {
                if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
                    observer.observe(dir.count() as u64, &[]);
                }
            })
            .build(),
        _start: meter
            .f64_observable_gauge("process_start_time_seconds")
            .with_description("Start time of the process since unix epoch in seconds.")
            .with_unit("s")
            .with_callback(move |observer| observer.observe(start_time, &[]))
            .build(),
    }
}

/// Linux's USER_HZ, fixed at 100 on every architecture Rust targets (the Prometheus Go client
/// assumes the same).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// The fields of `/proc/self/stat` we use.
struct ProcStat {
    utime_ticks: u64,
    stime_ticks: u64,
    start_ticks: u64,
}

impl ProcStat {
    fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/self/stat").ok()?)
    }

    fn parse(stat: &str) -> Option<Self> {
        // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state); utime is field 14, stime 15, starttime 22.
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        Some(Self { utime_ticks: field(14)?, stime_ticks: field(15)?, start_ticks: field(22)? })
    }

    fn cpu_seconds(&self) -> f64 {
        (self.utime_ticks + self.stime_ticks) as f64 / CLOCK_TICKS_PER_SECOND
    }
}

fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn process_start_time() -> Option<f64> {
    let stat = ProcStat::read()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = boot.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    Some(btime as f64 + stat.start_ticks as f64 / CLOCK_TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_match_grpc() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(tonic::Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
    }

    #[test]
    fn parses_proc_stat_with_odd_command_names() {
        let line = "1234 (we ird) name)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 98765 1000000 500 18446744073709551615";
        let stat = ProcStat::parse(line).expect("parse");
        assert_eq!(stat.utime_ticks, 250);
        assert_eq!(stat.stime_ticks, 50);
        assert_eq!(stat.start_ticks, 98765);
        assert!((stat.cpu_seconds() - 3.0).abs() < 1e-9);
    }

    #[test]
    fn reads_this_process() {
        assert!(ProcStat::read().is_some());
        assert!(resident_memory_bytes().is_some_and(|b| b > 0));
        let start = process_start_time().expect("start time");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64();
        assert!(start <= now + 1.0 && start > now - 86_400.0 * 365.0);
    }
}

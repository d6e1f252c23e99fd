//! Everything measured: HDR histograms of latency, time to first token and start lag (in
//! microseconds), counts by status, cache hits and tokens. One task owns it and records each call
//! as it ends, so there is no lock on the hot path.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use hdrhistogram::Histogram;

use super::outcome::Timed;

/// The largest value the histograms hold exactly: one hour, in microseconds. Longer values are
/// clamped to it (no call lives that long: the timeout ends it first).
const MAX_MICROS: u64 = 3_600_000_000;
/// Significant figures kept: exact to the microsecond below 32.768 ms, 0.01% relative error at
/// worst above (about 2.5 MB of counters per histogram).
const SIGNIFICANT_FIGURES: u8 = 4;

#[derive(Debug, Clone)]
pub struct Recorder {
    /// Successful calls, from intended start to the answer's end.
    pub latency: Histogram<u64>,
    /// Streams that sent text, from intended start to the first text.
    pub ttft: Histogram<u64>,
    /// How late each call started against its intended start (open loop).
    pub start_lag: Histogram<u64>,
    /// Finished calls by status name (`OK`, `UNAVAILABLE`, ..., `STREAM_INCOMPLETE`).
    pub codes: BTreeMap<&'static str, u64>,
    pub completed: u64,
    pub successes: u64,
    pub cache_hits: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_MICROS, SIGNIFICANT_FIGURES).context("cannot create a latency histogram")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Recorder {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency: histogram()?,
            ttft: histogram()?,
            start_lag: histogram()?,
            codes: BTreeMap::new(),
            completed: 0,
            successes: 0,
            cache_hits: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
        })
    }

    pub fn record(&mut self, call: &Timed) {
        self.completed += 1;
        // A histogram's range starts at 1 µs; zero-length times (paused clocks, instant fakes)
        // are recorded as 0, which HDR histograms always accept.
        self.start_lag.saturating_record(micros(call.started - call.intended));
        match call.result.outcome {
            Ok(success) => {
                self.successes += 1;
                *self.codes.entry("OK").or_default() += 1;
                self.latency.saturating_record(micros(call.finished - call.intended));
                if let Some(first) = call.result.first_token {
                    self.ttft.saturating_record(micros(first - call.intended));
                }
                self.cache_hits += u64::from(success.cached);
                self.prompt_tokens += success.prompt_tokens;
                self.completion_tokens += success.completion_tokens;
                self.total_tokens += success.total_tokens;
            }
            Err(failure) => *self.codes.entry(failure.name()).or_default() += 1,
        }
    }

    pub fn errors(&self) -> u64 {
        self.completed - self.successes
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;
    use tonic::Code;

    use super::*;
    use crate::load::outcome::{CallResult, Failure, Success};

    fn timed(intended_ms: u64, started_ms: u64, finished_ms: u64, result: CallResult) -> Timed {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        Timed { intended: at(intended_ms), started: at(started_ms), finished: at(finished_ms), result }
    }

    #[test]
    fn counts_and_times_each_call() {
        let mut r = Recorder::new().unwrap();
        let hit = Success { cached: true, prompt_tokens: 3, completion_tokens: 24, total_tokens: 27 };
        let miss = Success { cached: false, ..hit };
        r.record(&timed(0, 0, 10, CallResult::ok(hit)));
        r.record(&timed(0, 5, 20, CallResult::ok(miss)));
        r.record(&timed(0, 0, 1, CallResult::failed(Failure::Status(Code::Unavailable))));
        r.record(&timed(0, 0, 1, CallResult::failed(Failure::Status(Code::Unavailable))));
        r.record(&timed(0, 0, 1, CallResult::failed(Failure::StreamIncomplete)));

        assert_eq!((r.completed, r.successes, r.errors(), r.cache_hits), (5, 2, 3, 1));
        assert_eq!(r.codes, BTreeMap::from([("OK", 2), ("STREAM_INCOMPLETE", 1), ("UNAVAILABLE", 2)]));
        assert_eq!((r.prompt_tokens, r.completion_tokens, r.total_tokens), (6, 48, 54));
        // Latency from the intended start, of successes only.
        assert_eq!(r.latency.len(), 2);
        assert_eq!((r.latency.min(), r.latency.max()), (10_000, 20_000));
        assert_eq!(r.start_lag.len(), 5);
        assert_eq!(r.start_lag.max(), 5_000);
        assert_eq!(r.ttft.len(), 0);
    }

    #[test]
    fn stream_calls_record_time_to_first_token() {
        let mut r = Recorder::new().unwrap();
        let mut call = timed(0, 0, 900, CallResult::ok(Success::default()));
        call.result.first_token = Some(call.intended + Duration::from_micros(2_000_123));
        r.record(&call);
        assert_eq!(r.ttft.len(), 1);
        assert!(r.ttft.equivalent(r.ttft.max(), 2_000_123));
    }
}

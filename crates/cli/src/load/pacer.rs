//! When the open loop's calls are due: a stream of sequence numbers, each sent at its
//! [`Schedule`] time.
//!
//! Tokio's timer rounds every sleep up to the next millisecond, so on the runtime's timer a call
//! due every 2 ms (500 req/s) starts up to 1 ms late, and that lag, counted in the call's latency
//! (from its intended start), was as large as the mesh's own time. A dedicated thread sleeping
//! with the OS's high-resolution timer starts calls within tens of microseconds of the timetable
//! instead. The runtime's timer stays available for tests in paused time, where the thread's
//! real clock would not follow the virtual one.

use tokio::{
    sync::mpsc::{self, UnboundedReceiver},
    time::Instant,
};

use super::schedule::Schedule;

/// Which clock paces the open loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// A dedicated OS thread sleeping to each start time (microsecond resolution). For real runs.
    Thread,
    /// The Tokio runtime's timer (millisecond resolution); follows paused time in tests.
    Runtime,
}

/// Sends `0, 1, 2, …` each at `schedule.at(n)`, never early, until `limit` numbers were sent,
/// the next one would be due at or after `end`, or the receiver is dropped (the run stopped).
pub fn ticks(pacing: Pacing, schedule: Schedule, limit: Option<u64>, end: Option<Instant>) -> UnboundedReceiver<u64> {
    let (tx, rx) = mpsc::unbounded_channel();
    let due = move |seq: u64| {
        let at = schedule.at(seq);
        let over = limit.is_some_and(|n| seq >= n) || end.is_some_and(|end| at >= end);
        (!over).then_some(at)
    };
    match pacing {
        Pacing::Runtime => {
            tokio::spawn(async move {
                let mut seq = 0;
                while let Some(at) = due(seq) {
                    tokio::time::sleep_until(at).await;
                    if tx.send(seq).is_err() {
                        break;
                    }
                    seq += 1;
                }
            });
            rx
        }
        Pacing::Thread => {
            let pace = move || {
                let mut seq = 0;
                while let Some(at) = due(seq) {
                    let at = at.into_std();
                    // `sleep` may wake early on a signal; loop until the time has come.
                    loop {
                        let now = std::time::Instant::now();
                        if now >= at {
                            break;
                        }
                        std::thread::sleep(at - now);
                    }
                    if tx.send(seq).is_err() {
                        break;
                    }
                    seq += 1;
                }
            };
            match std::thread::Builder::new().name("llmesh-load-pacer".into()).spawn(pace) {
                Ok(_) => rx,
                Err(error) => {
                    tracing::warn!(%error, "no pacing thread; the open loop runs on the runtime's millisecond timer");
                    ticks(Pacing::Runtime, schedule, limit, end)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Every tick, with the time it arrived.
    async fn collect(
        pacing: Pacing,
        schedule: Schedule,
        limit: Option<u64>,
        end: Option<Instant>,
    ) -> Vec<(u64, Instant)> {
        let mut rx = ticks(pacing, schedule, limit, end);
        let mut got = Vec::new();
        while let Some(seq) = rx.recv().await {
            got.push((seq, Instant::now()));
        }
        got
    }

    #[tokio::test]
    async fn the_thread_sends_every_tick_in_order_and_never_early() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 2000.0);
        let got = collect(Pacing::Thread, schedule, Some(200), None).await;
        assert_eq!(got.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), (0..200).collect::<Vec<_>>());
        for (seq, arrived) in got {
            assert!(arrived >= schedule.at(seq), "tick {seq} arrived before its time");
        }
    }

    #[tokio::test]
    async fn the_thread_stops_at_the_end_of_the_window() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 1000.0);
        let got = collect(Pacing::Thread, schedule, None, Some(start + Duration::from_millis(50))).await;
        // Due at 0, 1, …, 49 ms: the one due at 50 ms is past the end.
        assert_eq!(got.len(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn the_runtime_timer_follows_paused_time() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 10.0);
        let got = collect(Pacing::Runtime, schedule, Some(3), None).await;
        let at: Vec<Duration> = got.iter().map(|(_, arrived)| *arrived - start).collect();
        assert_eq!(at, [Duration::ZERO, Duration::from_millis(100), Duration::from_millis(200)]);
    }
}

//! Drives the calls: an open loop (a fixed rate of starts, whatever the answers do) or a closed
//! loop (a fixed number of calls in flight), until the duration or request count is reached or
//! the run is interrupted; then a grace period for the calls still in flight, after which they are
//! abandoned. Every finished call goes to the recorder as a [`Timed`].

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Semaphore, mpsc::UnboundedSender},
    task::JoinSet,
    time::{Instant, sleep_until},
};
use tonic::Code;

use super::{
    outcome::{CallResult, Failure, Timed},
    pacer::{Pacing, Ticker},
    schedule::{Schedule, far_future},
};

/// How load is offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// `rate` starts per second on a fixed timetable; at most `max_in_flight` calls at once.
    Open { rate: f64, max_in_flight: usize },
    /// `concurrency` workers, each starting a call when its previous one ends.
    Closed { concurrency: usize },
}

/// When and how hard to send. At least one of `duration` and `requests` is set by the flags; with
/// `requests` alone every call is still bounded by `timeout`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunPlan {
    pub mode: Mode,
    /// Stop starting calls this long after the start.
    pub duration: Option<Duration>,
    /// Stop after starting this many calls.
    pub requests: Option<u64>,
    /// Each call's deadline.
    pub timeout: Duration,
    /// How long calls in flight may still take once the run stops starting calls.
    pub grace: Duration,
    /// The open loop's clock.
    pub pacing: Pacing,
}

/// Makes one call. `seq` numbers the calls from 0 in start order (the open loop's timetable
/// order); the caller derives the request from it.
pub trait Caller: Send + Sync + 'static {
    fn call(&self, seq: u64) -> impl Future<Output = CallResult> + Send;
}

/// Counters shared with the progress display while the run goes on.
#[derive(Debug, Default)]
pub struct Counters {
    /// Calls started.
    pub sent: AtomicU64,
    /// Calls finished (answered, failed or timed out).
    pub done: AtomicU64,
}

/// How the run went, apart from the calls' own results.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunSummary {
    pub started: Instant,
    /// Wall time of the run: from the start to the last call's end (or the hard stop); for an
    /// open loop that was not interrupted, at least the timetable's window.
    pub duration: Duration,
    pub sent: u64,
    /// Open loop only: calls the timetable made due before the run stopped starting calls.
    /// More than `sent` when the in-flight limit held starts back past the end.
    pub scheduled: Option<u64>,
    /// Calls still in flight at the hard stop, given up without a result.
    pub abandoned: u64,
    /// Stopped early by `stop` (Ctrl-C).
    pub interrupted: bool,
}

/// Runs the plan. Results go to `results` as calls end; `stop` resolving (Ctrl-C) stops starting
/// calls and gives those in flight the grace period, or abandons them at once if it comes
/// during the grace period.
pub async fn run<C: Caller>(
    plan: &RunPlan,
    caller: Arc<C>,
    results: UnboundedSender<Timed>,
    counters: Arc<Counters>,
    stop: impl Future<Output = ()>,
) -> RunSummary {
    let stop = std::pin::pin!(stop);
    let call = Arc::new(Call { caller, results, counters: counters.clone(), timeout: plan.timeout });
    let mut run = Run { tasks: JoinSet::new(), stop, interrupted: false };
    let started = Instant::now();
    let end = plan.duration.map(|d| started + d);
    let (window_end, scheduled) = match plan.mode {
        Mode::Open { rate, max_in_flight } => {
            let (window_end, scheduled) =
                run.open_loop(plan, Schedule::new(started, rate), end, max_in_flight, &call).await;
            (Some(window_end), Some(scheduled))
        }
        Mode::Closed { concurrency } => {
            run.closed_loop(plan, end, concurrency, &call).await;
            (None, None)
        }
    };
    let finished = Instant::now();
    let sent = counters.sent.load(Ordering::Relaxed);
    let abandoned = sent.saturating_sub(counters.done.load(Ordering::Relaxed));
    let mut duration = finished - started;
    if let Some(window_end) = window_end.filter(|_| !run.interrupted) {
        duration = duration.max(window_end - started);
    }
    RunSummary { started, duration, sent, scheduled, abandoned, interrupted: run.interrupted }
}

/// What every call task needs.
struct Call<C> {
    caller: Arc<C>,
    results: UnboundedSender<Timed>,
    counters: Arc<Counters>,
    timeout: Duration,
}

impl<C: Caller> Call<C> {
    /// A call task: counts the start, enforces the deadline, times and reports the call.
    fn task(&self, seq: u64, intended: Instant) -> impl Future<Output = ()> + Send + 'static {
        let (caller, results, counters, timeout) =
            (self.caller.clone(), self.results.clone(), self.counters.clone(), self.timeout);
        async move { one(&*caller, seq, intended, timeout, &counters, &results).await }
    }
}

async fn one<C: Caller>(
    caller: &C,
    seq: u64,
    intended: Instant,
    timeout: Duration,
    counters: &Counters,
    results: &UnboundedSender<Timed>,
) {
    counters.sent.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    // The server gets the deadline too (grpc-timeout); this bounds the call whatever it does.
    let result = match tokio::time::timeout(timeout, caller.call(seq)).await {
        Ok(result) => result,
        Err(_) => CallResult::failed(Failure::Status(Code::DeadlineExceeded)),
    };
    let finished = Instant::now();
    counters.done.fetch_add(1, Ordering::Relaxed);
    // The recorder outlives the run; if it is gone there is no one left to tell.
    let _ = results.send(Timed { intended, started, finished, result });
}

struct Run<S> {
    tasks: JoinSet<()>,
    stop: S,
    interrupted: bool,
}

impl<S: Future<Output = ()> + Unpin> Run<S> {
    /// Starts call `n` at `schedule.at(n)`. Returns when the timetable's window ends (for the
    /// recorded duration) and how many calls were due.
    async fn open_loop<C: Caller>(
        &mut self,
        plan: &RunPlan,
        schedule: Schedule,
        end: Option<Instant>,
        max_in_flight: usize,
        call: &Call<C>,
    ) -> (Instant, u64) {
        let permits = Arc::new(Semaphore::new(max_in_flight));
        let mut ticker = Ticker::new(plan.pacing, schedule, plan.requests, end);
        let mut end_reached = std::pin::pin!(sleep_until(end.unwrap_or_else(far_future)));
        let mut seq = 0u64;
        let mut by_count = false;
        loop {
            if plan.requests.is_some_and(|n| seq >= n) {
                by_count = true;
                break;
            }
            let intended = schedule.at(seq);
            if end.is_some_and(|end| intended >= end) {
                break;
            }
            tokio::select! {
                biased;
                () = &mut self.stop => {
                    self.interrupted = true;
                    break;
                }
                tick = ticker.tick() => match tick {
                    Some(tick) => debug_assert_eq!(tick, seq),
                    // The ticker stops only where the checks above do.
                    None => break,
                },
            }
            // Past the limit the start waits; its latency still counts from `intended`.
            let permit = tokio::select! {
                biased;
                () = &mut self.stop => {
                    self.interrupted = true;
                    break;
                }
                () = &mut end_reached => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            while self.tasks.try_join_next().is_some() {}
            let task = call.task(seq, intended);
            self.tasks.spawn(async move {
                task.await;
                drop(permit);
            });
            seq += 1;
        }

        let stopped = Instant::now();
        // The stretch of timetable the run covered: to the duration's end, to the next start
        // after the last one (a count), or to the interruption.
        let window_end = if self.interrupted {
            stopped
        } else if by_count {
            schedule.at(seq)
        } else {
            end.unwrap_or(stopped)
        };
        let due = schedule.due_before(window_end - schedule.start());
        let scheduled = plan.requests.map_or(due, |n| due.min(n)).max(seq);

        // Calls in flight get the grace period after the end of the window; when the count
        // ended the run first, their own deadline (plus the grace period) bounds them.
        let deadline = if self.interrupted {
            stopped + plan.grace
        } else {
            let bounded_by_calls = stopped + plan.timeout + plan.grace;
            end.map_or(bounded_by_calls, |end| bounded_by_calls.min(end.max(stopped) + plan.grace))
        };
        self.drain(deadline).await;
        (window_end, scheduled)
    }

    /// `concurrency` workers, each making calls back to back, until the duration, the request
    /// count or `stop`.
    async fn closed_loop<C: Caller>(
        &mut self,
        plan: &RunPlan,
        end: Option<Instant>,
        concurrency: usize,
        call: &Arc<Call<C>>,
    ) {
        let next = Arc::new(AtomicU64::new(0));
        let stopped = Arc::new(AtomicBool::new(false));
        for _ in 0..concurrency {
            let (next, stopped, call, requests) = (next.clone(), stopped.clone(), call.clone(), plan.requests);
            self.tasks.spawn(async move {
                while !stopped.load(Ordering::Relaxed) {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if requests.is_some_and(|n| seq >= n) {
                        break;
                    }
                    call.task(seq, Instant::now()).await;
                }
            });
        }
        let mut end_reached = std::pin::pin!(sleep_until(end.unwrap_or_else(far_future)));
        loop {
            tokio::select! {
                biased;
                () = &mut self.stop => {
                    self.interrupted = true;
                    break;
                }
                () = &mut end_reached => break,
                worker = self.tasks.join_next() => if worker.is_none() {
                    break;
                },
            }
        }
        stopped.store(true, Ordering::Relaxed);
        self.drain(Instant::now() + plan.grace).await;
    }

    /// Waits for the calls in flight until `deadline` (or a stop, if the run was not already
    /// stopped by one), then abandons the rest.
    async fn drain(&mut self, deadline: Instant) {
        loop {
            tokio::select! {
                biased;
                () = &mut self.stop, if !self.interrupted => {
                    self.interrupted = true;
                    break;
                }
                () = sleep_until(deadline) => break,
                task = self.tasks.join_next() => if task.is_none() {
                    break;
                },
            }
        }
        self.tasks.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;
    use crate::load::outcome::Success;

    /// A caller that answers after `delay`, or never.
    struct Fake {
        delay: Option<Duration>,
    }

    impl Caller for Fake {
        async fn call(&self, _seq: u64) -> CallResult {
            match self.delay {
                Some(delay) => tokio::time::sleep(delay).await,
                None => std::future::pending::<()>().await,
            }
            CallResult::ok(Success::default())
        }
    }

    fn plan(mode: Mode, duration_ms: Option<u64>, requests: Option<u64>) -> RunPlan {
        RunPlan {
            mode,
            duration: duration_ms.map(Duration::from_millis),
            requests,
            timeout: Duration::from_secs(3600),
            grace: Duration::from_secs(2),
            pacing: Pacing::Runtime,
        }
    }

    fn open(rate: f64, max_in_flight: usize) -> Mode {
        Mode::Open { rate, max_in_flight }
    }

    /// Runs `plan` with a fake answering after `delay_ms` (or never); returns the summary and every
    /// call as (intended, started, finished) in ms from the start, in the order they finished.
    async fn go(
        plan: RunPlan,
        delay_ms: Option<u64>,
        stop: impl Future<Output = ()>,
    ) -> (RunSummary, Vec<(u64, u64, u64)>, Vec<Timed>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let caller = Arc::new(Fake { delay: delay_ms.map(Duration::from_millis) });
        let summary = run(&plan, caller, tx, Arc::new(Counters::default()), stop).await;
        let mut calls = Vec::new();
        while let Some(call) = rx.recv().await {
            calls.push(call);
        }
        let ms = |t: Instant| u64::try_from((t - summary.started).as_millis()).unwrap();
        let times = calls.iter().map(|c| (ms(c.intended), ms(c.started), ms(c.finished))).collect();
        (summary, times, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_starts_calls_on_the_timetable() {
        let (summary, times, _) = go(plan(open(10.0, 100), Some(1000), None), Some(250), std::future::pending()).await;
        let expected: Vec<(u64, u64, u64)> = (0..10).map(|i| (i * 100, i * 100, i * 100 + 250)).collect();
        assert_eq!(times, expected);
        assert_eq!((summary.sent, summary.scheduled, summary.abandoned, summary.interrupted), (10, Some(10), 0, false));
        // The last call ends at 1150 ms, after the one-second window.
        assert_eq!(summary.duration, Duration::from_millis(1150));
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_loop_lasts_at_least_its_window() {
        let (summary, _, _) = go(plan(open(10.0, 100), Some(1000), None), Some(0), std::future::pending()).await;
        assert_eq!(summary.duration, Duration::from_secs(1));
        let (summary, times, _) = go(plan(open(4.0, 100), None, Some(3)), Some(0), std::future::pending()).await;
        assert_eq!(times, [(0, 0, 0), (250, 250, 250), (500, 500, 500)]);
        assert_eq!((summary.sent, summary.scheduled, summary.duration), (3, Some(3), Duration::from_millis(750)));
    }

    #[tokio::test(start_paused = true)]
    async fn late_starts_count_against_latency() {
        // One call at a time, each taking 250 ms, due every 100 ms: each start waits for the
        // previous call, and latency keeps growing from the intended start (no coordinated omission).
        let (summary, times, _) = go(plan(open(10.0, 1), None, Some(4)), Some(250), std::future::pending()).await;
        assert_eq!(times, [(0, 0, 250), (100, 250, 500), (200, 500, 750), (300, 750, 1000)]);
        let latencies: Vec<u64> = times.iter().map(|(intended, _, finished)| finished - intended).collect();
        assert_eq!(latencies, [250, 400, 550, 700]);
        assert_eq!(summary.sent, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn starts_held_back_past_the_end_are_scheduled_but_not_sent() {
        let (summary, times, _) = go(plan(open(10.0, 1), Some(1000), None), Some(400), std::future::pending()).await;
        // Starts at 0, 400, 800 (each waiting for the one before); due: 10 in the window.
        assert_eq!(times, [(0, 0, 400), (100, 400, 800), (200, 800, 1200)]);
        assert_eq!((summary.sent, summary.scheduled, summary.abandoned), (3, Some(10), 0));
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_keeps_n_calls_in_flight() {
        let (summary, times, _) =
            go(plan(Mode::Closed { concurrency: 3 }, None, Some(10)), Some(100), std::future::pending()).await;
        let mut starts: Vec<u64> = times.iter().map(|t| t.1).collect();
        starts.sort_unstable();
        assert_eq!(starts, [0, 0, 0, 100, 100, 100, 200, 200, 200, 300]);
        assert!(times.iter().all(|(intended, started, finished)| intended == started && finished - started == 100));
        assert_eq!((summary.sent, summary.scheduled, summary.abandoned), (10, None, 0));
        assert_eq!(summary.duration, Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_stops_at_the_duration() {
        let (summary, times, _) =
            go(plan(Mode::Closed { concurrency: 2 }, Some(1000), None), Some(300), std::future::pending()).await;
        // Starts at 0, 300, 600, 900 on each worker; the ones at 900 finish in the grace period.
        assert_eq!(times.len(), 8);
        assert_eq!((summary.sent, summary.abandoned), (8, 0));
        assert_eq!(summary.duration, Duration::from_millis(1200));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_that_never_end_are_abandoned_after_the_grace_period() {
        let (summary, times, _) = go(plan(open(10.0, 100), Some(1000), None), None, std::future::pending()).await;
        assert!(times.is_empty());
        assert_eq!((summary.sent, summary.abandoned), (10, 10));
        assert_eq!(summary.duration, Duration::from_secs(3));

        let (summary, times, _) =
            go(plan(Mode::Closed { concurrency: 2 }, Some(1000), None), None, std::future::pending()).await;
        assert!(times.is_empty());
        assert_eq!((summary.sent, summary.abandoned), (2, 2));
        assert_eq!(summary.duration, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_ends_each_call_with_deadline_exceeded() {
        let mut plan = plan(Mode::Closed { concurrency: 1 }, None, Some(2));
        plan.timeout = Duration::from_millis(500);
        let (summary, times, calls) = go(plan, None, std::future::pending()).await;
        assert_eq!(times, [(0, 0, 500), (500, 500, 1000)]);
        assert!(calls.iter().all(|c| c.result.outcome == Err(Failure::Status(Code::DeadlineExceeded))));
        assert_eq!((summary.sent, summary.abandoned, summary.duration), (2, 0, Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_the_run_early_and_in_flight_calls_get_the_grace_period() {
        let stop = tokio::time::sleep(Duration::from_millis(350));
        let (summary, times, _) = go(plan(open(10.0, 100), Some(10_000), None), Some(1000), stop).await;
        assert_eq!(times.len(), 4);
        assert_eq!((summary.sent, summary.scheduled, summary.abandoned, summary.interrupted), (4, Some(4), 0, true));
        assert_eq!(summary.duration, Duration::from_millis(1300));

        let stop = tokio::time::sleep(Duration::from_millis(350));
        let (summary, _, _) = go(plan(Mode::Closed { concurrency: 4 }, None, Some(1000)), None, stop).await;
        assert_eq!((summary.sent, summary.abandoned, summary.interrupted), (4, 4, true));
        assert_eq!(summary.duration, Duration::from_millis(2350));
    }
}

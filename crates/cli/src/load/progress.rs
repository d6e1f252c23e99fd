//! The live progress bar on stderr: shown only when stderr is a terminal, so logs, pipes and CI
//! output stay clean.

use std::{
    io::IsTerminal as _,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::{sync::mpsc::UnboundedReceiver, time::Instant};

use super::{outcome::Timed, recorder::Recorder, runner::Counters};

/// What the bar fills towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// A number of calls: the bar counts finished calls.
    Requests(u64),
    /// A duration: the bar follows the clock.
    Duration(Duration),
}

pub struct Progress {
    bar: ProgressBar,
    goal: Goal,
    started: Instant,
    counters: Arc<Counters>,
    /// The last refresh (time, finished calls), for the current rate.
    last: (Instant, u64),
}

impl Progress {
    /// A bar on stderr if it is a terminal, else one that draws nothing.
    pub fn new(goal: Goal, counters: Arc<Counters>) -> Self {
        let visible = std::io::stderr().is_terminal();
        let bar = if visible { Self::bar(goal) } else { ProgressBar::hidden() };
        let now = Instant::now();
        Self { bar, goal, started: now, counters, last: (now, 0) }
    }

    fn bar(goal: Goal) -> ProgressBar {
        let (len, template) = match goal {
            Goal::Requests(n) => (n, "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} calls  {msg}"),
            Goal::Duration(d) => {
                (u64::try_from(d.as_millis()).unwrap_or(u64::MAX), "{spinner} {elapsed_precise} [{bar:30}] {msg}")
            }
        };
        let style = ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
            .with_style(style.progress_chars("=> "));
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    }

    /// Refreshes the bar from the figures so far (cheap: a few atomics and one short string).
    pub fn update(&mut self, recorder: &Recorder) {
        if self.bar.is_hidden() {
            return;
        }
        let now = Instant::now();
        match self.goal {
            Goal::Requests(_) => self.bar.set_position(recorder.completed),
            Goal::Duration(_) => {
                self.bar.set_position(u64::try_from((now - self.started).as_millis()).unwrap_or(u64::MAX));
            }
        }
        let (then, done_then) = self.last;
        let seconds = (now - then).as_secs_f64();
        let rate = if seconds > 0.0 { (recorder.completed - done_then) as f64 / seconds } else { 0.0 };
        self.last = (now, recorder.completed);
        let sent = self.counters.sent.load(Ordering::Relaxed);
        let in_flight = sent.saturating_sub(self.counters.done.load(Ordering::Relaxed));
        self.bar.set_message(format!(
            "{} ok, {} errors, {in_flight} in flight, {rate:.0} req/s",
            recorder.successes,
            recorder.errors()
        ));
    }

    /// Removes the bar, so the report starts on a clean line.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Records calls until every sender is gone (the run has ended and its tasks are dropped),
/// refreshing the progress display as it goes.
pub async fn collect(
    mut results: UnboundedReceiver<Timed>,
    mut recorder: Recorder,
    mut progress: Progress,
) -> Recorder {
    let mut refresh = tokio::time::interval(Duration::from_millis(200));
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            call = results.recv() => match call {
                Some(call) => recorder.record(&call),
                None => break,
            },
            _ = refresh.tick() => progress.update(&recorder),
        }
    }
    progress.finish();
    recorder
}

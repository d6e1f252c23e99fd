//! Keeping one of `llmesh up`'s services running.
//!
//! What it promises:
//! - A service that **exits unexpectedly** (a non-zero status, a signal such as SIGKILL or a
//!   crash) is started again, on the same address, after a delay that doubles with each restart
//!   of the last minute: [`Policy::first_delay`], twice that, four times, ... up to
//!   [`Policy::max_delay`]. A start that fails (the service exits during start-up, or never
//!   serves) counts as one more unexpected exit.
//! - Past [`Policy::max_per_minute`] restarts within one minute it gives up: the service keeps
//!   failing, and `up` stops the whole mesh saying so ([`Outcome::GaveUp`]). `max_per_minute = 0`
//!   restarts nothing (the first unexpected exit stops the mesh).
//! - A service that **exits cleanly** (status 0) was asked to stop by someone (a signal to its
//!   process group, a person): it is not restarted, and the mesh stops with it
//!   ([`Outcome::ExitedCleanly`]).
//! - When `stop` turns true the service is stopped ([`Process::stop`]: SIGTERM, then SIGKILL after
//!   the grace period), whether it is running, waiting for its restart or starting.
//! - Each restart is logged at WARN with the service's name, why it exited, the delay, and how
//!   many restarts it has had in all and in the last minute.
//!
//! What it does not do: restart the services that depend on the one that failed (they reconnect
//! by themselves: the gateway's channels and the health service's checks retry), or tell anyone
//! but the log (the health service notices a service that is down for longer than its poll
//! interval, as it would anywhere).

use std::{collections::VecDeque, future::Future, time::Duration};

use tokio::{sync::watch, time::Instant};

/// The window [`Policy::max_per_minute`] counts restarts in.
pub const WINDOW: Duration = Duration::from_secs(60);

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Status 0: it was asked to stop.
    Clean,
    /// Anything else, described (`exit status: 1`, `signal: 9 (SIGKILL)`).
    Failed(String),
}

/// A running service, as the supervisor sees it.
pub trait Process: Send {
    /// Its process id, for the log.
    fn id(&self) -> Option<u32>;
    /// Resolves when it exits. Cancel-safe: it may be polled again after being dropped.
    fn wait(&mut self) -> impl Future<Output = Exit> + Send;
    /// Asks it to stop and waits at most `grace` before killing it.
    fn stop(self, grace: Duration) -> impl Future<Output = ()> + Send;
}

/// Starts a service again, on the address and with the settings it had.
pub trait Launcher: Send + Sync {
    type Process: Process;
    /// Starts it and waits until it serves.
    fn launch(&self) -> impl Future<Output = anyhow::Result<Self::Process>> + Send;
}

/// When to restart, and when to give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Before the first restart of a minute.
    pub first_delay: Duration,
    /// The longest delay, however many restarts came before.
    pub max_delay: Duration,
    /// Restarts allowed within [`WINDOW`]; one more exit and the supervisor gives up.
    pub max_per_minute: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self { first_delay: Duration::from_millis(250), max_delay: Duration::from_secs(8), max_per_minute: 5 }
    }
}

/// What the supervisor decides at an unexpected exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after this long.
    RestartAfter(Duration),
    /// Too many restarts within [`WINDOW`].
    GiveUp,
}

/// The restarts of one service: how many in all, and when those of the last [`WINDOW`] were.
#[derive(Debug)]
pub struct Restarts {
    policy: Policy,
    recent: VecDeque<Instant>,
    total: u64,
}

impl Restarts {
    pub fn new(policy: Policy) -> Self {
        Self { policy, recent: VecDeque::new(), total: 0 }
    }

    /// The service exited unexpectedly at `now`: restart it (and count the restart), or give up.
    pub fn on_exit(&mut self, now: Instant) -> Decision {
        while self.recent.front().is_some_and(|&at| now.saturating_duration_since(at) >= WINDOW) {
            self.recent.pop_front();
        }
        let recent = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        if recent >= self.policy.max_per_minute {
            return Decision::GiveUp;
        }
        let delay = self.policy.first_delay.saturating_mul(2u32.saturating_pow(recent)).min(self.policy.max_delay);
        self.recent.push_back(now);
        self.total += 1;
        Decision::RestartAfter(delay)
    }

    /// Restarts since the supervisor started.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Restarts within the last [`WINDOW`], as of the last exit.
    pub fn in_window(&self) -> usize {
        self.recent.len()
    }
}

/// How supervising a service ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `stop` turned true; the service was stopped.
    Stopped,
    /// It exited with status 0: someone asked it to stop.
    ExitedCleanly,
    /// It kept failing: more than [`Policy::max_per_minute`] unexpected exits within a minute.
    GaveUp {
        /// Restarts since the supervisor started.
        restarts: u64,
        /// Why it exited the last time.
        last: String,
    },
}

/// Keeps `process` (the service `name`, which `launcher` starts again) running as the module
/// docs say, until `stop` turns true or the supervisor gives up.
pub async fn supervise<L: Launcher>(
    name: &str,
    mut process: L::Process,
    launcher: &L,
    policy: Policy,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) -> Outcome {
    let mut restarts = Restarts::new(policy);
    loop {
        let exit = tokio::select! {
            exit = process.wait() => exit,
            () = stopped(&mut stop) => {
                process.stop(grace).await;
                return Outcome::Stopped;
            }
        };
        let mut why = match exit {
            Exit::Clean => return Outcome::ExitedCleanly,
            Exit::Failed(why) => why,
        };
        // Until a start succeeds: a failed start is one more unexpected exit.
        process = loop {
            let delay = match restarts.on_exit(Instant::now()) {
                Decision::RestartAfter(delay) => delay,
                Decision::GiveUp => return Outcome::GaveUp { restarts: restarts.total(), last: why },
            };
            tracing::warn!(
                service = name,
                restarts = restarts.total(),
                "{name} exited unexpectedly ({why}); restarting it in {} ms (restart {}; {} in the last minute, at most {})",
                delay.as_millis(),
                restarts.total(),
                restarts.in_window(),
                policy.max_per_minute,
            );
            let launched = tokio::select! {
                launched = async {
                    tokio::time::sleep(delay).await;
                    launcher.launch().await
                } => launched,
                () = stopped(&mut stop) => return Outcome::Stopped,
            };
            match launched {
                Ok(process) => {
                    let pid = process.id().map(|pid| pid.to_string()).unwrap_or_else(|| "?".to_string());
                    tracing::warn!(
                        service = name,
                        restarts = restarts.total(),
                        pid,
                        "{name} restarted (pid {pid}) and serving"
                    );
                    break process;
                }
                Err(error) => why = format!("restart failed: {error:#}"),
            }
        };
    }
}

/// Resolves once `stop` is true, or its sender is gone (nobody is left to ask: stop too).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, before any other await.
    let _ = stop.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    };

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy(max_per_minute: u32) -> Policy {
        Policy { first_delay: 100 * MS, max_delay: 1_000 * MS, max_per_minute }
    }

    #[tokio::test(start_paused = true)]
    async fn delays_double_up_to_the_most_and_the_cap_counts_one_minute() {
        let mut restarts = Restarts::new(policy(5));
        let start = Instant::now();
        let delays: Vec<_> = (0..5).map(|_| restarts.on_exit(start)).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1000].map(|ms| Decision::RestartAfter(ms * MS)).to_vec(),
            "doubling from first_delay, capped at max_delay"
        );
        assert_eq!(restarts.on_exit(start + 59_999 * MS), Decision::GiveUp, "a sixth exit within the minute");
        assert_eq!(restarts.total(), 5);
        // A minute after those restarts they no longer count: the delay starts over.
        assert_eq!(restarts.on_exit(start + 60_000 * MS), Decision::RestartAfter(100 * MS));
        assert_eq!(restarts.total(), 6);
        assert_eq!(restarts.in_window(), 1);
    }

    #[test]
    fn no_restarts_allowed_gives_up_at_once() {
        let mut restarts = Restarts::new(policy(0));
        assert_eq!(restarts.on_exit(Instant::now()), Decision::GiveUp);
    }

    /// A process that fails after `lifetime` (never when `None`), and notes when it was stopped.
    struct Fake {
        id: u32,
        dies_at: Option<Instant>,
        exit: Exit,
        stopped: Arc<AtomicBool>,
    }

    impl Process for Fake {
        fn id(&self) -> Option<u32> {
            Some(self.id)
        }

        async fn wait(&mut self) -> Exit {
            match self.dies_at {
                Some(at) => {
                    tokio::time::sleep_until(at).await;
                    self.exit.clone()
                }
                None => std::future::pending().await,
            }
        }

        async fn stop(self, _grace: Duration) {
            self.stopped.store(true, Ordering::SeqCst);
        }
    }

    /// Launches [`Fake`]s: the n-th launch fails to start when `plan[n]` is `Err`, and otherwise
    /// lives `plan[n]` (forever past the plan). Records when each launch was asked for.
    struct FakeLauncher {
        plan: Vec<Result<Option<Duration>, ()>>,
        launches: Mutex<Vec<Instant>>,
        stopped: Arc<AtomicBool>,
    }

    impl FakeLauncher {
        fn new(plan: Vec<Result<Option<Duration>, ()>>) -> Self {
            Self { plan, launches: Mutex::default(), stopped: Arc::default() }
        }

        fn process(&self, id: u32, lifetime: Option<Duration>, exit: Exit) -> Fake {
            Fake { id, dies_at: lifetime.map(|l| Instant::now() + l), exit, stopped: self.stopped.clone() }
        }

        fn launched_at(&self, origin: Instant) -> Vec<u128> {
            self.launches.lock().unwrap().iter().map(|at| (*at - origin).as_millis()).collect()
        }
    }

    impl Launcher for FakeLauncher {
        type Process = Fake;

        async fn launch(&self) -> anyhow::Result<Fake> {
            let n = {
                let mut launches = self.launches.lock().unwrap();
                launches.push(Instant::now());
                launches.len() - 1
            };
            match self.plan.get(n).cloned().unwrap_or(Ok(None)) {
                Ok(lifetime) => Ok(self.process(n as u32 + 1, lifetime, Exit::Failed("signal: 9 (SIGKILL)".into()))),
                Err(()) => anyhow::bail!("exited during start-up"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_killed_service_is_restarted_after_each_backoff_then_given_up() {
        // Each run lives 10 ms: the restarts come at 10+100, then +10+200, +10+400, +10+800, +10+1000;
        // the sixth exit within the minute gives up.
        let launcher = FakeLauncher::new(vec![Ok(Some(10 * MS)); 10]);
        let origin = Instant::now();
        let first = launcher.process(0, Some(10 * MS), Exit::Failed("signal: 9 (SIGKILL)".into()));
        let (_stop_tx, stop) = watch::channel(false);
        let outcome = supervise("generation", first, &launcher, policy(5), stop, MS).await;
        assert_eq!(outcome, Outcome::GaveUp { restarts: 5, last: "signal: 9 (SIGKILL)".into() });
        assert_eq!(launcher.launched_at(origin), vec![110, 320, 730, 1540, 2550]);
        assert_eq!((Instant::now() - origin).as_millis(), 2560, "gave up at the sixth exit, not later");
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_that_stays_up_is_not_restarted_and_is_stopped_on_request() {
        let launcher = FakeLauncher::new(vec![]);
        let origin = Instant::now();
        let first = launcher.process(0, Some(10 * MS), Exit::Failed("exit status: 101".into()));
        let (stop_tx, stop) = watch::channel(false);
        let supervisor = tokio::spawn(async move {
            let outcome = supervise("cache", first, &launcher, policy(5), stop, MS).await;
            (outcome, launcher)
        });
        tokio::time::sleep(60_000 * MS).await;
        stop_tx.send(true).unwrap();
        let (outcome, launcher) = supervisor.await.unwrap();
        assert_eq!(outcome, Outcome::Stopped);
        assert_eq!(launcher.launched_at(origin), vec![110], "one restart; the second process ran on");
        assert!(launcher.stopped.load(Ordering::SeqCst), "the running process was stopped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_start_counts_as_an_exit() {
        let launcher = FakeLauncher::new(vec![Err(()), Err(()), Ok(None)]);
        let origin = Instant::now();
        let first = launcher.process(0, Some(MS), Exit::Failed("exit status: 1".into()));
        let (stop_tx, stop) = watch::channel(false);
        let supervisor = tokio::spawn(async move {
            let outcome = supervise("gateway", first, &launcher, policy(5), stop, MS).await;
            (outcome, launcher)
        });
        tokio::time::sleep(10_000 * MS).await;
        stop_tx.send(true).unwrap();
        let (outcome, launcher) = supervisor.await.unwrap();
        assert_eq!(outcome, Outcome::Stopped);
        assert_eq!(launcher.launched_at(origin), vec![101, 301, 701], "100, then 200, then 400 ms after each failure");
    }

    #[tokio::test(start_paused = true)]
    async fn a_clean_exit_is_not_restarted() {
        let launcher = FakeLauncher::new(vec![]);
        let first = launcher.process(0, Some(MS), Exit::Clean);
        let (_stop_tx, stop) = watch::channel(false);
        let outcome = supervise("health", first, &launcher, policy(5), stop, MS).await;
        assert_eq!(outcome, Outcome::ExitedCleanly);
        assert!(launcher.launched_at(Instant::now()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_during_the_backoff_starts_nothing() {
        let launcher = FakeLauncher::new(vec![]);
        let origin = Instant::now();
        let first = launcher.process(0, Some(MS), Exit::Failed("exit status: 1".into()));
        let (stop_tx, stop) = watch::channel(false);
        let supervisor = tokio::spawn(async move {
            let outcome = supervise("generation", first, &launcher, policy(5), stop, MS).await;
            (outcome, launcher)
        });
        tokio::time::sleep(50 * MS).await;
        stop_tx.send(true).unwrap();
        let (outcome, launcher) = supervisor.await.unwrap();
        assert_eq!(outcome, Outcome::Stopped);
        assert!(launcher.launched_at(origin).is_empty(), "stopped within the 100 ms backoff");
        assert!(!launcher.stopped.load(Ordering::SeqCst), "nothing was running to stop");
    }

    #[tokio::test(start_paused = true)]
    async fn no_restarts_allowed_stops_at_the_first_failure() {
        let launcher = FakeLauncher::new(vec![]);
        let first = launcher.process(0, Some(MS), Exit::Failed("signal: 9 (SIGKILL)".into()));
        let (_stop_tx, stop) = watch::channel(false);
        let outcome = supervise("generation", first, &launcher, policy(0), stop, MS).await;
        assert_eq!(outcome, Outcome::GaveUp { restarts: 0, last: "signal: 9 (SIGKILL)".into() });
    }
}

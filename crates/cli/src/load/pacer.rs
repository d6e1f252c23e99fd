//! When the open loop's calls are due: a [`Ticker`] that yields `0, 1, 2, …`, each at its
//! [`Schedule`] time, on the task that starts the calls.
//!
//! Every microsecond the client is late is counted in the call's latency (from its intended
//! start), so the clock matters as much as the mesh:
//!
//! - Tokio's timer rounds every sleep up to the next millisecond: a call due every 2 ms (500
//!   req/s) starts up to 1 ms late.
//! - A thread of its own sleeping with the OS's high-resolution timer (what this used to be) is
//!   on time to tens of microseconds, but then has to hand each tick to a runtime thread parked
//!   in `epoll_wait`: a second thread wake-up. With the sleep's default 50 µs timer slack that
//!   made a start lag of about 0.16 ms at p50 on the 2-core benchmark machine.
//! - A Linux `timerfd` armed for the next start and polled by the runtime itself (this module)
//!   wakes the runtime thread directly, without timer slack, and the call starts on the thread
//!   the timer woke.
//!
//! The runtime's timer stays for tests in paused time (a timerfd follows the real clock, not the
//! virtual one), on other systems, and when a timerfd cannot be made.

use tokio::time::Instant;

use super::schedule::Schedule;

/// Which clock paces the open loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// A timerfd polled by the runtime (Linux; microsecond resolution). For real runs.
    Precise,
    /// The Tokio runtime's timer (millisecond resolution), which follows paused time.
    #[cfg(test)]
    Runtime,
}

/// The open loop's timetable as a sequence of ticks, each returned when it is due.
pub struct Ticker {
    clock: Clock,
    schedule: Schedule,
    limit: Option<u64>,
    end: Option<Instant>,
    next: u64,
}

impl Ticker {
    /// Ticks `0, 1, 2, …` at `schedule.at(n)`, never early, until `limit` ticks were given or the
    /// next one would be due at or after `end`. Must be called within a Tokio runtime.
    pub fn new(pacing: Pacing, schedule: Schedule, limit: Option<u64>, end: Option<Instant>) -> Self {
        let clock = match pacing {
            #[cfg(test)]
            Pacing::Runtime => Clock::Runtime,
            Pacing::Precise => Clock::precise(),
        };
        Self { clock, schedule, limit, end, next: 0 }
    }

    /// Waits for the next tick and returns its number, or `None` when the timetable is over.
    /// Cancel-safe: a tick is given out only by the call that returns it.
    pub async fn tick(&mut self) -> Option<u64> {
        let seq = self.next;
        let at = self.schedule.at(seq);
        if self.limit.is_some_and(|n| seq >= n) || self.end.is_some_and(|end| at >= end) {
            return None;
        }
        self.clock.sleep_until(at).await;
        self.next += 1;
        Some(seq)
    }
}

enum Clock {
    Runtime,
    #[cfg(target_os = "linux")]
    TimerFd(timerfd::Timer),
}

impl Clock {
    fn precise() -> Self {
        #[cfg(target_os = "linux")]
        match timerfd::Timer::new() {
            Ok(timer) => return Self::TimerFd(timer),
            Err(error) => {
                tracing::warn!(%error, "no timerfd; the open loop runs on the runtime's millisecond timer");
            }
        }
        Self::Runtime
    }

    async fn sleep_until(&mut self, at: Instant) {
        match self {
            Self::Runtime => tokio::time::sleep_until(at).await,
            #[cfg(target_os = "linux")]
            Self::TimerFd(timer) => {
                if let Err(error) = timer.sleep_until(at).await {
                    tracing::warn!(%error, "the timerfd failed; the open loop goes on on the runtime's millisecond timer");
                    *self = Self::Runtime;
                    tokio::time::sleep_until(at).await;
                }
            }
        }
    }
}

#[cfg(target_os = "linux")]
mod timerfd {
    use std::{
        io,
        os::fd::{AsFd as _, AsRawFd, RawFd},
    };

    use nix::sys::{
        time::TimeSpec,
        timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags},
    };
    use tokio::{io::unix::AsyncFd, time::Instant};

    /// A one-shot monotonic timerfd registered with the runtime's I/O driver.
    pub struct Timer(AsyncFd<Owned>);

    /// The timerfd, which owns its descriptor: the same open one for as long as it lives.
    pub struct Owned(TimerFd);

    impl AsRawFd for Owned {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_fd().as_raw_fd()
        }
    }

    impl Timer {
        pub fn new() -> io::Result<Self> {
            let fd = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)?;
            // Tokio deprecates `AsyncFd::new` because a type could return a different or closed
            // descriptor from `as_raw_fd` while registered; `Owned` cannot: it owns the one it
            // returns until it is dropped with the `AsyncFd`. (The replacement, `register`, is
            // `unsafe`, which this workspace forbids.)
            #[allow(deprecated)]
            let registered = AsyncFd::new(Owned(fd))?;
            Ok(Self(registered))
        }

        /// Returns at `at` or just after. Tokio's `Instant` is the monotonic clock, but it does not
        /// expose its value, so the timer is armed with the time left (relative), a few hundred
        /// nanoseconds after `now` was read: never early.
        pub async fn sleep_until(&self, at: Instant) -> io::Result<()> {
            let now = Instant::now();
            if at <= now {
                return Ok(());
            }
            let left = TimeSpec::from_duration(at - now);
            self.0.get_ref().0.set(Expiration::OneShot(left), TimerSetTimeFlags::empty())?;
            loop {
                let mut ready = self.0.readable().await?;
                // The expiry count; reading it resets readiness. EAGAIN: not expired yet.
                let mut count = [0u8; 8];
                match ready.try_io(|fd| nix::unistd::read(fd.get_ref().0.as_fd(), &mut count).map_err(io::Error::from))
                {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                    Ok(Err(error)) => return Err(error),
                    Err(_would_block) => {}
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
        let mut ticker = Ticker::new(pacing, schedule, limit, end);
        let mut got = Vec::new();
        while let Some(seq) = ticker.tick().await {
            got.push((seq, Instant::now()));
        }
        got
    }

    #[tokio::test]
    async fn precise_ticks_come_in_order_and_never_early() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 2000.0);
        let got = collect(Pacing::Precise, schedule, Some(200), None).await;
        assert_eq!(got.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), (0..200).collect::<Vec<_>>());
        for (seq, arrived) in got {
            assert!(arrived >= schedule.at(seq), "tick {seq} arrived before its time");
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn on_linux_precise_means_a_timerfd() {
        let ticker = Ticker::new(Pacing::Precise, Schedule::new(Instant::now(), 1.0), None, None);
        assert!(matches!(ticker.clock, Clock::TimerFd(_)));
    }

    #[tokio::test]
    async fn precise_ticks_stop_at_the_end_of_the_window() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 1000.0);
        let got = collect(Pacing::Precise, schedule, None, Some(start + Duration::from_millis(50))).await;
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

    #[tokio::test(start_paused = true)]
    async fn a_dropped_wait_gives_out_no_tick() {
        let start = Instant::now();
        let mut ticker = Ticker::new(Pacing::Runtime, Schedule::new(start, 10.0), None, None);
        assert_eq!(ticker.tick().await, Some(0));
        // Tick 1 is due at 100 ms; give up waiting for it at 50 ms.
        assert!(tokio::time::timeout(Duration::from_millis(50), ticker.tick()).await.is_err());
        assert_eq!(ticker.tick().await, Some(1));
        assert_eq!(Instant::now() - start, Duration::from_millis(100));
    }
}

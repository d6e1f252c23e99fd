//! Files re-read while the process runs: certificates and keys (cert-manager renewals, Kubernetes
//! Secret updates) and the gateway's API keys, without a restart and without touching calls in
//! flight.
//!
//! [`watch`] reads the files once, through the caller's loader; an error then is the caller's
//! start-up error (the loader's errors name the file). After that, the files are read again
//! - when anything changes in a directory holding one of them (inotify through `notify`: writes in
//!   place, renames over the file, and Kubernetes' swap of a Secret volume's `..data` symlink),
//! - on SIGHUP (always, even when the bytes are the same),
//! - and every [`POLL_INTERVAL`] as a safety net for file systems that send no events.
//!
//! A read waits [`DEBOUNCE`] after the first event, so that a burst of writes (a certificate, then
//! its key) is read once. When the files' bytes differ from those in use, the loader builds a new
//! value, which every later [`Live::load`] sees; whoever already holds the old one keeps it until
//! they drop it (a TLS connection, a call in flight).
//!
//! **A broken new version keeps the old one.** The error is logged at ERROR (naming the file),
//! counted (`llmesh_reloads_total{file, result="error"}`) and `llmesh_reload_failing{file}` is 1
//! until a later version loads. The same broken bytes are not reported again on every poll.
//!
//! Not promised: files written one after another are not read atomically. A certificate renewed
//! before its key may fail to load once (a key that does not match); it loads when the key arrives,
//! and the failure is counted.

use std::{
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use notify::Watcher as _;
use opentelemetry::KeyValue;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};

/// How often the files are read even without an event.
pub const POLL_INTERVAL: Duration = Duration::from_secs(30);
/// How long after a change the files are read: writes that belong together land first.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// A value built from files, replaced whole when they change. Cheap to clone (shared).
pub struct Live<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

impl<T> std::fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").field("failing", &self.failing()).finish_non_exhaustive()
    }
}

struct Shared<T> {
    value: ArcSwap<T>,
    /// The last read of the files failed: the value in use is an older version.
    failing: AtomicBool,
    /// The task following the files; stops when the last handle goes.
    _follower: Option<llmesh_util::AbortOnDropHandle<()>>,
    _gauge: Option<opentelemetry::metrics::ObservableGauge<u64>>,
}

impl<T> Live<T> {
    /// A value that never changes (nothing to watch).
    pub fn fixed(value: impl Into<Arc<T>>) -> Self {
        Self {
            shared: Arc::new(Shared {
                value: ArcSwap::new(value.into()),
                failing: AtomicBool::new(false),
                _follower: None,
                _gauge: None,
            }),
        }
    }

    /// The version in use: cheap, never blocks, for every call.
    pub fn load(&self) -> arc_swap::Guard<Arc<T>> {
        self.shared.value.load()
    }

    /// The version in use, to keep (for a connection's lifetime, say).
    pub fn current(&self) -> Arc<T> {
        self.shared.value.load_full()
    }

    /// Whether the last read of the files failed (the value in use is an older version).
    pub fn failing(&self) -> bool {
        self.shared.failing.load(Ordering::Relaxed)
    }
}

impl<T> From<Arc<T>> for Live<T> {
    fn from(value: Arc<T>) -> Self {
        Self::fixed(value)
    }
}

/// Builds the value with `load` and keeps it up to date with `paths` (see the module's
/// documentation). `file` names the files in logs and in the metrics' `file` label (`keys`, `tls`,
/// ...): a fixed name, not a path. Needs a Tokio runtime.
pub fn watch<T, F>(file: &'static str, paths: Vec<PathBuf>, mut load: F) -> anyhow::Result<Live<T>>
where
    T: Send + Sync + 'static,
    F: FnMut() -> anyhow::Result<T> + Send + 'static,
{
    let seen = fingerprint(&paths);
    let first = load()?;
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads (ours included) are not changes: reacting to them would read forever.
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
        {
            let _ = events_tx.send(());
        }
    })
    .with_context(|| format!("cannot watch the {file} files"))?;
    let watched = watch_directories(&mut watcher, &paths, &[]).with_context(|| format!("the {file} files"))?;
    let hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(error) => {
            tracing::warn!(file, %error, "cannot listen for SIGHUP; the files are re-read when they change");
            None
        }
    };
    let shared = Arc::new_cyclic(|weak: &Weak<Shared<T>>| {
        let follower = Follower {
            shared: weak.clone(),
            file,
            paths,
            seen,
            events,
            hangup,
            watched,
            reloads: llmesh_telemetry::meter()
                .u64_counter("llmesh.reloads")
                .with_description(
                    "Files re-read while running, by result (ok, error: the previous version stays in use)",
                )
                .build(),
            _watcher: watcher,
        };
        let task = tokio::spawn(follower.run(load));
        let failing = weak.clone();
        let gauge = llmesh_telemetry::meter()
            .u64_observable_gauge("llmesh.reload_failing")
            .with_description("1 while the files on disk cannot be used and an older version is in use")
            .with_callback(move |gauge| {
                if let Some(shared) = failing.upgrade() {
                    gauge.observe(u64::from(shared.failing.load(Ordering::Relaxed)), &[KeyValue::new("file", file)]);
                }
            })
            .build();
        Shared {
            value: ArcSwap::new(Arc::new(first)),
            failing: AtomicBool::new(false),
            _follower: Some(llmesh_util::AbortOnDropHandle::new(task)),
            _gauge: Some(gauge),
        }
    });
    Ok(Live { shared })
}

/// The directory whose entries change when `path` is replaced.
fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// The directories where a change to `path` shows: its own, and the one holding each symlink on
/// the way to it (a Kubernetes projected volume swaps `..data` at its root, above `tls/tls.crt`).
fn directories_of(path: &Path) -> Vec<PathBuf> {
    let mut directories = vec![directory_of(path).to_path_buf()];
    let mut prefix = PathBuf::new();
    for component in path.components() {
        prefix.push(component);
        if prefix != path && std::fs::symlink_metadata(&prefix).is_ok_and(|m| m.file_type().is_symlink()) {
            directories.push(directory_of(&prefix).to_path_buf());
        }
    }
    directories
}

/// Watches the directories of `paths` (anew: an inotify watch follows the symlinks it was given
/// when it was set, so a swapped one must be watched again); the directories watched.
fn watch_directories(
    watcher: &mut notify::RecommendedWatcher,
    paths: &[PathBuf],
    before: &[PathBuf],
) -> anyhow::Result<Vec<PathBuf>> {
    for directory in before {
        let _ = watcher.unwatch(directory);
    }
    let mut directories: Vec<PathBuf> = paths.iter().flat_map(|path| directories_of(path)).collect();
    directories.sort();
    directories.dedup();
    for directory in &directories {
        watcher
            .watch(directory, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {} for changes", directory.display()))?;
    }
    Ok(directories)
}

/// What the files hold now (a missing or unreadable file counts as its error).
fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    for path in paths {
        match std::fs::read(path) {
            Ok(bytes) => bytes.hash(&mut hasher),
            Err(error) => error.kind().hash(&mut hasher),
        }
    }
    hasher.finish()
}

struct Follower<T> {
    shared: Weak<Shared<T>>,
    file: &'static str,
    paths: Vec<PathBuf>,
    /// The fingerprint of the last version read (loaded or not).
    seen: u64,
    events: mpsc::UnboundedReceiver<()>,
    hangup: Option<Signal>,
    /// The directories watched now.
    watched: Vec<PathBuf>,
    reloads: opentelemetry::metrics::Counter<u64>,
    /// Stops watching when the follower ends.
    _watcher: notify::RecommendedWatcher,
}

impl<T: Send + Sync + 'static> Follower<T> {
    async fn run(mut self, mut load: impl FnMut() -> anyhow::Result<T>) {
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            let forced = tokio::select! {
                event = self.events.recv() => match event {
                    Some(()) => false,
                    // The watcher is gone: polling and SIGHUP still work.
                    None => { self.events = mpsc::unbounded_channel().1; false }
                },
                () = hangup(&mut self.hangup) => true,
                _ = poll.tick() => false,
            };
            tokio::time::sleep(DEBOUNCE).await;
            while self.events.try_recv().is_ok() {}
            // A swapped symlink leaves a watch on the directory it pointed to: watch anew.
            match watch_directories(&mut self._watcher, &self.paths, &self.watched) {
                Ok(watched) => self.watched = watched,
                Err(error) => tracing::warn!(file = self.file, "{error:#}; the files are still polled"),
            }
            let Some(shared) = self.shared.upgrade() else { return };
            let now = fingerprint(&self.paths);
            if now == self.seen && !forced {
                continue;
            }
            self.seen = now;
            let shown = self.paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
            match load() {
                Ok(value) => {
                    shared.value.store(Arc::new(value));
                    shared.failing.store(false, Ordering::Relaxed);
                    self.reloads.add(1, &[KeyValue::new("file", self.file), KeyValue::new("result", "ok")]);
                    tracing::info!(file = self.file, paths = %shown, "re-read; new calls and connections use the new version");
                }
                Err(error) => {
                    shared.failing.store(true, Ordering::Relaxed);
                    self.reloads.add(1, &[KeyValue::new("file", self.file), KeyValue::new("result", "error")]);
                    tracing::error!(
                        file = self.file,
                        paths = %shown,
                        "cannot use the changed {} files, keeping the version in use: {error:#}",
                        self.file
                    );
                }
            }
        }
    }
}

/// The next SIGHUP (never, without a listener).
async fn hangup(signal: &mut Option<Signal>) {
    match signal {
        Some(signal) => {
            if signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The number in `path`, or an error naming it.
    fn read_number(path: &Path) -> anyhow::Result<u32> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        text.trim().parse().with_context(|| format!("{} holds no number", path.display()))
    }

    async fn until(live: &Live<u32>, want: u32) -> bool {
        for _ in 0..250 {
            if **live.load() == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_changed_file_replaces_the_value_and_a_broken_one_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.txt");
        std::fs::write(&path, "1").unwrap();
        let read = path.clone();
        let live = watch("test", vec![path.clone()], move || read_number(&read)).unwrap();
        assert_eq!(**live.load(), 1);
        assert!(!live.failing());

        std::fs::write(&path, "2").unwrap();
        assert!(until(&live, 2).await, "the change was not seen");

        std::fs::write(&path, "not a number").unwrap();
        for _ in 0..250 {
            if live.failing() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(live.failing(), "the broken version was not noticed");
        assert_eq!(**live.load(), 2, "a broken version replaced the good one");

        // Replaced by a rename, as editors and Kubernetes do.
        let fresh = dir.path().join("n.txt.new");
        std::fs::write(&fresh, "3").unwrap();
        std::fs::rename(&fresh, &path).unwrap();
        assert!(until(&live, 3).await, "the renamed file was not seen");
        assert!(!live.failing());
    }

    #[tokio::test]
    async fn a_kubernetes_secret_swap_is_seen() {
        // A Secret volume: `tls.crt -> ..data/tls.crt`, `..data -> ..<timestamp>`; an update
        // writes a new timestamped directory and renames a new `..data` link over the old one.
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("..2026_01");
        std::fs::create_dir(&first).unwrap();
        std::fs::write(first.join("n.txt"), "10").unwrap();
        std::os::unix::fs::symlink("..2026_01", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/n.txt", dir.path().join("n.txt")).unwrap();
        let path = dir.path().join("n.txt");
        let read = path.clone();
        let live = watch("test", vec![path], move || read_number(&read)).unwrap();
        assert_eq!(**live.load(), 10);

        let second = dir.path().join("..2026_02");
        std::fs::create_dir(&second).unwrap();
        std::fs::write(second.join("n.txt"), "11").unwrap();
        std::os::unix::fs::symlink("..2026_02", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert!(until(&live, 11).await, "the swapped Secret was not seen");
    }

    #[tokio::test]
    async fn a_projected_volume_swap_is_seen_again_and_again() {
        // A projected volume: `tls -> ..data/tls`, `..data -> ..<timestamp>`, swapped at its root.
        let dir = tempfile::tempdir().unwrap();
        let version = |name: &str, value: &str| {
            let tls = dir.path().join(name).join("tls");
            std::fs::create_dir_all(&tls).unwrap();
            std::fs::write(tls.join("n.txt"), value).unwrap();
        };
        version("..v1", "20");
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/tls", dir.path().join("tls")).unwrap();
        let path = dir.path().join("tls").join("n.txt");
        let read = path.clone();
        let live = watch("test", vec![path], move || read_number(&read)).unwrap();
        assert_eq!(**live.load(), 20);
        for (n, value) in [(2, 21), (3, 22), (4, 23)] {
            version(&format!("..v{n}"), &value.to_string());
            std::os::unix::fs::symlink(format!("..v{n}"), dir.path().join("..data_tmp")).unwrap();
            std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
            std::fs::remove_dir_all(dir.path().join(format!("..v{}", n - 1))).unwrap();
            assert!(until(&live, value).await, "swap {n} was not seen");
        }
    }

    #[tokio::test]
    async fn a_broken_file_at_start_is_the_loaders_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.txt");
        let read = path.clone();
        let error = watch("test", vec![path.clone()], move || read_number(&read)).unwrap_err();
        assert!(format!("{error:#}").contains(&path.display().to_string()), "{error:#}");
    }

    #[test]
    fn fixed_values_never_fail() {
        let live = Live::fixed(7u32);
        assert_eq!(**live.load(), 7);
        assert_eq!(*live.current(), 7);
        assert!(!live.failing());
    }
}

//! The Tokio runtime every process runs on, sized by `LLMESH_WORKER_THREADS`.
//!
//! By default Tokio starts one worker thread per core it may use (cgroup CPU limits included).
//! That suits one service alone on a machine. Several services on the same cores (`llmesh up`, a
//! laptop, a benchmark host) each start that many workers, and a call that crosses three
//! processes then wakes a thread per hop that has to find a free core: on the 2-core benchmark
//! machine one worker per service gave the lower p99 in most of the compared runs (docs/BENCHMARKS.md,
//! "Worker threads"). `llmesh up` sets it to 1 for its children; a container with a CPU limit of
//! one core or less gets one worker by Tokio's own count.

use anyhow::Context as _;
use tokio::runtime::{Builder, Runtime};

/// The variable that sets the number of worker threads.
pub const WORKER_THREADS_ENV: &str = "LLMESH_WORKER_THREADS";

/// A multi-threaded runtime with `LLMESH_WORKER_THREADS` workers, or Tokio's default when unset.
pub fn runtime() -> anyhow::Result<Runtime> {
    let workers = worker_threads(std::env::var(WORKER_THREADS_ENV).ok().as_deref())?;
    let mut builder = Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    builder.enable_all().build().context("cannot build the Tokio runtime")
}

/// Parses the variable's value: a whole number from 1 to 1024; empty or unset means the default.
fn worker_threads(value: Option<&str>) -> anyhow::Result<Option<usize>> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match value.parse::<usize>() {
        Ok(n @ 1..=1024) => Ok(Some(n)),
        _ => anyhow::bail!("{WORKER_THREADS_ENV}={value:?}: expected a number of threads from 1 to 1024"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_or_empty_is_the_default_and_numbers_are_taken() {
        assert_eq!(worker_threads(None).unwrap(), None);
        assert_eq!(worker_threads(Some(" ")).unwrap(), None);
        assert_eq!(worker_threads(Some("1")).unwrap(), Some(1));
        assert_eq!(worker_threads(Some(" 8 ")).unwrap(), Some(8));
    }

    #[test]
    fn nonsense_is_refused_with_the_variable_named() {
        for bad in ["0", "-1", "two", "1.5", "100000"] {
            let error = worker_threads(Some(bad)).unwrap_err().to_string();
            assert!(error.starts_with("LLMESH_WORKER_THREADS="), "{error}");
        }
    }
}

//! Plumbing every llmesh service shares: configuration in layers, logging, the gRPC server
//! runner (health, reflection, graceful shutdown), dependency checks and request validation.

pub mod cache_key;
pub mod config;
pub mod deps;
pub mod logging;
pub mod server;
pub mod shutdown;
pub mod validate;

pub use config::ServiceArgs;

use std::{future::Future, process::ExitCode};

/// The body of every service's `main`: logging, a multi-threaded runtime, and an exit code that
/// says whether `run` failed (its error and cause chain are logged).
pub fn run_main<F, Fut>(run: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    logging::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

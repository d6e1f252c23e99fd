//! The runner every llmesh service shares: configuration in layers, logging, the gRPC server
//! (health, reflection, tracing, message bounds, graceful shutdown) and dependency checks. The
//! contract's rules (request validation, the cache key) live with the contract in `llmesh-proto`;
//! small helpers any crate may use (redaction, error chains, task handles) in `llmesh-util`.

pub mod config;
pub mod deps;
pub mod logging;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod shutdown;
pub mod tls;

pub use config::{ServiceArgs, ServiceConfig};

use std::{future::Future, pin::Pin, process::ExitCode};

use tokio::net::TcpListener;

/// The signal a service stops on.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What every service binary does: load its configuration (or only check it, with
/// `--check-config`), register for SIGTERM / Ctrl-C before anything can arrive, bind, and serve.
pub async fn run_service<C, F, Fut>(args: ServiceArgs, serve: F) -> anyhow::Result<()>
where
    C: ServiceConfig,
    F: FnOnce(C, TcpListener, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config: C = config::load(C::SECTION, &args)?;
    if args.check_config {
        // A real start builds the same things itself (and stops on the same errors): checking
        // them there too would do the work, and log its warnings, twice.
        config.check()?;
        tracing::info!("configuration is valid");
        return Ok(());
    }
    let shutdown: Shutdown = Box::pin(shutdown::signal());
    let listener = server::bind(config.listen()).await?;
    serve(config, listener, shutdown).await
}

/// The body of every process's `main`: a multi-threaded runtime (see [`runtime`]), telemetry for
/// `service` (logs, and OTLP export when configured; flushed on the way out), and an exit code
/// that says whether `run` failed (its error and cause chain are logged).
pub fn run_main<F, Fut>(service: &str, run: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let runtime = match runtime::runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            logging::init();
            tracing::error!("cannot start the async runtime: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let telemetry = match llmesh_telemetry::init(service) {
            Ok(telemetry) => telemetry,
            Err(error) => {
                logging::init();
                tracing::error!("telemetry configuration: {error:#}");
                return ExitCode::FAILURE;
            }
        };
        let result = run().await;
        telemetry.shutdown().await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!("{error:#}");
                ExitCode::FAILURE
            }
        }
    })
}

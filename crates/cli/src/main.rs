//! `llmesh`: run the whole mesh on one machine (`llmesh up`) or any one service (`llmesh serve`),
//! send it load (`llmesh load`), manage its API keys (`llmesh keys`), make development certificates
//! (`llmesh certs`).
//!
//! A service (`serve`) logs at `info`, as every service does. The commands an operator runs by
//! hand print what they were asked for and otherwise only warnings and errors: their default log
//! filter is [`COMMAND_LOG_FILTER`], and `RUST_LOG` overrides it.

mod certs;
mod keys;
mod load;
mod spend;
mod up;

use std::{future::Future, process::ExitCode};

use clap::{Parser, Subcommand};
use llmesh_common::ServiceArgs;

/// jemalloc, as the services: `serve` runs one in this process (docs/BENCHMARKS.md §26).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "llmesh", version, about = "llmesh: a gRPC service mesh for LLM applications")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start all four services as child processes, wait until each is SERVING, and print how to call them.
    Up(up::UpArgs),
    /// Send load to a gateway (or straight to generation) and report throughput, errors and latency.
    Load(load::LoadArgs),
    /// Manage the gateway's API keys: make, list, revoke, and change their limits.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Make a development CA and the certificates a mesh needs (for `llmesh up --tls DIR`).
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// Show what an API key or a team has spent of its budget in a period (read from Redis).
    Spend(spend::SpendArgs),
    /// Run one service in this process (what `llmesh up` runs in each child).
    Serve {
        #[arg(value_enum)]
        service: Service,
        #[command(flatten)]
        args: ServiceArgs,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    Gateway,
    Generation,
    Cache,
    Health,
}

/// The default log filter of the commands other than `serve`: warnings and errors, plus the
/// progress lines of `up` and `load` (which children stopped, what load is being sent). The
/// telemetry banner and the libraries' info lines are not what an operator asked for.
const COMMAND_LOG_FILTER: &str = "warn,llmesh::up=info,llmesh::load=info";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { service, args } => llmesh_common::run_main(service.name(), || async move {
            match service {
                Service::Gateway => llmesh_gateway::run(args).await,
                Service::Generation => llmesh_generation::run(args).await,
                Service::Cache => llmesh_cache::run(args).await,
                Service::Health => llmesh_health::run(args).await,
            }
        }),
        Command::Up(args) => run_command(Export::Yes, || up::run(args)),
        Command::Load(args) => run_command(Export::Yes, || load::run(args)),
        // Editing a file by hand has nothing to export (and no reason to wait for a collector).
        Command::Keys { command } => run_command(Export::No, || async move { keys::run(command) }),
        Command::Certs { command } => run_command(Export::No, || async move { certs::run(command) }),
        Command::Spend(args) => run_command(Export::No, || spend::run(args)),
    }
}

/// Whether a command sends OTLP telemetry when the environment configures it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Export {
    Yes,
    No,
}

/// [`llmesh_common::run_main`] for a command: the same runtime, telemetry and exit code, with
/// [`COMMAND_LOG_FILTER`] unless `RUST_LOG` is set.
fn run_command<F, Fut>(export: Export, run: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let telemetry = llmesh_telemetry::TelemetryConfig::from_lookup("cli", |name| match name {
        "OTEL_SDK_DISABLED" if export == Export::No => Some("true".to_owned()),
        "RUST_LOG" => std::env::var(name)
            .ok()
            .filter(|value| !value.trim().is_empty())
            .or_else(|| Some(COMMAND_LOG_FILTER.to_owned())),
        _ => std::env::var(name).ok(),
    });
    let runtime = match llmesh_common::runtime::runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            llmesh_common::logging::init();
            tracing::error!("cannot start the async runtime: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let telemetry = match llmesh_telemetry::init_with_config(telemetry) {
            Ok(telemetry) => telemetry,
            Err(error) => {
                llmesh_common::logging::init();
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

//! `llmesh`: run the whole mesh on one machine (`llmesh up`) or any one service (`llmesh serve`).

mod load;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use llmesh_common::ServiceArgs;

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    llmesh_common::run_main(|| async move {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Load(args) => load::run(args).await,
            Command::Serve { service, args } => match service {
                Service::Gateway => llmesh_gateway::run(args).await,
                Service::Generation => llmesh_generation::run(args).await,
                Service::Cache => llmesh_cache::run(args).await,
                Service::Health => llmesh_health::run(args).await,
            },
        }
    })
}

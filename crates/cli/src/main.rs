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
    /// Manage gateway API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Run one service in this process (what `llmesh up` runs in each child).
    Serve {
        #[arg(value_enum)]
        service: Service,
        #[command(flatten)]
        args: ServiceArgs,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new API key: prints the key (give it to its owner; it is not stored) and the
    /// `[[keys]]` entry for the gateway's keys file.
    New {
        /// The key's public name (metrics label, logs).
        #[arg(long)]
        id: String,
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
    let service = match &cli.command {
        Command::Serve { service, .. } => service.name(),
        _ => "cli",
    };
    llmesh_common::run_main(service, || async move {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Load(args) => load::run(args).await,
            Command::Keys { command: KeysCommand::New { id } } => new_key(&id),
            Command::Serve { service, args } => match service {
                Service::Gateway => llmesh_gateway::run(args).await,
                Service::Generation => llmesh_generation::run(args).await,
                Service::Cache => llmesh_cache::run(args).await,
                Service::Health => llmesh_health::run(args).await,
            },
        }
    })
}

fn new_key(id: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let (key, entry) = llmesh_gateway::admission::generate_key(id);
    let mut out = std::io::stdout().lock();
    writeln!(out, "# x-api-key for {id} (shown once; llmesh stores only its SHA-256):\n# {key}")?;
    writeln!(out, "[[keys]]\nid = {:?}\nprefix = {:?}\nsha256 = {:?}", entry.id, entry.prefix, entry.sha256)?;
    Ok(())
}

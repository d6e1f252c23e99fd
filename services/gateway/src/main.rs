use std::process::ExitCode;

use clap::Parser;

/// llmesh gateway: the public entry of the mesh (cache, generation, resilience).
#[derive(Parser)]
#[command(name = "gateway", version)]
struct Cli {
    #[command(flatten)]
    args: llmesh_common::ServiceArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    llmesh_common::run_main("gateway", || llmesh_gateway::run(cli.args))
}

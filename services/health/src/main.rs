use std::process::ExitCode;

use clap::Parser;

/// llmesh health service: the mesh's health over grpc.health.v1 and llmesh.health.v1.MeshHealth.
#[derive(Parser)]
#[command(name = "health", version)]
struct Cli {
    #[command(flatten)]
    args: llmesh_common::ServiceArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    llmesh_common::run_main("health", || llmesh_health::run(cli.args))
}

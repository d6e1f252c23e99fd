use std::process::ExitCode;

use clap::Parser;

/// jemalloc, not glibc's malloc: fewer instructions a call (docs/BENCHMARKS.md §26).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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

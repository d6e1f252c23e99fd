use std::process::ExitCode;

use clap::Parser;

/// jemalloc, not glibc's malloc: fewer instructions a call (docs/BENCHMARKS.md §26).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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

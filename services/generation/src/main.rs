use std::process::ExitCode;

use clap::Parser;

/// jemalloc, not glibc's malloc: fewer instructions a call (docs/BENCHMARKS.md §26).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// llmesh generation service: serves LLM providers (the simulated model, OpenAI-compatible HTTP).
#[derive(Parser)]
#[command(name = "generation", version)]
struct Cli {
    #[command(flatten)]
    args: llmesh_common::ServiceArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    llmesh_common::run_main("generation", || llmesh_generation::run(cli.args))
}

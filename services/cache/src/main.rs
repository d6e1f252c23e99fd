use std::process::ExitCode;

use clap::Parser;

/// jemalloc, not glibc's malloc: fewer instructions a call (docs/BENCHMARKS.md §26).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// llmesh cache service: the response cache, on Redis when `redis_url` is set, in memory otherwise.
#[derive(Parser)]
#[command(name = "cache", version)]
struct Cli {
    #[command(flatten)]
    args: llmesh_common::ServiceArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    llmesh_common::run_main("cache", || llmesh_cache::run(cli.args))
}

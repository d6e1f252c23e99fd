use std::process::ExitCode;

use clap::Parser;

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

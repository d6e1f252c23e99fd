use std::process::ExitCode;

use clap::Parser;

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

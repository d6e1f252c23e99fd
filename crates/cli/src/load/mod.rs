//! `llmesh load`: the load generator (work in progress).

/// Arguments of `llmesh load`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Gateway address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub target: String,
}

pub async fn run(_args: LoadArgs) -> anyhow::Result<()> {
    anyhow::bail!("llmesh load is not implemented yet")
}

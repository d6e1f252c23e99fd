//! `llmesh up`: the whole mesh on one machine. Each service runs as a child process
//! (`llmesh serve <service>`), started in dependency order, wired by environment variables, and
//! stopped with SIGTERM (then SIGKILL after a grace period) when this process is asked to stop.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use llmesh_common::{deps, runtime::WORKER_THREADS_ENV, server};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
    sync::oneshot,
};

use crate::Service;

/// Turns generation's fault-injection models on or off.
const FAULT_MODELS_ENV: &str = "LLMESH_GENERATION_FAULT_MODELS";
/// The model of a `POST /generate` that names none.
const DEFAULT_MODEL_ENV: &str = "LLMESH_GATEWAY_DEFAULT_MODEL";

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Address every service listens on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Gateway port; generation, cache and health take the next three. 0 picks free ports.
    #[arg(long, default_value_t = 50051)]
    base_port: u16,
    /// A Redis for the cache (instead of memory) and the job queue.
    #[arg(long, env = "LLMESH_REDIS_URL")]
    redis_url: Option<String>,
    /// How long each service may take to become SERVING.
    #[arg(long, default_value_t = 30)]
    startup_timeout_secs: u64,
    /// How long services may take to stop after SIGTERM before they are killed.
    #[arg(long, default_value_t = 15)]
    stop_timeout_secs: u64,
}

struct Running {
    service: Service,
    addr: SocketAddr,
    child: Child,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Generation => "generation",
            Self::Cache => "cache",
            Self::Health => "health",
        }
    }

    fn grpc_service(self) -> &'static str {
        match self {
            Self::Gateway => llmesh_proto::gateway::v1::gateway_server::SERVICE_NAME,
            Self::Generation => llmesh_proto::generation::v1::generation_server::SERVICE_NAME,
            Self::Cache => llmesh_proto::cache::v1::cache_server::SERVICE_NAME,
            Self::Health => llmesh_proto::health::v1::mesh_health_server::SERVICE_NAME,
        }
    }

    fn port_offset(self) -> u16 {
        match self {
            Self::Gateway => 0,
            Self::Generation => 1,
            Self::Cache => 2,
            Self::Health => 3,
        }
    }
}

fn uri(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    // Registered before the first child starts: a signal during start-up stops the children too.
    let shutdown = llmesh_common::shutdown::signal();
    tokio::pin!(shutdown);
    let mut running: Vec<Running> = Vec::new();
    let started = tokio::select! {
        result = start_all(&args, &mut running) => Some(result),
        () = &mut shutdown => None,
    };
    let outcome = match started {
        None => Ok(()),
        Some(Err(error)) => Err(error),
        Some(Ok(())) => match print_banner(&running) {
            Ok(()) => wait_for_stop(&mut running, shutdown).await,
            Err(error) => Err(error),
        },
    };
    stop_all(&mut running, Duration::from_secs(args.stop_timeout_secs)).await;
    outcome
}

async fn start_all(args: &UpArgs, running: &mut Vec<Running>) -> anyhow::Result<()> {
    let listen = |service: Service| {
        let port = if args.base_port == 0 { 0 } else { args.base_port.saturating_add(service.port_offset()) };
        SocketAddr::new(args.host, port)
    };
    let with_redis = |key: &str| args.redis_url.iter().map(|url| (key.to_string(), url.clone())).collect::<Vec<_>>();
    let cache_env = with_redis("LLMESH_CACHE_REDIS_URL");
    let startup = Duration::from_secs(args.startup_timeout_secs);

    let mut generation_env = with_redis("LLMESH_GENERATION_QUEUE__REDIS_URL");
    // A local mesh is for trying things out: the fault-injection models (sim-error, ...) are
    // there, unless the caller's environment says otherwise.
    if std::env::var_os(FAULT_MODELS_ENV).is_none() {
        generation_env.push((FAULT_MODELS_ENV.to_string(), "true".to_string()));
    }
    running.push(start(Service::Generation, listen(Service::Generation), generation_env, startup).await?);
    running.push(start(Service::Cache, listen(Service::Cache), cache_env, startup).await?);
    let generation = running[0].addr;
    let cache = running[1].addr;

    let mut gateway_env = with_redis("LLMESH_GATEWAY_QUEUE__REDIS_URL");
    // `POST /generate` without a model asks for the sim, unless the caller's environment says otherwise.
    if std::env::var_os(DEFAULT_MODEL_ENV).is_none() {
        gateway_env.push((DEFAULT_MODEL_ENV.to_string(), "sim".to_string()));
    }
    gateway_env.push(("LLMESH_GATEWAY_GENERATION__ENDPOINTS".to_string(), format!("[\"{}\"]", uri(generation))));
    gateway_env.push(("LLMESH_GATEWAY_CACHE__ENDPOINT".to_string(), uri(cache)));
    running.push(start(Service::Gateway, listen(Service::Gateway), gateway_env, startup).await?);
    let gateway = running[2].addr;

    let mut targets: Vec<String> =
        [(Service::Gateway, gateway), (Service::Generation, generation), (Service::Cache, cache)]
            .into_iter()
            .map(|(service, addr)| {
                format!(
                    "{{name=\"{}\",address=\"{}\",service=\"{}\"}}",
                    service.name(),
                    uri(addr),
                    service.grpc_service()
                )
            })
            .collect();
    if let Some(url) = &args.redis_url {
        // Optional: without Redis the mesh is degraded (no cache hits, no jobs), not down.
        targets.push(format!("{{name=\"redis\",address=\"{url}\",service=\"redis\",required=false}}"));
    }
    let health_env = vec![("LLMESH_HEALTH_TARGETS".to_string(), format!("[{}]", targets.join(",")))];
    running.push(start(Service::Health, listen(Service::Health), health_env, startup).await?);
    // The health service's "" is the whole mesh: SERVING once it has seen every service serve.
    let health = uri(running[3].addr);
    deps::wait_serving("the mesh", &health, "", startup).await?;
    Ok(())
}

/// Starts one service, forwards its log lines (prefixed with its name) and waits until it listens
/// and reports SERVING.
async fn start(
    service: Service,
    listen: SocketAddr,
    env: Vec<(String, String)>,
    within: Duration,
) -> anyhow::Result<Running> {
    let exe = std::env::current_exe().context("cannot find the llmesh executable")?;
    let mut command = Command::new(exe);
    command.arg("serve").arg(service.name()).arg("--listen").arg(listen.to_string()).envs(env);
    // Four services share this machine's cores: one worker thread each unless told otherwise.
    if std::env::var_os(WORKER_THREADS_ENV).is_none() {
        command.env(WORKER_THREADS_ENV, "1");
    }
    if let Ok(filter) = std::env::var("RUST_LOG") {
        command.env("RUST_LOG", server::log_filter_keeping_listening_line(&filter));
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", service.name()))?;

    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr pipe"))?;
    let (addr_tx, addr_rx) = oneshot::channel();
    tokio::spawn(forward_logs(service.name(), stderr, addr_tx));

    let addr = tokio::select! {
        addr = tokio::time::timeout(within, addr_rx) => match addr {
            Ok(Ok(addr)) => addr,
            Ok(Err(_)) | Err(_) => bail!("{} did not start listening within {} s", service.name(), within.as_secs()),
        },
        status = child.wait() => bail!("{} exited during start-up ({})", service.name(), status.map(|s| s.to_string()).unwrap_or_default()),
    };
    deps::wait_serving(service.name(), &uri(addr), service.grpc_service(), within).await?;
    Ok(Running { service, addr, child })
}

async fn forward_logs(name: &'static str, stderr: tokio::process::ChildStderr, addr_tx: oneshot::Sender<SocketAddr>) {
    let mut addr_tx = Some(addr_tx);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(addr) = listening_addr(&line)
            && let Some(tx) = addr_tx.take()
        {
            let _ = tx.send(addr);
        }
        let _ = writeln!(std::io::stderr(), "[{name:<10}] {line}");
    }
}

/// The address in a `listening on ADDR` log line.
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let token: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || ".:[]".contains(*c)).collect();
    token.parse().ok()
}

fn print_banner(running: &[Running]) -> anyhow::Result<()> {
    let addr = |service: Service| running.iter().find(|r| r.service == service).map(|r| r.addr);
    let (Some(gateway), Some(health)) = (addr(Service::Gateway), addr(Service::Health)) else {
        bail!("the mesh is incomplete");
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "\nllmesh is up:")?;
    for r in running {
        writeln!(out, "  {:<11}{}", r.service.name(), r.addr)?;
    }
    writeln!(
        out,
        r#"
Try it:
  grpcurl -plaintext -d '{{"model":"sim","prompt":"hello"}}' {gateway} llmesh.gateway.v1.Gateway/Generate
  grpcurl -plaintext -d '{{"model":"sim","prompt":"hello"}}' {gateway} llmesh.gateway.v1.Gateway/GenerateStream
  grpcurl -plaintext {gateway} llmesh.gateway.v1.Gateway/ListModels
  grpcurl -plaintext {health} grpc.health.v1.Health/Check
  grpcurl -plaintext {health} llmesh.health.v1.MeshHealth/Status
  buf curl --protocol grpc --http2-prior-knowledge -d '{{"model":"sim","prompt":"hello"}}' http://{gateway}/llmesh.gateway.v1.Gateway/Generate

Over HTTP, on the same port (OpenAI base URL http://{gateway}/v1; API keys as Authorization: Bearer or x-api-key):
  curl -s http://{gateway}/v1/chat/completions -H 'content-type: application/json' -d '{{"model":"sim","messages":[{{"role":"user","content":"hello"}}]}}'
  curl -sN http://{gateway}/v1/chat/completions -H 'content-type: application/json' -d '{{"model":"sim","stream":true,"messages":[{{"role":"user","content":"hello"}}]}}'
  curl -s http://{gateway}/v1/messages -H 'content-type: application/json' -d '{{"model":"sim","max_tokens":64,"messages":[{{"role":"user","content":"hello"}}]}}'
  curl -s http://{gateway}/generate -H 'X-API-Key: test-key' -H 'content-type: application/json' -d '{{"prompt":"hello"}}'
  curl -s http://{gateway}/v1/models

Ctrl-C stops the mesh."#
    )?;
    out.flush()?;
    Ok(())
}

/// Until Ctrl-C / SIGTERM, or until a service exits. A service that exits cleanly was asked to
/// stop (by a process-group signal, systemd, a person): the mesh stops with it. One that fails
/// is an error naming it.
async fn wait_for_stop(running: &mut [Running], shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let exits = running.iter_mut().map(|r| {
        Box::pin(async move {
            let status = r.child.wait().await;
            (r.service.name(), status)
        })
    });
    tokio::select! {
        () = shutdown => Ok(()),
        ((name, status), _, _) = futures::future::select_all(exits) => match status {
            Ok(status) if status.success() => {
                tracing::info!("{name} stopped; stopping the mesh");
                Ok(())
            }
            Ok(status) => Err(anyhow!("{name} exited unexpectedly ({status}); stopping the mesh")),
            Err(error) => Err(anyhow!("cannot wait for {name}: {error}; stopping the mesh")),
        },
    }
}

/// SIGTERM to every child (the front first, so it stops taking traffic), then SIGKILL to whatever
/// is still running after `grace`.
async fn stop_all(running: &mut [Running], grace: Duration) {
    for r in running.iter().rev() {
        if let Some(pid) = r.child.id().and_then(|pid| i32::try_from(pid).ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
    }
    for r in running.iter_mut().rev() {
        match tokio::time::timeout(grace, r.child.wait()).await {
            Ok(_) => tracing::info!("{} stopped", r.service.name()),
            Err(_) => {
                tracing::warn!("{} did not stop within {} s; killing it", r.service.name(), grace.as_secs());
                let _ = r.child.kill().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::listening_addr;

    #[test]
    fn finds_the_address_in_log_lines() {
        let line = "2026-11-25T10:00:00.000Z  INFO listening on 127.0.0.1:50051";
        assert_eq!(listening_addr(line), Some(([127, 0, 0, 1], 50051).into()));
        let json = r#"{"level":"INFO","message":"listening on [::1]:4000","x":1}"#;
        assert_eq!(listening_addr(json), Some("[::1]:4000".parse().unwrap()));
        assert_eq!(listening_addr("nothing here"), None);
    }
}

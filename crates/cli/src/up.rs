//! `llmesh up`: the whole mesh on one machine. Each service runs as a child process
//! (`llmesh serve <service>`), started in dependency order, wired by environment variables, and
//! stopped with SIGTERM (then SIGKILL after a grace period) when this process is asked to stop.
//!
//! With `--tls DIR` (the files of `llmesh certs new --out DIR`) every port speaks TLS: the
//! gateway's with `gateway.pem`, clients need only the CA; generation, the cache and health also
//! require a client certificate from the CA (mTLS), which the gateway and health present
//! (`client.pem`), as does this process when it checks that each service serves.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use llmesh_common::{deps, runtime::WORKER_THREADS_ENV, server, tls::ClientTlsConfig};
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
    /// TLS on every port and mTLS inside the mesh, with the certificates `llmesh certs new --out
    /// DIR` made.
    #[arg(long, value_name = "DIR")]
    tls: Option<PathBuf>,
}

/// The certificates of `llmesh certs new --out DIR`, by absolute path.
#[derive(Debug, Clone)]
struct TlsDir(PathBuf);

impl TlsDir {
    /// The directory, once every file a mesh needs is there (an error names the first missing).
    fn open(dir: &Path) -> anyhow::Result<Self> {
        let dir = dir.canonicalize().with_context(|| format!("--tls {}: no such directory", dir.display()))?;
        let tls = Self(dir);
        let mut needed = vec!["ca.pem".to_string(), "client.pem".to_string(), "client-key.pem".to_string()];
        for service in crate::certs::SERVICES {
            needed.push(format!("{service}.pem"));
            needed.push(format!("{service}-key.pem"));
        }
        for name in needed {
            let path = tls.file(&name);
            if !path.is_file() {
                bail!(
                    "{} is missing (make the files with `llmesh certs new --out {}`)",
                    path.display(),
                    tls.0.display()
                );
            }
        }
        Ok(tls)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn shown(&self, name: &str) -> String {
        self.file(name).display().to_string()
    }

    fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig {
            ca: Some(self.file("ca.pem")),
            cert: Some(self.file("client.pem")),
            key: Some(self.file("client-key.pem")),
            server_name: None,
        }
    }

    /// The environment that gives `service` its certificate (and the client CA it requires, and
    /// its client certificate, as its role says).
    fn env(&self, service: Service) -> Vec<(String, String)> {
        let prefix = format!("LLMESH_{}_", service.name().to_ascii_uppercase());
        let mut env = vec![
            (format!("{prefix}TLS__CERT"), self.shown(&format!("{}.pem", service.name()))),
            (format!("{prefix}TLS__KEY"), self.shown(&format!("{}-key.pem", service.name()))),
        ];
        // The gateway's port is public: its callers have API keys, not certificates.
        if service != Service::Gateway {
            env.push((format!("{prefix}TLS__CLIENT_CA"), self.shown("ca.pem")));
        }
        // The gateway and health call the other services.
        if matches!(service, Service::Gateway | Service::Health) {
            env.push((format!("{prefix}CLIENT_TLS__CA"), self.shown("ca.pem")));
            env.push((format!("{prefix}CLIENT_TLS__CERT"), self.shown("client.pem")));
            env.push((format!("{prefix}CLIENT_TLS__KEY"), self.shown("client-key.pem")));
        }
        env
    }
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

/// How this mesh is called: `https://` with TLS, `http://` without.
fn uri(addr: SocketAddr, tls: Option<&TlsDir>) -> String {
    match tls {
        Some(_) => format!("https://{addr}"),
        None => format!("http://{addr}"),
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let tls = args.tls.as_deref().map(TlsDir::open).transpose()?;
    // This process checks that each service serves: with TLS, as a member of the mesh.
    if let Some(tls) = &tls {
        deps::use_client_tls(&tls.client())?;
    }
    // Registered before the first child starts: a signal during start-up stops the children too.
    let shutdown = llmesh_common::shutdown::signal();
    tokio::pin!(shutdown);
    let mut running: Vec<Running> = Vec::new();
    let started = tokio::select! {
        result = start_all(&args, tls.as_ref(), &mut running) => Some(result),
        () = &mut shutdown => None,
    };
    let outcome = match started {
        None => Ok(()),
        Some(Err(error)) => Err(error),
        Some(Ok(())) => match print_banner(&running, tls.as_ref()) {
            Ok(()) => wait_for_stop(&mut running, shutdown).await,
            Err(error) => Err(error),
        },
    };
    stop_all(&mut running, Duration::from_secs(args.stop_timeout_secs)).await;
    outcome
}

async fn start_all(args: &UpArgs, tls: Option<&TlsDir>, running: &mut Vec<Running>) -> anyhow::Result<()> {
    let listen = |service: Service| {
        let port = if args.base_port == 0 { 0 } else { args.base_port.saturating_add(service.port_offset()) };
        SocketAddr::new(args.host, port)
    };
    let with_redis = |key: &str| args.redis_url.iter().map(|url| (key.to_string(), url.clone())).collect::<Vec<_>>();
    let with_tls = |service: Service| tls.map(|tls| tls.env(service)).unwrap_or_default();
    let mut cache_env = with_redis("LLMESH_CACHE_REDIS_URL");
    cache_env.extend(with_tls(Service::Cache));
    let startup = Duration::from_secs(args.startup_timeout_secs);

    let mut generation_env = with_redis("LLMESH_GENERATION_QUEUE__REDIS_URL");
    // A local mesh is for trying things out: the fault-injection models (sim-error, ...) are
    // there, unless the caller's environment says otherwise.
    if std::env::var_os(FAULT_MODELS_ENV).is_none() {
        generation_env.push((FAULT_MODELS_ENV.to_string(), "true".to_string()));
    }
    generation_env.extend(with_tls(Service::Generation));
    running.push(start(Service::Generation, listen(Service::Generation), generation_env, tls, startup).await?);
    running.push(start(Service::Cache, listen(Service::Cache), cache_env, tls, startup).await?);
    let generation = running[0].addr;
    let cache = running[1].addr;

    let mut gateway_env = with_redis("LLMESH_GATEWAY_QUEUE__REDIS_URL");
    // `POST /generate` without a model asks for the sim, unless the caller's environment says otherwise.
    if std::env::var_os(DEFAULT_MODEL_ENV).is_none() {
        gateway_env.push((DEFAULT_MODEL_ENV.to_string(), "sim".to_string()));
    }
    gateway_env.push(("LLMESH_GATEWAY_GENERATION__ENDPOINTS".to_string(), format!("[\"{}\"]", uri(generation, tls))));
    gateway_env.push(("LLMESH_GATEWAY_CACHE__ENDPOINT".to_string(), uri(cache, tls)));
    gateway_env.extend(with_tls(Service::Gateway));
    running.push(start(Service::Gateway, listen(Service::Gateway), gateway_env, tls, startup).await?);
    let gateway = running[2].addr;

    let mut targets: Vec<String> =
        [(Service::Gateway, gateway), (Service::Generation, generation), (Service::Cache, cache)]
            .into_iter()
            .map(|(service, addr)| {
                format!(
                    "{{name=\"{}\",address=\"{}\",service=\"{}\"}}",
                    service.name(),
                    uri(addr, tls),
                    service.grpc_service()
                )
            })
            .collect();
    if let Some(url) = &args.redis_url {
        // Optional: without Redis the mesh is degraded (no cache hits, no jobs), not down.
        targets.push(format!("{{name=\"redis\",address=\"{url}\",service=\"redis\",required=false}}"));
    }
    let mut health_env = vec![("LLMESH_HEALTH_TARGETS".to_string(), format!("[{}]", targets.join(",")))];
    health_env.extend(with_tls(Service::Health));
    running.push(start(Service::Health, listen(Service::Health), health_env, tls, startup).await?);
    // The health service's "" is the whole mesh: SERVING once it has seen every service serve.
    let health = uri(running[3].addr, tls);
    deps::wait_serving("the mesh", &health, "", startup).await?;
    Ok(())
}

/// Starts one service, forwards its log lines (prefixed with its name) and waits until it listens
/// and reports SERVING.
async fn start(
    service: Service,
    listen: SocketAddr,
    env: Vec<(String, String)>,
    tls: Option<&TlsDir>,
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
    deps::wait_serving(service.name(), &uri(addr, tls), service.grpc_service(), within).await?;
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

fn print_banner(running: &[Running], tls: Option<&TlsDir>) -> anyhow::Result<()> {
    let addr = |service: Service| running.iter().find(|r| r.service == service).map(|r| r.addr);
    let (Some(gateway), Some(health)) = (addr(Service::Gateway), addr(Service::Health)) else {
        bail!("the mesh is incomplete");
    };
    // How each tool is told to trust (and, inside the mesh, to present) the certificates.
    let (scheme, grpcurl, grpcurl_mesh, buf, curl) = match tls {
        None => (
            "http",
            "-plaintext".to_string(),
            "-plaintext".to_string(),
            "--http2-prior-knowledge".to_string(),
            String::new(),
        ),
        Some(tls) => {
            let (ca, cert, key) = (tls.shown("ca.pem"), tls.shown("client.pem"), tls.shown("client-key.pem"));
            (
                "https",
                format!("-cacert {ca}"),
                format!("-cacert {ca} -cert {cert} -key {key}"),
                format!("--cacert {ca}"),
                format!("--cacert {ca} "),
            )
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "\nllmesh is up{}:", if tls.is_some() { " (TLS on every port, mTLS inside the mesh)" } else { "" })?;
    for r in running {
        writeln!(out, "  {:<11}{}", r.service.name(), r.addr)?;
    }
    writeln!(
        out,
        r#"
Try it:
  grpcurl {grpcurl} -d '{{"model":"sim","prompt":"hello"}}' {gateway} llmesh.gateway.v1.Gateway/Generate
  grpcurl {grpcurl} -d '{{"model":"sim","prompt":"hello"}}' {gateway} llmesh.gateway.v1.Gateway/GenerateStream
  grpcurl {grpcurl} {gateway} llmesh.gateway.v1.Gateway/ListModels
  grpcurl {grpcurl_mesh} {health} grpc.health.v1.Health/Check
  grpcurl {grpcurl_mesh} {health} llmesh.health.v1.MeshHealth/Status
  buf curl --protocol grpc {buf} -d '{{"model":"sim","prompt":"hello"}}' {scheme}://{gateway}/llmesh.gateway.v1.Gateway/Generate

Over HTTP, on the same port (OpenAI base URL {scheme}://{gateway}/v1; API keys as Authorization: Bearer or x-api-key):
  curl -s {curl}{scheme}://{gateway}/v1/chat/completions -H 'content-type: application/json' -d '{{"model":"sim","messages":[{{"role":"user","content":"hello"}}]}}'
  curl -sN {curl}{scheme}://{gateway}/v1/chat/completions -H 'content-type: application/json' -d '{{"model":"sim","stream":true,"messages":[{{"role":"user","content":"hello"}}]}}'
  curl -s {curl}{scheme}://{gateway}/v1/messages -H 'content-type: application/json' -d '{{"model":"sim","max_tokens":64,"messages":[{{"role":"user","content":"hello"}}]}}'
  curl -s {curl}{scheme}://{gateway}/generate -H 'X-API-Key: test-key' -H 'content-type: application/json' -d '{{"prompt":"hello"}}'
  curl -s {curl}{scheme}://{gateway}/v1/models"#
    )?;
    if let Some(tls) = tls {
        writeln!(
            out,
            r#"
From Python (grpcio):
  channel = grpc.secure_channel("{gateway}", grpc.ssl_channel_credentials(open("{ca}", "rb").read()))
  # inside the mesh (health, generation, the cache) also private_key= and certificate_chain=:
  # {key} and {cert}"#,
            ca = tls.shown("ca.pem"),
            cert = tls.shown("client.pem"),
            key = tls.shown("client-key.pem"),
        )?;
    }
    writeln!(out, "\nCtrl-C stops the mesh.")?;
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

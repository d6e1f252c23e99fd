//! `llmesh up`: the whole mesh on one machine. Each service runs as a child process
//! (`llmesh serve <service>`), started in dependency order, wired by environment variables, kept
//! running ([`supervise`]: a service that fails is restarted with backoff, the others keep
//! serving) and stopped with SIGTERM (then SIGKILL after a grace period) when this process is asked
//! to stop.
//!
//! What each service is given:
//! - `--config FILE` (or `LLMESH_CONFIG`): the same file, to every service, each reading its own
//!   section. What `up` sets itself (the addresses the services find each other at, the listen
//!   addresses) wins over it; its defaults (the sim as `gateway.default_model`, generation's
//!   fault-injection models, the admin listeners) apply only where the file and the environment
//!   set nothing ([`configured`]).
//! - `--redis-url URL`: every use of Redis, [`REDIS_USES`]: the cache's entries, the job queue,
//!   the gateway's rate limits and spend budgets, and the workers' settlements of both. The health
//!   service watches that Redis too.
//! - An admin listener (`/metrics`, `/debug/pprof/profile`) on loopback: ports 9464 to 9467 in the
//!   services' order (gateway, generation, cache, health), free ones with `--base-port 0`, or from
//!   `--admin-base-port`. The banner prints them.
//!
//! With `--tls DIR` (the files of `llmesh certs new --out DIR`) every port speaks TLS: the
//! gateway's with `gateway.pem`, clients need only the CA; generation, the cache and health also
//! require a client certificate from the CA (mTLS), which the gateway and health present
//! (`client.pem`), as does this process when it checks that each service serves.

mod configured;
mod status;
pub mod supervise;
mod tls;

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use futures::{StreamExt as _, stream::FuturesUnordered};
use llmesh_common::{deps, runtime::WORKER_THREADS_ENV, server};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
    sync::{oneshot, watch},
};

use self::{
    configured::{Configured, env_name},
    supervise::{Exit, Launcher, Outcome, Policy, Process},
    tls::TlsDir,
};
use crate::Service;

/// Every setting that names a Redis, all of which `--redis-url` sets, and what that Redis then holds.
pub const REDIS_USES: &[(Service, &[&str], Store)] = &[
    (Service::Cache, &["redis_url"], Store::Cache),
    (Service::Gateway, &["queue", "redis_url"], Store::Queue),
    (Service::Generation, &["queue", "redis_url"], Store::Queue),
    (Service::Gateway, &["rate_limit", "redis_url"], Store::Limits),
    // Where the workers give back what a job did not use of its reservations: the gateways'.
    (Service::Generation, &["rate_limit", "redis_url"], Store::Limits),
];

/// What the mesh keeps, and where it is kept without Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Cache,
    Queue,
    Limits,
}

impl Store {
    const ALL: [Store; 3] = [Store::Cache, Store::Queue, Store::Limits];

    fn what(self) -> &'static str {
        match self {
            Self::Cache => "response cache",
            Self::Queue => "job queue",
            Self::Limits => "rate limits, spend budgets",
        }
    }

    /// Where it is without Redis.
    fn without_redis(self) -> &'static str {
        match self {
            Self::Cache => "in the cache's memory",
            Self::Queue => "off (SubmitJob needs Redis)",
            Self::Limits => "in the gateway's memory (one gateway's view; `llmesh spend` sees nothing)",
        }
    }

    /// The setting the banner reads it from.
    fn setting(self) -> (Service, &'static [&'static str]) {
        match self {
            Self::Cache => (Service::Cache, &["redis_url"]),
            Self::Queue => (Service::Gateway, &["queue", "redis_url"]),
            Self::Limits => (Service::Gateway, &["rate_limit", "redis_url"]),
        }
    }
}

/// The admin port of the gateway when `--base-port` is not 0; the others take the next three.
const DEFAULT_ADMIN_BASE_PORT: u16 = 9464;

/// How long after a service serves its `admin listening on` line may still be on its way.
const ADMIN_LINE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Address every service listens on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Gateway port; generation, cache and health take the next three. 0 picks free ports.
    #[arg(long, default_value_t = 50051)]
    base_port: u16,
    /// A TOML file with a section per service (`[gateway]`, `[generation]`, `[cache]`, `[health]`),
    /// given to every service. What `up` sets (addresses, --redis-url) wins over it.
    #[arg(long, env = "LLMESH_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// A Redis for everything the mesh keeps: the cache (instead of memory), the job queue, and the
    /// rate limits and spend budgets (shared by every gateway using it; read by `llmesh spend`).
    #[arg(long, env = "LLMESH_REDIS_URL")]
    redis_url: Option<String>,
    /// The gateway's admin port (`/metrics`, `/debug/pprof/profile`, on loopback); generation,
    /// cache and health take the next three. Default 9464, or free ports with `--base-port 0`; 0
    /// picks free ports.
    #[arg(long)]
    admin_base_port: Option<u16>,
    /// Restarts of one service allowed within a minute; one more failure stops the mesh. 0
    /// restarts nothing: the first failure stops the mesh.
    #[arg(long, default_value_t = Policy::default().max_per_minute)]
    max_restarts_per_minute: u32,
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

impl Service {
    pub const ALL: [Service; 4] = [Service::Gateway, Service::Generation, Service::Cache, Service::Health];

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

/// How to start one service, and start it again on the same addresses.
#[derive(Debug, Clone)]
struct Spec {
    service: Service,
    listen: SocketAddr,
    env: Vec<(String, String)>,
    config: Option<PathBuf>,
    tls: Option<TlsDir>,
    within: Duration,
}

impl Spec {
    /// The same service on the addresses it got the first time (port 0 picks a port once: the
    /// others were told this one).
    fn pinned(mut self, running: &Running) -> Self {
        self.listen = running.addr;
        if let Some(admin) = running.admin {
            let name = env_name(self.service, &["admin", "listen"]);
            self.env.retain(|(key, _)| *key != name);
            self.env.push((name, admin.to_string()));
        }
        self
    }
}

/// A service's child process and where it listens.
#[derive(Debug)]
struct Running {
    service: Service,
    addr: SocketAddr,
    /// Its admin listener, as it logged it.
    admin: Option<SocketAddr>,
    child: Child,
}

impl Process for Running {
    fn id(&self) -> Option<u32> {
        self.child.id()
    }

    async fn wait(&mut self) -> Exit {
        match self.child.wait().await {
            Ok(status) if status.success() => Exit::Clean,
            Ok(status) => Exit::Failed(status.to_string()),
            Err(error) => Exit::Failed(format!("cannot wait for it: {error}")),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop(mut self, grace: Duration) {
        let name = self.service.name();
        if let Some(pid) = self.child.id().and_then(|pid| i32::try_from(pid).ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(_) => tracing::info!("{name} stopped"),
            Err(_) => {
                tracing::warn!("{name} did not stop within {} s; killing it", grace.as_secs());
                let _ = self.child.kill().await;
            }
        }
    }
}

impl Launcher for Spec {
    type Process = Running;

    async fn launch(&self) -> anyhow::Result<Running> {
        start(self).await
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let tls = args.tls.as_deref().map(TlsDir::open).transpose()?;
    let configured = Configured::load(args.config.as_deref())?;
    // This process checks that each service serves: with TLS, as a member of the mesh.
    if let Some(tls) = &tls {
        deps::use_client_tls(&tls.client())?;
    }
    // Registered before the first child starts: a signal during start-up stops the children too.
    let shutdown = llmesh_common::shutdown::signal();
    tokio::pin!(shutdown);
    let grace = Duration::from_secs(args.stop_timeout_secs);
    let mut running: Vec<(Spec, Running)> = Vec::new();
    let started = tokio::select! {
        result = start_all(&args, &configured, tls.as_ref(), &mut running) => Some(result),
        () = &mut shutdown => None,
    };
    match started {
        None => {
            stop_all(running, grace).await;
            status::remove();
            Ok(())
        }
        Some(Err(error)) => {
            stop_all(running, grace).await;
            status::remove();
            Err(error)
        }
        Some(Ok(())) => {
            if let Err(error) = print_banner(&running, &args, &configured, tls.as_ref()) {
                stop_all(running, grace).await;
                return Err(error);
            }
            let policy = Policy { max_per_minute: args.max_restarts_per_minute, ..Policy::default() };
            supervise_all(running, policy, grace, shutdown).await
        }
    }
}

/// Stops every service (the front first, so it stops taking traffic), each within `grace`.
async fn stop_all(running: Vec<(Spec, Running)>, grace: Duration) {
    let stops: FuturesUnordered<_> = running.into_iter().rev().map(|(_, r)| r.stop(grace)).collect();
    stops.collect::<Vec<()>>().await;
}

/// Keeps every service running until Ctrl-C / SIGTERM, a service that stops cleanly (someone
/// asked it to), or one that keeps failing; then stops the others.
async fn supervise_all(
    running: Vec<(Spec, Running)>,
    policy: Policy,
    grace: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut supervisors: FuturesUnordered<_> = running
        .into_iter()
        .map(|(spec, process)| {
            let stop = stop_rx.clone();
            async move {
                let spec = spec.pinned(&process);
                let outcome = supervise::supervise(spec.service.name(), process, &spec, policy, stop, grace).await;
                (spec.service.name(), outcome)
            }
        })
        .collect();
    let result = tokio::select! {
        () = shutdown => Ok(()),
        Some((name, outcome)) = supervisors.next() => match outcome {
            Outcome::Stopped => Ok(()),
            Outcome::ExitedCleanly => {
                tracing::info!("{name} stopped; stopping the mesh");
                Ok(())
            }
            Outcome::GaveUp { restarts, last } => Err(anyhow!(
                "{name} keeps failing: it exited unexpectedly ({last}) with {} restarts within the last minute \
                 already, the most allowed (--max-restarts-per-minute; {restarts} restarts in all); stopping the mesh",
                policy.max_per_minute,
            )),
        },
    };
    let _ = stop_tx.send(true);
    while supervisors.next().await.is_some() {}
    status::remove();
    result
}

async fn start_all(
    args: &UpArgs,
    configured: &Configured,
    tls: Option<&TlsDir>,
    running: &mut Vec<(Spec, Running)>,
) -> anyhow::Result<()> {
    let startup = Duration::from_secs(args.startup_timeout_secs);
    let listen = |service: Service| {
        let port = if args.base_port == 0 { 0 } else { args.base_port.saturating_add(service.port_offset()) };
        SocketAddr::new(args.host, port)
    };
    // The admin listeners are for this machine's Prometheus and people: loopback, whatever --host.
    let admin_base = args.admin_base_port.unwrap_or(if args.base_port == 0 { 0 } else { DEFAULT_ADMIN_BASE_PORT });
    let loopback = if args.host.is_ipv6() { IpAddr::V6(Ipv6Addr::LOCALHOST) } else { IpAddr::V4(Ipv4Addr::LOCALHOST) };
    let spec = |service: Service, mut env: Vec<(String, String)>| {
        for (user, path, _) in REDIS_USES {
            if *user == service
                && let Some(url) = &args.redis_url
            {
                env.push((env_name(service, path), url.clone()));
            }
        }
        if !configured.sets(service, &["admin", "listen"]) {
            let port = if admin_base == 0 { 0 } else { admin_base.saturating_add(service.port_offset()) };
            env.push((env_name(service, &["admin", "listen"]), SocketAddr::new(loopback, port).to_string()));
        }
        env.extend(tls.map(|tls| tls.env(service)).unwrap_or_default());
        Spec {
            service,
            listen: listen(service),
            env,
            config: configured.file().map(Into::into),
            tls: tls.cloned(),
            within: startup,
        }
    };

    let mut generation_env = Vec::new();
    // A local mesh is for trying things out: the fault-injection models (sim-error, ...) are
    // there, unless the operator's file or environment says otherwise.
    if !configured.sets(Service::Generation, &["fault_models"]) {
        generation_env.push((env_name(Service::Generation, &["fault_models"]), "true".to_string()));
    }
    let generation = spec(Service::Generation, generation_env);
    let started = start(&generation).await?;
    let generation_addr = started.addr;
    running.push((generation, started));

    let cache = spec(Service::Cache, Vec::new());
    let started = start(&cache).await?;
    let cache_addr = started.addr;
    running.push((cache, started));

    let mut gateway_env = Vec::new();
    // `POST /generate` without a model asks for the sim, unless the operator says otherwise.
    if !configured.sets(Service::Gateway, &["default_model"]) {
        gateway_env.push((env_name(Service::Gateway, &["default_model"]), "sim".to_string()));
    }
    gateway_env.push((
        env_name(Service::Gateway, &["generation", "endpoints"]),
        format!("[\"{}\"]", uri(generation_addr, tls)),
    ));
    gateway_env.push((env_name(Service::Gateway, &["cache", "endpoint"]), uri(cache_addr, tls)));
    let gateway = spec(Service::Gateway, gateway_env);
    let started = start(&gateway).await?;
    let gateway_addr = started.addr;
    running.push((gateway, started));

    let mut targets: Vec<String> =
        [(Service::Gateway, gateway_addr), (Service::Generation, generation_addr), (Service::Cache, cache_addr)]
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
    let mut health_env = vec![(env_name(Service::Health, &["targets"]), format!("[{}]", targets.join(",")))];
    // The status page: the health service alone gets a token (see `status`), and reads the others' admin listeners.
    if !configured.sets(Service::Health, &["admin", "bearer_token_file"]) {
        let file = status::token_file()?;
        health_env.push((env_name(Service::Health, &["admin", "bearer_token_file"]), file.display().to_string()));
    }
    if !configured.sets(Service::Health, &["status", "sources"]) {
        let admins: Vec<(&str, SocketAddr)> =
            running.iter().filter_map(|(spec, r)| Some((spec.service.name(), r.admin?))).collect();
        health_env.push((env_name(Service::Health, &["status", "sources"]), status::sources(&admins)));
    }
    let health = spec(Service::Health, health_env);
    let started = start(&health).await?;
    let health_uri = uri(started.addr, tls);
    running.push((health, started));
    // The health service's "" is the whole mesh: SERVING once it has seen every service serve.
    deps::wait_serving("the mesh", &health_uri, "", startup).await?;
    Ok(())
}

/// Starts one service, forwards its log lines (prefixed with its name) and waits until it listens
/// and reports SERVING.
async fn start(spec: &Spec) -> anyhow::Result<Running> {
    let Spec { service, listen, env, config, tls, within } = spec;
    let (service, within) = (*service, *within);
    let exe = std::env::current_exe().context("cannot find the llmesh executable")?;
    let mut command = Command::new(exe);
    command.arg("serve").arg(service.name()).arg("--listen").arg(listen.to_string());
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    // Four services share this machine's cores: one worker thread each unless told otherwise.
    if std::env::var_os(WORKER_THREADS_ENV).is_none() {
        command.env(WORKER_THREADS_ENV, "1");
    }
    if let Ok(filter) = std::env::var("RUST_LOG") {
        // The two lines this process reads addresses from stay, whatever the filter.
        let filter = server::log_filter_keeping_listening_line(&filter);
        command.env("RUST_LOG", format!("{filter},{ADMIN_LOG_TARGET}=info"));
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
    let (admin_tx, admin_rx) = oneshot::channel();
    tokio::spawn(forward_logs(service.name(), stderr, addr_tx, admin_tx));

    let addr = tokio::select! {
        addr = tokio::time::timeout(within, addr_rx) => match addr {
            Ok(Ok(addr)) => addr,
            Ok(Err(_)) | Err(_) => bail!("{} did not start listening within {} s", service.name(), within.as_secs()),
        },
        status = child.wait() => bail!("{} exited during start-up ({})", service.name(), status.map(|s| s.to_string()).unwrap_or_default()),
    };
    let service_uri = uri(addr, tls.as_ref());
    let serving = deps::wait_serving(service.name(), &service_uri, service.grpc_service(), within);
    tokio::select! {
        serving = serving => serving?,
        status = child.wait() => bail!("{} exited during start-up ({})", service.name(), status.map(|s| s.to_string()).unwrap_or_default()),
    }
    // Bound before the service served: its line is at most a pipe's read away.
    let admin = tokio::time::timeout(ADMIN_LINE_WAIT, admin_rx).await.ok().and_then(Result::ok);
    let pid = child.id().map(|pid| pid.to_string()).unwrap_or_else(|| "?".to_string());
    tracing::info!(service = service.name(), pid, "{} (pid {pid}) serving on {addr}", service.name());
    Ok(Running { service, addr, admin, child })
}

/// The tracing target of the admin listener's `admin listening on ADDR` line.
const ADMIN_LOG_TARGET: &str = "llmesh_telemetry::admin";

async fn forward_logs(
    name: &'static str,
    stderr: tokio::process::ChildStderr,
    addr_tx: oneshot::Sender<SocketAddr>,
    admin_tx: oneshot::Sender<SocketAddr>,
) {
    let (mut addr_tx, mut admin_tx) = (Some(addr_tx), Some(admin_tx));
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match listening_addr(&line) {
            Some(Listening::Admin(addr)) => {
                if let Some(tx) = admin_tx.take() {
                    let _ = tx.send(addr);
                }
            }
            Some(Listening::Service(addr)) => {
                if let Some(tx) = addr_tx.take() {
                    let _ = tx.send(addr);
                }
            }
            None => {}
        }
        let _ = writeln!(std::io::stderr(), "[{name:<10}] {line}");
    }
}

/// What a `listening on ADDR` log line announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listening {
    /// `listening on ADDR`: the service's gRPC port.
    Service(SocketAddr),
    /// `admin listening on ADDR`: its admin listener.
    Admin(SocketAddr),
}

/// The address in a `listening on ADDR` or `admin listening on ADDR` log line.
pub fn listening_addr(line: &str) -> Option<Listening> {
    const MARK: &str = "listening on ";
    let at = line.find(MARK)?;
    let rest = &line[at + MARK.len()..];
    let token: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || ".:[]".contains(*c)).collect();
    let addr = token.parse().ok()?;
    Some(if line[..at].ends_with("admin ") { Listening::Admin(addr) } else { Listening::Service(addr) })
}

fn print_banner(
    running: &[(Spec, Running)],
    args: &UpArgs,
    configured: &Configured,
    tls: Option<&TlsDir>,
) -> anyhow::Result<()> {
    let find = |service: Service| running.iter().map(|(_, r)| r).find(|r| r.service == service);
    let (Some(gateway), Some(health)) = (find(Service::Gateway).map(|r| r.addr), find(Service::Health).map(|r| r.addr))
    else {
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
    // One line per service, service and address alone: scripts read these.
    for service in Service::ALL {
        if let Some(r) = find(service) {
            writeln!(out, "  {:<11}{}", service.name(), r.addr)?;
        }
    }
    if let Some(file) = configured.file() {
        writeln!(out, "\nConfiguration: {} (each service reads its section)", file.display())?;
    }
    writeln!(out, "\nStores:")?;
    for store in Store::ALL {
        let (service, path) = store.setting();
        let place = match (args.redis_url.clone(), configured.get(service, path)) {
            (Some(url), _) | (None, Some(url)) => format!("Redis {}", llmesh_util::redact::redact_url(&url)),
            (None, None) if store == Store::Cache && configured.sets(Service::Cache, &["redis_cluster_nodes"]) => {
                "Redis Cluster (cache.redis_cluster_nodes)".to_string()
            }
            (None, None) => store.without_redis().to_string(),
        };
        writeln!(out, "  {:<28}{place}", store.what())?;
    }
    if args.redis_url.is_none() {
        writeln!(out, "  (--redis-url redis://127.0.0.1:6379/ puts all of them in Redis)")?;
    }
    let admins: Vec<_> =
        Service::ALL.into_iter().filter_map(find).filter_map(|r| Some((r.service, r.admin?))).collect();
    if !admins.is_empty() {
        // No line here starts with a service's name: scripts read the addresses above by it.
        writeln!(out, "\nMetrics and CPU profiles (admin listeners, on loopback):")?;
        for (service, admin) in &admins {
            writeln!(out, "  http://{admin}/metrics  ({})", service.name())?;
        }
        if let Some((service, admin)) = admins.first() {
            writeln!(
                out,
                "  curl -o {name}.pb 'http://{admin}/debug/pprof/profile?seconds=10'   # pprof protobuf: go tool pprof -http=: {name}.pb\n  \
                 curl -o {name}.svg 'http://{admin}/debug/pprof/profile?seconds=10&format=svg'   # flamegraph",
                name = service.name()
            )?;
        }
    }
    let health_token = running.iter().find(|(spec, _)| spec.service == Service::Health).and_then(|(spec, r)| {
        Some((r.admin?, spec.env.iter().find(|(k, _)| k.ends_with("_ADMIN__BEARER_TOKEN_FILE"))?))
    });
    if let Some((admin, (_, file))) = health_token {
        // The token guards the health service's whole admin listener, its /metrics too.
        writeln!(
            out,
            "\nStatus page (live; health's admin listener: any user name, the password is the token in {file}):"
        )?;
        writeln!(out, "  http://{admin}/status")?;
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
  # {key} and {cert}
From the OpenAI SDK (httpx): OpenAI(base_url="https://{gateway}/v1", http_client=httpx.Client(verify="{ca}"))
  or SSL_CERT_FILE={ca}"#,
            ca = tls.shown("ca.pem"),
            cert = tls.shown("client.pem"),
            key = tls.shown("client-key.pem"),
        )?;
    }
    writeln!(
        out,
        "\nA service that fails is restarted (at most {} times a minute). Ctrl-C stops the mesh.",
        args.max_restarts_per_minute
    )?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Listening, listening_addr};

    #[test]
    fn finds_the_address_in_log_lines() {
        let line = "2026-11-25T10:00:00.000Z  INFO listening on 127.0.0.1:50051";
        assert_eq!(listening_addr(line), Some(Listening::Service(([127, 0, 0, 1], 50051).into())));
        let json = r#"{"level":"INFO","message":"listening on [::1]:4000","x":1}"#;
        assert_eq!(listening_addr(json), Some(Listening::Service("[::1]:4000".parse().unwrap())));
        let admin = "2026-11-25T10:00:00.000Z  INFO llmesh_telemetry::admin: admin listening on 127.0.0.1:9464";
        assert_eq!(listening_addr(admin), Some(Listening::Admin(([127, 0, 0, 1], 9464).into())));
        let json = r#"{"level":"INFO","message":"admin listening on 127.0.0.1:9465"}"#;
        assert_eq!(listening_addr(json), Some(Listening::Admin(([127, 0, 0, 1], 9465).into())));
        assert_eq!(listening_addr("nothing here"), None);
    }
}

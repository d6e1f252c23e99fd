//! Test support: the real llmesh binaries as child processes on ephemeral loopback ports, and a
//! real redis-server per test. Everything is killed when its handle drops.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod otlp;

/// The redis-server fixture every test crate shares.
pub use llmesh_testkit::{Redis, RedisCluster, free_port};

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use llmesh_proto::{
    cache::v1::cache_client::CacheClient, gateway::v1::gateway_client::GatewayClient,
    generation::v1::generation_client::GenerationClient, health::v1::mesh_health_client::MeshHealthClient,
};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
    sync::oneshot,
};
use tonic::transport::Channel;

/// How long a service may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The gateway's service name in `grpc.health.v1`.
const GATEWAY_SERVICE: &str = "llmesh.gateway.v1.Gateway";

/// The directory holding the built binaries: `$LLMESH_BIN_DIR` when set (as for the Python tests),
/// else `target/<profile>/`, next to `deps/` where the test executable runs from. Run
/// `cargo build --workspace --bins` first (scripts/test does).
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("LLMESH_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("test executable path");
            exe.parent().and_then(|deps| deps.parent()).expect("target dir").to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

/// A running service process.
pub struct Proc {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `name` (a binary in the target dir) on 127.0.0.1:0 and waits for its
    /// `listening on` line.
    pub async fn spawn(name: &str, env: &[(&str, String)]) -> anyhow::Result<Self> {
        Self::spawn_at(name, env, "127.0.0.1:0").await
    }

    /// Starts `name` listening on `listen` (to bring a service back on the port it had).
    pub async fn spawn_at(name: &str, env: &[(&str, String)], listen: &str) -> anyhow::Result<Self> {
        Self::start(name, Command::new(bin(name)), &["--listen", listen], env).await
    }

    /// Starts `name` on 127.0.0.1:0 in a mount namespace of its own where `hosts` is mounted over
    /// /etc/hosts: the names it resolves are the test's to change while it runs (write the file in
    /// place; a rename would leave the mount on the old file). Needs root and util-linux `unshare`.
    pub async fn spawn_with_hosts(name: &str, env: &[(&str, String)], hosts: &Path) -> anyhow::Result<Self> {
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
            .arg(hosts)
            .arg(bin(name));
        Self::start(name, command, &["--listen", "127.0.0.1:0"], env).await
    }

    async fn start(name: &str, command: Command, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Self> {
        let Launched { mut child, logs, addr, readers: _ } = launch(name, command, args, env)?;
        let addr = tokio::select! {
            addr = tokio::time::timeout(START_TIMEOUT, addr) => addr
                .map_err(|_| anyhow!("{name} did not listen within {START_TIMEOUT:?}"))?
                .map_err(|_| anyhow!("{name} closed its log before listening"))?,
            status = child.wait() => bail!("{name} exited at start-up ({status:?}):\n{}", logs.lock().unwrap().join("\n")),
        };
        Ok(Self { name: name.to_string(), addr, child, logs })
    }

    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.uri()).unwrap().connect().await.unwrap()
    }

    /// Waits until the process answers SERVING for `service` over `grpc.health.v1`. Past its
    /// `listening on` line a service may still be connecting to what it depends on (a gateway to
    /// generation and the cache), and one that loses them then stops: a test that kills a
    /// dependency must not do so before this.
    pub async fn wait_serving(&self, service: &str) {
        let ready = llmesh_common::deps::wait_serving(&self.name, &self.uri(), service, START_TIMEOUT).await;
        ready.unwrap_or_else(|error| panic!("{error:#}\n{} LOGS:\n{}", self.name, self.logs()));
    }

    /// Everything the process has logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Resident memory, in KiB, from /proc/<pid>/status.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS in /proc/<pid>/status");
        line.split_whitespace().next().unwrap().parse().unwrap()
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id().expect("running")).unwrap())
    }

    /// The sum of one metric over the label sets whose line contains `labels` ("" for all), from
    /// the process's `/metrics`.
    pub async fn metric_sum(&self, name: &str, labels: &str) -> f64 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let logs = self.logs();
        let admin = logs
            .lines()
            .find_map(|l| l.split("admin listening on ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .expect("the admin listener's address in the logs")
            .to_string();
        let mut stream = tokio::net::TcpStream::connect(&admin).await.unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sends SIGTERM, as an orchestrator would.
    pub fn terminate(&self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    }

    /// Sends SIGKILL: a crash.
    pub async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }

    /// Waits for the process to exit, at most `within`.
    pub async fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(within, self.child.wait()).await.ok().and_then(Result::ok)
    }
}

/// A started process: its handle, its log lines so far, its `listening on` address when it
/// prints one, and the tasks reading its pipes (they end when the process's pipes close).
struct Launched {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    addr: oneshot::Receiver<SocketAddr>,
    readers: [tokio::task::JoinHandle<()>; 2],
}

fn launch(name: &str, mut command: Command, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Launched> {
    if name == "generation" {
        // The tests' chaos needs the fault-injection models; a test can still turn them off.
        command.env("LLMESH_GENERATION_FAULT_MODELS", "true");
    }
    let mut child = command
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("LLMESH_LOG_FORMAT", "text")
        .env(
            "RUST_LOG",
            llmesh_common::server::log_filter_keeping_listening_line(
                &std::env::var("LLMESH_TEST_LOG").unwrap_or_else(|_| "info".into()),
            ),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {name}"))?;
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = oneshot::channel();
    let stderr = child.stderr.take().context("stderr")?;
    let stdout = child.stdout.take().context("stdout")?;
    let readers =
        [tokio::spawn(collect(stderr, logs.clone(), Some(tx))), tokio::spawn(collect(stdout, logs.clone(), None))];
    Ok(Launched { child, logs, addr: rx, readers })
}

async fn collect(
    pipe: impl tokio::io::AsyncRead + Unpin,
    logs: Arc<Mutex<Vec<String>>>,
    mut addr_tx: Option<oneshot::Sender<SocketAddr>>,
) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(addr) = listening_addr(&line)
            && let Some(tx) = addr_tx.take()
        {
            let _ = tx.send(addr);
        }
        logs.lock().unwrap().push(line);
    }
}

/// The address in a `listening on ADDR` line.
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    rest.split_whitespace().next()?.trim_end_matches(['"', ',']).parse().ok()
}

/// Runs `name` with `args` until it exits (at most `within`), for start-up failure tests.
/// Returns its exit status and everything it logged.
pub async fn run_to_exit(
    name: &str,
    args: &[&str],
    env: &[(&str, String)],
    within: Duration,
) -> anyhow::Result<(ExitStatus, String)> {
    let Launched { mut child, logs, readers, .. } = launch(name, Command::new(bin(name)), args, env)?;
    let status = tokio::time::timeout(within, child.wait())
        .await
        .map_err(|_| anyhow!("{name} still running after {within:?}"))??;
    // Its last lines may still be in the pipes: read them to the end (bounded, in case something
    // the process started still holds a pipe open).
    let _ = tokio::time::timeout(within, futures::future::join_all(readers)).await;
    let logs = logs.lock().unwrap().join("\n");
    Ok((status, logs))
}

/// What a test mesh should look like.
#[derive(Debug, Default, Clone)]
pub struct MeshOptions {
    /// Extra environment for every service (`LLMESH_<SVC>_...`).
    pub env: Vec<(&'static str, String)>,
    pub redis_url: Option<String>,
    /// More generation replicas behind the gateway, each with its own extra environment.
    pub replicas: Vec<Vec<(&'static str, String)>>,
}

/// generation, cache, gateway and health, wired together.
pub struct Mesh {
    pub generation: Proc,
    /// The replicas of `MeshOptions::replicas`, beside `generation`.
    pub replicas: Vec<Proc>,
    pub cache: Proc,
    pub gateway: Proc,
    pub health: Proc,
}

impl Mesh {
    pub async fn start() -> Self {
        Self::start_with(MeshOptions::default()).await
    }

    pub async fn start_with(options: MeshOptions) -> Self {
        let mut env = options.env.clone();
        if let Some(url) = &options.redis_url {
            env.push(("LLMESH_CACHE_REDIS_URL", url.clone()));
        }
        let generation = Proc::spawn("generation", &env).await.unwrap();
        let mut replicas = Vec::new();
        for extra in &options.replicas {
            let replica_env: Vec<_> = env.iter().chain(extra).cloned().collect();
            replicas.push(Proc::spawn("generation", &replica_env).await.unwrap());
        }
        let cache = Proc::spawn("cache", &env).await.unwrap();
        let mut gateway_env = env.clone();
        let endpoints: Vec<String> =
            std::iter::once(&generation).chain(&replicas).map(|p| format!("\"{}\"", p.uri())).collect();
        gateway_env.push(("LLMESH_GATEWAY_GENERATION__ENDPOINTS", format!("[{}]", endpoints.join(","))));
        gateway_env.push(("LLMESH_GATEWAY_CACHE__ENDPOINT", cache.uri()));
        let gateway = Proc::spawn("gateway", &gateway_env).await.unwrap();
        // A gateway serving TLS is checked by its tests over TLS, with their CA.
        if !gateway_env.iter().any(|(name, _)| name.starts_with("LLMESH_GATEWAY_TLS__")) {
            gateway.wait_serving(GATEWAY_SERVICE).await;
        }
        let mut health_env = env.clone();
        let targets = [
            ("gateway", &gateway, GATEWAY_SERVICE),
            ("generation", &generation, "llmesh.generation.v1.Generation"),
            ("cache", &cache, "llmesh.cache.v1.Cache"),
        ]
        .iter()
        .map(|(name, proc, service)| format!("{{name=\"{name}\",address=\"{}\",service=\"{service}\"}}", proc.uri()))
        .collect::<Vec<_>>()
        .join(",");
        let redis_target = options
            .redis_url
            .as_ref()
            .map(|url| format!(",{{name=\"redis\",address=\"{url}\",service=\"redis\",required=false}}"))
            .unwrap_or_default();
        health_env.push(("LLMESH_HEALTH_TARGETS", format!("[{targets}{redis_target}]")));
        health_env.push(("LLMESH_HEALTH_POLL_INTERVAL_MS", "100".into()));
        let health = Proc::spawn("health", &health_env).await.unwrap();
        Self { generation, replicas, cache, gateway, health }
    }

    /// Another gateway in front of this mesh's generation and cache, with `env` besides.
    pub async fn second_gateway(&self, env: &[(&'static str, String)]) -> Proc {
        let mut env = env.to_vec();
        env.push(("LLMESH_GATEWAY_GENERATION__ENDPOINTS", format!("[\"{}\"]", self.generation.uri())));
        env.push(("LLMESH_GATEWAY_CACHE__ENDPOINT", self.cache.uri()));
        let gateway = Proc::spawn("gateway", &env).await.unwrap();
        gateway.wait_serving(GATEWAY_SERVICE).await;
        gateway
    }

    pub async fn gateway(&self) -> GatewayClient<Channel> {
        GatewayClient::new(self.gateway.channel().await)
    }

    pub async fn generation(&self) -> GenerationClient<Channel> {
        GenerationClient::new(self.generation.channel().await)
    }

    pub async fn cache(&self) -> CacheClient<Channel> {
        CacheClient::new(self.cache.channel().await)
    }

    pub async fn mesh_health(&self) -> MeshHealthClient<Channel> {
        MeshHealthClient::new(self.health.channel().await)
    }
}

/// Polls `check` every 20 ms until it returns `Some`, at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

//! Test support shared by every llmesh test crate (a dev-dependency only): a real `redis-server`
//! of the test's own, on a free loopback port, in a temporary directory of its own, killed and
//! removed when its handle drops.
//!
//! - [`Redis::start`]: plain, no persistence (`--save ""`, `--appendonly no`); [`Redis::start_on`]
//!   brings one back on the port a killed one had.
//! - [`Redis::builder`]: TLS only ([`RedisBuilder::tls`]) and any further `redis-server` arguments
//!   (ACL users, cluster mode).
//! - [`RedisCluster::start`]: three primaries joined by `redis-cli --cluster create`.
//! - [`golden`]: golden-file comparison (`GOLDEN_UPDATE=1` rewrites the files).
//!
//! A server counts as started once its own process answers on the port (`INFO server`'s process
//! id; a plain port) or the port accepts a connection (a TLS port). A server that exits at start-up
//! (the port was taken meanwhile, a bad argument) is an error carrying its log, and a port another
//! redis-server answers on is an error at once rather than a test against the wrong server.

// Test support: a broken setup fails the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod golden;

use std::{
    ffi::OsString,
    net::TcpListener,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    process::{Child, Command},
};

/// How long a redis-server may take to start answering.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A free loopback port (bound and released: good enough for a test that starts a server on it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A redis-server of the test's own. Killed, and its directory removed, when dropped.
pub struct Redis {
    /// The port it serves on (its TLS port when started with [`RedisBuilder::tls`]).
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

/// How to start a [`Redis`]: [`Redis::builder`], then [`RedisBuilder::start`].
#[derive(Debug, Default)]
pub struct RedisBuilder {
    port: Option<u16>,
    tls: bool,
    args: Vec<OsString>,
}

impl RedisBuilder {
    /// Serve on `port` instead of a free one (to bring Redis back on the port it had).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Serve only TLS, with this certificate and key, trusting `ca`; clients need no certificate.
    pub fn tls(mut self, cert: impl AsRef<Path>, key: impl AsRef<Path>, ca: impl AsRef<Path>) -> Self {
        self.tls = true;
        for (flag, path) in
            [("--tls-cert-file", cert.as_ref()), ("--tls-key-file", key.as_ref()), ("--tls-ca-cert-file", ca.as_ref())]
        {
            self.args.push(flag.into());
            self.args.push(path.into());
        }
        self.args.extend(["--tls-auth-clients".into(), "no".into()]);
        self
    }

    /// Further `redis-server` arguments, after the fixture's own (a later one wins).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Starts it and waits until it serves.
    pub async fn start(self) -> anyhow::Result<Redis> {
        let port = self.port.unwrap_or_else(free_port);
        let dir = tempfile::Builder::new().prefix("llmesh-redis-").tempdir().context("a directory for redis-server")?;
        // Its log and anything it prints before logging starts (a bad argument), for errors.
        let log = std::fs::File::create(dir.path().join("redis.log")).context("redis-server's log file")?;
        let mut command = Command::new("redis-server");
        let port_text = port.to_string();
        if self.tls {
            command.args(["--port", "0", "--tls-port", &port_text]);
        } else {
            command.args(["--port", &port_text]);
        }
        command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("redis-server's log file")?)
            .stderr(log)
            .kill_on_drop(true);
        let child = command.spawn().context("spawning redis-server (scripts/test installs it)")?;
        let mut redis = Redis { port, child, dir };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let serving = if self.tls {
                TcpStream::connect(("127.0.0.1", port)).await.is_ok()
            } else {
                match answer(port, redis.child.id()).await {
                    Answer::Ours => true,
                    Answer::Nothing => false,
                    Answer::Other(pid) => bail!("port {port} is taken by another redis-server (pid {pid})"),
                }
            };
            if serving {
                return Ok(redis);
            }
            if let Some(status) = redis.child.try_wait().context("waiting for redis-server")? {
                bail!("redis-server exited at start-up on port {port} ({status}):\n{}", redis.log());
            }
            if Instant::now() > deadline {
                bail!("redis-server did not serve on port {port} within {START_TIMEOUT:?}:\n{}", redis.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What a plain port answered.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Nothing yet (not listening, or still loading its data).
    Nothing,
    /// A redis-server: this process, or one we cannot ask (its default user is off).
    Ours,
    /// Another process's redis-server holds the port.
    Other(u32),
}

/// Asks whoever serves `port` for its process id (`INFO server`): the fixture's server has
/// started when its own process answers. `-NOAUTH` (a server whose default user is off: the test
/// authenticates as someone else) is taken as started; `-LOADING` is not yet.
async fn answer(port: u16, pid: Option<u32>) -> Answer {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"INFO server\r\n").await.ok()?;
        let mut reply = Vec::new();
        let mut chunk = [0u8; 1024];
        // The reply is a few hundred bytes; the process id comes early in it.
        while reply.len() < 16 * 1024 {
            let read = stream.read(&mut chunk).await.ok()?;
            if read == 0 {
                break;
            }
            reply.extend_from_slice(&chunk[..read]);
            if reply.starts_with(b"-") {
                return Some(if reply.starts_with(b"-NOAUTH") { Answer::Ours } else { Answer::Nothing });
            }
            let text = String::from_utf8_lossy(&reply);
            if let Some(rest) = text.split("process_id:").nth(1)
                && let Some((id, _)) = rest.split_once("\r\n")
            {
                let id: u32 = id.trim().parse().ok()?;
                return Some(if Some(id) == pid { Answer::Ours } else { Answer::Other(id) });
            }
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(1), attempt).await.ok().flatten().unwrap_or(Answer::Nothing)
}

impl Redis {
    /// A plain redis-server on a free port.
    pub async fn start() -> anyhow::Result<Self> {
        Self::builder().start().await
    }

    /// A plain redis-server on `port`: used again to bring Redis back on the port it had.
    pub async fn start_on(port: u16) -> anyhow::Result<Self> {
        Self::builder().port(port).start().await
    }

    pub fn builder() -> RedisBuilder {
        RedisBuilder::default()
    }

    /// `redis://127.0.0.1:PORT/` (a plain server's).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A plain connection, to look at (or tamper with) what the code under test stored.
    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?.get_multiplexed_async_connection().await
    }

    /// Kills it now (SIGKILL) and waits for it to exit: Redis "dies" in the middle of a test.
    pub async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_else(|e| format!("(no log: {e})"))
    }
}

/// A private three-primary Redis Cluster on loopback, without persistence.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _nodes: Vec<Redis>,
}

impl RedisCluster {
    pub async fn start() -> anyhow::Result<Self> {
        let mut ports = Vec::new();
        // Each node also needs its cluster bus port, port + 10000.
        while ports.len() < 3 {
            let port = free_port();
            if port < 55_000 && !ports.contains(&port) && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                ports.push(port);
            }
        }
        let mut nodes = Vec::new();
        for &port in &ports {
            let node = Redis::builder()
                .port(port)
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .start()
                .await
                .with_context(|| format!("cluster node {port}"))?;
            nodes.push(node);
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .context("redis-cli --cluster create")?;
        if !created.status.success() {
            bail!("cluster create failed: {}", String::from_utf8_lossy(&created.stderr));
        }
        let deadline = Instant::now() + START_TIMEOUT;
        while !cluster_ok(&ports).await {
            if Instant::now() > deadline {
                bail!("the cluster never reached cluster_state:ok");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { ports, _nodes: nodes })
    }

    /// The nodes' URLs as a TOML array, for a `redis_cluster` setting.
    pub fn seed_urls(&self) -> String {
        let urls: Vec<String> = self.ports.iter().map(|p| format!("\"redis://127.0.0.1:{p}\"")).collect();
        format!("[{}]", urls.join(","))
    }
}

/// Whether every node says `cluster_state:ok`.
async fn cluster_ok(ports: &[u16]) -> bool {
    for port in ports {
        let Ok(info) = Command::new("redis-cli").args(["-p", &port.to_string(), "cluster", "info"]).output().await
        else {
            return false;
        };
        if !String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_serves_dies_and_comes_back_on_its_port() {
        let mut redis = Redis::start().await.unwrap();
        let mut conn = redis.connection().await.unwrap();
        let () = redis::cmd("SET").arg("k").arg("v").query_async(&mut conn).await.unwrap();
        let dir = redis.dir.path().to_owned();
        assert!(dir.is_dir());
        redis.kill().await;
        assert_eq!(answer(redis.port, None).await, Answer::Nothing, "still serving after kill");
        let port = redis.port;
        drop(redis);
        assert!(!dir.exists(), "its directory outlived it");
        let back = Redis::start_on(port).await.unwrap();
        let mut conn = back.connection().await.unwrap();
        let value: Option<String> = redis::cmd("GET").arg("k").query_async(&mut conn).await.unwrap();
        assert_eq!(value, None, "nothing persisted");
    }

    #[tokio::test]
    async fn a_server_that_cannot_start_is_an_error_with_its_log() {
        let error = Redis::builder().args(["--no-such-directive", "x"]).start().await.err().expect("started");
        let error = format!("{error:#}");
        assert!(error.contains("exited at start-up") && error.contains("no-such-directive"), "{error}");
    }

    #[tokio::test]
    async fn a_port_another_server_answers_on_is_an_error() {
        let taken = Redis::start().await.unwrap();
        let error = format!("{:#}", Redis::start_on(taken.port).await.err().expect("a second server on a taken port"));
        let port = taken.port.to_string();
        assert!(error.contains(&port) && (error.contains("taken by another") || error.contains("exited")), "{error}");
    }

    #[tokio::test]
    async fn a_server_whose_default_user_is_off_counts_as_started() {
        let redis = Redis::builder()
            .args(["--user", "default", "off", "--user", "test", "on", ">secret", "~*", "&*", "+@all"])
            .start()
            .await
            .unwrap();
        let url = format!("redis://test:secret@127.0.0.1:{}/", redis.port);
        let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
        let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
        assert_eq!(pong, "PONG");
    }
}

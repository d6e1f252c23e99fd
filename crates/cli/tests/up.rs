//! `llmesh up` as an operator runs it: the real binary, its four services as its children on free
//! ports, a real redis-server, real HTTP calls to the gateway.
//!
//! - `--redis-url` puts the rate limits and spend budgets in Redis, as well as the cache and the
//!   queue: a key is refused on its budget and `llmesh spend --redis` reads what it spent;
//!   `--config` reaches the gateway (its prices and keys file); the banner names the stores and
//!   the admin listeners, whose `/metrics` says the limiter is Redis.
//! - A service killed with SIGKILL is restarted and serves again while the gateway never stops
//!   answering; a service that keeps failing past `--max-restarts-per-minute` stops the mesh with
//!   a message naming it; SIGTERM still stops everything, exit 0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
};

const LLMESH: &str = env!("CARGO_BIN_EXE_llmesh");
const STARTUP: Duration = Duration::from_secs(120);
const SERVICES: [&str; 4] = ["gateway", "generation", "cache", "health"];

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A redis-server of its own, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (apt install redis-server)");
        let redis = Self { child, port, _dir: dir };
        for _ in 0..100 {
            if redis.cli(&["PING"]).await.trim() == "PONG" {
                return redis;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not answer on {port}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().await.unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A running `llmesh up`: what its banner said, and its log so far.
struct Up {
    child: Child,
    pgid: Pid,
    /// Service name -> gRPC address, from the banner.
    addrs: HashMap<String, SocketAddr>,
    /// Service name -> its `/metrics` URL, from the banner.
    metrics: HashMap<String, String>,
    banner: String,
    stderr: Arc<Mutex<String>>,
}

impl Up {
    /// `llmesh up --base-port 0 ARGS` in a process group of its own, once its banner is printed.
    async fn start(args: &[&str], env: &[(&str, String)]) -> Self {
        let mut child = Command::new(LLMESH)
            .args(["up", "--base-port", "0"])
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("LLMESH_CONFIG")
            .env_remove("LLMESH_REDIS_URL")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pgid = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = err_lines.next_line().await {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut out_lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = String::new();
        let read = async {
            while let Ok(Some(line)) = out_lines.next_line().await {
                banner.push_str(&line);
                banner.push('\n');
                if line.contains("Ctrl-C stops the mesh") {
                    return true;
                }
            }
            false
        };
        let complete = tokio::time::timeout(STARTUP, read).await.unwrap_or(false);
        assert!(complete, "no banner from llmesh up:\n{banner}\nstderr:\n{}", stderr.lock().unwrap());
        // Keep draining stdout (the services' own stdout goes there too).
        tokio::spawn(async move { while let Ok(Some(_)) = out_lines.next_line().await {} });
        let mut addrs = HashMap::new();
        let mut metrics = HashMap::new();
        for line in banner.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words[..] {
                // "  gateway    127.0.0.1:4000"
                [name, addr] if SERVICES.contains(&name) => {
                    addrs.insert(name.to_string(), addr.parse().unwrap());
                }
                // "  http://127.0.0.1:9464/metrics  (gateway)"
                [url, name] if url.ends_with("/metrics") => {
                    metrics.insert(name.trim_matches(['(', ')']).to_string(), url.to_string());
                }
                _ => {}
            }
        }
        assert_eq!(addrs.len(), 4, "{banner}");
        Self { child, pgid, addrs, metrics, banner, stderr }
    }

    fn gateway(&self) -> SocketAddr {
        self.addrs["gateway"]
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The pid `up` last reported for `service` (`generation (pid N) serving on ...`).
    fn pid(&self, service: &str) -> Option<i32> {
        let mark = format!("{service} (pid ");
        let log = self.log();
        let at = log.rfind(&mark)? + mark.len();
        log[at..].split(')').next()?.parse().ok()
    }

    /// SIGTERM, and its exit status within 60 s.
    async fn stop(mut self) -> ExitStatus {
        kill(self.pgid, Signal::SIGTERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
        status.expect("llmesh up did not stop within 60 s of SIGTERM").unwrap()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // Whatever is left of the mesh: up itself and every service.
        let _ = killpg(self.pgid, Signal::SIGKILL);
    }
}

fn llmesh(args: &[&str]) -> String {
    let output = std::process::Command::new(LLMESH).args(args).env_remove("RUST_LOG").output().unwrap();
    assert!(output.status.success(), "llmesh {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// One chat completion through the gateway's OpenAI route, past the cache:
/// (status, x-llmesh-degraded, body).
async fn chat(
    client: &reqwest::Client,
    gateway: SocketAddr,
    key: Option<&str>,
    prompt: &str,
) -> (u16, Option<String>, String) {
    chat_with(client, gateway, key, prompt, "bypass").await
}

/// The same, with `x-llmesh-cache: cache` (`default` reads and fills the cache).
async fn chat_with(
    client: &reqwest::Client,
    gateway: SocketAddr,
    key: Option<&str>,
    prompt: &str,
    cache: &str,
) -> (u16, Option<String>, String) {
    let mut request = client.post(format!("http://{gateway}/v1/chat/completions"));
    if cache != "default" {
        request = request.header("x-llmesh-cache", cache);
    }
    let mut request = request.json(&serde_json::json!({
        "model": "sim",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": prompt}],
    }));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let degraded = response.headers().get("x-llmesh-degraded").map(|v| v.to_str().unwrap().to_string());
    (status, degraded, response.text().await.unwrap())
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
async fn redis_url_puts_rate_limits_and_budgets_in_redis() {
    let redis = Redis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    let keys_str = keys.to_str().unwrap();
    // Thirty cents a month. At the prices below a call reserves about 11 cents (its prompt at the
    // byte bound, 64 + 16 + about 15 tokens at $1,000 a million, and 8 output tokens at $2,000) and
    // costs about 2, so some calls pass before the budget refuses one.
    let key = llmesh(&[
        "keys",
        "new",
        "--id",
        "alice",
        "--team",
        "search",
        "--requests-per-minute",
        "600",
        "--budget-usd",
        "0.3",
        "--file",
        keys_str,
    ]);
    let key = key.trim();
    let listed = llmesh(&["keys", "list", "--file", keys_str]);
    assert!(listed.contains("$0.3/month"), "keys list shows the budget:\n{listed}");
    let config = dir.path().join("mesh.toml");
    // $1,000 and $2,000 a million tokens: 8 output tokens reserve 1.6 cents.
    write(
        &config,
        &format!(
            "[gateway.auth]\nkeys_file = \"{keys_str}\"\n\n[gateway.prices.sim]\ninput_per_million = 1000.0\n\
             output_per_million = 2000.0\n"
        ),
    );
    let up = Up::start(&["--redis-url", &redis.url(), "--config", config.to_str().unwrap()], &[]).await;
    for store in ["response cache", "job queue", "rate limits, spend budgets"] {
        let line = up.banner.lines().find(|line| line.trim_start().starts_with(store)).unwrap_or_default();
        assert!(line.contains(&format!("Redis redis://127.0.0.1:{}/", redis.port)), "{store}:\n{}", up.banner);
    }
    assert_eq!(up.metrics.len(), 4, "an admin listener per service in the banner:\n{}", up.banner);

    let client = reqwest::Client::new();
    let mut refused = None;
    for n in 0..20 {
        let (status, _, body) = chat(&client, up.gateway(), Some(key), &format!("budget call {n}")).await;
        match status {
            200 => continue,
            429 => {
                refused = Some(body);
                break;
            }
            other => panic!("call {n}: HTTP {other}: {body}\n{}", up.log()),
        }
    }
    let refused = refused.expect("twenty calls never ran out of a thirty-cent budget");
    assert!(refused.contains("insufficient_quota") && refused.contains("budget"), "{refused}");

    // The spend is in Redis, where `llmesh spend` (and every other gateway) reads it.
    let spend = llmesh(&["spend", "--redis", &redis.url(), "--key", "alice", "--keys-file", keys_str, "--json"]);
    let spend: serde_json::Value = serde_json::from_str(&spend).unwrap();
    let spent = spend["spent_nanos"].as_u64().unwrap();
    assert!(spent > 0 && spent <= 300_000_000, "{spend}");
    let budgets = redis.cli(&["--scan", "--pattern", "llmesh:budget:*"]).await;
    assert!(!budgets.trim().is_empty(), "no budget in Redis");
    let limits = redis.cli(&["--scan", "--pattern", "llmesh:ratelimit:*"]).await;
    assert!(limits.contains("llmesh:ratelimit:requests:alice"), "no rate limit in Redis: {limits:?}");
    let metrics = client.get(&up.metrics["gateway"]).send().await.unwrap().text().await.unwrap();
    let decisions: Vec<&str> = metrics.lines().filter(|l| l.starts_with("llmesh_ratelimit_decisions_total{")).collect();
    assert!(
        !decisions.is_empty() && decisions.iter().all(|l| l.contains("limiter=\"redis\"")),
        "the gateway's limiter is Redis: {decisions:?}"
    );
    assert!(up.stop().await.success());
}

#[tokio::test]
async fn a_killed_service_is_restarted_while_the_gateway_keeps_answering() {
    let up = Up::start(&[], &[]).await;
    let client = reqwest::Client::new();
    let gateway = up.gateway();
    let (status, degraded, body) = chat(&client, gateway, None, "before the kill").await;
    assert_eq!((status, degraded), (200, None), "{body}");
    let gateway_pid = up.pid("gateway").unwrap();
    let generation_pid = up.pid("generation").unwrap();

    // A cached answer (the sim is deterministic: cached by default).
    let cached = "kept in the cache";
    let (status, _, first) = chat_with(&client, gateway, None, cached, "default").await;
    assert_eq!(status, 200, "{first}");
    let mut stored = false;
    for _ in 0..50 {
        if chat_with(&client, gateway, None, cached, "only-if-cached").await.0 == 200 {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stored, "the answer was never cached");

    // The gateway answers all along, from its cache while generation is gone: every probe is a
    // 200 with that answer, never a refused connection or an error. (Probes that reach generation
    // would open the gateway's circuit breaker for it, and the fallback would answer for a minute.)
    let probing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let prober = {
        let (client, probing) = (client.clone(), probing.clone());
        tokio::spawn(async move {
            let mut answered = 0u32;
            while probing.load(std::sync::atomic::Ordering::Relaxed) && answered < 10_000 {
                let (status, degraded, body) = chat_with(&client, gateway, None, cached, "only-if-cached").await;
                assert_eq!((status, degraded), (200, None), "the gateway stopped answering from its cache: {body}");
                answered += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answered
        })
    };

    kill(Pid::from_raw(generation_pid), Signal::SIGKILL).unwrap();
    let mut restarted = None;
    for _ in 0..300 {
        if let Some(pid) = up.pid("generation").filter(|pid| *pid != generation_pid) {
            restarted = Some(pid);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restarted = restarted.unwrap_or_else(|| panic!("generation was not restarted:\n{}", up.log()));
    let log = up.log();
    assert!(log.contains("generation exited unexpectedly (signal: 9"), "{log}");
    assert!(log.contains("restart 1;"), "the restart is counted: {log}");
    // It serves again: a call the gateway sends on to it is answered by it, not by a fallback.
    let mut served = None;
    for n in 0..100 {
        let (status, degraded, body) = chat(&client, gateway, None, &format!("after the restart {n}")).await;
        if status == 200 && degraded.is_none() {
            served = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served.is_some(), "generation (pid {restarted}) never served again:\n{}", up.log());
    probing.store(false, std::sync::atomic::Ordering::Relaxed);
    let answered = prober.await.unwrap();
    assert!(answered > 0);
    assert_eq!(up.pid("gateway"), Some(gateway_pid), "the gateway was never restarted");
    assert!(kill(Pid::from_raw(gateway_pid), None).is_ok(), "the gateway is still the same process");

    // Ctrl-C / SIGTERM still stops everything, the restarted service included.
    assert!(up.stop().await.success());
    assert!(kill(Pid::from_raw(restarted), None).is_err(), "the restarted generation was left running");
}

#[tokio::test]
async fn a_service_that_keeps_failing_stops_the_mesh_naming_it() {
    let mut up = Up::start(&["--max-restarts-per-minute", "0"], &[]).await;
    let cache_pid = up.pid("cache").unwrap();
    kill(Pid::from_raw(cache_pid), Signal::SIGKILL).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), up.child.wait()).await.unwrap().unwrap();
    assert!(!status.success(), "up exits non-zero when it gives up");
    let log = up.log();
    assert!(log.contains("cache keeps failing") && log.contains("stopping the mesh"), "{log}");
    for service in ["gateway", "generation", "health"] {
        let pid = up.pid(service).unwrap();
        assert!(kill(Pid::from_raw(pid), None).is_err(), "{service} (pid {pid}) was left running");
    }
}

#[tokio::test]
async fn a_config_file_reaches_every_service_and_what_it_sets_wins_over_ups_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mesh.toml");
    // `up` would make the sim the default model and turn the fault-injection models on; the file
    // says otherwise, and a model of its own.
    write(
        &config,
        "[gateway]\ndefault_model = \"tiny\"\n\n[generation]\nfault_models = false\n\n\
         [generation.models.tiny]\nprovider = \"sim\"\noutput_tokens = 2\n",
    );
    let up = Up::start(&["--config", config.to_str().unwrap()], &[]).await;
    assert!(
        up.banner.contains(&format!("Configuration: {}", config.canonicalize().unwrap().display())),
        "{}",
        up.banner
    );
    let client = reqwest::Client::new();
    let gateway = up.gateway();
    let answer: serde_json::Value = client
        .post(format!("http://{gateway}/generate"))
        .json(&serde_json::json!({"prompt": "which model?"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["model"], "tiny", "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 2, "{answer}");
    let models: serde_json::Value =
        client.get(format!("http://{gateway}/v1/models")).send().await.unwrap().json().await.unwrap();
    let names: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(names.contains(&"tiny") && names.contains(&"sim"), "{names:?}");
    assert!(!names.contains(&"sim-error"), "the file turned the fault-injection models off: {names:?}");
    assert!(up.stop().await.success());
}

//! `llmesh load` against a real mesh: `llmesh up --base-port 0` as a child process, then the load
//! generator run as the user would, its JSON report checked.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The llmesh binary cargo built for this test: `target/<profile>/llmesh`.
fn llmesh() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_llmesh"));
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// A running `llmesh up`, stopped with SIGTERM (then SIGKILL) when dropped.
struct Mesh {
    child: Child,
    addresses: HashMap<String, String>,
    /// Everything `llmesh up` and its children logged.
    log: tempfile::NamedTempFile,
}

impl Mesh {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(env: &[(&str, &str)]) -> Self {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(llmesh())
            .args(["up", "--base-port", "0"])
            .env("LLMESH_LOG_FORMAT", "text")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        // The banner: "  gateway    127.0.0.1:PORT" for each service, once all are SERVING.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut addresses = HashMap::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let words: Vec<&str> = line.split_whitespace().collect();
                if let [name @ ("gateway" | "generation" | "cache" | "health"), addr] = words[..] {
                    addresses.insert(name.to_string(), addr.to_string());
                    if addresses.len() == 4 {
                        let _ = tx.send(addresses.clone());
                    }
                }
            }
        });
        let mut mesh = Self { child, addresses: HashMap::new(), log };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addresses) => mesh.addresses = addresses,
            Err(_) => panic!("the mesh did not come up within {START_TIMEOUT:?}:\n{}", mesh.logs()),
        }
        mesh
    }

    fn addr(&self, service: &str) -> &str {
        &self.addresses[service]
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = std::time::Instant::now() + STOP_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `llmesh load ARGS --json -` and returns its JSON report.
fn load(mesh: &Mesh, args: &[&str]) -> Value {
    let output = Command::new(llmesh()).arg("load").args(args).args(["--json", "-"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "llmesh load {args:?} failed: {stderr}\nmesh:\n{}", mesh.logs());
    // stdout is the JSON alone; the human report went to stderr.
    assert!(stderr.contains("latency ms"), "{stderr}");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&output.stdout)))
}

#[test]
fn load_reports_what_the_mesh_answered() {
    let mesh = Mesh::start();
    let gateway = mesh.addr("gateway").to_string();
    let generation = mesh.addr("generation").to_string();

    // Closed loop, a request count, repeated prompts: all OK, most from the cache.
    let report = load(&mesh, &["--target", &gateway, "--requests", "60", "--concurrency", "4", "--connections", "2"]);
    assert_eq!(report["schema"], "llmesh.load.v1");
    assert_eq!((report["sent"].as_u64(), report["requests"].as_u64()), (Some(60), Some(60)), "{report:#}");
    assert_eq!(report["codes"], serde_json::json!({"OK": 60}), "{report:#}");
    assert_eq!(report["latency_ms"]["count"], 60);
    assert!(report["cache_hits"].as_u64().unwrap() > 0, "{report:#}");
    assert!(report["tokens"]["completion"].as_u64().unwrap() > 0, "{report:#}");

    // Open loop, a duration, unique prompts, streams: every call misses the cache and has a TTFT.
    let report =
        load(&mesh, &["--target", &gateway, "--rate", "40", "--duration", "1s", "--unique", "--stream", "--seed", "1"]);
    assert_eq!((report["scheduled"].as_u64(), report["sent"].as_u64()), (Some(40), Some(40)), "{report:#}");
    assert_eq!(report["successes"], 40, "{report:#}");
    assert_eq!(report["cache_hits"], 0, "{report:#}");
    assert_eq!(report["ttft_ms"]["count"], 40, "{report:#}");
    assert_eq!(report["start_lag_ms"]["count"], 40, "{report:#}");
    assert!(report["duration_s"].as_f64().unwrap() >= 1.0, "{report:#}");

    // Straight to generation, with a fault every third call: errors counted by gRPC code.
    let report = load(
        &mesh,
        &["--service", "generation", "--target", &generation, "--model", "sim-flaky-3", "--requests", "30"],
    );
    assert_eq!(report["codes"], serde_json::json!({"OK": 20, "UNAVAILABLE": 10}), "{report:#}");
    assert_eq!((report["successes"].as_u64(), report["errors"].as_u64()), (Some(20), Some(10)));

    // A model that is always rate limited (straight to generation: the gateway would degrade it
    // to a fallback answer).
    let report = load(
        &mesh,
        &[
            "--service",
            "generation",
            "--target",
            &generation,
            "--model",
            "sim-429",
            "--requests",
            "5",
            "--concurrency",
            "1",
        ],
    );
    assert_eq!(report["codes"], serde_json::json!({"RESOURCE_EXHAUSTED": 5}), "{report:#}");
    assert_eq!(report["latency_ms"], Value::Null);
}

#[test]
fn up_comes_up_with_a_quiet_log_filter() {
    // `llmesh up` reads each child's address from its `listening on` line, an INFO line: a user's
    // RUST_LOG=warn must not hide it (start-up used to wait for it until its timeout).
    let mesh = Mesh::start_with(&[("RUST_LOG", "warn")]);
    let report = load(&mesh, &["--target", mesh.addr("gateway"), "--requests", "5", "--concurrency", "1"]);
    assert_eq!(report["successes"], 5, "{report}");
    // And the filter still applies otherwise: no INFO line but the listening ones.
    let logs = mesh.logs();
    let info: Vec<&str> = logs.lines().filter(|l| l.contains(" INFO ") && !l.contains("listening on")).collect();
    assert!(info.is_empty(), "{info:#?}");
}

#[test]
fn load_over_http_reports_like_grpc() {
    let mesh = Mesh::start();
    let gateway = mesh.addr("gateway").to_string();

    // OpenAI chat completions over HTTP/1.1, repeated prompts: all OK, most from the cache.
    let report = load(&mesh, &["--protocol", "http", "--target", &gateway, "--requests", "30", "--concurrency", "3"]);
    assert_eq!(report["protocol"], "http");
    assert_eq!(report["codes"], serde_json::json!({"OK": 30}), "{report:#}");
    assert!(report["cache_hits"].as_u64().unwrap() > 0, "{report:#}");
    assert!(report["tokens"]["completion"].as_u64().unwrap() > 0, "{report:#}");

    // Server-sent events, open loop, unique prompts: each call has its time to first token.
    let args = ["--protocol", "http", "--target", &gateway, "--rate", "20", "--duration", "1s", "--unique", "--stream"];
    let report = load(&mesh, &args);
    assert_eq!(report["successes"], 20, "{report:#}");
    assert_eq!(report["cache_hits"], 0, "{report:#}");
    assert_eq!(report["ttft_ms"]["count"], 20, "{report:#}");
    assert!(report["tokens"]["completion"].as_u64().unwrap() > 0, "{report:#}");

    // Errors count under the gRPC code their HTTP status stands for.
    let report = load(&mesh, &["--protocol", "http", "--target", &gateway, "--model", "nope", "--requests", "3"]);
    assert_eq!(report["codes"], serde_json::json!({"NOT_FOUND": 3}), "{report:#}");
}

//! The admin listener on port 0: /metrics, /healthz, 404/405, and CPU profiles.

// Test helpers outside #[test] functions unwrap too (as in the other crates' integration tests).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use llmesh_telemetry::{AdminServer, PrometheusReader, SeedMetrics};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A plain HTTP/1.1 request over a fresh connection (`Connection: close`, read to EOF).
async fn request(addr: SocketAddr, method: &str, target: &str) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw)).await.unwrap().unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    let body = raw[split + 4..].to_vec();
    if let Some(len) = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        assert_eq!(body.len(), len.1.parse::<usize>().unwrap());
    }
    Reply { status, headers, body }
}

async fn start() -> (SocketAddr, SdkMeterProvider, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let reader = PrometheusReader::new();
    let provider = SdkMeterProvider::builder().with_reader(reader.clone()).build();
    let server = AdminServer::bind("127.0.0.1:0".parse().unwrap()).await.unwrap().with_metrics(reader);
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .serve(async move {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
    });
    (addr, provider, stop_tx, task)
}

#[tokio::test]
async fn metrics_healthz_and_unknown_paths() {
    let (addr, provider, stop, task) = start().await;
    let seed = SeedMetrics::new(&provider.meter("llmesh"));
    seed.record("Generate", tonic::Code::Ok, Duration::from_millis(120));

    let metrics = request(addr, "GET", "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
    let text = metrics.text();
    assert!(text.contains("# TYPE llm_requests_total counter\n"), "{text}");
    assert!(text.contains("llm_requests_total{endpoint=\"Generate\",status=\"OK\"} 1\n"), "{text}");
    assert!(text.contains("llm_response_time_bucket{endpoint=\"Generate\",le=\"0.5\"} 1\n"), "{text}");

    let health = request(addr, "GET", "/healthz").await;
    assert_eq!((health.status, health.text().as_str()), (200, "ok"));

    assert_eq!(request(addr, "GET", "/nope").await.status, 404);
    assert_eq!(request(addr, "GET", "/").await.status, 404);
    let post = request(addr, "POST", "/metrics").await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET"));
    assert_eq!(request(addr, "GET", "/debug/pprof/profile?seconds=zero").await.status, 400);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
    // Stopped: no longer accepting.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// Keeps a core busy so the profiler has samples.
fn burn(for_how_long: Duration) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let until = Instant::now() + for_how_long;
        let mut x = 0u64;
        while Instant::now() < until {
            for i in 0..10_000u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
        }
        x
    })
}

// One test for everything that profiles: the profiler is process-global.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_profiles_one_at_a_time() {
    let (addr, _provider, stop, task) = start().await;

    let burner = burn(Duration::from_millis(1_300));
    let started = Instant::now();
    let pprof = request(addr, "GET", "/debug/pprof/profile?seconds=1").await;
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(pprof.status, 200, "{}", pprof.text());
    assert_eq!(pprof.header("content-type"), Some("application/octet-stream"));
    assert!(!pprof.body.is_empty());
    burner.join().unwrap();

    let burner = burn(Duration::from_millis(1_300));
    let svg = request(addr, "GET", "/debug/pprof/profile?seconds=1&format=svg").await;
    assert_eq!(svg.status, 200, "{}", svg.text());
    assert_eq!(svg.header("content-type"), Some("image/svg+xml"));
    let text = svg.text();
    assert!(text.starts_with("<?xml") || text.starts_with("<svg"), "{}", &text[..text.len().min(200)]);
    assert!(!text.contains("No samples"), "a busy process gives a real flamegraph");
    burner.join().unwrap();

    let first = tokio::spawn(async move { request(addr, "GET", "/debug/pprof/profile?seconds=2").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = request(addr, "GET", "/debug/pprof/profile?seconds=1").await;
    assert_eq!(second.status, 409);
    assert_eq!(first.await.unwrap().status, 200);
    // Free again afterwards.
    assert_eq!(request(addr, "GET", "/debug/pprof/profile?seconds=1&format=svg").await.status, 200);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
}

/// A plain HTTP/1.1 GET with extra header lines.
async fn get_with(addr: SocketAddr, target: &str, headers: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw)).await.unwrap().unwrap();
    String::from_utf8_lossy(&raw).split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_bearer_token_guards_every_path_and_may_change() {
    let token: std::sync::Arc<std::sync::Mutex<std::sync::Arc<str>>> =
        std::sync::Arc::new(std::sync::Mutex::new("first-token".into()));
    let current = token.clone();
    let server = AdminServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
        .with_bearer_token(std::sync::Arc::new(move || Some(current.lock().unwrap().clone())));
    let addr = server.local_addr();
    let task = tokio::spawn(server.serve(std::future::pending()));

    for path in ["/metrics", "/healthz", "/debug/pprof/profile?seconds=1", "/nope"] {
        assert_eq!(get_with(addr, path, "").await, 401, "{path} without a token");
        assert_eq!(get_with(addr, path, "Authorization: Bearer wrong-token\r\n").await, 401, "{path}");
        assert_eq!(get_with(addr, path, "Authorization: Basic first-token\r\n").await, 401, "{path}");
    }
    assert_eq!(get_with(addr, "/healthz", "Authorization: Bearer first-token\r\n").await, 200);
    assert_eq!(get_with(addr, "/nope", "Authorization: Bearer first-token\r\n").await, 404);

    *token.lock().unwrap() = "second-token".into();
    assert_eq!(get_with(addr, "/healthz", "Authorization: Bearer first-token\r\n").await, 401);
    assert_eq!(get_with(addr, "/healthz", "Authorization: Bearer second-token\r\n").await, 200);
    task.abort();
}

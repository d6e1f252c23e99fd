//! The status page: the mesh at a glance, live, on the health service's admin listener.
//!
//! ```text
//! GET /status                     the page (HTML; its script and style are embedded in the binary)
//! GET /status/app.js, /status/style.css
//! GET /status/api/state?after=N   JSON: what is shown now, and the chart points after point N
//!                                 (all of the last 15 minutes for N = 0); waits up to 10 s for
//!                                 a point newer than N (long polling: the page is at most one
//!                                 scrape behind)
//! ```
//!
//! Behind the admin listener's token, like `/metrics`: without it, 401 (a browser then asks for it
//! as the password of HTTP Basic). Without `admin.bearer_token_file` the page is not served at all
//! (404), so it is never open to whoever reaches the port.
//!
//! Where the figures come from: every `interval_ms` the service reads `/metrics` from each of
//! `[health.status] sources` (the other services' admin listeners, presenting the operator's
//! token), derives one point ([`derive`]) and keeps the last 15 minutes of points in a ring; the
//! services and replicas with their health are the monitor's (`MeshHealth`). Nothing is fetched
//! from elsewhere: the page's assets are in the binary, and its script talks only to this
//! listener.
//!
//! What it never shows: secrets (API keys appear by their public id; addresses are shown as the
//! monitor redacts them; the token is never echoed), prompts or answers (metrics hold none).

mod derive;
mod exposition;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::Full;
use hyper::{Method, Response, StatusCode, Uri, body::Bytes, header};
use llmesh_proto::health::v1::{ServingStatus, StatusResponse};
use llmesh_telemetry::{AdminResponse, AdminRoutes, BearerToken};
use llmesh_util::redact::redact_url;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use derive::{Current, Deriver, Point, Scrape};

/// How far back the charts go.
const HISTORY: Duration = Duration::from_secs(15 * 60);
/// The longest a long poll waits for a new point.
const LONG_POLL: Duration = Duration::from_secs(10);
/// Most sources scraped.
const MAX_SOURCES: usize = 64;
/// The largest `/metrics` body read from a source.
const MAX_BODY_BYTES: usize = 8 << 20;

const PAGE: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// `[health.status]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StatusConfig {
    /// Admin listeners to read `/metrics` from: `{ service = "gateway", address = "http://127.0.0.1:9464" }`.
    /// `service` says how its metrics count (`gateway`, `generation`, `cache`, `health`).
    pub sources: Vec<Source>,
    /// How often every source is read (one chart point each time).
    pub interval_ms: u64,
    /// Longest wait for one source's `/metrics`.
    pub timeout_ms: u64,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self { sources: Vec::new(), interval_ms: 1_000, timeout_ms: 800 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub service: String,
    /// `http://host:port` of its admin listener.
    pub address: String,
}

/// What the page is sent.
#[derive(Debug, Serialize)]
struct State<'a> {
    seq: u64,
    interval_ms: u64,
    mesh: &'static str,
    checked_at_unix_ms: i64,
    components: Vec<ComponentRow>,
    #[serde(flatten)]
    current: &'a Current,
    points: Vec<&'a Point>,
}

#[derive(Debug, Serialize)]
struct ComponentRow {
    name: String,
    service: String,
    address: String,
    status: &'static str,
    detail: String,
    latency_ms: f64,
}

/// The ring of points and the latest current figures.
#[derive(Debug, Default)]
struct Shared {
    points: VecDeque<Point>,
    current: Current,
}

/// The scraper and the routes that show what it found.
#[derive(Clone)]
pub struct StatusPage {
    shared: Arc<Mutex<Shared>>,
    seq: watch::Receiver<u64>,
    mesh: watch::Receiver<StatusResponse>,
    interval_ms: u64,
    /// Whether the admin listener asks for a token (the page is served only then).
    protected: bool,
}

impl std::fmt::Debug for StatusPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusPage").field("protected", &self.protected).finish_non_exhaustive()
    }
}

impl StatusPage {
    /// Starts reading the sources (the task stops when `shutdown` is dropped or sent).
    pub fn start(
        config: &StatusConfig,
        token: Option<BearerToken>,
        mesh: watch::Receiver<StatusResponse>,
    ) -> anyhow::Result<Self> {
        let interval = Duration::from_millis(config.interval_ms.max(100));
        let capacity = usize::try_from(HISTORY.as_millis() / interval.as_millis().max(1)).unwrap_or(900).max(1);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (seq_tx, seq) = watch::channel(0);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms.max(10)))
            .no_proxy()
            .build()
            .map_err(|e| anyhow::anyhow!("building the status page's HTTP client: {e}"))?;
        let sources: Vec<Source> = config.sources.iter().take(MAX_SOURCES).cloned().collect();
        for source in &sources {
            if !(source.address.starts_with("http://") || source.address.starts_with("https://")) {
                anyhow::bail!(
                    "[health.status] source {}: address must be http://host:port",
                    redact_url(&source.address)
                );
            }
        }
        let scraper = Scraper { client, sources, token: token.clone(), shared: shared.clone(), capacity, seq: seq_tx };
        tokio::spawn(scraper.run(interval));
        Ok(Self { shared, seq, mesh, interval_ms: config.interval_ms, protected: token.is_some() })
    }

    /// The admin routes: `/status` and below.
    pub fn routes(self) -> AdminRoutes {
        let page = Arc::new(self);
        Arc::new(move |method: &Method, uri: &Uri| {
            let path = uri.path();
            if path != "/status" && !path.starts_with("/status/") {
                return None;
            }
            let page = Arc::clone(&page);
            let method = method.clone();
            let path = path.to_string();
            let query = uri.query().unwrap_or("").to_string();
            Some(Box::pin(async move { page.answer(&method, &path, &query).await }))
        })
    }

    async fn answer(&self, method: &Method, path: &str, query: &str) -> AdminResponse {
        if !self.protected {
            return respond(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "the status page needs admin.bearer_token_file\n",
            );
        }
        if method != Method::GET {
            let mut response =
                respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "method not allowed\n");
            response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET"));
            return response;
        }
        match path {
            "/status" | "/status/" => respond(StatusCode::OK, "text/html; charset=utf-8", PAGE),
            "/status/app.js" => respond(StatusCode::OK, "text/javascript; charset=utf-8", SCRIPT),
            "/status/style.css" => respond(StatusCode::OK, "text/css; charset=utf-8", STYLE),
            "/status/api/state" => match after(query) {
                Ok(after) => self.state(after).await,
                Err(message) => respond(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", message),
            },
            _ => respond(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n"),
        }
    }

    /// The state once there is a point newer than `after` (or the long poll's time is up).
    async fn state(&self, after: u64) -> AdminResponse {
        let mut seq = self.seq.clone();
        let _ = tokio::time::timeout(LONG_POLL, seq.wait_for(|latest| *latest > after)).await;
        let mesh = self.mesh.borrow().clone();
        let body = {
            let Ok(shared) = self.shared.lock() else {
                return respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", "status unavailable\n");
            };
            let state = State {
                seq: shared.points.back().map_or(0, |p| p.seq),
                interval_ms: self.interval_ms,
                mesh: status_name(mesh.status),
                checked_at_unix_ms: mesh.checked_at_unix_ms,
                components: mesh
                    .components
                    .iter()
                    .map(|c| ComponentRow {
                        name: c.name.clone(),
                        service: c.service.clone(),
                        address: redact_url(&c.address),
                        status: status_name(c.status),
                        detail: c.detail.clone(),
                        latency_ms: c.latency_us as f64 / 1000.0,
                    })
                    .collect(),
                current: &shared.current,
                points: shared.points.iter().filter(|p| p.seq > after).collect(),
            };
            serde_json::to_vec(&state)
        };
        match body {
            Ok(body) => {
                let mut response = respond(StatusCode::OK, "application/json", body);
                response.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
                response
            }
            Err(error) => {
                tracing::warn!(%error, "cannot encode the status page's state");
                respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", "status unavailable\n")
            }
        }
    }
}

/// `after=N` from the query (0 without it).
fn after(query: &str) -> Result<u64, &'static str> {
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("after=") {
            return value.parse().map_err(|_| "after must be a whole number\n");
        }
    }
    Ok(0)
}

fn status_name(status: i32) -> &'static str {
    match ServingStatus::try_from(status) {
        Ok(ServingStatus::Serving) => "SERVING",
        Ok(ServingStatus::Degraded) => "DEGRADED",
        Ok(ServingStatus::NotServing) => "NOT_SERVING",
        _ => "UNKNOWN",
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> AdminResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    // Nothing from elsewhere: no other origin's scripts, styles, images or connections.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
             frame-ancestors 'none'",
        ),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    response
}

struct Scraper {
    client: reqwest::Client,
    sources: Vec<Source>,
    token: Option<BearerToken>,
    shared: Arc<Mutex<Shared>>,
    capacity: usize,
    seq: watch::Sender<u64>,
}

impl Scraper {
    async fn run(self, interval: Duration) {
        let mut deriver = Deriver::default();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = tokio::time::Instant::now();
        loop {
            ticker.tick().await;
            let scrapes =
                futures::future::join_all(self.sources.iter().enumerate().map(|(i, s)| self.scrape(i, s))).await;
            let now = tokio::time::Instant::now();
            let elapsed = now.duration_since(last).as_secs_f64();
            last = now;
            let (point, current) = deriver.round(now_ms(), elapsed, &scrapes);
            let seq = point.seq;
            if let Ok(mut shared) = self.shared.lock() {
                shared.points.push_back(point);
                while shared.points.len() > self.capacity {
                    shared.points.pop_front();
                }
                shared.current = current;
            }
            self.seq.send_replace(seq);
            // Nobody listens once the page is gone (the server stopped).
            if self.seq.is_closed() {
                return;
            }
        }
    }

    async fn scrape(&self, index: usize, source: &Source) -> Scrape {
        let samples = match self.fetch(source).await {
            Ok(text) => Some(exposition::parse(&text)),
            Err(error) => {
                tracing::debug!(source = %redact_url(&source.address), %error, "status page: cannot read /metrics");
                None
            }
        };
        Scrape { source: index, service: source.service.clone(), samples }
    }

    async fn fetch(&self, source: &Source) -> anyhow::Result<String> {
        let url = format!("{}/metrics", source.address.trim_end_matches('/'));
        let mut request = self.client.get(url);
        if let Some(token) = self.token.as_ref().and_then(|token| token()) {
            request = request.bearer_auth(token);
        }
        let mut response = request.send().await.map_err(|e| anyhow::anyhow!("{}", e.without_url()))?;
        if !response.status().is_success() {
            anyhow::bail!("answered {}", response.status());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| anyhow::anyhow!("{}", e.without_url()))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                anyhow::bail!("/metrics is larger than {MAX_BODY_BYTES} bytes");
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).map_err(|_| anyhow::anyhow!("/metrics is not UTF-8"))
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_is_a_number_or_nothing() {
        assert_eq!(after(""), Ok(0));
        assert_eq!(after("after=12"), Ok(12));
        assert_eq!(after("x=1&after=3"), Ok(3));
        assert!(after("after=-1").is_err());
    }

    #[test]
    fn the_assets_name_nothing_from_elsewhere() {
        for asset in [PAGE, SCRIPT, STYLE] {
            assert!(!asset.contains("http://") && !asset.contains("https://") && !asset.contains("//cdn"), "{asset}");
        }
        assert!(PAGE.contains("/status/app.js") && PAGE.contains("/status/style.css"));
    }
}

//! The admin HTTP/1 listener: `/metrics`, `/healthz` and `/debug/pprof/profile`.
//!
//! ```text
//! GET /metrics                                  Prometheus text (text/plain; version=0.0.4)
//! GET /healthz                                  200 "ok"
//! GET /debug/pprof/profile?seconds=N            CPU profile at 99 Hz (N: default 10, 1..=60),
//!                                               pprof protobuf (application/octet-stream)
//! GET /debug/pprof/profile?seconds=N&format=svg the same as a flamegraph (image/svg+xml)
//! ```
//! One profile at a time (a second one gets 409). Other paths are 404, other methods 405.
//!
//! A service may add routes of its own ([`AdminServer::with_routes`]: the health service's status
//! page); they are asked first, for every request that passed the token check.
//!
//! Protection, when the listener is reachable from elsewhere (the server runner decides; see
//! `llmesh_common::server`): [`AdminServer::with_bearer_token`] makes every path answer 401 unless
//! the request carries `Authorization: Bearer <token>` (compared in constant time; the token is
//! asked for on every request, so it may change while the server runs), and
//! [`AdminServer::with_upgrade`] runs each accepted connection through a handshake first (TLS,
//! with or without client certificates) and serves HTTP over what it returns; a connection whose
//! handshake fails or takes longer than [`HEADER_READ_TIMEOUT`] is closed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::prometheus::{CONTENT_TYPE, PrometheusReader};

/// CPU profiling sample rate (Hz); 99 rather than 100 avoids lock-step with periodic work.
const PROFILE_FREQUENCY: i32 = 99;
const PROFILE_DEFAULT_SECONDS: u64 = 10;
const PROFILE_MAX_SECONDS: u64 = 60;
/// Slow clients may not hold a connection open without sending a request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection HTTP can be spoken over.
pub trait AdminIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AdminIo for T {}

/// What an accepted connection goes through before HTTP (a TLS handshake).
pub type Upgrade =
    Arc<dyn Fn(TcpStream) -> Pin<Box<dyn Future<Output = std::io::Result<Box<dyn AdminIo>>> + Send>> + Send + Sync>;

/// The token every request must present, asked for on each request (`None`: none needed).
pub type BearerToken = Arc<dyn Fn() -> Option<Arc<str>> + Send + Sync>;

/// What the admin listener answers.
pub type AdminResponse = Response<Full<Bytes>>;

/// A service's own admin routes: asked with each authorized request's method and URI before the
/// built-in paths; `None` leaves the request to them.
pub type AdminRoutes =
    Arc<dyn Fn(&Method, &Uri) -> Option<Pin<Box<dyn Future<Output = AdminResponse> + Send>>> + Send + Sync>;

/// A bound admin listener; [`AdminServer::local_addr`] tells the port when binding port 0.
pub struct AdminServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics: Option<PrometheusReader>,
    upgrade: Option<Upgrade>,
    token: Option<BearerToken>,
    routes: Option<AdminRoutes>,
}

impl std::fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminServer")
            .field("local_addr", &self.local_addr)
            .field("upgrade", &self.upgrade.is_some())
            .field("token", &self.token.is_some())
            .field("routes", &self.routes.is_some())
            .finish_non_exhaustive()
    }
}

impl AdminServer {
    /// Binds `addr` and logs `admin listening on ADDR`. `/metrics` renders the global meter
    /// provider installed by [`crate::init`].
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind(addr).await.with_context(|| format!("binding the admin listener on {addr}"))?;
        let local_addr = listener.local_addr().context("reading the admin listener's address")?;
        tracing::info!("admin listening on {local_addr}");
        Ok(Self { listener, local_addr, metrics: None, upgrade: None, token: None, routes: None })
    }

    /// Runs each accepted connection through `upgrade` (a TLS handshake) before serving it.
    pub fn with_upgrade(mut self, upgrade: Upgrade) -> Self {
        self.upgrade = Some(upgrade);
        self
    }

    /// Answers 401 to every request without `Authorization: Bearer <token>`.
    pub fn with_bearer_token(mut self, token: BearerToken) -> Self {
        self.token = Some(token);
        self
    }

    /// Asks `routes` first for every authorized request (see [`AdminRoutes`]).
    pub fn with_routes(mut self, routes: AdminRoutes) -> Self {
        self.routes = Some(routes);
        self
    }

    /// Serves `/metrics` from `reader` instead of the global provider (tests, embedded use).
    pub fn with_metrics(mut self, reader: PrometheusReader) -> Self {
        self.metrics = Some(reader);
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves; then stops accepting and asks open connections to close
    /// after their current request.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let state = Arc::new(State { metrics: self.metrics, token: self.token, routes: self.routes });
        let (closing_tx, closing_rx) = tokio::sync::watch::channel(());
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _peer)) => stream,
                Err(err) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = Arc::clone(&state);
            let mut closing = closing_rx.clone();
            let upgrade = self.upgrade.clone();
            tokio::spawn(async move {
                let io: Box<dyn AdminIo> = match upgrade {
                    None => Box::new(stream),
                    Some(upgrade) => match tokio::time::timeout(HEADER_READ_TIMEOUT, upgrade(stream)).await {
                        Ok(Ok(io)) => io,
                        Ok(Err(err)) => {
                            tracing::debug!(error = %err, "admin handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("admin handshake timed out");
                            return;
                        }
                    },
                };
                let service = service_fn(move |request| handle(Arc::clone(&state), request));
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(io), service);
                tokio::pin!(connection);
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    _ = closing.changed() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(err) = result {
                    tracing::debug!(error = %err, "admin connection ended with an error");
                }
            });
        }
        drop(closing_tx);
        Ok(())
    }
}

/// Binds `addr` and serves until `shutdown` resolves.
pub async fn serve_admin(addr: SocketAddr, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    AdminServer::bind(addr).await?.serve(shutdown).await
}

struct State {
    metrics: Option<PrometheusReader>,
    token: Option<BearerToken>,
    routes: Option<AdminRoutes>,
}

/// Whether `request` carries the token (always, when none is needed).
fn authorized(state: &State, request: &Request<Incoming>) -> bool {
    match &state.token {
        Some(token) => presents(token, request.headers().get(header::AUTHORIZATION).map(|value| value.as_bytes())),
        None => true,
    }
}

/// Whether `authorization` (the header's value) is `Bearer <token>`, or `Basic` with the token as
/// the password, compared in constant time; false while the token cannot be read.
pub fn presents(token: &BearerToken, authorization: Option<&[u8]>) -> bool {
    let Some(token) = token() else { return false };
    let Some(authorization) = authorization else { return false };
    if let Some(presented) = authorization.strip_prefix(b"Bearer ") {
        return constant_time_eq(presented, token.as_bytes());
    }
    let Some(credentials) = authorization.strip_prefix(b"Basic ").and_then(base64_decode) else { return false };
    let Some(colon) = credentials.iter().position(|b| *b == b':') else { return false };
    constant_time_eq(&credentials[colon + 1..], token.as_bytes())
}

/// Standard base64 (with or without padding); `None` for anything else. Fifteen lines here rather
/// than a crate for the one header that needs it.
fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    let text = text.trim_ascii();
    let text = text.strip_suffix(b"==").or_else(|| text.strip_suffix(b"=")).unwrap_or(text);
    if text.len() % 4 == 1 || text.len() > 4096 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut bits = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            bits |= sextet(*c)? << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// Equality whose running time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Result<AdminResponse, Infallible> {
    if !authorized(&state, &request) {
        let mut response = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
        // Basic too: a browser asks the person for the token (as the password) only then. One
        // header per challenge: browsers read a single header's first challenge only.
        let headers = response.headers_mut();
        headers.insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        headers.append(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static(r#"Basic realm="llmesh admin", charset="UTF-8""#),
        );
        return Ok(response);
    }
    if let Some(answer) = state.routes.as_ref().and_then(|routes| routes(request.method(), request.uri())) {
        return Ok(answer.await);
    }
    let path = request.uri().path();
    let known = matches!(path, "/metrics" | "/healthz" | "/debug/pprof/profile");
    if !known {
        return Ok(text(StatusCode::NOT_FOUND, "not found\n"));
    }
    if request.method() != Method::GET {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return Ok(response);
    }
    Ok(match path {
        "/metrics" => {
            let body = match &state.metrics {
                Some(reader) => reader.render(),
                None => crate::render_prometheus(),
            };
            with_type(StatusCode::OK, CONTENT_TYPE, body.into_bytes())
        }
        "/healthz" => text(StatusCode::OK, "ok"),
        _ => profile(request.uri().query().unwrap_or("")).await,
    })
}

fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    with_type(status, "text/plain; charset=utf-8", body.as_bytes().to_vec())
}

fn with_type(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> AdminResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

/// Set while a profile runs (pprof's profiler is process-global).
static PROFILING: AtomicBool = AtomicBool::new(false);

/// Clears [`PROFILING`] when the profile really ends (it lives on the profiling thread, so a
/// client that hangs up does not free the slot while the profiler still runs).
struct ProfilingSlot;

impl ProfilingSlot {
    fn acquire() -> Option<Self> {
        PROFILING.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).ok().map(|_| Self)
    }
}

impl Drop for ProfilingSlot {
    fn drop(&mut self) {
        PROFILING.store(false, Ordering::Release);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProfileFormat {
    Pprof,
    Svg,
}

fn parse_profile_query(query: &str) -> Result<(Duration, ProfileFormat), String> {
    let mut seconds = PROFILE_DEFAULT_SECONDS;
    let mut format = ProfileFormat::Pprof;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "seconds" => {
                seconds = value
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("seconds must be a positive integer, got {value:?}\n"))?
                    .min(PROFILE_MAX_SECONDS);
            }
            "format" => {
                format = match value {
                    "svg" | "flamegraph" => ProfileFormat::Svg,
                    "pprof" | "proto" | "" => ProfileFormat::Pprof,
                    other => return Err(format!("format must be svg or pprof, got {other:?}\n")),
                }
            }
            _ => {}
        }
    }
    Ok((Duration::from_secs(seconds), format))
}

async fn profile(query: &str) -> AdminResponse {
    let (duration, format) = match parse_profile_query(query) {
        Ok(parsed) => parsed,
        Err(message) => return with_type(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", message.into_bytes()),
    };
    let Some(slot) = ProfilingSlot::acquire() else {
        return text(StatusCode::CONFLICT, "a profile is already running\n");
    };
    tracing::info!(seconds = duration.as_secs(), ?format, "CPU profile started");
    let result = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        run_profile(duration, format)
    })
    .await;
    match result {
        Ok(Ok(body)) => match format {
            ProfileFormat::Pprof => with_type(StatusCode::OK, "application/octet-stream", body),
            ProfileFormat::Svg => with_type(StatusCode::OK, "image/svg+xml", body),
        },
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "CPU profile failed");
            with_type(StatusCode::INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", format!("{err:#}\n").into_bytes())
        }
        Err(join) => {
            tracing::warn!(error = %join, "CPU profile task failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "profile failed\n")
        }
    }
}

/// Profiles the whole process for `duration` (blocking).
fn run_profile(duration: Duration, format: ProfileFormat) -> anyhow::Result<Vec<u8>> {
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(PROFILE_FREQUENCY)
        // libgcc's unwinder is not signal-safe; skip samples taken inside these libraries.
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .context("starting the profiler")?;
    std::thread::sleep(duration);
    let report = guard.report().build().context("building the profile report")?;
    drop(guard);
    match format {
        ProfileFormat::Pprof => {
            use pprof::protos::Message as _;
            let profile = report.pprof().context("encoding the profile")?;
            profile.write_to_bytes().context("serialising the profile")
        }
        ProfileFormat::Svg => {
            let mut svg = Vec::new();
            report.flamegraph(&mut svg).context("drawing the flamegraph")?;
            if svg.is_empty() {
                // inferno writes nothing without samples; answer a valid, empty picture.
                svg = EMPTY_FLAMEGRAPH.as_bytes().to_vec();
            }
            Ok(svg)
        }
    }
}

const EMPTY_FLAMEGRAPH: &str = concat!(
    r#"<?xml version="1.0" standalone="no"?>"#,
    "\n",
    r#"<svg version="1.1" width="600" height="60" xmlns="http://www.w3.org/2000/svg">"#,
    r#"<text x="10" y="35" font-family="monospace" font-size="14">No samples: the process was idle.</text></svg>"#,
    "\n"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_carry_the_token_as_the_password() {
        let token: BearerToken = Arc::new(|| Some(Arc::from("s3cret")));
        assert!(presents(&token, Some(b"Bearer s3cret")));
        // "operator:s3cret", "x:s3cret" (padded), ":s3cret".
        assert!(presents(&token, Some(b"Basic b3BlcmF0b3I6czNjcmV0")));
        assert!(presents(&token, Some(b"Basic eDpzM2NyZXQ=")));
        assert!(presents(&token, Some(b"Basic OnMzY3JldA==")));
        // "operator:wrong", "s3cret" (no colon), not base64, another scheme, nothing.
        assert!(!presents(&token, Some(b"Basic b3BlcmF0b3I6d3Jvbmc=")));
        assert!(!presents(&token, Some(b"Basic czNjcmV0")));
        assert!(!presents(&token, Some(b"Basic !!!!")));
        assert!(!presents(&token, Some(b"Digest s3cret")));
        assert!(!presents(&token, None));
        assert_eq!(base64_decode(b"aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(base64_decode(b"aGVsbG8"), Some(b"hello".to_vec()));
        assert_eq!(base64_decode(b"a"), None);
    }

    /// A service's own routes answer after the token check, and only for their paths; a 401
    /// offers both schemes, one header each.
    #[tokio::test]
    async fn routes_are_behind_the_token() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let token: BearerToken = Arc::new(|| Some(Arc::from("s3cret")));
        let routes: AdminRoutes = Arc::new(|method: &Method, uri: &Uri| {
            let answer = format!("{method} {}", uri.path());
            (uri.path() == "/mine").then(|| {
                Box::pin(async move { with_type(StatusCode::OK, "text/plain", answer.into_bytes()) })
                    as Pin<Box<dyn Future<Output = AdminResponse> + Send>>
            })
        });
        let server =
            AdminServer::bind(([127, 0, 0, 1], 0).into()).await.unwrap().with_bearer_token(token).with_routes(routes);
        let addr = server.local_addr();
        let task = tokio::spawn(server.serve(std::future::pending()));
        let get = |path: &'static str, authorization: &'static str| async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{authorization}Connection: close\r\n\r\n");
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut raw = String::new();
            stream.read_to_string(&mut raw).await.unwrap();
            raw
        };
        let refused = get("/mine", "").await;
        assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
        assert!(refused.contains("www-authenticate: Bearer\r\n"), "{refused}");
        assert!(refused.contains("www-authenticate: Basic realm=\"llmesh admin\""), "{refused}");
        assert!(get("/mine", "Authorization: Bearer wrong\r\n").await.starts_with("HTTP/1.1 401"));
        let mine = get("/mine", "Authorization: Bearer s3cret\r\n").await;
        assert!(mine.starts_with("HTTP/1.1 200") && mine.ends_with("GET /mine"), "{mine}");
        // "operator:s3cret", as a browser sends it.
        let basic = get("/mine", "Authorization: Basic b3BlcmF0b3I6czNjcmV0\r\n").await;
        assert!(basic.starts_with("HTTP/1.1 200"), "{basic}");
        // Other paths are still the listener's own.
        assert!(get("/healthz", "Authorization: Bearer s3cret\r\n").await.ends_with("ok"));
        assert!(get("/other", "Authorization: Bearer s3cret\r\n").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }

    #[test]
    fn profile_query() {
        assert_eq!(parse_profile_query(""), Ok((Duration::from_secs(10), ProfileFormat::Pprof)));
        assert_eq!(parse_profile_query("seconds=3"), Ok((Duration::from_secs(3), ProfileFormat::Pprof)));
        assert_eq!(parse_profile_query("seconds=600&format=svg"), Ok((Duration::from_secs(60), ProfileFormat::Svg)));
        assert!(parse_profile_query("seconds=0").is_err());
        assert!(parse_profile_query("seconds=abc").is_err());
        assert!(parse_profile_query("format=png").is_err());
    }
}

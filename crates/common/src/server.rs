//! The gRPC server every service runs: its own services plus `grpc.health.v1` and server
//! reflection, on a listener that may have been bound to port 0, with graceful shutdown.
//!
//! Shutdown order: health flips to NOT_SERVING first (so balancers and probes stop sending), the
//! listener closes, in-flight calls drain, and whatever is still open after the grace period is cut.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic::{body::Body, server::NamedService, transport::server::Router};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::{Layer, Service, util::BoxCloneSyncService};

/// Every request the server takes, as one boxed service: what HTTP-level layers wrap.
pub type HttpService = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

/// HTTP-level middleware for a whole server (tracing, auth, rate limits, load shedding), applied
/// around every gRPC service it serves. Its layers must answer with a response (a gRPC status),
/// never an error: tonic would turn an unknown error into UNKNOWN.
#[derive(Clone)]
pub struct HttpLayer(Arc<dyn Fn(HttpService) -> HttpService + Send + Sync>);

impl HttpLayer {
    pub fn new(wrap: impl Fn(HttpService) -> HttpService + Send + Sync + 'static) -> Self {
        Self(Arc::new(wrap))
    }

    /// No middleware.
    pub fn identity() -> Self {
        Self::new(|inner| inner)
    }

    /// `self` around `inner`: `outer.around(inner)` runs `outer` first.
    pub fn around(self, inner: HttpLayer) -> Self {
        Self::new(move |service| (self.0)((inner.0)(service)))
    }
}

impl<S> Layer<S> for HttpLayer
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Service = HttpService;

    fn layer(&self, inner: S) -> HttpService {
        (self.0)(BoxCloneSyncService::new(inner))
    }
}

/// How a server stops.
#[derive(Debug, Clone, Copy)]
pub struct ShutdownTiming {
    /// Still serving, but NOT_SERVING, before the listener closes.
    pub drain: Duration,
    /// Longest the calls in flight may take to finish after that.
    pub grace: Duration,
}

impl ShutdownTiming {
    pub fn from_ms(drain_ms: u64, grace_ms: u64) -> Self {
        Self { drain: Duration::from_millis(drain_ms), grace: Duration::from_millis(grace_ms) }
    }
}

/// The tracing target of the `listening on ADDR` line, at INFO.
const LISTENING_LOG_TARGET: &str = module_path!();

/// The `RUST_LOG` for a child process whose parent reads its address from the `listening on` line
/// (`llmesh up`, the end-to-end tests): `filter`, with that line kept at INFO whatever `filter`
/// says (with `warn` the parent would wait for it in vain).
pub fn log_filter_keeping_listening_line(filter: &str) -> String {
    let keep = format!("{LISTENING_LOG_TARGET}=info");
    if filter.trim().is_empty() { keep } else { format!("{filter},{keep}") }
}

/// Binds `addr` and logs the `listening on ADDR` line (with the real port when `addr` asked for 0).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr().context("listener has no local address")?;
    tracing::info!(target: LISTENING_LOG_TARGET, "listening on {local}");
    Ok(listener)
}

/// The router every llmesh server builds on: one [`HttpLayer`] around every service.
pub type MeshRouter = Router<tower::layer::util::Stack<HttpLayer, tower::layer::util::Identity>>;

/// A router that already serves health and reflection.
pub struct Base {
    pub router: MeshRouter,
    pub health: HealthReporter,
    services: Vec<&'static str>,
    admin: Option<tokio::task::JoinHandle<()>>,
}

impl Base {
    pub fn new() -> anyhow::Result<Self> {
        Self::with_layer(HttpLayer::identity())
    }

    /// A server whose every request goes through `layer` first — inside the tracing layer, which
    /// is always outermost: it continues the caller's trace and records the seed's metrics.
    pub fn with_layer(layer: HttpLayer) -> anyhow::Result<Self> {
        Self::build(layer, false)
    }

    /// Like [`Base::with_layer`], and the port also takes HTTP/1.1 (besides HTTP/2, with or
    /// without TLS): for a server whose `layer` answers plain HTTP routes of its own (the
    /// gateway's OpenAI-compatible API), which curl and the official SDKs call over HTTP/1.1.
    pub fn with_layer_and_http1(layer: HttpLayer) -> anyhow::Result<Self> {
        Self::build(layer, true)
    }

    fn build(layer: HttpLayer, accept_http1: bool) -> anyhow::Result<Self> {
        let trace = llmesh_telemetry::GrpcTraceLayer::new();
        let traced = HttpLayer::new(move |inner| BoxCloneSyncService::new(trace.layer(inner)));
        let layer = traced.around(layer);
        let (health, health_service) = tonic_health::server::health_reporter();
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(llmesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building the reflection service")?;
        // grpcurl and older clients still ask the v1alpha service.
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(llmesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("building the reflection service")?;
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .accept_http1(accept_http1)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .layer(layer)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        Ok(Self { router, health, services: Vec::new(), admin: None })
    }

    /// Starts the admin HTTP listener (`/metrics`, `/healthz`, `/debug/pprof/profile`) when
    /// configured; it stops with the server.
    pub async fn admin(&mut self, config: &crate::config::AdminConfig) -> anyhow::Result<()> {
        let Some(addr) = config.listen else { return Ok(()) };
        let admin =
            llmesh_telemetry::AdminServer::bind(addr).await.with_context(|| format!("admin listener {addr}"))?;
        self.admin = Some(tokio::spawn(async move {
            if let Err(error) = admin.serve(std::future::pending()).await {
                tracing::warn!("admin listener stopped: {error:#}");
            }
        }));
        Ok(())
    }

    /// Marks `S` as SERVING in `grpc.health.v1` and remembers it for shutdown.
    pub async fn serving<S: NamedService>(&mut self) {
        self.health.set_serving::<S>().await;
        self.services.push(S::NAME);
    }

    /// Adds the service's own gRPC services: `base.route(|r| r.add_service(MyServer::new(svc)))`.
    pub fn route(self, add: impl FnOnce(MeshRouter) -> MeshRouter) -> Self {
        Self { router: add(self.router), ..self }
    }

    /// Serves until `shutdown` resolves; then reports NOT_SERVING while still serving for
    /// `timing.drain` (so balancers and probes notice), stops taking calls, and gives the calls
    /// in flight at most `timing.grace` to finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        timing: ShutdownTiming,
    ) -> anyhow::Result<()> {
        let Self { router, health, services, admin } = self;
        let _admin = admin.map(AbortOnDrop);
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        }));

        tokio::select! {
            result = &mut server => {
                return result.context("server task failed")?.context("server failed");
            }
            () = shutdown => {}
        }

        health.set_service_status("", ServingStatus::NotServing).await;
        for name in services {
            health.set_service_status(name, ServingStatus::NotServing).await;
        }
        if !timing.drain.is_zero() {
            tracing::info!(drain_ms = timing.drain.as_millis() as u64, "NOT_SERVING; draining before stopping");
            tokio::time::sleep(timing.drain).await;
        }
        let _ = stop_tx.send(());
        let grace = timing.grace;
        match tokio::time::timeout(grace, &mut server).await {
            Ok(result) => result.context("server task failed")?.context("server failed during shutdown"),
            Err(_) => {
                tracing::warn!(grace_ms = grace.as_millis() as u64, "grace period over; closing open calls");
                server.abort();
                Ok(())
            }
        }
    }
}

/// Stops a background task when the server it belongs to stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter_keeping_listening_line;

    #[test]
    fn the_listening_line_is_kept_whatever_the_filter() {
        assert_eq!(log_filter_keeping_listening_line("warn"), "warn,llmesh_common::server=info");
        assert_eq!(log_filter_keeping_listening_line("off"), "off,llmesh_common::server=info");
        assert_eq!(log_filter_keeping_listening_line(" "), "llmesh_common::server=info");
    }
}

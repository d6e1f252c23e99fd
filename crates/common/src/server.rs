//! The gRPC server every service runs: its own services plus `grpc.health.v1` and server
//! reflection, on a listener that may have been bound to port 0, with graceful shutdown.
//!
//! Every call goes through the tracing layer first, which this runner tells what the process
//! serves (the methods of each service marked with [`Base::serving`], from the contract's
//! descriptor set: any other path is recorded as `unknown`) and what it exempts
//! ([`EXEMPT_SERVICES`]). Messages are bounded: health and reflection take at most
//! [`CONTROL_MESSAGE_BYTES`], each service's own server sets its `max_decoding_message_size`
//! (generate requests: `Limits::max_request_bytes`), and a message over a bound is answered
//! INVALID_ARGUMENT `request: N bytes exceed the limit of M bytes` before it is decoded (tonic says
//! OUT_OF_RANGE with its own words; see the `oversize` module).
//!
//! Shutdown order: health flips to NOT_SERVING first (so balancers and probes stop sending), the
//! listener closes, in-flight calls drain, and whatever is still open after the grace period is cut.
//!
//! TLS ([`Base::tls`], from `[<service>.tls]`): the runner terminates it itself ([`crate::tls`]), so
//! that a certificate, key or client CA replaced on disk is used by the next connection while the
//! open ones (and their calls) carry on. ALPN offers `h2`, and `http/1.1` too on a port that takes
//! HTTP/1.1. The admin listener ([`Base::admin`]) may use the same certificate and client CA, and a
//! bearer token; on an address other hosts can reach it must use one of them. Probes that cannot
//! speak TLS (Kubernetes' gRPC probes) get `tls.health_listen`: plaintext, `grpc.health.v1` only.

mod oversize;
mod writes;

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tonic::{body::Body, server::NamedService, transport::server::Router};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::{
    Layer,
    util::{BoxCloneSyncService, BoxCloneSyncServiceLayer},
};

use self::writes::GatheredWrites;
use crate::{
    reload,
    tls::{self, ServerTls, TlsConfig},
};

/// Every request the server takes, as one boxed service: what HTTP-level layers wrap.
pub type HttpService = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

/// HTTP-level middleware for a whole server (tracing, auth, rate limits, load shedding), applied
/// around every gRPC service it serves: tower's boxed, cloneable layer over [`HttpService`]s. Its
/// layers must answer with a response (a gRPC status), never an error: tonic would turn an unknown
/// error into UNKNOWN.
pub type HttpLayer = BoxCloneSyncServiceLayer<HttpService, http::Request<Body>, http::Response<Body>, Infallible>;

/// A layer made of a function of the service it wraps.
pub fn http_layer(wrap: impl Fn(HttpService) -> HttpService + Send + Sync + 'static) -> HttpLayer {
    BoxCloneSyncServiceLayer::new(tower::layer::layer_fn(wrap))
}

/// `outer` around `inner`: `outer` runs first.
pub fn around(outer: HttpLayer, inner: HttpLayer) -> HttpLayer {
    BoxCloneSyncServiceLayer::new(tower::layer::util::Stack::new(inner, outer))
}

/// The router's services ([`tonic::service::Routes`]) boxed into an [`HttpService`], then `layer`
/// around them: what a tonic router takes as its one layer.
type RoutesLayer =
    BoxCloneSyncServiceLayer<tonic::service::Routes, http::Request<Body>, http::Response<Body>, Infallible>;

fn routes_layer(layer: HttpLayer) -> RoutesLayer {
    let boxed = tower::layer::layer_fn(BoxCloneSyncService::new);
    BoxCloneSyncServiceLayer::new(tower::layer::util::Stack::new(boxed, layer))
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

/// Services whose calls get no span and no metrics, and that the gateway's admission lets through
/// untouched: health probes, the mesh's health and reflection (grpcurl's discovery) must work
/// without a key and even when the gateway is saturated.
pub const EXEMPT_SERVICES: &[&str] = &[
    tonic_health::pb::health_server::SERVICE_NAME,
    llmesh_proto::health::v1::mesh_health_server::SERVICE_NAME,
    tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
    tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
];

/// Whether `path` (`/pkg.Service/Method`) is a call to one of the [`EXEMPT_SERVICES`].
pub fn is_exempt(path: &str) -> bool {
    let service = path.strip_prefix('/').and_then(|p| p.split_once('/')).map(|(service, _)| service);
    service.is_some_and(|service| EXEMPT_SERVICES.contains(&service))
}

/// Streams a client of an internal service may cancel before the server has taken them up, per
/// connection. The gateway (an internal service's client, over one connection) cancels every call
/// whose deadline or budget passed, as a matter of course: a burst of cache lookups past their
/// 20 ms on a loaded host cancels hundreds at once. At h2's default of 20 the server took that for
/// a rapid-reset flood and closed the connection, failing every other call on it (stores, the
/// near cache's change feed, other keys' generations). The public port keeps the default.
pub const MESH_PENDING_RESETS: usize = 4096;

/// The largest request health checks, reflection and `llmesh.health.v1.MeshHealth` take: their
/// requests carry a service or symbol name at most, never user content.
pub const CONTROL_MESSAGE_BYTES: usize = 16 * 1024;

/// The methods of `service` (`llmesh.gateway.v1.Gateway`) in the contract's descriptor set; none
/// for a service it does not define.
pub fn contract_methods(service: &str) -> Vec<String> {
    use prost::Message as _;
    let Ok(set) = prost_types::FileDescriptorSet::decode(llmesh_proto::FILE_DESCRIPTOR_SET) else {
        return Vec::new();
    };
    let named = |package: &str, name: &str| match service.strip_suffix(name) {
        Some(prefix) if package.is_empty() => prefix.is_empty(),
        Some(prefix) => prefix.strip_suffix('.') == Some(package),
        None => false,
    };
    set.file
        .iter()
        .flat_map(|file| file.service.iter().filter(|s| named(file.package(), s.name())))
        .flat_map(|s| s.method.iter().map(|m| m.name().to_string()))
        .collect()
}

/// What the tracing layer is told: [`EXEMPT_SERVICES`], the contract's methods of `served`, and
/// the `extra` paths as they are.
fn routes(served: &[&str], extra: &[(&str, &[&str])]) -> llmesh_telemetry::Routes {
    let exempt = EXEMPT_SERVICES.iter().fold(llmesh_telemetry::Routes::new(), |r, s| r.exempt_service(s));
    let contract = served.iter().fold(exempt, |routes, service| {
        let methods = contract_methods(service);
        if methods.is_empty() {
            tracing::warn!(service, "not in the contract's descriptor set; its calls are recorded as unknown");
        }
        routes.serve(service, methods)
    });
    extra.iter().fold(contract, |routes, (service, methods)| routes.serve(service, methods.iter()))
}

/// Who a port is for: the mesh's own services (which should require client certificates), or
/// the public (the gateway, whose callers present API keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Mesh,
    Public,
}

/// The router every llmesh server builds on: one [`HttpLayer`] around every service.
pub type MeshRouter = Router<tower::layer::util::Stack<RoutesLayer, tower::layer::util::Identity>>;

/// A router that already serves health and reflection.
pub struct Base {
    pub router: MeshRouter,
    pub health: HealthReporter,
    services: Vec<&'static str>,
    /// Services served without being marked [`Base::serving`], listed by reflection all the same.
    listed: Vec<&'static str>,
    /// Paths served outside the contract ([`Base::also_serves`]).
    extra: Vec<(&'static str, &'static [&'static str])>,
    /// What the tracing layer knows, set once the services are known (in [`Base::serve`], before
    /// the layer is applied).
    routes: Arc<OnceLock<Arc<llmesh_telemetry::Routes>>>,
    admin: Option<tokio::task::JoinHandle<()>>,
    /// The operator's token, read once ([`Base::operator_token`]).
    operator: Option<llmesh_telemetry::BearerToken>,
    /// The service's own admin routes ([`Base::admin_routes`]).
    admin_routes: Option<llmesh_telemetry::AdminRoutes>,
    /// Whether the port takes HTTP/1.1 besides HTTP/2 (its ALPN offers both).
    accept_http1: bool,
    /// `[<service>.tls]`, as [`Base::tls`] was given it.
    tls_config: TlsConfig,
    tls: Option<ServerTls>,
    /// `grpc.health.v1` alone, for the plaintext probe port (`tls.health_listen`).
    probes: tonic::service::Routes,
}

impl Base {
    /// An internal service's server (generation, the cache, health): no middleware, and its
    /// clients may cancel up to [`MESH_PENDING_RESETS`] calls at once.
    pub fn new() -> anyhow::Result<Self> {
        Self::build(http_layer(|inner| inner), false, Some(MESH_PENDING_RESETS))
    }

    /// A server whose every request goes through `layer` first — inside the tracing layer, which
    /// is always outermost: it continues the caller's trace and records the seed's metrics.
    pub fn with_layer(layer: HttpLayer) -> anyhow::Result<Self> {
        Self::build(layer, false, None)
    }

    /// Like [`Base::with_layer`], and the port also takes HTTP/1.1 (besides HTTP/2, with or
    /// without TLS): for a server whose `layer` answers plain HTTP routes of its own (the
    /// gateway's OpenAI-compatible API), which curl and the official SDKs call over HTTP/1.1.
    pub fn with_layer_and_http1(layer: HttpLayer) -> anyhow::Result<Self> {
        Self::build(layer, true, None)
    }

    /// `pending_resets`: how many streams a client may cancel before the server has taken them
    /// up, per connection, before the connection is closed (`None`: h2's 20, its defence against
    /// rapid-reset floods).
    fn build(layer: HttpLayer, accept_http1: bool, pending_resets: Option<usize>) -> anyhow::Result<Self> {
        let trace = llmesh_telemetry::GrpcTraceLayer::new();
        let routes: Arc<OnceLock<Arc<llmesh_telemetry::Routes>>> = Arc::default();
        let known = routes.clone();
        let traced = http_layer(move |inner| {
            // Applied when the server starts, after `serve` has set the routes; were it not, every
            // call would be recorded as unknown, which is still bounded.
            let routes = known.get().cloned().unwrap_or_default();
            BoxCloneSyncService::new(trace.clone().with_routes(routes).layer(inner))
        });
        // Innermost, next to the services: what the router answers is rewritten before any
        // layer (and the metrics) see it.
        let layer = around(around(traced, layer), oversize::layer());
        let (health, health_service) = tonic_health::server::health_reporter();
        let health_service = health_service.max_decoding_message_size(CONTROL_MESSAGE_BYTES);
        let probes = tonic::service::Routes::new(health_service.clone());
        let router = tonic::transport::Server::builder()
            .http2_max_pending_accept_reset_streams(pending_resets)
            .tcp_nodelay(true)
            .accept_http1(accept_http1)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .layer(routes_layer(layer))
            .add_service(health_service);
        Ok(Self {
            router,
            health,
            services: Vec::new(),
            listed: Vec::new(),
            extra: Vec::new(),
            routes,
            admin: None,
            operator: None,
            admin_routes: None,
            accept_http1,
            tls_config: TlsConfig::default(),
            tls: None,
            probes,
        })
    }

    /// Serves the port over TLS as `config` says (nothing when it is off). Reads every file now: a
    /// missing or broken one is an error naming it. Call before [`Base::admin`].
    pub fn tls(&mut self, config: &TlsConfig, audience: Audience) -> anyhow::Result<()> {
        let alpn: &[&[u8]] = if self.accept_http1 { &[tls::ALPN_H2, tls::ALPN_HTTP1] } else { &[tls::ALPN_H2] };
        self.tls = ServerTls::load(config, alpn).context("[tls]")?;
        self.tls_config = config.clone();
        match &self.tls {
            Some(tls) if audience == Audience::Mesh && !tls.mutual() => tracing::warn!(
                "serving TLS without requiring client certificates (no tls.client_ca): anything that can reach \
                 this port may call it"
            ),
            Some(tls) => tracing::info!(client_certificates = tls.mutual(), "serving TLS"),
            None => {}
        }
        Ok(())
    }

    /// Whether the port serves TLS and requires client certificates (mTLS).
    pub fn requires_client_certificates(&self) -> bool {
        self.tls.as_ref().is_some_and(ServerTls::mutual)
    }

    /// Starts the admin HTTP listener (`/metrics`, `/healthz`, `/debug/pprof/profile`) when
    /// configured; it stops with the server. An address other hosts can reach needs a bearer token
    /// or TLS (`admin.tls`, with the port's certificate and client CA from [`Base::tls`]).
    pub async fn admin(&mut self, config: &crate::config::AdminConfig) -> anyhow::Result<()> {
        let Some(addr) = config.listen else { return Ok(()) };
        config.check().map_err(|problem| anyhow::anyhow!(problem))?;
        let upgrade = if config.tls {
            let tls = ServerTls::load(&self.tls_config, &[tls::ALPN_HTTP1])
                .context("[admin] tls")?
                .ok_or_else(|| anyhow::anyhow!("admin.tls is set but the service has no [tls] cert and key"))?;
            Some(admin_upgrade(tls))
        } else {
            None
        };
        let token = self.operator_token(config)?;
        let mut admin =
            llmesh_telemetry::AdminServer::bind(addr).await.with_context(|| format!("admin listener {addr}"))?;
        if let Some(upgrade) = upgrade {
            admin = admin.with_upgrade(upgrade);
        }
        if let Some(token) = token {
            admin = admin.with_bearer_token(token);
        }
        if let Some(routes) = self.admin_routes.take() {
            admin = admin.with_routes(routes);
        }
        self.admin = Some(tokio::spawn(async move {
            if let Err(error) = admin.serve(std::future::pending()).await {
                tracing::warn!("admin listener stopped: {error:#}");
            }
        }));
        Ok(())
    }

    /// Routes of the service's own on its admin listener, behind its token (the health service's
    /// status page). Call before [`Base::admin`].
    pub fn admin_routes(&mut self, routes: llmesh_telemetry::AdminRoutes) {
        self.admin_routes = Some(routes);
    }

    /// The operator's token (`admin.bearer_token_file`, re-read when it changes), when one is set:
    /// what the admin listener asks for, and what an operator presents for views a tenant may not
    /// have (the gateway's `MeshHealth` with replica addresses). One watcher of the file per
    /// server, however often it is asked for.
    pub fn operator_token(
        &mut self,
        config: &crate::config::AdminConfig,
    ) -> anyhow::Result<Option<llmesh_telemetry::BearerToken>> {
        if self.operator.is_none()
            && let Some(path) = &config.bearer_token_file
        {
            self.operator = Some(bearer_token(path.clone())?);
        }
        Ok(self.operator.clone())
    }

    /// Marks `S` as SERVING in `grpc.health.v1` and remembers it for shutdown and for the tracing
    /// layer: the methods of the services marked here are the ones named in spans and metrics.
    pub async fn serving<S: NamedService>(&mut self) {
        self.health.set_serving::<S>().await;
        self.services.push(S::NAME);
    }

    /// Lists `S` in reflection though it is not marked [`Base::serving`] (a service exempt from
    /// health and tracing that this server serves too, as the gateway's `MeshHealth`).
    pub fn lists<S: NamedService>(&mut self) {
        self.listed.push(S::NAME);
    }

    /// Paths the server serves outside the contract, such as HTTP routes: `/{prefix}/{path}` for
    /// each of `paths` (`also_serves("v1", &["chat/completions"])` for `/v1/chat/completions`) is
    /// named in spans and metrics like a method of a service marked [`Base::serving`].
    pub fn also_serves(&mut self, prefix: &'static str, paths: &'static [&'static str]) {
        self.extra.push((prefix, paths));
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
        let Self { router, health, services, listed, extra, routes: known, admin, tls, tls_config, probes, .. } = self;
        let router = with_reflection(router, services.iter().chain(&listed).copied())?;
        // Set only here, so it can be set only once.
        let _ = known.set(Arc::new(routes(&services, &extra)));
        // Stops the admin listener when the server it belongs to stops.
        let _admin = admin.map(llmesh_util::AbortOnDropHandle::new);
        // The plaintext probe port, likewise: it reports what `health` says, NOT_SERVING included.
        let _probes = match tls_config.health_listen {
            Some(addr) => Some(llmesh_util::AbortOnDropHandle::new(serve_probes(addr, probes).await?)),
            None => None,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stopped = async {
            let _ = stop_rx.await;
        };
        // An answer's frames in one write (`writes`).
        let mut server = match tls {
            Some(tls) => {
                let incoming = tls::incoming(listener, tls).map(|io| io.map(GatheredWrites::new));
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
            }
            None => {
                let incoming = tonic::transport::server::TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .map(|io| io.map(GatheredWrites::new));
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
            }
        };

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

/// `router` with server reflection (v1, and v1alpha, which grpcurl and older clients still ask):
/// it describes every type of the contract, and lists `services` (this server's own), health and
/// itself; not the contract's other services, which this server does not serve.
fn with_reflection(router: MeshRouter, services: impl Iterator<Item = &'static str>) -> anyhow::Result<MeshRouter> {
    let mut names: Vec<&str> = services.collect();
    names.extend([
        tonic_health::pb::health_server::SERVICE_NAME,
        tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
        tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
    ]);
    names.sort_unstable();
    names.dedup();
    let builder = || {
        names.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(llmesh_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |builder, name| builder.with_service_name(*name),
        )
    };
    let v1 = builder().build_v1().context("building the reflection service")?;
    let v1alpha = builder().build_v1alpha().context("building the reflection service")?;
    Ok(router
        .add_service(v1.max_decoding_message_size(CONTROL_MESSAGE_BYTES))
        .add_service(v1alpha.max_decoding_message_size(CONTROL_MESSAGE_BYTES)))
}

/// Serves `grpc.health.v1` alone, in plaintext, on `addr` (for probes that cannot speak TLS).
async fn serve_probes(addr: SocketAddr, probes: tonic::service::Routes) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("tls.health_listen {addr}"))?;
    let local = listener.local_addr().context("probe listener has no local address")?;
    tracing::info!("plaintext grpc.health.v1 probes on {local}");
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    Ok(tokio::spawn(async move {
        if let Err(error) = tonic::transport::Server::builder().add_routes(probes).serve_with_incoming(incoming).await {
            tracing::warn!("probe listener stopped: {error:#}");
        }
    }))
}

/// The admin listener's TLS handshake, with the settings current at each connection.
fn admin_upgrade(tls: ServerTls) -> llmesh_telemetry::Upgrade {
    Arc::new(move |tcp| {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        Box::pin(async move {
            let stream = acceptor.accept(tcp).await?;
            Ok(Box::new(stream) as Box<dyn llmesh_telemetry::AdminIo>)
        })
    })
}

/// The admin listener's token, from `path` (trimmed; re-read when it changes). An empty or
/// missing file is an error naming it.
fn bearer_token(path: std::path::PathBuf) -> anyhow::Result<llmesh_telemetry::BearerToken> {
    let read = path.clone();
    let token = reload::watch("admin_token", vec![path], move || {
        let text = std::fs::read_to_string(&read)
            .with_context(|| format!("cannot read admin.bearer_token_file {}", read.display()))?;
        let token = text.trim();
        if token.is_empty() {
            anyhow::bail!("admin.bearer_token_file {} is empty", read.display());
        }
        Ok(Arc::<str>::from(token))
    })?;
    Ok(Arc::new(move || Some(Arc::clone(&**token.load()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exempt_services_are_health_and_reflection() {
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/llmesh.health.v1.MeshHealth/Status",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(is_exempt(path), "{path}");
        }
        for path in
            ["/llmesh.gateway.v1.Gateway/Generate", "/grpc.health.v1.HealthX/Check", "/grpc.health.v1.Health", ""]
        {
            assert!(!is_exempt(path), "{path}");
        }
    }

    #[test]
    fn the_contract_names_each_services_methods() {
        let gateway = contract_methods("llmesh.gateway.v1.Gateway");
        for method in ["Generate", "GenerateStream", "SubmitJob", "GetJob", "WatchJob", "CancelJob", "ListModels"] {
            assert!(gateway.iter().any(|m| m == method), "{method} missing from {gateway:?}");
        }
        assert!(contract_methods("llmesh.cache.v1.Cache").iter().any(|m| m == "Lookup"));
        assert!(contract_methods("x.Y").is_empty());
        assert!(contract_methods("llmesh.gateway.v1").is_empty());

        let routes = routes(&["llmesh.gateway.v1.Gateway"], &[("v1", &["chat/completions"])]);
        assert!(routes.is_served("/llmesh.gateway.v1.Gateway/Generate"));
        assert!(routes.is_served("/v1/chat/completions"));
        assert!(!routes.is_served("/v1/models"));
        assert!(!routes.is_served("/llmesh.gateway.v1.Gateway/NoSuch"));
        assert!(!routes.is_served("/llmesh.cache.v1.Cache/Lookup"));
        assert!(routes.is_exempt("/grpc.health.v1.Health/Check"));
    }

    #[test]
    fn the_listening_line_is_kept_whatever_the_filter() {
        assert_eq!(log_filter_keeping_listening_line("warn"), "warn,llmesh_common::server=info");
        assert_eq!(log_filter_keeping_listening_line("off"), "off,llmesh_common::server=info");
        assert_eq!(log_filter_keeping_listening_line(" "), "llmesh_common::server=info");
    }
}

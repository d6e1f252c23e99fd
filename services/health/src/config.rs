//! Health service configuration: `[health]` in the mesh file, `LLMESH_HEALTH_*` in the environment.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    /// After SIGTERM: still serving, but NOT_SERVING, for this long (let balancers notice).
    /// `/metrics` and profiling over HTTP; off unless `listen` is set.
    pub admin: llmesh_common::config::AdminConfig,
    /// TLS on this service's port (and mTLS with `client_ca`); off unless `cert` is set.
    pub tls: llmesh_common::tls::TlsConfig,
    /// TLS for the calls this service makes inside the mesh; off unless `ca` is set.
    pub client_tls: llmesh_common::tls::ClientTlsConfig,
    pub shutdown_drain_ms: u64,
    pub shutdown_grace_ms: u64,
    /// How often every target is checked.
    pub poll_interval_ms: u64,
    /// A target that does not answer within this is NOT_SERVING.
    pub check_timeout_ms: u64,
    pub targets: Vec<Target>,
    /// The status page on the admin listener: which `/metrics` it reads (see [`crate::status`]).
    pub status: crate::status::StatusConfig,
}

/// One process to watch. Several targets may share a `name` (replicas of one service).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Component name: "gateway", "generation", "cache".
    pub name: String,
    /// `http://host:port`.
    pub address: String,
    /// The grpc.health.v1 service name to ask about (any label for a `redis://` address).
    pub service: String,
    /// When false, this target being down degrades the mesh instead of stopping it (a cache's
    /// Redis: the gateway answers without the cache).
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

impl Target {
    fn new(name: &str, port: u16, service: &str) -> Self {
        Self { name: name.into(), address: format!("http://127.0.0.1:{port}"), service: service.into(), required: true }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 50054).into(),
            admin: llmesh_common::config::AdminConfig::default(),
            tls: llmesh_common::tls::TlsConfig::default(),
            client_tls: llmesh_common::tls::ClientTlsConfig::default(),
            shutdown_drain_ms: 0,
            shutdown_grace_ms: 5_000,
            poll_interval_ms: 1_000,
            check_timeout_ms: 500,
            targets: vec![
                Target::new("gateway", 50051, llmesh_proto::gateway::v1::gateway_server::SERVICE_NAME),
                Target::new("generation", 50052, llmesh_proto::generation::v1::generation_server::SERVICE_NAME),
                Target::new("cache", 50053, llmesh_proto::cache::v1::cache_server::SERVICE_NAME),
            ],
            status: crate::status::StatusConfig::default(),
        }
    }
}

impl llmesh_common::ServiceConfig for Config {
    const SECTION: &'static str = "health";

    fn listen(&self) -> SocketAddr {
        self.listen
    }
}

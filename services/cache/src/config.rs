//! Cache service configuration: `[cache]` in the mesh file, `LLMESH_CACHE_*` in the environment.

use std::net::SocketAddr;

use llmesh_proto::validate::Limits;
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
    pub shutdown_drain_ms: u64,
    pub shutdown_grace_ms: u64,
    /// `redis://host:port/db`; unset (and no cluster) means the in-memory store.
    pub redis_url: Option<String>,
    /// Seed nodes of a Redis Cluster (`redis://host:port` each); takes the place of `redis_url`.
    pub redis_cluster_nodes: Vec<String>,
    /// How long to wait for Redis at start-up, and per connection attempt after.
    pub redis_connect_timeout_ms: u64,
    /// Longest wait for one Redis reply.
    pub redis_response_timeout_ms: u64,
    /// Time to live of an entry when the caller gives none.
    pub ttl_ms: u64,
    /// How long an entry is kept past its TTL, for fallback answers when generation is down
    /// (`allow_stale` lookups only). 0 keeps nothing past the TTL.
    pub stale_ttl_ms: u64,
    /// Larger entries (the answer and its stream chunks, encoded) are not stored.
    pub max_entry_bytes: usize,
    /// Entries with more stream chunks are not stored: each chunk costs memory of its own
    /// however short it is. An answer of `max_tokens` tokens has at most about that many.
    pub max_entry_chunks: usize,
    /// The request limits of the gateways that use this cache (set the same `limits` as in
    /// `[gateway]`). A Lookup carries a request, a Store a request and an entry: a message larger
    /// than [`Config::max_message_bytes`] is refused before it is read, and a model name outside
    /// them is refused (it names a Redis key).
    pub limits: Limits,
    /// Bound of the in-memory store, in bytes of encoded entries.
    pub memory_max_bytes: u64,
    /// Bound of the in-memory store, in entries.
    pub memory_max_entries: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 50053).into(),
            admin: llmesh_common::config::AdminConfig::default(),
            tls: llmesh_common::tls::TlsConfig::default(),
            shutdown_drain_ms: 0,
            shutdown_grace_ms: 10_000,
            redis_url: None,
            redis_cluster_nodes: Vec::new(),
            redis_connect_timeout_ms: 2_000,
            redis_response_timeout_ms: 200,
            ttl_ms: 60 * 60 * 1000,
            stale_ttl_ms: 24 * 60 * 60 * 1000,
            max_entry_bytes: 1024 * 1024,
            max_entry_chunks: 8192,
            limits: Limits::default(),
            memory_max_bytes: 256 * 1024 * 1024,
            memory_max_entries: 100_000,
        }
    }
}

/// Room for a Store's own fields and framing besides its request and its entry.
const STORE_FRAMING_BYTES: usize = 1024;

impl Config {
    /// The largest message the cache accepts (its server's `max_decoding_message_size`): a Store
    /// of the largest valid request with the largest entry that may be stored.
    pub fn max_message_bytes(&self) -> usize {
        self.limits.max_request_bytes().saturating_add(self.max_entry_bytes).saturating_add(STORE_FRAMING_BYTES)
    }
}

impl llmesh_common::ServiceConfig for Config {
    const SECTION: &'static str = "cache";

    fn listen(&self) -> SocketAddr {
        self.listen
    }
}

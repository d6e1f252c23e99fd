//! The gateway's side of the response cache. Every call has a small time budget; a cache that is
//! slow, down or failing is logged and bypassed, never a failed request. Recent hits are also kept
//! in the gateway's near cache ([`near`]) and answered from there.

use std::{sync::Arc, time::Duration};

use llmesh_common::deps;
use llmesh_proto::{
    cache::v1::{LookupRequest, LookupResponse, StoreRequest, cache_client::CacheClient, cache_server::SERVICE_NAME},
    common::v1::CachePolicy,
    generation::v1::{GenerateRequest, GenerateResponse},
};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

mod near;
mod stores;

use self::near::NearCache;
use crate::metrics::{label, metrics};

/// `[gateway.cache]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// The cache service, as `http://host:port`; unset (or empty) turns caching off.
    pub endpoint: Option<String>,
    /// How long to wait for it to answer the first call at start-up.
    pub connect_timeout_ms: u64,
    /// Time budget of one cache call; past it the gateway goes on without the cache.
    pub budget_ms: u64,
    /// Cache sampling requests too. By default only deterministic ones are cached: temperature 0,
    /// a seed, or a model generation declares deterministic.
    pub cache_nondeterministic: bool,
    /// Longest an identical request waits for the one already in flight before calling on its own.
    pub single_flight_wait_ms: u64,
    /// The near cache: recent hits kept in the gateway's memory and answered without calling the
    /// cache service, kept in step with it by its change feed. Bounded by entries and by bytes;
    /// 0 in either turns it off.
    pub near_max_entries: u64,
    pub near_max_bytes: u64,
    /// Longest a near copy is kept, however long the entry stays fresh in the cache service: the
    /// bound on serving an answer whose change never reached the feed.
    pub near_max_ttl_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            endpoint: Some("http://127.0.0.1:50053".into()),
            connect_timeout_ms: 1_000,
            budget_ms: 20,
            cache_nondeterministic: false,
            single_flight_wait_ms: 30_000,
            near_max_entries: 10_000,
            near_max_bytes: 64 * 1024 * 1024,
            near_max_ttl_ms: 60_000,
        }
    }
}

impl CacheConfig {
    /// The cache service's address, unless caching is off.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty())
    }
}

#[derive(Debug, Clone)]
pub struct Cache {
    client: Option<CacheClient<Channel>>,
    /// Where untraced stores queue (with `client`).
    stores: Option<stores::Stores>,
    budget: Duration,
    near: Option<Near>,
}

/// The near cache and the task that keeps it following the cache service's changes.
#[derive(Debug, Clone)]
struct Near {
    cache: Arc<NearCache>,
    _follower: Arc<llmesh_util::AbortOnDropHandle<()>>,
}

/// What a request's cache policy allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Use {
    pub read: bool,
    pub write: bool,
    /// Answer NOT_FOUND instead of generating on a miss.
    pub only_cached: bool,
}

impl Use {
    /// What `policy` allows for a request. Under the default policy only `cacheable` requests
    /// (deterministic ones, unless configured otherwise) touch the cache; an explicit REFRESH or
    /// ONLY_IF_CACHED is honoured either way.
    pub fn of(policy: i32, cacheable: bool) -> Self {
        match CachePolicy::try_from(policy).unwrap_or(CachePolicy::Default) {
            CachePolicy::Unspecified | CachePolicy::Default => {
                Self { read: cacheable, write: cacheable, only_cached: false }
            }
            CachePolicy::Bypass => Self { read: false, write: false, only_cached: false },
            CachePolicy::Refresh => Self { read: false, write: true, only_cached: false },
            CachePolicy::OnlyIfCached => Self { read: true, write: false, only_cached: true },
        }
    }
}

impl Cache {
    /// The cache service `config` names (caching off when it names none), which must answer
    /// SERVING within `within`; the error says why it could not be reached.
    pub async fn connect(config: &CacheConfig, within: Duration) -> anyhow::Result<Self> {
        let Some(uri) = config.endpoint() else {
            tracing::info!("cache disabled (gateway.cache.endpoint is unset)");
            return Ok(Self::off(config));
        };
        deps::wait_serving("cache", uri, SERVICE_NAME, within).await?;
        let channel = deps::endpoint(uri, Duration::from_millis(config.connect_timeout_ms))?.connect_lazy();
        Self::new(CacheClient::new(channel), config)
    }

    /// The cache behind `client`, with a near cache when `config` asks for one. Call within the
    /// runtime: the near cache follows the service's changes from a task, and stores are sent
    /// from another.
    pub fn new(client: CacheClient<Channel>, config: &CacheConfig) -> anyhow::Result<Self> {
        let near = NearCache::new(config)?.map(|cache| {
            let cache = Arc::new(cache);
            let follower = cache.follow(client.clone());
            Near { cache, _follower: Arc::new(llmesh_util::AbortOnDropHandle::new(follower)) }
        });
        let budget = Duration::from_millis(config.budget_ms);
        let stores = Some(stores::Stores::start(client.clone(), budget));
        Ok(Self { client: Some(client), stores, budget, near })
    }

    /// Caching off: every lookup misses and nothing is stored.
    pub fn off(config: &CacheConfig) -> Self {
        Self { client: None, stores: None, budget: Duration::from_millis(config.budget_ms), near: None }
    }

    /// The cached answer, if there is one and the cache answers within budget.
    /// `key` is the request's cache key (`cache_key::of`), computed once by the caller, who also
    /// needs it for single flight.
    pub async fn lookup(&self, request: &GenerateRequest, key: &str, remaining: Duration) -> Option<LookupResponse> {
        self.find(request, Some(key), remaining).await
    }

    /// An answer for the fallback: fresh or past its TTL.
    pub async fn lookup_stale(&self, request: &GenerateRequest, remaining: Duration) -> Option<LookupResponse> {
        self.find(request, None, remaining).await
    }

    /// With `key`, a fresh answer (the near cache's first); without, fresh or stale (the service's).
    async fn find(&self, request: &GenerateRequest, key: Option<&str>, remaining: Duration) -> Option<LookupResponse> {
        let allow_stale = key.is_none();
        let mut client = self.client.clone()?;
        // The near cache holds fresh answers only: a stale one is the cache service's to give.
        let near = self.near.as_ref().map(|near| &near.cache).filter(|_| !allow_stale);
        if let Some(near) = near
            && let Some(hit) = key.and_then(|key| near.get(key))
        {
            metrics().cache_requests.add(1, &[label("result", "hit"), label("tier", "near")]);
            return Some(hit);
        }
        let ticket = near.and_then(|near| near.ticket());
        let budget = self.budget.min(remaining);
        let span = if llmesh_telemetry::in_a_span() {
            tracing::info_span!("cache.lookup", otel.kind = "client", allow_stale, cache.hit = tracing::field::Empty)
        } else {
            tracing::Span::none()
        };
        let lookup = async {
            let mut call = tonic::Request::new(LookupRequest { request: Some(request.clone()), allow_stale });
            crate::deadline::set_timeout(&mut call, budget);
            llmesh_telemetry::inject(&mut call);
            tokio::time::timeout(budget, client.lookup(call)).await
        };
        let (found, result) = match tracing::Instrument::instrument(lookup, span.clone()).await {
            Ok(Ok(response)) => {
                let found = Some(response.into_inner()).filter(|r| r.hit && r.response.is_some());
                let result = if found.is_some() { "hit" } else { "miss" };
                (found, result)
            }
            Ok(Err(status)) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "cache lookup failed; bypassing");
                (None, "error")
            }
            Err(_) => {
                tracing::warn!(budget_ms = budget.as_millis() as u64, "cache lookup over budget; bypassing");
                (None, "timeout")
            }
        };
        span.record("cache.hit", found.is_some());
        if !allow_stale {
            match &found {
                Some(_) => metrics().cache_requests.add(1, &[label("result", result), label("tier", "service")]),
                None => metrics().cache_requests.add(1, &[label("result", result)]),
            }
        }
        if let (Some(near), Some(ticket), Some(found)) = (near, ticket, &found) {
            near.keep(ticket, found);
        }
        found
    }

    /// Stores an answer in the background: the client does not wait for the cache. A traced call's
    /// store is a `Store` call of its own, in the call's trace; the others go in batches
    /// ([`stores`]).
    pub fn store(&self, request: GenerateRequest, response: GenerateResponse, chunks: Vec<String>) {
        let (Some(client), Some(stores)) = (&self.client, &self.stores) else {
            return;
        };
        // A REFRESH replaces an answer this gateway may hold a copy of (the cache service tells
        // the other gateways).
        if let Some(near) = &self.near
            && request.cache == i32::from(CachePolicy::Refresh)
        {
            near.cache.forget(&llmesh_proto::cache_key::of(&request));
        }
        let store = StoreRequest { request: Some(request), response: Some(response), chunks, ttl_ms: 0 };
        if !llmesh_telemetry::in_a_span() {
            return stores.push(store);
        }
        let span = tracing::info_span!("cache.store", otel.kind = "client");
        let store = tracing::Instrument::instrument(store_one(client.clone(), store, self.budget), span);
        // The call's trace context goes along.
        tokio::spawn(opentelemetry::context::FutureExt::with_context(store, llmesh_telemetry::current_context()));
    }
}

/// One `Store` call within `budget`, its outcome logged and counted.
async fn store_one(mut client: CacheClient<Channel>, store: StoreRequest, budget: Duration) {
    let mut call = tonic::Request::new(store);
    crate::deadline::set_timeout(&mut call, budget);
    llmesh_telemetry::inject(&mut call);
    let result = match tokio::time::timeout(budget, client.store(call)).await {
        Ok(Ok(response)) if response.get_ref().stored => "stored",
        Ok(Ok(_)) => "refused",
        Ok(Err(status)) => {
            tracing::warn!(code = ?status.code(), message = status.message(), "cache store failed");
            "failed"
        }
        Err(_) => {
            tracing::warn!(budget_ms = budget.as_millis() as u64, "cache store over budget");
            "timeout"
        }
    };
    metrics().cache_stores.add(1, &[label("result", result)]);
}

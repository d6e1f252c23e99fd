//! The `llmesh.cache.v1.Cache` gRPC service. A backend failure is a miss (or a refused store) and
//! a counted error, never a failed call: the cache must not take generation down with it.
//!
//! What a caller sends is bounded before it is kept: the whole message by the server's
//! `max_decoding_message_size` ([`Config::max_message_bytes`]); a stored entry by
//! `max_entry_bytes` and `max_entry_chunks` (over them, the store is refused, not failed); a model
//! name, which names a Redis key and travels to every gateway, by the request limits
//! (INVALID_ARGUMENT); an invalidated key by the one form keys have (INVALID_ARGUMENT).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use llmesh_proto::{
    cache::v1::{
        Entry, InvalidateRequest, InvalidateResponse, LookupRequest, LookupResponse, STORE_MANY_MAX_ENTRIES,
        StatsRequest, StatsResponse, StoreManyRequest, StoreManyResponse, StoreRequest, StoreResponse,
        WatchChangesRequest, WatchChangesResponse, cache_server::Cache, invalidate_request::Target,
        watch_changes_response::Change,
    },
    common::v1::{CachePolicy, FinishReason},
    generation::v1::GenerateRequest,
};
use prost::Message as _;
use tonic::{Request, Response, Status};

use llmesh_proto::{
    cache_key as key,
    validate::{self, Limits},
};

use crate::{changes::Changes, config::Config, store::Store};

#[derive(Debug, Clone)]
pub struct CacheService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    changes: Changes,
    ttl: Duration,
    stale_ttl: Duration,
    max_entry_bytes: usize,
    max_entry_chunks: usize,
    limits: Limits,
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Runs a change to the store and its announcement to the near caches to the end, even when the
/// caller gives up half-way (the gateway's stores have a 20 ms budget): a change made but never
/// announced would leave near copies of the old answer.
async fn finish_even_if_cancelled<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, crate::store::StoreError>> + Send + 'static,
) -> Result<T, crate::store::StoreError> {
    tokio::spawn(change).await.unwrap_or_else(|join| Err(crate::store::StoreError::from_join(join)))
}

fn required(request: Option<GenerateRequest>) -> Result<GenerateRequest, Status> {
    request.ok_or_else(|| Status::invalid_argument("request: required"))
}

/// A model name within the request limits; `field` is where it was (`request.model`, `model`).
fn model(model: &str, field: &str, limits: &Limits) -> Result<(), Status> {
    validate::model(model, limits).map_err(|invalid| Status::invalid_argument(format!("{field}: {}", invalid.detail)))
}

/// A store checked by [`Inner::check`]: refused (too large, not cacheable), or ready to put.
#[expect(clippy::large_enum_variant, reason = "short-lived, moved once; boxing would allocate per store")]
enum Checked {
    Refused(StoreResponse),
    Ready(Ready),
}

struct Ready {
    key: String,
    model: String,
    entry: Entry,
    kept_for: Duration,
    refresh: bool,
}

fn refused(key: String, reason: &str) -> StoreResponse {
    StoreResponse { key, stored: false, reason: reason.into() }
}

impl Inner {
    /// What to do with a store: INVALID_ARGUMENT when it is malformed, a refusal when the cache
    /// does not keep such answers, otherwise the entry to put.
    fn check(&self, store: StoreRequest) -> Result<Checked, Status> {
        let StoreRequest { request, response, chunks, ttl_ms } = store;
        let request = required(request)?;
        let mut response = response.ok_or_else(|| Status::invalid_argument("response: required"))?;
        model(&request.model, "request.model", &self.limits)?;
        let key = key::of(&request);
        if chunks.len() > self.max_entry_chunks {
            return Ok(Checked::Refused(refused(key, "entry has more chunks than max_entry_chunks")));
        }
        if response.degraded.is_some() {
            return Ok(Checked::Refused(refused(key, "degraded answers are not cached")));
        }
        if response.finish_reason == i32::from(FinishReason::Unspecified) {
            return Ok(Checked::Refused(refused(key, "unfinished answers are not cached")));
        }
        response.cached = false;
        let ttl = if ttl_ms == 0 { self.ttl } else { Duration::from_millis(ttl_ms) };
        let now = now_ms();
        let expires_at_unix_ms = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        let entry = Entry { response: Some(response), chunks, stored_at_unix_ms: now, expires_at_unix_ms };
        if entry.encoded_len() > self.max_entry_bytes {
            return Ok(Checked::Refused(refused(key, "entry larger than max_entry_bytes")));
        }
        let refresh = request.cache == i32::from(CachePolicy::Refresh);
        let kept_for = ttl.saturating_add(self.stale_ttl);
        Ok(Checked::Ready(Ready { key, model: request.model, entry, kept_for, refresh }))
    }

    /// Puts a checked entry, announces it when near caches may hold an older copy, and answers
    /// its store.
    async fn put(&self, ready: Ready) -> StoreResponse {
        let Ready { key, model, entry, kept_for, refresh } = ready;
        let put = self.store.put(&key, &model, entry, kept_for).await;
        // Near caches hold copies of entries, so a store that replaced one is announced; a store
        // into an empty place (after a miss, the usual case) is not, or every miss would send
        // every gateway a message. A REFRESH is announced whatever it replaced: the old entry
        // may have been evicted while copies of it live on. So is a put that failed, which may
        // have been made all the same.
        let announce = refresh || !matches!(put, Ok(false));
        if announce && let Err(error) = self.changes.publish(Change::Key(key.clone())).await {
            // The other replicas learn of the failure and end their feeds: the entry stays.
            self.errors.fetch_add(1, Relaxed);
            tracing::warn!(%error, "a cache store could not be announced to the near caches");
        }
        match put {
            Ok(_replaced) => StoreResponse { key, stored: true, reason: String::new() },
            Err(error) => self.failed(key, &error),
        }
    }

    /// A store the backend failed: counted, logged and refused.
    fn failed(&self, key: String, error: &crate::store::StoreError) -> StoreResponse {
        self.errors.fetch_add(1, Relaxed);
        tracing::warn!(%error, "cache store failed");
        refused(key, "backend error")
    }
}

impl CacheService {
    pub fn new(store: Store, changes: Changes, config: &Config) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                changes,
                ttl: Duration::from_millis(config.ttl_ms),
                stale_ttl: Duration::from_millis(config.stale_ttl_ms),
                max_entry_bytes: config.max_entry_bytes,
                max_entry_chunks: config.max_entry_chunks,
                limits: config.limits.clone(),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            }),
        }
    }
}

#[tonic::async_trait]
impl Cache for CacheService {
    async fn lookup(&self, request: Request<LookupRequest>) -> Result<Response<LookupResponse>, Status> {
        let LookupRequest { request, allow_stale } = request.into_inner();
        let request = required(request)?;
        let key = key::of(&request);
        let inner = &self.inner;
        let found = match inner.store.get(&key).await {
            Ok(found) => found,
            Err(error) => {
                inner.errors.fetch_add(1, Relaxed);
                tracing::warn!(%error, "cache lookup failed; answering miss");
                None
            }
        };
        let now = now_ms();
        // Entries without an expiry (stored before it existed) are fresh for as long as they live.
        let stale = |entry: &Entry| entry.expires_at_unix_ms != 0 && now >= entry.expires_at_unix_ms;
        let Some(entry) = found.filter(|entry| allow_stale || !stale(entry)) else {
            inner.misses.fetch_add(1, Relaxed);
            return Ok(Response::new(LookupResponse { hit: false, key, ..Default::default() }));
        };
        inner.hits.fetch_add(1, Relaxed);
        let mut response = entry.response.clone().unwrap_or_default();
        response.cached = true;
        let age_ms = u64::try_from(now.saturating_sub(entry.stored_at_unix_ms)).unwrap_or(0);
        Ok(Response::new(LookupResponse {
            hit: true,
            key,
            response: Some(response),
            chunks: entry.chunks.clone(),
            age_ms,
            stale: stale(&entry),
            fresh_for_ms: u64::try_from(entry.expires_at_unix_ms.saturating_sub(now)).unwrap_or(0),
        }))
    }

    async fn store(&self, request: Request<StoreRequest>) -> Result<Response<StoreResponse>, Status> {
        let ready = match self.inner.check(request.into_inner())? {
            Checked::Refused(answer) => return Ok(Response::new(answer)),
            Checked::Ready(ready) => ready,
        };
        let (inner, key) = (self.inner.clone(), ready.key.clone());
        let answer = finish_even_if_cancelled(async move { Ok(inner.put(ready).await) }).await;
        Ok(Response::new(answer.unwrap_or_else(|error| self.inner.failed(key, &error))))
    }

    async fn store_many(&self, request: Request<StoreManyRequest>) -> Result<Response<StoreManyResponse>, Status> {
        let StoreManyRequest { entries } = request.into_inner();
        if entries.len() > STORE_MANY_MAX_ENTRIES {
            return Err(Status::invalid_argument(format!(
                "entries: {} entries; at most {STORE_MANY_MAX_ENTRIES} in one call",
                entries.len()
            )));
        }
        // Each entry is checked and stored on its own: a malformed or refused one fails only itself.
        let checked: Vec<_> = entries.into_iter().map(|entry| self.inner.check(entry)).collect();
        let inner = self.inner.clone();
        let results = finish_even_if_cancelled(async move {
            let puts = checked.into_iter().map(|checked| async {
                match checked {
                    Ok(Checked::Ready(ready)) => inner.put(ready).await,
                    Ok(Checked::Refused(answer)) => answer,
                    Err(status) => refused(String::new(), status.message()),
                }
            });
            // Together: with Redis each put is a round trip of its own.
            Ok(futures::future::join_all(puts).await)
        })
        .await
        .map_err(|error| Status::unavailable(format!("cache backend: {error}")))?;
        Ok(Response::new(StoreManyResponse { results }))
    }

    async fn invalidate(&self, request: Request<InvalidateRequest>) -> Result<Response<InvalidateResponse>, Status> {
        let change = match request.into_inner().target {
            Some(Target::Key(key)) if !key.is_empty() => {
                if !key::is_key(&key) {
                    return Err(Status::invalid_argument(format!(
                        "key: {} is not a cache key (64 lowercase hex digits, as Lookup and Store answer)",
                        validate::echo(&key)
                    )));
                }
                Change::Key(key)
            }
            Some(Target::Model(name)) if !name.is_empty() => {
                model(&name, "model", &self.inner.limits)?;
                Change::Model(name)
            }
            _ => return Err(Status::invalid_argument("target: set key or model")),
        };
        let inner = self.inner.clone();
        let removed = finish_even_if_cancelled(async move {
            let removed = match &change {
                Change::Key(key) => inner.store.remove(key).await,
                Change::Model(model) => inner.store.remove_model(model).await,
                Change::Everything(_) | Change::Heartbeat(_) => Ok(0),
            };
            // Announced even when the removal failed: it may have been made in part.
            inner.changes.publish(change).await?;
            removed
        })
        .await
        .map_err(|error| {
            self.inner.errors.fetch_add(1, Relaxed);
            Status::unavailable(format!("cache backend: {error}"))
        })?;
        Ok(Response::new(InvalidateResponse { removed }))
    }

    type WatchChangesStream = futures::stream::BoxStream<'static, Result<WatchChangesResponse, Status>>;

    async fn watch_changes(
        &self,
        _: Request<WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        Ok(Response::new(Box::pin(self.inner.changes.watch()?)))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let inner = &self.inner;
        let size = inner.store.size().await.map_err(|error| {
            inner.errors.fetch_add(1, Relaxed);
            Status::unavailable(format!("cache backend: {error}"))
        })?;
        let (hits, misses) = (inner.hits.load(Relaxed), inner.misses.load(Relaxed));
        let lookups = hits + misses;
        Ok(Response::new(StatsResponse {
            hits,
            misses,
            errors: inner.errors.load(Relaxed),
            entries: size.entries,
            bytes: size.bytes,
            hit_rate: if lookups == 0 { 0.0 } else { hits as f64 / lookups as f64 },
            backend: inner.store.backend().to_string(),
        }))
    }
}

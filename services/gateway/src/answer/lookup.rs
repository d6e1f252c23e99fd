//! The cache, as the answer step's layer: what the request's cache policy allows ([`Use`]), the
//! near cache and the cache service within their time budget ([`Cache::lookup`]), and on the way
//! back the store of a fresh answer.
//!
//! - A hit is the answer (for a stream, replayed in the chunks it was first sent in). Only a
//!   request that may read the cache is answered from it: BYPASS and REFRESH never are, and under
//!   the default policy only deterministic requests (temperature 0, a seed, a model generation
//!   declares deterministic, or any with `cache_nondeterministic`).
//! - A miss under ONLY_IF_CACHED is NOT_FOUND; any other miss goes on, with the request's cache
//!   key (computed once here) for single flight.
//! - When the policy lets it write: a unary answer this call made (generated, or the fallback's) is
//!   stored in the background; a live stream is handed the cache, to store the answer once it has
//!   finished ([`crate::answer::relay`]). An answer shared by an identical call, or a stream's
//!   fallback answer, is not stored.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use llmesh_proto::{cache_key, generation::v1::GenerateRequest};
use tower::{Layer, Service, ServiceExt as _};

use super::{Answer, Answered, Question, Source};
use crate::{
    cache::{Cache, CacheConfig, Use},
    catalog::Catalog,
    error::CallError,
    metrics::{label, metrics},
};

/// Answers from the cache when it may, and stores what it may; see the module docs.
#[derive(Debug, Clone)]
pub struct LookupLayer {
    config: Arc<Config>,
}

#[derive(Debug)]
struct Config {
    cache: Cache,
    catalog: Catalog,
    cache_nondeterministic: bool,
}

impl LookupLayer {
    pub fn new(cache: Cache, catalog: Catalog, config: &CacheConfig) -> Self {
        Self { config: Arc::new(Config { cache, catalog, cache_nondeterministic: config.cache_nondeterministic }) }
    }
}

impl<S> Layer<S> for LookupLayer {
    type Service = Lookup<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Lookup { inner, config: self.config.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct Lookup<S> {
    inner: S,
    config: Arc<Config>,
}

impl Config {
    /// True when the same request is expected to give the same answer, so caching it is safe.
    fn cacheable(&self, request: &GenerateRequest) -> bool {
        self.cache_nondeterministic
            || request.temperature == Some(0.0)
            || request.seed.is_some()
            || self.catalog.deterministic(&request.model)
    }
}

impl<S> Service<Question> for Lookup<S>
where
    S: Service<Question, Response = Answered, Error = CallError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Answered;
    type Error = CallError;
    type Future = BoxFuture<'static, Result<Answered, CallError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A hit never reaches the inner service: it takes its turn on a miss (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut question: Question) -> Self::Future {
        let inner = self.inner.clone();
        let config = self.config.clone();
        Box::pin(async move {
            let request = question.request.clone();
            let policy = Use::of(request.cache, config.cacheable(&request));
            if !policy.read && !policy.only_cached {
                metrics().cache_requests.add(1, &[label("result", "bypass")]);
            }
            let key = policy.read.then(|| cache_key::of(&request));
            if let Some(key) = &key
                && let Some(hit) = config.cache.lookup(&request, key, question.deadline.remaining()).await
                && let Some(response) = hit.response
            {
                let answer = Answer { chunks: hit.chunks, ..Answer::whole(response, Source::Cached) };
                return Ok(Answered::Whole(answer));
            }
            if policy.only_cached {
                return Err(CallError::not_cached());
            }
            question.key = key;
            let stream = question.stream;
            match inner.oneshot(question).await? {
                Answered::Whole(answer) => {
                    let made_here = matches!(answer.source, Source::Generated | Source::Fallback(_));
                    if policy.write && !stream && made_here {
                        config.cache.store((*request).clone(), answer.response.clone(), Vec::new());
                    }
                    Ok(Answered::Whole(answer))
                }
                Answered::Live(started, _) => Ok(Answered::Live(started, policy.write.then(|| config.cache.clone()))),
            }
        })
    }
}

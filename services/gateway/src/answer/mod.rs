//! Where an answer comes from: the cache, an identical call already in flight ([`single_flight`]),
//! or the pipeline to generation — and, when generation answered and the policy allows, into the
//! cache. One place for both RPCs, so unary calls and streams read, share and store alike; a
//! whole answer is sent as a stream, and generation's stream passed on, by [`relay`].

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use llmesh_proto::cache_key;
use llmesh_proto::generation::v1::{GenerateRequest, GenerateResponse};

use crate::{
    admission::Bill,
    cache::{Cache, CacheConfig, Use},
    catalog::Catalog,
    deadline::Deadline,
    error::CallError,
    metrics::{label, metrics},
    pipeline::{self, Ask, Call, FallbackSource, Generation, Reply, Started, UpstreamError},
    principal::Principal,
};

pub mod relay;
mod single_flight;

use self::single_flight::{Flight, SingleFlight};

/// Answers generation requests; see the module docs.
#[derive(Debug, Clone)]
pub struct Answers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    generation: Generation,
    cache: Cache,
    catalog: Catalog,
    flights: SingleFlight,
    cache_nondeterministic: bool,
    single_flight_wait: Duration,
}

/// A whole answer.
#[derive(Debug)]
pub struct Answer {
    pub response: GenerateResponse,
    /// The chunks a cached stream was first sent in (empty: one chunk, the whole text).
    pub chunks: Vec<String>,
    /// How long generation (or the call this one followed) took, out of the gateway's own time.
    pub upstream_time: Duration,
    /// Where it came from, which decides what the caller pays.
    pub source: Source,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Generation answered this call.
    Generated,
    /// The fallback answered instead.
    Fallback(FallbackSource),
    /// The cache answered.
    Cached,
    /// An identical call in flight answered (single flight).
    Shared,
}

impl Answer {
    /// What the caller is charged for: generation's usage for an answer this call made — the
    /// secondary model's included —, a share of it for one reused from the cache or an identical
    /// call, and nothing for a stale or fallback-message one.
    pub fn bill(&self) -> Bill {
        let Some(usage) = self.response.usage else { return Bill::Free };
        match self.source {
            Source::Generated | Source::Fallback(FallbackSource::SecondaryModel) => Bill::Full(usage),
            Source::Cached | Source::Shared => Bill::Reused(usage),
            Source::Fallback(FallbackSource::StaleCache | FallbackSource::Message) => Bill::Free,
        }
    }
}

/// A stream's answer: whole (from the cache, or a fallback before the first chunk), or live.
pub enum Streamed {
    Whole(Answer),
    /// Generation's stream, and the cache to store it in once it has finished (when allowed).
    Live(Started, Option<Cache>),
}

/// What the cache said.
enum Cached {
    Hit(Box<Answer>),
    /// What the policy allows, and the request's cache key when it may read (computed once here,
    /// for the near cache, the cache service's lookup and single flight alike).
    Miss(Use, Option<String>),
}

impl Answers {
    pub fn new(generation: Generation, cache: Cache, catalog: Catalog, config: &CacheConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                generation,
                cache,
                catalog,
                flights: SingleFlight::default(),
                cache_nondeterministic: config.cache_nondeterministic,
                single_flight_wait: Duration::from_millis(config.single_flight_wait_ms),
            }),
        }
    }

    /// The answer to a unary call: cached, shared with an identical call in flight, or generated
    /// (and stored).
    pub async fn unary(
        &self,
        request: &Arc<GenerateRequest>,
        deadline: Deadline,
        caller: &Principal,
    ) -> Result<Answer, CallError> {
        let (policy, key) = match self.cached(request, deadline).await? {
            Cached::Hit(answer) => return Ok(*answer),
            Cached::Miss(policy, key) => (policy, key),
        };
        // Identical cacheable misses in flight at once share one generation call.
        let leader = if let Some(key) = key {
            match self.inner.flights.join(key) {
                Flight::Leader(leader) => Some(leader),
                Flight::Follower(follower) => {
                    let waited = Instant::now();
                    if let Some(response) = follower.wait(self.inner.single_flight_wait.min(deadline.remaining())).await
                    {
                        let upstream_time = waited.elapsed();
                        return Ok(Answer { response, chunks: Vec::new(), upstream_time, source: Source::Shared });
                    }
                    None
                }
            }
        } else {
            None
        };
        let called = Instant::now();
        let call = Call::new(Ask::Generate(request.clone()), deadline, caller.clone());
        let (response, source) = match pipeline::ask(&self.inner.generation, call).await? {
            Reply::Generated(response) => (response, Source::Generated),
            Reply::Fallback(response, source) => (response, Source::Fallback(source)),
            Reply::Streaming(_) | Reply::Models(_) => return Err(unexpected_reply()),
        };
        let upstream_time = called.elapsed();
        if let Some(leader) = leader {
            leader.finish(&response);
        }
        if policy.write {
            self.inner.cache.store((**request).clone(), response.clone(), Vec::new());
        }
        Ok(Answer { response, chunks: Vec::new(), upstream_time, source })
    }

    /// The answer to a stream: cached (replayed in its chunks), or generation's stream once its
    /// first chunk has arrived, or a fallback answer when generation failed before that.
    pub async fn stream(
        &self,
        request: &Arc<GenerateRequest>,
        deadline: Deadline,
        caller: &Principal,
    ) -> Result<Streamed, CallError> {
        let policy = match self.cached(request, deadline).await? {
            Cached::Hit(answer) => return Ok(Streamed::Whole(*answer)),
            Cached::Miss(policy, _) => policy,
        };
        let call = Call::new(Ask::Stream(request.clone()), deadline, caller.clone());
        match pipeline::ask(&self.inner.generation, call).await? {
            Reply::Streaming(started) => Ok(Streamed::Live(started, policy.write.then(|| self.inner.cache.clone()))),
            // Nothing was streamed yet: a fallback answer is the whole stream.
            Reply::Fallback(response, source) => Ok(Streamed::Whole(Answer {
                response,
                chunks: Vec::new(),
                upstream_time: Duration::ZERO,
                source: Source::Fallback(source),
            })),
            Reply::Generated(_) => Err(unexpected_reply()),
            Reply::Models(_) => Err(unexpected_reply()),
        }
    }

    /// True when the same request is expected to give the same answer, so caching it is safe.
    fn cacheable(&self, request: &GenerateRequest) -> bool {
        self.inner.cache_nondeterministic
            || request.temperature == Some(0.0)
            || request.seed.is_some()
            || self.inner.catalog.deterministic(&request.model)
    }

    async fn cached(&self, request: &GenerateRequest, deadline: Deadline) -> Result<Cached, CallError> {
        let policy = Use::of(request.cache, self.cacheable(request));
        if !policy.read && !policy.only_cached {
            metrics().cache_requests.add(1, &[label("result", "bypass")]);
        }
        let key = policy.read.then(|| cache_key::of(request));
        if let Some(key) = &key
            && let Some(hit) = self.inner.cache.lookup(request, key, deadline.remaining()).await
            && let Some(response) = hit.response
        {
            let answer = Answer { response, chunks: hit.chunks, upstream_time: Duration::ZERO, source: Source::Cached };
            return Ok(Cached::Hit(Box::new(answer)));
        }
        if policy.only_cached {
            return Err(CallError::not_cached());
        }
        Ok(Cached::Miss(policy, key))
    }
}

/// The pipeline answers each ask with its own kind of reply; anything else is a bug of ours.
fn unexpected_reply() -> CallError {
    UpstreamError::Transport(tonic::Status::internal("generation's reply did not match the call")).into()
}

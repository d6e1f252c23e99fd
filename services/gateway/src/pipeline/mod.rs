//! The way from the gateway to generation: one `tower::Service` stack, declared in
//! [`crate::stack::generation`] with the rest of the request path and read outermost first, each
//! layer in its own module:
//!
//! 1. [`fallback`]: when all else failed, a degraded answer (secondary model, stale cache,
//!    message). Outside the breaker, so an open breaker still degrades gracefully.
//! 2. [`retry`]: another attempt for what another attempt may fix, within a budget, after a
//!    backoff or the upstream's pushback; never after a stream's first chunk.
//! 3. [`breaker`]: each attempt's outcome charged to the replica, or to the model on it, that
//!    failed. Outside the timeout, so a timed-out attempt is charged too.
//! 4. [`timeout`]: each attempt bounded by `per_try_timeout_ms` and the call's deadline.
//! 5. [`balance`]: power of two choices over peak EWMA among the replicas whose breakers let the
//!    call through, and the gRPC call itself.
//!
//! Between layers a failure is an [`UpstreamError`]; it becomes a `tonic::Status` only at the RPC
//! edge. A [`Call`] is cheap to clone (retries and the fallback keep one): the request is shared.

pub mod balance;
pub mod breaker;
mod error;
pub mod fallback;
pub mod retry;
pub mod timeout;

#[cfg(test)]
pub mod testing;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::stream::BoxStream;
use llmesh_proto::generation::v1::{GenerateRequest, GenerateResponse, GenerateStreamResponse, ListModelsResponse};
use serde::{Deserialize, Serialize};
use tower::{ServiceExt as _, util::BoxCloneSyncService};

pub use error::{Charge, FallbackReason, FallbackSource, Origin, TimeoutCause, UpstreamError};

use self::{balance::Lease, breaker::BreakerConfig, retry::RetryConfig};
use crate::{cache::Cache, deadline::Deadline, principal::Principal};

/// `[gateway.generation]`: where the replicas are and how calls to them are made.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    /// Generation replicas: `http://host:port`, or `dns://name:port` for every address the name
    /// resolves to, re-resolved every `dns_refresh_ms`.
    pub endpoints: Vec<String>,
    pub connect_timeout_ms: u64,
    pub dns_refresh_ms: u64,
    /// Longest one attempt may take (0: only the call's deadline).
    pub per_try_timeout_ms: u64,
    /// How fast a replica's latency estimate forgets a spike.
    pub ewma_decay_ms: u64,
    /// The latency a failed or rate-limited call counts as, so it steers traffic away.
    pub failure_penalty_ms: u64,
    pub breaker: BreakerConfig,
    pub retry: RetryConfig,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:50052".into()],
            connect_timeout_ms: 1_000,
            dns_refresh_ms: 5_000,
            per_try_timeout_ms: 0,
            ewma_decay_ms: 10_000,
            failure_penalty_ms: 1_000,
            breaker: BreakerConfig::default(),
            retry: RetryConfig::default(),
        }
    }
}

/// What is asked of generation.
#[derive(Debug, Clone)]
pub enum Ask {
    Generate(Arc<GenerateRequest>),
    /// A stream, answered once its first chunk has arrived.
    Stream(Arc<GenerateRequest>),
    ListModels,
}

impl Ask {
    /// The generation request, for the asks that carry one.
    pub fn request(&self) -> Option<&Arc<GenerateRequest>> {
        match self {
            Self::Generate(request) | Self::Stream(request) => Some(request),
            Self::ListModels => None,
        }
    }

    /// The RPC's name, for spans and metric labels.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Generate(_) => "Generate",
            Self::Stream(_) => "GenerateStream",
            Self::ListModels => "ListModels",
        }
    }
}

/// One call down the pipeline.
#[derive(Debug, Clone)]
pub struct Call {
    pub ask: Ask,
    pub deadline: Deadline,
    /// Who asked: the fallback's secondary model must be one the key may use.
    pub caller: Principal,
    /// This attempt's number, from 1 (set by the retry layer).
    attempt: u32,
    /// How long this attempt may take (set by the timeout layer; sent on as the callee's deadline).
    attempt_timeout: Duration,
}

impl Call {
    pub fn new(ask: Ask, deadline: Deadline, caller: Principal) -> Self {
        Self { ask, deadline, caller, attempt: 1, attempt_timeout: deadline.remaining() }
    }

    /// The same call asking something else (the fallback's secondary model).
    fn with_ask(&self, ask: Ask) -> Self {
        Self::new(ask, self.deadline, self.caller.clone())
    }
}

/// Generation's answer.
pub enum Reply {
    Generated(GenerateResponse),
    /// A degraded answer the fallback gave instead, and where it came from (its `degraded` says
    /// the same in words, for the client).
    Fallback(GenerateResponse, FallbackSource),
    /// A stream whose first chunk has arrived: from here on it is never retried.
    Streaming(Started),
    Models(ListModelsResponse),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Generated(response) => f.debug_tuple("Generated").field(response).finish(),
            Self::Fallback(response, source) => f.debug_tuple("Fallback").field(response).field(source).finish(),
            Self::Streaming(started) => f.debug_tuple("Streaming").field(&started.first).finish(),
            Self::Models(models) => f.debug_tuple("Models").field(models).finish(),
        }
    }
}

/// A stream whose first chunk has arrived.
pub struct Started {
    pub first: GenerateStreamResponse,
    /// The chunks after the first, as generation sends them.
    pub rest: BoxStream<'static, Result<GenerateStreamResponse, tonic::Status>>,
}

/// One attempt of a call below the breaker layer: the call, and the slot the balancer leaves the
/// attempt's [`Lease`] in for the breaker layer to charge the outcome to. Only the pipeline's own
/// layers make one (the breaker layer, per attempt), and the balancer takes nothing else: a stack
/// with the balancer but without the breaker layer does not type-check, so the breakers can neither
/// gate calls that are never charged nor miss the lease of one that was.
#[derive(Debug)]
pub struct Attempt {
    pub call: Call,
    pick: Pick,
}

impl Attempt {
    /// A fresh slot per attempt: a retry must not find the last attempt's lease.
    pub(in crate::pipeline) fn new(call: Call) -> (Self, Pick) {
        let pick = Pick::default();
        (Self { call, pick: pick.clone() }, pick)
    }

    /// Leaves the balancer's lease for the breaker layer.
    pub(in crate::pipeline) fn picked(&self, lease: Lease) {
        self.pick.put(lease);
    }
}

/// The slot an attempt's [`Lease`] travels in, from the balancer (which picks the replica) out to
/// the breaker layer (which charges the outcome).
#[derive(Debug, Clone, Default)]
pub(in crate::pipeline) struct Pick(Arc<Mutex<Option<Lease>>>);

impl Pick {
    fn put(&self, lease: Lease) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(lease);
        }
    }

    pub(in crate::pipeline) fn take(&self) -> Option<Lease> {
        self.0.lock().ok()?.take()
    }
}

/// The pipeline as one service.
pub type Generation = BoxCloneSyncService<Call, Reply, UpstreamError>;

/// A cache that is off, and a deadline of the gateway's own: for the pipeline's benchmark, which
/// builds the stack from outside the crate.
#[doc(hidden)]
pub fn disabled_cache() -> Cache {
    Cache::off(&crate::cache::CacheConfig::default())
}

#[doc(hidden)]
pub fn deadline_after(limit: Duration) -> Deadline {
    Deadline::after(limit)
}

/// Asks generation once, through the whole stack.
pub async fn ask(generation: &Generation, call: Call) -> Result<Reply, UpstreamError> {
    generation.clone().oneshot(call).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt as _;
    use llmesh_proto::{
        common::v1::{FinishReason, Usage},
        generation::v1::GenerateStreamResponse,
    };
    use tonic::{Code, Status};
    use tower_test::mock;

    use super::{fallback::FallbackConfig, testing::*, *};
    use crate::cache::CacheConfig;

    fn config(max_attempts: u32) -> GenerationConfig {
        GenerationConfig {
            retry: RetryConfig { max_attempts, ..RetryConfig::default() },
            ..GenerationConfig::default()
        }
    }

    fn fallback(secondary: Option<&str>) -> FallbackConfig {
        FallbackConfig { secondary_model: secondary.map(Into::into), ..FallbackConfig::default() }
    }

    fn stack_over_mock(max_attempts: u32, secondary: Option<&str>) -> (Generation, mock::Handle<Attempt, Reply>) {
        let (service, handle) = mock::pair::<Attempt, Reply>();
        let cache = Cache::off(&CacheConfig::default());
        (crate::stack::generation_over(&config(max_attempts), fallback(secondary), cache, fail_with(service)), handle)
    }

    fn later() -> Deadline {
        Deadline::after(Duration::from_secs(10))
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_still_yields_a_fallback_answer_without_a_retry() {
        let (generation, mut handle) = stack_over_mock(3, None);
        let call = tokio::spawn(ask_owned(generation, generate("hello", later())));
        let (_, respond) = handle.next_request().await.unwrap();
        respond.send_error(Fail(UpstreamError::CircuitOpen));
        let Ok(Reply::Fallback(answer, _)) = call.await.unwrap() else { panic!("a fallback answer") };
        assert_eq!(answer.finish_reason, i32::from(FinishReason::Fallback));
        let degraded = answer.degraded.unwrap();
        assert_eq!((degraded.reason.as_str(), degraded.source.as_str()), ("circuit_open", "message"));
        assert!(!degraded.detail.contains("circuit open for every"), "fixed words only: {}", degraded.detail);
        assert!(no_more_requests(&mut handle).await, "not retried");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_never_follows_a_streamed_chunk() {
        let (generation, mut handle) = stack_over_mock(3, None);
        let stream = Call::new(Ask::Stream(request("hello")), later(), Principal::anonymous());
        let call = tokio::spawn(ask_owned(generation, stream));
        let (_, respond) = handle.next_request().await.unwrap();
        let first = GenerateStreamResponse { delta: "hel".into(), ..Default::default() };
        let rest = futures::stream::iter([Err(Status::unavailable("broke mid-stream"))]).boxed();
        respond.send_response(Reply::Streaming(Started { first, rest }));
        let Ok(Reply::Streaming(mut started)) = call.await.unwrap() else { panic!("the stream, as it started") };
        assert_eq!(started.first.delta, "hel");
        assert_eq!(started.rest.next().await.unwrap().unwrap_err().code(), Code::Unavailable);
        assert!(no_more_requests(&mut handle).await, "not retried");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_then_fall_back() {
        let (generation, mut handle) = stack_over_mock(3, None);
        let call = tokio::spawn(ask_owned(generation, generate("hello", later())));
        for attempt in 1..=3 {
            let (request, respond) = handle.next_request().await.unwrap();
            assert_eq!(request.call.attempt, attempt);
            respond.send_error(Fail(UpstreamError::from_client(Status::unavailable("down"))));
        }
        let Ok(Reply::Fallback(answer, _)) = call.await.unwrap() else { panic!("a fallback answer") };
        assert_eq!(answer.degraded.unwrap().reason, "error");
    }

    #[tokio::test(start_paused = true)]
    async fn the_secondary_model_answers_only_for_a_key_that_may_use_it() {
        let backup_usage = Usage { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7, ..Default::default() };
        for (caller, allowed) in
            [(Principal::anonymous(), true), (narrow(&["sim"]), false), (narrow(&["sim", "backup"]), true)]
        {
            let (generation, mut handle) = stack_over_mock(1, Some("backup"));
            let call = Call::new(Ask::Generate(request("hello")), later(), caller);
            let call = tokio::spawn(ask_owned(generation, call));
            let (_, respond) = handle.next_request().await.unwrap();
            respond.send_error(Fail(UpstreamError::from_client(Status::unavailable("down"))));
            if allowed {
                let (second, respond) = handle.next_request().await.unwrap();
                assert_eq!(second.call.ask.request().unwrap().model, "backup");
                let answer = GenerateResponse {
                    model: "backup".into(),
                    text: "from backup".into(),
                    usage: Some(backup_usage),
                    ..Default::default()
                };
                respond.send_response(Reply::Generated(answer));
            }
            let Ok(Reply::Fallback(answer, _)) = call.await.unwrap() else { panic!("an answer") };
            let degraded = answer.degraded.clone().unwrap();
            if allowed {
                assert_eq!((answer.text.as_str(), degraded.source.as_str()), ("from backup", "secondary_model"));
                assert_eq!(answer.usage, Some(backup_usage), "the secondary model's usage is kept, to be charged");
            } else {
                assert_eq!(degraded.source, "message", "a key that may not use the secondary model");
                assert!(no_more_requests(&mut handle).await);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_clients_mistake_is_not_fallen_back_from() {
        let (generation, mut handle) = stack_over_mock(3, None);
        let call = tokio::spawn(ask_owned(generation, generate("hello", later())));
        let (_, respond) = handle.next_request().await.unwrap();
        respond.send_error(Fail(UpstreamError::from_client(Status::invalid_argument("model: unknown model"))));
        let error = call.await.unwrap().unwrap_err();
        assert_eq!(error.into_status().code(), Code::InvalidArgument);
    }

    fn narrow(models: &[&str]) -> Principal {
        Principal { models: models.iter().map(|m| m.to_string()).collect(), ..Principal::anonymous() }
    }

    /// True when no further attempt reaches the mock (the stack may be gone: that is no attempt).
    async fn no_more_requests(handle: &mut mock::Handle<Attempt, Reply>) -> bool {
        !matches!(tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await, Ok(Some(_)))
    }

    async fn ask_owned(generation: Generation, call: Call) -> Result<Reply, UpstreamError> {
        ask(&generation, call).await
    }
}

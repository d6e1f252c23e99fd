//! The answer step: where a call's answer comes from, as five tower layers declared in
//! [`crate::stack::answers`], outermost first, each in its own module:
//!
//! 0. [`admit`]: the call admitted ([`TokenAdmission`](crate::admission::TokenAdmission)): valid,
//!    the key may use the model, its tokens and budgets reserved as [`Tokens`].
//! 1. [`settle`]: the call's [`Tokens`] settled with what the answer's [`Bill`] says — at once for
//!    a whole answer, when the stream ends for a live one ([`relay`]).
//! 2. [`lookup`]: the cache policy, the near cache and the cache service; a hit is the answer, a
//!    miss goes on (with its cache key) and a fresh answer is stored on the way back.
//! 3. [`single_flight`]: the first of identical cacheable unary misses leads, the others wait for
//!    its answer; a degraded answer is never shared.
//! 4. [`generate`]: the generation pipeline ([`Generation`](crate::pipeline::Generation)), its
//!    [`Reply`](crate::pipeline::Reply) made an [`Answered`].
//!
//! One stack for both RPCs, so unary calls and streams read, share and store alike. This module
//! holds what travels between the layers: an [`Asked`] call down to admission, a [`Reserved`]
//! question down to settlement, a [`Question`] below it, an [`Answered`] back up.

use std::{sync::Arc, time::Duration};

use llmesh_proto::generation::v1::{GenerateRequest, GenerateResponse};
use tower::util::BoxCloneSyncService;

use crate::{
    admission::{Bill, Tokens},
    cache::Cache,
    deadline::Deadline,
    error::CallError,
    pipeline::{FallbackSource, Started},
    principal::Principal,
};

pub mod admit;
pub mod generate;
pub mod lookup;
pub mod relay;
pub mod settle;
pub mod single_flight;

/// The answer step as one service: a call in, admitted, answered and settled out.
pub type Answering = BoxCloneSyncService<Asked, settle::Settled, CallError>;

/// One generation call as a route hands it over, not yet admitted.
#[derive(Debug)]
pub struct Asked {
    pub request: GenerateRequest,
    /// A stream, or a unary call.
    pub stream: bool,
    pub deadline: Deadline,
    /// The caller the auth layer found ([`Principal::of`]).
    pub caller: Principal,
}

/// One admitted generation call, as the answer step's layers see it.
#[derive(Debug, Clone)]
pub struct Question {
    /// Shared: the pipeline keeps it for retries and fallbacks.
    pub request: Arc<GenerateRequest>,
    /// A stream (answered once its first chunk has arrived), or a unary call.
    pub stream: bool,
    pub deadline: Deadline,
    /// Who asked: the fallback's secondary model must be one the key may use.
    pub caller: Principal,
    /// The request's cache key when the policy lets it read the cache: set by [`lookup`] (which
    /// computes it once) for [`single_flight`].
    pub key: Option<String>,
}

impl Question {
    pub fn new(request: Arc<GenerateRequest>, stream: bool, deadline: Deadline, caller: Principal) -> Self {
        Self { request, stream, deadline, caller, key: None }
    }
}

/// A [`Question`] with the tokens admission reserved for it, which [`settle`] settles.
#[derive(Debug)]
pub struct Reserved {
    pub question: Question,
    pub tokens: Tokens,
}

/// What the layers below [`settle`] answer: a whole answer (from the cache, an identical call,
/// generation, or a fallback — for a stream, one before its first chunk), or generation's live
/// stream.
pub enum Answered {
    Whole(Answer),
    /// Generation's stream, and the cache to store it in once it has finished (when allowed; set
    /// by [`lookup`]).
    Live(Started, Option<Cache>),
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
    /// An answer this call got without generation: no upstream time, no chunks.
    fn whole(response: GenerateResponse, source: Source) -> Self {
        Self { response, chunks: Vec::new(), upstream_time: Duration::ZERO, source }
    }

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use llmesh_proto::common::v1::{CachePolicy, Degraded};
    use tonic::Code;
    use tower::{ServiceBuilder, ServiceExt as _};
    use tower_test::mock;

    use super::{generate::Generate, lookup::LookupLayer, single_flight::SingleFlightLayer, *};
    use crate::{
        cache::CacheConfig,
        catalog::Catalog,
        pipeline::{Call, Reply, testing::fail_with},
    };

    /// The layers below settlement, as `stack::answers` orders them, over a mock of the pipeline;
    /// the cache is off, so every lookup misses.
    fn answers_over_mock() -> (BoxCloneSyncService<Question, Answered, CallError>, mock::Handle<Call, Reply>) {
        let (generation, handle) = mock::pair::<Call, Reply>();
        let config = CacheConfig::default();
        let service = ServiceBuilder::new()
            .layer(LookupLayer::new(Cache::off(&config), Catalog::default(), &config))
            .layer(SingleFlightLayer::new(Duration::from_secs(30)))
            .service(Generate::new(BoxCloneSyncService::new(fail_with(generation))));
        (BoxCloneSyncService::new(service), handle)
    }

    /// A deterministic (so cacheable) unary question.
    fn question(policy: CachePolicy) -> Question {
        let request = GenerateRequest {
            model: "sim".into(),
            prompt: "same".into(),
            temperature: Some(0.0),
            cache: policy.into(),
            ..Default::default()
        };
        Question::new(Arc::new(request), false, Deadline::after(Duration::from_secs(10)), Principal::anonymous())
    }

    fn whole(answered: Result<Answered, CallError>) -> Answer {
        match answered {
            Ok(Answered::Whole(answer)) => answer,
            Ok(Answered::Live(..)) => panic!("a whole answer"),
            Err(error) => panic!("an answer, not {error:?}"),
        }
    }

    /// True when no further call reaches the pipeline.
    async fn no_more_calls(handle: &mut mock::Handle<Call, Reply>) -> bool {
        !matches!(tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await, Ok(Some(_)))
    }

    #[tokio::test(start_paused = true)]
    async fn identical_misses_share_one_call_but_never_a_degraded_answer() {
        for degraded in [false, true] {
            let (answers, mut handle) = answers_over_mock();
            let leader = tokio::spawn(answers.clone().oneshot(question(CachePolicy::Default)));
            let (_, respond) = handle.next_request().await.unwrap();
            let follower = tokio::spawn(answers.clone().oneshot(question(CachePolicy::Default)));
            // The follower joins the leader's flight before the leader answers.
            tokio::time::sleep(Duration::from_millis(1)).await;
            let response = GenerateResponse { text: "once".into(), ..Default::default() };
            if degraded {
                let response = GenerateResponse { degraded: Some(Degraded::default()), ..response };
                respond.send_response(Reply::Fallback(response, FallbackSource::Message));
            } else {
                respond.send_response(Reply::Generated(response));
            }
            assert_eq!(whole(leader.await.unwrap()).response.text, "once");
            if degraded {
                let next = tokio::time::timeout(Duration::from_secs(5), handle.next_request());
                let (_, respond) = next.await.expect("the follower goes on its own").unwrap();
                let response = GenerateResponse { text: "its own".into(), ..Default::default() };
                respond.send_response(Reply::Generated(response));
                let answer = whole(follower.await.unwrap());
                assert_eq!((answer.response.text.as_str(), answer.source), ("its own", Source::Generated));
            } else {
                let answer = whole(follower.await.unwrap());
                assert_eq!((answer.response.text.as_str(), answer.source), ("once", Source::Shared));
                assert!(no_more_calls(&mut handle).await, "one call for both");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_miss_under_only_if_cached_never_calls_generation() {
        let (answers, mut handle) = answers_over_mock();
        let error = answers.oneshot(question(CachePolicy::OnlyIfCached)).await.err().unwrap();
        assert_eq!(error.into_status().code(), Code::NotFound);
        assert!(no_more_calls(&mut handle).await);
    }

    #[tokio::test(start_paused = true)]
    async fn bypassed_questions_go_on_their_own() {
        let (answers, mut handle) = answers_over_mock();
        let first = tokio::spawn(answers.clone().oneshot(question(CachePolicy::Bypass)));
        let second = tokio::spawn(answers.clone().oneshot(question(CachePolicy::Bypass)));
        for _ in 0..2 {
            let next = tokio::time::timeout(Duration::from_secs(5), handle.next_request());
            let (_, respond) = next.await.expect("each calls on its own").unwrap();
            respond.send_response(Reply::Generated(GenerateResponse::default()));
        }
        for call in [first, second] {
            assert_eq!(whole(call.await.unwrap()).source, Source::Generated);
        }
    }
}

//! The answer step's innermost service: a [`Question`] asked of the generation pipeline
//! ([`Generation`], declared in [`crate::stack::generation`]) and its [`Reply`] made an
//! [`Answered`]: a unary call's answer (generated, or the fallback's) with the time generation took;
//! a stream's live chunks, or the fallback's whole answer when it failed before its first chunk.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use tower::{Service, ServiceExt as _};

use super::{Answer, Answered, Question, Source};
use crate::{
    error::CallError,
    pipeline::{Ask, Call, Generation, Reply, UpstreamError},
};

/// Asks the generation pipeline; see the module docs.
#[derive(Debug, Clone)]
pub struct Generate {
    /// Shared: the layers above clone their inner service on every call, and a clone of the
    /// pipeline clones every layer of it; only the call itself takes one (as `pipeline::ask` does).
    generation: Arc<Generation>,
}

impl Generate {
    pub fn new(generation: Generation) -> Self {
        Self { generation: Arc::new(generation) }
    }
}

impl Service<Question> for Generate {
    type Response = Answered;
    type Error = CallError;
    type Future = BoxFuture<'static, Result<Answered, CallError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pipeline takes its own turn in the call (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, question: Question) -> Self::Future {
        let generation = Generation::clone(&self.generation);
        Box::pin(async move {
            let Question { request, stream, deadline, caller, .. } = question;
            let ask = if stream { Ask::Stream(request) } else { Ask::Generate(request) };
            let called = Instant::now();
            let reply = generation.oneshot(Call::new(ask, deadline, caller)).await?;
            let upstream_time = called.elapsed();
            let whole =
                |response, source| Answered::Whole(Answer { response, chunks: Vec::new(), upstream_time, source });
            match (stream, reply) {
                (false, Reply::Generated(response)) => Ok(whole(response, Source::Generated)),
                (false, Reply::Fallback(response, source)) => Ok(whole(response, Source::Fallback(source))),
                (true, Reply::Streaming(started)) => Ok(Answered::Live(started, None)),
                // Nothing was streamed yet: a fallback answer is the whole stream.
                (true, Reply::Fallback(response, source)) => Ok(Answered::Whole(Answer {
                    response,
                    chunks: Vec::new(),
                    upstream_time: Duration::ZERO,
                    source: Source::Fallback(source),
                })),
                (_, Reply::Generated(_) | Reply::Streaming(_) | Reply::Models(_)) => Err(unexpected_reply()),
            }
        })
    }
}

/// The pipeline answers each ask with its own kind of reply; anything else is a bug of ours.
pub fn unexpected_reply() -> CallError {
    UpstreamError::Transport(tonic::Status::internal("generation's reply did not match the call")).into()
}

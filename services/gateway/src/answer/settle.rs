//! Settlement, the answer step's outermost layer: the tokens admission reserved for a call
//! ([`Tokens`]) settled exactly once, with what its answer is charged for ([`Answer::bill`]).
//!
//! - A whole unary answer settles at once, and the key's remaining quota goes with it.
//! - A whole answer to a stream (a cached one, a fallback before the first chunk) is replayed as
//!   chunks and settles at once ([`relay::replay`]).
//! - A live stream's headers carry what is left after the reservation; it settles when it ends, or,
//!   when the client goes away first, when its chunks are dropped ([`relay::relay`]).
//! - A failure drops the tokens: the call costs the caller nothing.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use llmesh_proto::generation::v1::GenerateResponse;
use tower::{Layer, Service, ServiceExt as _};

use super::{Answer, Answered, Question, Reserved, relay};
use crate::{admission::Quota, error::CallError};

/// Settles each call's tokens; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct SettleLayer;

impl<S> Layer<S> for SettleLayer {
    type Service = Settle<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Settle { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Settle<S> {
    inner: S,
}

/// A settled call: what the client is sent, and what the key has left.
#[expect(clippy::large_enum_variant, reason = "moved once per call; boxing the answer would allocate per call")]
pub enum Settled {
    Unary {
        response: GenerateResponse,
        quota: Quota,
        /// How long generation took, out of the gateway's own time.
        upstream_time: Duration,
    },
    Stream {
        chunks: relay::ChunkStream,
        quota: Quota,
    },
}

impl<S> Service<Reserved> for Settle<S>
where
    S: Service<Question, Response = Answered, Error = CallError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Settled;
    type Error = CallError;
    type Future = BoxFuture<'static, Result<Settled, CallError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, reserved: Reserved) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let Reserved { question, tokens } = reserved;
            let (stream, request, deadline) = (question.stream, question.request.clone(), question.deadline);
            let settled = match inner.oneshot(question).await? {
                Answered::Whole(answer) if !stream => {
                    let quota = tokens.settle_bill(answer.bill(), &answer.response.model);
                    let Answer { response, upstream_time, .. } = answer;
                    Settled::Unary { response, quota, upstream_time }
                }
                Answered::Whole(answer) => {
                    let (chunks, quota) = relay::replay(answer, tokens);
                    Settled::Stream { chunks, quota }
                }
                // Headers go out before the tokens are known: they carry what is left after the
                // reservation.
                Answered::Live(started, cache) => {
                    let quota = tokens.quota();
                    Settled::Stream { chunks: relay::relay(started, request, cache, deadline, tokens), quota }
                }
            };
            Ok(settled)
        })
    }
}

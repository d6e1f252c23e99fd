//! The breaker layer: makes each attempt (with its pick slot) and charges its outcome.

use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::ResponseFuture;
use crate::pipeline::{Attempt, Call, Reply, UpstreamError};

/// See the module docs of [`crate::pipeline::breaker`].
#[derive(Debug, Clone, Copy, Default)]
pub struct BreakerLayer;

impl<S> Layer<S> for BreakerLayer {
    type Service = ChargeOutcomes<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ChargeOutcomes { inner }
    }
}

/// The service [`BreakerLayer`] makes.
#[derive(Debug, Clone)]
pub struct ChargeOutcomes<S> {
    inner: S,
}

impl<S> Service<Call> for ChargeOutcomes<S>
where
    S: Service<Attempt, Response = Reply, Error = UpstreamError>,
{
    type Response = Reply;
    type Error = UpstreamError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let (attempt, pick) = Attempt::new(call);
        ResponseFuture::new(self.inner.call(attempt), pick)
    }
}

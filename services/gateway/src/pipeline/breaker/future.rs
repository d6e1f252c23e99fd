//! The breaker layer's future: the attempt, then its outcome charged to the lease it left.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use pin_project_lite::pin_project;

use crate::pipeline::{Pick, Reply, UpstreamError};

pin_project! {
    /// Resolves as the attempt does; on the way, charges the outcome to the replica (and model)
    /// the balancer picked. Dropped before that (the caller went away), the lease is dropped
    /// unfinished and counts for nothing.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        pick: Pick,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, pick: Pick) -> Self {
        Self { inner, pick }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Reply, UpstreamError>>,
{
    type Output = Result<Reply, UpstreamError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(lease) = this.pick.take() {
            lease.finish(result.as_ref().map(drop));
        }
        Poll::Ready(result)
    }
}

//! The response future of [`super::GrpcTrace`].
//!
//! The inner future is boxed because the crate has no pin-projection dependency (and `unsafe` is
//! forbidden); one allocation per call.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use opentelemetry::context::WithContext;
use tracing::instrument::Instrumented;

use super::CallRecord;
use super::body::TracedBody;

/// Resolves to the inner service's response with its body wrapped in [`TracedBody`].
pub struct ResponseFuture<F> {
    kind: Kind<F>,
}

enum Kind<F> {
    Passthrough(Pin<Box<F>>),
    Traced { future: Pin<Box<WithContext<Instrumented<F>>>>, record: Option<CallRecord> },
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn passthrough(future: F) -> Self {
        Self { kind: Kind::Passthrough(Box::pin(future)) }
    }

    pub(super) fn traced(future: WithContext<Instrumented<F>>, record: CallRecord) -> Self {
        Self { kind: Kind::Traced { future: Box::pin(future), record: Some(record) } }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    B: hyper::body::Body<Data = hyper::body::Bytes> + Send + Unpin + 'static,
    B::Error: Into<super::body::BoxError>,
{
    type Output = Result<http::Response<tonic::body::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is Unpin (the inner future is boxed), so the future is too.
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Passthrough(future) => {
                let result = ready!(future.as_mut().poll(cx));
                Poll::Ready(result.map(|response| response.map(tonic::body::Body::new)))
            }
            Kind::Traced { future, record } => {
                let result = ready!(future.as_mut().poll(cx));
                let Some(mut record) = record.take() else {
                    // Polled again after completion: a contract violation by the caller, but the
                    // layer must not panic; there is nothing left to record.
                    return Poll::Ready(result.map(|response| response.map(tonic::body::Body::new)));
                };
                match result {
                    Ok(response) => {
                        let (parts, body) = response.into_parts();
                        if let Some(code) = record.code_of_head(&parts) {
                            record.finish(code);
                        }
                        let body = TracedBody::new(body, record);
                        Poll::Ready(Ok(http::Response::from_parts(parts, tonic::body::Body::new(body))))
                    }
                    Err(err) => {
                        record.finish(tonic::Code::Unknown);
                        Poll::Ready(Err(err))
                    }
                }
            }
        }
    }
}

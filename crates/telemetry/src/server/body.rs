//! The response body wrapper: reads `grpc-status` from the trailers and keeps the call's span open
//! until the body ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame, SizeHint};

use super::{CallRecord, grpc_status};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body that records the call's outcome when its trailers arrive.
#[derive(Debug)]
pub struct TracedBody<B> {
    inner: B,
    record: Option<CallRecord>,
}

impl<B> TracedBody<B> {
    pub(super) fn new(inner: B, record: CallRecord) -> Self {
        Self { inner, record: Some(record) }
    }
}

impl<B> Body for TracedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(record)) = (frame.trailers_ref(), this.record.as_mut()) {
                    record.finish(grpc_status(trailers).unwrap_or(tonic::Code::Unknown));
                }
                // A body that knows it has ended (an HTTP route's whole JSON answer) is not polled
                // again: its end is now.
                if let Some(record) = this.record.as_mut()
                    && record.is_http()
                    && !record.is_finished()
                    && this.inner.is_end_stream()
                {
                    let code = record.code_at_end();
                    record.finish(code);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                // The stream broke mid-way; the client sees an error without a status.
                if let Some(record) = this.record.as_mut() {
                    record.finish(tonic::Code::Unknown);
                }
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(None) => {
                // The end: a gRPC body without trailers (and without a header status) is UNKNOWN.
                if let Some(mut record) = this.record.take()
                    && !record.is_finished()
                {
                    let code = record.code_at_end();
                    record.finish(code);
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

//! The request side of a call's record: whether the client went away while the server was still
//! reading its request.
//!
//! A request body that fails to arrive (the client reset the stream, or its connection closed
//! mid-request) makes tonic answer the call `UNKNOWN`, its code for a transport error, and that
//! answer reaches nobody. Recorded as it stands, it would count as a server error
//! (`job:llm_requests:server_error_ratio_rate5m`, `LlmeshHighErrorRate`, the span's error
//! status), so any client could raise the mesh's server-error rate, and page its operators, by
//! hanging up mid-request. Such a call is recorded as `CANCELLED` instead, as a client that goes
//! away while the answer streams is: the client cancelled it. A call the server answers `OK`
//! although its request broke (it had read what it needed) stays `OK`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame, SizeHint};

use super::body::BoxError;

/// Set when the call's request body failed: the client is gone.
#[derive(Clone, Debug, Default)]
pub(crate) struct ClientGone(Arc<AtomicBool>);

impl ClientGone {
    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// The code to record for a call that ended with `code`: `CANCELLED` for a failure after the
    /// client went away, else `code`.
    pub(crate) fn code(&self, code: tonic::Code) -> tonic::Code {
        if code != tonic::Code::Ok && self.is_set() { tonic::Code::Cancelled } else { code }
    }
}

/// A request body that sets [`ClientGone`] when it fails; everything else passes through.
pub(crate) struct WatchedBody<B> {
    inner: B,
    gone: ClientGone,
}

impl<B> WatchedBody<B> {
    pub(crate) fn new(inner: B, gone: ClientGone) -> Self {
        Self { inner, gone }
    }
}

impl<B> Body for WatchedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(error))) => {
                this.gone.0.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(error.into())))
            }
            other => other.map(|frame| frame.map(|frame| frame.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_after_the_client_left_become_cancelled() {
        let gone = ClientGone::default();
        assert_eq!(gone.code(tonic::Code::Unknown), tonic::Code::Unknown);
        gone.0.store(true, Ordering::Relaxed);
        assert_eq!(gone.code(tonic::Code::Unknown), tonic::Code::Cancelled);
        assert_eq!(gone.code(tonic::Code::Internal), tonic::Code::Cancelled);
        assert_eq!(gone.code(tonic::Code::Ok), tonic::Code::Ok);
    }
}

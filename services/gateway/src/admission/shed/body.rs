//! A response body that holds a concurrency permit until it ends.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http_body::{Frame, SizeHint};
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Status, codegen::Bytes};

/// The slots a call holds: the gateway's and its key's.
#[derive(Debug)]
pub struct Slots {
    _global: Option<OwnedSemaphorePermit>,
    _key: Option<OwnedSemaphorePermit>,
}

impl Slots {
    pub fn new(global: Option<OwnedSemaphorePermit>, key: Option<OwnedSemaphorePermit>) -> Self {
        Self { _global: global, _key: key }
    }
}

/// The inner body, plus the slots of its call: released when the body has yielded its last
/// frame (trailers included), failed, or was dropped (the client went away).
#[derive(Debug)]
pub struct PermitBody {
    inner: tonic::body::Body,
    permit: Option<Slots>,
}

impl PermitBody {
    pub fn new(inner: tonic::body::Body, slots: Slots) -> Self {
        Self { inner, permit: Some(slots) }
    }
}

impl http_body::Body for PermitBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(poll, Poll::Ready(None | Some(Err(_)))) || self.inner.is_end_stream() {
            self.permit = None;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

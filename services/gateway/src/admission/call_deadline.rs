//! The call's deadline as an admission layer: ends every counted call whose answer has not begun
//! within the gateway's limit (see [`CallDeadlineLayer`]); the handlers keep the limit themselves
//! with [`crate::deadline::Deadline`].

use std::{future::Future, time::Duration};

use crate::error::CallError;

/// How long after the gateway's own limit [`CallDeadlineLayer`] ends a call: the handlers keep
/// the limit themselves (answering with a fallback or DEADLINE_EXCEEDED), so this only ends what
/// they never see.
pub const LAYER_GRACE: Duration = Duration::from_secs(1);

/// Ends every counted call (all but health, the mesh's health and reflection) whose response has
/// not begun within the gateway's limit plus [`LAYER_GRACE`], with DEADLINE_EXCEEDED. The
/// handlers bound what they do; this bounds what comes before them: a request whose body never
/// finishes arriving (a client that sent no `grpc-timeout`, which tonic would enforce itself)
/// would otherwise hold its key's and the gateway's call slots for as long as it likes.
#[derive(Debug, Clone, Copy)]
pub struct CallDeadlineLayer {
    limit: Duration,
}

impl CallDeadlineLayer {
    pub fn new(request_timeout: Duration) -> Self {
        Self { limit: request_timeout.saturating_add(LAYER_GRACE) }
    }
}

impl<S> tower::Layer<S> for CallDeadlineLayer {
    type Service = CallDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallDeadline { inner, limit: self.limit }
    }
}

#[derive(Debug, Clone)]
pub struct CallDeadline<S> {
    inner: S,
    limit: Duration,
}

impl<S, B> tower::Service<http::Request<B>> for CallDeadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = CallDeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let limit = (!llmesh_common::server::is_exempt(request.uri().path())).then_some(self.limit);
        CallDeadlineFuture { inner: self.inner.call(request), sleep: limit.map(tokio::time::sleep) }
    }
}

pin_project_lite::pin_project! {
    pub struct CallDeadlineFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
    }
}

impl<F, E> Future for CallDeadlineFuture<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(result) = this.inner.poll(cx) {
            return std::task::Poll::Ready(result);
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(std::task::Poll::Ready(())) => {
                let exceeded = CallError::Timeout {
                    message: "deadline exceeded: the call did not begin to answer within the gateway's limit (request_timeout_ms)".into(),
                    client: false,
                };
                std::task::Poll::Ready(Ok(exceeded.into_http()))
            }
            _ => std::task::Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;
    use tonic::{Code, Status};
    use tower::{Layer as _, ServiceExt as _};

    use super::*;

    /// A service that never answers, behind the layer with a 1 s limit.
    fn never() -> CallDeadline<
        impl tower::Service<
            http::Request<()>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
    > {
        let pending = tower::service_fn(|_: http::Request<()>| std::future::pending());
        CallDeadlineLayer::new(Duration::from_secs(1)).layer(pending)
    }

    fn call(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_never_begins_to_answer_ends_after_the_limit_and_its_grace() {
        let started = Instant::now();
        let response = never().oneshot(call("/llmesh.gateway.v1.Gateway/Generate")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(1) + LAYER_GRACE);
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn health_and_reflection_are_not_bounded() {
        let waited =
            tokio::time::timeout(Duration::from_secs(60), never().oneshot(call("/grpc.health.v1.Health/Watch")));
        assert!(waited.await.is_err(), "still waiting after a minute");
    }
}

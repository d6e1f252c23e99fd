//! The per-try timeout: each attempt ends at `per_try_timeout_ms` or at the call's deadline,
//! whichever comes first, and says whose limit it was ([`TimeoutCause`]): a per-try timeout may be
//! retried and is charged to the replica's model; the client's own deadline is charged to nothing.
//!
//! For a stream the attempt lasts until its first chunk: from there on the stream belongs to the
//! client and is bounded by the call's deadline alone.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use super::{Attempt, Reply, TimeoutCause, UpstreamError};

/// Bounds each attempt; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct PerTryTimeoutLayer {
    per_try: Option<Duration>,
}

impl PerTryTimeoutLayer {
    /// `None`: only the call's deadline bounds an attempt.
    pub fn new(per_try: Option<Duration>) -> Self {
        Self { per_try }
    }
}

impl<S> Layer<S> for PerTryTimeoutLayer {
    type Service = PerTryTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PerTryTimeout { inner, per_try: self.per_try }
    }
}

#[derive(Debug, Clone)]
pub struct PerTryTimeout<S> {
    inner: S,
    per_try: Option<Duration>,
}

impl<S> Service<Attempt> for PerTryTimeout<S>
where
    S: Service<Attempt, Response = Reply, Error = UpstreamError>,
{
    type Response = Reply;
    type Error = UpstreamError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut attempt: Attempt) -> Self::Future {
        let call = &mut attempt.call;
        let remaining = call.deadline.remaining();
        let (limit, cause) = match self.per_try {
            Some(per_try) if per_try < remaining => (per_try, TimeoutCause::PerTry),
            _ if call.deadline.client_bound() => (remaining, TimeoutCause::Client),
            _ => (remaining, TimeoutCause::Gateway),
        };
        if limit.is_zero() {
            return ResponseFuture::Expired { cause: Some(cause) };
        }
        call.attempt_timeout = limit;
        ResponseFuture::Running { inner: self.inner.call(attempt), sleep: tokio::time::sleep(limit), limit, cause }
    }
}

pin_project! {
    #[project = Projected]
    pub enum ResponseFuture<F> {
        Running { #[pin] inner: F, #[pin] sleep: Sleep, limit: Duration, cause: TimeoutCause },
        /// No time was left to try at all.
        Expired { cause: Option<TimeoutCause> },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Reply, UpstreamError>>,
{
    type Output = Result<Reply, UpstreamError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Running { inner, sleep, limit, cause } => {
                if let Poll::Ready(result) = inner.poll(cx) {
                    return Poll::Ready(result);
                }
                sleep.poll(cx).map(|()| Err(UpstreamError::Timeout { after: *limit, cause: *cause }))
            }
            Projected::Expired { cause } => {
                let cause = cause.take().unwrap_or(TimeoutCause::Gateway);
                Poll::Ready(Err(UpstreamError::Timeout { after: Duration::ZERO, cause }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt as _;
    use tower_test::mock;

    use super::*;
    use crate::{deadline::Deadline, pipeline::testing};

    async fn timed_out(per_try: Option<Duration>, deadline: Deadline) -> (TimeoutCause, Duration) {
        let (service, mut handle) = mock::pair::<Attempt, Reply>();
        let service = PerTryTimeoutLayer::new(per_try).layer(service.map_err(testing::never));
        let started = tokio::time::Instant::now();
        let call = tokio::spawn(service.oneshot(testing::attempt("hello", deadline)));
        let (_request, _respond) = handle.next_request().await.expect("the attempt reached the balancer");
        match call.await.unwrap() {
            Err(UpstreamError::Timeout { cause, after }) => {
                assert_eq!(started.elapsed(), after);
                (cause, after)
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn says_whose_limit_ended_the_attempt() {
        let ours = || Deadline::after(Duration::from_secs(30));
        assert_eq!(
            timed_out(Some(Duration::from_secs(2)), ours()).await,
            (TimeoutCause::PerTry, Duration::from_secs(2))
        );
        assert_eq!(timed_out(None, ours()).await, (TimeoutCause::Gateway, Duration::from_secs(30)));
        let theirs = testing::client_deadline(Duration::from_millis(500));
        let (cause, _) = timed_out(Some(Duration::from_secs(2)), theirs).await;
        assert_eq!(cause, TimeoutCause::Client, "a deadline the client chose");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_time_passes_and_no_time_left_fails_at_once() {
        let (service, mut handle) = mock::pair::<Attempt, Reply>();
        let service = PerTryTimeoutLayer::new(Some(Duration::from_secs(1))).layer(service.map_err(testing::never));
        let call =
            tokio::spawn(service.clone().oneshot(testing::attempt("hello", Deadline::after(Duration::from_secs(5)))));
        let (request, respond) = handle.next_request().await.unwrap();
        assert_eq!(request.call.attempt_timeout, Duration::from_secs(1), "the balancer learns the attempt's budget");
        respond.send_response(testing::answer("hi"));
        assert!(matches!(call.await.unwrap(), Ok(Reply::Generated(_))));

        let spent = Deadline::after(Duration::ZERO);
        let result = service.oneshot(testing::attempt("late", spent)).await;
        assert!(matches!(result, Err(UpstreamError::Timeout { cause: TimeoutCause::Gateway, .. })), "{result:?}");
    }
}

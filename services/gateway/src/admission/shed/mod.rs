//! Load shedding: at most `max_concurrency` calls in flight, and at most `max_in_flight_per_key`
//! (or the key's own `max_in_flight`) of them for any one key; the next is refused at once with
//! RESOURCE_EXHAUSTED and a retry hint rather than queued, so an overloaded gateway answers fast,
//! clients (or their balancers) go elsewhere, and one key cannot take every slot from the others.
//! A call counts from the moment it arrives until its response body ends, so a stream (a
//! `WatchJob` too) holds its place for as long as it streams.
//!
//! The per-key slots are kept per key id, which comes from the configured keys (the auth layer
//! runs first): the map holds at most one entry per configured key, never a name a client made up.

mod body;

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{Request, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

pub use body::{PermitBody, Slots};

use serde::{Deserialize, Serialize};

use crate::{admission::is_exempt, error::CallError, principal::Principal};

/// `[gateway.shed]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShedConfig {
    /// Calls in flight at once (streams count until they end); more are refused at once with
    /// RESOURCE_EXHAUSTED.
    pub max_concurrency: usize,
    /// Calls in flight at once for one key (a key's `max_in_flight` overrides it; 0: no bound), so
    /// that one key cannot take the whole of `max_concurrency` from the others.
    pub max_in_flight_per_key: u32,
}

impl Default for ShedConfig {
    fn default() -> Self {
        Self { max_concurrency: 1024, max_in_flight_per_key: 256 }
    }
}

/// One key's bound on calls in flight, and its slots.
type KeySlots = (u32, Arc<Semaphore>);

/// What a refused call is told to wait before trying again.
const RETRY_HINT: Duration = Duration::from_millis(250);

/// Refuses calls beyond `max_concurrency` in flight (0: no bound). Clones share the count, so
/// keep a clone to read [`ShedLayer::shed_count`] and [`ShedLayer::in_flight`]. Health and
/// reflection are never refused nor counted.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// `None`: no bound.
    permits: Option<Arc<Semaphore>>,
    max_concurrency: usize,
    /// Per key id: its bound and its slots.
    per_key: Mutex<HashMap<Arc<str>, KeySlots>>,
    max_in_flight_per_key: u32,
    shed: AtomicU64,
    shed_per_key: AtomicU64,
}

impl ShedLayer {
    pub fn new(config: &ShedConfig) -> Self {
        let max_concurrency = config.max_concurrency.min(Semaphore::MAX_PERMITS);
        let permits = (max_concurrency > 0).then(|| Arc::new(Semaphore::new(max_concurrency)));
        Self {
            shared: Arc::new(Shared {
                permits,
                max_concurrency,
                per_key: Mutex::default(),
                max_in_flight_per_key: config.max_in_flight_per_key,
                shed: AtomicU64::new(0),
                shed_per_key: AtomicU64::new(0),
            }),
        }
    }

    /// Calls refused so far because the gateway was full.
    pub fn shed_count(&self) -> u64 {
        self.shared.shed.load(Ordering::Relaxed)
    }

    /// Calls refused so far because their key had its bound of calls in flight.
    pub fn shed_per_key_count(&self) -> u64 {
        self.shared.shed_per_key.load(Ordering::Relaxed)
    }

    /// Calls in flight now (counted ones: health and reflection are not).
    pub fn in_flight(&self) -> usize {
        self.shared.permits.as_ref().map_or(0, |permits| self.shared.max_concurrency - permits.available_permits())
    }

    pub fn max_concurrency(&self) -> usize {
        self.shared.max_concurrency
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed { inner, shared: self.shared.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, ReqBody> Service<Request<ReqBody>> for Shed<S>
where
    S: Service<Request<ReqBody>, Response = Response<tonic::body::Body>>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ShedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if is_exempt(request.uri().path()) {
            return ShedFuture { state: State::Called { inner: Box::pin(self.inner.call(request)), slots: None } };
        }
        // The key's slot first: a key at its bound must not take a global slot from the others.
        let key = match self.shared.key_slot(request.extensions().get::<Principal>()) {
            Ok(key) => key,
            Err(refused) => return ShedFuture { state: State::Refused(Some(refused)) },
        };
        let global = match &self.shared.permits {
            Some(permits) => match permits.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    self.shared.shed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(max_concurrency = self.shared.max_concurrency, "call shed");
                    let message = format!("overloaded: {} calls in flight", self.shared.max_concurrency);
                    return ShedFuture { state: State::Refused(Some(refusal(message, true))) };
                }
            },
            None => None,
        };
        let slots = Some(Slots::new(global, key));
        ShedFuture { state: State::Called { inner: Box::pin(self.inner.call(request)), slots } }
    }
}

impl Shared {
    /// A slot of the caller's key (anonymous when the auth layer put no principal), or the refusal.
    fn key_slot(&self, principal: Option<&Principal>) -> Result<Option<OwnedSemaphorePermit>, CallError> {
        let (id, own) = match principal {
            Some(principal) => (principal.id.clone(), principal.max_in_flight),
            None => (Principal::ANONYMOUS.into(), None),
        };
        let bound = own.unwrap_or(self.max_in_flight_per_key).min(Semaphore::MAX_PERMITS as u32);
        if bound == 0 {
            return Ok(None);
        }
        let slots = {
            let Ok(mut per_key) = self.per_key.lock() else { return Ok(None) };
            let entry = per_key.entry(id.clone()).or_insert_with(|| (bound, Arc::new(Semaphore::new(bound as usize))));
            if entry.0 != bound {
                // The key's bound changed: calls in flight keep their old slots.
                *entry = (bound, Arc::new(Semaphore::new(bound as usize)));
            }
            entry.1.clone()
        };
        match slots.try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => {
                self.shed_per_key.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(key = %id, bound, "call shed: the key has its bound of calls in flight");
                Err(refusal(format!("overloaded: API key {id} has {bound} calls in flight, its limit"), false))
            }
        }
    }
}

/// RESOURCE_EXHAUSTED with a hint of when to try again; `whole`: the whole gateway was full (the
/// HTTP routes answer 503), not the key's own bound (429).
fn refusal(message: String, whole: bool) -> CallError {
    CallError::Overloaded { message, whole, retry_after: RETRY_HINT }
}

/// The response of a call that got a permit (its body then holds the permit), or the refusal.
pub struct ShedFuture<F> {
    state: State<F>,
}

enum State<F> {
    Called {
        inner: Pin<Box<F>>,
        slots: Option<Slots>,
    },
    /// The refusal.
    Refused(Option<CallError>),
}

impl<F> std::fmt::Debug for ShedFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Refused(_) => "refused",
        };
        f.debug_struct("ShedFuture").field("state", &state).finish()
    }
}

impl<F, E> Future for ShedFuture<F>
where
    F: Future<Output = Result<Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            State::Called { inner, slots } => {
                let response = ready!(inner.as_mut().poll(cx))?;
                Poll::Ready(Ok(match slots.take() {
                    Some(slots) => response.map(|body| tonic::body::Body::new(PermitBody::new(body, slots))),
                    None => response,
                }))
            }
            State::Refused(refused) => {
                let refused = refused
                    .take()
                    .unwrap_or_else(|| CallError::Cancelled("shed future polled after completion".into()));
                Poll::Ready(Ok(refused.into_http()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, time::Duration};

    use futures::future::join_all;
    use http_body::Body as _;
    use tokio::sync::{mpsc, oneshot};
    use tonic::Code;
    use tower::{ServiceExt as _, service_fn};

    use tonic::Status;

    use super::*;

    /// A body streaming whatever the test sends, ended when the sender is dropped.
    struct ChannelBody(mpsc::Receiver<&'static str>);

    impl http_body::Body for ChannelBody {
        type Data = tonic::codegen::Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Status>>> {
            self.0.poll_recv(cx).map(|chunk| chunk.map(|text| Ok(http_body::Frame::data(text.into()))))
        }
    }

    fn request(path: &str) -> Request<()> {
        Request::builder().uri(format!("http://gateway{path}")).body(()).unwrap()
    }

    fn code(response: &Response<tonic::body::Body>) -> Option<Code> {
        response.headers().get("grpc-status").map(|v| Code::from_bytes(v.as_bytes()))
    }

    const GENERATE: &str = "/llmesh.gateway.v1.Gateway/GenerateStream";

    fn config(max_concurrency: usize, max_in_flight_per_key: u32) -> ShedConfig {
        ShedConfig { max_concurrency, max_in_flight_per_key }
    }

    fn request_by(key: &str, own: Option<u32>) -> Request<()> {
        let mut request = request(GENERATE);
        let principal = Principal { id: key.into(), max_in_flight: own, ..Principal::anonymous() };
        request.extensions_mut().insert(principal);
        request
    }

    #[tokio::test(start_paused = true)]
    async fn one_key_at_its_bound_leaves_room_for_the_others() {
        let layer = ShedLayer::new(&config(10, 2));
        let (release_tx, mut release_rx) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
        let service = layer.layer(service_fn(move |_: Request<()>| {
            let (tx, rx) = oneshot::channel();
            let _ = release_tx.send(tx);
            async move {
                let _ = rx.await;
                Ok::<_, Infallible>(Response::new(tonic::body::Body::empty()))
            }
        }));
        let greedy: Vec<_> =
            (0..2).map(|_| tokio::spawn(service.clone().oneshot(request_by("greedy", None)))).collect();
        let mut releases = vec![release_rx.recv().await.unwrap(), release_rx.recv().await.unwrap()];
        let refused = service.clone().oneshot(request_by("greedy", None)).await.unwrap();
        assert_eq!(code(&refused), Some(Code::ResourceExhausted));
        assert_eq!(refused.headers()["grpc-retry-pushback-ms"], "250", "a retry hint");
        assert_eq!(layer.shed_per_key_count(), 1);
        assert_eq!(layer.in_flight(), 2, "the refused call took no global slot");
        // Another key, and a key with a larger bound of its own, still get in.
        let polite = tokio::spawn(service.clone().oneshot(request_by("polite", None)));
        releases.push(release_rx.recv().await.unwrap());
        let vip: Vec<_> = (0..3).map(|_| tokio::spawn(service.clone().oneshot(request_by("vip", Some(3))))).collect();
        for _ in 0..3 {
            releases.push(release_rx.recv().await.unwrap());
        }
        for release in releases {
            release.send(()).unwrap();
        }
        for response in join_all(greedy.into_iter().chain([polite]).chain(vip)).await {
            assert_eq!(code(&response.unwrap().unwrap()), None);
        }
        assert_eq!(layer.in_flight(), 0);
    }

    /// Reads the body to its end.
    async fn drain(mut body: tonic::body::Body) -> usize {
        let mut frames = 0;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            frame.unwrap();
            frames += 1;
        }
        frames
    }

    #[tokio::test(start_paused = true)]
    async fn the_call_after_the_limit_is_refused_at_once() {
        let layer = ShedLayer::new(&config(3, 0));
        // Each call waits for its release before answering.
        let (release_tx, mut release_rx) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
        let service = layer.layer(service_fn(move |_: Request<()>| {
            let (tx, rx) = oneshot::channel();
            let _ = release_tx.send(tx);
            async move {
                let _ = rx.await;
                Ok::<_, Infallible>(Response::new(tonic::body::Body::empty()))
            }
        }));
        let pending: Vec<_> = (0..3).map(|_| tokio::spawn(service.clone().oneshot(request(GENERATE)))).collect();
        let mut releases = Vec::new();
        for _ in 0..3 {
            releases.push(release_rx.recv().await.unwrap());
        }
        assert_eq!(layer.in_flight(), 3);

        let refused = tokio::time::timeout(Duration::from_millis(1), service.clone().oneshot(request(GENERATE)))
            .await
            .expect("refused without waiting")
            .unwrap();
        assert_eq!(code(&refused), Some(Code::ResourceExhausted));
        assert_eq!(refused.headers()["grpc-message"], "overloaded:%203%20calls%20in%20flight");
        assert_eq!(layer.shed_count(), 1);

        // Probes still get through.
        let probe = tokio::spawn(service.clone().oneshot(request("/grpc.health.v1.Health/Check")));
        release_rx.recv().await.unwrap().send(()).unwrap();
        assert_eq!(code(&probe.await.unwrap().unwrap()), None);

        for release in releases {
            release.send(()).unwrap();
        }
        for response in join_all(pending).await {
            assert_eq!(code(&response.unwrap().unwrap()), None);
        }
        // The bodies were empty: each permit went back with its response.
        assert_eq!(layer.in_flight(), 0);
        let again = tokio::spawn(service.clone().oneshot(request(GENERATE)));
        release_rx.recv().await.unwrap().send(()).unwrap();
        assert_eq!(code(&again.await.unwrap().unwrap()), None);
        assert_eq!(layer.shed_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_holds_its_permit_until_its_body_ends() {
        let layer = ShedLayer::new(&config(1, 0));
        let (chunks_tx, chunks_rx) = mpsc::channel(4);
        let body = Arc::new(std::sync::Mutex::new(Some(ChannelBody(chunks_rx))));
        let service = layer.layer(service_fn(move |_: Request<()>| {
            let body = body.lock().unwrap().take().map_or_else(tonic::body::Body::empty, tonic::body::Body::new);
            async move { Ok::<_, Infallible>(Response::new(body)) }
        }));

        let stream = service.clone().oneshot(request(GENERATE)).await.unwrap();
        assert_eq!(code(&stream), None);
        // The headers are out but the stream goes on: the call still counts.
        assert_eq!(layer.in_flight(), 1);
        let refused = service.clone().oneshot(request(GENERATE)).await.unwrap();
        assert_eq!(code(&refused), Some(Code::ResourceExhausted));

        let reader = tokio::spawn(drain(stream.into_body()));
        chunks_tx.send("one").await.unwrap();
        chunks_tx.send("two").await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(layer.in_flight(), 1);
        drop(chunks_tx);
        assert_eq!(reader.await.unwrap(), 2);
        assert_eq!(layer.in_flight(), 0);
        assert_eq!(code(&service.clone().oneshot(request(GENERATE)).await.unwrap()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_body_releases_its_permit() {
        let layer = ShedLayer::new(&config(1, 0));
        let (_chunks_tx, chunks_rx) = mpsc::channel::<&'static str>(1);
        let body = Arc::new(std::sync::Mutex::new(Some(ChannelBody(chunks_rx))));
        let service = layer.layer(service_fn(move |_: Request<()>| {
            let body = body.lock().unwrap().take().map_or_else(tonic::body::Body::empty, tonic::body::Body::new);
            async move { Ok::<_, Infallible>(Response::new(body)) }
        }));
        let stream = service.clone().oneshot(request(GENERATE)).await.unwrap();
        assert_eq!(layer.in_flight(), 1);
        drop(stream); // the client went away
        assert_eq!(layer.in_flight(), 0);
    }

    #[tokio::test]
    async fn zero_means_no_bound() {
        let layer = ShedLayer::new(&config(0, 0));
        let service = layer.layer(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(tonic::body::Body::empty()))
        }));
        let responses = join_all((0..100).map(|_| service.clone().oneshot(request(GENERATE)))).await;
        assert!(responses.iter().all(|r| code(r.as_ref().unwrap()).is_none()));
        assert_eq!(layer.shed_count(), 0);
    }
}

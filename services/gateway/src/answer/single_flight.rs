//! Single flight, the answer step's layer between the cache and generation: concurrent identical
//! cacheable unary misses make one upstream call. The first caller of a key (the cache key the
//! cache layer found) leads and calls generation; the others follow and take its answer, as
//! [`Source::Shared`]. Followers wait a bounded time (`single_flight_wait_ms`, and never past the
//! call's deadline); if the leader fails, gives up or takes too long, each follower goes on its
//! own. Streams, and requests that may not read the cache, always go on their own.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use llmesh_proto::generation::v1::GenerateResponse;
use tokio::sync::watch;
use tower::{Layer, Service, ServiceExt as _};

use super::{Answer, Answered, Question, Source};
use crate::error::CallError;

/// Shares one generation call among identical misses; see the module docs.
#[derive(Debug, Clone)]
pub struct SingleFlightLayer {
    flights: SingleFlight,
    wait: Duration,
}

impl SingleFlightLayer {
    /// Followers wait at most `wait` for their leader.
    pub fn new(wait: Duration) -> Self {
        Self { flights: SingleFlight::default(), wait }
    }
}

impl<S> Layer<S> for SingleFlightLayer {
    type Service = Shared<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shared { inner, flights: self.flights.clone(), wait: self.wait }
    }
}

#[derive(Debug, Clone)]
pub struct Shared<S> {
    inner: S,
    flights: SingleFlight,
    wait: Duration,
}

impl<S> Service<Question> for Shared<S>
where
    S: Service<Question, Response = Answered, Error = CallError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Answered;
    type Error = CallError;
    type Future = BoxFuture<'static, Result<Answered, CallError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A follower's answer never reaches the inner service: it takes its turn in the call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, question: Question) -> Self::Future {
        let inner = self.inner.clone();
        let flight = match &question.key {
            Some(key) if !question.stream => Some(self.flights.join(key.clone())),
            _ => None,
        };
        let wait = self.wait;
        Box::pin(async move {
            let leader = match flight {
                Some(Flight::Leader(leader)) => Some(leader),
                Some(Flight::Follower(follower)) => {
                    let waited = Instant::now();
                    if let Some(response) = follower.wait(wait.min(question.deadline.remaining())).await {
                        let answer =
                            Answer { upstream_time: waited.elapsed(), ..Answer::whole(response, Source::Shared) };
                        return Ok(Answered::Whole(answer));
                    }
                    None
                }
                None => None,
            };
            // A failure drops the leader: its followers go on their own at once.
            let answered = inner.oneshot(question).await?;
            if let (Some(leader), Answered::Whole(answer)) = (leader, &answered) {
                leader.finish(&answer.response);
            }
            Ok(answered)
        })
    }
}

type Slot = watch::Receiver<Option<GenerateResponse>>;

#[derive(Debug, Clone, Default)]
pub struct SingleFlight {
    flights: Arc<Mutex<HashMap<String, Slot>>>,
}

/// The caller's role for one key.
pub enum Flight {
    /// Call upstream, then [`Leader::finish`] with the answer.
    Leader(Leader),
    /// Someone else is calling upstream: [`Follower::wait`] for their answer.
    Follower(Follower),
}

pub struct Leader {
    key: String,
    flights: Arc<Mutex<HashMap<String, Slot>>>,
    tx: watch::Sender<Option<GenerateResponse>>,
}

pub struct Follower(Slot);

impl SingleFlight {
    pub fn join(&self, key: String) -> Flight {
        let Ok(mut flights) = self.flights.lock() else {
            // A poisoned map only loses deduplication, never the call.
            let (tx, _) = watch::channel(None);
            return Flight::Leader(Leader { key, flights: self.flights.clone(), tx });
        };
        if let Some(slot) = flights.get(&key) {
            return Flight::Follower(Follower(slot.clone()));
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(key.clone(), rx);
        Flight::Leader(Leader { key, flights: self.flights.clone(), tx })
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.flights.lock().map(|f| f.len()).unwrap_or(0)
    }
}

impl Leader {
    /// Hands a successful answer to the followers. Failures are not shared: each follower then
    /// tries for itself. A degraded answer counts as a failure: it is the leader's own (it may
    /// come from a model, or a stale entry, a follower's key may not use, and its detail names
    /// the leader's trace).
    ///
    /// The flight leaves the map first, so no follower joins after that: the receivers left are
    /// the followers waiting now, and without any the answer is not copied at all (most misses).
    pub fn finish(self, response: &GenerateResponse) {
        self.leave();
        if response.degraded.is_none() && self.tx.receiver_count() > 0 {
            self.tx.send_replace(Some(response.clone()));
        }
    }

    /// Takes the flight out of the map (with the map's own receiver).
    fn leave(&self) {
        if let Ok(mut flights) = self.flights.lock() {
            flights.remove(&self.key);
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.leave();
    }
}

impl Follower {
    /// The leader's answer, or `None` when it failed or did not answer within `limit`.
    pub async fn wait(mut self, limit: Duration) -> Option<GenerateResponse> {
        let answered = tokio::time::timeout(limit, self.0.wait_for(Option::is_some)).await;
        match answered {
            Ok(Ok(answer)) => answer.clone(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> GenerateResponse {
        GenerateResponse { text: text.into(), ..Default::default() }
    }

    #[tokio::test(start_paused = true)]
    async fn a_degraded_answer_is_not_handed_on() {
        let flights = SingleFlight::default();
        let Flight::Leader(leader) = flights.join("k".into()) else { panic!("first caller leads") };
        let Flight::Follower(follower) = flights.join("k".into()) else { panic!("second caller follows") };
        let waiting = tokio::spawn(follower.wait(Duration::from_secs(60)));
        let degraded = GenerateResponse { degraded: Some(Default::default()), ..answer("fallback") };
        leader.finish(&degraded);
        let started = tokio::time::Instant::now();
        assert_eq!(waiting.await.unwrap(), None, "the follower goes on its own");
        assert!(started.elapsed() < Duration::from_secs(1), "at once, not after its wait");
    }

    #[tokio::test(start_paused = true)]
    async fn followers_take_the_leaders_answer() {
        let flights = SingleFlight::default();
        let Flight::Leader(leader) = flights.join("k".into()) else { panic!("first caller leads") };
        let Flight::Follower(follower) = flights.join("k".into()) else { panic!("second caller follows") };
        let Flight::Leader(_other) = flights.join("other".into()) else { panic!("other keys lead") };
        let waiting = tokio::spawn(follower.wait(Duration::from_secs(1)));
        leader.finish(&answer("once"));
        assert_eq!(waiting.await.unwrap().unwrap().text, "once");
        assert_eq!(flights.in_flight(), 1, "only the other key's flight is left");
        // The leader is gone: the next caller leads a new flight.
        assert!(matches!(flights.join("k".into()), Flight::Leader(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_without_followers_just_leaves() {
        let flights = SingleFlight::default();
        let Flight::Leader(leader) = flights.join("k".into()) else { panic!("first caller leads") };
        let Flight::Leader(other) = flights.join("other".into()) else { panic!("other keys lead") };
        assert_eq!(other.tx.receiver_count(), 1, "the map's own receiver");
        leader.finish(&answer("alone"));
        assert_eq!(flights.in_flight(), 1);
        // A caller after the finish leads again (it did not follow a finished flight).
        assert!(matches!(flights.join("k".into()), Flight::Leader(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_leader_releases_followers_at_once() {
        let flights = SingleFlight::default();
        let Flight::Leader(leader) = flights.join("k".into()) else { panic!() };
        let Flight::Follower(follower) = flights.join("k".into()) else { panic!() };
        let started = tokio::time::Instant::now();
        drop(leader);
        assert!(follower.wait(Duration::from_secs(10)).await.is_none());
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(flights.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn followers_wait_a_bounded_time() {
        let flights = SingleFlight::default();
        let Flight::Leader(_leader) = flights.join("k".into()) else { panic!() };
        let Flight::Follower(follower) = flights.join("k".into()) else { panic!() };
        let started = tokio::time::Instant::now();
        assert!(follower.wait(Duration::from_millis(250)).await.is_none());
        assert_eq!(started.elapsed(), Duration::from_millis(250));
    }
}

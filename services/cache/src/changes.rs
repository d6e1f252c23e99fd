//! The feed behind `WatchChanges`: every entry replaced or removed, for the near caches in front of
//! this service (each gateway keeps recent hits in its own memory) to drop their copies.
//!
//! With the in-memory store every change happens here, so the feed is this process's own. With
//! Redis, other cache replicas change the same entries: each change is also published on a Redis
//! channel, and every replica relays what it hears on that channel to its watchers. Pub/sub loses
//! messages silently, so a replica checks that it hears everything:
//! - each publisher numbers its messages; a number still missing after [`SILENCE`] (a message
//!   dropped) means a change was lost;
//! - a publisher whose publish failed says so in its next message (`lost`);
//! - each replica publishes a heartbeat every [`HEARTBEAT`]: one not heard from for [`SILENCE`]
//!   may have made a change it could not announce (it stopped, hung or lost Redis), and a replica
//!   that does not hear its own within [`SILENCE`] has a dead subscription, even if its connection
//!   looks open. A replica that stops therefore ends every gateway's feed once: they drop their
//!   copies and watch again.
//!
//! A replica that may have missed a change ends its watchers' streams (while its subscription is
//! down it refuses new ones); a watcher drops everything it holds and watches again. The stream to
//! each watcher carries a heartbeat of its own when it has nothing else to send, so a gateway can
//! tell a live feed from a silent, broken connection.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use llmesh_proto::cache::v1::{Relayed, WatchChangesResponse, watch_changes_response::Change};
use llmesh_util::AbortOnDropHandle;
use opentelemetry::{KeyValue, metrics::Counter};
use prost::Message as _;
use tokio::sync::{broadcast, watch};
use tonic::Status;

use crate::store::{Store, StoreError, redis::RedisStore};

/// The Redis channel the replicas publish changes on (encoded [`Relayed`] messages).
const CHANNEL: &str = "llmesh:cache:v1:changes";

/// How many changes a slow watcher may fall behind before its stream ends (it then starts over).
const FEED_CAPACITY: usize = 4096;

/// How often each replica publishes a heartbeat, and how long a watcher's stream stays quiet
/// before it carries one.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a replica waits for its own heartbeat, or for a missing message, before it counts
/// the channel as lost.
const SILENCE: Duration = Duration::from_secs(3);

/// More numbers missing at once than this is a loss without waiting.
const MAX_MISSING: u64 = 1024;

#[derive(Debug, Clone)]
enum Event {
    Change(Arc<WatchChangesResponse>),
    /// The replica may have missed a change: its watchers' streams end.
    Lost,
}

#[derive(Debug, Clone)]
pub struct Changes {
    feed: broadcast::Sender<Event>,
    /// Whether this replica sees every change (always, in memory; while subscribed, on Redis).
    complete: watch::Receiver<bool>,
    /// Where changes go to the other replicas: `None` with the in-memory store.
    relay: Option<Arc<Publisher>>,
    /// The Redis subscription and the heartbeat, alive as long as the service is.
    _tasks: Arc<[AbortOnDropHandle<()>]>,
}

/// This replica's numbered messages on the channel. Publishes run concurrently and may reach
/// Redis out of order: the receivers allow for that (see [`Sequences`]).
#[derive(Debug)]
struct Publisher {
    store: RedisStore,
    id: u64,
    /// The last number used.
    seq: AtomicU64,
    /// A publish failed since the last message that went out.
    failed: AtomicBool,
}

impl Publisher {
    /// Publishes `change`, or a heartbeat when `None`.
    async fn publish(&self, change: Option<WatchChangesResponse>) -> Result<(), StoreError> {
        let seq = self.seq.fetch_add(1, SeqCst) + 1;
        let lost = self.failed.swap(false, SeqCst);
        let message = Relayed { publisher: self.id, seq, change, lost };
        let published = self.store.publish(CHANNEL, message.encode_to_vec()).await;
        if published.is_err() {
            self.failed.store(true, SeqCst);
        }
        published
    }
}

impl Changes {
    /// The feed for `store`: its own changes in memory; on Redis, subscribed to `subscribe_urls`
    /// (one Redis, or a cluster's seed nodes tried in turn: a cluster relays published messages to
    /// every node).
    pub fn new(store: Store, subscribe_urls: Vec<String>) -> Self {
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        match store {
            Store::Memory(_) => {
                let (_, complete) = watch::channel(true);
                // A receiver whose sender is gone keeps its last value: complete for good.
                Self { feed, complete, relay: None, _tasks: Arc::new([]) }
            }
            Store::Redis(store) => {
                let (complete_tx, complete) = watch::channel(false);
                let publisher = Arc::new(Publisher {
                    store,
                    id: fastrand::u64(..),
                    seq: AtomicU64::new(0),
                    failed: AtomicBool::new(false),
                });
                let tasks = [
                    AbortOnDropHandle::new(tokio::spawn(subscribe(
                        subscribe_urls,
                        publisher.id,
                        feed.clone(),
                        complete_tx,
                    ))),
                    AbortOnDropHandle::new(tokio::spawn(heartbeat(publisher.clone()))),
                ];
                Self { feed, complete, relay: Some(publisher), _tasks: Arc::new(tasks) }
            }
        }
    }

    /// Tells every watcher (here and, on Redis, at every replica) about `change`. When the publish
    /// fails the other replicas learn it from this replica's next message (or its silence) and end
    /// their watchers' streams; the error is for the caller to report.
    pub async fn publish(&self, change: Change) -> Result<(), StoreError> {
        let message = WatchChangesResponse { change: Some(change) };
        // Our own watchers hear it at once (and again from the channel, which does no harm).
        let _ = self.feed.send(Event::Change(Arc::new(message.clone())));
        match &self.relay {
            Some(publisher) => publisher.publish(Some(message)).await,
            None => Ok(()),
        }
    }

    /// The stream for one watcher: `everything`, then each change (or a heartbeat after a quiet
    /// second), ending with UNAVAILABLE when this replica may have missed a change or the watcher
    /// falls too far behind.
    pub fn watch(&self) -> Result<impl futures::Stream<Item = Result<WatchChangesResponse, Status>> + use<>, Status> {
        // Subscribe before checking, so no change between the two is missed.
        let events = self.feed.subscribe();
        if !*self.complete.borrow() {
            return Err(Status::unavailable("the cache is not subscribed to its Redis change channel yet"));
        }
        let first = WatchChangesResponse { change: Some(Change::Everything(true)) };
        // Each change in turn; the stream ends after its first error.
        let rest = futures::stream::unfold(Some(events), |events| async move {
            let mut events = events?;
            let ended = match tokio::time::timeout(HEARTBEAT, events.recv()).await {
                Err(_quiet) => {
                    let heartbeat = WatchChangesResponse { change: Some(Change::Heartbeat(true)) };
                    return Some((Ok(heartbeat), Some(events)));
                }
                Ok(Ok(Event::Change(change))) => {
                    return Some((Ok(WatchChangesResponse::clone(&change)), Some(events)));
                }
                Ok(Ok(Event::Lost)) => Status::unavailable("the cache may have missed a change: watch again"),
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                    Status::unavailable(format!("fell {n} changes behind: watch again"))
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return None,
            };
            Some((Err(ended), None))
        });
        Ok(futures::stream::once(async { Ok(first) }).chain(rest))
    }
}

/// Publishes a heartbeat every [`HEARTBEAT`], for this replica to hear its own (and the others to
/// see its numbers go on).
async fn heartbeat(publisher: Arc<Publisher>) {
    let mut ticker = tokio::time::interval(HEARTBEAT);
    loop {
        ticker.tick().await;
        if let Err(error) = publisher.publish(None).await {
            tracing::debug!(%error, "cache change channel: heartbeat not published");
        }
    }
}

/// `llmesh.cache.changes.lost{reason}`: each time this replica ended its watchers' feeds because
/// it may have missed a change.
fn lost_counter() -> Counter<u64> {
    llmesh_telemetry::meter()
        .u64_counter("llmesh.cache.changes.lost")
        .with_description("Times the cache may have missed a change on its Redis channel and ended its change feeds")
        .build()
}

/// Keeps a subscription to the change channel, relaying what it hears, and says whether it is up.
async fn subscribe(urls: Vec<String>, own_id: u64, feed: broadcast::Sender<Event>, complete: watch::Sender<bool>) {
    let lost = lost_counter();
    let mut backoff = Duration::from_millis(100);
    for url in urls.iter().cycle() {
        match listen(url, own_id, &feed, &complete, &lost).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(error) => tracing::warn!(%error, "cache change channel unavailable"),
        }
        if complete.send_replace(false) {
            tracing::warn!("lost the cache change channel; near caches drop their copies until it is back");
            lost.add(1, &[KeyValue::new("reason", "subscription")]);
            let _ = feed.send(Event::Lost);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One subscription, until its connection ends or goes silent.
async fn listen(
    url: &str,
    own_id: u64,
    feed: &broadcast::Sender<Event>,
    complete: &watch::Sender<bool>,
    lost: &Counter<u64>,
) -> anyhow::Result<()> {
    let client = llmesh_util::redis::client(url)?;
    let mut pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 2 s"))??;
    pubsub.subscribe(CHANNEL).await?;
    complete.send_replace(true);
    tracing::info!("subscribed to the cache change channel");
    let mut messages = pubsub.into_on_message();
    let mut sequences = Sequences::default();
    let mut heard_self = Instant::now();
    let mut check = tokio::time::interval(HEARTBEAT);
    loop {
        let checked = tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { return Ok(()) };
                match Relayed::decode(message.get_payload_bytes()) {
                    Ok(relayed) => {
                        let now = Instant::now();
                        if relayed.publisher == own_id {
                            heard_self = now;
                        }
                        if let Some(change) = relayed.change {
                            let _ = feed.send(Event::Change(Arc::new(change)));
                        }
                        let seen = sequences.saw(relayed.publisher, relayed.seq, now);
                        if relayed.lost { Err(Gap { publisher: relayed.publisher, why: Why::Reported }) } else { seen }
                    }
                    // Another version's message, or a corrupt one: it may have been a change.
                    Err(error) => {
                        tracing::warn!(%error, "undecodable message on the cache change channel");
                        Err(Gap { publisher: 0, why: Why::Undecodable })
                    }
                }
            }
            _ = check.tick() => {
                if heard_self.elapsed() > SILENCE {
                    anyhow::bail!("none of this replica's own heartbeats came back for {SILENCE:?}");
                }
                sequences.overdue(Instant::now())
            }
        };
        if let Err(Gap { publisher, why }) = checked {
            tracing::warn!(
                publisher = format_args!("{publisher:016x}"),
                reason = why.as_str(),
                "a cache change may have been lost on the channel; near caches start over"
            );
            lost.add(1, &[KeyValue::new("reason", why.as_str())]);
            let _ = feed.send(Event::Lost);
            sequences = Sequences::default();
        }
    }
}

/// A message that did not arrive, or may have been lost.
#[derive(Debug, PartialEq, Eq)]
struct Gap {
    publisher: u64,
    why: Why,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// A number never arrived.
    Missing,
    /// The publisher said a publish of its failed.
    Reported,
    /// The publisher went quiet: it stopped or hung, maybe with a change unannounced.
    Silent,
    Undecodable,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Reported => "reported",
            Self::Silent => "silent",
            Self::Undecodable => "undecodable",
        }
    }
}

/// The numbers heard from each publisher, to notice one that never arrives. Messages may come
/// out of order (a cluster relays them through different nodes): a missing number gets
/// [`SILENCE`] to turn up.
#[derive(Debug, Default)]
struct Sequences {
    publishers: HashMap<u64, Heard>,
}

#[derive(Debug)]
struct Heard {
    highest: u64,
    /// Numbers below `highest` not heard yet, with when they were first missed.
    missing: BTreeMap<u64, Instant>,
    last: Instant,
}

impl Sequences {
    /// Records message `seq` of `publisher`. A publisher heard for the first time starts where it
    /// is (what it sent before this subscription began is not this subscription's to relay).
    fn saw(&mut self, publisher: u64, seq: u64, now: Instant) -> Result<(), Gap> {
        let heard = self.publishers.entry(publisher).or_insert_with(|| Heard {
            highest: seq,
            missing: BTreeMap::new(),
            last: now,
        });
        heard.last = now;
        if seq > heard.highest {
            if seq - heard.highest > MAX_MISSING {
                return Err(Gap { publisher, why: Why::Missing });
            }
            heard.missing.extend((heard.highest + 1..seq).map(|n| (n, now)));
            heard.highest = seq;
        } else {
            heard.missing.remove(&seq);
        }
        Ok(())
    }

    /// A gap when a number has been missing for longer than [`SILENCE`], or a publisher has not
    /// been heard from for that long (it is forgotten: if it comes back, it starts anew).
    fn overdue(&mut self, now: Instant) -> Result<(), Gap> {
        let silent = self.publishers.iter().find(|(_, heard)| now.duration_since(heard.last) > SILENCE);
        if let Some((&publisher, _)) = silent {
            self.publishers.remove(&publisher);
            return Err(Gap { publisher, why: Why::Silent });
        }
        for (&publisher, heard) in &self.publishers {
            if heard.missing.values().any(|&since| now.duration_since(since) > SILENCE) {
                return Err(Gap { publisher, why: Why::Missing });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_order_are_fine_from_wherever_a_publisher_starts() {
        let (mut seen, t0) = (Sequences::default(), Instant::now());
        for seq in 57..70 {
            assert_eq!(seen.saw(1, seq, t0), Ok(()));
        }
        assert_eq!(seen.saw(2, 1, t0), Ok(()));
        assert_eq!(seen.overdue(t0 + SILENCE), Ok(()));
    }

    #[test]
    fn a_number_late_but_within_the_silence_is_fine() {
        let (mut seen, t0) = (Sequences::default(), Instant::now());
        seen.saw(1, 1, t0).unwrap();
        seen.saw(1, 3, t0).unwrap();
        assert_eq!(seen.overdue(t0 + Duration::from_secs(1)), Ok(()), "2 may still come");
        let t1 = t0 + Duration::from_secs(2);
        seen.saw(1, 2, t1).unwrap();
        assert_eq!(seen.overdue(t1 + Duration::from_secs(1)), Ok(()));
        // Repeats and old numbers change nothing.
        seen.saw(1, 2, t1).unwrap();
        assert_eq!(seen.overdue(t1 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn a_number_that_never_comes_is_a_gap() {
        let (mut seen, t0) = (Sequences::default(), Instant::now());
        seen.saw(7, 10, t0).unwrap();
        seen.saw(7, 12, t0).unwrap();
        // The publisher goes on (its heartbeats), but 11 never comes.
        let later = t0 + SILENCE + Duration::from_millis(1);
        seen.saw(7, 13, later).unwrap();
        assert_eq!(seen.overdue(later), Err(Gap { publisher: 7, why: Why::Missing }));
    }

    #[test]
    fn a_jump_too_far_is_a_gap_at_once() {
        let (mut seen, t0) = (Sequences::default(), Instant::now());
        seen.saw(7, 1, t0).unwrap();
        assert_eq!(seen.saw(7, 2 + MAX_MISSING, t0), Err(Gap { publisher: 7, why: Why::Missing }));
    }

    #[test]
    fn a_publisher_gone_silent_is_a_gap_once_then_forgotten() {
        let (mut seen, t0) = (Sequences::default(), Instant::now());
        seen.saw(7, 1, t0).unwrap();
        let later = t0 + SILENCE + Duration::from_millis(1);
        seen.saw(8, 1, later).unwrap();
        assert_eq!(seen.overdue(later), Err(Gap { publisher: 7, why: Why::Silent }));
        assert_eq!(seen.overdue(later), Ok(()), "reported once");
        // Back after all: it starts anew.
        seen.saw(7, 9, later).unwrap();
        assert_eq!(seen.overdue(later), Ok(()));
    }
}

//! The feed behind `WatchChanges`: every entry stored or removed, for the near caches in front of
//! this service (each gateway keeps recent hits in its own memory) to drop their copies.
//!
//! With the in-memory store every change happens here, so the feed is this process's own. With
//! Redis, other cache replicas change the same entries: each change is also published on a Redis
//! channel, and every replica relays what it hears on that channel to its watchers. While that
//! subscription is down a replica cannot see every change, so it ends its watchers' streams and
//! refuses new ones; a watcher drops everything it holds and comes back once the subscription is.

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use llmesh_proto::cache::v1::{WatchChangesResponse, watch_changes_response::Change};
use prost::Message as _;
use tokio::sync::{broadcast, watch};
use tonic::Status;

use crate::store::Store;

/// The Redis channel the replicas publish changes on (encoded `WatchChangesResponse` messages).
const CHANNEL: &str = "llmesh:cache:v1:changes";

/// How many changes a slow watcher may fall behind before its stream ends (it then starts over).
const FEED_CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
enum Event {
    Change(Arc<WatchChangesResponse>),
    /// The replica stopped seeing every change: its watchers' streams end.
    Lost,
}

#[derive(Debug, Clone)]
pub struct Changes {
    feed: broadcast::Sender<Event>,
    /// Whether this replica sees every change (always, in memory; while subscribed, on Redis).
    complete: watch::Receiver<bool>,
    /// The store, to publish on when it is Redis.
    store: Store,
    /// Keeps the Redis subscription alive as long as the service is.
    _subscription: Option<Arc<AbortOnDrop>>,
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
                Self { feed, complete, store, _subscription: None }
            }
            Store::Redis(_) => {
                let (complete_tx, complete) = watch::channel(false);
                let task = tokio::spawn(subscribe(subscribe_urls, feed.clone(), complete_tx));
                Self { feed, complete, store, _subscription: Some(Arc::new(AbortOnDrop(task))) }
            }
        }
    }

    /// Tells every watcher (here and, on Redis, at every replica) about `change`. A failed publish
    /// is logged: Redis is then most likely down, and the replicas' subscriptions with it, which
    /// ends every watcher's stream anyway.
    pub async fn publish(&self, change: Change) {
        let message = Arc::new(WatchChangesResponse { change: Some(change) });
        // Our own watchers hear it at once (and again from the channel, which does no harm).
        let _ = self.feed.send(Event::Change(message.clone()));
        if let Store::Redis(store) = &self.store
            && let Err(error) = store.publish(CHANNEL, message.encode_to_vec()).await
        {
            tracing::warn!(%error, "could not publish a cache change to the other replicas");
        }
    }

    /// The stream for one watcher: `everything`, then each change, ending with UNAVAILABLE when
    /// this replica stops seeing every change or the watcher falls too far behind.
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
            let ended = match events.recv().await {
                Ok(Event::Change(change)) => return Some((Ok(WatchChangesResponse::clone(&change)), Some(events))),
                Ok(Event::Lost) => Status::unavailable("the cache lost its Redis change channel: watch again"),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    Status::unavailable(format!("fell {n} changes behind: watch again"))
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((Err(ended), None))
        });
        Ok(futures::stream::once(async { Ok(first) }).chain(rest))
    }
}

/// Keeps a subscription to the change channel, relaying what it hears, and says whether it is up.
async fn subscribe(urls: Vec<String>, feed: broadcast::Sender<Event>, complete: watch::Sender<bool>) {
    let mut backoff = Duration::from_millis(100);
    for url in urls.iter().cycle() {
        match listen(url, &feed, &complete).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(error) => tracing::warn!(%error, "cache change channel unavailable"),
        }
        if complete.send_replace(false) {
            tracing::warn!("lost the cache change channel; near caches drop their copies until it is back");
            let _ = feed.send(Event::Lost);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One subscription, until its connection ends.
async fn listen(url: &str, feed: &broadcast::Sender<Event>, complete: &watch::Sender<bool>) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 2 s"))??;
    pubsub.subscribe(CHANNEL).await?;
    complete.send_replace(true);
    tracing::info!("subscribed to the cache change channel");
    let mut messages = pubsub.into_on_message();
    while let Some(message) = messages.next().await {
        match WatchChangesResponse::decode(message.get_payload_bytes()) {
            Ok(change) => {
                let _ = feed.send(Event::Change(Arc::new(change)));
            }
            Err(error) => tracing::warn!(%error, "undecodable message on the cache change channel"),
        }
    }
    Ok(())
}

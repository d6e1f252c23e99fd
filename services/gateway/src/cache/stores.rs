//! Stores into the cache service, sent in batches. A cache miss makes three calls — the lookup,
//! generation, the store — and the store is the one nobody waits for, so stores queue here and one
//! task sends them as `StoreMany` calls, one call at a time: when a store arrives it waits
//! [`LINGER`] for others, then sends whatever has gathered. At 10,000 misses a second that is about
//! 30 stores a call, so a miss costs the gateway and the cache service one call to the cache and a
//! thirtieth of another, not two (without the wait, the stores made while a call was out made
//! batches of 1.4 on average: the call is quicker than the gap between misses).
//!
//! Bounded: at most [`QUEUED`] stores wait (past that a store is dropped and counted: a cache
//! that cannot keep up must not grow the gateway's memory), and a call carries at most
//! [`STORE_MANY_MAX_ENTRIES`] stores and, but for a single large one, [`MAX_BATCH_BYTES`].
//! A cache service older than `StoreMany` answers UNIMPLEMENTED: that batch is lost (counted as
//! failed, as stores are best effort) and from then on each store is a `Store` call of its own.

use std::time::Duration;

use llmesh_proto::cache::v1::{
    STORE_MANY_MAX_ENTRIES, StoreManyRequest, StoreRequest, StoreResponse, cache_client::CacheClient,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::{Code, transport::Channel};

use crate::metrics::{label, metrics};

/// Most stores waiting to be sent.
const QUEUED: usize = 4096;

/// How long the first store of a batch waits for others: what an answer waits before the cache
/// service has it, and so what an identical request a moment later may miss by.
const LINGER: Duration = Duration::from_millis(2);

/// The least time a batch is given. `cache.budget_ms` (20 ms) bounds what a caller waits for; a
/// batch has no caller, carries up to 256 stores, and the next one waits for it anyway, so a cache
/// briefly slower than the budget costs no stores.
const MIN_BATCH_BUDGET: Duration = Duration::from_secs(1);

/// Most bytes of stores in one call, well under the cache service's message limit (an entry's
/// 1 MiB and a request's bytes): a batch never fails for its size where its stores alone would not.
const MAX_BATCH_BYTES: usize = 512 * 1024;

/// The queue in front of the sending task. Clones share it; the task ends, after sending what is
/// left, when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Stores {
    queue: mpsc::Sender<StoreRequest>,
}

impl Stores {
    /// Starts the sending task, each call bounded by `budget` (at least [`MIN_BATCH_BUDGET`]).
    /// Call within the runtime.
    pub fn start(client: CacheClient<Channel>, budget: Duration) -> Self {
        let budget = budget.max(MIN_BATCH_BUDGET);
        let (queue, waiting) = mpsc::channel(QUEUED);
        tokio::spawn(send_batches(waiting, client, budget));
        Self { queue }
    }

    /// Queues a store, or drops it when the queue is full.
    pub fn push(&self, store: StoreRequest) {
        if self.queue.try_send(store).is_err() {
            metrics().cache_stores.add(1, &[label("result", "dropped")]);
        }
    }
}

async fn send_batches(mut waiting: mpsc::Receiver<StoreRequest>, client: CacheClient<Channel>, budget: Duration) {
    let mut sender = Sender { client, budget, batches: true };
    let mut carried = None;
    loop {
        let first = match carried.take() {
            Some(store) => store,
            None => match waiting.recv().await {
                Some(store) => store,
                None => return,
            },
        };
        tokio::time::sleep(LINGER).await;
        let batch;
        (batch, carried) = gather(first, &mut waiting);
        sender.send(batch).await;
    }
}

/// `first` and whatever else is waiting, within a batch's bounds; the store that would have
/// crossed the byte bound is carried over to the next batch.
fn gather(
    first: StoreRequest,
    waiting: &mut mpsc::Receiver<StoreRequest>,
) -> (Vec<StoreRequest>, Option<StoreRequest>) {
    let mut bytes = first.encoded_len();
    let mut batch = vec![first];
    while batch.len() < STORE_MANY_MAX_ENTRIES {
        let Ok(store) = waiting.try_recv() else { break };
        bytes += store.encoded_len();
        if bytes > MAX_BATCH_BYTES {
            return (batch, Some(store));
        }
        batch.push(store);
    }
    (batch, None)
}

struct Sender {
    client: CacheClient<Channel>,
    budget: Duration,
    /// False once the cache service answered UNIMPLEMENTED to `StoreMany`.
    batches: bool,
}

impl Sender {
    async fn send(&mut self, batch: Vec<StoreRequest>) {
        if !self.batches {
            return self.one_by_one(batch).await;
        }
        let count = batch.len() as u64;
        let lost = match self.store_many(batch).await {
            Ok(results) => return count_results(&results),
            Err(Failed::Unimplemented) => {
                tracing::warn!(stores = count, "the cache service has no StoreMany: storing one entry per call");
                self.batches = false;
                "failed"
            }
            Err(Failed::Status(status)) => {
                tracing::warn!(code = ?status.code(), message = status.message(), stores = count, "cache store failed");
                "failed"
            }
            Err(Failed::OverBudget) => {
                let budget_ms = self.budget.as_millis() as u64;
                tracing::warn!(budget_ms, stores = count, "cache store over budget");
                "timeout"
            }
        };
        metrics().cache_stores.add(count, &[label("result", lost)]);
    }

    async fn store_many(&self, entries: Vec<StoreRequest>) -> Result<Vec<StoreResponse>, Failed> {
        let mut call = tonic::Request::new(StoreManyRequest { entries });
        crate::deadline::set_timeout(&mut call, self.budget);
        // Stores carry no trace context: those of traced calls go one by one (`Cache::store`).
        let mut client = self.client.clone();
        match tokio::time::timeout(self.budget, client.store_many(call)).await {
            Ok(Ok(response)) => Ok(response.into_inner().results),
            Ok(Err(status)) if status.code() == Code::Unimplemented => Err(Failed::Unimplemented),
            Ok(Err(status)) => Err(Failed::Status(status)),
            Err(_) => Err(Failed::OverBudget),
        }
    }

    async fn one_by_one(&self, batch: Vec<StoreRequest>) {
        let stores = batch.into_iter().map(|store| super::store_one(self.client.clone(), store, self.budget));
        futures::future::join_all(stores).await;
    }
}

enum Failed {
    Unimplemented,
    Status(tonic::Status),
    OverBudget,
}

fn count_results(results: &[StoreResponse]) {
    let stored = results.iter().filter(|result| result.stored).count() as u64;
    let refused = results.len() as u64 - stored;
    let stores = &metrics().cache_stores;
    if stored > 0 {
        stores.add(stored, &[label("result", "stored")]);
    }
    if refused > 0 {
        stores.add(refused, &[label("result", "refused")]);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    };

    use llmesh_proto::{
        cache::v1::{
            InvalidateRequest, InvalidateResponse, LookupRequest, LookupResponse, StatsRequest, StatsResponse,
            StoreManyResponse, WatchChangesRequest, WatchChangesResponse,
            cache_server::{Cache, CacheServer},
        },
        generation::v1::{GenerateRequest, GenerateResponse},
    };
    use tonic::{Request, Response, Status};

    use super::*;

    fn store(text_bytes: usize) -> StoreRequest {
        StoreRequest {
            request: Some(GenerateRequest { model: "sim".into(), prompt: "p".into(), ..Default::default() }),
            response: Some(GenerateResponse { text: "x".repeat(text_bytes), ..Default::default() }),
            chunks: Vec::new(),
            ttl_ms: 0,
        }
    }

    fn queue(stores: impl IntoIterator<Item = StoreRequest>) -> mpsc::Receiver<StoreRequest> {
        let (tx, rx) = mpsc::channel(QUEUED);
        for store in stores {
            tx.try_send(store).unwrap();
        }
        rx
    }

    #[test]
    fn a_lone_store_goes_alone() {
        let mut waiting = queue([]);
        let (batch, carried) = gather(store(10), &mut waiting);
        assert_eq!(batch.len(), 1);
        assert!(carried.is_none());
    }

    #[test]
    fn whatever_waits_goes_together_up_to_the_entry_bound() {
        let mut waiting = queue((0..STORE_MANY_MAX_ENTRIES + 10).map(|_| store(10)));
        let (batch, carried) = gather(store(10), &mut waiting);
        assert_eq!(batch.len(), STORE_MANY_MAX_ENTRIES);
        assert!(carried.is_none());
        let rest = gather(waiting.try_recv().unwrap(), &mut waiting).0;
        assert_eq!(rest.len(), 11, "the 11 left over");
    }

    #[test]
    fn the_store_that_would_cross_the_byte_bound_starts_the_next_batch() {
        let third = MAX_BATCH_BYTES / 3;
        let mut waiting = queue([store(third), store(third), store(10)]);
        let (batch, carried) = gather(store(third), &mut waiting);
        assert_eq!(batch.len(), 2);
        let carried = carried.expect("the third large store is carried over");
        assert_eq!(carried.response.unwrap().text.len(), third);
        assert_eq!(waiting.try_recv().unwrap().response.unwrap().text.len(), 10, "and the queue keeps its order");
    }

    /// A cache service from before `StoreMany`: it counts the stores it is sent one by one.
    #[derive(Default, Clone)]
    struct OlderCache {
        batches: Arc<AtomicUsize>,
        stores: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl Cache for OlderCache {
        async fn lookup(&self, _: Request<LookupRequest>) -> Result<Response<LookupResponse>, Status> {
            Err(Status::unimplemented("lookup"))
        }
        async fn store(&self, _: Request<StoreRequest>) -> Result<Response<StoreResponse>, Status> {
            self.stores.fetch_add(1, SeqCst);
            Ok(Response::new(StoreResponse { key: "k".into(), stored: true, reason: String::new() }))
        }
        async fn store_many(&self, _: Request<StoreManyRequest>) -> Result<Response<StoreManyResponse>, Status> {
            self.batches.fetch_add(1, SeqCst);
            Err(Status::unimplemented("Method not found: llmesh.cache.v1.Cache/StoreMany"))
        }
        async fn invalidate(&self, _: Request<InvalidateRequest>) -> Result<Response<InvalidateResponse>, Status> {
            Err(Status::unimplemented("invalidate"))
        }
        async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
            Err(Status::unimplemented("stats"))
        }
        type WatchChangesStream = futures::stream::Empty<Result<WatchChangesResponse, Status>>;
        async fn watch_changes(
            &self,
            _: Request<WatchChangesRequest>,
        ) -> Result<Response<Self::WatchChangesStream>, Status> {
            Err(Status::unimplemented("watch_changes"))
        }
    }

    #[tokio::test]
    async fn an_older_cache_service_gets_its_stores_one_by_one() {
        let cache = OlderCache::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(CacheServer::new(cache.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        let _server = llmesh_util::AbortOnDropHandle::new(tokio::spawn(server));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect_lazy();
        let stores = Stores::start(CacheClient::new(channel), Duration::from_secs(5));

        stores.push(store(10));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while cache.batches.load(SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no StoreMany call within 10 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..3 {
            stores.push(store(10));
        }
        while cache.stores.load(SeqCst) < 3 {
            assert!(tokio::time::Instant::now() < deadline, "{} of 3 stores arrived", cache.stores.load(SeqCst));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(cache.batches.load(SeqCst), 1, "StoreMany was tried again after UNIMPLEMENTED");
    }

    #[test]
    fn a_store_larger_than_a_batch_goes_alone() {
        let mut waiting = queue([store(10)]);
        let (batch, carried) = gather(store(MAX_BATCH_BYTES * 2), &mut waiting);
        assert_eq!(batch.len(), 1);
        assert_eq!(carried.unwrap().response.unwrap().text.len(), 10);
    }
}

//! The in-memory store: a sharded cache with S3-FIFO admission and eviction (quick_cache), bounded
//! both by the encoded size of its entries and by their number, with a time to live per entry.
//!
//! Why not moka (which this used to be): moka's hash table collects the places its evicted entries
//! leave behind by copying the whole table, in one step, on whichever call notices. A full store
//! evicts one entry per store, so at 10,000 stores a second that copy of 100,000 entries ran every
//! few seconds and held the service's thread for milliseconds: every lookup behind it waited.
//! Here each shard is a table of its own, sized up front for its share of `max_entries`, so the
//! rarest and longest step (a shard tidying its table) touches a few thousand entries, not all.
//!
//! Bounded by bytes and entries as [`Bounds`] says. quick_cache has no time to live: an entry
//! carries when it expires, a read past then drops it, and [`MemoryStore::size`] sweeps out the
//! rest.

use std::{
    cell::Cell,
    sync::Arc,
    time::{Duration, Instant},
};

use llmesh_proto::cache::v1::Entry;
use llmesh_util::bounded_cache::Bounds;
use prost::Message as _;
use quick_cache::{
    DefaultHashBuilder, Weighter,
    sync::{Cache, DefaultLifecycle, EntryAction, EntryResult},
};

use super::Size;

#[derive(Debug, Clone)]
struct Stored {
    entry: Arc<Entry>,
    model: Arc<str>,
    /// `None`: a time to live too long to count (it never expires).
    expires_at: Option<Instant>,
    weight: u64,
}

impl Stored {
    fn live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// Weighs an entry by what [`MemoryStore::put`] worked out once.
#[derive(Debug, Clone, Copy)]
struct ByWeight;

impl Weighter<String, Stored> for ByWeight {
    fn weight(&self, _key: &String, value: &Stored) -> u64 {
        value.weight
    }
}

type Entries = Cache<String, Stored, ByWeight, DefaultHashBuilder, DefaultLifecycle<String, Stored>>;

#[derive(Debug, Clone)]
pub struct MemoryStore {
    cache: Arc<Entries>,
    /// What an entry weighs at least: its share of the byte bound.
    floor: u64,
}

impl MemoryStore {
    pub fn new(max_bytes: u64, max_entries: u64, max_entry_bytes: u64) -> anyhow::Result<Self> {
        let bounds = Bounds { max_bytes, max_entries, largest_entry_bytes: max_entry_bytes };
        let options = bounds.options().map_err(|error| anyhow::anyhow!("in-memory cache store: {error}"))?;
        let cache = Cache::with_options(options, ByWeight, DefaultHashBuilder::default(), DefaultLifecycle::default());
        Ok(Self { cache: Arc::new(cache), floor: bounds.floor() })
    }

    pub async fn get(&self, key: &str) -> Option<Arc<Entry>> {
        let stored = self.cache.get(key)?;
        if stored.live(Instant::now()) {
            return Some(stored.entry);
        }
        self.cache.remove_if(key, |stored| !stored.live(Instant::now()));
        None
    }

    /// Stores `entry` under `key`; true when it replaced an entry that had not expired.
    pub async fn put(&self, key: &str, model: &str, entry: Entry, ttl: Duration) -> bool {
        let now = Instant::now();
        let bytes = u64::try_from(entry.encoded_len()).unwrap_or(u64::MAX);
        // The encoded size plus the key (what the entry costs, roughly), but never below the floor.
        let weight = bytes.saturating_add(key.len() as u64).max(self.floor);
        let mut stored =
            Some(Stored { entry: Arc::new(entry), model: model.into(), expires_at: now.checked_add(ttl), weight });
        // One atomic step per key (the shard's lock), so two puts racing cannot both see "nothing
        // there".
        let result = self.cache.entry(key, None, |_, old| {
            let replaced = old.live(now);
            if let Some(new) = stored.take() {
                *old = new;
            }
            EntryAction::Retain(replaced)
        });
        match result {
            EntryResult::Retained(replaced) => replaced,
            EntryResult::Vacant(place) => {
                if let Some(new) = stored.take() {
                    // Refused only when the entry alone outweighs its shard: then it is not kept.
                    let _ = place.insert(new);
                }
                false
            }
            // The callback only retains, and with no timeout there is no waiting to give up.
            EntryResult::Removed(..) | EntryResult::Replaced(..) | EntryResult::Timeout => false,
        }
    }

    pub async fn remove(&self, key: &str) -> u64 {
        let removed = self.cache.remove(key);
        u64::from(removed.is_some_and(|(_, stored)| stored.live(Instant::now())))
    }

    /// Removes every entry of `model`.
    pub async fn remove_model(&self, model: &str) -> u64 {
        let model: Arc<str> = model.into();
        let removed = self.walk("removing a model's entries", move |cache| {
            let now = Instant::now();
            let removed = Cell::new(0);
            cache.retain(|_, stored| {
                let keep = stored.model != model;
                if !keep && stored.live(now) {
                    removed.set(removed.get() + 1);
                }
                keep
            });
            removed.get()
        });
        removed.await.unwrap_or(0)
    }

    /// What the store holds, after sweeping out expired entries.
    pub async fn size(&self) -> Size {
        let sweep = self.walk("sweeping expired cache entries", |cache| {
            let now = Instant::now();
            cache.retain(|_, stored| stored.live(now));
        });
        sweep.await;
        Size { entries: self.cache.len() as u64, bytes: self.cache.weight() }
    }

    /// Runs `walk` over the whole store on a blocking thread, so the service's own threads go on
    /// answering (the walk locks one shard at a time); `None`, logged, when it did not finish.
    async fn walk<T: Send + 'static>(
        &self,
        what: &'static str,
        walk: impl FnOnce(&Entries) -> T + Send + 'static,
    ) -> Option<T> {
        let cache = self.cache.clone();
        match tokio::task::spawn_blocking(move || walk(&cache)).await {
            Ok(done) => Some(done),
            Err(error) => {
                tracing::warn!(%error, "{what} did not finish");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmesh_proto::generation::v1::GenerateResponse;

    fn entry(text: &str) -> Entry {
        Entry { response: Some(GenerateResponse { text: text.into(), ..Default::default() }), ..Default::default() }
    }

    /// Stores `count` entries of `text` under keys `k0`, `k1`, …
    async fn fill(store: &MemoryStore, count: usize, text: &str) {
        for i in 0..count {
            store.put(&format!("k{i}"), "sim", entry(text), Duration::from_secs(60)).await;
        }
    }

    #[tokio::test]
    async fn put_get_remove() {
        let store = MemoryStore::new(1 << 20, 1000, 1 << 16).unwrap();
        assert!(!store.put("k1", "sim", entry("a"), Duration::from_secs(60)).await, "nothing to replace");
        assert!(!store.put("k2", "other", entry("b"), Duration::from_secs(60)).await);
        assert!(store.put("k1", "sim", entry("a"), Duration::from_secs(60)).await, "replaced k1");
        assert_eq!(store.get("k1").await.unwrap().response.as_ref().unwrap().text, "a");
        assert_eq!(store.size().await.entries, 2);
        assert_eq!(store.remove_model("sim").await, 1);
        assert!(store.get("k1").await.is_none());
        assert_eq!(store.remove("k2").await, 1);
        assert_eq!(store.remove("k2").await, 0);
    }

    #[tokio::test]
    async fn entries_expire() {
        let store = MemoryStore::new(1 << 20, 1000, 1 << 16).unwrap();
        store.put("k", "sim", entry("a"), Duration::from_millis(50)).await;
        assert!(store.get("k").await.is_some());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(store.get("k").await.is_none());
    }

    #[tokio::test]
    async fn bounded_by_bytes() {
        let store = MemoryStore::new(10_000, 1000, 1 << 16).unwrap();
        fill(&store, 200, &"x".repeat(500)).await;
        let size = store.size().await;
        assert!(size.bytes <= 10_000, "{size:?}");
        assert!(size.entries < 200, "{size:?}");
    }

    #[tokio::test]
    async fn bounded_by_entries() {
        let store = MemoryStore::new(1 << 20, 50, 1 << 16).unwrap();
        fill(&store, 500, "x").await;
        let size = store.size().await;
        assert!(size.entries <= 50, "{size:?}");
        assert!(size.entries > 0, "{size:?}");
    }

    #[tokio::test]
    async fn an_expired_entry_is_not_replaced_nor_removed_nor_counted() {
        let store = MemoryStore::new(1 << 20, 1000, 1 << 16).unwrap();
        store.put("gone", "sim", entry("a"), Duration::from_millis(20)).await;
        store.put("kept", "sim", entry("b"), Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(store.size().await.entries, 1, "the sweep dropped the expired entry");
        store.put("late", "sim", entry("c"), Duration::from_millis(20)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(store.remove("late").await, 0, "an expired entry is not there to remove");
        store.put("again", "sim", entry("d"), Duration::from_millis(20)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!store.put("again", "sim", entry("e"), Duration::from_secs(60)).await, "nothing live was replaced");
        assert_eq!(store.get("again").await.unwrap().response.as_ref().unwrap().text, "e");
    }

    #[tokio::test]
    async fn a_full_store_keeps_its_bound_while_stores_keep_coming() {
        let store = MemoryStore::new(1 << 20, 5_000, 1 << 16).unwrap();
        fill(&store, 50_000, "x").await;
        let size = store.size().await;
        assert!(size.entries <= 5_000 && size.entries > 2_500, "{size:?}");
        assert!(store.get("k49999").await.is_some(), "the newest entry is kept");
    }
}

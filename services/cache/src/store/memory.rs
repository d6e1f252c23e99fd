//! The in-memory store: TinyLFU admission and LRU eviction (moka), bounded both by the encoded
//! size of its entries and by their number, with a time to live per entry.
//!
//! moka bounds one weight. Each entry weighs at least `max_bytes / max_entries`, so the byte bound
//! also caps the count: many tiny entries cannot grow the map (and its per-entry overhead) past
//! `max_entries`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use llmesh_proto::cache::v1::Entry;
use moka::{Expiry, future::Cache};
use prost::Message as _;

use super::Size;

#[derive(Debug, Clone)]
struct Stored {
    entry: Arc<Entry>,
    model: Arc<str>,
    ttl: Duration,
    bytes: u32,
}

struct PerEntryTtl;

impl Expiry<String, Stored> for PerEntryTtl {
    fn expire_after_create(&self, _key: &String, value: &Stored, _created_at: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Stored,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

#[derive(Debug, Clone)]
pub struct MemoryStore {
    cache: Cache<String, Stored>,
}

impl MemoryStore {
    pub fn new(max_bytes: u64, max_entries: u64) -> Self {
        let floor = u32::try_from(max_bytes / max_entries.max(1)).unwrap_or(u32::MAX);
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            // The encoded size plus the key (what the entry costs, roughly), but never below the floor.
            .weigher(move |key: &String, value: &Stored| value.bytes.saturating_add(key.len() as u32).max(floor))
            .expire_after(PerEntryTtl)
            .build();
        Self { cache }
    }

    pub async fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.cache.get(key).await.map(|stored| stored.entry)
    }

    /// Stores `entry` under `key`; true when it replaced an entry that had not expired.
    pub async fn put(&self, key: &str, model: &str, entry: Entry, ttl: Duration) -> bool {
        let bytes = u32::try_from(entry.encoded_len()).unwrap_or(u32::MAX);
        let stored = Stored { entry: Arc::new(entry), model: model.into(), ttl, bytes };
        // One atomic step per key, so two puts racing cannot both see "nothing there".
        let upserted = self.cache.entry(key.to_string()).and_upsert_with(|_| std::future::ready(stored)).await;
        upserted.is_old_value_replaced()
    }

    pub async fn remove(&self, key: &str) -> u64 {
        u64::from(self.cache.remove(key).await.is_some())
    }

    pub async fn remove_model(&self, model: &str) -> u64 {
        let keys: Vec<Arc<String>> =
            self.cache.iter().filter(|(_, stored)| &*stored.model == model).map(|(key, _)| key).collect();
        let mut removed = 0;
        for key in keys {
            removed += u64::from(self.cache.remove(key.as_str()).await.is_some());
        }
        removed
    }

    pub async fn size(&self) -> Size {
        self.cache.run_pending_tasks().await;
        Size { entries: self.cache.entry_count(), bytes: self.cache.weighted_size() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmesh_proto::generation::v1::GenerateResponse;

    fn entry(text: &str) -> Entry {
        Entry { response: Some(GenerateResponse { text: text.into(), ..Default::default() }), ..Default::default() }
    }

    #[tokio::test]
    async fn put_get_remove() {
        let store = MemoryStore::new(1 << 20, 1000);
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
        let store = MemoryStore::new(1 << 20, 1000);
        store.put("k", "sim", entry("a"), Duration::from_millis(50)).await;
        assert!(store.get("k").await.is_some());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(store.get("k").await.is_none());
    }

    #[tokio::test]
    async fn bounded_by_bytes() {
        let store = MemoryStore::new(10_000, 1000);
        for i in 0..200 {
            store.put(&format!("k{i}"), "sim", entry(&"x".repeat(500)), Duration::from_secs(60)).await;
        }
        let size = store.size().await;
        assert!(size.bytes <= 10_000, "{size:?}");
        assert!(size.entries < 200, "{size:?}");
    }

    #[tokio::test]
    async fn bounded_by_entries() {
        let store = MemoryStore::new(1 << 20, 50);
        for i in 0..500 {
            store.put(&format!("k{i}"), "sim", entry("x"), Duration::from_secs(60)).await;
        }
        let size = store.size().await;
        assert!(size.entries <= 50, "{size:?}");
        assert!(size.entries > 0, "{size:?}");
    }
}

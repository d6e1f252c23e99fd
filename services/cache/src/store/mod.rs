//! Where entries live: a bounded in-memory store (the embedded default) or Redis.

pub mod memory;
pub mod redis;

use std::{sync::Arc, time::Duration};

use llmesh_proto::cache::v1::Entry;

use crate::config::Config;

/// Per-backend statistics the service cannot count by itself.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Size {
    pub entries: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
pub enum Store {
    Memory(memory::MemoryStore),
    Redis(redis::RedisStore),
}

/// A backend failure (Redis down, timed out, corrupt value). The cache treats it as a miss.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(String);

impl StoreError {
    /// The task making a change panicked or was aborted.
    pub fn from_join(error: tokio::task::JoinError) -> Self {
        Self(format!("the change did not finish: {error}"))
    }
}

impl Store {
    /// The Redis store when `redis_url` is set (failing when Redis cannot be reached), the
    /// in-memory store otherwise.
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        if !config.redis_cluster_nodes.is_empty() {
            return Ok(Self::Redis(redis::RedisStore::connect_cluster(&config.redis_cluster_nodes, config).await?));
        }
        match &config.redis_url {
            Some(url) => Ok(Self::Redis(redis::RedisStore::connect(url, config).await?)),
            None => Ok(Self::Memory(memory::MemoryStore::new(
                config.memory_max_bytes,
                config.memory_max_entries,
                u64::try_from(config.max_entry_bytes).unwrap_or(u64::MAX),
            )?)),
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Arc<Entry>>, StoreError> {
        match self {
            Self::Memory(store) => Ok(store.get(key).await),
            Self::Redis(store) => store.get(key).await,
        }
    }

    /// Stores `entry` under `key`; true when it replaced an entry still in the store (which a
    /// near cache may hold a copy of).
    pub async fn put(&self, key: &str, model: &str, entry: Entry, ttl: Duration) -> Result<bool, StoreError> {
        match self {
            Self::Memory(store) => Ok(store.put(key, model, entry, ttl).await),
            Self::Redis(store) => store.put(key, model, &entry, ttl).await,
        }
    }

    pub async fn remove(&self, key: &str) -> Result<u64, StoreError> {
        match self {
            Self::Memory(store) => Ok(store.remove(key).await),
            Self::Redis(store) => store.remove(key).await,
        }
    }

    pub async fn remove_model(&self, model: &str) -> Result<u64, StoreError> {
        match self {
            Self::Memory(store) => Ok(store.remove_model(model).await),
            Self::Redis(store) => store.remove_model(model).await,
        }
    }

    pub async fn size(&self) -> Result<Size, StoreError> {
        match self {
            Self::Memory(store) => Ok(store.size().await),
            Self::Redis(store) => store.size().await,
        }
    }
}

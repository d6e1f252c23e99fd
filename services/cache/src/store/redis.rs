//! The Redis store. Values are encoded `llmesh.cache.v1.Entry` messages under
//! `llmesh:cache:v1:<key>`; a set per model (`llmesh:cache:v1:model:<model>`) lists its keys so a
//! whole model can be invalidated.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use llmesh_proto::cache::v1::Entry;
use prost::Message as _;
use redis::{AsyncCommands as _, aio::ConnectionManager};

use super::{Size, StoreError};
use crate::config::Config;

const PREFIX: &str = "llmesh:cache:v1:";

#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

impl From<redis::RedisError> for StoreError {
    fn from(error: redis::RedisError) -> Self {
        Self(format!("redis: {error}"))
    }
}

fn entry_key(key: &str) -> String {
    format!("{PREFIX}{key}")
}

fn model_key(model: &str) -> String {
    format!("{PREFIX}model:{model}")
}

impl RedisStore {
    /// Connects, and checks with a PING that Redis answers. Fails naming the URL (without its
    /// password) when it does not within the connect timeout.
    pub async fn connect(url: &str, config: &Config) -> anyhow::Result<Self> {
        let shown = redact(url);
        let client = redis::Client::open(url).with_context(|| format!("invalid redis_url {shown}"))?;
        let connect_timeout = Duration::from_millis(config.redis_connect_timeout_ms);
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(Duration::from_millis(config.redis_response_timeout_ms)))
            .set_number_of_retries(2);
        let connect = async {
            let mut conn = ConnectionManager::new_with_config(client, manager_config).await?;
            let _: String = redis::cmd("PING").query_async(&mut conn).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        let conn = tokio::time::timeout(connect_timeout, connect)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {} ms", connect_timeout.as_millis()))
            .and_then(|r| r.map_err(anyhow::Error::from))
            .with_context(|| format!("cannot reach redis at {shown}"))?;
        Ok(Self { conn })
    }

    pub async fn get(&self, key: &str) -> Result<Option<Arc<Entry>>, StoreError> {
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = conn.get(entry_key(key)).await?;
        value
            .map(|bytes| {
                Entry::decode(bytes.as_slice())
                    .map(Arc::new)
                    .map_err(|error| StoreError(format!("corrupt entry {key}: {error}")))
            })
            .transpose()
    }

    pub async fn put(&self, key: &str, model: &str, entry: &Entry, ttl: Duration) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let index = model_key(model);
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(entry_key(key))
            .arg(entry.encode_to_vec())
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .cmd("SADD")
            .arg(&index)
            .arg(key)
            .ignore()
            // The index lives as long as its longest-lived entry.
            .cmd("PEXPIRE")
            .arg(&index)
            .arg(ttl_ms)
            .arg("GT")
            .ignore()
            .cmd("PEXPIRE")
            .arg(&index)
            .arg(ttl_ms)
            .arg("NX")
            .ignore()
            .exec_async(&mut conn)
            .await?;
        Ok(())
    }

    pub async fn remove(&self, key: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.del(entry_key(key)).await?)
    }

    pub async fn remove_model(&self, model: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let index = model_key(model);
        let keys: Vec<String> = conn.smembers(&index).await?;
        let mut removed = 0;
        for chunk in keys.chunks(500) {
            let entry_keys: Vec<String> = chunk.iter().map(|k| entry_key(k)).collect();
            removed += conn.del::<_, u64>(entry_keys).await?;
        }
        let _: u64 = conn.del(&index).await?;
        Ok(removed)
    }

    /// Counts entries and their bytes with SCAN and MEMORY USAGE: fine for an occasional Stats
    /// call, not for a hot path.
    pub async fn size(&self) -> Result<Size, StoreError> {
        let mut conn = self.conn.clone();
        let mut size = Size::default();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{PREFIX}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            for key in keys.iter().filter(|k| !k.starts_with(&model_key(""))) {
                size.entries += 1;
                let bytes: Option<u64> = redis::cmd("MEMORY").arg("USAGE").arg(key).query_async(&mut conn).await?;
                size.bytes += bytes.unwrap_or(0);
            }
            cursor = next;
            if cursor == 0 {
                return Ok(size);
            }
        }
    }
}

/// The URL with any password replaced, for logs and errors.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("redis://:secret@host:6379/0"), "redis://***@host:6379/0");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}

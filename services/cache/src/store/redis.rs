//! The Redis store, on one Redis or a Redis Cluster. Values are encoded `llmesh.cache.v1.Entry`
//! messages under `llmesh:cache:v1:<key>`; a set per model (`llmesh:cache:v1:model:<model>`) lists
//! its keys so a whole model can be invalidated. On one Redis the entry and its key's place in the
//! set are written in one transaction. On a cluster they live in different slots, which no
//! transaction may cross, so the set is written first: a put cut short between the two (the caller
//! gave up, the connection dropped) leaves at worst a name in the set without an entry, never an
//! entry that Invalidate-by-model cannot find.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use llmesh_proto::cache::v1::Entry;
use prost::Message as _;
use redis::{
    AsyncCommands as _,
    aio::ConnectionManager,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
};

use super::{Size, StoreError};
use crate::config::Config;

const PREFIX: &str = "llmesh:cache:v1:";

#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
}

/// One Redis (reconnecting on its own) or a cluster (following its slots on its own): the store's
/// commands are the same over either.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
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

/// Connects with `connect` and checks the connection with a PING, all within `timeout`; an error
/// names `target`.
async fn checked<C: redis::aio::ConnectionLike>(
    timeout: Duration,
    target: String,
    connect: impl Future<Output = redis::RedisResult<C>>,
) -> anyhow::Result<C> {
    let ping = async {
        let mut conn = connect.await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok::<_, redis::RedisError>(conn)
    };
    tokio::time::timeout(timeout, ping)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {} ms", timeout.as_millis()))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("cannot reach {target}"))
}

/// How much longer than its longest-lived entry a model's index lives.
const INDEX_TTL_MARGIN_MS: u64 = 1_000;

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
        let shown = llmesh_util::redact::redact_url(url);
        let client = llmesh_util::redis::client(url).with_context(|| format!("invalid redis_url {shown}"))?;
        let connect_timeout = Duration::from_millis(config.redis_connect_timeout_ms);
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(Duration::from_millis(config.redis_response_timeout_ms)))
            .set_number_of_retries(2);
        let conn = checked(
            connect_timeout,
            format!("redis at {shown}"),
            ConnectionManager::new_with_config(client, manager_config),
        )
        .await?;
        Ok(Self { conn: Conn::Single(conn) })
    }

    /// Connects to a Redis Cluster through any of `nodes`, and checks it answers.
    pub async fn connect_cluster(nodes: &[String], config: &Config) -> anyhow::Result<Self> {
        let shown: Vec<String> = nodes.iter().map(|n| llmesh_util::redact::redact_url(n)).collect();
        let connect_timeout = Duration::from_millis(config.redis_connect_timeout_ms);
        let mut builder = redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
            .connection_timeout(connect_timeout)
            .response_timeout(Duration::from_millis(config.redis_response_timeout_ms));
        // A CA of the cluster's own (`rediss://...?tls_ca=`), a password from a file: the first
        // seed's hold for every node.
        if let Some(first) = nodes.first() {
            let invalid = || format!("invalid redis_cluster_nodes {shown:?}");
            if let Some(certificates) = llmesh_util::redis::tls_certificates(first).with_context(invalid)? {
                builder = builder.certs(certificates);
            }
            if let Some(password) = llmesh_util::redis::password(first).with_context(invalid)? {
                builder = builder.password(password);
            }
        }
        let client = builder.build().with_context(|| format!("invalid redis_cluster_nodes {shown:?}"))?;
        let conn =
            checked(connect_timeout, format!("the redis cluster at {shown:?}"), client.get_async_connection()).await?;
        Ok(Self { conn: Conn::Cluster(conn) })
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

    /// Stores `entry`; true when it replaced an entry (SET's GET answers the old value, in the same
    /// atomic step as the write, so two replicas' racing puts cannot both see nothing there).
    pub async fn put(&self, key: &str, model: &str, entry: &Entry, ttl: Duration) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let index = model_key(model);
        // The index outlives its longest-lived entry (by a margin: on a cluster it is written
        // first, a moment before the entry).
        let index_ttl_ms = ttl_ms.saturating_add(INDEX_TTL_MARGIN_MS);
        let mut index_pipe = redis::pipe();
        index_pipe
            .cmd("SADD")
            .arg(&index)
            .arg(key)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&index)
            .arg(index_ttl_ms)
            .arg("GT")
            .ignore()
            .cmd("PEXPIRE")
            .arg(&index)
            .arg(index_ttl_ms)
            .arg("NX")
            .ignore();
        let mut set = redis::cmd("SET");
        set.arg(entry_key(key)).arg(entry.encode_to_vec()).arg("PX").arg(ttl_ms).arg("GET");
        let old: redis::Value = match self.conn {
            Conn::Single(_) => {
                let (old,) = index_pipe.atomic().add_command(set).query_async(&mut conn).await?;
                old
            }
            Conn::Cluster(_) => {
                index_pipe.exec_async(&mut conn).await?;
                set.query_async(&mut conn).await?
            }
        };
        Ok(!matches!(old, redis::Value::Nil))
    }

    /// Publishes `message` on `channel` (on a cluster, every node relays it to its subscribers).
    pub async fn publish(&self, channel: &str, message: Vec<u8>) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _receivers: u64 = conn.publish(channel, message).await?;
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
        // One Redis takes many keys at once; on a cluster they may sit in different slots.
        let chunk = if matches!(self.conn, Conn::Single(_)) { 500 } else { 1 };
        for chunk in keys.chunks(chunk) {
            let entry_keys: Vec<String> = chunk.iter().map(|k| entry_key(k)).collect();
            removed += conn.del::<_, u64>(entry_keys).await?;
        }
        let _: u64 = conn.del(&index).await?;
        Ok(removed)
    }

    /// Counts entries and their bytes with SCAN and MEMORY USAGE, on every primary of a cluster:
    /// fine for an occasional Stats call (every 10 s for the gauges), not for a hot path.
    pub async fn size(&self) -> Result<Size, StoreError> {
        let mut size = Size::default();
        match &self.conn {
            Conn::Single(_) => self.count(None, &mut size).await?,
            Conn::Cluster(conn) => {
                for slot in primaries(&mut conn.clone()).await? {
                    let primary = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                    self.count(Some(primary), &mut size).await?;
                }
            }
        }
        Ok(size)
    }

    /// Adds the entries of one node (`None`: the only one) to `size`.
    async fn count(&self, node: Option<SingleNodeRoutingInfo>, size: &mut Size) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor).arg("MATCH").arg(format!("{PREFIX}*")).arg("COUNT").arg(1000);
            let (next, keys): (u64, Vec<String>) = match (&node, &mut conn) {
                (Some(node), Conn::Cluster(cluster)) => {
                    let reply = cluster.route_command(scan, RoutingInfo::SingleNode(node.clone())).await?;
                    redis::from_redis_value(reply).map_err(|error| StoreError(format!("SCAN reply: {error}")))?
                }
                _ => scan.query_async(&mut conn).await?,
            };
            for key in keys.iter().filter(|k| !k.starts_with(&model_key(""))) {
                size.entries += 1;
                // Routed by the key's slot on a cluster: the node just scanned.
                let bytes: Option<u64> = redis::cmd("MEMORY").arg("USAGE").arg(key).query_async(&mut conn).await?;
                size.bytes += bytes.unwrap_or(0);
            }
            cursor = next;
            if cursor == 0 {
                return Ok(());
            }
        }
    }
}

/// One slot of each primary that serves slots, from CLUSTER NODES (lines of `<id> <address>
/// <flags> <primary> <ping> <pong> <epoch> <link> <slot ranges>...`). A command routed to a slot
/// reaches its primary whatever name or address the cluster announces it by.
async fn primaries(conn: &mut redis::cluster_async::ClusterConnection) -> Result<Vec<u16>, StoreError> {
    let reply = conn
        .route_command(
            redis::cmd("CLUSTER").arg("NODES").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    let text: String = redis::from_redis_value(reply).map_err(|error| StoreError(format!("CLUSTER NODES: {error}")))?;
    Ok(parse_primaries(&text))
}

fn parse_primaries(nodes: &str) -> Vec<u16> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags: Vec<&str> = fields.get(2)?.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail") || *f == "handshake") {
                return None;
            }
            // Ranges ("0-5460") or single slots; "[slot->-id]" marks a slot being moved.
            fields.iter().skip(8).find_map(|range| range.split('-').next()?.parse().ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primaries_are_read_from_cluster_nodes() {
        let nodes = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host-a slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master,fail - 0 1426238318243 3 connected 10923-16383
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
5a1b2c3d4e5f60718293a4b5c6d7e8f901234567 127.0.0.1:30005@31005 master - 0 0 5 connected
6a1b2c3d4e5f60718293a4b5c6d7e8f901234567 node-6:30006@31006 master - 0 0 6 connected [93->-5a1b] 16000
";
        // Up primaries with slots only (the one without slots has nothing to count).
        assert_eq!(parse_primaries(nodes), [5461, 0, 16000]);
    }
}

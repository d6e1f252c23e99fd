//! The near cache: recent hits kept in the gateway's own memory, so a repeated request is answered
//! without a call to the cache service (one hop instead of two).
//!
//! It must not answer with something the cache service has replaced or removed (an entry evicted
//! for space is not announced: its copy lives out its freshness). So it follows the service's
//! change feed (`WatchChanges`) and:
//! - serves only while the feed is live: a change it cannot see could be about any entry; a feed
//!   silent for [`FEED_SILENCE`] counts as ended (the service sends a heartbeat every second);
//! - drops everything when the feed starts (changes before it were not seen) and when it ends;
//! - keeps an answer no longer than the service said it stays fresh, and at most `max_ttl` (which
//!   bounds the harm of a change that never reached the feed);
//! - keeps an answer read from the service only when no change arrived while it was being read:
//!   that change may have been about it, and applying it came before the answer was kept.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use llmesh_proto::cache::v1::{
    LookupResponse, WatchChangesRequest, cache_client::CacheClient, watch_changes_response::Change,
};
use prost::Message as _;
use tonic::{Code, transport::Channel};

use crate::{
    cache::CacheConfig,
    metrics::{label, metrics},
};

#[derive(Debug)]
pub struct NearCache {
    entries: moka::sync::Cache<String, Arc<Held>>,
    /// Bumped by every change applied, and whenever the feed starts or stops.
    epoch: AtomicU64,
    /// Whether the feed is live: only then are answers served or kept.
    live: AtomicBool,
    max_ttl: Duration,
}

#[derive(Debug)]
struct Held {
    answer: LookupResponse,
    kept_at: Instant,
    ttl: Duration,
    bytes: u32,
}

/// The state of the feed when a read from the cache service began, and when it began (the entry's
/// freshness is counted from there); see [`NearCache::keep`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    epoch: u64,
    at: Instant,
}

struct HeldTtl;

impl moka::Expiry<String, Arc<Held>> for HeldTtl {
    fn expire_after_create(&self, _: &String, held: &Arc<Held>, _: Instant) -> Option<Duration> {
        Some(held.ttl)
    }
}

impl NearCache {
    /// The near cache `config` asks for, or `None` when it is off.
    pub fn new(config: &CacheConfig) -> Option<Self> {
        if config.near_max_entries == 0 || config.near_max_bytes == 0 {
            return None;
        }
        // Each entry weighs at least its share of the byte bound, so the count is bounded too.
        let floor = u32::try_from(config.near_max_bytes / config.near_max_entries).unwrap_or(u32::MAX);
        let entries = moka::sync::Cache::builder()
            .max_capacity(config.near_max_bytes)
            .weigher(move |key: &String, held: &Arc<Held>| held.bytes.saturating_add(key.len() as u32).max(floor))
            .expire_after(HeldTtl)
            .build();
        Some(Self {
            entries,
            epoch: AtomicU64::new(0),
            live: AtomicBool::new(false),
            max_ttl: Duration::from_millis(config.near_max_ttl_ms),
        })
    }

    /// The answer kept under `key`, with its age and freshness brought up to now.
    pub fn get(&self, key: &str) -> Option<LookupResponse> {
        if !self.live.load(SeqCst) {
            return None;
        }
        let held = self.entries.get(key)?;
        let elapsed = held.kept_at.elapsed();
        let mut answer = held.answer.clone();
        answer.age_ms = answer.age_ms.saturating_add(millis(elapsed));
        answer.fresh_for_ms = millis(held.ttl.saturating_sub(elapsed));
        Some(answer)
    }

    /// Taken before reading from the cache service; `None` while the feed is not live.
    pub fn ticket(&self) -> Option<Ticket> {
        self.live.load(SeqCst).then(|| Ticket { epoch: self.epoch.load(SeqCst), at: Instant::now() })
    }

    /// Keeps a fresh answer read from the cache service, unless a change arrived since `ticket`.
    pub fn keep(&self, ticket: Ticket, answer: &LookupResponse) {
        if !answer.hit || answer.stale || answer.fresh_for_ms == 0 || answer.response.is_none() {
            return;
        }
        if self.epoch.load(SeqCst) != ticket.epoch {
            return;
        }
        // Counted from before the read: the service measured the freshness then, not on arrival.
        let ttl = Duration::from_millis(answer.fresh_for_ms).min(self.max_ttl).saturating_sub(ticket.at.elapsed());
        if ttl.is_zero() {
            return;
        }
        let held = Held { answer: answer.clone(), kept_at: Instant::now(), ttl, bytes: weight(answer) };
        self.entries.insert(answer.key.clone(), Arc::new(held));
        // A change applied between the check and the insert bumped the epoch before dropping
        // entries: either it dropped this one, or this sees the bump and drops it.
        if self.epoch.load(SeqCst) != ticket.epoch {
            self.entries.invalidate(&answer.key);
        }
    }

    /// Drops the copy under `key` (this gateway is storing a new answer for it).
    pub fn forget(&self, key: &str) {
        self.epoch.fetch_add(1, SeqCst);
        self.entries.invalidate(key);
    }

    fn forget_all(&self) {
        self.epoch.fetch_add(1, SeqCst);
        self.entries.invalidate_all();
    }

    /// Applies one message of the feed.
    fn apply(&self, change: Option<Change>) {
        match change {
            Some(Change::Key(key)) => self.forget(&key),
            // The first message of every feed: start from nothing, and serve from now on.
            Some(Change::Everything(_)) => {
                self.forget_all();
                self.live.store(true, SeqCst);
            }
            // A model's entries: this cache does not index by model, and such changes are rare.
            Some(Change::Model(_)) | None => self.forget_all(),
            Some(Change::Heartbeat(_)) => {}
        }
    }

    /// The feed ended: nothing is served until the next one starts.
    fn go_dark(&self) {
        self.live.store(false, SeqCst);
        self.forget_all();
    }

    /// Entries kept (moka counts lazily).
    #[cfg(test)]
    fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Follows the cache service's change feed for as long as the returned task runs, watching
    /// again (with backoff) whenever a feed ends.
    pub fn follow(self: &Arc<Self>, client: CacheClient<Channel>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(follow(self.clone(), client))
    }
}

/// What a kept answer costs in memory, roughly: its encoded size, plus a string's header and
/// allocation slack for each streamed chunk (many small chunks cost more than their bytes).
fn weight(answer: &LookupResponse) -> u32 {
    const PER_CHUNK: usize = std::mem::size_of::<String>() + 16;
    let bytes = answer.encoded_len().saturating_add(answer.chunks.len().saturating_mul(PER_CHUNK));
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often to ask again a cache service that has no change feed (it may be upgraded).
const UNIMPLEMENTED_PAUSE: Duration = Duration::from_secs(60);
/// A feed with no message for this long is dead, even if its connection looks open: the service
/// sends a heartbeat after every quiet second.
const FEED_SILENCE: Duration = Duration::from_secs(3);

async fn follow(near: Arc<NearCache>, mut client: CacheClient<Channel>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let ended = match client.watch_changes(WatchChangesRequest {}).await {
            Ok(response) => {
                let mut feed = response.into_inner();
                let mut silent = false;
                let ended = loop {
                    let Ok(next) = tokio::time::timeout(FEED_SILENCE, feed.message()).await else {
                        silent = true;
                        break Some(tonic::Status::unavailable(format!("no message for {FEED_SILENCE:?}")));
                    };
                    match next {
                        Ok(Some(message)) => {
                            if !near.live.load(SeqCst) {
                                tracing::info!("near cache following the cache service's changes");
                                backoff = FIRST_BACKOFF;
                            }
                            near.apply(message.change);
                        }
                        Ok(None) => break None,
                        Err(status) => break Some(status),
                    }
                };
                if near.live.load(SeqCst) {
                    tracing::warn!(reason = ?ended.as_ref().map(|s| s.message()), "near cache off: the cache service's change feed ended");
                    let reason = if silent { "silent" } else { "ended" };
                    metrics().near_cache_resets.add(1, &[label("reason", reason)]);
                }
                ended
            }
            Err(status) => Some(status),
        };
        near.go_dark();
        let pause = match ended {
            Some(status) if status.code() == Code::Unimplemented => {
                tracing::warn!("the cache service has no change feed (an older version): near cache off");
                UNIMPLEMENTED_PAUSE
            }
            _ => backoff,
        };
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use llmesh_proto::generation::v1::GenerateResponse;

    use super::*;

    fn near() -> NearCache {
        let config = CacheConfig { near_max_entries: 100, near_max_bytes: 1 << 20, ..CacheConfig::default() };
        let near = NearCache::new(&config).unwrap();
        near.apply(Some(Change::Everything(true)));
        near
    }

    fn answer(key: &str, fresh_for_ms: u64) -> LookupResponse {
        LookupResponse {
            hit: true,
            key: key.into(),
            response: Some(GenerateResponse { text: format!("answer {key}"), ..Default::default() }),
            age_ms: 5,
            fresh_for_ms,
            ..Default::default()
        }
    }

    #[test]
    fn keeps_fresh_hits_and_serves_them_while_live() {
        let near = near();
        let ticket = near.ticket().unwrap();
        near.keep(ticket, &answer("a", 10_000));
        let got = near.get("a").unwrap();
        assert_eq!(got.response.unwrap().text, "answer a");
        assert!(got.age_ms >= 5 && got.fresh_for_ms <= 10_000);
        assert!(near.get("b").is_none());
        // Stale or misses are not kept.
        near.keep(ticket, &LookupResponse { stale: true, ..answer("s", 10_000) });
        near.keep(ticket, &LookupResponse { hit: false, ..answer("m", 10_000) });
        near.keep(ticket, &answer("z", 0));
        assert!(near.get("s").is_none() && near.get("m").is_none() && near.get("z").is_none());
    }

    #[test]
    fn nothing_is_served_or_kept_unless_the_feed_is_live() {
        let config = CacheConfig { near_max_entries: 100, near_max_bytes: 1 << 20, ..CacheConfig::default() };
        let near = NearCache::new(&config).unwrap();
        assert!(near.ticket().is_none(), "no feed yet");
        near.apply(Some(Change::Everything(true)));
        near.keep(near.ticket().unwrap(), &answer("a", 10_000));
        assert!(near.get("a").is_some());
        near.go_dark();
        assert!(near.get("a").is_none() && near.ticket().is_none());
        // A new feed starts from nothing.
        near.apply(Some(Change::Everything(true)));
        assert!(near.get("a").is_none());
    }

    #[test]
    fn a_change_during_a_read_means_the_answer_is_not_kept() {
        let near = near();
        let ticket = near.ticket().unwrap();
        // A change to anything arrives while the read is in flight.
        near.apply(Some(Change::Key("other".into())));
        near.keep(ticket, &answer("a", 10_000));
        assert!(near.get("a").is_none());
    }

    #[test]
    fn changes_drop_copies() {
        let near = near();
        for key in ["a", "b", "c"] {
            near.keep(near.ticket().unwrap(), &answer(key, 10_000));
        }
        near.apply(Some(Change::Key("a".into())));
        assert!(near.get("a").is_none() && near.get("b").is_some());
        near.apply(Some(Change::Model("sim".into())));
        assert!(near.get("b").is_none() && near.get("c").is_none());
        near.keep(near.ticket().unwrap(), &answer("d", 10_000));
        near.forget("d");
        assert!(near.get("d").is_none());
    }

    #[test]
    fn copies_expire_with_the_entry_or_the_cap() {
        let config = CacheConfig {
            near_max_entries: 100,
            near_max_bytes: 1 << 20,
            near_max_ttl_ms: 500,
            ..CacheConfig::default()
        };
        let near = NearCache::new(&config).unwrap();
        near.apply(Some(Change::Everything(true)));
        near.keep(near.ticket().unwrap(), &answer("short", 200));
        near.keep(near.ticket().unwrap(), &answer("capped", 10_000));
        assert!(near.get("short").is_some() && near.get("capped").is_some());
        std::thread::sleep(Duration::from_millis(300));
        assert!(near.get("short").is_none(), "past the entry's freshness");
        assert!(near.get("capped").is_some());
        std::thread::sleep(Duration::from_millis(300));
        assert!(near.get("capped").is_none(), "past near_max_ttl_ms");
    }

    #[test]
    fn freshness_counts_from_before_the_read() {
        let near = near();
        let ticket = near.ticket().unwrap();
        // The read took longer than the entry had left when the service answered.
        std::thread::sleep(Duration::from_millis(30));
        near.keep(ticket, &answer("late", 20));
        assert!(near.get("late").is_none());
        near.apply(Some(Change::Heartbeat(true)));
        near.keep(near.ticket().unwrap(), &answer("kept", 10_000));
        near.apply(Some(Change::Heartbeat(true)));
        assert!(near.get("kept").is_some(), "a heartbeat changes nothing");
    }

    #[test]
    fn bounded_by_entries() {
        let config = CacheConfig { near_max_entries: 10, near_max_bytes: 1 << 20, ..CacheConfig::default() };
        let near = NearCache::new(&config).unwrap();
        near.apply(Some(Change::Everything(true)));
        for i in 0..100 {
            near.keep(near.ticket().unwrap(), &answer(&format!("k{i}"), 10_000));
        }
        assert!(near.len() <= 10, "{} entries", near.len());
    }

    #[test]
    fn off_when_configured_so() {
        let config = CacheConfig { near_max_entries: 0, ..CacheConfig::default() };
        assert!(NearCache::new(&config).is_none());
    }
}

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
use llmesh_util::bounded_cache::Bounds;
use prost::Message as _;
use quick_cache::{
    DefaultHashBuilder, Weighter,
    sync::{Cache, DefaultLifecycle},
};
use tonic::{Code, transport::Channel};

use crate::{
    cache::CacheConfig,
    metrics::{label, metrics},
};

/// The copies: sharded, S3-FIFO (quick_cache), weighed in bytes. Not moka: its table is tidied by
/// copying all of it at once on whichever call notices, which under steady eviction held the
/// gateway's thread for milliseconds (see the cache service's in-memory store).
type Copies = Cache<String, Arc<Held>, ByWeight, DefaultHashBuilder, DefaultLifecycle<String, Arc<Held>>>;

#[derive(Debug)]
pub struct NearCache {
    entries: Copies,
    /// Bumped by every change applied, and whenever the feed starts or stops.
    epoch: AtomicU64,
    /// Bumped when every copy is dropped at once: a copy kept before is never served again, and
    /// eviction reclaims its room (so dropping everything costs nothing on the feed's thread).
    generation: AtomicU64,
    /// Whether the feed is live: only then are answers served or kept.
    live: AtomicBool,
    max_ttl: Duration,
    /// What a copy weighs at least: its share of the byte bound, so the count is bounded too.
    floor: u64,
}

#[derive(Debug)]
struct Held {
    answer: LookupResponse,
    kept_at: Instant,
    ttl: Duration,
    generation: u64,
    weight: u64,
}

impl Held {
    /// Whether the copy may still be served: fresh, and kept since everything was last dropped.
    fn servable(&self, generation: u64) -> bool {
        self.kept_at.elapsed() < self.ttl && self.generation == generation
    }
}

/// Weighs a copy by what [`NearCache::keep`] worked out once.
#[derive(Debug, Clone, Copy)]
struct ByWeight;

impl Weighter<String, Arc<Held>> for ByWeight {
    fn weight(&self, _key: &String, held: &Arc<Held>) -> u64 {
        held.weight
    }
}

/// No answer read from the cache service is larger: tonic's default limit on a decoded message.
const LARGEST_ANSWER_BYTES: u64 = 4 << 20;

/// The state of the feed when a read from the cache service began, and when it began (the entry's
/// freshness is counted from there); see [`NearCache::keep`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    epoch: u64,
    at: Instant,
}

impl NearCache {
    /// The near cache `config` asks for, or `None` when it is off; an error when its bounds make
    /// no cache.
    pub fn new(config: &CacheConfig) -> anyhow::Result<Option<Self>> {
        let (max_entries, max_bytes) = (config.near_max_entries, config.near_max_bytes);
        if max_entries == 0 || max_bytes == 0 {
            return Ok(None);
        }
        let bounds = Bounds { max_bytes, max_entries, largest_entry_bytes: LARGEST_ANSWER_BYTES };
        let options = bounds.options().map_err(|error| anyhow::anyhow!("near cache: {error}"))?;
        Ok(Some(Self {
            entries: Cache::with_options(options, ByWeight, DefaultHashBuilder::default(), DefaultLifecycle::default()),
            epoch: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            live: AtomicBool::new(false),
            max_ttl: Duration::from_millis(config.near_max_ttl_ms),
            floor: bounds.floor(),
        }))
    }

    /// The answer kept under `key`, with its age and freshness brought up to now.
    pub fn get(&self, key: &str) -> Option<LookupResponse> {
        if !self.live.load(SeqCst) {
            return None;
        }
        let held = self.entries.get(key)?;
        let generation = self.generation.load(SeqCst);
        if !held.servable(generation) {
            self.entries.remove_if(key, |held| !held.servable(generation));
            return None;
        }
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
        let weight = weight(answer).saturating_add(answer.key.len() as u64).max(self.floor);
        let generation = self.generation.load(SeqCst);
        let held = Held { answer: answer.clone(), kept_at: Instant::now(), ttl, generation, weight };
        self.entries.insert(answer.key.clone(), Arc::new(held));
        // A change applied between the check and the insert bumped the epoch before dropping
        // entries: either it dropped this one, or this sees the bump and drops it.
        if self.epoch.load(SeqCst) != ticket.epoch {
            self.entries.remove(&answer.key);
        }
    }

    /// Drops the copy under `key` (this gateway is storing a new answer for it).
    pub fn forget(&self, key: &str) {
        self.epoch.fetch_add(1, SeqCst);
        self.entries.remove(key);
    }

    fn forget_all(&self) {
        self.epoch.fetch_add(1, SeqCst);
        self.generation.fetch_add(1, SeqCst);
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

    /// Copies held, servable or not.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Follows the cache service's change feed for as long as the returned task runs, watching
    /// again (with backoff) whenever a feed ends.
    pub fn follow(self: &Arc<Self>, client: CacheClient<Channel>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(follow(self.clone(), client))
    }
}

/// What a kept answer costs in memory, roughly: its encoded size, plus a string's header and
/// allocation slack for each streamed chunk (many small chunks cost more than their bytes).
fn weight(answer: &LookupResponse) -> u64 {
    const PER_CHUNK: usize = std::mem::size_of::<String>() + 16;
    let bytes = answer.encoded_len().saturating_add(answer.chunks.len().saturating_mul(PER_CHUNK));
    u64::try_from(bytes).unwrap_or(u64::MAX)
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
        let near = NearCache::new(&config).unwrap().unwrap();
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
        let near = NearCache::new(&config).unwrap().unwrap();
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
        assert_eq!(near.len(), 0, "a copy dropped with everything goes when it is next asked for");
        near.keep(near.ticket().unwrap(), &answer("b", 10_000));
        assert!(near.get("b").is_some(), "kept again after everything was dropped");
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
        let near = NearCache::new(&config).unwrap().unwrap();
        near.apply(Some(Change::Everything(true)));
        near.keep(near.ticket().unwrap(), &answer("short", 200));
        near.keep(near.ticket().unwrap(), &answer("capped", 10_000));
        assert!(near.get("short").is_some() && near.get("capped").is_some());
        std::thread::sleep(Duration::from_millis(300));
        assert!(near.get("short").is_none(), "past the entry's freshness");
        assert_eq!(near.len(), 1, "an expired copy goes when it is next asked for");
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
    fn a_full_near_cache_keeps_its_bounds_while_copies_keep_coming() {
        for (max_entries, copies) in [(10, 100), (5_000, 50_000)] {
            let config =
                CacheConfig { near_max_entries: max_entries, near_max_bytes: 1 << 20, ..CacheConfig::default() };
            let near = NearCache::new(&config).unwrap().unwrap();
            near.apply(Some(Change::Everything(true)));
            for i in 0..copies {
                near.keep(near.ticket().unwrap(), &answer(&format!("k{i}"), 10_000));
            }
            let held = near.len() as u64;
            assert!(held <= max_entries && held > max_entries / 2, "{held} of {max_entries}");
            assert!(near.entries.weight() <= 1 << 20);
            assert!(near.get(&format!("k{}", copies - 1)).is_some(), "the newest copy is kept");
        }
    }

    #[test]
    fn off_when_configured_so() {
        let config = CacheConfig { near_max_entries: 0, ..CacheConfig::default() };
        assert!(NearCache::new(&config).unwrap().is_none());
    }
}

//! The bounds of an in-memory cache on quick_cache (the cache service's store, the gateway's near
//! cache): a byte bound and an entry bound, and how many shards.
//!
//! quick_cache bounds one weight. Each entry weighs at least its share of the byte bound
//! ([`Bounds::floor`]), so the byte bound also caps the count: many tiny entries cannot grow the
//! map (and its per-entry overhead) past `max_entries`.
//!
//! A shard is a hash table of its own, sized up front, and the longest step of a sharded cache (a
//! shard tidying its table) touches one shard: so a shard holds a few thousand entries, not all of
//! them. A shard also bounds its own share of the bytes and refuses an entry heavier than that
//! share, so each must still hold a few of the largest entries.

use quick_cache::{Options, OptionsBuilder};

/// A cache's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub max_bytes: u64,
    /// At least 1 is used.
    pub max_entries: u64,
    /// The weight of the largest entry the cache must be able to hold.
    pub largest_entry_bytes: u64,
}

impl Bounds {
    /// quick_cache's options for these bounds (entries weighed in bytes).
    pub fn options(&self) -> Result<Options, String> {
        let max_entries = self.max_entries.max(1);
        OptionsBuilder::new()
            .shards(shard_count(self.max_bytes, max_entries, self.largest_entry_bytes))
            .estimated_items_capacity(usize::try_from(max_entries).unwrap_or(usize::MAX))
            .weight_capacity(self.max_bytes)
            .build()
            .map_err(|error| error.to_string())
    }

    /// What an entry weighs at least: its share of the byte bound, rounded up, so the byte bound
    /// never lets more than `max_entries` in.
    pub fn floor(&self) -> u64 {
        self.max_bytes.div_ceil(self.max_entries.max(1)).max(1)
    }
}

/// A shard is sized for about this many entries: few enough that tidying its table is short.
const ENTRIES_PER_SHARD: u64 = 2048;
const MAX_SHARDS: u64 = 64;
/// Each shard holds at least this many of the largest entries.
const LARGEST_ENTRIES_PER_SHARD: u64 = 4;

/// The shards of a cache bounded by `max_bytes` and `max_entries` whose entries weigh at most
/// `largest_entry_bytes`: a power of two between 1 and 64.
fn shard_count(max_bytes: u64, max_entries: u64, largest_entry_bytes: u64) -> usize {
    let by_entries = max_entries / ENTRIES_PER_SHARD;
    let by_bytes = max_bytes / largest_entry_bytes.saturating_mul(LARGEST_ENTRIES_PER_SHARD).max(1);
    let shards = by_entries.min(by_bytes).clamp(1, MAX_SHARDS);
    1 << shards.ilog2()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_hold_a_few_thousand_entries_and_a_few_of_the_largest() {
        assert_eq!(shard_count(256 << 20, 100_000, 1 << 20), 32, "the cache service's defaults");
        assert_eq!(shard_count(64 << 20, 10_000, 4 << 20), 4, "the near cache's defaults");
        assert_eq!(shard_count(256 << 20, 10_000_000, 1 << 20), 64, "at most 64");
        assert_eq!(shard_count(8 << 20, 10_000_000, 1 << 20), 2, "each shard holds 4 of the largest");
        assert_eq!(shard_count(10_000, 1000, 1 << 16), 1);
        assert_eq!(shard_count(0, 0, 0), 1, "never none");
    }

    #[test]
    fn the_floor_keeps_the_count_within_its_bound() {
        let bounds = Bounds { max_bytes: 1000, max_entries: 3, largest_entry_bytes: 100 };
        assert_eq!(bounds.floor(), 334, "rounded up: three at the floor fit, four do not");
        assert_eq!(Bounds { max_entries: 0, ..bounds }.floor(), 1000);
        assert!(bounds.options().is_ok());
    }
}

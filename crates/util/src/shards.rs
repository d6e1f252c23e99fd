//! How many shards a bounded in-memory cache gets (the cache service's store, the gateway's near
//! cache). A shard is a hash table of its own, sized up front, and the longest step of a sharded
//! cache (a shard tidying its table) touches one shard: so a shard holds a few thousand entries,
//! not all of them. A shard also bounds its own share of the bytes and refuses an entry heavier
//! than that share, so each must still hold a few of the largest entries.

/// A shard is sized for about this many entries: few enough that tidying its table is short.
const ENTRIES_PER_SHARD: u64 = 2048;
const MAX_SHARDS: u64 = 64;
/// Each shard holds at least this many of the largest entries.
const LARGEST_ENTRIES_PER_SHARD: u64 = 4;

/// The shards of a cache bounded by `max_bytes` and `max_entries` whose entries weigh at most
/// `largest_entry_bytes`: a power of two between 1 and 64.
pub fn shard_count(max_bytes: u64, max_entries: u64, largest_entry_bytes: u64) -> usize {
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
}

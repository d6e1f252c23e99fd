//! The budget scripts on a real `redis-server`: all or nothing across a key's and its team's
//! buckets, settlement at most once however often it is retried, a late reservation voided by its
//! release, and exact totals under concurrent callers.

// Test helpers: a broken set-up should fail the test where it happens.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use llmesh_ratelimit::budget::{Bucket, Hold, Level, Period, RedisBudget, Reserved, Scope};
use llmesh_testkit::Redis;

/// A redis-server of the test's own (the workspace's fixture), killed when dropped.
async fn start_redis() -> Redis {
    Redis::start().await.unwrap()
}

fn budget_on(redis: &Redis) -> RedisBudget {
    RedisBudget::new(&redis.url(), Duration::from_secs(2)).unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn buckets(key_limit: Option<u64>, team_limit: Option<u64>) -> Vec<Bucket> {
    vec![
        Bucket::new(Period::Month, Scope::Key, "alice", key_limit, now_ms()),
        Bucket::new(Period::Day, Scope::Team, "search", team_limit, now_ms()),
    ]
}

#[tokio::test]
async fn reservations_take_from_every_bucket_or_none() {
    let redis = start_redis().await;
    let budget = budget_on(&redis);
    budget.warm_up().await.unwrap();
    let first = Hold::new(600, buckets(Some(1_000), Some(700)));
    let Reserved::Taken(levels) = budget.reserve(&first).await.unwrap() else { panic!("refused") };
    assert_eq!(levels[0], Level { spent: 0, held: 600, limit: Some(1_000) });
    assert_eq!(levels[1].remaining(), Some(100));
    // The team's bucket refuses the next: the key's is left untouched too.
    let second = Hold::new(200, buckets(Some(1_000), Some(700)));
    let Reserved::Refused { bucket, levels } = budget.reserve(&second).await.unwrap() else { panic!("taken") };
    assert_eq!(bucket, 1, "the team's");
    assert_eq!(levels[0].held, 600);
    assert_eq!(budget.read(&first.buckets[0].key).await.unwrap().held, 600);
    // Settling with the real cost frees the rest.
    let settled = budget.settle(&first, 250).await.unwrap();
    assert!(settled.applied);
    assert_eq!(settled.levels[1], Level { spent: 250, held: 0, limit: Some(700) });
    assert!(matches!(budget.reserve(&second).await.unwrap(), Reserved::Taken(_)));
    // A bucket without a limit counts and never refuses.
    let unlimited = Hold::new(u64::from(u32::MAX), buckets(None, None));
    assert!(matches!(budget.reserve(&unlimited).await.unwrap(), Reserved::Taken(_)));
}

#[tokio::test]
async fn a_settlement_applies_once_however_often_it_is_sent() {
    let redis = start_redis().await;
    let budget = budget_on(&redis);
    let hold = Hold::new(1_000, buckets(Some(10_000), None));
    assert!(matches!(budget.reserve(&hold).await.unwrap(), Reserved::Taken(_)));
    assert!(budget.settle(&hold, 400).await.unwrap().applied);
    for _ in 0..3 {
        let again = budget.settle(&hold, 400).await.unwrap();
        assert!(!again.applied);
        assert_eq!(again.levels[0], Level { spent: 400, held: 0, limit: Some(10_000) });
    }
    // The retried settlements left a void record: the same reservation sent again takes nothing.
    assert_eq!(budget.reserve(&hold).await.unwrap(), Reserved::Void);
    assert_eq!(budget.read(&hold.buckets[0].key).await.unwrap().held, 0);
}

#[tokio::test]
async fn nothing_of_a_settled_call_stays_in_redis() {
    let redis = start_redis().await;
    let budget = budget_on(&redis);
    let mut conn = redis.connection().await.unwrap();
    let holds: Vec<_> = (0..50).map(|_| Hold::new(1_000, buckets(Some(1_000_000), Some(1_000_000)))).collect();
    let reserved = budget.reserve_many(&holds).await.unwrap();
    assert!(reserved.iter().all(|reserved| matches!(reserved, Reserved::Taken(_))), "{reserved:?}");
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert_eq!(keys, 2 + 50, "two buckets and a record per reservation held");

    let settled = budget.settle_many(holds.iter().map(|hold| (hold, 400))).await.unwrap();
    assert!(settled.iter().all(|settled| settled.applied));
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert_eq!(keys, 2, "only the two buckets: settled records are deleted");
    assert_eq!(
        budget.read(&holds[0].buckets[1].key).await.unwrap(),
        Level { spent: 50 * 400, held: 0, limit: Some(1_000_000) }
    );
}

#[tokio::test]
async fn a_release_that_arrives_first_voids_the_late_reservation() {
    let redis = start_redis().await;
    let budget = budget_on(&redis);
    let hold = Hold::new(1_000, buckets(Some(10_000), Some(10_000)));
    // The caller gave the reservation up (its reply was lost) before Redis ever ran it.
    assert!(!budget.settle(&hold, 0).await.unwrap().applied);
    assert_eq!(budget.reserve(&hold).await.unwrap(), Reserved::Void);
    for bucket in &hold.buckets {
        assert_eq!(budget.read(&bucket.key).await.unwrap(), Level::default());
    }
}

#[tokio::test]
async fn spend_added_from_elsewhere_counts_once_per_id() {
    let redis = start_redis().await;
    let budget = budget_on(&redis);
    let flush = Hold::new(0, buckets(Some(10_000), None));
    assert!(budget.add(&flush, 123).await.unwrap().applied);
    assert!(!budget.add(&flush, 123).await.unwrap().applied);
    assert_eq!(budget.read(&flush.buckets[0].key).await.unwrap().spent, 123);
    // Large amounts go through as integers (Lua would print them as 1e+15).
    let large = Hold::new(0, buckets(None, None));
    assert!(budget.add(&large, 4_000_000_000_000_001).await.unwrap().applied);
    assert_eq!(budget.read(&large.buckets[0].key).await.unwrap().spent, 4_000_000_000_000_001 + 123);
}

#[tokio::test]
async fn concurrent_callers_never_take_past_the_limit_and_totals_are_exact() {
    let redis = start_redis().await;
    let limit = 100_000;
    let mut tasks = Vec::new();
    for worker in 0..8u64 {
        let budget = budget_on(&redis);
        tasks.push(tokio::spawn(async move {
            let (mut spent, mut refused) = (0, 0);
            for call in 0..50u64 {
                let hold = Hold::new(1_000, buckets(None, Some(limit)));
                match budget.reserve(&hold).await.unwrap() {
                    Reserved::Taken(levels) => {
                        assert!(levels[1].spent + levels[1].held <= limit);
                        let cost = 1 + (worker * 50 + call) % 1_000;
                        budget.settle(&hold, cost).await.unwrap();
                        spent += cost;
                    }
                    Reserved::Refused { levels, .. } => {
                        // Refused only when what is spent and held leaves no room for it.
                        assert!(levels[1].spent + levels[1].held + 1_000 > limit, "{levels:?}");
                        refused += 1;
                    }
                    Reserved::Void => panic!("a fresh reservation is never void"),
                }
            }
            (spent, refused)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap().0;
    }
    let level = budget_on(&redis).read(&buckets(None, Some(limit))[1].key).await.unwrap();
    assert_eq!(level, Level { spent: total, held: 0, limit: Some(limit) });
    assert!(total <= limit);
}

#[tokio::test]
async fn a_settlement_never_charges_more_than_was_reserved() {
    let redis = start_redis().await;
    let budget = budget_on(&redis);
    // A provider reports more than the reservation: the bucket is charged the reservation, so
    // it never goes past its limit.
    let hold = Hold::new(900, buckets(Some(1_000), Some(1_000)));
    assert!(matches!(budget.reserve(&hold).await.unwrap(), Reserved::Taken(_)));
    let settled = budget.settle(&hold, 5_000).await.unwrap();
    assert!(settled.applied);
    assert_eq!(settled.levels[0], Level { spent: 900, held: 0, limit: Some(1_000) });
    assert_eq!(settled.levels[1], Level { spent: 900, held: 0, limit: Some(1_000) });
    // Large amounts stay exact (Lua would print a large number as `1e+15`).
    let big = 3_000_000_000_000_000;
    let hold = Hold::new(big, buckets(None, None));
    assert!(matches!(budget.reserve(&hold).await.unwrap(), Reserved::Taken(_)));
    let settled = budget.settle(&hold, big + 1).await.unwrap();
    assert_eq!(settled.levels[0].spent, 900 + big);
    assert_eq!(settled.levels[0].held, 0);
}

#[tokio::test]
async fn a_batch_reserves_each_hold_in_turn_all_or_nothing() {
    let redis = start_redis().await;
    let budget = budget_on(&redis);
    // 100 spent by an earlier call.
    let spent = Hold::new(100, buckets(Some(1_000), Some(700)));
    assert!(matches!(budget.reserve(&spent).await.unwrap(), Reserved::Taken(_)));
    assert!(budget.settle(&spent, 100).await.unwrap().applied);
    // A hold released before Redis ran it (its reply was lost), arriving late in the batch: void.
    let released = Hold::new(100, buckets(Some(1_000), Some(700)));
    assert!(!budget.settle(&released, 0).await.unwrap().applied);
    // 100 spent; then 400 fits, 300 does not (the team's 700), 200 does, 100 does not, a bucket
    // without a limit counts alone.
    let holds = [
        Hold::new(400, buckets(Some(1_000), Some(700))),
        Hold::new(300, buckets(Some(1_000), Some(700))),
        released.clone(),
        Hold::new(200, buckets(Some(1_000), Some(700))),
        Hold::new(100, buckets(Some(1_000), Some(700))),
        Hold::new(5_000, vec![Bucket::new(Period::Day, Scope::Key, "bob", None, now_ms())]),
    ];
    let reserved = budget.reserve_many(&holds).await.unwrap();
    let Reserved::Taken(levels) = &reserved[0] else { panic!("{reserved:?}") };
    assert_eq!(levels[1], Level { spent: 100, held: 400, limit: Some(700) }, "as the first hold left it");
    let Reserved::Refused { bucket: 1, levels } = &reserved[1] else { panic!("{reserved:?}") };
    assert_eq!(levels[0], Level { spent: 100, held: 400, limit: Some(1_000) }, "nothing taken from the key's");
    assert_eq!(reserved[2], Reserved::Void);
    let Reserved::Taken(levels) = &reserved[3] else { panic!("{reserved:?}") };
    assert_eq!(levels[1], Level { spent: 100, held: 600, limit: Some(700) });
    assert!(matches!(reserved[4], Reserved::Refused { bucket: 1, .. }), "{reserved:?}");
    assert!(matches!(&reserved[5], Reserved::Taken(levels) if levels[0].held == 5_000), "{reserved:?}");
    for bucket in &holds[0].buckets {
        assert_eq!(budget.read(&bucket.key).await.unwrap().held, 600, "{}", bucket.key);
    }
    // Settled in one batch, the refused ones too: a hold that took nothing has nothing to release
    // (its record becomes void), one sent twice applies once.
    let settlements = [(&holds[0], 150), (&holds[1], 0), (&holds[3], 999), (&holds[0], 150), (&holds[5], 1)];
    let settled = budget.settle_many(settlements).await.unwrap();
    let applied: Vec<_> = settled.iter().map(|settled| settled.applied).collect();
    assert_eq!(applied, [true, false, true, false, true]);
    assert_eq!(settled[2].levels[1], Level { spent: 100 + 150 + 200, held: 0, limit: Some(700) }, "capped at 200");
    assert_eq!(budget.read(&holds[0].buckets[1].key).await.unwrap().spent, 450);
    assert_eq!(budget.read(&holds[5].buckets[0].key).await.unwrap(), Level { spent: 1, held: 0, limit: None });
    // The refused hold was voided by its release: sent late, it takes nothing.
    assert_eq!(budget.reserve(&holds[1]).await.unwrap(), Reserved::Void);
    assert!(budget.reserve_many(std::iter::empty()).await.unwrap().is_empty(), "nothing to send");
}

#[tokio::test]
async fn batches_sum_large_amounts_exactly() {
    let redis = start_redis().await;
    let budget = budget_on(&redis);
    let big = 3_000_000_000_000_001;
    let holds: Vec<_> = (0..2).map(|_| Hold::new(big, buckets(None, Some(3 * big)))).collect();
    let reserved = budget.reserve_many(&holds).await.unwrap();
    assert!(reserved.iter().all(|reserved| matches!(reserved, Reserved::Taken(_))), "{reserved:?}");
    assert_eq!(budget.read(&holds[0].buckets[1].key).await.unwrap().held, 2 * big);
    let settled = budget.settle_many(holds.iter().map(|hold| (hold, big - 2))).await.unwrap();
    assert!(settled.iter().all(|settled| settled.applied));
    let level = budget.read(&holds[0].buckets[1].key).await.unwrap();
    assert_eq!(level, Level { spent: 2 * big - 4, held: 0, limit: Some(3 * big) });
}

#[tokio::test]
async fn buckets_expire_with_their_period_and_keep_the_last_limit() {
    let redis = start_redis().await;
    let budget = budget_on(&redis);
    let mut conn = redis.connection().await.unwrap();
    let hold = Hold::new(100, buckets(Some(1_000), Some(700)));
    assert!(matches!(budget.reserve(&hold).await.unwrap(), Reserved::Taken(_)));
    for bucket in &hold.buckets {
        let expiry: i64 = redis::cmd("PEXPIRETIME").arg(&bucket.key).query_async(&mut conn).await.unwrap();
        assert_eq!(expiry, bucket.expire_at_ms as i64, "{}", bucket.key);
    }
    let record_expiry: i64 =
        redis::cmd("PEXPIRETIME").arg(format!("llmesh:budget:hold:{}", hold.id)).query_async(&mut conn).await.unwrap();
    assert_eq!(record_expiry, hold.buckets[0].expire_at_ms.max(hold.buckets[1].expire_at_ms) as i64);
    // A new limit is what the bucket says from then on; settling keeps the expiry.
    let second = Hold::new(100, buckets(Some(2_000), None));
    assert!(matches!(budget.reserve(&second).await.unwrap(), Reserved::Taken(_)));
    assert_eq!(budget.read(&hold.buckets[0].key).await.unwrap(), Level { spent: 0, held: 200, limit: Some(2_000) });
    assert_eq!(budget.read(&hold.buckets[1].key).await.unwrap(), Level { spent: 0, held: 200, limit: None });
    budget.settle_many([(&hold, 30), (&second, 40)]).await.unwrap();
    assert_eq!(budget.read(&hold.buckets[0].key).await.unwrap(), Level { spent: 70, held: 0, limit: Some(2_000) });
    for bucket in &hold.buckets {
        let expiry: i64 = redis::cmd("PEXPIRETIME").arg(&bucket.key).query_async(&mut conn).await.unwrap();
        assert_eq!(expiry, bucket.expire_at_ms as i64, "{}", bucket.key);
    }
}

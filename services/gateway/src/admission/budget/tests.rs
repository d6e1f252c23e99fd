//! The budgets without Redis (each replica alone) and with a Redis that is not there: shares,
//! settlement, what a dropped call pays, and the refusal a caller sees. The shared path runs
//! against a real Redis in `llmesh-ratelimit`'s tests and the e2e tests.

use std::{sync::Arc, time::Duration};

use llmesh_ratelimit::budget::{Period, Rate};
use tonic::Code;

use super::*;
use crate::{
    admission::auth::BudgetLimit,
    headers::{REMAINING_USD, RETRY_PUSHBACK_MS},
};

const DOLLAR: Nanos = 1_000_000_000;

fn budgets(replicas: u32) -> Arc<Budgets> {
    Budgets::new(&BudgetConfig { replicas, ..BudgetConfig::default() }, None, Duration::from_millis(20)).unwrap()
}

/// The budgets of two gateways sharing `redis`.
fn two_gateways(redis: &llmesh_testkit::Redis) -> [Arc<Budgets>; 2] {
    let config = BudgetConfig { replicas: 2, ..BudgetConfig::default() };
    [(); 2].map(|()| Budgets::new(&config, Some(&redis.url()), Duration::from_secs(2)).unwrap())
}

fn member(key: Option<Nanos>, team: Option<Nanos>) -> Principal {
    Principal {
        id: "alice".into(),
        team: Some("search".into()),
        budget: key.map(|nanos| BudgetLimit { nanos, period: Period::Month }),
        team_budget: team.map(|nanos| BudgetLimit { nanos, period: Period::Day }),
        ..Principal::anonymous()
    }
}

const RATE: Rate = Rate { input_per_million: 1.0, output_per_million: 2.0 };

/// Lets the background settlements run.
async fn settled() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn keys_without_a_budget_reserve_nothing() {
    let budgets = budgets(1);
    assert!(budgets.reserve(&Principal::anonymous(), DOLLAR, RATE, 10).await.unwrap().is_none());
    let in_a_team_without_budget = Principal { team: Some("search".into()), ..Principal::anonymous() };
    assert!(budgets.reserve(&in_a_team_without_budget, DOLLAR, RATE, 10).await.unwrap().is_none());
    assert!(!budgets.in_use());
}

#[tokio::test(start_paused = true)]
async fn alone_each_replica_enforces_its_share() {
    // Two replicas: each may spend half of the team's dollar.
    let budgets = budgets(2);
    let alice = member(None, Some(DOLLAR));
    let first = budgets.reserve(&alice, 3 * DOLLAR / 10, RATE, 10).await.unwrap().unwrap();
    assert_eq!(first.remaining(), Some(7 * DOLLAR / 10), "what the whole budget has left");
    let refused = budgets.reserve(&alice, 3 * DOLLAR / 10, RATE, 10).await.unwrap_err().into_status();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // Settling for less makes room again.
    assert_eq!(first.settle(DOLLAR / 10), Some(9 * DOLLAR / 10));
    settled().await;
    let second = budgets.reserve(&alice, 3 * DOLLAR / 10, RATE, 10).await.unwrap().unwrap();
    drop(second);
    settled().await;
    assert_eq!(budgets.unshared_spend(), DOLLAR / 10 + DOLLAR / 10, "counted in the key's and the team's bucket");
    assert_eq!(budgets.local_decisions(), 3);
    assert!(budgets.in_use());
    assert!(!budgets.standing().exact);
    assert!(budgets.standing().detail.contains("1/2"), "{}", budgets.standing().detail);
}

#[tokio::test(start_paused = true)]
async fn the_key_and_the_team_both_bound_a_call() {
    let budgets = budgets(1);
    let alice = member(Some(DOLLAR / 2), Some(10 * DOLLAR));
    let status = budgets.reserve(&alice, DOLLAR, RATE, 10).await.unwrap_err().into_status();
    assert!(status.message().starts_with("budget: key alice has spent $0.000000 of its $0.500000"), "{status:?}");
    let bob = member(Some(10 * DOLLAR), Some(DOLLAR / 2));
    let refused = budgets.reserve(&bob, DOLLAR, RATE, 10).await.unwrap_err();
    assert_eq!(refused.class(), crate::error::Class::OverBudget, "not a rate limit: {refused:?}");
    let status = refused.into_status();
    assert!(status.message().contains("team search"), "{status:?}");
    assert!(status.message().contains("the day "), "{status:?}");
    assert!(status.message().contains("this call may cost up to $1.000000"), "{status:?}");
    // Clients are told not to retry, what is left, and the HTTP routes can tell it from a rate limit.
    assert_eq!(status.metadata().get(RETRY_PUSHBACK_MS).unwrap(), "-1");
    assert_eq!(status.metadata().get(REMAINING_USD).unwrap(), "0.500000");
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_unsettled_pays_for_what_it_was_sent() {
    let budgets = budgets(1);
    let alice = member(None, Some(DOLLAR));
    // Sent nothing: pays nothing.
    let spend = budgets.reserve(&alice, DOLLAR / 2, RATE, 1_000).await.unwrap().unwrap();
    drop(spend);
    settled().await;
    assert_eq!(budgets.unshared_spend(), 0);
    // Sent 500 tokens of a stream: its prompt at the input price, the text at the output price.
    let mut spend = budgets.reserve(&alice, DOLLAR / 2, RATE, 1_000).await.unwrap().unwrap();
    spend.received(200);
    spend.received(300);
    drop(spend);
    settled().await;
    let paid = budget::cost(1_000, 500, RATE);
    assert_eq!(paid, 2_000_000);
    assert_eq!(budgets.unshared_spend(), 2 * paid, "the key's bucket and the team's");
}

#[tokio::test(start_paused = true)]
async fn a_redis_that_is_not_there_leaves_each_replica_alone_and_says_so() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("redis://127.0.0.1:{port}/");
    let budgets = Budgets::new(&BudgetConfig::default(), Some(&url), Duration::from_millis(20)).unwrap();
    let alice = member(Some(DOLLAR), None);
    // Each call decides alone at once when Redis refuses it, or after the timeout (20 ms) while
    // that lasts less than the outage threshold (250 ms): either way the budgets say so.
    let mut decided_alone = 0;
    while budgets.shared() != Some(false) && decided_alone < 40 {
        let probe = budgets.reserve(&alice, DOLLAR / 4, RATE, 10).await.unwrap().unwrap();
        decided_alone += 1;
        assert_eq!(budgets.local_decisions(), decided_alone);
        probe.settle(0);
    }
    assert_eq!(budgets.shared(), Some(false), "Redis never counted as down");
    let spend = budgets.reserve(&alice, DOLLAR / 4, RATE, 10).await.unwrap().unwrap();
    assert_eq!(budgets.local_decisions(), decided_alone + 1);
    spend.settle(DOLLAR / 8);
    settled().await;
    let standing = budgets.standing();
    assert!(!standing.exact && standing.detail.contains("Redis unavailable"), "{standing:?}");
    assert_eq!(budgets.unshared_spend(), DOLLAR / 8, "kept to add to Redis once it answers");
}

#[tokio::test(start_paused = true)]
async fn a_stored_reservation_settles_where_it_was_taken() {
    let budgets = budgets(1);
    let alice = member(Some(DOLLAR), None);
    let spend = budgets.reserve(&alice, DOLLAR, RATE, 10).await.unwrap().unwrap();
    let stored = budgets.store(spend).unwrap();
    assert!(stored.local_replica.is_some(), "no Redis: this replica's");
    assert!(budgets.reserve(&alice, 1, RATE, 10).await.is_err(), "the job holds the whole dollar");
    // Another replica's reservation is not this one's to settle.
    let mut elsewhere = stored.clone();
    elsewhere.local_replica = Some("gateway-elsewhere".into());
    budgets.settle_stored(elsewhere, 0).await;
    assert!(budgets.reserve(&alice, 1, RATE, 10).await.is_err());
    budgets.settle_stored(stored, 0).await;
    assert!(budgets.reserve(&alice, DOLLAR, RATE, 10).await.is_ok(), "cancelled: given back whole");
}

#[test]
fn the_cache_hit_share_is_a_share() {
    for share in [-0.1, 1.5, f64::NAN] {
        let config = BudgetConfig { cache_hit_share: share, ..BudgetConfig::default() };
        assert!(Budgets::new(&config, None, Duration::from_millis(1)).is_err(), "{share}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_settlement_beyond_the_reservation_is_charged_the_reservation_alone() {
    // A provider reports more than was reserved: the budget is charged what was reserved, so it
    // is never passed (the reservation fitted under it).
    let budgets = budgets(1);
    let alice = member(Some(DOLLAR), None);
    let spend = budgets.reserve(&alice, 9 * DOLLAR / 10, RATE, 10).await.unwrap().unwrap();
    assert_eq!(spend.settle(5 * DOLLAR), Some(DOLLAR / 10), "what is left by this call's reckoning");
    settled().await;
    assert_eq!(budgets.unshared_spend(), 9 * DOLLAR / 10);
    assert!(budgets.reserve(&alice, DOLLAR / 10, RATE, 10).await.unwrap().is_some());
    assert!(budgets.reserve(&alice, 1, RATE, 10).await.is_err(), "the whole dollar, and no more");
}

#[tokio::test]
async fn on_redis_no_settlement_takes_a_budget_past_its_limit() {
    let redis = llmesh_testkit::Redis::start().await.unwrap();
    let budgets = Budgets::new(&BudgetConfig::default(), Some(&redis.url()), Duration::from_secs(2)).unwrap();
    let alice = member(None, Some(DOLLAR / 50));
    // Twenty at once, each settled for twice what it reserved (the attack of one-letter words on
    // a quarter-byte estimate): what the team spends never passes its limit.
    let reserve = |budgets: Arc<Budgets>| {
        let alice = alice.clone();
        async move { budgets.reserve(&alice, DOLLAR / 200, RATE, 10).await }
    };
    let calls = futures::future::join_all((0..20).map(|_| reserve(budgets.clone()))).await;
    let mut taken = 0;
    for call in calls {
        if let Ok(Some(spend)) = call {
            taken += 1;
            spend.settle(DOLLAR / 100);
        }
    }
    assert_eq!(taken, 4, "four reservations of $0.005 fit a $0.02 budget");
    let shared = RedisBudget::new(&redis.url(), Duration::from_secs(2)).unwrap();
    let (buckets, _) = buckets_of(&alice, now_ms()).unwrap();
    let mut team = shared.read(&buckets[1].key).await.unwrap();
    for _ in 0..200 {
        if team.held == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        team = shared.read(&buckets[1].key).await.unwrap();
    }
    assert_eq!(team, Level { spent: DOLLAR / 50, held: 0, limit: Some(DOLLAR / 50) }, "the limit, not past it");
    assert!(budgets.reserve(&alice, 1, RATE, 10).await.is_err());
    assert_eq!(budgets.local_decisions(), 0, "Redis decided every call");
}

/// Scripts Redis has run so far (`INFO commandstats`).
async fn scripts_run(redis: &llmesh_testkit::Redis) -> u64 {
    let mut conn = redis.connection().await.unwrap();
    let info: String = ::redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
    info.lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| line.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// A bucket's level once nothing is held in it any more (the settlements run in the background),
/// or after two seconds.
async fn once_settled(redis: &llmesh_testkit::Redis, bucket: &str) -> Level {
    let shared = RedisBudget::new(&redis.url(), Duration::from_secs(2)).unwrap();
    let mut level = shared.read(bucket).await.unwrap();
    for _ in 0..200 {
        if level.held == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        level = shared.read(bucket).await.unwrap();
    }
    level
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_send_their_calls_in_batches_and_end_exact() {
    let redis = llmesh_testkit::Redis::start().await.unwrap();
    let gateways = two_gateways(&redis);
    let amount: Nanos = 1_234_567;
    let limit = 100 * amount;
    let alice = member(None, Some(limit));
    let (buckets, _) = buckets_of(&alice, now_ms()).unwrap();
    // One call on each first, so that both have their scripts loaded.
    for budgets in &gateways {
        budgets.reserve(&alice, amount, RATE, 10).await.unwrap().unwrap().settle(0);
    }
    assert_eq!(once_settled(&redis, &buckets[1].key).await, Level { spent: 0, held: 0, limit: Some(limit) });
    let scripts_before = scripts_run(&redis).await;
    // 400 calls at once, 200 on each gateway, each settled for all it reserved: exactly 100 fit,
    // whatever the batches they went in.
    let calls = (0..400).map(|call| {
        let budgets = gateways[call % 2].clone();
        let alice = alice.clone();
        tokio::spawn(async move {
            match budgets.reserve(&alice, amount, RATE, 10).await {
                Ok(spend) => {
                    spend.expect("a budget applies").settle(amount);
                    Ok(())
                }
                Err(refused) => Err(refused.class()),
            }
        })
    });
    let (mut taken, mut refused) = (0, 0);
    for call in futures::future::join_all(calls).await {
        match call.unwrap() {
            Ok(()) => taken += 1,
            Err(class) => {
                assert_eq!(class, crate::error::Class::OverBudget);
                refused += 1;
            }
        }
    }
    assert_eq!((taken, refused), (100, 300));
    let team = once_settled(&redis, &buckets[1].key).await;
    assert_eq!(team, Level { spent: limit, held: 0, limit: Some(limit) }, "the limit to the nano-dollar");
    assert_eq!(once_settled(&redis, &buckets[0].key).await, Level { spent: limit, held: 0, limit: None });
    // 400 reservations and 100 settlements, in far fewer script calls.
    let scripts = scripts_run(&redis).await - scripts_before;
    assert!(scripts * 4 < 500, "{scripts} scripts for 500 reservations and settlements");
    assert_eq!(gateways[0].local_decisions() + gateways[1].local_decisions(), 0, "Redis decided every call");
    assert_eq!(gateways[0].pending_count() + gateways[1].pending_count(), 0);
}

#[tokio::test]
async fn a_call_that_goes_away_mid_reservation_holds_nothing() {
    let redis = llmesh_testkit::Redis::start().await.unwrap();
    let budgets = Budgets::new(&BudgetConfig::default(), Some(&redis.url()), Duration::from_secs(2)).unwrap();
    let alice = member(Some(DOLLAR), None);
    let (buckets, _) = buckets_of(&alice, now_ms()).unwrap();
    budgets.reserve(&alice, DOLLAR, RATE, 10).await.unwrap().unwrap().settle(0);
    assert_eq!(once_settled(&redis, &buckets[0].key).await.held, 0);
    // Alone: its reservation was sent (and most likely taken: the pause lets Redis answer) when
    // the call goes away.
    let mut alone = Box::pin(budgets.reserve(&alice, DOLLAR / 4, RATE, 10));
    assert!(futures::poll!(&mut alone).is_pending());
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(alone);
    // Waiting behind another: its batch went (and most likely came back) before it goes away.
    let mut first = Box::pin(budgets.reserve(&alice, DOLLAR / 4, RATE, 10));
    assert!(futures::poll!(&mut first).is_pending());
    let mut waiting = Box::pin(budgets.reserve(&alice, DOLLAR / 4, RATE, 10));
    assert!(futures::poll!(&mut waiting).is_pending());
    let first = first.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(waiting);
    // What the calls that went away took is given back; the one that stayed holds its own.
    let mut level = Level::default();
    for _ in 0..200 {
        level = RedisBudget::new(&redis.url(), Duration::from_secs(2)).unwrap().read(&buckets[0].key).await.unwrap();
        if level.held == DOLLAR / 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(level, Level { spent: 0, held: DOLLAR / 4, limit: Some(DOLLAR) });
    first.settle(0);
    assert_eq!(once_settled(&redis, &buckets[0].key).await, Level { spent: 0, held: 0, limit: Some(DOLLAR) });
    assert!(budgets.reserve(&alice, DOLLAR, RATE, 10).await.unwrap().is_some(), "nothing left held");
    assert_eq!(budgets.local_decisions(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_keys_calls_come_from_slices_and_settle_exact() {
    let redis = llmesh_testkit::Redis::start().await.unwrap();
    let budgets = Budgets::new(&BudgetConfig::default(), Some(&redis.url()), Duration::from_secs(2)).unwrap();
    let amount: Nanos = 1_000_003;
    let alice = member(Some(100_000 * amount), Some(50_000 * amount));
    let (buckets, _) = buckets_of(&alice, now_ms()).unwrap();
    budgets.reserve(&alice, amount, RATE, 10).await.unwrap().unwrap().settle(0);
    assert_eq!(once_settled(&redis, &buckets[1].key).await.held, 0);
    let scripts_before = scripts_run(&redis).await;
    // One call at a time: without slices, a script to reserve each.
    let mut expected = 0;
    for call in 0..500 {
        let spend = budgets.reserve(&alice, amount, RATE, 10).await.unwrap().unwrap();
        let cost = amount / 3 + call;
        expected += cost;
        spend.settle(cost);
        tokio::task::yield_now().await;
    }
    let scripts = scripts_run(&redis).await - scripts_before;
    // Alone, one at a time, each call would reserve in a script of its own: 500 at least.
    assert!(scripts < 250, "{scripts} scripts for 500 calls: slices not used");
    // Open slices hold money until they are settled; closing settles them.
    budgets.close().await;
    for bucket in &buckets {
        let level = once_settled(&redis, &bucket.key).await;
        assert_eq!((level.spent, level.held), (expected, 0), "{}: exact to the nano-dollar", bucket.key);
    }
    assert_eq!(budgets.local_decisions(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_on_two_gateways_never_take_a_budget_past_its_limit() {
    let redis = llmesh_testkit::Redis::start().await.unwrap();
    let gateways = two_gateways(&redis);
    let amount: Nanos = 7_777;
    let limit = 1_000 * amount;
    let alice = member(None, Some(limit));
    let (buckets, _) = buckets_of(&alice, now_ms()).unwrap();
    for budgets in &gateways {
        budgets.reserve(&alice, amount, RATE, 10).await.unwrap().unwrap().settle(0);
    }
    // Eight callers per gateway, one call after another each, each charged all it reserved,
    // until the budget refuses them: 1,600 calls ask for 1.6 times the budget.
    let callers = (0..16).map(|caller| {
        let budgets = gateways[caller % 2].clone();
        let alice = alice.clone();
        tokio::spawn(async move {
            let (mut taken, mut refused) = (0u64, 0u64);
            for _ in 0..100 {
                match budgets.reserve(&alice, amount, RATE, 10).await {
                    Ok(spend) => {
                        spend.expect("a budget applies").settle(amount);
                        taken += 1;
                    }
                    Err(error) => {
                        assert_eq!(error.class(), crate::error::Class::OverBudget);
                        refused += 1;
                    }
                }
            }
            (taken, refused)
        })
    });
    let mut taken = 0;
    for caller in futures::future::join_all(callers).await {
        taken += caller.unwrap().0;
    }
    for budgets in &gateways {
        budgets.close().await;
    }
    let team = once_settled(&redis, &buckets[1].key).await;
    assert_eq!(team, Level { spent: taken * amount, held: 0, limit: Some(limit) }, "exact");
    assert!(team.spent <= limit, "never past the limit");
    // Refused only near the end: early by at most what slices held unused (a slice is at most 1%
    // of the limit, 10 calls' worth; a gateway holds its open slice and the closed ones its callers
    // are still in, at most 8 + 1) and the reservations in flight (16).
    assert!(taken >= 1_000 - 2 * 9 * 10 - 16, "{taken} of 1,000 calls' worth taken: refused too early");
}

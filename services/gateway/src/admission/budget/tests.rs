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

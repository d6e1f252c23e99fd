//! Reservations and settlements go to Redis in batches, by group commit: on each replica, one
//! reservation script and one settlement script in flight at a time, each carrying what waited
//! for it.
//!
//! # What it promises
//! - **No wait when alone**: a reservation that finds no reservation script of this replica in
//!   flight goes to Redis at once, alone, from its own call. One that finds one in flight waits
//!   for it and goes with the next batch (at most [`MAX_BATCH`]), sent as soon as that one is
//!   answered. Settlements (in the background: no answer waits for them) do the same: sent at once
//!   when no settlement script is in flight, else with the next batch. No timer: a batch is what
//!   arrived during the previous script call, so batches grow with the load, and a lone call
//!   costs what it did before.
//! - **Each as if alone**: a batch is `llmesh_ratelimit::budget`'s script run over many holds,
//!   each in turn, all or nothing per hold, with its own outcome: batching changes no decision
//!   Redis would have made on the same calls one after another, so budgets stay exact to the
//!   nano-dollar and are never passed.
//! - **A lost reply releases**: when a reservation batch times out, each of its holds is released
//!   (settled at 0, through the settlements waiting for Redis), so a batch Redis runs late takes
//!   nothing, as for a single reservation. A call that goes away while its reservation is in
//!   flight or waiting (its client cancelled) has it released the same way: nothing stays held
//!   for a call that will never settle.
//! - **A wait as bounded as a call**: a reservation that has waited longer than the Redis timeout
//!   for its batch to go (the one in flight was slow) is decided in this replica's memory instead
//!   of sent, so no call waits for Redis much more than twice the timeout (the batch in flight,
//!   then its own).
//! - **A failure is one failure**: a batch that fails counts once for Redis's health; its
//!   reservations, and the ones waiting behind it (not sent: they waited one failure already), are
//!   decided in this replica's memory. Settlements that fail, or find Redis resting, wait with the
//!   others for the catch-up, which sends them in batches too.
//!
//! # What it does not
//! Batch across replicas (each batches its own calls), or wait to fill a batch.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use llmesh_ratelimit::{
    Failure,
    budget::{Hold, Nanos, Reserved},
};
use tokio::{sync::oneshot, time::Instant};

use super::{Budgets, Labels, Pending, Shared};
use crate::error::CallError;

/// Most holds in one script call: enough that a busy replica sends few, few enough that a batch
/// stays a short script (each hold is a few Redis commands inside it).
pub(super) const MAX_BATCH: usize = 64;

/// When a call refused at shutdown may try again (another replica, most likely).
const SHUTDOWN_RETRY: Duration = Duration::from_secs(1);

/// What waits for a script call in flight.
#[derive(Default)]
pub(super) struct Batches {
    reserving: Mutex<Queue<Waiting>>,
    settling: Mutex<Queue<Settlement>>,
}

struct Queue<T> {
    /// A script call of this kind is in flight (or about to be): new work waits for it.
    busy: bool,
    waiting: VecDeque<T>,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self { busy: false, waiting: VecDeque::new() }
    }
}

fn lock<T>(queue: &Mutex<Queue<T>>) -> MutexGuard<'_, Queue<T>> {
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A reservation waiting for the next batch; its hold comes back with the outcome.
struct Waiting {
    hold: Hold,
    reply: oneshot::Sender<(Hold, Option<Reserved>)>,
    since: Instant,
}

/// A settlement for Redis.
pub(super) struct Settlement {
    pub(super) hold: Hold,
    pub(super) cost: Nanos,
    /// The buckets' metric labels (none: nothing to record, a release).
    pub(super) labels: Option<Arc<[Labels]>>,
}

impl Budgets {
    /// Reserves `hold` in Redis, alone at once or with the next batch; its outcome is `None` when
    /// Redis did not decide (this replica decides). The caller has checked that Redis is worth
    /// asking. Fails only while the runtime shuts down (the batch it waited for was dropped).
    pub(super) async fn reserve_in_redis(
        self: &Arc<Self>,
        shared: &Shared,
        hold: Hold,
    ) -> Result<(Hold, Option<Reserved>), CallError> {
        let queued = {
            let mut queue = lock(&self.batches.reserving);
            if queue.busy {
                let (reply, answer) = oneshot::channel();
                queue.waiting.push_back(Waiting { hold, reply, since: Instant::now() });
                Err(answer)
            } else {
                queue.busy = true;
                Ok(hold)
            }
        };
        match queued {
            Ok(hold) => {
                let mut lead = Lead { budgets: self, hold: &hold, answered: false, failed: false };
                let outcome = self.send_reservations(shared, &[&hold]).await.and_then(|mut outcomes| outcomes.pop());
                lead.answered = true;
                lead.failed = outcome.is_none();
                drop(lead);
                Ok((hold, outcome))
            }
            Err(answer) => {
                let mut queued = Queued { budgets: self, answer, answered: false };
                let reply = (&mut queued.answer).await;
                queued.answered = true;
                reply.map_err(|_| CallError::Overloaded {
                    message: "the gateway is shutting down".into(),
                    whole: true,
                    retry_after: SHUTDOWN_RETRY,
                })
            }
        }
    }

    /// Sends `holds` in one script call; `None` when Redis did not answer (counted in its health;
    /// after a timeout, each hold is released: Redis may still run the batch).
    async fn send_reservations(&self, shared: &Shared, holds: &[&Hold]) -> Option<Vec<Reserved>> {
        match shared.budget.reserve_many(holds.iter().copied()).await {
            Ok(outcomes) => {
                shared.health.answered();
                Some(outcomes)
            }
            Err(failure) => {
                shared.health.failed(&failure);
                if matches!(failure, Failure::Timeout(_)) {
                    for hold in holds {
                        self.defer(Pending::Settle { hold: (*hold).clone(), cost: 0 });
                    }
                }
                None
            }
        }
    }

    /// After a reservation script: the next batch goes (from a task of its own), or the queue is
    /// idle. After a failure, what waited is decided locally instead of sent.
    fn next_reservations(self: &Arc<Self>, failed: bool) {
        let given_up = {
            let mut queue = lock(&self.batches.reserving);
            let given_up: Vec<Waiting> = if failed { queue.waiting.drain(..).collect() } else { Vec::new() };
            if queue.waiting.is_empty() {
                queue.busy = false;
            } else if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(self.clone().reserve_batches());
            } else {
                // Only at shutdown: nothing will send them.
                queue.busy = false;
                queue.waiting.clear();
            }
            given_up
        };
        for waiting in given_up {
            self.answer(waiting, None);
        }
    }

    /// Sends what waits, a batch at a time, until nothing does.
    async fn reserve_batches(self: Arc<Self>) {
        loop {
            let wait_limit = self.redis.as_ref().map_or(Duration::ZERO, |shared| shared.timeout);
            let (batch, late): (Vec<Waiting>, Vec<Waiting>) = {
                let mut queue = lock(&self.batches.reserving);
                let n = queue.waiting.len().min(MAX_BATCH);
                if n == 0 {
                    queue.busy = false;
                    return;
                }
                // A call that went away while waiting takes nothing: not sent.
                queue
                    .waiting
                    .drain(..n)
                    .filter(|waiting| !waiting.reply.is_closed())
                    .partition(|waiting| waiting.since.elapsed() < wait_limit)
            };
            for waiting in late {
                self.answer(waiting, None);
            }
            if batch.is_empty() {
                continue;
            }
            let holds: Vec<&Hold> = batch.iter().map(|waiting| &waiting.hold).collect();
            let outcomes = match self.redis.as_ref() {
                Some(shared) if shared.health.healthy() => self.send_reservations(shared, &holds).await,
                _ => None,
            };
            drop(holds);
            let failed = outcomes.is_none();
            let mut outcomes = outcomes.unwrap_or_default().into_iter();
            for waiting in batch {
                self.answer(waiting, outcomes.next());
            }
            if failed {
                self.next_reservations(true);
                return;
            }
        }
    }

    /// Hands a waiting reservation its outcome; releases what it took when its call went away.
    fn answer(self: &Arc<Self>, waiting: Waiting, outcome: Option<Reserved>) {
        if let Err((hold, Some(Reserved::Taken(_)))) = waiting.reply.send((waiting.hold, outcome)) {
            self.release(hold);
        }
    }

    /// Gives back a reservation nobody will settle (its call went away).
    fn release(self: &Arc<Self>, hold: Hold) {
        self.settle_soon(Settlement { hold, cost: 0, labels: None });
    }

    /// Settles in Redis: at once when no settlement script is in flight, else with the next batch.
    pub(super) fn settle_soon(self: &Arc<Self>, settlement: Settlement) {
        let start = {
            let mut queue = lock(&self.batches.settling);
            queue.waiting.push_back(settlement);
            !std::mem::replace(&mut queue.busy, true)
        };
        if !start {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(self.clone().settle_batches());
            }
            // Only at shutdown: they wait with the others for Redis (the reservations stay held when
            // the process ends first, which errs on the side of the budget).
            Err(_) => {
                let waiting: Vec<Settlement> = {
                    let mut queue = lock(&self.batches.settling);
                    queue.busy = false;
                    queue.waiting.drain(..).collect()
                };
                self.defer_settlements(waiting);
            }
        }
    }

    /// Sends the settlements that wait, a batch at a time, until none does.
    async fn settle_batches(self: Arc<Self>) {
        loop {
            let batch: Vec<Settlement> = {
                let mut queue = lock(&self.batches.settling);
                let n = queue.waiting.len().min(MAX_BATCH);
                if n == 0 {
                    queue.busy = false;
                    return;
                }
                queue.waiting.drain(..n).collect()
            };
            let Some(shared) = self.redis.as_ref().filter(|shared| shared.health.should_try()) else {
                self.defer_settlements(batch);
                continue;
            };
            match shared.budget.settle_many(batch.iter().map(|settlement| (&settlement.hold, settlement.cost))).await {
                Ok(settled) => {
                    shared.health.answered();
                    for (settlement, settled) in batch.iter().zip(&settled) {
                        self.local.learn(&settlement.hold, &settled.levels);
                        if let Some(labels) = &settlement.labels {
                            self.record(labels, &settled.levels, "redis");
                        }
                    }
                }
                Err(failure) => {
                    shared.health.failed(&failure);
                    self.defer_settlements(batch);
                }
            }
        }
    }

    /// Settlements Redis did not take: they wait for the catch-up.
    fn defer_settlements(&self, settlements: impl IntoIterator<Item = Settlement>) {
        for Settlement { hold, cost, .. } in settlements {
            self.defer(Pending::Settle { hold, cost });
        }
    }
}

/// The call whose reservation is in flight alone. Dropped before its answer (the call went away),
/// it releases its reservation; either way it lets the next batch go.
struct Lead<'a> {
    budgets: &'a Arc<Budgets>,
    hold: &'a Hold,
    answered: bool,
    failed: bool,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.budgets.release(self.hold.clone());
        }
        self.budgets.next_reservations(self.failed);
    }
}

/// A call waiting for its batch. Dropped before its answer (the call went away), it makes sure
/// what its reservation took is released: by itself when the answer came already, else by whoever
/// answers (the answer cannot be delivered any more).
struct Queued<'a> {
    budgets: &'a Arc<Budgets>,
    answer: oneshot::Receiver<(Hold, Option<Reserved>)>,
    answered: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.answer.close();
        if let Ok((hold, Some(Reserved::Taken(_)))) = self.answer.try_recv() {
            self.budgets.release(hold);
        }
    }
}

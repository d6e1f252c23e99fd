//! A token reservation held by a call until it settles: the caller pays for what it received.
//!
//! A call that ends normally settles with the usage generation reported. One that ends without
//! settling (the client cancelled, its stream was dropped half-way, the handler was dropped)
//! settles when the [`Held`] is dropped, with the tokens marked as received so far: nothing for
//! a unary call that never answered, an estimate of the streamed text for a stream. Without this
//! a cancelled call would keep its whole reservation (prompt plus `max_tokens`) charged.
//!
//! A job's reservation outlives the call that submitted it: the handler [`Held::detach`]es it and
//! stores it with the job, and the worker that finishes the job (or the call that cancels it)
//! settles it.

use std::sync::Arc;

use super::{Quota, RateLimiter, Reservation};

pub struct Held {
    limiter: Arc<RateLimiter>,
    /// `None` once settled.
    reservation: Option<Reservation>,
    /// Tokens the caller has received so far, charged if the call ends without settling.
    received: u32,
}

impl Held {
    pub(super) fn new(limiter: Arc<RateLimiter>, reservation: Reservation) -> Self {
        Self { limiter, reservation: Some(reservation), received: 0 }
    }

    /// What the key had left once the reservation was taken.
    pub fn quota(&self) -> Quota {
        self.reservation.as_ref().map(Reservation::quota).unwrap_or_default()
    }

    /// The reservation held; `None` once it was settled or handed over.
    pub fn reservation(&self) -> Option<&Reservation> {
        self.reservation.as_ref()
    }

    /// Counts `tokens` more as received by the caller (streamed text, before the usage is known).
    pub fn received(&mut self, tokens: u32) {
        self.received = self.received.saturating_add(tokens);
    }

    /// Settles with the tokens really used (0 for a call that failed: it costs the caller
    /// nothing), in the background; returns what the key has left by this replica's reckoning.
    pub fn settle(mut self, used: u32) -> Quota {
        match self.reservation.take() {
            Some(reservation) => self.limiter.settle_in_background(reservation, used),
            None => Quota::default(),
        }
    }

    /// Hands the reservation over to outlive the call: it is no longer settled on drop, and stays
    /// charged until its new holder settles it (a job's, when the job ends). `None` only when
    /// there is nothing left to hand over.
    pub fn detach(mut self) -> Option<Reservation> {
        self.reservation.take()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Settling spawns a task; outside a runtime (only at shutdown) the reservation stays
        // charged, which errs on the side of the limit.
        if let Some(reservation) = self.reservation.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            self.limiter.settle_in_background(reservation, self.received);
        }
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("reservation", &self.reservation).field("received", &self.received).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{admission::RateLimitConfig, principal::Principal};

    fn limiter() -> Arc<RateLimiter> {
        let config = RateLimitConfig { tokens_per_minute: 1_000, ..RateLimitConfig::default() };
        Arc::new(RateLimiter::new(&config).unwrap())
    }

    fn bob() -> Principal {
        Principal { id: "bob".into(), ..Principal::anonymous() }
    }

    /// Lets the background settlement run, then says how many tokens the key could take now.
    async fn left(limiter: &Arc<RateLimiter>) -> Option<u64> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let probe = limiter.reserve_tokens(&bob(), 1).await.unwrap();
        let remaining = probe.quota().remaining_tokens.map(|r| r + 1);
        limiter.settle(probe, 0).await;
        remaining
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_dropped_before_answering_gets_its_reservation_back() {
        let limiter = limiter();
        let held = limiter.hold_tokens(&bob(), 600).await.unwrap();
        assert_eq!(held.quota().remaining_tokens, Some(400));
        drop(held);
        assert_eq!(left(&limiter).await, Some(1_000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_dropped_half_way_pays_for_what_it_received() {
        let limiter = limiter();
        let mut held = limiter.hold_tokens(&bob(), 600).await.unwrap();
        held.received(30);
        held.received(20);
        drop(held);
        assert_eq!(left(&limiter).await, Some(950));
    }

    #[tokio::test(start_paused = true)]
    async fn a_detached_reservation_stays_charged_until_settled() {
        let limiter = limiter();
        let held = limiter.hold_tokens(&bob(), 600).await.unwrap();
        let reservation = held.detach().unwrap();
        assert_eq!(left(&limiter).await, Some(400), "not refunded when the held reservation went");
        assert_eq!(limiter.settle(reservation, 100).await.remaining_tokens, Some(900));
        assert_eq!(left(&limiter).await, Some(900));
    }

    #[tokio::test(start_paused = true)]
    async fn settling_disarms_the_drop() {
        let limiter = limiter();
        let mut held = limiter.hold_tokens(&bob(), 600).await.unwrap();
        held.received(50);
        // The usage generation reported wins over the estimate of what was streamed.
        assert_eq!(held.settle(200).remaining_tokens, Some(800));
        assert_eq!(left(&limiter).await, Some(800));
    }
}

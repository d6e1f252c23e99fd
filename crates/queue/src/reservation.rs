//! The tokens a job reserved from its owner's budget, and their settlement.
//!
//! The gateway reserves a job's tokens when it is submitted (the prompt's estimate plus
//! `max_tokens`) and stores the reservation with the job; the queue hands it back, once, to
//! whoever ends the job: the worker whose result or failure makes it SUCCEEDED, FAILED or
//! DEAD_LETTERED, or the caller that cancels it. Once, because it comes back only from the
//! script that makes the job terminal, and a job becomes terminal once (see the crate's
//! "Guarantees"): a worker that dies after that step loses the settlement (the reservation stays
//! charged, which errs on the side of the limit), and one that took the job over, or ran it a
//! second time, never gets it.
//!
//! The queue does not settle anything itself: it does not know the rate limiter. A [`Settlement`]
//! says what to do; the worker's owner runs it (`Worker::settling_with`).
//!
//! Stored in the job's hash as `tokens_store` (`shared`, or `local:<replica>`),
//! `tokens_reserved` and `tokens_per_minute`; absent when nothing was reserved (the owner's
//! tokens are unlimited, or the record predates reservations).
//!
//! A job's money reservation against its owner's spend budgets (`llmesh_ratelimit::budget`) is
//! stored beside it as `budget`, text the queue does not read: it hands it over with the tokens,
//! by the same step, so it too is settled at most once. A job that reserved money but no tokens
//! hands over a token reservation of nothing (0 tokens, unlimited).

use llmesh_proto::common::v1::Usage;

use crate::error::CorruptRecord;

/// A job's reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReservation {
    pub store: ReservationStore,
    /// Tokens reserved: the most the job may use (its prompt's estimate plus `max_tokens`).
    pub tokens: u32,
    /// The owner's token limit when it was taken, per minute: the limit settling it works with.
    pub per_minute: u32,
}

/// Where a reservation was taken, and so who can settle it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReservationStore {
    /// In the rate limiter shared through Redis: any process reaching that Redis settles it.
    Shared,
    /// In one gateway replica's own memory (its limiter has no Redis, or Redis failed then):
    /// only that replica can settle it. Workers leave it charged; the replica's bucket fills
    /// again on its own within the minute.
    Local { replica: String },
}

/// A reservation to settle: what the job's owner used, against what it reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub job_id: String,
    /// The key whose budget the tokens came from.
    pub owner: String,
    pub reservation: TokenReservation,
    /// Tokens the job used in the end: the usage its answer reported (the whole reservation when
    /// it reported none), 0 when it failed or was cancelled.
    pub used: u32,
    /// Whether the job SUCCEEDED (else it failed, was dead-lettered or cancelled: it cost nothing).
    pub succeeded: bool,
    /// The usage the job's answer reported (`None`: it did not succeed, or reported none).
    pub usage: Option<Usage>,
    /// The job's money reservation as the gateway stored it, if it took one.
    pub budget: Option<String>,
}

/// The hash fields a reservation is read back from, after `owner`, in the order scripts return them.
pub(crate) const RESERVATION_FIELDS: [&str; 5] =
    ["owner", "tokens_store", "tokens_reserved", "tokens_per_minute", "budget"];

const SHARED: &str = "shared";
const LOCAL_PREFIX: &str = "local:";

impl TokenReservation {
    /// `(tokens_store, tokens_reserved, tokens_per_minute)` as stored.
    pub(crate) fn fields(&self) -> (String, u32, u32) {
        let store = match &self.store {
            ReservationStore::Shared => SHARED.to_owned(),
            ReservationStore::Local { replica } => format!("{LOCAL_PREFIX}{replica}"),
        };
        (store, self.tokens, self.per_minute)
    }
}

/// A job's reservations as a script returned them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reserved {
    pub owner: String,
    pub tokens: TokenReservation,
    pub budget: Option<String>,
}

/// The owner and reservations a script returned (the values of [`RESERVATION_FIELDS`]); `None`
/// when the job reserved nothing.
pub(crate) fn parse_reservation(fields: Vec<Option<Vec<u8>>>) -> Result<Option<Reserved>, CorruptRecord> {
    let mut fields = fields.into_iter();
    let mut next = || fields.next().flatten();
    let (owner, store, tokens, per_minute, budget) = (next(), next(), next(), next(), next());
    let budget = budget.filter(|budget| !budget.is_empty()).map(|budget| String::from_utf8_lossy(&budget).into_owned());
    let Some(store) = store.filter(|store| !store.is_empty()) else {
        return Ok(budget.map(|budget| Reserved {
            owner: owner.map(|owner| String::from_utf8_lossy(&owner).into_owned()).unwrap_or_default(),
            tokens: TokenReservation { store: ReservationStore::Shared, tokens: 0, per_minute: 0 },
            budget: Some(budget),
        }));
    };
    let store = match std::str::from_utf8(&store) {
        Ok(SHARED) => ReservationStore::Shared,
        Ok(text) if text.starts_with(LOCAL_PREFIX) => {
            ReservationStore::Local { replica: text[LOCAL_PREFIX.len()..].to_owned() }
        }
        _ => {
            return Err(CorruptRecord::Invalid {
                field: "tokens_store",
                value: String::from_utf8_lossy(&store).into_owned(),
                expected: "shared or local:<replica>",
            });
        }
    };
    let owner = String::from_utf8_lossy(&owner.ok_or(CorruptRecord::Missing("owner"))?).into_owned();
    let tokens =
        crate::record::parse_number("tokens_reserved", tokens.ok_or(CorruptRecord::Missing("tokens_reserved"))?)?;
    let per_minute = crate::record::parse_number(
        "tokens_per_minute",
        per_minute.ok_or(CorruptRecord::Missing("tokens_per_minute"))?,
    )?;
    Ok(Some(Reserved { owner, tokens: TokenReservation { store, tokens, per_minute }, budget }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(reservation: &TokenReservation, owner: &str) -> Vec<Option<Vec<u8>>> {
        let (store, tokens, per_minute) = reservation.fields();
        [owner.to_owned(), store, tokens.to_string(), per_minute.to_string()]
            .into_iter()
            .map(|field| Some(field.into_bytes()))
            .collect()
    }

    #[test]
    fn reservations_read_back_as_stored() {
        for store in [ReservationStore::Shared, ReservationStore::Local { replica: "gateway-1:x".into() }] {
            let reservation = TokenReservation { store, tokens: 600, per_minute: 1_000 };
            let read = parse_reservation(stored(&reservation, "team:a")).unwrap();
            assert_eq!(read, Some(Reserved { owner: "team:a".to_owned(), tokens: reservation, budget: None }));
        }
    }

    #[test]
    fn no_store_is_no_reservation_and_a_strange_one_is_corrupt() {
        assert_eq!(parse_reservation(vec![Some(b"a".to_vec()), None, None, None]).unwrap(), None);
        // Money but no tokens: a token reservation of nothing comes along.
        let money = vec![Some(b"a".to_vec()), Some(Vec::new()), None, None, Some(b"{}".to_vec())];
        let read = parse_reservation(money).unwrap().unwrap();
        assert_eq!((read.tokens.tokens, read.tokens.per_minute, read.budget.as_deref()), (0, 0, Some("{}")));
        assert_eq!(parse_reservation(Vec::new()).unwrap(), None);
        let strange = vec![Some(b"a".to_vec()), Some(b"elsewhere".to_vec()), Some(b"1".to_vec()), Some(b"2".to_vec())];
        assert!(matches!(parse_reservation(strange), Err(CorruptRecord::Invalid { field: "tokens_store", .. })));
        let missing = vec![Some(b"a".to_vec()), Some(b"shared".to_vec()), None, Some(b"2".to_vec())];
        assert!(matches!(parse_reservation(missing), Err(CorruptRecord::Missing("tokens_reserved"))));
    }
}

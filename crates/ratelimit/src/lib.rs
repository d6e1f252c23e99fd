//! The rate limit every llmesh process agrees on: the GCRA arithmetic ([`gcra`]), the same
//! arithmetic as a Redis script, the Redis key of each limit of each API key ([`key`]), and a
//! small client that runs the script ([`RedisGcra`]).
//!
//! The gateway's limiter decides with it (in Redis, or in its own memory while Redis is away);
//! generation's workers settle the token reservations of jobs with it, on the same Redis keys, so
//! the gateway's next reservation for that API key sees what the job really used.
//!
//! What it promises: the Rust [`gcra::decide`] and [`gcra::SCRIPT`] compute the same decisions
//! (the gateway's tests run both on the same inputs); a key name depends only on the limit's kind
//! and the API key's id. What it does not: health tracking, fallbacks or retries: those belong to
//! the caller, which knows what a failure should mean (the gateway falls back to its local limiter;
//! a worker leaves a reservation charged, which errs on the side of the limit).
//!
//! Spend budgets in money ([`budget`]) live here too, for the same reason: the gateway reserves
//! and settles them, and workers settle the reservations of jobs, with the same scripts and keys.
//!
//! Light on purpose (redis, serde, thiserror, tokio's timer): it is linked into every service.

pub mod budget;
pub mod gcra;
mod redis;

pub use gcra::{Cost, Decision, Limit};
pub use redis::{Failure, RedisGcra, decision_from_reply};

/// Which limit of an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Calls per minute.
    Requests,
    /// Tokens per minute: reserved before a call, settled with the real usage after.
    Tokens,
}

impl Kind {
    pub fn unit(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

/// The Redis key holding one limit of one API key: `llmesh:ratelimit:<requests|tokens>:<id>`.
/// Unambiguous whatever the id holds: the prefix up to the kind is fixed, the id is the rest.
pub fn key(kind: Kind, id: &str) -> String {
    format!("llmesh:ratelimit:{}:{id}", kind.unit())
}

/// What settling a reservation of `reserved` units costs once `used` are known: a refund of what
/// was not used, a forced charge of the excess (the units are spent; later calls wait), or
/// nothing when the reservation was exact.
pub fn settlement(reserved: u32, used: u32) -> Option<Cost> {
    match used.cmp(&reserved) {
        std::cmp::Ordering::Less => Some(Cost::Refund(reserved - used)),
        std::cmp::Ordering::Greater => Some(Cost::Force(used - reserved)),
        std::cmp::Ordering::Equal => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_limit_and_the_api_key() {
        assert_eq!(key(Kind::Requests, "team-a"), "llmesh:ratelimit:requests:team-a");
        assert_eq!(key(Kind::Tokens, "team-a"), "llmesh:ratelimit:tokens:team-a");
        assert_eq!(key(Kind::Tokens, "a:b"), "llmesh:ratelimit:tokens:a:b");
    }

    #[test]
    fn settling_refunds_the_unused_part_or_forces_the_excess() {
        assert_eq!(settlement(600, 100), Some(Cost::Refund(500)));
        assert_eq!(settlement(600, 0), Some(Cost::Refund(600)));
        assert_eq!(settlement(600, 700), Some(Cost::Force(100)));
        assert_eq!(settlement(600, 600), None);
    }
}

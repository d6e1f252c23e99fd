//! The llmesh job queue, on Redis Streams: submit a generation request, watch it, cancel it; workers
//! run it with retries, take over the jobs of workers that died, and dead-letter what keeps failing.
//!
//! # Guarantees
//! - A job's result and its SUCCEEDED state are stored together, before the delivery is
//!   acknowledged, and a delivery whose job has already finished is only acknowledged. So a job
//!   gets at most one result, even when a worker dies between storing it and acknowledging.
//! - Delivery is at least once: a job whose worker died is run again by another worker (after
//!   `claim_idle_ms`), so `execute` should tolerate running twice. Two *results* never come out.
//! - Every call to Redis has a deadline: when Redis is down, callers get `Unavailable` within
//!   `response_timeout_ms`, and workers pause (100 ms, growing to 5 s) instead of spinning.
//! - A job belongs to its owner (the API key id that submitted it), and every call about a job
//!   names its caller: another owner's job is `None` / `NotFound`, exactly like a job that does
//!   not exist; its idempotency key is no match; it cannot be cancelled. A record written before
//!   jobs had owners belongs to [`LEGACY_OWNER`]. Job ids and idempotency keys are checked before
//!   any call to Redis ([`check_job_id`], [`check_idempotency_key`]).
//! - A job's token reservation ([`TokenReservation`]) is handed over at most once, by the atomic
//!   step that makes the job terminal: to the worker that stored its result or gave up on it, or
//!   to the caller that cancelled it ([`Settlement`]). A worker that took a job over, or ran it a
//!   second time, never gets it; one that dies right after that step loses it (the reservation
//!   stays charged: the way of the limit).
//!
//! # Redis layout (`<stream>` is `QueueConfig::stream`, by default `llmesh:jobs`)
//! - `<stream>`: stream of jobs to run, entries `job=<id>`, read by the consumer group
//!   `QueueConfig::group`. Entries are deleted once acknowledged.
//! - `<stream>:job:<id>`: hash per job: state, attempts, request, result, error, timestamps
//!   (created, the latest attempt's start, the last change; see `record`). Expires
//!   `result_ttl_ms` after the job finishes.
//! - `<stream>:idem:<n>:<owner>:<key>`: the id of the job `<owner>` (`<n>` bytes long) submitted
//!   with idempotency key `<key>`; expires with its job.
//! - `<stream>:delayed`: sorted set of jobs waiting for a retry, scored by when they are due.
//! - `<stream>:dead`: stream of dead-lettered jobs, entries `job=<id> error=<last error>
//!   attempts=<n>`.
//!
//! # States
//! QUEUED → RUNNING → SUCCEEDED; a retryable failure goes back to QUEUED (in the delayed set,
//! `error` set) until its retries are used up, then DEAD_LETTERED; a failure no retry can fix is
//! FAILED (not dead-lettered: replaying it would fail again). A QUEUED job can be CANCELLED.

mod backoff;
mod config;
mod connection;
mod error;
mod input;
mod keys;
mod queue;
mod record;
mod reservation;
mod scripts;
mod settings;
mod watch;
mod worker;

pub use config::QueueConfig;
pub use error::{CorruptRecord, JobError, Outage, QueueError};
pub use input::{InvalidInput, MAX_IDEMPOTENCY_KEY_BYTES, check_idempotency_key, check_job_id};
pub use queue::{Cancelled, JobQueue, QueueStats, Submitted};
pub use record::{LEGACY_OWNER, is_terminal};
pub use reservation::{ReservationStore, Settlement, TokenReservation};
pub use settings::QueueSettings;
pub use worker::Worker;

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
//!
//! # Redis layout (`<stream>` is `QueueConfig::stream`, by default `llmesh:jobs`)
//! - `<stream>`: stream of jobs to run, entries `job=<id>`, read by the consumer group
//!   `QueueConfig::group`. Entries are deleted once acknowledged.
//! - `<stream>:job:<id>`: hash per job: state, attempts, request, result, error, timestamps (see
//!   `record`). Expires `result_ttl_ms` after the job finishes.
//! - `<stream>:idem:<key>`: the id of the job submitted with idempotency key `<key>`; expires with
//!   its job.
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
mod keys;
mod queue;
mod record;
mod scripts;
mod settings;
mod watch;
mod worker;

pub use config::QueueConfig;
pub use error::{CorruptRecord, JobError, Outage, QueueError};
pub use queue::{JobQueue, QueueStats, Submitted};
pub use record::is_terminal;
pub use settings::QueueSettings;
pub use worker::Worker;

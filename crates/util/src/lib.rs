//! Small helpers any llmesh crate may use without pulling anything heavy in (no OpenTelemetry, no
//! server runner): credentials out of URLs for logs, an error's cause chain as text, and a task
//! handle that aborts its task when dropped; with the `redis` feature, the mesh's Redis URLs; with
//! `bounded-cache`, the bounds of an in-memory cache on quick_cache.

#[cfg(feature = "bounded-cache")]
pub mod bounded_cache;
pub mod errors;
pub mod redact;
#[cfg(feature = "redis")]
pub mod redis;

/// A spawned task that is aborted when its handle is dropped: for background work that must not
/// outlive what started it (a follower of a change feed, an admin listener).
pub use tokio_util::task::AbortOnDropHandle;

//! The `queue` section of a service's configuration (`[gateway.queue]`, `[generation.queue]`).

use serde::{Deserialize, Serialize};

use crate::QueueConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    /// `redis://host:port/db`; unset means no job queue (the job RPCs answer FAILED_PRECONDITION,
    /// generation runs no workers).
    pub redis_url: Option<String>,
    /// Worker tasks per generation process (the gateway runs none).
    pub workers: u32,
    /// Longest one `WatchJob` call follows a job (the gateway's; generation has no use for it).
    /// Past it the stream ends with DEADLINE_EXCEEDED, and the client watches again: a watch
    /// never holds a call slot for as long as a job may wait. 5 minutes.
    pub watch_max_ms: u64,
    pub options: QueueConfig,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self { redis_url: None, workers: 4, watch_max_ms: 5 * 60 * 1_000, options: QueueConfig::default() }
    }
}

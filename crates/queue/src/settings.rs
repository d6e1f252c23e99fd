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
    pub options: QueueConfig,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self { redis_url: None, workers: 4, options: QueueConfig::default() }
    }
}

//! Following a job until it finishes.
//!
//! By polling the job record: a watcher costs one small HMGET per interval, needs no connection
//! of its own (pub/sub would), and cannot miss a change that happened while it was reconnecting.

use std::time::Duration;

use futures::{Stream, StreamExt as _};
use llmesh_proto::gateway::v1::Job;

use crate::{JobQueue, error::QueueError, record::is_terminal};

/// How often a watcher looks: well under what a person notices, and a light load on Redis.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Where a watch is between two items.
struct Watching {
    queue: JobQueue,
    owner: String,
    id: String,
    last: Option<Job>,
}

impl JobQueue {
    /// `owner`'s job as it is now, then the job each time it changes; ends after a terminal
    /// state. Also ends, after yielding it, on the first error: `NotFound` when the owner has no
    /// such job (or it expired), `Invalid` for an id no job has, `Unavailable` when Redis cannot
    /// be read (the caller may watch again). It never ends on its own before the job does: the
    /// caller bounds how long it watches. The stream is `Unpin` (boxed), so callers can poll it,
    /// or hand it to tonic, as it is.
    pub fn watch(&self, owner: &str, id: &str) -> impl Stream<Item = Result<Job, QueueError>> + Send + Unpin + 'static {
        let start = Watching { queue: self.clone(), owner: owner.to_owned(), id: id.to_owned(), last: None };
        futures::stream::unfold(Some(start), |watching| async move { watching?.next().await }).boxed()
    }
}

impl Watching {
    async fn next(mut self) -> Option<(Result<Job, QueueError>, Option<Self>)> {
        loop {
            if self.last.is_some() {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            let job = match self.queue.get(&self.owner, &self.id).await {
                Ok(Some(job)) => job,
                Ok(None) => return Some((Err(QueueError::NotFound { id: self.id }), None)),
                Err(error) => return Some((Err(error), None)),
            };
            if self.last.as_ref() == Some(&job) {
                continue;
            }
            if is_terminal(job.state()) {
                return Some((Ok(job), None));
            }
            self.last = Some(job.clone());
            return Some((Ok(job), Some(self)));
        }
    }
}

//! Where the queue keeps things in Redis. Every key starts with the stream's name, so queues on
//! different streams share nothing.

/// The Redis keys of one queue.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    /// The stream of jobs ready to run: entries `job=<id>`, read by the consumer group.
    pub stream: String,
    /// Jobs that gave up after their retries: entries `job=<id> error=<last error> attempts=<n>`.
    pub dead: String,
    /// Jobs waiting for a retry, scored by when (Redis clock, unix ms) they are due.
    pub delayed: String,
    /// `<prefix><job id>`: one hash per job (see `record`).
    pub job_prefix: String,
    /// `<prefix><idempotency key>`: the id of the job submitted with that key.
    pub idempotency_prefix: String,
}

impl Keys {
    pub fn new(stream: &str) -> Self {
        Self {
            stream: stream.to_owned(),
            dead: format!("{stream}:dead"),
            delayed: format!("{stream}:delayed"),
            job_prefix: format!("{stream}:job:"),
            idempotency_prefix: format!("{stream}:idem:"),
        }
    }

    pub fn job(&self, id: &str) -> String {
        format!("{}{id}", self.job_prefix)
    }

    pub fn idempotency(&self, key: &str) -> String {
        format!("{}{key}", self.idempotency_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::Keys;

    #[test]
    fn every_key_lives_under_the_stream_name() {
        let keys = Keys::new("llmesh:jobs");
        assert_eq!(keys.stream, "llmesh:jobs");
        assert_eq!(keys.dead, "llmesh:jobs:dead");
        assert_eq!(keys.delayed, "llmesh:jobs:delayed");
        assert_eq!(keys.job("job-1"), "llmesh:jobs:job:job-1");
        assert_eq!(keys.idempotency("abc"), "llmesh:jobs:idem:abc");
    }
}

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
    /// `<prefix><owner's length>:<owner>:<idempotency key>`: the id of the job the owner
    /// submitted with that key.
    pub idempotency_prefix: String,
    /// `<prefix><owner>`: the ids of the owner's jobs that have not ended, scored by when (Redis
    /// clock, unix ms) they were submitted.
    pub unfinished_prefix: String,
}

impl Keys {
    pub fn new(stream: &str) -> Self {
        Self {
            stream: stream.to_owned(),
            dead: format!("{stream}:dead"),
            delayed: format!("{stream}:delayed"),
            job_prefix: format!("{stream}:job:"),
            idempotency_prefix: format!("{stream}:idem:"),
            unfinished_prefix: format!("{stream}:unfinished:"),
        }
    }

    pub fn job(&self, id: &str) -> String {
        format!("{}{id}", self.job_prefix)
    }

    /// The set of `owner`'s jobs that have not ended.
    pub fn unfinished(&self, owner: &str) -> String {
        format!("{}{owner}", self.unfinished_prefix)
    }

    /// One owner's idempotency record. Each owner has its own namespace, and no two (owner, key)
    /// pairs share a record whatever characters they hold: the owner's length (in bytes) says
    /// where the owner ends. (`a:b` + `c` and `a` + `b:c` would both be `a:b:c` without it.)
    pub fn idempotency(&self, owner: &str, key: &str) -> String {
        format!("{}{}:{owner}:{key}", self.idempotency_prefix, owner.len())
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
        assert_eq!(keys.idempotency("team-a", "abc"), "llmesh:jobs:idem:6:team-a:abc");
        assert_eq!(keys.unfinished("team-a"), "llmesh:jobs:unfinished:team-a");
    }

    #[test]
    fn idempotency_records_are_per_owner_and_unambiguous() {
        let keys = Keys::new("llmesh:jobs");
        assert_ne!(keys.idempotency("a", "k"), keys.idempotency("b", "k"));
        assert_ne!(keys.idempotency("a:b", "c"), keys.idempotency("a", "b:c"));
        assert_ne!(keys.idempotency("1:a", "k"), keys.idempotency("1", "a:k"));
        assert_ne!(keys.idempotency("", "1::k"), keys.idempotency("1:", "k"));
    }
}

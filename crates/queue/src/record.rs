//! The job record: one Redis hash per job, and how it reads back as a `Job`.
//!
//! Fields: `state` (the proto name, e.g. `JOB_STATE_QUEUED`, readable in redis-cli), `attempts`
//! (attempts started), `request` (encoded `generation.v1.GenerateRequest`), `result` (encoded
//! `generation.v1.GenerateResponse`, once SUCCEEDED), `error` (the last attempt's failure),
//! `created_at_ms` and `updated_at_ms` (Redis clock, unix ms), `started_at_ms` (Redis clock,
//! unix ms: when the latest attempt started, absent until the first does; a retried or taken-over
//! job's is its newest attempt's, so `started_at_ms − created_at_ms` is the whole wait before
//! that attempt, earlier attempts and retry delays included), `idempotency_key` (the Redis key
//! of the job's idempotency record, or empty), `owner` (the API key id that submitted it; see
//! [`LEGACY_OWNER`]), and the token reservation's fields (see `reservation`).

use llmesh_proto::{
    gateway::v1::{Job, JobState},
    generation::v1::GenerateResponse,
};
use prost::Message as _;

use crate::error::CorruptRecord;

/// Whom a record without an `owner` belongs to: one written before jobs had owners. The id
/// every caller has when the gateway's auth is off, so a mesh without keys keeps its jobs across
/// the upgrade; with keys, no key is `anonymous`, and those jobs are no one's.
pub const LEGACY_OWNER: &str = "anonymous";

/// The fields a `Job` and its owner are built from, in the order scripts and HMGET return them.
/// `owner` and `started_at_ms` may be absent (a record from before owners, a job not started
/// yet): they come last, so a shorter snapshot reads as one without them.
pub(crate) const SNAPSHOT_FIELDS: [&str; 8] =
    ["state", "attempts", "result", "error", "created_at_ms", "updated_at_ms", "owner", "started_at_ms"];

/// The values of [`SNAPSHOT_FIELDS`], `None` where a field is absent.
pub(crate) type Snapshot = Vec<Option<Vec<u8>>>;

/// States a job never leaves.
pub fn is_terminal(state: JobState) -> bool {
    matches!(state, JobState::Succeeded | JobState::Failed | JobState::DeadLettered | JobState::Cancelled)
}

/// A job as stored, with its owner.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stored {
    pub job: Job,
    /// `None` for a record written before jobs had owners.
    pub owner: Option<String>,
}

impl Stored {
    /// Whether `owner` may see and change this job.
    pub fn owned_by(&self, owner: &str) -> bool {
        self.owner.as_deref().unwrap_or(LEGACY_OWNER) == owner
    }
}

/// Builds the job from its snapshot; `None` when the record does not exist (every field absent).
pub(crate) fn parse_snapshot(id: &str, snapshot: Snapshot) -> Result<Option<Stored>, CorruptRecord> {
    if snapshot.iter().all(Option::is_none) {
        return Ok(None);
    }
    let mut fields = snapshot.into_iter();
    let mut next = || fields.next().flatten();
    let (state, attempts, result, error, created, updated) = (next(), next(), next(), next(), next(), next());
    let owner = next().map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    let started = next();

    let state = parse_state(required("state", state)?)?;
    let attempts = parse_number("attempts", required("attempts", attempts)?)?;
    let result = match result.filter(|bytes| !bytes.is_empty()) {
        Some(bytes) => Some(
            GenerateResponse::decode(bytes.as_slice())
                .map_err(|cause| CorruptRecord::Undecodable { field: "result", cause })?
                .into(),
        ),
        None => None,
    };
    let job = Job {
        id: id.to_owned(),
        state: state as i32,
        attempts,
        result,
        error: error.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default(),
        created_at_unix_ms: parse_number("created_at_ms", required("created_at_ms", created)?)?,
        updated_at_unix_ms: parse_number("updated_at_ms", required("updated_at_ms", updated)?)?,
        started_at_unix_ms: started.map(|started| parse_number("started_at_ms", started)).transpose()?.unwrap_or(0),
    };
    Ok(Some(Stored { job, owner }))
}

pub(crate) fn parse_state(name: Vec<u8>) -> Result<JobState, CorruptRecord> {
    std::str::from_utf8(&name).ok().and_then(JobState::from_str_name).ok_or_else(|| CorruptRecord::Invalid {
        field: "state",
        value: String::from_utf8_lossy(&name).into_owned(),
        expected: "a job state",
    })
}

fn required(field: &'static str, value: Option<Vec<u8>>) -> Result<Vec<u8>, CorruptRecord> {
    value.ok_or(CorruptRecord::Missing(field))
}

pub(crate) fn parse_number<T: std::str::FromStr>(field: &'static str, value: Vec<u8>) -> Result<T, CorruptRecord> {
    std::str::from_utf8(&value).ok().and_then(|text| text.parse().ok()).ok_or_else(|| CorruptRecord::Invalid {
        field,
        value: String::from_utf8_lossy(&value).into_owned(),
        expected: "a number",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(text: &str) -> Option<Vec<u8>> {
        Some(text.as_bytes().to_vec())
    }

    #[test]
    fn a_missing_record_is_none() {
        assert_eq!(parse_snapshot("job-1", vec![None; SNAPSHOT_FIELDS.len()]).unwrap(), None);
    }

    #[test]
    fn reads_a_finished_job() {
        let result = GenerateResponse { text: "hello".into(), ..Default::default() }.encode_to_vec();
        let snapshot = vec![
            bytes("JOB_STATE_SUCCEEDED"),
            bytes("2"),
            Some(result),
            bytes(""),
            bytes("10"),
            bytes("20"),
            bytes("team-a"),
            bytes("15"),
        ];
        let stored = parse_snapshot("job-1", snapshot).unwrap().unwrap();
        assert!(stored.owned_by("team-a") && !stored.owned_by("team-b") && !stored.owned_by(LEGACY_OWNER));
        let job = stored.job;
        assert_eq!(job.state(), JobState::Succeeded);
        assert_eq!(job.attempts, 2);
        assert_eq!(job.result.unwrap().text, "hello");
        assert_eq!((job.created_at_unix_ms, job.started_at_unix_ms, job.updated_at_unix_ms), (10, 15, 20));
    }

    #[test]
    fn a_job_not_started_yet_has_no_start() {
        let snapshot = vec![
            bytes("JOB_STATE_QUEUED"),
            bytes("0"),
            None,
            bytes(""),
            bytes("10"),
            bytes("10"),
            bytes("team-a"),
            None,
        ];
        let job = parse_snapshot("job-1", snapshot).unwrap().unwrap().job;
        assert_eq!(job.started_at_unix_ms, 0);

        let snapshot = vec![
            bytes("JOB_STATE_RUNNING"),
            bytes("1"),
            None,
            bytes(""),
            bytes("10"),
            bytes("12"),
            bytes("team-a"),
            bytes("soon"),
        ];
        let error = parse_snapshot("job-1", snapshot).unwrap_err();
        assert!(matches!(error, CorruptRecord::Invalid { field: "started_at_ms", .. }), "{error}");
    }

    #[test]
    fn a_record_from_before_owners_is_the_legacy_owners_only() {
        let snapshot = vec![bytes("JOB_STATE_QUEUED"), bytes("0"), None, None, bytes("1"), bytes("1"), None];
        let stored = parse_snapshot("job-1", snapshot).unwrap().unwrap();
        assert_eq!(stored.owner, None);
        assert!(stored.owned_by("anonymous"));
        assert!(!stored.owned_by("team-a") && !stored.owned_by(""));
    }

    #[test]
    fn names_the_field_that_is_wrong() {
        let snapshot = vec![bytes("JOB_STATE_QUEUED"), bytes("many"), None, None, bytes("1"), bytes("1")];
        let error = parse_snapshot("job-1", snapshot).unwrap_err();
        assert!(matches!(error, CorruptRecord::Invalid { field: "attempts", .. }), "{error}");

        let snapshot = vec![bytes("SLEEPING"), bytes("0"), None, None, bytes("1"), bytes("1")];
        let error = parse_snapshot("job-1", snapshot).unwrap_err();
        assert!(matches!(error, CorruptRecord::Invalid { field: "state", .. }), "{error}");
    }
}

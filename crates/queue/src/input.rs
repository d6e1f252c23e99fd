//! What a caller may name a job by, checked before any call to Redis.
//!
//! - A job id is what [`JobQueue::submit`](crate::JobQueue::submit) issues: `job-` and 32
//!   lowercase hex digits (a UUIDv7 in its simple form). Anything else names no job.
//! - An idempotency key is at most [`MAX_IDEMPOTENCY_KEY_BYTES`] bytes of printable ASCII
//!   (space to `~`); empty means none. Bounded so that a caller cannot grow Redis keys at will,
//!   printable so that it reads back in `redis-cli` and logs as it was sent.

/// The longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

const JOB_ID_PREFIX: &str = "job-";
const JOB_ID_HEX_DIGITS: usize = 32;

/// A job id or idempotency key the queue refuses; the message names the request field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {expected}")]
pub struct InvalidInput {
    /// The request field, as clients name it (`job_id`, `idempotency_key`).
    pub field: &'static str,
    pub expected: &'static str,
}

/// A fresh job id.
pub(crate) fn new_job_id() -> String {
    format!("{JOB_ID_PREFIX}{}", uuid::Uuid::now_v7().simple())
}

/// Checks that `id` is one the queue could have issued.
pub fn check_job_id(id: &str) -> Result<(), InvalidInput> {
    let valid = id.strip_prefix(JOB_ID_PREFIX).is_some_and(|hex| {
        hex.len() == JOB_ID_HEX_DIGITS && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if valid {
        Ok(())
    } else {
        Err(InvalidInput {
            field: "job_id",
            expected: "a job id as SubmitJob returned it (job- and 32 lowercase hex digits)",
        })
    }
}

/// Checks an idempotency key (empty is fine: no idempotency).
pub fn check_idempotency_key(key: &str) -> Result<(), InvalidInput> {
    if key.len() <= MAX_IDEMPOTENCY_KEY_BYTES && key.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        Ok(())
    } else {
        Err(InvalidInput { field: "idempotency_key", expected: "at most 128 bytes of printable ASCII" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_ids_pass_and_nothing_else_does() {
        let id = new_job_id();
        assert_eq!(check_job_id(&id), Ok(()));
        for bad in [
            "",
            "job-",
            "job-nope",
            "job-0123456789abcdef0123456789abcde",
            "job-0123456789abcdef0123456789abcdef0",
            "job-0123456789ABCDEF0123456789ABCDEF",
            "JOB-0123456789abcdef0123456789abcdef",
            "job-0123456789abcdef0123456789abcdeg",
            "job-0123456789abcdef0123456789abcd\u{e9}",
            " job-0123456789abcdef0123456789abcdef",
        ] {
            let error = check_job_id(bad).unwrap_err();
            assert_eq!(error.field, "job_id", "{bad:?}");
        }
        assert_eq!(check_job_id("job-0123456789abcdef0123456789abcdef"), Ok(()));
    }

    #[test]
    fn idempotency_keys_are_short_printable_ascii() {
        for good in ["", "order-42", "a b:c/d~!", &"k".repeat(MAX_IDEMPOTENCY_KEY_BYTES)] {
            assert_eq!(check_idempotency_key(good), Ok(()), "{good:?}");
        }
        for bad in [&"k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1), "tab\there", "new\nline", "caf\u{e9}", "\0"] {
            let error = check_idempotency_key(bad).unwrap_err();
            assert_eq!(error.to_string(), "idempotency_key: at most 128 bytes of printable ASCII", "{bad:?}");
        }
    }
}

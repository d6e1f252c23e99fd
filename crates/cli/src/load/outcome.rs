//! What one call produced, and when: the record the runner hands to the recorder.

use tokio::time::Instant;
use tonic::Code;

/// What a call returned, as the caller saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallResult {
    pub outcome: Result<Success, Failure>,
    /// When the first text arrived (streams only).
    pub first_token: Option<Instant>,
}

/// A call that answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Success {
    /// The answer came from the response cache.
    pub cached: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// A call that did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The call ended with this gRPC status (from the server, the transport, or the local deadline).
    Status(Code),
    /// The stream ended with OK but without its final chunk (the one carrying `finish_reason`).
    StreamIncomplete,
}

impl Failure {
    /// The name errors are counted under: the gRPC code's canonical name, or `STREAM_INCOMPLETE`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Status(code) => code_name(code),
            Self::StreamIncomplete => "STREAM_INCOMPLETE",
        }
    }
}

impl CallResult {
    pub fn ok(success: Success) -> Self {
        Self { outcome: Ok(success), first_token: None }
    }

    pub fn failed(failure: Failure) -> Self {
        Self { outcome: Err(failure), first_token: None }
    }
}

/// One finished call with its times. `intended` is when the schedule wanted it to start (open
/// loop) or when it started (closed loop); latency counts from there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timed {
    pub intended: Instant,
    pub started: Instant,
    pub finished: Instant,
    pub result: CallResult,
}

/// The canonical name of a gRPC status code, as in the gRPC spec (`OK`, `UNAVAILABLE`, ...).
pub use llmesh_telemetry::code_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_codes_as_the_grpc_spec_does() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(Failure::Status(Code::ResourceExhausted).name(), "RESOURCE_EXHAUSTED");
        assert_eq!(Failure::Status(Code::Unavailable).name(), "UNAVAILABLE");
        assert_eq!(Failure::StreamIncomplete.name(), "STREAM_INCOMPLETE");
        assert_eq!(code_name(Code::from_i32(16)), "UNAUTHENTICATED");
    }
}

//! The one error of the way to generation, and every question a layer asks of it.
//!
//! Each layer of the pipeline asks something different of a failure: the breaker whether it
//! counts and against what, the retry whether another try may help and when, the fallback whether
//! a degraded answer may stand in and why. Those answers are methods here, in one place, so the
//! layers cannot disagree. A `tonic::Status` is made only at the RPC edge ([`UpstreamError::
//! into_status`]), where internal detail is logged and the client gets a fixed description and
//! the trace id.

use std::time::Duration;

use llmesh_proto::failure::{ORIGIN_KEY, ORIGIN_UPSTREAM};
use tonic::{Code, Status};

/// Why a call to generation failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Discovery knows no replica at all.
    #[error("no generation replica is known")]
    NoReplica,
    /// Every replica's breaker (or its breaker for the model) is open.
    #[error("circuit open for every generation replica that serves the model")]
    CircuitOpen,
    /// The attempt ran out of time.
    #[error("generation did not answer within {after:?} ({cause:?})")]
    Timeout { after: Duration, cause: TimeoutCause },
    /// The connection to the replica failed or broke under the call: the replica's trouble.
    #[error("connection to generation failed: {}", .0.message())]
    Transport(Status),
    /// Generation answered with an error status.
    #[error("generation answered {:?}: {}", .status.code(), .status.message())]
    Status { status: Status, origin: Origin },
}

/// Whose deadline ended an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutCause {
    /// The gateway's `per_try_timeout_ms`: another try may do better, and the replica is charged.
    PerTry,
    /// The gateway's `request_timeout_ms`: the call is over; the replica is charged.
    Gateway,
    /// The client's own `grpc-timeout`: the call is over, and a deadline the client chose says
    /// nothing about the replica.
    Client,
}

/// What a failure is charged to by the breakers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// The replica itself (its process, its connection): every model on it.
    Replica,
    /// The model on that replica: its upstream failed or was too slow, the replica is fine.
    Model,
}

/// Where generation said a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The model's upstream (`llmesh-failure-origin: upstream`).
    Upstream,
    /// The replica itself.
    Replica,
}

impl Origin {
    pub fn of(status: &Status) -> Self {
        match status.metadata().get(ORIGIN_KEY) {
            Some(value) if value == ORIGIN_UPSTREAM => Self::Upstream,
            _ => Self::Replica,
        }
    }
}

/// Why a degraded answer stood in (the `reason` of `degraded` and of the fallback metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    CircuitOpen,
    Timeout,
    Overloaded,
    Error,
}

impl FallbackReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CircuitOpen => "circuit_open",
            Self::Timeout => "timeout",
            Self::Overloaded => "overloaded",
            Self::Error => "error",
        }
    }

    /// What a client is told happened: fixed text, never the upstream's own words.
    pub fn description(self) -> &'static str {
        match self {
            Self::CircuitOpen => "generation is failing for this model; its circuit breaker is open",
            Self::Timeout => "generation did not answer in time",
            Self::Overloaded => "generation is overloaded",
            Self::Error => "generation is unavailable",
        }
    }
}

/// Where a degraded answer came from (the `source` of `degraded` and of the fallback metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackSource {
    SecondaryModel,
    StaleCache,
    Message,
}

impl FallbackSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SecondaryModel => "secondary_model",
            Self::StaleCache => "stale_cache",
            Self::Message => "message",
        }
    }
}

/// Codes that say the request was at fault, not generation: they go back to the client as they
/// are, are never retried, never counted against a breaker and never fallen back from.
fn is_client_mistake(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unauthenticated
            | Code::AlreadyExists
            | Code::Cancelled
    )
}

impl UpstreamError {
    /// A status from a generation client call: a broken connection (tonic reports it as UNKNOWN
    /// or CANCELLED with the transport error as its source, or UNAVAILABLE when it could not
    /// connect) is the replica's; anything else generation said itself.
    pub fn from_client(status: Status) -> Self {
        let transport = std::error::Error::source(&status).is_some();
        if transport && matches!(status.code(), Code::Unknown | Code::Cancelled | Code::Unavailable) {
            return Self::Transport(status);
        }
        let origin = Origin::of(&status);
        Self::Status { status, origin }
    }

    /// What the breakers charge this failure to; `None` when it says nothing about generation
    /// (a client's mistake or deadline, an open breaker, no replica).
    pub fn charge(&self) -> Option<Charge> {
        if self.misconfigured() {
            return Some(Charge::Model);
        }
        match self {
            Self::NoReplica | Self::CircuitOpen => None,
            Self::Timeout { cause: TimeoutCause::Client, .. } => None,
            // A replica that is slow for one model may be fine for the others: a hung replica
            // is slow for every model and so ends up avoided for each.
            Self::Timeout { .. } => Some(Charge::Model),
            Self::Transport(_) => Some(Charge::Replica),
            Self::Status { status, origin } => {
                let counts =
                    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted);
                match (counts, origin) {
                    (false, _) => None,
                    (true, Origin::Upstream) => Some(Charge::Model),
                    (true, Origin::Replica) => Some(Charge::Replica),
                }
            }
        }
    }

    /// True when a call that failed this way should count as slow in the balancer's latency
    /// estimate (so a replica answering errors or 429s fast does not look attractive).
    pub fn penalised(&self) -> bool {
        self.charge().is_some()
    }

    /// Whether another attempt, on another replica, may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::NoReplica | Self::CircuitOpen => false,
            Self::Timeout { cause, .. } => *cause == TimeoutCause::PerTry,
            Self::Transport(_) => true,
            Self::Status { status, .. } => {
                matches!(status.code(), Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded)
            }
        }
    }

    /// The upstream's `grpc-retry-pushback-ms`: `Some(Some(wait))` to wait that long before
    /// retrying, `Some(None)` when it says not to retry, `None` when it says nothing.
    pub fn pushback(&self) -> Option<Option<Duration>> {
        let Self::Status { status, .. } = self else { return None };
        let value = status.metadata().get("grpc-retry-pushback-ms")?.to_str().ok()?;
        Some(value.trim().parse::<u64>().ok().map(Duration::from_millis))
    }

    /// A low-cardinality label for metrics: the gRPC code name the failure stands for.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoReplica | Self::CircuitOpen | Self::Transport(_) => "UNAVAILABLE",
            Self::Timeout { .. } => "DEADLINE_EXCEEDED",
            Self::Status { status, .. } => llmesh_telemetry::code_name(status.code()),
        }
    }

    /// Whether the model's upstream refused the mesh itself: llmesh's credentials, or a model
    /// name the provider does not have (generation's FAILED_PRECONDITION from the upstream). The
    /// operator's mistake, not the client's: it is charged to the model, may be fallen back from,
    /// and reaches the client as generation being unavailable.
    fn misconfigured(&self) -> bool {
        matches!(self, Self::Status { status, origin: Origin::Upstream } if status.code() == Code::FailedPrecondition)
    }

    /// Whether the client caused this failure: then it goes back to the client as it is.
    fn is_client_mistake(&self) -> bool {
        matches!(self, Self::Status { status, .. } if is_client_mistake(status.code())) && !self.misconfigured()
    }

    /// Why a fallback may answer instead, or `None` when the client should see the error as it is.
    pub fn fallback_reason(&self) -> Option<FallbackReason> {
        if self.misconfigured() {
            return Some(FallbackReason::Error);
        }
        match self {
            Self::CircuitOpen => Some(FallbackReason::CircuitOpen),
            Self::Timeout { .. } => Some(FallbackReason::Timeout),
            Self::NoReplica | Self::Transport(_) => Some(FallbackReason::Error),
            Self::Status { status, .. } => match status.code() {
                Code::DeadlineExceeded => Some(FallbackReason::Timeout),
                Code::ResourceExhausted => Some(FallbackReason::Overloaded),
                Code::Unavailable | Code::Unknown | Code::Internal | Code::Aborted | Code::DataLoss => {
                    Some(FallbackReason::Error)
                }
                _ => None,
            },
        }
    }

    /// The status a client gets: [`Self::client_code`], [`Self::client_message`], and a retry
    /// hint when generation gave one. Logs the detail of a failure that is not the client's.
    pub fn into_status(self) -> Status {
        self.log();
        let mut status = Status::new(self.client_code(), self.client_message());
        if let Self::Status { status: from, .. } = &self
            && !self.is_client_mistake()
            && let Some(pushback) = from.metadata().get("grpc-retry-pushback-ms")
        {
            status.metadata_mut().insert("grpc-retry-pushback-ms", pushback.clone());
            status.metadata_mut().insert("retry-after-ms", pushback.clone());
        }
        status
    }

    /// The code a client gets: generation's own for the client's mistake, else what the failure
    /// stands for.
    pub fn client_code(&self) -> Code {
        match self {
            Self::Status { status, .. } if self.is_client_mistake() => status.code(),
            error => error.public().0,
        }
    }

    /// The words a client gets. A client's mistake keeps generation's words (they are about the
    /// request); anything else is a fixed description plus the trace id, and the detail (which may
    /// hold internal addresses or an upstream's words) goes to the log ([`Self::log`]).
    pub fn client_message(&self) -> String {
        match self {
            Self::Status { status, .. } if self.is_client_mistake() => status.message().to_string(),
            error => {
                let description = error.public().1;
                match llmesh_telemetry::current_trace_id() {
                    Some(trace) => format!("{description} (trace {trace})"),
                    None => description.to_string(),
                }
            }
        }
    }

    /// Logs a failure that is not the client's mistake, with its detail (never sent to a client).
    pub fn log(&self) {
        if !self.is_client_mistake() {
            tracing::warn!(code = ?self.public().0, error = %self, "generation call failed");
        }
    }

    /// The code and fixed description a client sees for a failure that is not its mistake.
    fn public(&self) -> (Code, &'static str) {
        match self {
            Self::NoReplica => (Code::Unavailable, "no generation replica is available"),
            Self::CircuitOpen => (Code::Unavailable, FallbackReason::CircuitOpen.description()),
            Self::Timeout { .. } => (Code::DeadlineExceeded, FallbackReason::Timeout.description()),
            Self::Transport(_) => (Code::Unavailable, FallbackReason::Error.description()),
            Self::Status { status, .. } => match status.code() {
                Code::DeadlineExceeded => (Code::DeadlineExceeded, FallbackReason::Timeout.description()),
                Code::ResourceExhausted => (Code::ResourceExhausted, FallbackReason::Overloaded.description()),
                Code::Unimplemented => (Code::Unimplemented, "generation does not support this call"),
                _ => (Code::Unavailable, FallbackReason::Error.description()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(status: Status) -> UpstreamError {
        UpstreamError::from_client(status)
    }

    fn upstream(mut status: Status) -> UpstreamError {
        status.metadata_mut().insert(ORIGIN_KEY, ORIGIN_UPSTREAM.parse().unwrap());
        from(status)
    }

    #[test]
    fn broken_connections_are_the_replicas_server_statuses_are_what_they_say() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(matches!(from(Status::from_error(Box::new(io))), UpstreamError::Transport(_)));
        let mut cancelled = Status::cancelled("operation was canceled");
        cancelled.set_source(std::sync::Arc::new(std::io::Error::other("connection closed")));
        assert!(matches!(from(cancelled), UpstreamError::Transport(_)));
        assert!(matches!(from(Status::unknown("the server said so")), UpstreamError::Status { .. }));
        assert!(matches!(from(Status::unavailable("x")), UpstreamError::Status { origin: Origin::Replica, .. }));
        assert!(matches!(upstream(Status::unavailable("x")), UpstreamError::Status { origin: Origin::Upstream, .. }));
    }

    #[test]
    fn failures_are_charged_to_what_failed() {
        assert_eq!(upstream(Status::unavailable("dead upstream")).charge(), Some(Charge::Model));
        assert_eq!(upstream(Status::resource_exhausted("429")).charge(), Some(Charge::Model));
        assert_eq!(from(Status::unavailable("shutting down")).charge(), Some(Charge::Replica));
        let io = std::io::Error::other("refused");
        assert_eq!(from(Status::from_error(Box::new(io))).charge(), Some(Charge::Replica));
        let timeout = |cause| UpstreamError::Timeout { after: Duration::from_secs(1), cause };
        assert_eq!(timeout(TimeoutCause::PerTry).charge(), Some(Charge::Model));
        assert_eq!(timeout(TimeoutCause::Gateway).charge(), Some(Charge::Model));
        assert_eq!(timeout(TimeoutCause::Client).charge(), None, "the client's own deadline");
        assert_eq!(from(Status::invalid_argument("bad")).charge(), None);
        assert_eq!(upstream(Status::invalid_argument("upstream said 400")).charge(), None);
        assert_eq!(UpstreamError::CircuitOpen.charge(), None);
    }

    #[test]
    fn an_upstream_refusing_the_mesh_is_the_operators_mistake_not_the_clients() {
        let refused = || upstream(Status::failed_precondition("upstream authentication failed (HTTP 401)"));
        assert_eq!(refused().charge(), Some(Charge::Model));
        assert_eq!(refused().fallback_reason(), Some(FallbackReason::Error));
        assert!(!refused().is_retryable(), "every replica has the same configuration");
        let status = refused().into_status();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().starts_with(FallbackReason::Error.description()), "{status:?}");
        assert!(!status.message().contains("401"), "{status:?}");
        // Generation's own FAILED_PRECONDITION is about the request, as before.
        let own = from(Status::failed_precondition("about the request"));
        assert_eq!((own.charge(), own.fallback_reason()), (None, None));
        assert_eq!(own.into_status().code(), Code::FailedPrecondition);
    }

    #[test]
    fn only_what_another_try_may_fix_is_retried() {
        assert!(upstream(Status::unavailable("x")).is_retryable());
        assert!(from(Status::resource_exhausted("x")).is_retryable());
        assert!(UpstreamError::Timeout { after: Duration::ZERO, cause: TimeoutCause::PerTry }.is_retryable());
        assert!(!UpstreamError::Timeout { after: Duration::ZERO, cause: TimeoutCause::Client }.is_retryable());
        assert!(!from(Status::invalid_argument("x")).is_retryable());
        assert!(!UpstreamError::CircuitOpen.is_retryable());
    }

    #[test]
    fn pushback_is_read_from_the_status() {
        let mut status = Status::resource_exhausted("slow down");
        status.metadata_mut().insert("grpc-retry-pushback-ms", "300".parse().unwrap());
        assert_eq!(from(status).pushback(), Some(Some(Duration::from_millis(300))));
        let mut status = Status::resource_exhausted("stop");
        status.metadata_mut().insert("grpc-retry-pushback-ms", "-1".parse().unwrap());
        assert_eq!(from(status).pushback(), Some(None));
        assert_eq!(from(Status::unavailable("x")).pushback(), None);
    }

    #[test]
    fn only_generation_trouble_falls_back() {
        assert_eq!(from(Status::unavailable("down")).fallback_reason(), Some(FallbackReason::Error));
        assert_eq!(from(Status::deadline_exceeded("slow")).fallback_reason(), Some(FallbackReason::Timeout));
        assert_eq!(from(Status::resource_exhausted("429")).fallback_reason(), Some(FallbackReason::Overloaded));
        assert_eq!(UpstreamError::CircuitOpen.fallback_reason(), Some(FallbackReason::CircuitOpen));
        assert_eq!(from(Status::invalid_argument("bad")).fallback_reason(), None);
        assert_eq!(from(Status::permission_denied("no")).fallback_reason(), None);
    }

    #[test]
    fn clients_see_no_internals() {
        let leaky = upstream(Status::unavailable("upstream failed (HTTP 401): sk-secret at http://10.1.2.3:8000"));
        let status = leaky.into_status();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("10.1.2.3") && !status.message().contains("sk-secret"), "{status:?}");
        assert!(status.metadata().get(ORIGIN_KEY).is_none());
        // A client's mistake keeps generation's words.
        let bad = from(Status::invalid_argument("model: unknown model \"x\"; available: sim")).into_status();
        assert_eq!(bad.message(), "model: unknown model \"x\"; available: sim");
        // A retry hint survives.
        let mut limited = Status::resource_exhausted("upstream rate limit (HTTP 429)");
        limited.metadata_mut().insert("grpc-retry-pushback-ms", "1000".parse().unwrap());
        let status = from(limited).into_status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "1000");
    }
}

//! Why a model's upstream failed, and the status a caller sees for it.
//!
//! Promises:
//! - Every failure a provider reports is the upstream's (the endpoint's answer, its connection, its
//!   pace, its size, or a fault-injection model's injected failure), and its status carries the
//!   metadata `llmesh-failure-origin: upstream` (`llmesh_proto::failure`), in the trailers when a
//!   stream fails after its first chunk. Callers charge it to the model, not to the replica.
//! - The status message is a short description fixed by the kind of failure (`upstream
//!   authentication failed (HTTP 401)`): never the upstream's body, a URL, a key or an error chain.
//!   Those are the `detail`, which goes to the log at warn, its URLs redacted and the model's key
//!   scrubbed by the provider that wrote it.
//!
//! Does not promise that the detail is free of every secret an upstream may echo in its body: the
//! log is for operators, and its access is theirs to control.

use tonic::{Code, Status, metadata::MetadataValue};

use super::failure::{Failure, RATE_LIMIT_PUSHBACK_MS};

/// A failure of a model's upstream.
#[derive(Debug)]
pub struct UpstreamError {
    kind: Kind,
    /// What went wrong, for the log only.
    detail: String,
}

/// The kinds of upstream failure, each with its gRPC code and fixed description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// HTTP 429, with the wait the upstream asked for.
    RateLimited { retry_after_ms: Option<u64> },
    /// HTTP 400, 413 or 422: the upstream refused this request.
    Rejected { http: u16 },
    /// HTTP 401 or 403: llmesh's credentials for the upstream are wrong.
    Unauthorized { http: u16 },
    /// HTTP 404: the upstream does not serve the configured model.
    NoSuchModel,
    /// Any other HTTP error.
    Failed { http: u16 },
    /// No answer at all: connection refused, DNS, TLS.
    Unreachable,
    /// No response head, first chunk or next chunk in time.
    Stalled { what: &'static str },
    /// The connection broke during the answer.
    Broken,
    /// The stream ended without a finish.
    Unfinished,
    /// An answer llmesh cannot read.
    Malformed,
    /// The answer went past its size limit (bytes); the upstream call was dropped there.
    TooLarge { limit: u64 },
    /// A fault-injection model's failure.
    Injected(Failure),
}

impl Kind {
    pub fn code(self) -> Code {
        match self {
            Self::RateLimited { .. } | Self::Injected(Failure::RateLimited) => Code::ResourceExhausted,
            Self::Rejected { .. } => Code::InvalidArgument,
            Self::Unauthorized { .. } | Self::NoSuchModel => Code::FailedPrecondition,
            Self::Failed { .. }
            | Self::Unreachable
            | Self::Stalled { .. }
            | Self::Broken
            | Self::Unfinished
            | Self::Malformed
            | Self::TooLarge { .. }
            | Self::Injected(Failure::Unavailable) => Code::Unavailable,
        }
    }

    /// The status message: fixed text and numbers llmesh chose, nothing the upstream sent.
    fn description(self) -> String {
        match self {
            Self::RateLimited { .. } => "upstream rate limit (HTTP 429)".into(),
            Self::Rejected { http } => format!("upstream rejected the request (HTTP {http})"),
            Self::Unauthorized { http } => format!("upstream authentication failed (HTTP {http})"),
            Self::NoSuchModel => "upstream does not serve the model (HTTP 404)".into(),
            Self::Failed { http } => format!("upstream failed (HTTP {http})"),
            Self::Unreachable => "upstream unavailable".into(),
            Self::Stalled { what } => format!("upstream stalled: no {what} in time"),
            Self::Broken => "upstream connection broke during the answer".into(),
            Self::Unfinished => "upstream closed the stream before finishing".into(),
            Self::Malformed => "upstream sent a malformed answer".into(),
            Self::TooLarge { limit } => format!("upstream answer exceeds the size limit of {limit} bytes"),
            Self::Injected(Failure::Unavailable) => "sim: injected failure".into(),
            Self::Injected(Failure::RateLimited) => "sim: injected rate limit".into(),
        }
    }

    /// The wait to send back as retry pushback.
    fn pushback_ms(self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after_ms } => retry_after_ms,
            Self::Injected(Failure::RateLimited) => Some(RATE_LIMIT_PUSHBACK_MS),
            _ => None,
        }
    }
}

impl UpstreamError {
    pub fn new(kind: Kind, detail: impl Into<String>) -> Self {
        Self { kind, detail: detail.into() }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn code(&self) -> Code {
        self.kind.code()
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The status for the caller. The detail is logged here, once per failed call: at warn for a
    /// real upstream, at debug for an injected failure (chaos tests make thousands).
    pub fn into_status(self, model: &str) -> Status {
        let message = self.kind.description();
        if matches!(self.kind, Kind::Injected(_)) {
            tracing::debug!(model, code = ?self.kind.code(), "{message}");
        } else {
            tracing::warn!(model, code = ?self.kind.code(), detail = %self.detail, "{message}");
        }
        let mut status = Status::new(self.kind.code(), message);
        let metadata = status.metadata_mut();
        metadata.insert(
            llmesh_proto::failure::ORIGIN_KEY,
            MetadataValue::from_static(llmesh_proto::failure::ORIGIN_UPSTREAM),
        );
        if let Some(ms) = self.kind.pushback_ms() {
            let pushback = MetadataValue::from(ms);
            metadata.insert("grpc-retry-pushback-ms", pushback.clone());
            metadata.insert("retry-after-ms", pushback);
        }
        status
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.description(), self.detail)
    }
}

impl std::error::Error for UpstreamError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(status: &Status) -> Option<&str> {
        status.metadata().get(llmesh_proto::failure::ORIGIN_KEY).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn every_kind_is_marked_upstream_and_says_nothing_of_the_detail() {
        let kinds = [
            Kind::RateLimited { retry_after_ms: Some(2_000) },
            Kind::Rejected { http: 400 },
            Kind::Unauthorized { http: 401 },
            Kind::NoSuchModel,
            Kind::Failed { http: 502 },
            Kind::Unreachable,
            Kind::Stalled { what: "chunk" },
            Kind::Broken,
            Kind::Unfinished,
            Kind::Malformed,
            Kind::TooLarge { limit: 10 },
            Kind::Injected(Failure::Unavailable),
            Kind::Injected(Failure::RateLimited),
        ];
        for kind in kinds {
            let status = UpstreamError::new(kind, "http://user:sk-secret@internal.example/v1 said no").into_status("m");
            assert_eq!(status.code(), kind.code());
            assert_eq!(origin(&status), Some(llmesh_proto::failure::ORIGIN_UPSTREAM), "{kind:?}");
            assert!(!status.message().contains("secret") && !status.message().contains("internal"), "{status:?}");
        }
    }

    #[test]
    fn rate_limits_push_back() {
        let status = UpstreamError::new(Kind::RateLimited { retry_after_ms: Some(2_000) }, "").into_status("m");
        assert_eq!(status.metadata().get("grpc-retry-pushback-ms").map(|v| v.to_str().ok()), Some(Some("2000")));
        let status = UpstreamError::new(Kind::Injected(Failure::RateLimited), "").into_status("m");
        assert_eq!(status.metadata().get("retry-after-ms").map(|v| v.to_str().ok()), Some(Some("1000")));
        let status = UpstreamError::new(Kind::Unreachable, "").into_status("m");
        assert!(status.metadata().get("grpc-retry-pushback-ms").is_none());
    }
}

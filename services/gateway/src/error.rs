//! [`CallError`]: why a call got no answer, one type from the first admission layer to the edge.
//!
//! Every step that can refuse a call says why in this type — auth, the rate limiter, the budgets,
//! load shedding, the call's deadline, the token admission, the cache (ONLY_IF_CACHED) and the
//! pipeline to generation ([`UpstreamError`]) — and every edge asks it the questions it needs:
//! the gRPC code and status ([`CallError::into_status`]), the [`Class`] an HTTP dialect answers
//! with its own status and error type, the request field at fault ([`CallError::param`]), when to
//! retry ([`CallError::retry`]) and what the key has left ([`CallError::quota`]). No edge parses a
//! message or re-reads a metadata string.
//!
//! The admission layers are tower layers over HTTP requests that know nothing of the protocol:
//! they answer a refusal with a gRPC trailers-only response ([`CallError::into_http`]) that also
//! carries the `CallError` in its extensions, where the HTTP routes' boundary finds it.

use std::{sync::Arc, time::Duration};

use http::StatusCode;
use tonic::{
    Code, Status,
    metadata::{MetadataMap, MetadataValue},
};

use crate::{
    headers::{Quota, RETRY_AFTER_MS, RETRY_PUSHBACK_MS},
    pipeline::UpstreamError,
};

/// Why a call got no answer. Cheap to clone (the admission layers keep one in the response's
/// extensions).
#[derive(Debug, Clone)]
pub enum CallError {
    /// The request is malformed, over a limit, or asks for something the mesh does not do.
    Invalid { param: Option<Arc<str>>, message: String },
    /// No key, or one that matches none.
    Unauthenticated(&'static str),
    /// The key may not do this (use that model).
    Forbidden(String),
    /// The configuration cannot serve this key's call as asked (a budgeted key and an unpriced
    /// model). FAILED_PRECONDITION.
    Precondition(String),
    /// Nothing to answer with: ONLY_IF_CACHED and a miss, or a model nobody serves.
    NotFound { param: Option<&'static str>, message: String },
    /// Over one of the key's own limits (requests or tokens per minute).
    RateLimited { message: String, retry: Retry, quota: Quota },
    /// The key's or its team's spend budget for the period is spent: waiting a minute will not help.
    OverBudget { message: String, quota: Quota },
    /// No room now: the whole gateway (`whole: true`) or the key's own bound of calls in flight.
    Overloaded { message: String, whole: bool, retry_after: Duration },
    /// The call ran out of time: the client's own deadline (`client: true`) or the gateway's.
    Timeout { message: String, client: bool },
    /// The client went away.
    Cancelled(String),
    /// Generation could not answer (or refused, for the client's own mistake).
    Upstream(Arc<UpstreamError>),
}

/// When a refused client may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Nothing to say.
    Unknown,
    /// After this long.
    After(Duration),
    /// Not with the same request: it can never fit.
    Never,
}

/// What went wrong, as the HTTP dialects tell it apart: each answers a class with its own HTTP
/// status ([`Class::http_status`], the same on every route) and error type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The request is malformed or asks for something the mesh does not do (400).
    InvalidRequest,
    /// No key, or an unknown one (401).
    Unauthenticated,
    /// The key may not do this, e.g. use that model (403).
    PermissionDenied,
    /// An unknown model, route or object (404).
    NotFound,
    /// The route does not take this method (405).
    MethodNotAllowed,
    /// The body is over `http.max_body_bytes` (413).
    TooLarge,
    /// The key is over one of its limits: requests or tokens per minute, calls in flight (429).
    RateLimited,
    /// The key's or its team's spend budget for the period is spent (429; OpenAI's
    /// `insufficient_quota`).
    OverBudget,
    /// The gateway, or generation behind it, has no room now (503).
    Overloaded,
    /// The call ran out of time: the client's own timeout (408) or the gateway's (504).
    Timeout { client: bool },
    /// Generation could not answer (503).
    Unavailable,
    /// The client went away (499: nobody reads it).
    Cancelled,
    /// A fault of the gateway's own (500): never a client's mistake.
    Internal,
}

impl Class {
    /// The HTTP status every dialect answers this class with.
    pub fn http_status(self) -> StatusCode {
        match self {
            Self::InvalidRequest => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::PermissionDenied => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited | Self::OverBudget => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded | Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout { client: true } => StatusCode::REQUEST_TIMEOUT,
            Self::Timeout { client: false } => StatusCode::GATEWAY_TIMEOUT,
            // Nobody reads it: nginx's "client closed request".
            Self::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The class of a bare gRPC code, for a status that reached an edge without a `CallError`
    /// (a stream's chunk, a refusal of tonic's own).
    pub fn of_code(code: Code) -> Self {
        match code {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition | Code::AlreadyExists => {
                Self::InvalidRequest
            }
            Code::Aborted => Self::InvalidRequest,
            Code::Unauthenticated => Self::Unauthenticated,
            Code::PermissionDenied => Self::PermissionDenied,
            Code::NotFound | Code::Unimplemented => Self::NotFound,
            Code::ResourceExhausted => Self::RateLimited,
            Code::DeadlineExceeded => Self::Timeout { client: false },
            Code::Unavailable => Self::Unavailable,
            Code::Cancelled => Self::Cancelled,
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => Self::Internal,
        }
    }
}

impl CallError {
    /// A request the gateway cannot take, naming the field at fault: the message is
    /// `"{param}: {detail}"`, the gateway's validation convention.
    pub fn invalid(param: impl Into<Arc<str>>, detail: impl std::fmt::Display) -> Self {
        let param = param.into();
        Self::Invalid { message: format!("{param}: {detail}"), param: Some(param) }
    }

    /// ONLY_IF_CACHED, and the cache has nothing.
    pub fn not_cached() -> Self {
        Self::NotFound {
            param: None,
            message: "cache: no cached answer for this request (policy ONLY_IF_CACHED)".into(),
        }
    }

    /// The gRPC code this failure is answered with.
    pub fn grpc_code(&self) -> Code {
        match self {
            Self::Invalid { .. } => Code::InvalidArgument,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::Forbidden(_) => Code::PermissionDenied,
            Self::Precondition(_) => Code::FailedPrecondition,
            Self::NotFound { .. } => Code::NotFound,
            Self::RateLimited { .. } | Self::OverBudget { .. } | Self::Overloaded { .. } => Code::ResourceExhausted,
            Self::Timeout { .. } => Code::DeadlineExceeded,
            Self::Cancelled(_) => Code::Cancelled,
            Self::Upstream(error) => error.client_code(),
        }
    }

    /// How the HTTP dialects tell this failure apart. Generation's refusal of a request is the
    /// client's mistake and classed by its code; generation or its upstream out of capacity is
    /// `Overloaded`, not the key's own limit.
    pub fn class(&self) -> Class {
        match self {
            Self::Invalid { .. } | Self::Precondition(_) => Class::InvalidRequest,
            Self::Unauthenticated(_) => Class::Unauthenticated,
            Self::Forbidden(_) => Class::PermissionDenied,
            Self::NotFound { .. } => Class::NotFound,
            Self::RateLimited { .. } => Class::RateLimited,
            Self::OverBudget { .. } => Class::OverBudget,
            Self::Overloaded { whole: true, .. } => Class::Overloaded,
            Self::Overloaded { whole: false, .. } => Class::RateLimited,
            Self::Timeout { client, .. } => Class::Timeout { client: *client },
            Self::Cancelled(_) => Class::Cancelled,
            Self::Upstream(error) => match Class::of_code(error.client_code()) {
                Class::RateLimited => Class::Overloaded,
                class => class,
            },
        }
    }

    /// The request field at fault, when the failure is about one.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::Invalid { param, .. } => param.as_deref(),
            Self::NotFound { param, .. } => *param,
            _ => None,
        }
    }

    /// When to try again.
    pub fn retry(&self) -> Retry {
        match self {
            Self::RateLimited { retry, .. } => *retry,
            Self::OverBudget { .. } => Retry::Never,
            Self::Overloaded { retry_after, .. } => Retry::After(*retry_after),
            Self::Upstream(error) => match error.pushback() {
                Some(Some(wait)) => Retry::After(wait),
                Some(None) => Retry::Never,
                None => Retry::Unknown,
            },
            _ => Retry::Unknown,
        }
    }

    /// How long to wait before trying again, when that helps.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.retry() {
            Retry::After(wait) => Some(wait),
            Retry::Unknown | Retry::Never => None,
        }
    }

    /// What the key has left, as the limiter or the budgets reported it.
    pub fn quota(&self) -> Quota {
        match self {
            Self::RateLimited { quota, .. } | Self::OverBudget { quota, .. } => *quota,
            _ => Quota::default(),
        }
    }

    /// The words a client sees. Generation's failures that are not the client's mistake are a
    /// fixed description and the trace id (their detail goes to the log): see
    /// [`UpstreamError::client_message`].
    pub fn message(&self) -> String {
        match self {
            Self::Invalid { message, .. }
            | Self::Forbidden(message)
            | Self::Precondition(message)
            | Self::NotFound { message, .. }
            | Self::RateLimited { message, .. }
            | Self::OverBudget { message, .. }
            | Self::Overloaded { message, .. }
            | Self::Timeout { message, .. }
            | Self::Cancelled(message) => message.clone(),
            Self::Unauthenticated(message) => (*message).to_string(),
            Self::Upstream(error) => error.client_message(),
        }
    }

    /// The gRPC status: code, message, the retry hint (`retry-after-ms` and
    /// `grpc-retry-pushback-ms`, negative for never) and what the key has left.
    pub fn to_status(&self) -> Status {
        let mut metadata = MetadataMap::new();
        self.quota().write_metadata(&mut metadata);
        match self.retry() {
            Retry::After(wait) => {
                let ms = u64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u64::MAX);
                metadata.insert(RETRY_AFTER_MS, MetadataValue::from(ms));
                metadata.insert(RETRY_PUSHBACK_MS, MetadataValue::from(ms));
            }
            Retry::Never => {
                metadata.insert(RETRY_PUSHBACK_MS, MetadataValue::from(-1i64));
            }
            Retry::Unknown => {}
        }
        if let Self::Upstream(error) = self {
            error.log();
        }
        Status::with_metadata(self.grpc_code(), self.message(), metadata)
    }

    pub fn into_status(self) -> Status {
        self.to_status()
    }

    /// The refusal as an HTTP response of an admission layer: a gRPC trailers-only response,
    /// with this error in its extensions for the HTTP routes' boundary.
    pub fn into_http<B: Default>(self) -> http::Response<B> {
        let mut response = self.to_status().into_http();
        response.extensions_mut().insert(self);
        response
    }
}

impl From<llmesh_proto::validate::Invalid> for CallError {
    fn from(invalid: llmesh_proto::validate::Invalid) -> Self {
        let message = invalid.to_string();
        Self::Invalid { param: Some(invalid.field.into()), message }
    }
}

impl From<UpstreamError> for CallError {
    fn from(error: UpstreamError) -> Self {
        Self::Upstream(Arc::new(error))
    }
}

impl From<CallError> for Status {
    fn from(error: CallError) -> Self {
        error.into_status()
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Upstream(error) => write!(f, "{error}"),
            other => f.write_str(&other.message()),
        }
    }
}

impl std::error::Error for CallError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_its_code_class_and_hint() {
        let quota = Quota { remaining_requests: Some(0), ..Quota::default() };
        let limited = CallError::RateLimited {
            message: "rate limit: 2 requests per minute for key alice".into(),
            retry: Retry::After(Duration::from_millis(1500)),
            quota,
        };
        assert_eq!((limited.grpc_code(), limited.class()), (Code::ResourceExhausted, Class::RateLimited));
        let status = limited.to_status();
        assert_eq!(status.metadata().get(RETRY_AFTER_MS).unwrap(), "1500");
        assert_eq!(status.metadata().get(crate::headers::REMAINING_REQUESTS).unwrap(), "0");

        let spent = CallError::OverBudget { message: "budget: spent".into(), quota: Quota::default() };
        assert_eq!(
            (spent.grpc_code(), spent.class(), spent.retry()),
            (Code::ResourceExhausted, Class::OverBudget, Retry::Never)
        );
        assert_eq!(spent.to_status().metadata().get(RETRY_PUSHBACK_MS).unwrap(), "-1");

        let full = |whole| CallError::Overloaded { message: "full".into(), whole, retry_after: Duration::from_secs(1) };
        assert_eq!(full(true).class(), Class::Overloaded, "the gateway is full: 503");
        assert_eq!(full(false).class(), Class::RateLimited, "the key's own bound: 429");
    }

    #[test]
    fn the_field_at_fault_is_typed_not_parsed() {
        let error = CallError::invalid("max_tokens", "5000 exceeds the limit of 4096");
        assert_eq!(error.param(), Some("max_tokens"));
        assert_eq!(error.message(), "max_tokens: 5000 exceeds the limit of 4096");
        assert_eq!(error.class().http_status(), StatusCode::BAD_REQUEST);
        assert_eq!(CallError::Forbidden("model: no".into()).param(), None);
    }

    #[test]
    fn a_refusal_travels_in_the_response_extensions() {
        let response: http::Response<tonic::body::Body> = CallError::Unauthenticated("missing x-api-key").into_http();
        assert_eq!(Status::from_header_map(response.headers()).unwrap().code(), Code::Unauthenticated);
        assert!(matches!(response.extensions().get::<CallError>(), Some(CallError::Unauthenticated(_))));
    }

    #[test]
    fn generation_out_of_capacity_is_overloaded_not_the_keys_limit() {
        let error = CallError::from(UpstreamError::from_client(Status::resource_exhausted("upstream 429")));
        assert_eq!(error.class(), Class::Overloaded);
        assert_eq!(CallError::not_cached().class(), Class::NotFound);
    }
}

//! Failures of the HTTP routes, in one vocabulary every API maps to its own status and shape.
//!
//! A failure reaches an HTTP route as a `tonic::Status`: from an admission layer (auth, rate
//! limit, load shed: a trailers-only gRPC response, translated at the routes' boundary by
//! [`RejectionLayer`]), from the call's admission or answer, or from the route itself (a body that
//! is not what the API expects). [`Problem::from_status`] is the one place a gRPC code becomes a
//! [`Kind`]; each API then answers a kind with its own HTTP status and error body, in one function
//! per API (`openai::error`, `anthropic::error`, `seed::error`). The gRPC code travels along in the
//! response's extensions, so the tracing layer counts an HTTP failure under the same `status` as
//! the equal gRPC one.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};

use super::Api;
use llmesh_ratelimit::budget::usd_to_nanos;

use crate::admission::{
    Quota,
    budget::{OverBudget, REMAINING_USD},
    rate_limit::{REMAINING_REQUESTS, REMAINING_TOKENS, RETRY_AFTER_MS},
    shed::Overloaded,
};

/// What went wrong, as the HTTP APIs tell it apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
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
    /// `insufficient_quota`): waiting a minute will not help.
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

impl Kind {
    /// The HTTP status every API answers this kind with: each API's own convention where it has
    /// one, and the same status on every route.
    pub fn status(self) -> StatusCode {
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
}

/// One failure of an HTTP route: its kind, the gRPC code it stands for, the words for the client,
/// the request field at fault (when the words name one), and what to tell a client that may retry.
#[derive(Debug, Clone)]
pub struct Problem {
    pub kind: Kind,
    pub code: Code,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<Duration>,
    /// What the key has left, as the limiter reported it (`x-ratelimit-remaining-*`).
    pub quota: Quota,
}

impl Problem {
    /// The one mapping of gRPC codes to kinds. An `INVALID_ARGUMENT` message starts with the
    /// field at fault (the gateway's validation convention): that field is the `param`. A
    /// RESOURCE_EXHAUSTED caused by [`OverBudget`] (a refusal for budget) is `OverBudget`.
    pub fn from_status(status: &Status) -> Self {
        let kind = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition | Code::AlreadyExists => {
                Kind::InvalidRequest
            }
            Code::Aborted => Kind::InvalidRequest,
            Code::Unauthenticated => Kind::Unauthenticated,
            Code::PermissionDenied => Kind::PermissionDenied,
            Code::NotFound | Code::Unimplemented => Kind::NotFound,
            Code::ResourceExhausted if OverBudget::caused(status) => Kind::OverBudget,
            Code::ResourceExhausted => Kind::RateLimited,
            Code::DeadlineExceeded => Kind::Timeout { client: false },
            Code::Unavailable => Kind::Unavailable,
            Code::Cancelled => Kind::Cancelled,
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => Kind::Internal,
        };
        let param = (kind == Kind::InvalidRequest).then(|| field_of(status.message())).flatten();
        let metadata = status.metadata();
        let retry_after = metadata
            .get(RETRY_AFTER_MS)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_millis);
        let remaining = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        let remaining_budget =
            metadata.get(REMAINING_USD).and_then(|v| usd_to_nanos(v.to_str().ok()?.trim().parse::<f64>().ok()?));
        let quota = Quota {
            remaining_requests: remaining(REMAINING_REQUESTS),
            remaining_tokens: remaining(REMAINING_TOKENS),
            remaining_budget,
        };
        Self { kind, code: status.code(), message: status.message().to_string(), param, retry_after, quota }
    }

    /// A request the route cannot take, naming the field at fault.
    pub fn invalid(param: impl Into<String>, message: impl std::fmt::Display) -> Self {
        let param = param.into();
        let message = format!("{param}: {message}");
        Self { param: Some(param), ..Self::new(Kind::InvalidRequest, Code::InvalidArgument, message) }
    }

    pub fn new(kind: Kind, code: Code, message: impl Into<String>) -> Self {
        Self { kind, code, message: message.into(), param: None, retry_after: None, quota: Quota::default() }
    }

    /// A body over the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            Kind::TooLarge,
            Code::ResourceExhausted,
            format!("request body: larger than the limit of {limit} bytes"),
        )
    }

    /// The response with the kind's status and `body`, with the headers every API sends with an error: the retry hint
    /// (`Retry-After` in seconds, `retry-after-ms` as the OpenAI SDKs read it), what the key has
    /// left, and the gRPC code for the tracing layer.
    pub fn respond(&self, body: &serde_json::Value) -> Response<Body> {
        let mut response = super::json_response(self.kind.status(), body);
        let headers = response.headers_mut();
        self.quota.write_headers(headers);
        if let Some(wait) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(wait.as_millis().div_ceil(1000).max(1) as u64));
            headers.insert(HeaderName::from_static(RETRY_AFTER_MS), HeaderValue::from(wait.as_millis() as u64));
        }
        response.extensions_mut().insert(self.code);
        response
    }
}

/// The field an INVALID_ARGUMENT message starts with (`"max_tokens: 5000 exceeds ..."`), if any.
fn field_of(message: &str) -> Option<String> {
    let (field, _) = message.split_once(':')?;
    let plausible = !field.is_empty()
        && field.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'))
        && !field.starts_with(|c: char| c.is_ascii_digit());
    plausible.then(|| field.to_string())
}

/// Turns the admission layers' refusals (gRPC trailers-only responses) of plain HTTP requests
/// into the API's own error response, at the boundary of the HTTP routes: outside auth, the rate
/// limit and load shedding, which stay protocol-blind. gRPC calls pass untouched. A refusal because
/// the whole gateway was full (the shed layer's [`Overloaded`] mark) is `Overloaded`; any other
/// RESOURCE_EXHAUSTED there is the key's own limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct RejectionLayer;

impl<S> Layer<S> for RejectionLayer {
    type Service = Rejections<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rejections { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Rejections<S> {
    inner: S,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl<S> Service<Request<Body>> for Rejections<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures::future::Either<S::Future, BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if super::is_grpc(&request) {
            return futures::future::Either::Left(self.inner.call(request));
        }
        let api = Api::of_path(request.uri().path());
        let call = self.inner.call(request);
        futures::future::Either::Right(Box::pin(async move {
            let response = call.await?;
            Ok(translate(api, response))
        }))
    }
}

/// `response` in `api`'s terms when it is a gRPC refusal; otherwise as it is.
fn translate(api: Api, response: Response<Body>) -> Response<Body> {
    let Some(status) = Status::from_header_map(response.headers()) else { return response };
    if status.code() == Code::Ok {
        return response;
    }
    let mut problem = Problem::from_status(&status);
    if response.extensions().get::<Overloaded>().is_some() {
        problem.kind = Kind::Overloaded;
    }
    api.error(problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_kind_and_client_mistakes_are_never_internal() {
        let client = [
            (Code::InvalidArgument, Kind::InvalidRequest),
            (Code::OutOfRange, Kind::InvalidRequest),
            (Code::FailedPrecondition, Kind::InvalidRequest),
            (Code::Unauthenticated, Kind::Unauthenticated),
            (Code::PermissionDenied, Kind::PermissionDenied),
            (Code::NotFound, Kind::NotFound),
            (Code::ResourceExhausted, Kind::RateLimited),
        ];
        for (code, kind) in client {
            assert_eq!(Problem::from_status(&Status::new(code, "x")).kind, kind, "{code:?}");
        }
        assert_eq!(Problem::from_status(&Status::deadline_exceeded("x")).kind, Kind::Timeout { client: false });
        assert_eq!(Problem::from_status(&Status::unavailable("x")).kind, Kind::Unavailable);
        assert_eq!(Problem::from_status(&Status::internal("x")).kind, Kind::Internal);
    }

    #[test]
    fn the_field_at_fault_is_the_param() {
        let problem = Problem::from_status(&Status::invalid_argument("max_tokens: 5000 exceeds the limit of 4096"));
        assert_eq!(problem.param.as_deref(), Some("max_tokens"));
        let problem = Problem::from_status(&Status::invalid_argument("messages[2].role: \"robot\" is not one of"));
        assert_eq!(problem.param.as_deref(), Some("messages[2].role"));
        assert_eq!(Problem::from_status(&Status::invalid_argument("no field here")).param, None);
        assert_eq!(Problem::from_status(&Status::invalid_argument("a sentence: then")).param, None);
        assert_eq!(Problem::from_status(&Status::permission_denied("model: no")).param, None);
    }

    #[test]
    fn a_refusal_for_budget_is_its_own_kind() {
        let mut status = Status::resource_exhausted("budget: team search has spent $5.000000 of its $5.000000 budget");
        status.metadata_mut().insert(REMAINING_USD, "0.250000".parse().unwrap());
        // The rate limiter's refusal has the same code and no such cause.
        assert_eq!(Problem::from_status(&status).kind, Kind::RateLimited);
        status.set_source(std::sync::Arc::new(OverBudget));
        let problem = Problem::from_status(&status);
        assert_eq!(problem.kind, Kind::OverBudget);
        assert_eq!(problem.quota.remaining_budget, Some(250_000_000));
        let response = problem.respond(&serde_json::json!({}));
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[REMAINING_USD], "0.250000");
    }

    #[test]
    fn the_retry_hint_and_quota_come_along() {
        let mut status = Status::resource_exhausted("rate limit: 2 requests per minute for key alice");
        status.metadata_mut().insert(RETRY_AFTER_MS, "1500".parse().unwrap());
        status.metadata_mut().insert(REMAINING_REQUESTS, "0".parse().unwrap());
        let problem = Problem::from_status(&status);
        assert_eq!(problem.retry_after, Some(Duration::from_millis(1500)));
        let response = problem.respond(&serde_json::json!({}));
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(response.headers()[RETRY_AFTER_MS], "1500");
        assert_eq!(response.headers()[REMAINING_REQUESTS], "0");
        assert_eq!(response.extensions().get::<Code>(), Some(&Code::ResourceExhausted));
    }
}

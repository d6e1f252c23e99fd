//! Failures of the HTTP routes, in one vocabulary every API maps to its own status and shape.
//!
//! A failure reaches an HTTP route as a [`CallError`]: from an admission layer (auth, rate limit,
//! load shed: a trailers-only gRPC response with the error in its extensions, translated at the
//! routes' boundary by [`RejectionLayer`]), from the call's admission or answer, or from the route
//! itself (a body that is not what the API expects: [`Problem::invalid`]). Its [`Class`] decides
//! the HTTP status; each API answers a class with its own error body, in one function per API
//! ([`super::dialect::Dialect::error_body`]). The gRPC code travels along in the
//! response's extensions, so the tracing layer counts an HTTP failure under the same `status` as
//! the equal gRPC one.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderName, HeaderValue, Request, Response, header};
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};

use super::Api;
use crate::{
    error::{CallError, Class},
    headers::{Quota, RETRY_AFTER_MS},
};

/// One failure of an HTTP route: its class, the gRPC code it stands for, the words for the client,
/// the request field at fault, and what to tell a client that may retry — each read off the
/// typed [`CallError`], never parsed from words.
#[derive(Debug, Clone)]
pub struct Problem {
    pub class: Class,
    pub code: Code,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<Duration>,
    /// What the key has left, as the limiter reported it (`x-ratelimit-remaining-*`).
    pub quota: Quota,
}

impl From<&CallError> for Problem {
    fn from(error: &CallError) -> Self {
        Self {
            class: error.class(),
            code: error.grpc_code(),
            message: error.message(),
            param: error.param().map(str::to_string),
            retry_after: error.retry_after(),
            quota: error.quota(),
        }
    }
}

impl Problem {
    /// A status that reached a route without a [`CallError`] (a stream's failure after its
    /// headers, or a refusal of tonic's own): classed by its code alone.
    pub fn from_status(status: &Status) -> Self {
        Self::new(Class::of_code(status.code()), status.code(), status.message())
    }

    /// A request the route cannot take, naming the field at fault.
    pub fn invalid(param: impl Into<String>, message: impl std::fmt::Display) -> Self {
        let param = param.into();
        let message = format!("{param}: {message}");
        Self { param: Some(param), ..Self::new(Class::InvalidRequest, Code::InvalidArgument, message) }
    }

    pub fn new(class: Class, code: Code, message: impl Into<String>) -> Self {
        Self { class, code, message: message.into(), param: None, retry_after: None, quota: Quota::default() }
    }

    /// A body over the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            Class::TooLarge,
            Code::ResourceExhausted,
            format!("request body: larger than the limit of {limit} bytes"),
        )
    }

    /// The response with the class's status and `body`, with the headers every API sends with an error: the retry hint
    /// (`Retry-After` in seconds, `retry-after-ms` as the OpenAI SDKs read it), what the key has
    /// left, and the gRPC code for the tracing layer.
    pub fn respond(&self, body: &serde_json::Value) -> Response<Body> {
        let mut response = super::json_response(self.class.http_status(), body);
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

/// Turns the admission layers' refusals (gRPC trailers-only responses carrying their
/// [`CallError`]) of plain HTTP requests into the API's own error response, at the boundary of the
/// HTTP routes: outside auth, the rate limit and load shedding, which stay protocol-blind. gRPC
/// calls pass untouched.
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
    let problem = match response.extensions().get::<CallError>() {
        Some(error) => Problem::from(error),
        None => Problem::from_status(&status),
    };
    api.error(problem)
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;
    use crate::{
        error::Retry,
        headers::{REMAINING_REQUESTS, REMAINING_USD},
    };

    #[test]
    fn every_code_has_a_class_and_client_mistakes_are_never_internal() {
        let client = [
            (Code::InvalidArgument, Class::InvalidRequest),
            (Code::OutOfRange, Class::InvalidRequest),
            (Code::FailedPrecondition, Class::InvalidRequest),
            (Code::Unauthenticated, Class::Unauthenticated),
            (Code::PermissionDenied, Class::PermissionDenied),
            (Code::NotFound, Class::NotFound),
            (Code::ResourceExhausted, Class::RateLimited),
        ];
        for (code, class) in client {
            assert_eq!(Problem::from_status(&Status::new(code, "x")).class, class, "{code:?}");
        }
        assert_eq!(Problem::from_status(&Status::deadline_exceeded("x")).class, Class::Timeout { client: false });
        assert_eq!(Problem::from_status(&Status::unavailable("x")).class, Class::Unavailable);
        assert_eq!(Problem::from_status(&Status::internal("x")).class, Class::Internal);
    }

    #[test]
    fn the_field_at_fault_is_the_param() {
        let problem = Problem::from(&CallError::invalid("max_tokens", "5000 exceeds the limit of 4096"));
        assert_eq!(problem.param.as_deref(), Some("max_tokens"));
        assert_eq!(problem.message, "max_tokens: 5000 exceeds the limit of 4096");
        // A status without a typed error has no param: nothing is parsed out of its words.
        assert_eq!(Problem::from_status(&Status::invalid_argument("max_tokens: 5000")).param, None);
        assert_eq!(Problem::from(&CallError::Forbidden("model: no".into())).param, None);
    }

    #[test]
    fn a_refusal_for_budget_is_its_own_class() {
        let quota = Quota { remaining_budget: Some(250_000_000), ..Quota::default() };
        let spent = CallError::OverBudget { message: "budget: team search has spent $5".into(), quota };
        let problem = Problem::from(&spent);
        assert_eq!(problem.class, Class::OverBudget);
        assert_eq!(problem.quota.remaining_budget, Some(250_000_000));
        let response = problem.respond(&serde_json::json!({}));
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[REMAINING_USD], "0.250000");
    }

    #[test]
    fn the_retry_hint_and_quota_come_along() {
        let limited = CallError::RateLimited {
            message: "rate limit: 2 requests per minute for key alice".into(),
            retry: Retry::After(Duration::from_millis(1500)),
            quota: Quota { remaining_requests: Some(0), ..Quota::default() },
        };
        let problem = Problem::from(&limited);
        assert_eq!(problem.retry_after, Some(Duration::from_millis(1500)));
        let response = problem.respond(&serde_json::json!({}));
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(response.headers()[RETRY_AFTER_MS], "1500");
        assert_eq!(response.headers()[REMAINING_REQUESTS], "0");
        assert_eq!(response.extensions().get::<Code>(), Some(&Code::ResourceExhausted));
    }

    #[test]
    fn an_admission_refusal_is_translated_from_its_typed_error() {
        let full = CallError::Overloaded {
            message: "overloaded".into(),
            whole: true,
            retry_after: Duration::from_millis(250),
        };
        let response = translate(Api::OpenAi, full.into_http());
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "the whole gateway is full");
        let own = CallError::Overloaded {
            message: "overloaded".into(),
            whole: false,
            retry_after: Duration::from_millis(250),
        };
        assert_eq!(translate(Api::OpenAi, own.into_http()).status(), StatusCode::TOO_MANY_REQUESTS, "the key's bound");
    }
}

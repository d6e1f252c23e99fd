//! The gateway's HTTP routes: the OpenAI Chat Completions API (`POST /v1/chat/completions`,
//! `GET /v1/models`), Anthropic's Messages API (`POST /v1/messages`) and the seed's
//! `POST /generate`, on the gateway's own port (HTTP/1.1 and HTTP/2).
//!
//! What it promises:
//! - The routes are thin translators. Each turns its body into the same typed `GenerateRequest`
//!   a gRPC call makes, and takes the same path: the server's tracing layer and the admission
//!   layers (auth — `x-api-key` or `Authorization: Bearer` —, request rate, load shedding) run
//!   before any route, then [`GatewayService::unary`] / [`GatewayService::stream`] admit the
//!   call's tokens, answer it (cache, single flight, the pipeline: fallback, retry, breakers,
//!   balance) and settle it. An HTTP request and the equal gRPC request share one cache entry:
//!   the cache key is made from the typed request, which does not know how it came.
//! - Errors are each API's own: its HTTP status and its error body ([`errors`]), 500 never for a
//!   client's mistake. A field the mesh does not support is a 400 naming it, not ignored.
//! - Deadlines: the configured `request_timeout_ms`, or less when the client says so in
//!   `x-llmesh-timeout-ms` (milliseconds) or `x-stainless-timeout` (seconds, which the official
//!   OpenAI and Anthropic SDKs send).
//! - Streams are server-sent events, one write per chunk as it arrives; a client that goes away
//!   drops the stream, which cancels the call to generation and settles the tokens received so
//!   far, as on gRPC. A failure before the first chunk is an ordinary error response (or, when a
//!   fallback answered, an ordinary stream of the fallback's text).
//! - The mesh's own facts go in response headers: `x-llmesh-cached`, `x-llmesh-provider`,
//!   `x-llmesh-degraded` (the fallback's reason) and `x-llmesh-degraded-source`, `x-request-id`,
//!   `x-llmesh-trace-id`, and the key's `x-ratelimit-remaining-*`.
//! - `x-llmesh-cache: default | bypass | refresh | only-if-cached` sets the cache policy of the
//!   OpenAI and Anthropic routes (the seed's body has a `cache` field, as the gRPC request does).
//! - The translation between each API and the contract is a [`dialect::Dialect`]; [`route`] serves
//!   every dialect with one function.
//!
//! What it does not: audio, `n` > 1, logprobs. `/v1/completions` (the legacy text API) is not
//! served.

mod dialect;
mod errors;
mod route;
mod sse;

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use llmesh_common::server::HttpService;
use llmesh_proto::{
    common::v1::{CachePolicy, Degraded, FinishReason},
    gateway::v1 as gw,
};
use prost::bytes::Bytes;
use serde::{Deserialize, Serialize};
use tonic::{Code, body::Body};
use tower::Service;

use self::dialect::{Anthropic, Dialect, OpenAi, Responses, Seed};
pub use self::errors::{Problem, RejectionLayer};
use crate::{
    admission::Quota,
    answer::relay::ChunkStream,
    catalog::Catalog,
    deadline::Deadline,
    error::{CallError, Class},
    service::GatewayService,
};

/// `[gateway.http]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve the HTTP routes on the gateway's port (which then takes HTTP/1.1 too).
    pub enabled: bool,
    /// Largest request body, in bytes; a larger one is refused with 413. 0 (the default): what
    /// the largest valid request can take as JSON (`Limits::max_json_body_bytes`: [`JSON_PER_BYTE`]
    /// times the request limits' largest message without inline data, plus that data as base64;
    /// 50,275,828 bytes, about 48 MiB, with the default limits).
    pub max_body_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { enabled: true, max_body_bytes: 0 }
    }
}

/// JSON may write a byte of a string as six (`\u0000`): so many bytes of body a byte of a
/// request may take.
pub const JSON_PER_BYTE: usize = 6;

impl HttpConfig {
    /// The body limit in force: the configured one, or the one derived from `limits`.
    pub fn body_limit(&self, limits: &llmesh_proto::validate::Limits) -> usize {
        match self.max_body_bytes {
            0 => limits.max_json_body_bytes(),
            bytes => bytes,
        }
    }
}

/// The client's own timeout, in milliseconds.
const TIMEOUT_MS_HEADER: &str = "x-llmesh-timeout-ms";
/// The client's own timeout, in seconds, as the official OpenAI and Anthropic SDKs send it.
const SDK_TIMEOUT_HEADER: &str = "x-stainless-timeout";
/// The cache policy of the OpenAI and Anthropic routes.
const CACHE_HEADER: &str = "x-llmesh-cache";

/// The routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    ChatCompletions,
    Models,
    Messages,
    Responses,
    Generate,
}

impl Route {
    const ALL: [Route; 5] = [Self::ChatCompletions, Self::Models, Self::Messages, Self::Responses, Self::Generate];

    fn of(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|route| route.path() == path)
    }

    fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Models => "/v1/models",
            Self::Messages => "/v1/messages",
            Self::Responses => "/v1/responses",
            Self::Generate => "/generate",
        }
    }

    fn method(self) -> Method {
        match self {
            Self::Models => Method::GET,
            _ => Method::POST,
        }
    }
}

/// Which API's conventions a plain HTTP request is answered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Anthropic,
    Seed,
}

impl Api {
    /// Anthropic's for its route, the seed's for `/generate`, OpenAI's for everything else.
    fn of_path(path: &str) -> Self {
        match Route::of(path) {
            Some(Route::Messages) => Self::Anthropic,
            Some(Route::Generate) => Self::Seed,
            _ => Self::OpenAi,
        }
    }

    /// The error response in this API's terms.
    fn error(self, problem: Problem) -> Response<Body> {
        match self {
            Self::OpenAi => OpenAi::error(&problem),
            Self::Anthropic => Anthropic::error(&problem),
            Self::Seed => Seed::error(&problem),
        }
    }
}

/// A gRPC call (whose refusals stay gRPC responses), as opposed to a plain HTTP request.
fn is_grpc<B>(request: &Request<B>) -> bool {
    request.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Serves the HTTP routes; see the module docs.
#[derive(Debug, Clone)]
pub struct Ingress {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    gateway: GatewayService,
    catalog: Catalog,
    default_model: Option<String>,
    max_body_bytes: usize,
    /// The request limits' `max_messages`: no list in a body is read past it.
    max_messages: usize,
}

impl Ingress {
    pub fn new(
        gateway: GatewayService,
        catalog: Catalog,
        default_model: Option<String>,
        config: &HttpConfig,
        limits: &llmesh_proto::validate::Limits,
    ) -> Self {
        let default_model = default_model.filter(|model| !model.trim().is_empty());
        let max_body_bytes = config.body_limit(limits);
        let shared = Shared { gateway, catalog, default_model, max_body_bytes, max_messages: limits.max_messages };
        Self { shared: Arc::new(shared) }
    }

    /// `inner` (the gRPC services) with the HTTP routes beside it: the innermost step of the
    /// server's stack, so that every admission layer runs before a route too.
    pub fn around(&self, inner: HttpService) -> HttpService {
        HttpService::new(Routed { inner, ingress: self.clone() })
    }

    async fn handle(self, route: Route, request: Request<Body>) -> Response<Body> {
        let api = Api::of_path(route.path());
        if request.method() != route.method() {
            let message = format!("{} takes {} requests, not {}", route.path(), route.method(), request.method());
            let mut response = api.error(Problem::new(Class::MethodNotAllowed, Code::InvalidArgument, message));
            let allow = if route.method() == Method::GET { "GET" } else { "POST" };
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
            return response;
        }
        let (parts, body) = request.into_parts();
        let result = match route {
            Route::ChatCompletions => route::serve::<OpenAi>(&self, parts, body).await,
            Route::Models => route::models(&self, parts).await,
            Route::Messages => route::serve::<Anthropic>(&self, parts, body).await,
            Route::Responses => route::serve::<Responses>(&self, parts, body).await,
            Route::Generate => route::serve::<Seed>(&self, parts, body).await,
        };
        result.unwrap_or_else(|problem| api.error(problem))
    }

    fn gateway(&self) -> &GatewayService {
        &self.shared.gateway
    }

    /// The request body, at most `max_body_bytes` long, read within the call's `deadline`: a
    /// client that sends its body slowly holds its call slot no longer than any call.
    async fn body(&self, body: Body, deadline: Deadline) -> Result<Bytes, Problem> {
        let limit = self.shared.max_body_bytes;
        let read = tokio::time::timeout(deadline.remaining(), http_body_util::Limited::new(body, limit).collect());
        let Ok(read) = read.await else {
            let code = Code::DeadlineExceeded;
            let class = Class::Timeout { client: deadline.client_bound() };
            return Err(Problem::new(class, code, "request body: not received within the call's deadline"));
        };
        match read {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(Problem::too_large(limit)),
            // The client stopped sending mid-body.
            Err(error) => Err(Problem::new(Class::Cancelled, Code::Cancelled, format!("request body: {error}"))),
        }
    }

    /// The request limits' `max_messages`: no list in a body is read past it.
    fn max_objects(&self) -> usize {
        self.shared.max_messages
    }

    /// The call's deadline: the configured limit, or the client's own timeout when shorter.
    fn deadline(&self, headers: &HeaderMap) -> Result<Deadline, Problem> {
        let limit = self.shared.gateway.request_timeout();
        let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or_default().trim());
        let client = match (text(TIMEOUT_MS_HEADER), text(SDK_TIMEOUT_HEADER)) {
            (Some(ms), _) => Some(Duration::from_millis(
                ms.parse::<u64>()
                    .map_err(|_| Problem::invalid(TIMEOUT_MS_HEADER, "must be a whole number of milliseconds"))?,
            )),
            // The SDKs' own header: a value this gateway cannot read is no deadline of the client's.
            (None, Some(seconds)) => seconds.parse::<f64>().ok().and_then(|s| Duration::try_from_secs_f64(s).ok()),
            (None, None) => None,
        };
        Ok(Deadline::within(client, limit))
    }

    /// The cache policy `x-llmesh-cache` asks for (DEFAULT without it).
    fn cache_policy(headers: &HeaderMap) -> Result<i32, Problem> {
        let Some(value) = headers.get(CACHE_HEADER) else { return Ok(CachePolicy::Default.into()) };
        let text = value.to_str().unwrap_or_default();
        cache_policy_named(text)
            .ok_or_else(|| Problem::invalid(CACHE_HEADER, format_args!("{text:?} is not one of {CACHE_POLICIES}")))
    }

    /// The model a request names, or the configured default (`/generate` only).
    fn default_model(&self) -> Option<&str> {
        self.shared.default_model.as_deref()
    }

    /// A failed call in the HTTP APIs' terms: as its class says, except that generation refusing a
    /// model nobody lists is 404 for `model`, and a timeout says whose deadline it was.
    /// `model`: the model the call asked for (`None` for a call about no model, such as listing).
    fn call_problem(&self, error: CallError, model: Option<&str>, deadline: Deadline) -> Problem {
        let mut problem = Problem::from(&error);
        if let CallError::Upstream(upstream) = &error {
            // The client sees a fixed description; the detail goes to the log, as on gRPC.
            upstream.log();
            problem.class = for_deadline(problem.class, deadline);
            if problem.class == Class::InvalidRequest && model.is_some_and(|model| !self.shared.catalog.knows(model)) {
                problem.class = Class::NotFound;
                problem.param = Some("model".into());
            }
        }
        problem
    }

    /// A stream's first chunk (its facts make the response headers), and the stream from there on.
    /// A failure before the first chunk is the call's failure.
    async fn first_chunk(
        chunks: ChunkStream,
        deadline: Deadline,
    ) -> Result<(gw::GenerateStreamResponse, ChunkStream), Problem> {
        use futures::StreamExt as _;
        let mut chunks = chunks;
        match chunks.next().await {
            Some(Ok(first)) => Ok((first.clone(), futures::stream::once(async { Ok(first) }).chain(chunks).boxed())),
            Some(Err(status)) => Err(upstream_problem(&status, deadline)),
            None => Err(Problem::new(Class::Unavailable, Code::Unavailable, "generation sent an empty stream")),
        }
    }
}

/// A stream's failure from generation (the relay's words, no typed error left), in the HTTP APIs'
/// terms: generation out of capacity is `Overloaded`, not the key's own limit.
fn upstream_problem(status: &tonic::Status, deadline: Deadline) -> Problem {
    let mut problem = Problem::from_status(status);
    problem.class = match problem.class {
        Class::RateLimited => Class::Overloaded,
        class => for_deadline(class, deadline),
    };
    problem
}

/// A timeout's class, saying whose deadline it was.
fn for_deadline(class: Class, deadline: Deadline) -> Class {
    match class {
        Class::Timeout { .. } => Class::Timeout { client: deadline.client_bound() },
        class => class,
    }
}

/// The policies `x-llmesh-cache` (and the seed's `cache` field) may name.
const CACHE_POLICIES: &str = "default, bypass, refresh, only-if-cached";

/// A cache policy by its short name (`bypass`) or its proto name (`CACHE_POLICY_BYPASS`).
fn cache_policy_named(name: &str) -> Option<i32> {
    let name = name.trim().to_ascii_lowercase().replace('_', "-");
    let name = name.strip_prefix("cache-policy-").unwrap_or(&name);
    let policy = match name {
        "default" | "unspecified" => CachePolicy::Default,
        "bypass" => CachePolicy::Bypass,
        "refresh" => CachePolicy::Refresh,
        "only-if-cached" => CachePolicy::OnlyIfCached,
        _ => return None,
    };
    Some(policy.into())
}

/// What the mesh says about an answer, as response headers.
struct Facts<'a> {
    id: &'a str,
    cached: bool,
    provider: &'a str,
    degraded: Option<&'a Degraded>,
    quota: Quota,
}

impl Facts<'_> {
    fn write(&self, headers: &mut HeaderMap) {
        let mut put = |name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        };
        put("x-request-id", self.id);
        put("x-llmesh-cached", if self.cached { "true" } else { "false" });
        if !self.provider.is_empty() {
            put("x-llmesh-provider", self.provider);
        }
        if let Some(degraded) = self.degraded {
            put("x-llmesh-degraded", &degraded.reason);
            put("x-llmesh-degraded-source", &degraded.source);
        }
        if let Some(trace) = llmesh_telemetry::current_trace_id() {
            put("x-llmesh-trace-id", &trace);
        }
        self.quota.write_headers(headers);
    }
}

/// A JSON response.
fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Body::new(http_body_util::Full::new(Bytes::from(bytes))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Seconds since the epoch, for the `created` fields.
fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// The finish reason's enum value.
fn finish_reason(value: i32) -> FinishReason {
    FinishReason::try_from(value).unwrap_or(FinishReason::Unspecified)
}

/// The gRPC services with the HTTP routes beside them.
#[derive(Clone)]
struct Routed {
    inner: HttpService,
    ingress: Ingress,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl Service<Request<Body>> for Routed {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures::future::Either<<HttpService as Service<Request<Body>>>::Future, BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        use futures::future::Either;
        if let Some(route) = Route::of(request.uri().path()) {
            let ingress = self.ingress.clone();
            return Either::Right(Box::pin(async move { Ok(ingress.handle(route, request).await) }));
        }
        if !is_grpc(&request) {
            // Not a route and not gRPC: an HTTP client that lost its way gets a 404 it can read.
            let message = format!("no route {} {}", request.method(), request.uri().path());
            let response = Api::OpenAi.error(Problem::new(Class::NotFound, Code::Unimplemented, message));
            return Either::Right(Box::pin(async move { Ok(response) }));
        }
        Either::Left(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_limit_follows_the_request_limits_unless_set() {
        let limits = llmesh_proto::validate::Limits::default();
        let derived = HttpConfig::default().body_limit(&limits);
        assert_eq!(derived, limits.max_json_body_bytes());
        assert!(derived > limits.max_request_bytes(), "{derived}");
        let wider = llmesh_proto::validate::Limits { max_prompt_bytes: 1 << 20, ..limits.clone() };
        assert!(HttpConfig::default().body_limit(&wider) > 6 << 20, "grows with the limits");
        let set = HttpConfig { max_body_bytes: 1000, ..HttpConfig::default() };
        assert_eq!(set.body_limit(&limits), 1000);
    }

    #[test]
    fn every_route_has_its_own_metric_label() {
        for route in Route::ALL {
            assert_eq!(llmesh_telemetry::http_route(route.path()), Some(route.path()), "{route:?}");
            assert_eq!(Route::of(route.path()), Some(route));
        }
    }

    #[test]
    fn cache_policies_by_either_name() {
        assert_eq!(cache_policy_named("bypass"), Some(CachePolicy::Bypass.into()));
        assert_eq!(cache_policy_named("CACHE_POLICY_ONLY_IF_CACHED"), Some(CachePolicy::OnlyIfCached.into()));
        assert_eq!(cache_policy_named("Only-If-Cached"), Some(CachePolicy::OnlyIfCached.into()));
        assert_eq!(cache_policy_named("sometimes"), None);
    }

    #[test]
    fn the_client_timeout_binds_when_shorter() {
        // The deadline helper without a gateway: the same arithmetic as `Ingress::deadline`.
        let client = Deadline::within(Some(Duration::from_millis(100)), Duration::from_secs(30));
        assert!(client.client_bound());
        let configured = Deadline::within(Some(Duration::from_secs(600)), Duration::from_secs(30));
        assert!(!configured.client_bound());
    }
}

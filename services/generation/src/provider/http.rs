//! What every provider that calls an HTTP API shares, whatever its wire format: the settings, the
//! client, the key, the call's time and size limits, the mapping of HTTP failures to
//! [`UpstreamError`]s, and the driver of a Server-Sent Events answer. A provider brings its wire
//! format: the body it sends, how it reads a unary answer ([`ReadAnswer`]) and a [`Decoder`] for
//! its stream's events.
//!
//! Upstream failures map to gRPC codes a caller can act on: 429 is RESOURCE_EXHAUSTED with the
//! upstream's Retry-After as `grpc-retry-pushback-ms`, 5xx, resets and stalls are UNAVAILABLE, a
//! malformed chunk is a clear UNAVAILABLE rather than a hang. The caller sees a fixed description;
//! the log gets the detail (the upstream's status, a fragment of its body, the error chain, the
//! URL with its credentials redacted, the model's key scrubbed).
//!
//! An answer has a total size limit (`max_response_bytes`, else the generation-wide default): a
//! unary body, or all the bytes of a stream, past it is UNAVAILABLE and the upstream call is
//! dropped at that point. An error body is read only up to a few KiB, for the log.

use std::{collections::BTreeMap, collections::VecDeque, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
use llmesh_proto::common::v1::Usage;
use llmesh_util::{errors::error_chain, redact::redact_url};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use super::{
    Catalog, Event, EventStream, Mode,
    error::{Kind, UpstreamError},
    headroom::Headroom,
    sse::SseParser,
};

/// The generation-wide default of `max_response_bytes`.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 8 * 1024 * 1024;
/// How much of an error body is read, for the log.
const ERROR_BODY_BYTES: usize = 4 * 1024;
/// How much of it the log shows.
const ERROR_DETAIL_CHARS: usize = 200;

/// A model served by an HTTP API (`[generation.models.NAME]` with `provider = "openai"`,
/// `"azure"`, `"anthropic"` or `"gemini"`). What is unset takes the provider's default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpModelConfig {
    /// Where the API is. OpenAI-compatible: up to and including the version
    /// (`https://api.openai.com/v1`, `http://127.0.0.1:8000/v1`); Anthropic: the host
    /// (`https://api.anthropic.com`), as its SDKs take it; Azure: the resource's endpoint
    /// (`https://NAME.openai.azure.com`, required); Gemini: the host
    /// (`https://generativelanguage.googleapis.com`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// The model name sent upstream; empty means the name clients use.
    pub upstream_model: String,
    /// Environment variable holding the API key (`OPENAI_API_KEY`, `AZURE_OPENAI_API_KEY`,
    /// `ANTHROPIC_API_KEY`, `GEMINI_API_KEY` when unset). A variable that is unset or empty means no key (fine for vLLM, Ollama, llama.cpp);
    /// `""` means none is looked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// File holding the API key (wins over the variable), e.g. a mounted secret.
    pub api_key_file: Option<PathBuf>,
    /// Headers sent with every call besides the provider's own (`anthropic-beta`, `OpenAI-Project`,
    /// ...). Never the key: that comes from `api_key_env` or `api_key_file`, so that no file holds
    /// it by accident. A name the provider sets itself replaces the provider's value
    /// (`anthropic-version`).
    pub headers: BTreeMap<String, String>,
    pub connect_timeout_ms: u64,
    /// Longest wait for the response head and, when streaming, the first chunk.
    pub first_token_timeout_ms: u64,
    /// Longest gap between two streamed chunks.
    pub idle_timeout_ms: u64,
    /// Longest a whole call may take.
    pub total_timeout_ms: u64,
    /// Declare that the upstream answers the same request the same way (safe to cache at any temperature).
    pub deterministic: bool,
    /// Largest answer, in bytes: a unary body, or the total of a stream. Unset means the
    /// generation-wide `max_upstream_response_bytes` (8 MiB by default).
    pub max_response_bytes: Option<u64>,
    /// The model's context window, output limit and capabilities, as the operator knows them.
    pub catalog: Catalog,
}

impl Default for HttpModelConfig {
    fn default() -> Self {
        Self {
            base_url: None,
            upstream_model: String::new(),
            api_key_env: None,
            api_key_file: None,
            headers: BTreeMap::new(),
            connect_timeout_ms: 2_000,
            first_token_timeout_ms: 30_000,
            idle_timeout_ms: 30_000,
            total_timeout_ms: 300_000,
            deterministic: false,
            max_response_bytes: None,
            catalog: Catalog::default(),
        }
    }
}

/// What a provider brings to [`Upstream::new`]: its defaults and how its API takes a key.
pub struct Api {
    /// The provider's name in responses and metrics.
    pub name: &'static str,
    /// The base URL when the model sets none; empty: the model must set one.
    pub base_url: &'static str,
    /// The path under the base URL, e.g. `/chat/completions`; `{model}` stands for the upstream
    /// model's name (Gemini's `/v1beta/models/{model}:generateContent`).
    pub path: &'static str,
    /// The path of a streamed call, when it differs (empty: `path`).
    pub stream_path: &'static str,
    /// The key's variable when the model names none.
    pub api_key_env: &'static str,
    /// How the key goes.
    pub auth: Auth,
    /// Headers of the provider's own, before the model's `headers`.
    pub headers: &'static [(&'static str, &'static str)],
}

/// How an API takes its key.
#[derive(Debug, Clone, Copy)]
pub enum Auth {
    /// `Authorization: Bearer KEY`.
    Bearer,
    /// The key as the whole value of a header (`x-api-key`).
    Header(&'static str),
}

/// Headers a model's `headers` may not set: every API's key header (a test holds each [`Auth`]
/// of the providers to this list), and what every call sets itself.
const OWN_HEADERS: &[&str] =
    &["authorization", "x-api-key", "api-key", "x-goog-api-key", "content-type", "content-length", "host"];

/// One model's HTTP API: the client, the endpoint, the key and the limits of a call.
pub struct Upstream {
    /// The provider's name ([`Api::name`]).
    name: &'static str,
    client: reqwest::Client,
    /// A unary call's endpoint.
    unary: Endpoint,
    /// A streamed call's (most APIs': the same).
    stream: Endpoint,
    /// Shared with each call's error path, which scrubs it from what the upstream said.
    key: Option<Arc<str>>,
    auth: Auth,
    /// Every call's headers but the key's.
    headers: HeaderMap,
    first_token: Duration,
    idle: Duration,
    total: Duration,
    max_response_bytes: u64,
    /// What the last response's rate-limit headers said.
    headroom: Arc<Headroom>,
}

/// An endpoint, parsed once: a malformed `base_url` stops start-up (naming the model) instead of
/// failing every call, and no call parses it again.
struct Endpoint {
    url: reqwest::Url,
    /// `url` with any credentials in it hidden, as errors name it: worked out once, not per call.
    shown: Arc<str>,
}

impl Endpoint {
    /// `path` under `base_url`; `model` names the model in errors.
    fn new(model: &str, base_url: &str, path: &str) -> anyhow::Result<Self> {
        let url = endpoint(model, base_url, path)?;
        Ok(Self { shown: redact_url(url.as_str()).into(), url })
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Upstream").field("url", &self.unary.shown).finish_non_exhaustive()
    }
}

/// Reads a whole unary answer into its events; the `u32` is the prompt's estimated tokens, for an
/// answer without usage.
pub type ReadAnswer = fn(&[u8], u32) -> Result<Vec<Event>, UpstreamError>;

impl Upstream {
    /// `name` is the model's, for start-up errors, `model` the upstream's name for it;
    /// `max_response_bytes` the generation-wide default, for a model that sets none.
    pub fn new(
        name: &str,
        model: &str,
        config: &HttpModelConfig,
        api: &Api,
        max_response_bytes: u64,
    ) -> anyhow::Result<Self> {
        let key = read_key(name, config, api)?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .with_context(|| format!("model {name}: building the HTTP client"))?;
        let base_url = config.base_url.as_deref().unwrap_or(api.base_url);
        if base_url.is_empty() {
            anyhow::bail!("model {name}: a {} model needs a base_url (its endpoint)", api.name);
        }
        // The model's name goes in some APIs' paths (Gemini's).
        let in_path = api.path.contains("{model}") || api.stream_path.contains("{model}");
        if in_path && !model.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
            anyhow::bail!("model {name}: the upstream model name {model:?} has characters a URL path cannot hold");
        }
        let stream_path = if api.stream_path.is_empty() { api.path } else { api.stream_path };
        Ok(Self {
            name: api.name,
            client,
            unary: Endpoint::new(name, base_url, &api.path.replace("{model}", model))?,
            stream: Endpoint::new(name, base_url, &stream_path.replace("{model}", model))?,
            key: key.map(Arc::from),
            auth: api.auth,
            headers: headers(name, api.headers, &config.headers)?,
            first_token: Duration::from_millis(config.first_token_timeout_ms),
            idle: Duration::from_millis(config.idle_timeout_ms),
            total: Duration::from_millis(config.total_timeout_ms),
            max_response_bytes: config.max_response_bytes.unwrap_or(max_response_bytes),
            headroom: Arc::default(),
        })
    }

    /// The provider's name, as responses and metrics give it.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Until when the upstream's rate-limit headers said it has no headroom, if still ahead.
    pub fn exhausted_until(&self, now: Instant) -> Option<Instant> {
        self.headroom.exhausted_until(now)
    }

    /// Calls the API with `body` and reads its answer: whole with `read` (unary), or as
    /// Server-Sent Events through `decoder`. `prompt_tokens` is the prompt's estimate. Nothing is
    /// sent, and no time limit starts, until the stream is first polled: a model group may make a
    /// call it only sends when the deployments before it failed.
    pub fn call<D: Decoder>(
        &self,
        body: String,
        mode: Mode,
        prompt_tokens: u32,
        read: ReadAnswer,
        decoder: D,
    ) -> EventStream {
        let endpoint = if mode == Mode::Stream { &self.stream } else { &self.unary };
        let send = self.send(endpoint, body);
        let (idle, first_token, total, limit) = (self.idle, self.first_token, self.total, self.max_response_bytes);
        match mode {
            Mode::Unary => Box::pin(
                futures::stream::once(async move {
                    let (response, started) = send.await?;
                    let deadline = started + total;
                    let body = within(deadline, "completion", read_body(response, limit)).await??;
                    read(&body, prompt_tokens)
                })
                .map(|result: Result<Vec<Event>, UpstreamError>| match result {
                    Ok(events) => futures::stream::iter(events.into_iter().map(Ok)).left_stream(),
                    Err(error) => futures::stream::once(async move { Err(error) }).right_stream(),
                })
                .flatten(),
            ),
            Mode::Stream => Box::pin(
                futures::stream::once(async move {
                    let (response, started) = send.await?;
                    let limits = StreamLimits { first_token, idle, deadline: started + total, bytes: limit };
                    Ok::<_, UpstreamError>(SseStream::new(response.bytes_stream(), decoder, limits).into_stream())
                })
                .map(|result| match result {
                    Ok(events) => events.left_stream(),
                    Err(error) => futures::stream::once(async move { Err(error) }).right_stream(),
                })
                .flatten(),
            ),
        }
    }

    /// Sends the request and checks the status, starting the call's clock when first polled (the
    /// `Instant` it answers). The response head must come within the first token timeout (and the
    /// total).
    fn send(
        &self,
        endpoint: &Endpoint,
        body: String,
    ) -> impl std::future::Future<Output = Result<(reqwest::Response, Instant), UpstreamError>> + Send + 'static {
        let mut builder = self
            .client
            .post(endpoint.url.clone())
            .headers(self.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(key) = &self.key {
            builder = match self.auth {
                Auth::Bearer => builder.bearer_auth(key),
                Auth::Header(name) => builder.header(name, key.as_ref()),
            };
        }
        let (first_token, total) = (self.first_token, self.total);
        let (url, key, headroom) = (endpoint.shown.clone(), self.key.clone(), self.headroom.clone());
        async move {
            let started = Instant::now();
            let deadline = (started + first_token).min(started + total);
            let response = within(deadline, "response", builder.send()).await?.map_err(|e| {
                // The URL is logged once, redacted: reqwest's own message would show it whole.
                UpstreamError::new(Kind::Unreachable, format!("POST {url}: {}", error_chain(&e.without_url())))
            })?;
            headroom.note(response.headers());
            if response.status().is_success() {
                return Ok((response, started));
            }
            let status = response.status();
            let headers = response.headers().clone();
            let body =
                within(deadline, "error body", read_prefix(response, ERROR_BODY_BYTES)).await.unwrap_or_default();
            let detail = scrub(&error_detail(&body), key.as_deref());
            Err(http_error(status, &headers, format!("HTTP {} from POST {url}: {detail}", status.as_u16())))
        }
    }
}

/// The model's key: its file's, else its variable's (none when that is unset or empty).
fn read_key(name: &str, config: &HttpModelConfig, api: &Api) -> anyhow::Result<Option<String>> {
    if let Some(path) = &config.api_key_file {
        let key = std::fs::read_to_string(path)
            .with_context(|| format!("model {name}: cannot read api_key_file {}", path.display()))?;
        return Ok(Some(key.trim().to_string()));
    }
    let variable = config.api_key_env.as_deref().unwrap_or(api.api_key_env);
    if variable.is_empty() {
        return Ok(None);
    }
    let key = std::env::var(variable).ok().filter(|k| !k.is_empty());
    if key.is_none() {
        tracing::warn!(
            model = name,
            api_key_env = %variable,
            "the model's api_key_env names an unset or empty variable: calls go without a key \
             (fine for keyless servers such as Ollama, vLLM or llama.cpp; an API that needs one answers 401)"
        );
    }
    Ok(key)
}

/// The provider's headers, then the model's: a bad name or value, or one that would carry a key,
/// stops start-up naming the model and the header (never its value).
fn headers(
    name: &str,
    own: &[(&'static str, &'static str)],
    configured: &BTreeMap<String, String>,
) -> anyhow::Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for (header, value) in own {
        map.insert(HeaderName::from_static(header), HeaderValue::from_static(value));
    }
    for (header, value) in configured {
        let parsed = HeaderName::from_bytes(header.as_bytes())
            .with_context(|| format!("model {name}: headers: {header:?} is not a header name"))?;
        if OWN_HEADERS.contains(&parsed.as_str()) {
            anyhow::bail!(
                "model {name}: headers: {parsed} is set by llmesh (a key goes in api_key_env or api_key_file)"
            );
        }
        let value = HeaderValue::from_str(value)
            .with_context(|| format!("model {name}: headers: the value of {parsed} is not a header value"))?;
        map.insert(parsed, value);
    }
    Ok(map)
}

/// `path` under `base_url`.
fn endpoint(model: &str, base_url: &str, path: &str) -> anyhow::Result<reqwest::Url> {
    let url = format!("{}{path}", base_url.trim_end_matches('/'));
    match reqwest::Url::parse(&url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(url),
        Ok(_) => anyhow::bail!("model {model}: base_url {} is not an http:// or https:// URL", redact_url(base_url)),
        Err(error) => anyhow::bail!("model {model}: base_url {} is not a URL: {error}", redact_url(base_url)),
    }
}

/// Runs `future` until `deadline`; past it the upstream is UNAVAILABLE (stalled), a retryable
/// condition that the gateway's breaker counts.
async fn within<T>(
    deadline: Instant,
    what: &'static str,
    future: impl std::future::Future<Output = T>,
) -> Result<T, UpstreamError> {
    tokio::time::timeout_at(deadline, future)
        .await
        .map_err(|_| UpstreamError::new(Kind::Stalled { what }, format!("no {what} in time")))
}

fn too_large(limit: u64, what: &str) -> UpstreamError {
    UpstreamError::new(Kind::TooLarge { limit }, format!("{what} went past {limit} bytes; dropped the call"))
}

fn broken(error: reqwest::Error) -> UpstreamError {
    UpstreamError::new(Kind::Broken, error_chain(&error.without_url()))
}

/// The whole body, when it is at most `limit` bytes; past it, an error, and the rest is never read
/// (dropping the response closes the connection).
async fn read_body(mut response: reqwest::Response, limit: u64) -> Result<Vec<u8>, UpstreamError> {
    if let Some(length) = response.content_length()
        && length > limit
    {
        return Err(too_large(limit, "the completion's declared length"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(broken)? {
        if u64::try_from(body.len() + chunk.len()).unwrap_or(u64::MAX) > limit {
            return Err(too_large(limit, "the completion"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The first `limit` bytes of the body (fewer when it ends or breaks first).
async fn read_prefix(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        let Ok(Some(chunk)) = response.chunk().await else { break };
        body.extend_from_slice(&chunk[..chunk.len().min(limit - body.len())]);
    }
    body
}

/// The part of an error body worth logging: its `error.message` (OpenAI's and Anthropic's shape),
/// else its first characters.
fn error_detail(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| text.into_owned())
        .chars()
        .take(ERROR_DETAIL_CHARS)
        .collect()
}

/// `text` without the model's key, should the upstream echo it.
fn scrub(text: &str, key: Option<&str>) -> String {
    match key {
        Some(key) if key.len() >= 4 => text.replace(key, "***"),
        _ => text.to_string(),
    }
}

/// Maps an upstream HTTP error to the failure a caller can act on.
fn http_error(status: reqwest::StatusCode, headers: &HeaderMap, detail: String) -> UpstreamError {
    let retry_after_ms = retry_after(headers).map(|wait| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
    UpstreamError::new(status_kind(status.as_u16(), retry_after_ms), detail)
}

/// The failure an HTTP status code means, whether it came as the response's status or inside an
/// error body (Gemini's `error.code`); `retry_after_ms` is the upstream's wait, for a 429.
pub fn status_kind(http: u16, retry_after_ms: Option<u64>) -> Kind {
    match http {
        429 => Kind::RateLimited { retry_after_ms },
        400 | 413 | 422 => Kind::Rejected { http },
        401 | 403 => Kind::Unauthorized { http },
        404 => Kind::NoSuchModel,
        _ => Kind::Failed { http },
    }
}

/// `retry-after-ms` (OpenAI's), else `retry-after` in seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    header("retry-after").and_then(|v| v.parse::<f64>().ok()).map(|s| Duration::from_secs_f64(s.max(0.0)))
}

/// What llmesh reports when an upstream gives no usage.
pub fn estimate(prompt_tokens: u32, completion_chars: usize) -> Usage {
    let completion_tokens = llmesh_proto::validate::estimated_tokens(completion_chars);
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens.saturating_add(completion_tokens),
        estimated: true,
        ..Default::default()
    }
}

/// A malformed answer: `what` is the part that could not be read.
pub fn malformed(what: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::new(Kind::Malformed, what.to_string())
}

/// A wire format's reading of a streamed answer, one server-sent event at a time.
pub trait Decoder: Send + 'static {
    /// One event's `data`: what it adds to the answer goes onto `out`. `Ok(true)` when the answer
    /// is over: nothing more is read, and the upstream call is dropped.
    fn event(&mut self, data: &str, out: &mut VecDeque<Event>) -> Result<bool, UpstreamError>;

    /// The body ended before the answer said it was over: its last events onto `out` when it had
    /// finished all the same, else why not.
    fn end(&mut self, out: &mut VecDeque<Event>) -> Result<(), UpstreamError>;
}

/// How long and how much a stream may take.
pub struct StreamLimits {
    pub first_token: Duration,
    pub idle: Duration,
    pub deadline: Instant,
    /// Total bytes from the upstream.
    pub bytes: u64,
}

/// The state of one streamed answer.
pub struct SseStream<S, D> {
    /// The upstream's body; `None` once the answer is over (`done`), which drops the upstream call.
    bytes: Option<S>,
    parser: SseParser,
    decoder: D,
    pending: VecDeque<Event>,
    /// Delivered after `pending`: why the answer stopped short.
    error: Option<UpstreamError>,
    limits: StreamLimits,
    received: u64,
    got_first: bool,
    done: bool,
}

impl<S, B, D> SseStream<S, D>
where
    S: Stream<Item = Result<B, reqwest::Error>> + Unpin + Send + 'static,
    B: AsRef<[u8]>,
    D: Decoder,
{
    pub fn new(bytes: S, decoder: D, limits: StreamLimits) -> Self {
        Self {
            bytes: Some(bytes),
            parser: SseParser::default(),
            decoder,
            pending: VecDeque::new(),
            error: None,
            limits,
            received: 0,
            got_first: false,
            done: false,
        }
    }

    pub fn into_stream(self) -> impl Stream<Item = Result<Event, UpstreamError>> + Send + 'static {
        futures::stream::unfold(self, |mut state| async move {
            loop {
                if let Some(event) = state.pending.pop_front() {
                    return Some((Ok(event), state));
                }
                if let Some(error) = state.error.take() {
                    return Some((Err(error), state));
                }
                let mut bytes = state.bytes.take()?;
                state.pull(&mut bytes).await;
                // Past the end, the upstream call is dropped at once, not when the caller lets go.
                if !state.done {
                    state.bytes = Some(bytes);
                }
            }
        })
    }

    /// Reads the next bytes from upstream and turns them into pending events (or an error).
    async fn pull(&mut self, bytes: &mut S) {
        let gap = if self.got_first { self.limits.idle } else { self.limits.first_token };
        let wait_until = (Instant::now() + gap).min(self.limits.deadline);
        let what = if self.got_first { "chunk" } else { "first chunk" };
        match within(wait_until, what, bytes.next()).await {
            Err(error) => self.fail(error),
            Ok(None) => {
                self.done = true;
                if let Err(error) = self.decoder.end(&mut self.pending) {
                    self.error = Some(error);
                }
            }
            Ok(Some(Err(error))) => self.fail(broken(error)),
            Ok(Some(Ok(bytes))) => {
                let bytes = bytes.as_ref();
                self.received = self.received.saturating_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
                if self.received > self.limits.bytes {
                    return self.fail(too_large(self.limits.bytes, "the stream"));
                }
                match self.parser.push(bytes) {
                    Err(error) => self.fail(malformed(error)),
                    Ok(events) => {
                        for data in events {
                            match self.decoder.event(&data, &mut self.pending) {
                                Ok(over) => self.done = over,
                                Err(error) => self.fail(error),
                            }
                            self.got_first |= !self.pending.is_empty();
                            if self.done {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    fn fail(&mut self, error: UpstreamError) {
        self.error = Some(error);
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(status: u16, headers: &HeaderMap) -> UpstreamError {
        http_error(reqwest::StatusCode::from_u16(status).unwrap(), headers, String::new())
    }

    const API: Api = Api {
        name: "example",
        base_url: "https://api.example.com/v1",
        path: "/chat/completions",
        stream_path: "",
        api_key_env: "LLMESH_TEST_UNSET_KEY",
        auth: Auth::Bearer,
        headers: &[("x-version", "1")],
    };

    #[test]
    fn http_errors_map_to_actionable_codes() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "2".parse().unwrap());
        let limited = error(429, &headers);
        assert_eq!(limited.kind(), Kind::RateLimited { retry_after_ms: Some(2_000) });
        assert_eq!(limited.code(), tonic::Code::ResourceExhausted);

        let none = HeaderMap::new();
        assert_eq!(error(502, &none).code(), tonic::Code::Unavailable);
        assert_eq!(error(529, &none).code(), tonic::Code::Unavailable);
        assert_eq!(error(400, &none).code(), tonic::Code::InvalidArgument);
        assert_eq!(error(401, &none).code(), tonic::Code::FailedPrecondition);
        assert_eq!(error(404, &none).code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn a_malformed_base_url_stops_start_up_naming_the_model_and_never_its_credentials() {
        let url = endpoint("m", "http://127.0.0.1:8000/v1/", "/chat/completions").unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:8000/v1/chat/completions");
        for bad in ["http://user:s3cret@[::1/v1", "ftp://user:s3cret@host/v1", "not a url"] {
            let config = HttpModelConfig { base_url: Some(bad.into()), ..HttpModelConfig::default() };
            let error = format!("{:#}", Upstream::new("m", "m", &config, &API, 1).unwrap_err());
            assert!(error.starts_with("model m: base_url "), "{bad}: {error}");
            assert!(!error.contains("s3cret"), "{bad}: {error}");
        }
    }

    #[test]
    fn an_api_without_a_default_endpoint_needs_a_base_url() {
        let api = Api { base_url: "", ..API };
        let error = format!("{:#}", Upstream::new("m", "m", &HttpModelConfig::default(), &api, 1).unwrap_err());
        assert_eq!(error, "model m: a example model needs a base_url (its endpoint)");
        let config = HttpModelConfig { base_url: Some("https://r.openai.azure.com".into()), ..Default::default() };
        assert!(Upstream::new("m", "m", &config, &api, 1).is_ok());
    }

    #[test]
    fn headers_add_to_the_providers_and_never_carry_a_key() {
        let configured = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let map = headers("m", API.headers, &configured(&[("anthropic-beta", "a,b"), ("x-version", "2")])).unwrap();
        assert_eq!(map.get("anthropic-beta").unwrap(), "a,b");
        assert_eq!(map.get("x-version").unwrap(), "2", "the model's value replaces the provider's");
        for (name, value) in
            [("Authorization", "Bearer sk-s3cret"), ("x-api-key", "sk-s3cret"), ("x-goog-api-key", "s3cret")]
        {
            let error = format!("{:#}", headers("m", &[], &configured(&[(name, value)])).unwrap_err());
            assert!(error.contains("is set by llmesh") && !error.contains("s3cret"), "{error}");
        }
        let error = format!("{:#}", headers("m", &[], &configured(&[("x-ok", "s3cret\n")])).unwrap_err());
        assert!(error.contains("x-ok") && !error.contains("s3cret"), "{error}");
        let error = format!("{:#}", headers("m", &[], &configured(&[("bad name", "v")])).unwrap_err());
        assert!(error.contains("is not a header name"), "{error}");
    }

    #[test]
    fn no_provider_takes_its_key_in_a_header_a_model_may_set() {
        use crate::provider::{anthropic, gemini, openai};
        for api in [&openai::OPENAI, &openai::AZURE, &anthropic::API, &gemini::API] {
            let header = match api.auth {
                Auth::Bearer => "authorization",
                Auth::Header(name) => name,
            };
            assert!(OWN_HEADERS.contains(&header), "{}: {header}", api.name);
        }
    }

    #[test]
    fn the_key_comes_from_its_file_else_its_variable_and_an_empty_name_looks_for_none() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "sk-file\n").unwrap();
        let from_file = HttpModelConfig { api_key_file: Some(file), ..HttpModelConfig::default() };
        assert_eq!(read_key("m", &from_file, &API).unwrap().as_deref(), Some("sk-file"));
        let none = HttpModelConfig { api_key_env: Some(String::new()), ..HttpModelConfig::default() };
        assert_eq!(read_key("m", &none, &API).unwrap(), None);
        let unset = HttpModelConfig::default();
        assert_eq!(read_key("m", &unset, &API).unwrap(), None, "the provider's variable, unset here");
        let missing = HttpModelConfig { api_key_file: Some(dir.path().join("absent")), ..HttpModelConfig::default() };
        assert!(format!("{:#}", read_key("m", &missing, &API).unwrap_err()).starts_with("model m: cannot read"));
    }

    #[test]
    fn error_details_are_short_and_keyless() {
        assert_eq!(error_detail(br#"{"error":{"message":"slow down"}}"#), "slow down");
        assert_eq!(error_detail(br#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#), "busy");
        assert_eq!(error_detail("x".repeat(5_000).as_bytes()).len(), ERROR_DETAIL_CHARS);
        assert_eq!(scrub("bad key sk-live-123 given", Some("sk-live-123")), "bad key *** given");
        assert_eq!(scrub("no key", None), "no key");
    }

    #[test]
    fn retry_after_ms_wins() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "2".parse().unwrap());
        headers.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(150)));
    }

    #[test]
    fn estimates_when_usage_is_missing() {
        // The prompt's tokens come estimated already (`validate::estimated_prompt_tokens`).
        let usage = estimate(3, 3);
        assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), (3, 1, 4));
        assert!(usage.estimated);
    }
}

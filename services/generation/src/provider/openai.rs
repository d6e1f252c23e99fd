//! Any OpenAI-compatible chat completions endpoint: OpenAI, vLLM, Ollama, llama.cpp, LM Studio.
//!
//! Unary calls ask for a plain JSON completion; streaming calls ask for Server-Sent Events with
//! `stream_options.include_usage`, so streamed answers still report tokens. Upstream failures map
//! to gRPC codes a caller can act on: 429 is RESOURCE_EXHAUSTED with the upstream's Retry-After as
//! `grpc-retry-pushback-ms`, 5xx, resets and stalls are UNAVAILABLE, a malformed chunk is a clear
//! UNAVAILABLE rather than a hang. Every such failure is an [`UpstreamError`]: the caller sees a
//! fixed description, the log gets the detail (the upstream's status, a fragment of its body, the
//! error chain, the URL with its credentials redacted, the model's key scrubbed).
//!
//! Tools, tool calls, images, response formats, reasoning and extensions: see [`wire`], which
//! holds the wire format both ways. Streamed tool calls are passed on as deltas by their index;
//! the gateway (and a unary call here) joins the fragments.
//!
//! An answer has a total size limit (`max_response_bytes`, else the generation-wide default): a
//! unary body, or all the bytes of a stream, past it is UNAVAILABLE and the upstream call is
//! dropped at that point. An error body is read only up to a few KiB, for the log.

#[cfg(test)]
mod golden;
mod wire;

use std::{collections::VecDeque, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
use llmesh_proto::{
    assemble::MAX_ITEMS,
    common::v1::{FinishReason, Usage},
    generation::v1::GenerateRequest,
};
use llmesh_util::{errors::error_chain, redact::redact_url};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use super::{
    Event, EventStream, Mode,
    error::{Kind, UpstreamError},
    sse::SseParser,
};

/// The generation-wide default of `max_response_bytes`.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 8 * 1024 * 1024;
/// How much of an error body is read, for the log.
const ERROR_BODY_BYTES: usize = 4 * 1024;
/// How much of it the log shows.
const ERROR_DETAIL_CHARS: usize = 200;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Up to and including the version, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// The model name sent upstream; empty means the name clients use.
    pub upstream_model: String,
    /// Environment variable holding the API key. An unset variable means no key (fine for
    /// vLLM, Ollama, llama.cpp).
    pub api_key_env: String,
    /// File holding the API key (wins over the variable), e.g. a mounted secret.
    pub api_key_file: Option<PathBuf>,
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
    pub catalog: super::Catalog,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".into(),
            upstream_model: String::new(),
            api_key_env: "OPENAI_API_KEY".into(),
            api_key_file: None,
            connect_timeout_ms: 2_000,
            first_token_timeout_ms: 30_000,
            idle_timeout_ms: 30_000,
            total_timeout_ms: 300_000,
            deterministic: false,
            max_response_bytes: None,
            catalog: super::Catalog::default(),
        }
    }
}

pub struct OpenAi {
    catalog: super::Catalog,
    client: reqwest::Client,
    /// `{base_url}/chat/completions`, parsed once: a malformed `base_url` stops start-up (naming the
    /// model) instead of failing every call, and no call parses it again.
    url: reqwest::Url,
    /// `url` with any credentials in it hidden, as errors name it: worked out once, not per call.
    shown_url: Arc<str>,
    model: String,
    /// Shared with each call's error path, which scrubs it from what the upstream said.
    key: Option<Arc<str>>,
    first_token: Duration,
    idle: Duration,
    total: Duration,
    deterministic: bool,
    max_response_bytes: u64,
}

impl std::fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("OpenAi").field("url", &self.shown_url).field("model", &self.model).finish_non_exhaustive()
    }
}

impl OpenAi {
    /// `max_response_bytes` is the generation-wide default, for a model that sets none.
    pub fn new(name: &str, config: &OpenAiConfig, max_response_bytes: u64) -> anyhow::Result<Self> {
        let key = match &config.api_key_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("model {name}: cannot read api_key_file {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => {
                let key = std::env::var(&config.api_key_env).ok().filter(|k| !k.is_empty());
                if key.is_none() && !config.api_key_env.is_empty() {
                    tracing::warn!(
                        model = name,
                        api_key_env = %config.api_key_env,
                        "the model's api_key_env names an unset or empty variable: calls go without a key \
                         (fine for keyless servers such as Ollama, vLLM or llama.cpp; an API that needs one answers 401)"
                    );
                }
                key
            }
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .with_context(|| format!("model {name}: building the HTTP client"))?;
        let model = if config.upstream_model.is_empty() { name.to_string() } else { config.upstream_model.clone() };
        let url = completions_url(name, &config.base_url)?;
        Ok(Self {
            catalog: config.catalog.clone(),
            client,
            shown_url: redact_url(url.as_str()).into(),
            url,
            model,
            key: key.map(Arc::from),
            first_token: Duration::from_millis(config.first_token_timeout_ms),
            idle: Duration::from_millis(config.idle_timeout_ms),
            total: Duration::from_millis(config.total_timeout_ms),
            deterministic: config.deterministic,
            max_response_bytes: config.max_response_bytes.unwrap_or(max_response_bytes),
        })
    }

    pub fn upstream_model(&self) -> &str {
        &self.model
    }

    pub fn deterministic(&self) -> bool {
        self.deterministic
    }

    pub fn catalog(&self) -> &super::Catalog {
        &self.catalog
    }

    pub fn stream(&self, request: &GenerateRequest, max_tokens: u32, mode: Mode) -> EventStream {
        let body = match wire::body(request, &self.model, max_tokens, mode == Mode::Stream) {
            Ok(body) => body,
            Err(error) => {
                // Validation made every JSON text an object; this is a bug, told as the upstream's.
                let error = UpstreamError::new(Kind::Malformed, format!("building the request body: {error}"));
                return Box::pin(futures::stream::once(async move { Err(error) }));
            }
        };
        let prompt_tokens = llmesh_proto::validate::estimated_prompt_tokens(request);
        let started = Instant::now();
        let send = self.send(body, started);
        let (idle, first_token, deadline, limit) =
            (self.idle, self.first_token, started + self.total, self.max_response_bytes);
        match mode {
            Mode::Unary => Box::pin(
                futures::stream::once(async move {
                    let response = send.await?;
                    let body = within(deadline, "completion", read_body(response, limit)).await??;
                    let completion = serde_json::from_slice::<wire::Completion>(&body).map_err(|e| {
                        UpstreamError::new(Kind::Malformed, format!("the completion is not valid JSON: {e}"))
                    })?;
                    completion_events(completion, prompt_tokens)
                })
                .map(|result: Result<Vec<Event>, UpstreamError>| match result {
                    Ok(events) => futures::stream::iter(events.into_iter().map(Ok)).left_stream(),
                    Err(error) => futures::stream::once(async move { Err(error) }).right_stream(),
                })
                .flatten(),
            ),
            Mode::Stream => Box::pin(
                futures::stream::once(async move {
                    let response = send.await?;
                    let limits = StreamLimits { first_token, idle, deadline, bytes: limit };
                    let chunks = SseStream::new(response.bytes_stream(), prompt_tokens, limits);
                    Ok::<_, UpstreamError>(chunks.into_stream())
                })
                .map(|result| match result {
                    Ok(events) => events.left_stream(),
                    Err(error) => futures::stream::once(async move { Err(error) }).right_stream(),
                })
                .flatten(),
            ),
        }
    }

    /// Sends the request and checks the status. The response head must come within the first
    /// token timeout (and the total).
    fn send(
        &self,
        body: String,
        started: Instant,
    ) -> impl std::future::Future<Output = Result<reqwest::Response, UpstreamError>> + Send + 'static {
        let mut builder =
            self.client.post(self.url.clone()).header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        if let Some(key) = &self.key {
            builder = builder.bearer_auth(key);
        }
        let deadline = (started + self.first_token).min(started + self.total);
        let (url, key) = (self.shown_url.clone(), self.key.clone());
        async move {
            let response = within(deadline, "response", builder.send()).await?.map_err(|e| {
                // The URL is logged once, redacted: reqwest's own message would show it whole.
                UpstreamError::new(Kind::Unreachable, format!("POST {url}: {}", error_chain(&e.without_url())))
            })?;
            if response.status().is_success() {
                return Ok(response);
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

/// The part of an error body worth logging: OpenAI's `error.message`, else its first characters.
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

/// The chat completions endpoint under `base_url`.
fn completions_url(model: &str, base_url: &str) -> anyhow::Result<reqwest::Url> {
    let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
    match reqwest::Url::parse(&url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(url),
        Ok(_) => anyhow::bail!("model {model}: base_url {} is not an http:// or https:// URL", redact_url(base_url)),
        Err(error) => anyhow::bail!("model {model}: base_url {} is not a URL: {error}", redact_url(base_url)),
    }
}

/// Maps an upstream HTTP error to the failure a caller can act on.
fn http_error(status: reqwest::StatusCode, headers: &reqwest::header::HeaderMap, detail: String) -> UpstreamError {
    let http = status.as_u16();
    let kind = match http {
        429 => Kind::RateLimited {
            retry_after_ms: retry_after(headers).map(|wait| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
        },
        400 | 413 | 422 => Kind::Rejected { http },
        401 | 403 => Kind::Unauthorized { http },
        404 => Kind::NoSuchModel,
        _ => Kind::Failed { http },
    };
    UpstreamError::new(kind, detail)
}

/// `retry-after-ms` (OpenAI's), else `retry-after` in seconds.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    header("retry-after").and_then(|v| v.parse::<f64>().ok()).map(|s| Duration::from_secs_f64(s.max(0.0)))
}

/// What llmesh reports when an upstream gives no usage.
fn estimate(prompt_tokens: u32, completion_chars: usize) -> Usage {
    let completion_tokens = llmesh_proto::validate::estimated_tokens(completion_chars);
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens.saturating_add(completion_tokens),
        estimated: true,
        ..Default::default()
    }
}

/// A unary completion's events: reasoning, text, tool calls (whole, one delta each), extensions,
/// the finish.
fn completion_events(completion: wire::Completion, prompt_tokens: u32) -> Result<Vec<Event>, UpstreamError> {
    let wire::Completion { choices, usage, rest } = completion;
    let choice = choices.into_iter().next();
    let reason = wire::finish_reason(choice.as_ref().and_then(|c| c.finish_reason.as_deref()));
    let mut message = choice.and_then(|c| c.message).unwrap_or_default();
    let mut events = Vec::new();
    let mut completion_chars = 0;
    if let Some(reasoning) = message.reasoning_text() {
        completion_chars += reasoning.chars().count();
        events.push(Event::Reasoning(wire::reasoning_delta(reasoning)));
    }
    let text = message.text().unwrap_or_default();
    completion_chars += text.chars().count();
    events.push(Event::Delta(text));
    if message.tool_calls.len() > MAX_ITEMS {
        return Err(UpstreamError::new(
            Kind::Malformed,
            format!("{} tool calls in one answer", message.tool_calls.len()),
        ));
    }
    for (call, index) in message.tool_calls.into_iter().zip(0u32..) {
        let mut delta = wire::tool_call_delta(call, index);
        delta.index = index;
        completion_chars += delta.arguments.chars().count();
        events.push(Event::ToolCall(delta));
    }
    if let Some(extensions) = wire::extensions(rest) {
        events.push(Event::Extensions(extensions));
    }
    let usage = usage.map_or_else(|| estimate(prompt_tokens, completion_chars), Usage::from);
    events.push(Event::Finish { reason, usage });
    Ok(events)
}

/// How long and how much a stream may take.
struct StreamLimits {
    first_token: Duration,
    idle: Duration,
    deadline: Instant,
    /// Total bytes from the upstream.
    bytes: u64,
}

/// The state of one streamed answer.
struct SseStream<S> {
    /// The upstream's body; `None` once the answer is over (`done`), which drops the upstream call.
    bytes: Option<S>,
    parser: SseParser,
    pending: VecDeque<Result<Event, UpstreamError>>,
    prompt_tokens: u32,
    /// Tool calls begun so far: the index of a call whose chunks give none.
    tool_calls: u32,
    extensions: Option<llmesh_proto::common::v1::Extensions>,
    completion_chars: usize,
    reason: Option<FinishReason>,
    usage: Option<Usage>,
    limits: StreamLimits,
    received: u64,
    got_first: bool,
    done: bool,
}

impl<S, B> SseStream<S>
where
    S: Stream<Item = Result<B, reqwest::Error>> + Unpin + Send + 'static,
    B: AsRef<[u8]>,
{
    fn new(bytes: S, prompt_tokens: u32, limits: StreamLimits) -> Self {
        Self {
            bytes: Some(bytes),
            parser: SseParser::default(),
            pending: VecDeque::new(),
            prompt_tokens,
            tool_calls: 0,
            extensions: None,
            completion_chars: 0,
            reason: None,
            usage: None,
            limits,
            received: 0,
            got_first: false,
            done: false,
        }
    }

    fn into_stream(self) -> impl Stream<Item = Result<Event, UpstreamError>> + Send + 'static {
        futures::stream::unfold(self, |mut state| async move {
            loop {
                if let Some(item) = state.pending.pop_front() {
                    return Some((item, state));
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
            Ok(None) if self.reason.is_some() => self.finish(),
            Ok(None) => self.fail(UpstreamError::new(Kind::Unfinished, "the body ended without [DONE] or a finish")),
            Ok(Some(Err(error))) => self.fail(broken(error)),
            Ok(Some(Ok(bytes))) => {
                let bytes = bytes.as_ref();
                self.received = self.received.saturating_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
                if self.received > self.limits.bytes {
                    return self.fail(too_large(self.limits.bytes, "the stream"));
                }
                match self.parser.push(bytes) {
                    Err(error) => self.fail(UpstreamError::new(Kind::Malformed, error.to_string())),
                    Ok(events) => {
                        for data in events {
                            if self.done {
                                break;
                            }
                            self.event(&data);
                        }
                    }
                }
            }
        }
    }

    fn event(&mut self, data: &str) {
        if data.trim() == "[DONE]" {
            self.finish();
            return;
        }
        let chunk: wire::Chunk = match serde_json::from_str(data) {
            Ok(chunk) => chunk,
            Err(error) => {
                let shown: String = data.chars().take(80).collect();
                let detail = format!("chunk {shown:?} is not a completion chunk: {error}");
                return self.fail(UpstreamError::new(Kind::Malformed, detail));
            }
        };
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage.into());
        }
        if let Some(extensions) = wire::extensions(chunk.rest) {
            self.extensions = Some(extensions);
        }
        for choice in chunk.choices.into_iter().take(1) {
            let mut delta = choice.delta.unwrap_or_default();
            if let Some(reasoning) = delta.reasoning_text() {
                self.got_first = true;
                self.completion_chars += reasoning.chars().count();
                self.pending.push_back(Ok(Event::Reasoning(wire::reasoning_delta(reasoning))));
            }
            if let Some(text) = delta.text() {
                self.got_first = true;
                self.completion_chars += text.chars().count();
                self.pending.push_back(Ok(Event::Delta(text)));
            }
            for call in delta.tool_calls {
                // A call without an index: a new one when it has an id, else the last one's.
                let fallback = if call.id.is_some() { self.tool_calls } else { self.tool_calls.saturating_sub(1) };
                let delta = wire::tool_call_delta(call, fallback);
                if delta.index as usize >= MAX_ITEMS {
                    let detail = format!("tool call index {} past {MAX_ITEMS}", delta.index);
                    return self.fail(UpstreamError::new(Kind::Malformed, detail));
                }
                self.tool_calls = self.tool_calls.max(delta.index + 1);
                self.got_first = true;
                self.completion_chars += delta.arguments.chars().count();
                self.pending.push_back(Ok(Event::ToolCall(delta)));
            }
            if let Some(reason) = choice.finish_reason {
                self.got_first = true;
                self.reason = Some(wire::finish_reason(Some(&reason)));
            }
        }
    }

    fn finish(&mut self) {
        let usage = self.usage.unwrap_or_else(|| estimate(self.prompt_tokens, self.completion_chars));
        let reason = self.reason.unwrap_or(FinishReason::Stop);
        if let Some(extensions) = self.extensions.take() {
            self.pending.push_back(Ok(Event::Extensions(extensions)));
        }
        self.pending.push_back(Ok(Event::Finish { reason, usage }));
        self.done = true;
    }

    fn fail(&mut self, error: UpstreamError) {
        self.pending.push_back(Err(error));
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(status: u16, headers: &reqwest::header::HeaderMap) -> UpstreamError {
        http_error(reqwest::StatusCode::from_u16(status).unwrap(), headers, String::new())
    }

    #[test]
    fn http_errors_map_to_actionable_codes() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("retry-after", "2".parse().unwrap());
        let limited = error(429, &headers);
        assert_eq!(limited.kind(), Kind::RateLimited { retry_after_ms: Some(2_000) });
        assert_eq!(limited.code(), tonic::Code::ResourceExhausted);

        let none = reqwest::header::HeaderMap::new();
        assert_eq!(error(502, &none).code(), tonic::Code::Unavailable);
        assert_eq!(error(400, &none).code(), tonic::Code::InvalidArgument);
        assert_eq!(error(401, &none).code(), tonic::Code::FailedPrecondition);
        assert_eq!(error(404, &none).code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn a_malformed_base_url_stops_start_up_naming_the_model_and_never_its_credentials() {
        let url = completions_url("m", "http://127.0.0.1:8000/v1/").unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:8000/v1/chat/completions");
        for bad in ["http://user:s3cret@[::1/v1", "ftp://user:s3cret@host/v1", "not a url"] {
            let config = OpenAiConfig { base_url: bad.into(), ..OpenAiConfig::default() };
            let error = format!("{:#}", OpenAi::new("m", &config, 1).unwrap_err());
            assert!(error.starts_with("model m: base_url "), "{bad}: {error}");
            assert!(!error.contains("s3cret"), "{bad}: {error}");
        }
    }

    #[test]
    fn error_details_are_short_and_keyless() {
        assert_eq!(error_detail(br#"{"error":{"message":"slow down"}}"#), "slow down");
        assert_eq!(error_detail("x".repeat(5_000).as_bytes()).len(), ERROR_DETAIL_CHARS);
        assert_eq!(scrub("bad key sk-live-123 given", Some("sk-live-123")), "bad key *** given");
        assert_eq!(scrub("no key", None), "no key");
    }

    #[test]
    fn retry_after_ms_wins() {
        let mut headers = reqwest::header::HeaderMap::new();
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

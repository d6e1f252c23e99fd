//! Any OpenAI-compatible chat completions endpoint: OpenAI, vLLM, Ollama, llama.cpp, LM Studio.
//!
//! Unary calls ask for a plain JSON completion; streaming calls ask for Server-Sent Events with
//! `stream_options.include_usage`, so streamed answers still report tokens. Upstream failures map
//! to gRPC codes a caller can act on: 429 is RESOURCE_EXHAUSTED with the upstream's Retry-After as
//! `grpc-retry-pushback-ms`, 5xx, resets and stalls are UNAVAILABLE, a malformed chunk is a clear
//! UNAVAILABLE rather than a hang.

use std::{collections::VecDeque, path::PathBuf, time::Duration};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
use llmesh_common::errors::error_chain;
use llmesh_proto::{
    common::v1::{FinishReason, Usage},
    generation::v1::GenerateRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;
use tonic::{Code, Status, metadata::MetadataValue};

use super::{Event, EventStream, Mode, sse::SseParser};

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
        }
    }
}

pub struct OpenAi {
    client: reqwest::Client,
    url: String,
    model: String,
    key: Option<String>,
    first_token: Duration,
    idle: Duration,
    total: Duration,
    deterministic: bool,
}

impl std::fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("OpenAi").field("url", &self.url).field("model", &self.model).finish_non_exhaustive()
    }
}

impl OpenAi {
    pub fn new(name: &str, config: &OpenAiConfig) -> anyhow::Result<Self> {
        let key = match &config.api_key_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("model {name}: cannot read api_key_file {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var(&config.api_key_env).ok().filter(|k| !k.is_empty()),
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .with_context(|| format!("model {name}: building the HTTP client"))?;
        let model = if config.upstream_model.is_empty() { name.to_string() } else { config.upstream_model.clone() };
        Ok(Self {
            client,
            url: format!("{}/chat/completions", config.base_url.trim_end_matches('/')),
            model,
            key,
            first_token: Duration::from_millis(config.first_token_timeout_ms),
            idle: Duration::from_millis(config.idle_timeout_ms),
            total: Duration::from_millis(config.total_timeout_ms),
            deterministic: config.deterministic,
        })
    }

    pub fn upstream_model(&self) -> &str {
        &self.model
    }

    pub fn deterministic(&self) -> bool {
        self.deterministic
    }

    pub fn stream(&self, request: &GenerateRequest, max_tokens: u32, mode: Mode) -> EventStream {
        let body = self.body(request, max_tokens, mode == Mode::Stream);
        let prompt_chars = prompt_chars(request);
        let started = Instant::now();
        let send = self.send(body, started);
        let (idle, first_token, deadline) = (self.idle, self.first_token, started + self.total);
        match mode {
            Mode::Unary => Box::pin(
                futures::stream::once(async move {
                    let response = send.await?;
                    let completion = within(deadline, "the completion", response.json::<Completion>())
                        .await?
                        .map_err(|e| malformed(format!("the completion is not valid JSON: {e}")))?;
                    Ok(completion.into_events(prompt_chars))
                })
                .map(|result: Result<Vec<Event>, Status>| match result {
                    Ok(events) => futures::stream::iter(events.into_iter().map(Ok)).left_stream(),
                    Err(status) => futures::stream::once(async move { Err(status) }).right_stream(),
                })
                .flatten(),
            ),
            Mode::Stream => Box::pin(
                futures::stream::once(async move {
                    let response = send.await?;
                    let chunks = SseStream::new(response.bytes_stream(), prompt_chars, first_token, idle, deadline);
                    Ok::<_, Status>(chunks.into_stream())
                })
                .map(|result| match result {
                    Ok(events) => events.left_stream(),
                    Err(status) => futures::stream::once(async move { Err(status) }).right_stream(),
                })
                .flatten(),
            ),
        }
    }

    fn body(&self, request: &GenerateRequest, max_tokens: u32, stream: bool) -> Value {
        let messages: Vec<Value> = if request.messages.is_empty() {
            vec![json!({"role": "user", "content": request.prompt})]
        } else {
            request.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect()
        };
        let mut body = json!({"model": self.model, "messages": messages, "max_tokens": max_tokens, "stream": stream});
        if let Some(t) = request.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(p) = request.top_p {
            body["top_p"] = json!(p);
        }
        if !request.stop.is_empty() {
            body["stop"] = json!(request.stop);
        }
        if let Some(seed) = request.seed {
            body["seed"] = json!(seed);
        }
        if !request.user.is_empty() {
            body["user"] = json!(request.user);
        }
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    }

    /// Sends the request and checks the status. The response head must come within the first
    /// token timeout (and the total).
    fn send(
        &self,
        body: Value,
        started: Instant,
    ) -> impl std::future::Future<Output = Result<reqwest::Response, Status>> + Send + 'static {
        let mut builder = self.client.post(&self.url).json(&body);
        if let Some(key) = &self.key {
            builder = builder.bearer_auth(key);
        }
        let deadline = (started + self.first_token).min(started + self.total);
        let model = self.model.clone();
        async move {
            let response = within(deadline, "the response", builder.send())
                .await?
                .map_err(|e| Status::unavailable(format!("upstream request failed: {}", error_chain(&e))))?;
            if response.status().is_success() {
                return Ok(response);
            }
            let status = response.status();
            let headers = response.headers().clone();
            let text =
                within(deadline, "the error body", response.text()).await.ok().and_then(Result::ok).unwrap_or_default();
            Err(status_error(status, &headers, &text, &model))
        }
    }
}

/// Runs `future` until `deadline`; past it the upstream is UNAVAILABLE (stalled), a retryable
/// condition that the gateway's breaker counts.
async fn within<T>(deadline: Instant, what: &str, future: impl std::future::Future<Output = T>) -> Result<T, Status> {
    tokio::time::timeout_at(deadline, future)
        .await
        .map_err(|_| Status::unavailable(format!("upstream stalled: no {what} in time")))
}

fn malformed(detail: String) -> Status {
    Status::unavailable(format!("upstream sent a malformed answer: {detail}"))
}

/// Maps an upstream HTTP error to the gRPC status a caller can act on.
fn status_error(status: reqwest::StatusCode, headers: &reqwest::header::HeaderMap, body: &str, model: &str) -> Status {
    let detail: String = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| body.chars().take(200).collect());
    let code = status.as_u16();
    match code {
        429 => {
            let wait = retry_after(headers);
            let mut status = Status::resource_exhausted(format!("upstream rate limit (HTTP 429): {detail}"));
            if let Some(wait) = wait {
                let ms = wait.as_millis().to_string();
                if let Ok(value) = MetadataValue::try_from(ms.as_str()) {
                    status.metadata_mut().insert("grpc-retry-pushback-ms", value.clone());
                    status.metadata_mut().insert("retry-after-ms", value);
                }
            }
            status
        }
        400 | 413 | 422 => Status::invalid_argument(format!("upstream rejected the request (HTTP {code}): {detail}")),
        401 | 403 => Status::failed_precondition(format!(
            "upstream refused llmesh's credentials (HTTP {code}); check the API key: {detail}"
        )),
        404 => Status::failed_precondition(format!("upstream has no model {model:?} (HTTP 404): {detail}")),
        _ => Status::new(Code::Unavailable, format!("upstream failed (HTTP {code}): {detail}")),
    }
}

/// `retry-after-ms` (OpenAI's), else `retry-after` in seconds.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    header("retry-after").and_then(|v| v.parse::<f64>().ok()).map(|s| Duration::from_secs_f64(s.max(0.0)))
}

fn finish_reason(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("length") => FinishReason::Length,
        Some("content_filter") => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    }
}

fn prompt_chars(request: &GenerateRequest) -> usize {
    request.prompt.chars().count() + request.messages.iter().map(|m| m.content.chars().count()).sum::<usize>()
}

/// What llmesh reports when an upstream gives no usage.
fn estimate(prompt_chars: usize, completion_chars: usize) -> Usage {
    let tokens = llmesh_common::validate::estimated_tokens;
    let (prompt_tokens, completion_tokens) = (tokens(prompt_chars), tokens(completion_chars));
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens.saturating_add(completion_tokens),
        estimated: true,
    }
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    #[serde(default)]
    total_tokens: Option<u32>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens.unwrap_or(u.prompt_tokens.saturating_add(u.completion_tokens)),
            estimated: false,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Completion {
    choices: Vec<Choice>,
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    message: Option<Message>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    content: Option<String>,
}

impl Completion {
    fn into_events(self, prompt_chars: usize) -> Vec<Event> {
        let choice = self.choices.into_iter().next();
        let reason = finish_reason(choice.as_ref().and_then(|c| c.finish_reason.as_deref()));
        let text = choice.and_then(|c| c.message).and_then(|m| m.content).unwrap_or_default();
        let usage = self.usage.map_or_else(|| estimate(prompt_chars, text.chars().count()), Usage::from);
        vec![Event::Delta(text), Event::Finish { reason, usage }]
    }
}

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct ChunkChoice {
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    content: Option<String>,
}

/// The state of one streamed answer.
struct SseStream<S> {
    bytes: S,
    parser: SseParser,
    pending: VecDeque<Result<Event, Status>>,
    prompt_chars: usize,
    completion_chars: usize,
    reason: Option<FinishReason>,
    usage: Option<Usage>,
    first_token: Duration,
    idle: Duration,
    deadline: Instant,
    got_first: bool,
    done: bool,
}

impl<S, B, E> SseStream<S>
where
    S: Stream<Item = Result<B, E>> + Unpin + Send + 'static,
    B: AsRef<[u8]>,
    E: std::error::Error + Send + 'static,
{
    fn new(bytes: S, prompt_chars: usize, first_token: Duration, idle: Duration, deadline: Instant) -> Self {
        Self {
            bytes,
            parser: SseParser::default(),
            pending: VecDeque::new(),
            prompt_chars,
            completion_chars: 0,
            reason: None,
            usage: None,
            first_token,
            idle,
            deadline,
            got_first: false,
            done: false,
        }
    }

    fn into_stream(self) -> impl Stream<Item = Result<Event, Status>> + Send + 'static {
        futures::stream::unfold(self, |mut state| async move {
            loop {
                if let Some(item) = state.pending.pop_front() {
                    return Some((item, state));
                }
                if state.done {
                    return None;
                }
                state.pull().await;
            }
        })
    }

    /// Reads the next bytes from upstream and turns them into pending events (or an error).
    async fn pull(&mut self) {
        let gap = if self.got_first { self.idle } else { self.first_token };
        let wait_until = (Instant::now() + gap).min(self.deadline);
        let what = if self.got_first { "chunk" } else { "first chunk" };
        match within(wait_until, what, self.bytes.next()).await {
            Err(status) => self.fail(status),
            Ok(None) if self.reason.is_some() => self.finish(),
            Ok(None) => self.fail(Status::unavailable("upstream closed the stream before finishing")),
            Ok(Some(Err(error))) => {
                self.fail(Status::unavailable(format!("upstream stream broke: {}", error_chain(&error))));
            }
            Ok(Some(Ok(bytes))) => match self.parser.push(bytes.as_ref()) {
                Err(error) => self.fail(malformed(error.to_string())),
                Ok(events) => {
                    for data in events {
                        if self.done {
                            break;
                        }
                        self.event(&data);
                    }
                }
            },
        }
    }

    fn event(&mut self, data: &str) {
        if data.trim() == "[DONE]" {
            self.finish();
            return;
        }
        let chunk: Chunk = match serde_json::from_str(data) {
            Ok(chunk) => chunk,
            Err(error) => {
                let shown: String = data.chars().take(80).collect();
                return self.fail(malformed(format!("chunk {shown:?} is not a completion chunk: {error}")));
            }
        };
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage.into());
        }
        for choice in chunk.choices.into_iter().take(1) {
            if let Some(text) = choice.delta.and_then(|d| d.content).filter(|t| !t.is_empty()) {
                self.got_first = true;
                self.completion_chars += text.chars().count();
                self.pending.push_back(Ok(Event::Delta(text)));
            }
            if let Some(reason) = choice.finish_reason {
                self.got_first = true;
                self.reason = Some(finish_reason(Some(&reason)));
            }
        }
    }

    fn finish(&mut self) {
        let usage = self.usage.unwrap_or_else(|| estimate(self.prompt_chars, self.completion_chars));
        let reason = self.reason.unwrap_or(FinishReason::Stop);
        self.pending.push_back(Ok(Event::Finish { reason, usage }));
        self.done = true;
    }

    fn fail(&mut self, status: Status) {
        self.pending.push_back(Err(status));
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_errors_map_to_actionable_codes() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("retry-after", "2".parse().unwrap());
        let status =
            status_error(reqwest::StatusCode::TOO_MANY_REQUESTS, &headers, r#"{"error":{"message":"slow down"}}"#, "m");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("slow down"));
        assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "2000");

        let none = reqwest::header::HeaderMap::new();
        assert_eq!(status_error(reqwest::StatusCode::BAD_GATEWAY, &none, "", "m").code(), Code::Unavailable);
        assert_eq!(status_error(reqwest::StatusCode::BAD_REQUEST, &none, "", "m").code(), Code::InvalidArgument);
        assert_eq!(status_error(reqwest::StatusCode::UNAUTHORIZED, &none, "", "m").code(), Code::FailedPrecondition);
        assert_eq!(status_error(reqwest::StatusCode::NOT_FOUND, &none, "", "m").code(), Code::FailedPrecondition);
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
        let usage = estimate(10, 3);
        assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), (3, 1, 4));
        assert!(usage.estimated);
    }
}

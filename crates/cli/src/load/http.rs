//! The calls over HTTP (`--protocol http`): OpenAI chat completions on the gateway's HTTP routes
//! (`POST /v1/chat/completions`, server-sent events with `--stream`), over HTTP/1.1 keep-alive
//! connections (one per call in flight, as the OpenAI SDKs use them), so a run compares with the
//! same load over gRPC.
//!
//! Each request carries the prompt as one user message, the key as `Authorization: Bearer`, and
//! the deadline as `x-llmesh-timeout-ms`. A non-200 answer counts under the gRPC code its status
//! stands for (`429` as RESOURCE_EXHAUSTED, ...), so the report's codes read the same over both
//! protocols; a stream counts as complete at `data: [DONE]`, its first token at the first event
//! with text, its usage from the `include_usage` chunk.

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use llmesh_proto::common::v1::Usage;
use serde_json::{Value, json};
use tokio::time::Instant;
use tonic::Code;

use super::{
    args::TlsFiles,
    client::{CallSettings, success},
    outcome::{CallResult, Failure},
    runner::Caller,
    workload::Workload,
};

/// The route the load goes to.
pub const CHAT_PATH: &str = "/v1/chat/completions";

/// Makes the calls of a run over HTTP.
pub struct HttpCaller {
    client: reqwest::Client,
    url: String,
    workload: Workload,
    settings: CallSettings,
}

impl HttpCaller {
    /// A caller of `target`'s chat completions route. Checks that the route answers before the
    /// clock starts (a models listing), so a wrong target fails at once.
    pub async fn connect(
        target: &str,
        tls: Option<&TlsFiles>,
        workload: Workload,
        settings: CallSettings,
    ) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder();
        if let Some(tls) = tls {
            if let Some(ca) = &tls.ca {
                let roots = reqwest::Certificate::from_pem_bundle(ca).context("--cacert holds no PEM certificate")?;
                builder = builder.tls_certs_only(roots);
            }
            if let Some((cert, key)) = &tls.identity {
                let pem = [key.as_slice(), b"\n", cert.as_slice()].concat();
                builder = builder.identity(reqwest::Identity::from_pem(&pem).context("--cert and --key")?);
            }
        }
        let client = builder
            .http1_only()
            .tcp_nodelay(true)
            // Loopback benchmarks: a proxy from the environment would measure the proxy.
            .no_proxy()
            .pool_max_idle_per_host(usize::MAX)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("cannot build the HTTP client")?;
        let base = target.trim_end_matches('/');
        let models = format!("{base}/v1/models");
        let mut probe = client.get(&models);
        if let Some(key) = &settings.api_key {
            probe = probe.bearer_auth(key.to_str().unwrap_or_default());
        }
        let answer = probe.send().await.with_context(|| format!("cannot reach {models}"))?;
        anyhow::ensure!(answer.status().is_success(), "{models} answered {}", answer.status());
        Ok(Self { client, url: format!("{base}{CHAT_PATH}"), workload, settings })
    }

    fn request(&self, prompt: String) -> reqwest::RequestBuilder {
        let mut body = json!({
            "model": self.settings.model,
            "messages": [{ "role": "user", "content": prompt }],
        });
        if self.settings.max_tokens > 0 {
            body["max_tokens"] = json!(self.settings.max_tokens);
        }
        if self.settings.stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({ "include_usage": true });
        }
        let mut request = self
            .client
            .post(&self.url)
            .header("x-llmesh-timeout-ms", self.settings.timeout.as_millis().to_string())
            .json(&body);
        if let Some(key) = &self.settings.api_key {
            request = request.bearer_auth(key.to_str().unwrap_or_default());
        }
        request
    }
}

impl Caller for HttpCaller {
    async fn call(&self, seq: u64) -> CallResult {
        let prompt = self.workload.prompt(seq);
        let answer = match self.request(prompt).send().await {
            Ok(answer) => answer,
            Err(_) => return CallResult::failed(Failure::Status(Code::Unavailable)),
        };
        let status = answer.status();
        if !status.is_success() {
            return CallResult::failed(Failure::Status(llmesh_telemetry::code_of_http_status(status)));
        }
        let cached = answer.headers().get("x-llmesh-cached").is_some_and(|v| v == "true");
        if !self.settings.stream {
            return match answer.json::<Value>().await {
                Ok(body) => CallResult::ok(success(cached, Some(usage(&body["usage"])))),
                Err(_) => CallResult::failed(Failure::Status(Code::Unavailable)),
            };
        }
        consume(answer.bytes_stream(), cached).await
    }
}

/// OpenAI's usage object as the mesh's.
fn usage(value: &Value) -> Usage {
    let count = |name: &str| value[name].as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
    Usage {
        prompt_tokens: count("prompt_tokens"),
        completion_tokens: count("completion_tokens"),
        total_tokens: count("total_tokens"),
        estimated: false,
        ..Default::default()
    }
}

/// Reads an event stream to `[DONE]`: when its first text came, its usage.
async fn consume<S, B, E>(mut bytes: S, cached: bool) -> CallResult
where
    S: futures::Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
{
    let mut buffer = Vec::new();
    let mut first_token = None;
    let mut usage_seen = None;
    while let Some(piece) = bytes.next().await {
        let Ok(piece) = piece else {
            return CallResult { first_token, ..CallResult::failed(Failure::Status(Code::Unavailable)) };
        };
        buffer.extend_from_slice(piece.as_ref());
        // Every complete event in the buffer; the rest waits for more bytes.
        while let Some(end) = find(&buffer, b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let Some(data) = event.strip_prefix(b"data: ") else { continue };
            let data = data.trim_ascii_end();
            if data == b"[DONE]" {
                return match usage_seen {
                    Some(usage) => CallResult { first_token, ..CallResult::ok(success(cached, Some(usage))) },
                    None => CallResult { first_token, ..CallResult::failed(Failure::StreamIncomplete) },
                };
            }
            let Ok(chunk) = serde_json::from_slice::<Value>(data) else { continue };
            if chunk.get("error").is_some() {
                return CallResult { first_token, ..CallResult::failed(Failure::Status(Code::Unavailable)) };
            }
            let text = chunk["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty());
            if text && first_token.is_none() {
                first_token = Some(Instant::now());
            }
            if chunk["usage"].is_object() {
                usage_seen = Some(usage(&chunk["usage"]));
            }
        }
    }
    CallResult { first_token, ..CallResult::failed(Failure::StreamIncomplete) }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(pieces: &[&'static str]) -> impl futures::Stream<Item = Result<&'static [u8], ()>> + Unpin {
        futures::stream::iter(pieces.iter().map(|p| Ok(p.as_bytes())).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn a_stream_is_complete_at_done_with_its_usage() {
        let stream = events(&[
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],",
            "\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3,\"total_tokens\":5}}\n\n",
            "data: [DONE]\n\n",
        ]);
        let result = consume(stream, true).await;
        assert!(result.first_token.is_some());
        let success = result.outcome.unwrap();
        assert!(success.cached);
        assert_eq!((success.prompt_tokens, success.completion_tokens, success.total_tokens), (2, 3, 5));
    }

    #[tokio::test]
    async fn a_stream_cut_short_or_failing_is_an_error() {
        let cut = events(&["data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n"]);
        assert_eq!(consume(cut, false).await.outcome, Err(Failure::StreamIncomplete));
        let failed = events(&["data: {\"error\":{\"message\":\"x\"}}\n\n"]);
        assert_eq!(consume(failed, false).await.outcome, Err(Failure::Status(Code::Unavailable)));
    }
}

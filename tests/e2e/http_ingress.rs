//! The gateway's HTTP routes through real binaries, with curl as the client (HTTP/1.1 unless a
//! test says otherwise): server-sent events as they arrive, a client that goes away mid-stream,
//! one cache for HTTP and gRPC, the seed's `POST /generate`, errors in each API's shape, and the
//! metrics of each route. The official SDKs' own tests are in tests/python/test_http.py.

use std::{process::Stdio, time::Duration};

use llmesh_e2e::{Mesh, MeshOptions, Proc, eventually};
use llmesh_proto::{
    common::v1::ChatMessage,
    gateway::v1::{GenerateRequest, gateway_client::GatewayClient},
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tonic::transport::Channel;

use crate::demo_keys;

/// Every curl is bounded: a hung gateway fails the test instead of hanging it.
const CURL_MAX_SECS: &str = "20";

/// One HTTP response as curl saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The `data:` payloads of a server-sent event stream, with the event name before each.
    fn events(&self) -> Vec<(Option<String>, String)> {
        let mut events = Vec::new();
        let mut name = None;
        for line in self.body.lines() {
            if let Some(event) = line.strip_prefix("event: ") {
                name = Some(event.to_string());
            } else if let Some(data) = line.strip_prefix("data: ") {
                events.push((name.take(), data.to_string()));
            }
        }
        events
    }
}

/// `curl -i` with `args`, parsed.
async fn curl(args: &[&str]) -> Answer {
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", CURL_MAX_SECS])
        .args(args)
        .output()
        .await
        .expect("curl (apt-get install curl)");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "curl {args:?} failed: {}\n{text}", String::from_utf8_lossy(&output.stderr));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
        .collect();
    Answer { status, headers, body: body.to_string() }
}

/// POST `body` as JSON to `path` on `gateway`, with extra curl arguments (headers) before it.
async fn post(gateway: &Proc, path: &str, body: &Value, extra: &[&str]) -> Answer {
    let url = format!("http://{}{path}", gateway.addr);
    let body = body.to_string();
    let mut args = vec!["-H", "content-type: application/json", "--data-binary", &body];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(&args).await
}

fn chat(content: &str) -> Value {
    json!({"model": "sim", "max_tokens": 16, "messages": [{"role": "user", "content": content}]})
}

fn unique(label: &str) -> String {
    format!("http e2e {label} {}", uuid_ish())
}

fn uuid_ish() -> String {
    format!("{:016x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
}

async fn grpc(mesh: &Mesh) -> GatewayClient<Channel> {
    mesh.gateway().await
}

#[tokio::test]
async fn openai_and_anthropic_over_http1_and_http2_share_the_grpc_cache() {
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0".into()),
            ("LLMESH_GATEWAY_HTTP__MAX_BODY_BYTES", "4096".into()),
        ],
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let gateway = &mesh.gateway;

    // Unary, HTTP/1.1: OpenAI's shape, the mesh's facts in headers, the caller's trace continued.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("traceparent: 00-{trace}-b7ad6b7169203331-01");
    let prompt = unique("unary");
    let answer = post(gateway, "/v1/chat/completions", &chat(&prompt), &["--http1.1", "-H", &traceparent]).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let body = answer.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(!body["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
    assert!(matches!(body["choices"][0]["finish_reason"].as_str(), Some("stop" | "length")), "{body}");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{body}");
    assert_eq!(answer.header("x-llmesh-cached"), Some("false"));
    assert_eq!(answer.header("x-llmesh-provider"), Some("sim"));
    assert_eq!(answer.header("x-llmesh-trace-id"), Some(trace), "{answer:?}");

    // The equal gRPC request is a hit on the entry the HTTP call stored (stored in the background).
    let client = grpc(&mesh).await;
    let equal = GenerateRequest {
        model: "sim".into(),
        messages: vec![ChatMessage { role: "user".into(), content: prompt.clone(), ..Default::default() }],
        max_tokens: 16,
        ..Default::default()
    };
    let hit = eventually(Duration::from_secs(5), || {
        let (mut client, equal) = (client.clone(), equal.clone());
        async move { client.generate(equal).await.ok().map(|r| r.into_inner()).filter(|r| r.cached) }
    })
    .await
    .expect("the gRPC call never hit the entry the HTTP call stored");
    assert_eq!(hit.text, body["choices"][0]["message"]["content"].as_str().unwrap());
    // ... and the HTTP call after it too, over HTTP/2 this time.
    let again = post(gateway, "/v1/chat/completions", &chat(&prompt), &["--http2-prior-knowledge"]).await;
    assert_eq!((again.status, again.header("x-llmesh-cached")), (200, Some("true")), "{again:?}");

    // Streaming over HTTP/1.1: role first, deltas, the finish reason, usage, [DONE].
    let mut streamed = chat(&unique("stream"));
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let answer = post(gateway, "/v1/chat/completions", &streamed, &["--http1.1", "-N"]).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("content-type"), Some("text/event-stream"));
    assert_eq!(answer.header("transfer-encoding"), Some("chunked"));
    let events = answer.events();
    assert_eq!(events.last().map(|(_, d)| d.as_str()), Some("[DONE]"), "{events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert!(!text.is_empty());
    let finish = chunks.iter().filter(|c| c["choices"][0]["finish_reason"].is_string()).count();
    assert_eq!(finish, 1, "{chunks:?}");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]), "one id for the whole stream");

    // Anthropic's stream and event sequence, over HTTP/2.
    let messages = json!({
        "model": "sim", "max_tokens": 16, "stream": true, "system": "be brief",
        "messages": [{"role": "user", "content": unique("anthropic")}],
    });
    let answer = post(gateway, "/v1/messages", &messages, &["--http2-prior-knowledge", "-N"]).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let names: Vec<String> = answer.events().into_iter().filter_map(|(name, _)| name).collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    let deltas = names.iter().filter(|n| *n == "content_block_delta").count();
    assert!(deltas > 0, "{names:?}");
    expected.extend(std::iter::repeat_n("content_block_delta", deltas));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    let delta = answer.events().into_iter().find(|(n, _)| n.as_deref() == Some("message_delta")).unwrap().1;
    let delta: Value = serde_json::from_str(&delta).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["usage"]["output_tokens"], 16);

    // Generation failing before the first chunk: an ordinary stream of the fallback's text, and
    // the headers say it was one.
    let failing =
        json!({"model": "sim-error", "stream": true, "messages": [{"role": "user", "content": unique("fallback")}]});
    let answer = post(gateway, "/v1/chat/completions", &failing, &["-N"]).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("x-llmesh-degraded"), Some("error"), "{answer:?}");
    assert_eq!(answer.header("x-llmesh-degraded-source"), Some("message"), "{answer:?}");
    let events = answer.events();
    assert_eq!(events.last().map(|(_, d)| d.as_str()), Some("[DONE]"), "{events:?}");
    let text: String = events[..events.len() - 1]
        .iter()
        .filter_map(|(_, d)| {
            serde_json::from_str::<Value>(d).ok()?["choices"][0]["delta"]["content"].as_str().map(str::to_string)
        })
        .collect();
    assert_eq!(text, "服务暂时不可用，请稍后重试");

    // Errors in each API's shape, with the HTTP statuses of its conventions.
    let unknown = post(
        gateway,
        "/v1/chat/completions",
        &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
        &[],
    )
    .await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert_eq!(unknown.json()["error"]["code"], "model_not_found");
    let bad = post(
        gateway,
        "/v1/chat/completions",
        &json!({"model": "sim", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
        &[],
    )
    .await;
    assert_eq!((bad.status, bad.json()["error"]["param"].as_str()), (400, Some("tools[0].function")), "{bad:?}");
    let bad =
        post(gateway, "/v1/messages", &json!({"model": "sim", "messages": [{"role": "user", "content": "x"}]}), &[])
            .await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(bad.json()["type"], "error");
    assert_eq!(bad.json()["error"]["type"], "invalid_request_error");
    assert!(bad.json()["error"]["message"].as_str().unwrap().starts_with("max_tokens"), "{bad:?}");
    let answered = post(gateway, "/v1/responses", &json!({"model": "sim", "input": "hello there"}), &[]).await;
    assert_eq!((answered.status, answered.json()["object"].as_str()), (200, Some("response")), "{answered:?}");
    let stateful =
        post(gateway, "/v1/responses", &json!({"model": "sim", "input": "x", "previous_response_id": "r"}), &[]).await;
    assert_eq!((stateful.status, stateful.json()["error"]["param"].as_str()), (400, Some("previous_response_id")));
    let big = chat(&"x".repeat(5000));
    let too_large = post(gateway, "/v1/chat/completions", &big, &[]).await;
    assert_eq!(too_large.status, 413, "{too_large:?}");
    let wrong_method = curl(&["-X", "DELETE", &format!("http://{}/v1/chat/completions", gateway.addr)]).await;
    assert_eq!((wrong_method.status, wrong_method.header("allow")), (405, Some("POST")));
    let nowhere = curl(&[&format!("http://{}/v2/nothing", gateway.addr)]).await;
    assert_eq!(nowhere.status, 404);
    let models = curl(&[&format!("http://{}/v1/models", gateway.addr)]).await;
    assert_eq!(models.status, 200);
    assert!(models.json()["data"].as_array().unwrap().iter().any(|m| m["id"] == "sim"), "{models:?}");

    // Each route is its own `endpoint`, its outcome the gRPC code an equal gRPC call would get.
    let requests = |labels: &'static str| gateway.metric_sum("llm_requests_total", labels);
    assert!(requests(r#"endpoint="/v1/chat/completions",status="OK""#).await >= 3.0);
    assert!(requests(r#"endpoint="/v1/messages",status="OK""#).await >= 1.0);
    assert!(requests(r#"endpoint="/v1/chat/completions",status="NOT_FOUND""#).await == 0.0);
    assert!(requests(r#"endpoint="/v1/chat/completions",status="INVALID_ARGUMENT""#).await >= 2.0);
    assert!(requests(r#"endpoint="/v1/messages",status="INVALID_ARGUMENT""#).await >= 1.0);
    assert!(requests(r#"endpoint="/v1/models",status="OK""#).await >= 1.0);
    assert!(requests(r#"endpoint="/v1/responses",status="OK""#).await >= 1.0);
    assert!(requests(r#"endpoint="/v1/responses",status="INVALID_ARGUMENT""#).await >= 1.0);
    assert!(requests(r#"endpoint="Generate",status="OK""#).await >= 1.0);
}

#[tokio::test]
async fn the_seeds_generate_with_its_key_limits_and_cache() {
    let (key, file) = demo_keys();
    // A second key of its own with one request a minute, for the 429.
    let (limited_key, entry) = llmesh_keys::generate_key("one-a-minute");
    let inline =
        format!(r#"[{{id="{}",prefix="{}",sha256="{}",requests_per_minute=1}}]"#, entry.id, entry.prefix, entry.sha256);
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_AUTH__KEYS_FILE", file),
            ("LLMESH_GATEWAY_AUTH__KEYS", inline),
            ("LLMESH_GATEWAY_DEFAULT_MODEL", "sim".into()),
            ("LLMESH_GATEWAY_RATE_LIMIT__REQUESTS_PER_MINUTE", "1000".into()),
            ("LLMESH_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0".into()),
        ],
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let gateway = &mesh.gateway;
    let x_api_key = format!("X-API-Key: {key}");
    let prompt = unique("seed");

    // Without a key: 401 in the seed's error shape.
    let refused = post(gateway, "/generate", &json!({"prompt": prompt}), &[]).await;
    assert_eq!(refused.status, 401, "{refused:?}");
    assert_eq!(refused.json()["error"]["code"], "UNAUTHENTICATED");
    assert!(refused.json()["error"]["message"].as_str().unwrap().contains("x-api-key"));

    // With the seed's header and body: the default model answers, then the same call is a hit.
    let first = post(gateway, "/generate", &json!({"prompt": prompt}), &["-H", &x_api_key]).await;
    assert_eq!(first.status, 200, "{first:?}");
    let body = first.json();
    assert_eq!((body["model"].as_str(), body["cached"].as_bool()), (Some("sim"), Some(false)), "{body}");
    assert!(!body["text"].as_str().unwrap().is_empty() && body["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert!(body.get("degraded").is_none(), "{body}");
    assert!(first.header("x-ratelimit-remaining-requests").is_some(), "{first:?}");
    let second = eventually(Duration::from_secs(5), || async {
        let again = post(gateway, "/generate", &json!({"prompt": prompt}), &["-H", &x_api_key]).await;
        again.json()["cached"].as_bool().unwrap_or(false).then_some(again)
    })
    .await
    .expect("the second call never hit the cache");
    assert_eq!(second.json()["text"], body["text"]);
    // The same prompt over gRPC, with the same key: the same entry.
    let mut client = grpc(&mesh).await;
    let mut request = tonic::Request::new(crate::prompt(&prompt));
    request.metadata_mut().insert("x-api-key", key.parse().unwrap());
    assert!(client.generate(request).await.unwrap().into_inner().cached);

    // A bad body names its field; an unknown model is 404.
    let bad = post(gateway, "/generate", &json!({"prompt": 42}), &["-H", &x_api_key]).await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(bad.json()["error"]["code"], "INVALID_ARGUMENT");
    assert!(bad.json()["error"]["message"].as_str().unwrap().starts_with("prompt:"), "{bad:?}");
    let missing = post(gateway, "/generate", &json!({}), &["-H", &x_api_key]).await;
    assert!(missing.status == 400 && missing.json()["error"]["message"].as_str().unwrap().starts_with("prompt"));
    let unknown = post(gateway, "/generate", &json!({"prompt": "x", "model": "nope"}), &["-H", &x_api_key]).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");

    // The OpenAI SDKs' bearer token is a key too.
    let bearer = format!("Authorization: Bearer {key}");
    let ok = post(gateway, "/v1/chat/completions", &chat(&unique("bearer")), &["-H", &bearer]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let wrong = post(gateway, "/v1/chat/completions", &chat("x"), &["-H", "Authorization: Bearer lk_nope"]).await;
    assert_eq!((wrong.status, wrong.json()["error"]["type"].as_str()), (401, Some("authentication_error")));

    // Over a key's request rate: 429 with Retry-After and what is left.
    let limited = format!("X-API-Key: {limited_key}");
    assert_eq!(post(gateway, "/generate", &json!({"prompt": "one"}), &["-H", &limited]).await.status, 200);
    let over = post(gateway, "/generate", &json!({"prompt": "two"}), &["-H", &limited]).await;
    assert_eq!(over.status, 429, "{over:?}");
    assert_eq!(over.json()["error"]["code"], "RESOURCE_EXHAUSTED");
    let retry_after: u64 = over.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{over:?}");
    assert_eq!(over.header("x-ratelimit-remaining-requests"), Some("0"), "{over:?}");

    let requests = |labels: &'static str| gateway.metric_sum("llm_requests_total", labels);
    assert!(requests(r#"endpoint="/generate",status="OK""#).await >= 3.0);
    assert!(requests(r#"endpoint="/generate",status="UNAUTHENTICATED""#).await >= 1.0);
    assert!(requests(r#"endpoint="/generate",status="RESOURCE_EXHAUSTED""#).await >= 1.0);
}

#[tokio::test]
async fn a_client_that_goes_away_mid_stream_stops_the_upstream_call_and_settles() {
    let (key, entry) = llmesh_keys::generate_key("streamer");
    // 1200 tokens a minute (20 a second come back): a reservation of 1000 that was never settled
    // would still be missing from the bucket long after this test.
    let inline = format!(
        r#"[{{id="{}",prefix="{}",sha256="{}",tokens_per_minute=1200}}]"#,
        entry.id, entry.prefix, entry.sha256
    );
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_AUTH__KEYS", inline),
            ("LLMESH_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0".into()),
            ("LLMESH_GENERATION_ADMIN__LISTEN", "127.0.0.1:0".into()),
        ],
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let url = format!("http://{}/v1/chat/completions", mesh.gateway.addr);
    // sim-slow: 2 s to its first token, then 20 a second, 1000 asked for: a long stream.
    let body = json!({
        "model": "sim-slow", "max_tokens": 1000, "stream": true,
        "messages": [{"role": "user", "content": unique("disconnect")}],
    })
    .to_string();
    let x_api_key = format!("x-api-key: {key}");
    let mut curl = tokio::process::Command::new("curl")
        .args(["-sS", "-N", "--http1.1", "--max-time", CURL_MAX_SECS, "-H", "content-type: application/json"])
        .args(["-H", &x_api_key, "-H", "x-llmesh-cache: bypass", "--data-binary", &body, &url])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(curl.stdout.take().unwrap()).lines();
    // The first event with text arrives while generation is still streaming (nothing buffers it).
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.unwrap().unwrap();
        let line = line.unwrap_or_else(|| panic!("the stream ended before any text: {seen:?}"));
        let text = line.strip_prefix("data: ").and_then(|d| serde_json::from_str::<Value>(d).ok());
        if text.is_some_and(|c| c["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty())) {
            break;
        }
        seen.push(line);
    }
    assert!(curl.try_wait().unwrap().is_none(), "curl had the whole stream already");
    curl.kill().await.unwrap();

    // Generation's side of the call was cancelled, not finished; the gateway counts its route's
    // call as cancelled too.
    let cancelled = eventually(Duration::from_secs(10), || async {
        let n =
            mesh.generation.metric_sum("llm_requests_total", r#"endpoint="GenerateStream",status="CANCELLED""#).await;
        (n >= 1.0).then_some(n)
    })
    .await;
    assert!(cancelled.is_some(), "generation's stream was not cancelled");
    let finished = mesh.generation.metric_sum("llm_requests_total", r#"endpoint="GenerateStream",status="OK""#).await;
    assert_eq!(finished, 0.0, "generation finished the stream nobody was reading");
    let route = eventually(Duration::from_secs(10), || async {
        let n = mesh
            .gateway
            .metric_sum("llm_requests_total", r#"endpoint="/v1/chat/completions",status="CANCELLED""#)
            .await;
        (n >= 1.0).then_some(n)
    })
    .await;
    assert!(route.is_some(), "the gateway did not count the call as cancelled");

    // The reservation (1000 + the prompt) was settled with the few tokens sent: the bucket is
    // nearly full again at the next call (which reserves 16 + its prompt).
    let next = post(&mesh.gateway, "/v1/chat/completions", &chat(&unique("after")), &["-H", &x_api_key]).await;
    assert_eq!(next.status, 200, "{next:?}");
    let remaining: u64 = next.header("x-ratelimit-remaining-tokens").unwrap().parse().unwrap();
    assert!(remaining > 1100, "{remaining} tokens left: the disconnected stream's reservation was kept");
}

#[tokio::test]
async fn a_body_that_does_not_arrive_ends_with_the_calls_deadline() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mesh = Mesh::start().await;
    let mut socket = tokio::net::TcpStream::connect(mesh.gateway.addr).await.unwrap();
    // The head promises 1000 bytes of body; 10 come, then nothing.
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n\
                content-length: 1000\r\nx-llmesh-timeout-ms: 500\r\n\r\n{\"model\":";
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buffer = [0u8; 4096];
        // Until the head of the answer is in (the connection may stay open after it).
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buffer).await.unwrap();
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buffer[..n]);
        }
    });
    read.await.expect("the gateway answered a stalled body within its deadline, not never");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

//! A one-route HTTP/1.1 upstream for the providers' tests, written here to misbehave on purpose:
//! it follows a script per request (write, sleep, reset) and remembers what it got.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use llmesh_generation::{Config, config::ModelConfig, provider::http::HttpModelConfig};
use llmesh_proto::{
    common::v1::{ChatMessage, Tool},
    generation::v1::{GenerateRequest, generation_client::GenerationClient},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tonic::transport::Channel;

/// A generation server in this process whose model `up` is `model`, and a client of it.
pub async fn serve_model(model: ModelConfig) -> GenerationClient<Channel> {
    let mut config = Config::default();
    config.models.insert("up".into(), model);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(llmesh_generation::serve(config, listener, std::future::pending()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    GenerationClient::new(channel)
}

/// A model at `upstream` (its `origin`), named `model` there, with `key` in a file, the timeouts
/// short; the directory of the key file goes with the second value (the server reads it at
/// start).
pub fn keyed_model(origin: String, model: &str, key: &str) -> (HttpModelConfig, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, format!("{key}\n")).unwrap();
    let config = HttpModelConfig {
        base_url: Some(origin),
        upstream_model: model.into(),
        api_key_file: Some(file),
        first_token_timeout_ms: 1_000,
        idle_timeout_ms: 500,
        total_timeout_ms: 5_000,
        ..HttpModelConfig::default()
    };
    (config, dir)
}

/// A request for model `up` with a system prompt, a user turn asking to run `echo hi`, and a
/// `Bash` tool.
pub fn bash_request() -> GenerateRequest {
    let bash = Tool {
        name: "Bash".into(),
        parameters: r#"{"type":"object","properties":{"command":{"type":"string"}}}"#.into(),
        ..Default::default()
    };
    GenerateRequest {
        model: "up".into(),
        messages: vec![
            ChatMessage { role: "system".into(), content: "Be brief.".into(), ..Default::default() },
            ChatMessage { role: "user".into(), content: "run echo hi".into(), ..Default::default() },
        ],
        max_tokens: 64,
        tools: vec![bash],
        ..Default::default()
    }
}

/// Whether `status` says the model's upstream failed.
pub fn from_upstream(status: &tonic::Status) -> bool {
    status.metadata().get(llmesh_proto::failure::ORIGIN_KEY).and_then(|v| v.to_str().ok())
        == Some(llmesh_proto::failure::ORIGIN_UPSTREAM)
}

/// What the upstream does with one request.
#[derive(Clone)]
pub enum Step {
    Write(String),
    Sleep(u64),
    /// Close with RST instead of FIN.
    Reset,
}

pub type Script = Arc<dyn Fn(&str) -> Vec<Step> + Send + Sync>;

/// A one-route HTTP/1.1 server that follows a script per request and remembers what it got.
pub struct Upstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    /// Set when a write to the client failed: it went away.
    pub broken: Arc<Mutex<bool>>,
}

impl Upstream {
    pub async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let broken = Arc::new(Mutex::new(false));
        let (seen, gone) = (requests.clone(), broken.clone());
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (script, seen, gone) = (script.clone(), seen.clone(), gone.clone());
                tokio::spawn(async move { serve(socket, script, seen, gone).await });
            }
        });
        Self { addr, requests, broken }
    }

    /// An OpenAI-compatible base URL: up to the version.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// An Anthropic base URL: the host.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests came so far.
    pub fn received(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// The raw body of request `i`, as the upstream got it.
    pub fn raw_body(&self, i: usize) -> String {
        let request = self.requests.lock().unwrap()[i].clone();
        let split = request.find("\r\n\r\n").unwrap();
        request[split + 4..].to_string()
    }

    /// Request `i`: its head, lowercased, and its body as JSON.
    pub fn request(&self, i: usize) -> (String, serde_json::Value) {
        let request = self.requests.lock().unwrap()[i].clone();
        let split = request.find("\r\n\r\n").unwrap();
        (request[..split].to_lowercase(), serde_json::from_str(&request[split + 4..]).unwrap())
    }
}

async fn serve(mut socket: TcpStream, script: Script, seen: Arc<Mutex<Vec<String>>>, gone: Arc<Mutex<bool>>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_end, length) = loop {
        let n = socket.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_lowercase();
            let length =
                head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
            break (end + 4, length);
        }
    };
    while buffer.len() < head_end + length {
        let n = socket.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buffer).to_string();
    let body = request[head_end..].to_string();
    seen.lock().unwrap().push(request);
    for step in script(&body) {
        match step {
            Step::Write(text) => {
                if socket.write_all(text.as_bytes()).await.is_err() || socket.flush().await.is_err() {
                    *gone.lock().unwrap() = true;
                    return;
                }
            }
            Step::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Step::Reset => {
                socket.set_zero_linger().unwrap();
                return;
            }
        }
    }
}

pub fn json_response(status: &str, extra_headers: &str, body: &str) -> Step {
    Step::Write(format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}connection: close\r\n\r\n{body}",
        body.len()
    ))
}

pub fn sse_head() -> Step {
    Step::Write("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n".into())
}

pub fn sse(data: &str) -> Step {
    Step::Write(format!("data: {data}\n\n"))
}

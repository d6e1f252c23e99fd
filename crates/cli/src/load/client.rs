//! The calls themselves: Generate or GenerateStream on the gateway or on generation, over a few
//! HTTP/2 connections taken in turn.

/// One call on a client of either service: their messages have the same fields, so the same body
/// serves both.
macro_rules! call_with {
    ($name:ident, $client:ty, $messages:ident) => {
        async fn $name(&self, mut client: $client, prompt: String) -> CallResult {
            let (model, max_tokens) = (self.model.clone(), self.max_tokens);
            if self.stream {
                let message = $messages::GenerateStreamRequest { model, prompt, max_tokens, ..Default::default() };
                match client.generate_stream(self.request(message)).await {
                    Ok(response) => {
                        consume(response.into_inner(), |c| Chunk {
                            has_text: !c.delta.is_empty(),
                            cached: c.cached,
                            last: c.finish_reason != 0,
                            usage: c.usage,
                        })
                        .await
                    }
                    Err(status) => failed(&status),
                }
            } else {
                let message = $messages::GenerateRequest { model, prompt, max_tokens, ..Default::default() };
                match client.generate(self.request(message)).await {
                    Ok(response) => {
                        let response = response.into_inner();
                        CallResult::ok(success(response.cached, response.usage))
                    }
                    Err(status) => failed(&status),
                }
            }
        }
    };
}

use std::time::Duration;

use anyhow::Context as _;
use llmesh_proto::{
    common::v1::Usage,
    gateway::v1::{self as gw, gateway_client::GatewayClient},
    generation::v1::{self as gen_v1, generation_client::GenerationClient},
};
use tokio::time::Instant;
use tonic::{
    Request, Status, Streaming,
    metadata::AsciiMetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::{
    args::{Service, TlsFiles},
    outcome::{CallResult, Failure, Success},
    runner::Caller,
    workload::Workload,
};

/// How long connecting may take before the run is refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens `n` HTTP/2 connections to `target` (each `Channel` is one connection), before the clock
/// starts, so no call pays for a handshake.
pub async fn connect(target: &str, tls: Option<&TlsFiles>, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut endpoint = Endpoint::from_shared(target.to_string())
        .with_context(|| format!("bad target {target:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        // Calls queue in the channel when the server's stream limit is reached; let them.
        .buffer_size(64 * 1024);
    if let Some(tls) = tls {
        let mut config = match &tls.ca {
            Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(config).context("TLS settings")?;
    }
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = endpoint.connect().await.with_context(|| format!("cannot connect to {target}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// The clients, one per connection.
enum Clients {
    Gateway(Vec<GatewayClient<Channel>>),
    Generation(Vec<GenerationClient<Channel>>),
}

/// Makes the calls of a run.
pub struct GrpcCaller {
    clients: Clients,
    workload: Workload,
    model: String,
    max_tokens: u32,
    stream: bool,
    api_key: Option<AsciiMetadataValue>,
    timeout: Duration,
}

/// Request settings every call shares.
#[derive(Debug, Clone)]
pub struct CallSettings {
    pub model: String,
    pub max_tokens: u32,
    pub stream: bool,
    pub api_key: Option<AsciiMetadataValue>,
    pub timeout: Duration,
}

impl GrpcCaller {
    pub fn new(service: Service, channels: Vec<Channel>, workload: Workload, settings: CallSettings) -> Self {
        let clients = match service {
            Service::Gateway => Clients::Gateway(channels.into_iter().map(GatewayClient::new).collect()),
            Service::Generation => Clients::Generation(channels.into_iter().map(GenerationClient::new).collect()),
        };
        let CallSettings { model, max_tokens, stream, api_key, timeout } = settings;
        Self { clients, workload, model, max_tokens, stream, api_key, timeout }
    }

    /// The message with the call's deadline and API key.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(key) = &self.api_key {
            request.metadata_mut().insert("x-api-key", key.clone());
        }
        request
    }

    call_with!(gateway, GatewayClient<Channel>, gw);
    call_with!(generation, GenerationClient<Channel>, gen_v1);
}

impl Caller for GrpcCaller {
    async fn call(&self, seq: u64) -> CallResult {
        let prompt = self.workload.prompt(seq);
        // Round-robin over the connections; `seq` is the start order.
        match &self.clients {
            Clients::Gateway(clients) => self.gateway(clients[pick(seq, clients.len())].clone(), prompt).await,
            Clients::Generation(clients) => self.generation(clients[pick(seq, clients.len())].clone(), prompt).await,
        }
    }
}

fn pick(seq: u64, n: usize) -> usize {
    usize::try_from(seq % n.max(1) as u64).unwrap_or(0)
}

fn failed(status: &Status) -> CallResult {
    CallResult::failed(Failure::Status(status.code()))
}

pub(super) fn success(cached: bool, usage: Option<Usage>) -> Success {
    let usage = usage.unwrap_or_default();
    Success {
        cached,
        prompt_tokens: u64::from(usage.prompt_tokens),
        completion_tokens: u64::from(usage.completion_tokens),
        total_tokens: u64::from(usage.total_tokens),
    }
}

/// What the stream consumer needs of a chunk, whichever service sent it.
struct Chunk {
    has_text: bool,
    cached: bool,
    last: bool,
    usage: Option<Usage>,
}

/// Reads a stream to its end: the time of the first text, the final chunk's usage, whether any
/// chunk came from the cache. A stream that ends OK without a final chunk is an error.
async fn consume<M>(mut stream: Streaming<M>, view: impl Fn(&M) -> Chunk) -> CallResult {
    let mut first_token = None;
    let mut cached = false;
    let mut last: Option<Option<Usage>> = None;
    loop {
        match stream.message().await {
            Ok(Some(message)) => {
                let chunk = view(&message);
                if chunk.has_text && first_token.is_none() {
                    first_token = Some(Instant::now());
                }
                cached |= chunk.cached;
                if chunk.last {
                    last = Some(chunk.usage);
                }
            }
            Ok(None) => break,
            Err(status) => return CallResult { first_token, ..failed(&status) },
        }
    }
    let outcome = match last {
        Some(usage) => Ok(success(cached, usage)),
        None => Err(Failure::StreamIncomplete),
    };
    CallResult { outcome, first_token }
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn calls_take_the_connections_in_turn() {
        let picks: Vec<usize> = (0..7).map(|seq| pick(seq, 3)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(pick(5, 1), 0);
    }
}

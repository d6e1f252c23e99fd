//! The floor of `bench/run`'s `cpu` scenario: what HTTP/2 itself costs per gRPC call on this
//! machine, so every service's CPU per call can be read as a multiple of it.
//!
//! A bare hyper HTTP/2 server on one thread (a current-thread Tokio runtime) that reads each
//! request's body to its end and answers every request, whatever its path, with the same gRPC
//! answer: `200`, `content-type: application/grpc`, one length-prefixed message (a
//! `GenerateResponse` of `--text-bytes` of text, encoded by hand) and the trailer `grpc-status: 0`.
//! No routing, no decoding, no tonic, no tower, no telemetry: everything a service does on top of
//! this is its own cost.
//!
//! With `--mode openai` it is instead the bare upstream of bench/run's `ingress` scenario: an
//! OpenAI-compatible chat completions server of no substance, HTTP/1.1 with keep-alive, on the same
//! one thread. It reads each request's body to its end and answers every request, whatever its
//! path or body, with the same `200 application/json` chat completion (the shape and text of
//! bench/mock_openai.py's: 24 tokens, `usage` included). No JSON is parsed: what the gateway and
//! generation spend in front of it is theirs.
//!
//!     floor [--listen 127.0.0.1:0] [--text-bytes 256] [--mode grpc|openai]
//!
//! Prints `listening on ADDR` on stderr once bound; stops on SIGINT or SIGTERM.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

fn main() -> Result<(), String> {
    let args = Args::parse(std::env::args().skip(1))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(serve(args))
}

/// What the floor speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// HTTP/2, a fixed gRPC `GenerateResponse` (the cpu scenario).
    Grpc,
    /// HTTP/1.1 keep-alive, a fixed OpenAI chat completion (the ingress scenario).
    OpenAi,
}

struct Args {
    listen: SocketAddr,
    text_bytes: usize,
    mode: Mode,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut parsed = Args { listen: SocketAddr::from(([127, 0, 0, 1], 0)), text_bytes: 256, mode: Mode::Grpc };
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--listen" => parsed.listen = value.parse().map_err(|e| format!("--listen {value}: {e}"))?,
                "--text-bytes" => {
                    parsed.text_bytes = value.parse().map_err(|e| format!("--text-bytes {value}: {e}"))?;
                    if parsed.text_bytes > 1 << 20 {
                        return Err("--text-bytes: at most 1 MiB".into());
                    }
                }
                "--mode" => {
                    parsed.mode = match value.as_str() {
                        "grpc" => Mode::Grpc,
                        "openai" => Mode::OpenAi,
                        other => return Err(format!("--mode {other}: grpc or openai")),
                    }
                }
                other => return Err(format!("unknown option {other} (known: --listen, --text-bytes, --mode)")),
            }
        }
        Ok(parsed)
    }
}

async fn serve(args: Args) -> Result<(), String> {
    let listener = TcpListener::bind(args.listen).await.map_err(|e| format!("binding {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| format!("reading the bound address: {e}"))?;
    let answer = match args.mode {
        Mode::Grpc => grpc_frame(&generate_response(args.text_bytes)),
        Mode::OpenAi => Bytes::from_static(CHAT_COMPLETION.as_bytes()),
    };
    // The harness waits for this line; a failed write means nobody is listening for it.
    let _ = writeln!(std::io::stderr(), "floor listening on {addr}");

    let mut terminate = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors and the like: the next accept may succeed.
                Err(_) => continue,
            },
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let answer = answer.clone();
        let mode = args.mode;
        tokio::spawn(async move {
            // A connection that breaks is the client's business; the server goes on.
            match mode {
                Mode::Grpc => {
                    let service = hyper::service::service_fn(move |request| answer_call(request, answer.clone()));
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                Mode::OpenAi => {
                    let service = hyper::service::service_fn(move |request| answer_chat(request, answer.clone()));
                    // Keep-alive is hyper's default for HTTP/1.1.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

/// Reads the request to its end (a service must, to decode it), then answers.
async fn answer_call(request: Request<Incoming>, answer: Bytes) -> Result<Response<FixedAnswer>, Infallible> {
    // A body that fails to arrive still gets the answer: the floor measures transport, not errors.
    let _ = request.into_body().collect().await;
    let mut response = Response::new(FixedAnswer { message: Some(answer), trailers_sent: false });
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    Ok(response)
}

/// The chat completion every request of `--mode openai` gets: bench/mock_openai.py's, byte for
/// byte but for `created` (fixed here).
const CHAT_COMPLETION: &str = concat!(
    r#"{"id":"chatcmpl-mock","object":"chat.completion","created":1700000000,"model":"mock","#,
    r#""choices":[{"index":0,"message":{"role":"assistant","content":"the mesh answers with a simulated "#,
    r#"reply about your prompt and every token is deterministic so caches tests benchmarks agree on what "#,
    r#"came back"},"finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":24,"total_tokens":32}}"#
);

/// Reads the request to its end (a server must, to keep the connection), then answers the fixed
/// chat completion; `Full` gives hyper the length, so the answer goes with `content-length`.
async fn answer_chat(
    request: Request<Incoming>,
    answer: Bytes,
) -> Result<Response<http_body_util::Full<Bytes>>, Infallible> {
    let _ = request.into_body().collect().await;
    let mut response = Response::new(http_body_util::Full::new(answer));
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// One gRPC message, then `grpc-status: 0` as trailers.
struct FixedAnswer {
    message: Option<Bytes>,
    trailers_sent: bool,
}

impl Body for FixedAnswer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(message) = self.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        if self.trailers_sent {
            return Poll::Ready(None);
        }
        self.trailers_sent = true;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.message.is_none() && self.trailers_sent
    }

    fn size_hint(&self) -> SizeHint {
        self.message.as_ref().map_or_else(|| SizeHint::with_exact(0), |m| SizeHint::with_exact(m.len() as u64))
    }
}

/// A `llmesh.gateway.v1.GenerateResponse` (id 1, model 2, text 3, finish_reason 4, provider 8) in
/// protobuf's wire format, written by hand so that the floor links no protobuf code.
fn generate_response(text_bytes: usize) -> Vec<u8> {
    let text: String = "floor ".chars().cycle().take(text_bytes).collect();
    let mut message = Vec::with_capacity(text_bytes + 32);
    for (field, value) in [(1u32, "floor-0"), (2, "sim"), (3, text.as_str())] {
        length_delimited(&mut message, field, value.as_bytes());
    }
    message.extend_from_slice(&[4 << 3, 1]); // finish_reason = STOP (a varint)
    length_delimited(&mut message, 8, b"sim");
    message
}

fn length_delimited(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// gRPC's length-prefixed message: a compression flag (0), the length (big-endian u32), the bytes.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(message.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    Bytes::from(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_protobufs() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
    }

    #[test]
    fn the_answer_is_one_length_prefixed_message() {
        let message = generate_response(10);
        let frame = grpc_frame(&message);
        assert_eq!(frame[0], 0);
        assert_eq!(u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize, message.len());
        // Field 3 (text) is tag 0x1a, length 10, then the text.
        let text_at = message.windows(2).position(|w| w == [0x1a, 10]).map(|i| i + 2);
        assert_eq!(text_at.map(|i| &message[i..i + 10]), Some(&b"floor floo"[..]));
    }

    #[test]
    fn options_are_checked() {
        let args = |a: &[&str]| Args::parse(a.iter().map(|s| s.to_string()));
        assert!(args(&["--listen", "127.0.0.1:5"]).is_ok_and(|a| a.listen.port() == 5 && a.text_bytes == 256));
        assert!(args(&["--text-bytes", "12"]).is_ok_and(|a| a.text_bytes == 12));
        assert!(args(&["--listen"]).is_err());
        assert!(args(&["--port", "1"]).is_err());
        assert!(args(&["--text-bytes", "99999999"]).is_err());
        assert!(args(&["--mode", "openai"]).is_ok_and(|a| a.mode == Mode::OpenAi));
        assert!(args(&["--mode", "http3"]).is_err());
    }

    #[test]
    fn the_chat_completion_is_the_mocks() {
        // bench/mock_openai.py's TEXT: its WORDS' first 24.
        let words = "the mesh answers with a simulated reply about your prompt and every token is \
                     deterministic so caches tests benchmarks agree on what came back";
        assert_eq!(words.split_whitespace().count(), 24);
        let content = format!(r#""content":"{}""#, words.split_whitespace().collect::<Vec<_>>().join(" "));
        assert!(CHAT_COMPLETION.contains(&content), "{CHAT_COMPLETION}");
        assert!(CHAT_COMPLETION.contains(r#""usage":{"prompt_tokens":8,"completion_tokens":24"#));
    }
}

//! Server-sent events from a stream of chunks: each API says what events a chunk makes
//! ([`Events`]); this module writes them as they come.
//!
//! Each chunk's events leave as one body frame the moment the chunk arrives (hyper writes a frame
//! at once; nothing between here and the socket buffers). Dropping the body — the client went
//! away — drops the chunk stream, which cancels the call to generation and settles the call's
//! tokens with what was sent. A stream that fails after its `200` went out ends with the API's
//! error event and a `grpc-status` trailer: the tracing layer counts the call under that code
//! (hyper sends HTTP/1.1 trailers only to clients that ask for them with `TE: trailers`).

use std::convert::Infallible;

use futures::StreamExt as _;
use http::{HeaderMap, HeaderValue, Response, header};
use http_body::Frame;
use llmesh_proto::gateway::v1::GenerateStreamResponse;
use prost::bytes::Bytes;
use serde::Serialize;
use tonic::body::Body;

use super::{Problem, upstream_problem};
use crate::{answer::relay::ChunkStream, deadline::Deadline};

/// What one API sends for a stream: its events for the opening, each chunk, the normal end and
/// a failure, each as SSE text ([`event`], [`data`]).
pub trait Events: Send + 'static {
    /// Before the first chunk.
    fn open(&mut self, first: &GenerateStreamResponse, out: &mut Vec<u8>);
    /// For each chunk, the final one (with its finish reason and usage) included.
    fn chunk(&mut self, chunk: &GenerateStreamResponse, out: &mut Vec<u8>);
    /// After the final chunk.
    fn close(&mut self, out: &mut Vec<u8>);
    /// Instead of the rest, when the stream fails.
    fn fail(&mut self, problem: &Problem, out: &mut Vec<u8>);
}

/// A `data:` line of JSON, and the blank line that ends the event.
pub fn data(value: &impl Serialize, out: &mut Vec<u8>) {
    out.extend_from_slice(b"data: ");
    // Serializing our own JSON values cannot fail; an empty event would be the only outcome.
    let _ = serde_json::to_writer(&mut *out, value);
    out.extend_from_slice(b"\n\n");
}

/// A named event (`event: NAME`) with JSON data.
pub fn event(name: &str, value: &impl Serialize, out: &mut Vec<u8>) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\n");
    data(value, out);
}

/// The `200 text/event-stream` response for `chunks` (whose first chunk is `first`), with
/// `headers` besides.
pub fn response(
    first: &GenerateStreamResponse,
    chunks: ChunkStream,
    mut events: impl Events,
    deadline: Deadline,
    headers: HeaderMap,
) -> Response<Body> {
    let mut opening = Vec::new();
    events.open(first, &mut opening);
    let state = State { chunks, events, deadline, done: false };
    let rest = futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let mut out = Vec::new();
        let frame = match state.chunks.next().await {
            Some(Ok(chunk)) => {
                state.events.chunk(&chunk, &mut out);
                if chunk.finish_reason != 0 {
                    state.events.close(&mut out);
                    state.done = true;
                }
                Frame::data(Bytes::from(out))
            }
            Some(Err(status)) => {
                state.done = true;
                let problem = upstream_problem(&status, state.deadline);
                state.events.fail(&problem, &mut out);
                // The error event first, then the code for the tracing layer.
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from(problem.code as i32));
                return Some((
                    futures::stream::iter([Frame::data(Bytes::from(out)), Frame::trailers(trailers)]).boxed(),
                    state,
                ));
            }
            None => return None,
        };
        Some((futures::stream::iter([frame]).boxed(), state))
    })
    .flatten();
    let frames =
        futures::stream::once(async move { Frame::data(Bytes::from(opening)) }).chain(rest).map(Ok::<_, Infallible>);
    let mut response = Response::new(Body::new(http_body_util::StreamBody::new(frames)));
    *response.headers_mut() = headers;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies (nginx) buffer responses unless told not to: each event must reach the client as it comes.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

struct State<E> {
    chunks: ChunkStream,
    events: E,
    deadline: Deadline,
    done: bool,
}

//! Answers sent as streams: a whole answer replayed as chunks ([`replay`]), and generation's live
//! stream passed on as it arrives ([`relay`]), each settling the call's tokens once.

use futures::StreamExt as _;
use llmesh_proto::{assemble, validate};
use llmesh_proto::{
    common::v1::FinishReason,
    gateway::v1 as gw,
    generation::v1::{GenerateRequest, GenerateStreamResponse},
};
use tonic::Status;

use crate::{admission::Tokens, answer::Answer, cache::Cache, deadline::Deadline, pipeline::Started};

pub type ChunkStream = futures::stream::BoxStream<'static, Result<gw::GenerateStreamResponse, Status>>;

/// A whole answer sent as a stream: a cached one in the chunks it was first streamed in (or as one
/// chunk when it was cached from a unary call), a fallback one as one chunk; then the final chunk
/// with the finish reason and usage. The tokens are settled at once.
pub fn replay(answer: Answer, tokens: Tokens) -> (ChunkStream, crate::admission::Quota) {
    let quota = tokens.settle_bill(answer.bill(), &answer.response.model);
    let Answer { response, chunks, .. } = answer;
    // Reasoning, the text chunks, the tool calls, then the final chunk (see `assemble`).
    let chunks: Vec<_> = assemble::replay_chunks(&response, chunks).into_iter().map(|chunk| Ok(chunk.into())).collect();
    (futures::stream::iter(chunks).boxed(), quota)
}

/// Passes generation's chunks on as they arrive, until the call's deadline. When the stream
/// finishes normally its tokens are settled with the usage the final chunk reports, and the whole
/// answer is stored in `cache` (chunk boundaries included, for replay). A stream that ends early
/// (the client went away, generation failed) settles with what the client received.
pub fn relay(
    started: Started,
    request: std::sync::Arc<GenerateRequest>,
    cache: Option<Cache>,
    deadline: Deadline,
    tokens: Tokens,
) -> ChunkStream {
    let state = Relay {
        tokens: Some(tokens),
        first: Some(started.first),
        rest: started.rest,
        request,
        cache,
        chunks: Vec::new(),
        assembler: assemble::Assembler::default(),
        done: false,
    };
    futures::stream::unfold(state, move |mut state| async move {
        if state.done {
            return None;
        }
        let next = match state.first.take() {
            Some(first) => Ok(Some(first)),
            None => deadline.run("generation's next chunk", async { state.rest.next().await.transpose() }).await,
        };
        let item = match next {
            Ok(Some(chunk)) => Ok(state.pass(chunk)),
            Ok(None) => {
                state.done = true;
                Err(Status::unavailable("generation ended the stream without a final chunk"))
            }
            Err(status) => {
                state.done = true;
                Err(mid_stream(status))
            }
        };
        Some((item, state))
    })
    .boxed()
}

struct Relay {
    /// `None` once settled.
    tokens: Option<Tokens>,
    first: Option<GenerateStreamResponse>,
    rest: futures::stream::BoxStream<'static, Result<GenerateStreamResponse, Status>>,
    request: std::sync::Arc<GenerateRequest>,
    cache: Option<Cache>,
    chunks: Vec<String>,
    /// The tool calls and reasoning of the answer, for the cache.
    assembler: assemble::Assembler,
    done: bool,
}

impl Relay {
    fn pass(&mut self, chunk: GenerateStreamResponse) -> gw::GenerateStreamResponse {
        if let Some(tokens) = self.tokens.as_mut() {
            let arguments = chunk.tool_calls.iter().map(|call| call.arguments.len()).sum::<usize>();
            tokens.received(validate::estimated_tokens(chunk.delta.len() + arguments));
        }
        if self.cache.is_some() && !chunk.delta.is_empty() {
            self.chunks.push(chunk.delta.clone());
        }
        if self.cache.is_some() && self.assembler.add(&chunk).is_err() {
            // Not an answer the cache could replay exactly: not stored.
            self.cache = None;
        }
        if chunk.finish_reason != i32::from(FinishReason::Unspecified) {
            self.done = true;
            if let Some(tokens) = self.tokens.take() {
                let usage = chunk.usage.filter(|_| chunk.degraded.is_none());
                tokens.settle(usage, &chunk.model);
            }
            if let Some(cache) = self.cache.take() {
                let mut response = std::mem::take(&mut self.assembler).finish(self.chunks.concat(), &chunk);
                response.cached = false;
                cache.store((*self.request).clone(), response, std::mem::take(&mut self.chunks));
            }
        }
        chunk.into()
    }
}

/// A failure after the first chunk: nothing is retried or fallen back from any more. A deadline
/// is the client's to see as it is; anything else is generation's, told in fixed words (the
/// detail goes to the log), as every other failure.
fn mid_stream(status: Status) -> Status {
    if status.code() == tonic::Code::DeadlineExceeded {
        return status;
    }
    crate::pipeline::UpstreamError::from_client(status).into_status()
}

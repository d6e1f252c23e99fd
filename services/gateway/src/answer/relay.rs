//! Answers sent as streams: a whole answer replayed as chunks ([`replay`]), and generation's live
//! stream passed on as it arrives ([`relay`]), each settling the call's tokens once.

use futures::StreamExt as _;
use llmesh_proto::validate;
use llmesh_proto::{
    common::v1::FinishReason,
    gateway::v1 as gw,
    generation::v1::{GenerateRequest, GenerateResponse, GenerateStreamResponse},
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
    let chunks = if chunks.is_empty() { vec![response.text.clone()] } else { chunks };
    let header = move |delta: String| gw::GenerateStreamResponse {
        id: response.id.clone(),
        model: response.model.clone(),
        provider: response.provider.clone(),
        cached: response.cached,
        degraded: response.degraded.clone(),
        delta,
        ..Default::default()
    };
    let mut last = header(String::new());
    last.finish_reason = response.finish_reason;
    last.usage = response.usage;
    let deltas: Vec<_> = chunks.into_iter().map(|delta| Ok(header(delta))).collect();
    (futures::stream::iter(deltas).chain(futures::stream::once(async move { Ok(last) })).boxed(), quota)
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
    done: bool,
}

impl Relay {
    fn pass(&mut self, chunk: GenerateStreamResponse) -> gw::GenerateStreamResponse {
        if let Some(tokens) = self.tokens.as_mut() {
            tokens.received(validate::estimated_tokens(chunk.delta.len()));
        }
        if self.cache.is_some() && !chunk.delta.is_empty() {
            self.chunks.push(chunk.delta.clone());
        }
        if chunk.finish_reason != i32::from(FinishReason::Unspecified) {
            self.done = true;
            if let Some(tokens) = self.tokens.take() {
                let usage = chunk.usage.filter(|_| chunk.degraded.is_none());
                tokens.settle(usage, &chunk.model);
            }
            if let Some(cache) = self.cache.take() {
                let response = GenerateResponse {
                    id: chunk.id.clone(),
                    model: chunk.model.clone(),
                    text: self.chunks.concat(),
                    finish_reason: chunk.finish_reason,
                    usage: chunk.usage,
                    cached: false,
                    degraded: chunk.degraded.clone(),
                    provider: chunk.provider.clone(),
                };
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

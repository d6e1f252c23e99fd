//! A streamed answer and a whole one, each made from the other: [`Assembler`] folds stream chunks
//! into a [`GenerateResponse`] (what the gateway caches from a stream, what a unary call over a
//! streaming provider answers), and [`replay_chunks`] splits a whole answer into the chunks a
//! stream sends (what a cache hit or a unary provider's answer looks like on a stream).
//!
//! What it promises: assembling the chunks of [`replay_chunks`] gives back the answer's text, tool
//! calls (ids, names, arguments byte for byte, signatures) and reasoning blocks exactly. Chunk
//! boundaries are not kept beyond the text chunks a caller passes in: a replayed tool call comes
//! as one delta with its whole arguments.

use crate::common::v1::{Reasoning, ReasoningDelta, ToolCall, ToolCallDelta};
use crate::generation::v1::{GenerateResponse, GenerateStreamResponse};

/// The most tool calls or reasoning blocks one answer may have: a delta with a higher index is
/// refused ([`Assembler::add`]), so that a bad index cannot make the assembler allocate without
/// bound.
pub const MAX_ITEMS: usize = 1024;

/// An index past [`MAX_ITEMS`] in a stream's delta.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a stream chunk names {what} {index}, past the limit of {MAX_ITEMS}")]
pub struct IndexTooHigh {
    pub what: &'static str,
    pub index: u32,
}

/// Folds the tool-call and reasoning deltas of a stream's chunks into whole calls and blocks.
/// The text is the caller's (it keeps the chunks themselves, for replay).
#[derive(Debug, Default, Clone)]
pub struct Assembler {
    tool_calls: Vec<ToolCall>,
    reasoning: Vec<Reasoning>,
}

fn slot<'a, T: Default>(items: &'a mut Vec<T>, index: u32, what: &'static str) -> Result<&'a mut T, IndexTooHigh> {
    let i = usize::try_from(index).unwrap_or(usize::MAX);
    if i >= MAX_ITEMS {
        return Err(IndexTooHigh { what, index });
    }
    if i >= items.len() {
        items.resize_with(i + 1, T::default);
    }
    Ok(&mut items[i])
}

impl Assembler {
    /// Adds one chunk's deltas.
    pub fn add(&mut self, chunk: &GenerateStreamResponse) -> Result<(), IndexTooHigh> {
        for delta in &chunk.tool_calls {
            self.tool_call(delta)?;
        }
        for delta in &chunk.reasoning {
            self.reasoning(delta)?;
        }
        Ok(())
    }

    /// Adds one tool-call delta.
    pub fn tool_call(&mut self, delta: &ToolCallDelta) -> Result<(), IndexTooHigh> {
        let call = slot(&mut self.tool_calls, delta.index, "tool call")?;
        if call.id.is_empty() {
            call.id.clone_from(&delta.id);
        }
        if call.name.is_empty() {
            call.name.clone_from(&delta.name);
        }
        call.arguments.push_str(&delta.arguments);
        if !delta.signature.is_empty() {
            call.signature.clone_from(&delta.signature);
        }
        Ok(())
    }

    /// Adds one reasoning delta.
    pub fn reasoning(&mut self, delta: &ReasoningDelta) -> Result<(), IndexTooHigh> {
        let block = slot(&mut self.reasoning, delta.index, "reasoning block")?;
        block.text.push_str(&delta.text);
        if !delta.redacted_content.is_empty() {
            block.redacted_content.clone_from(&delta.redacted_content);
        }
        if !delta.signature.is_empty() {
            block.signature.clone_from(&delta.signature);
        }
        Ok(())
    }

    /// The assembled tool calls and reasoning blocks.
    pub fn into_parts(self) -> (Vec<ToolCall>, Vec<Reasoning>) {
        (self.tool_calls, self.reasoning)
    }

    /// Tool calls so far.
    pub fn tool_calls(&self) -> &[ToolCall] {
        &self.tool_calls
    }

    /// The whole answer: `text`, the assembled calls and blocks, and what the last chunk says
    /// (id, model, finish reason, usage, degraded, provider, extensions).
    pub fn finish(self, text: String, last: &GenerateStreamResponse) -> GenerateResponse {
        GenerateResponse {
            id: last.id.clone(),
            model: last.model.clone(),
            text,
            finish_reason: last.finish_reason,
            usage: last.usage,
            cached: last.cached,
            degraded: last.degraded.clone(),
            provider: last.provider.clone(),
            tool_calls: self.tool_calls,
            reasoning: self.reasoning,
            extensions: last.extensions.clone(),
        }
    }
}

/// The chunks a stream sends for a whole `response`: its reasoning blocks (one chunk), then its
/// text in `text_chunks` (or as one chunk when there are none and the text is not empty), then
/// its tool calls (one chunk), then the final chunk with the finish reason, usage and extensions.
/// Every chunk carries the answer's id, model, provider, `cached` and `degraded`.
pub fn replay_chunks(response: &GenerateResponse, text_chunks: Vec<String>) -> Vec<GenerateStreamResponse> {
    let header = |delta: String| GenerateStreamResponse {
        id: response.id.clone(),
        model: response.model.clone(),
        provider: response.provider.clone(),
        cached: response.cached,
        degraded: response.degraded.clone(),
        delta,
        ..Default::default()
    };
    let mut chunks = Vec::with_capacity(text_chunks.len() + 3);
    if !response.reasoning.is_empty() {
        let mut chunk = header(String::new());
        chunk.reasoning = response
            .reasoning
            .iter()
            .zip(0u32..)
            .map(|(block, index)| ReasoningDelta {
                index,
                text: block.text.clone(),
                redacted_content: block.redacted_content.clone(),
                signature: block.signature.clone(),
            })
            .collect();
        chunks.push(chunk);
    }
    let text_chunks =
        if text_chunks.is_empty() && !response.text.is_empty() { vec![response.text.clone()] } else { text_chunks };
    chunks.extend(text_chunks.into_iter().map(header));
    if !response.tool_calls.is_empty() {
        let mut chunk = header(String::new());
        chunk.tool_calls = response
            .tool_calls
            .iter()
            .zip(0u32..)
            .map(|(call, index)| ToolCallDelta {
                index,
                id: call.id.clone(),
                name: call.name.clone(),
                arguments: call.arguments.clone(),
                signature: call.signature.clone(),
            })
            .collect();
        chunks.push(chunk);
    }
    let mut last = header(String::new());
    last.finish_reason = response.finish_reason;
    last.usage = response.usage;
    last.extensions = response.extensions.clone();
    chunks.push(last);
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::v1::{Extensions, FinishReason, Usage};

    fn answer() -> GenerateResponse {
        GenerateResponse {
            id: "id".into(),
            model: "sim".into(),
            text: "calling".into(),
            finish_reason: FinishReason::ToolCalls.into(),
            usage: Some(Usage { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7, ..Default::default() }),
            provider: "sim".into(),
            tool_calls: vec![
                ToolCall { id: "a".into(), name: "f".into(), arguments: r#"{"x": 1.0}"#.into(), signature: vec![] },
                ToolCall { id: "b".into(), name: "g".into(), arguments: "{}".into(), signature: vec![7] },
            ],
            reasoning: vec![Reasoning { text: "hm".into(), redacted_content: vec![], signature: vec![1, 2] }],
            extensions: Some(Extensions { dialect: "openai".into(), json: r#"{"system_fingerprint":"x"}"#.into() }),
            ..Default::default()
        }
    }

    #[test]
    fn a_replayed_answer_assembles_to_itself() {
        let answer = answer();
        let chunks = replay_chunks(&answer, vec!["call".into(), "ing".into()]);
        let mut assembler = Assembler::default();
        let mut text = String::new();
        for chunk in &chunks {
            assembler.add(chunk).unwrap();
            text.push_str(&chunk.delta);
        }
        let last = chunks.last().unwrap();
        assert_eq!(assembler.finish(text, last), answer);
    }

    #[test]
    fn fragments_join_by_index() {
        let chunk = |deltas: Vec<ToolCallDelta>| GenerateStreamResponse { tool_calls: deltas, ..Default::default() };
        let delta = |index, id: &str, name: &str, arguments: &str| ToolCallDelta {
            index,
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
            signature: vec![],
        };
        let mut assembler = Assembler::default();
        assembler.add(&chunk(vec![delta(0, "a", "f", ""), delta(1, "b", "g", "{\"y")])).unwrap();
        assembler.add(&chunk(vec![delta(0, "", "", "{\"x\":"), delta(1, "", "", "\":2}")])).unwrap();
        assembler.add(&chunk(vec![delta(0, "", "", " 1}")])).unwrap();
        let calls = assembler.tool_calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].id.as_str(), calls[0].name.as_str(), calls[0].arguments.as_str()),
            ("a", "f", "{\"x\": 1}")
        );
        assert_eq!(
            (calls[1].id.as_str(), calls[1].name.as_str(), calls[1].arguments.as_str()),
            ("b", "g", "{\"y\":2}")
        );
        let err = assembler.add(&chunk(vec![delta(5000, "", "", "")])).unwrap_err();
        assert_eq!(err.index, 5000);
    }
}

//! Golden files of the OpenAI-compatible provider's translation (see [`crate::provider::golden`]
//! for what each directory pins).

use llmesh_proto::generation::v1::GenerateRequest;

use super::{Chunks, read_completion, wire};
use crate::provider::golden::{self, PROMPT_TOKENS};

/// The upstream model name in every body.
const MODEL: &str = "gpt-4o";

fn body(request: &GenerateRequest, stream: bool) -> Result<String, String> {
    let max_tokens = if request.max_tokens == 0 { 1024 } else { request.max_tokens };
    let text = wire::body(request, MODEL, max_tokens, stream).map_err(|e| e.to_string())?;
    for call in request.messages.iter().flat_map(|message| &message.tool_calls) {
        let arguments = serde_json::to_string(&call.arguments).unwrap();
        assert!(text.contains(&arguments), "{arguments} is in {text}");
    }
    Ok(text)
}

#[test]
fn requests() {
    golden::requests("openai", body);
}

#[test]
fn responses() {
    golden::responses("openai", read_completion);
}

#[tokio::test]
async fn streams() {
    golden::streams("openai", || Chunks::new(PROMPT_TOKENS)).await;
}

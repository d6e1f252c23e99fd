//! Golden files of the Anthropic provider's translation (see [`crate::provider::golden`] for what
//! each directory pins). The requests include every request the gateway makes of an Anthropic
//! client's body: those go back out as that client sent them, but for what llmesh chose to fill
//! in (`stream`, the upstream model's name).

use llmesh_proto::generation::v1::GenerateRequest;

use super::{Events, read_message, wire};
use crate::provider::golden::{self, PROMPT_TOKENS};

/// The upstream model name in every body.
const MODEL: &str = "claude-sonnet-4-5";

fn body(request: &GenerateRequest, stream: bool) -> Result<String, String> {
    let max_tokens = if request.max_tokens == 0 { 1024 } else { request.max_tokens };
    let text = wire::body(request, MODEL, max_tokens, stream).map_err(|e| e.to_string())?;
    // Tool-call arguments are the `input` objects, byte for byte.
    for call in request.messages.iter().flat_map(|message| &message.tool_calls) {
        let input = format!(r#""input":{}"#, if call.arguments.is_empty() { "{}" } else { &call.arguments });
        assert!(text.contains(&input), "{input} is in {text}");
    }
    Ok(text)
}

#[test]
fn requests() {
    golden::requests("anthropic", body);
}

#[test]
fn responses() {
    golden::responses("anthropic", read_message);
}

#[tokio::test]
async fn streams() {
    golden::streams("anthropic", || Events::new(PROMPT_TOKENS)).await;
}

//! Golden files of the Gemini provider's translation (see [`crate::provider::golden`] for what
//! each directory pins).

use llmesh_proto::generation::v1::GenerateRequest;

use super::{Responses, read_response, wire};
use crate::provider::golden::{self, PROMPT_TOKENS};

fn body(request: &GenerateRequest, _stream: bool) -> Result<String, String> {
    let max_tokens = if request.max_tokens == 0 { 1024 } else { request.max_tokens };
    let text = wire::body(request, max_tokens).map_err(|e| e.to_string())?;
    // Tool-call arguments are the `args` objects, byte for byte.
    for call in request.messages.iter().flat_map(|message| &message.tool_calls) {
        let args = format!(r#""args":{}"#, if call.arguments.is_empty() { "{}" } else { &call.arguments });
        assert!(text.contains(&args), "{args} is in {text}");
    }
    Ok(text)
}

#[test]
fn requests() {
    golden::requests("gemini", body);
}

#[test]
fn responses() {
    golden::responses("gemini", read_response);
}

#[tokio::test]
async fn streams() {
    golden::streams("gemini", || Responses::new(PROMPT_TOKENS)).await;
}

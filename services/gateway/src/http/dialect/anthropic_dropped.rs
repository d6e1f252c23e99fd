//! The fields of an Anthropic request that llmesh parses into the contract but that no upstream it
//! has takes: `sim` reads the contract and acts on none of them, and the OpenAI-compatible provider
//! has no field for them (`docs/CONTRACT.md`, "Across dialects"). They are named in
//! `x-llmesh-unmapped-fields` beside the top-level fields llmesh does not act on, so that a client
//! can tell they were dropped. With a native Anthropic upstream, this becomes what the OpenAI
//! provider alone drops.

use llmesh_proto::{common::v1::content_part::Kind, common::v1::document::Source, generation::v1::GenerateRequest};

/// At most this many of a part's or a tool's `extra` fields are named (the header holds 16 names
/// in all).
const EXTRA_NAMES: usize = 4;

/// The dropped fields `request` has, in a fixed order, each named once.
pub fn dropped(request: &GenerateRequest) -> Vec<String> {
    let mut names = Vec::new();
    let messages = &request.messages;
    if messages.iter().any(|m| m.is_error) {
        names.push("tool_result.is_error".to_owned());
    }
    // A `tool` message takes text only; a text document is kept as text.
    let non_text = |kind: &Option<Kind>| match kind {
        Some(Kind::Image(_)) => true,
        Some(Kind::Document(document)) => !matches!(document.source, Some(Source::Text(_))),
        Some(Kind::Text(_)) | None => false,
    };
    if messages.iter().any(|m| m.role == "tool" && m.parts.iter().any(|p| non_text(&p.kind))) {
        names.push("tool_result.content".to_owned());
    }
    if messages.iter().any(|m| !m.reasoning.is_empty()) {
        names.push("thinking".to_owned());
    }
    let marked = messages.iter().any(|m| m.parts.iter().any(|p| !p.cache_control.is_empty()))
        || request.tools.iter().any(|t| !t.cache_control.is_empty());
    if marked {
        names.push("cache_control".to_owned());
    }
    if let Some(reasoning) = &request.reasoning {
        if reasoning.budget_tokens.is_some() {
            names.push("thinking.budget_tokens".to_owned());
        }
        if !reasoning.summary.is_empty() {
            names.push("thinking.display".to_owned());
        }
    }
    // A block's fields carried as its part's `extra` (`citations`, a document's `context`).
    for part in messages.iter().flat_map(|m| &m.parts).filter(|p| !p.extra.is_empty()) {
        push_keys(&mut names, "content[]", &part.extra);
    }
    for tool in request.tools.iter().filter(|t| !t.extra.is_empty()) {
        push_keys(&mut names, "tools[]", &tool.extra);
    }
    names
}

/// Names the first keys of `extra` (a JSON object's text) under `prefix`, each once.
fn push_keys(names: &mut Vec<String>, prefix: &str, extra: &str) {
    let Ok(serde_json::Value::Object(extra)) = serde_json::from_str::<serde_json::Value>(extra) else { return };
    for key in extra.keys().take(EXTRA_NAMES) {
        let name = format!("{prefix}.{key}");
        if !names.contains(&name) {
            names.push(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use llmesh_proto::common::v1::{ChatMessage, ContentPart, Image, Reasoning, ReasoningOptions, Tool};

    use super::*;

    #[test]
    fn each_dropped_field_is_named_once_and_nothing_else_is() {
        let plain = GenerateRequest {
            messages: vec![ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() }],
            tools: vec![Tool { name: "Bash".into(), parameters: "{}".into(), ..Default::default() }],
            ..Default::default()
        };
        assert!(dropped(&plain).is_empty());

        let image = ContentPart { kind: Some(Kind::Image(Image::default())), ..Default::default() };
        let marked = ContentPart {
            kind: Some(Kind::Text("sys".into())),
            cache_control: r#"{"type":"ephemeral"}"#.into(),
            ..Default::default()
        };
        let cited = ContentPart {
            kind: Some(Kind::Text("as said".into())),
            extra: r#"{"citations":[]}"#.into(),
            ..Default::default()
        };
        let tool = |extra: &str| Tool { name: "Bash".into(), extra: extra.into(), ..Default::default() };
        let everything = GenerateRequest {
            messages: vec![
                ChatMessage { role: "system".into(), parts: vec![marked], ..Default::default() },
                ChatMessage {
                    role: "assistant".into(),
                    reasoning: vec![Reasoning::default()],
                    parts: vec![cited],
                    ..Default::default()
                },
                ChatMessage { role: "tool".into(), is_error: true, parts: vec![image], ..Default::default() },
            ],
            tools: vec![tool(r#"{"defer_loading":true}"#), tool(r#"{"defer_loading":false,"strict":true}"#)],
            reasoning: Some(ReasoningOptions {
                budget_tokens: Some(1024),
                summary: "omitted".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            dropped(&everything),
            [
                "tool_result.is_error",
                "tool_result.content",
                "thinking",
                "cache_control",
                "thinking.budget_tokens",
                "thinking.display",
                "content[].citations",
                "tools[].defer_loading",
                "tools[].strict",
            ]
        );
    }
}

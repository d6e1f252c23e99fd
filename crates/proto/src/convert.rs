//! Conversions between the gateway's public messages and the mesh-internal generation messages.
//!
//! The pairs carry the same fields by design (see the .proto files), so each conversion is a plain
//! field-by-field move. Struct literals are exhaustive: a field added to one side and not the other
//! fails to compile here, which keeps the pairs in step.

use crate::{gateway::v1 as gw, generation::v1 as gen_v1};

macro_rules! move_fields {
    ($from:ty => $to:ty { $($field:ident),* $(,)? } $(+ { $($extra:ident: $value:expr),* $(,)? })?) => {
        impl From<$from> for $to {
            fn from(from: $from) -> Self {
                Self { $($field: from.$field,)* $($($extra: $value,)*)? }
            }
        }
    };
}

macro_rules! request_fields {
    ($from:ty => $to:ty) => {
        move_fields!($from => $to {
            model, prompt, messages, max_tokens, temperature, top_p, stop, seed, user, metadata, cache,
            idempotency_key, tools, tool_choice, parallel_tool_calls, response_format, reasoning, extensions,
        });
    };
}

request_fields!(gw::GenerateRequest => gen_v1::GenerateRequest);
request_fields!(gw::GenerateStreamRequest => gen_v1::GenerateRequest);
request_fields!(gen_v1::GenerateRequest => gen_v1::GenerateStreamRequest);
request_fields!(gen_v1::GenerateStreamRequest => gen_v1::GenerateRequest);

move_fields!(gw::SubmitJobRequest => gen_v1::GenerateRequest {
    model, prompt, messages, max_tokens, temperature, top_p, stop, seed, user, metadata, idempotency_key,
    tools, tool_choice, parallel_tool_calls, response_format, reasoning, extensions,
} + { cache: 0 });

macro_rules! response_fields {
    ($from:ty => $to:ty) => {
        move_fields!($from => $to {
            id, model, text, finish_reason, usage, cached, degraded, provider, tool_calls, reasoning,
            extensions,
        });
    };
}

response_fields!(gen_v1::GenerateResponse => gw::GenerateResponse);

macro_rules! chunk_fields {
    ($from:ty => $to:ty) => {
        move_fields!($from => $to {
            id, model, delta, finish_reason, usage, cached, degraded, provider, tool_calls, reasoning,
            extensions,
        });
    };
}

chunk_fields!(gen_v1::GenerateStreamResponse => gw::GenerateStreamResponse);

move_fields!(gen_v1::Model => gw::Model {
    name, provider, upstream_model, deterministic, context_window, max_output_tokens, capabilities,
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::v1::{
        ChatMessage, ContentPart, Extensions, Image, Reasoning, ReasoningDelta, ReasoningOptions, ResponseFormat, Tool,
        ToolCall, ToolCallDelta, ToolChoice, Usage, content_part, image,
    };
    use prost::Message as _;

    fn messages() -> Vec<ChatMessage> {
        vec![
            ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() },
            ChatMessage {
                role: "user".into(),
                parts: vec![
                    ContentPart { kind: Some(content_part::Kind::Text("look".into())), ..Default::default() },
                    ContentPart {
                        kind: Some(content_part::Kind::Image(Image {
                            source: Some(image::Source::Data(vec![0x89, b'P', b'N', b'G'])),
                            media_type: "image/png".into(),
                            detail: 2,
                        })),
                        cache_control: r#"{"type":"ephemeral"}"#.into(),
                        extra: "{}".into(),
                    },
                ],
                ..Default::default()
            },
            ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "Bash".into(),
                    arguments: r#"{"command": "echo hi"}"#.into(),
                    signature: vec![1],
                }],
                reasoning: vec![Reasoning { text: "t".into(), redacted_content: vec![2], signature: vec![3] }],
                ..Default::default()
            },
            ChatMessage {
                role: "tool".into(),
                tool_call_id: "call_1".into(),
                is_error: true,
                name: "Bash".into(),
                content: "hi".into(),
                ..Default::default()
            },
        ]
    }

    fn extensions() -> Option<Extensions> {
        Some(Extensions { dialect: "openai".into(), json: r#"{"logprobs":true}"#.into() })
    }

    #[test]
    fn gateway_request_keeps_every_field() {
        let public = gw::GenerateRequest {
            model: "sim".into(),
            prompt: String::new(),
            messages: messages(),
            max_tokens: 7,
            temperature: Some(0.5),
            top_p: Some(0.9),
            stop: vec!["\n".into()],
            seed: Some(42),
            user: "u1".into(),
            metadata: [("k".to_string(), "v".to_string())].into(),
            cache: 3,
            idempotency_key: "idem".into(),
            tools: vec![Tool {
                name: "Bash".into(),
                description: "runs a command".into(),
                parameters: r#"{"type":"object"}"#.into(),
                strict: Some(true),
                cache_control: r#"{"type":"ephemeral"}"#.into(),
                extra: r#"{"defer_loading":true}"#.into(),
            }],
            tool_choice: Some(ToolChoice { mode: 4, name: "Bash".into() }),
            parallel_tool_calls: Some(false),
            response_format: Some(ResponseFormat {
                r#type: 3,
                name: "answer".into(),
                schema: r#"{"type":"object"}"#.into(),
                strict: Some(true),
                description: "d".into(),
            }),
            reasoning: Some(ReasoningOptions {
                effort: "high".into(),
                budget_tokens: Some(1024),
                summary: "auto".into(),
            }),
            extensions: extensions(),
        };
        let internal: gen_v1::GenerateRequest = public.clone().into();
        // Same field numbers on both sides: the encodings are byte-identical.
        assert_eq!(public.encode_to_vec(), internal.encode_to_vec());
        let streamed: gen_v1::GenerateStreamRequest = internal.clone().into();
        assert_eq!(streamed.encode_to_vec(), internal.encode_to_vec());
    }

    #[test]
    fn answers_keep_every_field() {
        let usage = Some(Usage {
            prompt_tokens: 1,
            completion_tokens: 2,
            total_tokens: 3,
            estimated: true,
            cached_prompt_tokens: 4,
            cache_write_tokens: 5,
            reasoning_tokens: 6,
        });
        let internal = gen_v1::GenerateResponse {
            id: "id".into(),
            model: "sim".into(),
            text: "t".into(),
            finish_reason: 5,
            usage,
            cached: true,
            degraded: None,
            provider: "sim".into(),
            tool_calls: vec![ToolCall { id: "c".into(), name: "n".into(), arguments: "{ }".into(), signature: vec![] }],
            reasoning: vec![Reasoning { text: "r".into(), redacted_content: vec![1], signature: vec![2] }],
            extensions: extensions(),
        };
        let public: gw::GenerateResponse = internal.clone().into();
        assert_eq!(public.encode_to_vec(), internal.encode_to_vec());

        let chunk = gen_v1::GenerateStreamResponse {
            id: "id".into(),
            model: "sim".into(),
            delta: "d".into(),
            finish_reason: 5,
            usage,
            cached: false,
            degraded: None,
            provider: "sim".into(),
            tool_calls: vec![ToolCallDelta {
                index: 1,
                id: "c".into(),
                name: "n".into(),
                arguments: "{\"a".into(),
                signature: vec![],
            }],
            reasoning: vec![ReasoningDelta {
                index: 0,
                text: "r".into(),
                redacted_content: vec![],
                signature: vec![9],
            }],
            extensions: extensions(),
        };
        let public: gw::GenerateStreamResponse = chunk.clone().into();
        assert_eq!(public.encode_to_vec(), chunk.encode_to_vec());
    }
}

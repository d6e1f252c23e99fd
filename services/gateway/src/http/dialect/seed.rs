//! The seed's endpoint: `POST /generate` with `{"prompt": ...}` and `X-API-Key`, as the load
//! tests of the monitoring page send it.
//!
//! The body takes the fields of the gRPC `GenerateRequest` under the same names: `prompt` (or
//! `messages`), `model` (default: `gateway.default_model`), `max_tokens`, `temperature`, `top_p`,
//! `stop`, `seed`, `user`, `metadata`, `cache` (`bypass`, `refresh`, `only-if-cached`, or the
//! proto names), `idempotency_key`. The answer is `{"id", "text", "model", "finish_reason",
//! "usage", "cached", "provider"}`, plus `"degraded": {"reason", "source", "detail"}` when a
//! fallback answered (the seed's two messages, by default). Errors are `{"error": {"code",
//! "message"}}`, `code` being the gRPC code name the same call over gRPC would get.

use llmesh_proto::{
    common::v1::{ChatMessage, FinishReason},
    gateway::v1::GenerateStreamResponse,
    generation::v1::{GenerateRequest, GenerateResponse},
};
use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{
    CACHE_POLICIES, Context, Dialect, Parsed, Problem, Unmapped, cache_policy_named,
    fields::{self, Listed, required},
    finish_reason,
    sse::Events,
};

/// The seed's dialect: unary only (its body has no `stream`).
#[derive(Debug, Clone, Copy)]
pub struct Seed;

impl Dialect for Seed {
    const ROUTE: &'static str = "/generate";
    /// The body's `cache` field says it.
    const CACHE_HEADER: bool = false;
    type Options = ();
    type Events = NoEvents;

    fn parse(body: &[u8], context: &Context<'_>) -> Result<Parsed<()>, Problem> {
        let request = parse(fields::parse(body, context.max_objects)?, context.default_model)?;
        Ok(Parsed { request, stream: false, options: (), unmapped: Unmapped::default() })
    }

    type Rendered<'a> = Value;

    fn render(response: &GenerateResponse, _: &(), _: u64) -> Value {
        let usage = response.usage.unwrap_or_default();
        let mut body = json!({
            "id": response.id,
            "text": response.text,
            "model": response.model,
            "finish_reason": finish(response.finish_reason),
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            },
            "cached": response.cached,
            "provider": response.provider,
        });
        if let Some(degraded) = &response.degraded {
            body["degraded"] =
                json!({ "reason": degraded.reason, "source": degraded.source, "detail": degraded.detail });
        }
        body
    }

    fn events(_: &GenerateStreamResponse, _: (), _: u64) -> NoEvents {
        NoEvents
    }

    fn error_body(problem: &Problem) -> Value {
        let code = llmesh_telemetry::code_name(problem.code);
        json!({ "error": { "code": code, "message": problem.message } })
    }
}

/// The seed never streams ([`Seed::parse`] says so): no events.
#[derive(Debug)]
pub struct NoEvents;

impl Events for NoEvents {
    fn open(&mut self, _: &GenerateStreamResponse, _: &mut Vec<u8>) {}
    fn chunk(&mut self, _: &GenerateStreamResponse, _: &mut Vec<u8>) {}
    fn close(&mut self, _: &mut Vec<u8>) {}
    fn fail(&mut self, _: &Problem, _: &mut Vec<u8>) {}
}

/// The seed's body: the gRPC request's fields under their names.
#[derive(Deserialize)]
struct Body {
    #[serde(default, deserialize_with = "fields::opt")]
    model: Option<String>,
    #[serde(default, deserialize_with = "fields::objects")]
    messages: Option<Vec<Message>>,
    #[serde(default, deserialize_with = "fields::opt")]
    cache: Option<Cache>,
    #[serde(default, deserialize_with = "fields::opt")]
    prompt: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "fields::opt")]
    temperature: Option<f32>,
    #[serde(default, deserialize_with = "fields::opt")]
    top_p: Option<f32>,
    #[serde(default, deserialize_with = "fields::opt")]
    stop: Option<Stop>,
    #[serde(default, deserialize_with = "fields::opt")]
    seed: Option<i64>,
    #[serde(default, deserialize_with = "fields::opt")]
    user: Option<String>,
    #[serde(default, deserialize_with = "fields::whole")]
    metadata: Option<HashMap<String, String>>,
    #[serde(default, deserialize_with = "fields::opt")]
    idempotency_key: Option<String>,
    /// Refused: the seed's body has no other field.
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// One of `messages`.
#[derive(Deserialize)]
struct Message {
    #[serde(default, deserialize_with = "fields::opt")]
    role: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    content: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

impl Listed for Message {
    const LIST: &'static str = "messages";
}

/// `stop`: one sequence or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `cache`: a policy's name or its number.
#[derive(Deserialize)]
#[serde(untagged)]
enum Cache {
    Name(String),
    Number(i32),
}

fn parse(body: Body, default_model: Option<&str>) -> Result<GenerateRequest, Problem> {
    let model = match body.model {
        Some(model) => model,
        None => default_model
            .map(str::to_string)
            .ok_or_else(|| Problem::invalid("model", "required (no gateway.default_model is configured)"))?,
    };
    let messages = body
        .messages
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let at = format!("messages[{i}]");
            let role = required(message.role, &at, "role")?;
            let content = required(message.content, &at, "content")?;
            fields::refuse_rest(&at, &message.rest, &[])?;
            Ok(ChatMessage { role, content, ..Default::default() })
        })
        .collect::<Result<_, Problem>>()?;
    let cache = match body.cache {
        None => 0,
        Some(Cache::Number(n)) => n,
        Some(Cache::Name(name)) => cache_policy_named(&name)
            .ok_or_else(|| Problem::invalid("cache", format_args!("{name:?} is not one of {CACHE_POLICIES}")))?,
    };
    fields::refuse_rest("", &body.rest, &[])?;
    Ok(GenerateRequest {
        model,
        prompt: body.prompt.unwrap_or_default(),
        messages,
        max_tokens: body.max_tokens.unwrap_or(0),
        temperature: body.temperature,
        top_p: body.top_p,
        stop: match body.stop {
            None => Vec::new(),
            Some(Stop::One(one)) => vec![one],
            Some(Stop::Many(many)) => many,
        },
        seed: body.seed,
        user: body.user.unwrap_or_default(),
        metadata: body.metadata.unwrap_or_default(),
        cache,
        idempotency_key: body.idempotency_key.unwrap_or_default(),
        ..Default::default()
    })
}

/// The proto's name of a finish reason, short: `stop`, `length`, `content_filter`, `fallback`.
fn finish(value: i32) -> &'static str {
    match finish_reason(value) {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::Fallback => "fallback",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::Unspecified => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    fn parsed(body: Value, default_model: Option<&str>) -> Result<GenerateRequest, Problem> {
        parse(fields::parse(&serde_json::to_vec(&body).unwrap(), usize::MAX)?, default_model)
    }

    #[test]
    fn the_seeds_body_with_the_default_model() {
        let request = parsed(json!({"prompt": "测试提示词"}), Some("sim")).unwrap();
        assert_eq!((request.model.as_str(), request.prompt.as_str()), ("sim", "测试提示词"));
        let error = parsed(json!({"prompt": "x"}), None).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("model"));
    }

    #[test]
    fn the_grpc_fields_under_their_names() {
        let request = parsed(
            json!({"prompt": "p", "model": "m", "max_tokens": 9, "temperature": 0, "top_p": 1, "stop": ["x"],
                   "seed": 3, "user": "u", "metadata": {"k": "v"}, "cache": "bypass", "idempotency_key": "i"}),
            None,
        )
        .unwrap();
        assert_eq!((request.max_tokens, request.temperature, request.seed), (9, Some(0.0), Some(3)));
        assert_eq!(request.cache, i32::from(llmesh_proto::common::v1::CachePolicy::Bypass));
        assert_eq!((request.user.as_str(), request.idempotency_key.as_str()), ("u", "i"));
        for (body, param) in [
            (json!({"prompt": 5}), "prompt"),
            (json!({"prompt": "p", "max_tokens": -1}), "max_tokens"),
            (json!({"prompt": "p", "cache": "sometimes"}), "cache"),
            (json!({"prompt": "p", "stream": true}), "stream"),
            // A map read whole: its mistake names the field, as before the structs.
            (json!({"prompt": "p", "metadata": {"k": 1}}), "metadata"),
        ] {
            let error = parsed(body.clone(), Some("sim")).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(param), "{body}: {}", error.message);
        }
    }

    #[test]
    fn errors_carry_the_grpc_code_name() {
        let response = Seed::error(&Problem::from_status(&tonic::Status::unauthenticated("missing x-api-key")));
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
}

//! OpenAI Chat Completions' tools, content parts, tool calls and formats, to and from the contract
//! (`docs/CONTRACT.md`): the part of the dialect that agents and structured-output clients use.
//!
//! In: `tools` (`{type: "function", function: {name, description, parameters, strict}}`),
//! `tool_choice` (`auto`, `none`, `required`, or a named function), `parallel_tool_calls`,
//! `response_format` (`text`, `json_object`, `json_schema`), `reasoning_effort`; messages with
//! `tool_calls` (assistant), `tool_call_id` (role `tool`), `name`, and content parts `text` and
//! `image_url` (an http(s) URL, or a `data:` URL decoded into inline bytes).
//! Out: `message.tool_calls` with the arguments byte for byte, finish reason `tool_calls`, usage
//! details (cached prompt tokens, reasoning tokens), and streamed `delta.tool_calls` by index.
//!
//! JSON the contract carries as text (parameters, schemas) is the client's own text without its
//! whitespace: its key order is kept, which structured outputs follow (the properties of the
//! answer come in the schema's order).

use base64::Engine as _;
use llmesh_proto::common::v1::{
    ContentPart, Image, ImageDetail, ReasoningOptions, ResponseFormat, ResponseFormatType, Tool, ToolCall,
    ToolCallDelta, ToolChoice, ToolChoiceMode, Usage, content_part, image,
};
use serde_json::{Map, Value, json};

use super::{Fields, Problem};

/// `tools`: function tools only (the other kinds are OpenAI's own hosted tools).
pub fn tools(body: &mut Fields) -> Result<Vec<Tool>, Problem> {
    let Some(listed) = body.objects("tools")? else { return Ok(Vec::new()) };
    listed.into_iter().map(tool).collect()
}

fn tool(mut fields: Fields) -> Result<Tool, Problem> {
    let kind: String = fields.required("type")?;
    if kind != "function" {
        return Err(Problem::invalid(
            fields.path("type"),
            format_args!("{kind:?} tools are not supported (only \"function\")"),
        ));
    }
    let mut function =
        fields.object("function")?.ok_or_else(|| Problem::invalid(fields.path("function"), "required"))?;
    let tool = Tool {
        name: function.required("name")?,
        description: function.take("description")?.unwrap_or_default(),
        parameters: function.json_text("parameters").unwrap_or_default(),
        strict: function.take("strict")?,
        ..Default::default()
    };
    function.finish()?;
    fields.finish()?;
    Ok(tool)
}

/// `tool_choice`: a mode's name, or `{type: "function", function: {name}}`.
pub fn tool_choice(body: &mut Fields) -> Result<Option<ToolChoice>, Problem> {
    let path = body.path("tool_choice");
    let Some(value) = body.take::<Value>("tool_choice")? else { return Ok(None) };
    let mode = |mode: ToolChoiceMode| Ok(Some(ToolChoice { mode: mode.into(), name: String::new() }));
    match value {
        Value::String(name) => match name.as_str() {
            "auto" => mode(ToolChoiceMode::Auto),
            "none" => mode(ToolChoiceMode::None),
            "required" => mode(ToolChoiceMode::Required),
            _ => Err(Problem::invalid(path, "must be \"auto\", \"none\", \"required\" or a named function")),
        },
        Value::Object(map) => {
            let mut choice = Fields::within(map, path.clone());
            let kind: String = choice.required("type")?;
            if kind != "function" {
                return Err(Problem::invalid(choice.path("type"), "only \"function\" is supported"));
            }
            let mut function =
                choice.object("function")?.ok_or_else(|| Problem::invalid(choice.path("function"), "required"))?;
            let name: String = function.required("name")?;
            function.finish()?;
            choice.finish()?;
            Ok(Some(ToolChoice { mode: ToolChoiceMode::Tool.into(), name }))
        }
        _ => Err(Problem::invalid(path, "must be a string or an object")),
    }
}

/// `response_format`.
pub fn response_format(body: &mut Fields) -> Result<Option<ResponseFormat>, Problem> {
    let Some(mut format) = body.object("response_format")? else { return Ok(None) };
    let kind: String = format.required("type")?;
    let parsed = match kind.as_str() {
        "text" => ResponseFormat { r#type: ResponseFormatType::Text.into(), ..Default::default() },
        "json_object" => ResponseFormat { r#type: ResponseFormatType::JsonObject.into(), ..Default::default() },
        "json_schema" => {
            let mut schema = format
                .object("json_schema")?
                .ok_or_else(|| Problem::invalid(format.path("json_schema"), "required"))?;
            let parsed = ResponseFormat {
                r#type: ResponseFormatType::JsonSchema.into(),
                name: schema.required("name")?,
                schema: schema.json_text("schema").unwrap_or_default(),
                strict: schema.take("strict")?,
                description: schema.take("description")?.unwrap_or_default(),
            };
            schema.finish()?;
            parsed
        }
        _ => {
            return Err(Problem::invalid(
                format.path("type"),
                format_args!("{kind:?} is not one of \"text\", \"json_object\", \"json_schema\""),
            ));
        }
    };
    format.finish()?;
    Ok(Some(parsed))
}

/// `reasoning_effort`.
pub fn reasoning(body: &mut Fields) -> Result<Option<ReasoningOptions>, Problem> {
    let effort: Option<String> = body.take("reasoning_effort")?;
    Ok(effort.map(|effort| ReasoningOptions { effort, ..Default::default() }))
}

/// An assistant message's `tool_calls`.
pub fn tool_calls(message: &mut Fields) -> Result<Vec<ToolCall>, Problem> {
    let Some(calls) = message.objects("tool_calls")? else { return Ok(Vec::new()) };
    calls
        .into_iter()
        .map(|mut call| {
            let kind: Option<String> = call.take("type")?;
            if kind.as_deref().is_some_and(|kind| kind != "function") {
                return Err(Problem::invalid(call.path("type"), "only \"function\" is supported"));
            }
            let mut function =
                call.object("function")?.ok_or_else(|| Problem::invalid(call.path("function"), "required"))?;
            let parsed = ToolCall {
                id: call.required("id")?,
                name: function.required("name")?,
                // A string of JSON text, kept byte for byte.
                arguments: function.take("arguments")?.unwrap_or_default(),
                ..Default::default()
            };
            function.finish()?;
            call.finish()?;
            Ok(parsed)
        })
        .collect()
}

/// Content parts: `text` and `image_url`.
pub fn parts(parts: Vec<Value>, path: &str) -> Result<Vec<ContentPart>, Problem> {
    parts
        .into_iter()
        .enumerate()
        .map(|(j, part)| {
            let at = format!("{path}[{j}]");
            let Value::Object(part) = part else { return Err(Problem::invalid(at, "must be an object")) };
            let mut part = Fields::within(part, at);
            let kind: String = part.required("type")?;
            let kind = match kind.as_str() {
                "text" => content_part::Kind::Text(part.required("text")?),
                "image_url" => {
                    let mut image = part
                        .object("image_url")?
                        .ok_or_else(|| Problem::invalid(part.path("image_url"), "required"))?;
                    let url: String = image.required("url")?;
                    let detail = match image.take::<String>("detail")?.as_deref() {
                        None | Some("auto") => ImageDetail::Auto,
                        Some("low") => ImageDetail::Low,
                        Some("high") => ImageDetail::High,
                        Some(other) => {
                            return Err(Problem::invalid(
                                image.path("detail"),
                                format_args!("{other:?} is not one of auto, low, high"),
                            ));
                        }
                    };
                    let parsed = image_of(&url, detail, &image.path("url"))?;
                    image.finish()?;
                    content_part::Kind::Image(parsed)
                }
                other => {
                    return Err(Problem::invalid(
                        part.path("type"),
                        format_args!("{other:?} parts are not supported by llmesh (\"text\", \"image_url\")"),
                    ));
                }
            };
            part.finish()?;
            Ok(ContentPart { kind: Some(kind), ..Default::default() })
        })
        .collect()
}

/// An image by URL, or a `data:` URL's bytes and media type.
fn image_of(url: &str, detail: ImageDetail, path: &str) -> Result<Image, Problem> {
    let Some(data) = url.strip_prefix("data:") else {
        return Ok(Image {
            source: Some(image::Source::Url(url.to_string())),
            detail: detail.into(),
            ..Default::default()
        });
    };
    let (media_type, encoded) = data
        .split_once(";base64,")
        .ok_or_else(|| Problem::invalid(path, "a data: URL must be data:<media type>;base64,<data>"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|error| Problem::invalid(path, format_args!("not valid base64 ({error})")))?;
    Ok(Image { source: Some(image::Source::Data(bytes)), media_type: media_type.to_string(), detail: detail.into() })
}

/// Tool calls as OpenAI writes them in a message.
pub fn render_tool_calls(calls: &[ToolCall]) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|call| json!({ "id": call.id, "type": "function", "function": { "name": call.name, "arguments": call.arguments } }))
            .collect(),
    )
}

/// Streamed tool-call deltas as OpenAI writes them: `id`, `type` and `name` on a call's first.
pub fn render_tool_call_deltas(deltas: &[ToolCallDelta]) -> Value {
    Value::Array(
        deltas
            .iter()
            .map(|delta| {
                let mut function = Map::new();
                if !delta.name.is_empty() {
                    function.insert("name".into(), delta.name.clone().into());
                }
                function.insert("arguments".into(), delta.arguments.clone().into());
                let mut call = json!({ "index": delta.index, "function": function });
                if !delta.id.is_empty() {
                    call["id"] = delta.id.clone().into();
                    call["type"] = "function".into();
                }
                call
            })
            .collect(),
    )
}

/// Usage, with the details OpenAI reports when the provider gave them.
pub fn usage(usage: Option<Usage>) -> Value {
    let usage = usage.unwrap_or_default();
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": { "cached_tokens": usage.cached_prompt_tokens },
        "completion_tokens_details": { "reasoning_tokens": usage.reasoning_tokens },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(value: Value) -> Fields {
        let Value::Object(map) = value else { panic!("an object") };
        Fields::new(map)
    }

    #[test]
    fn function_tools_and_choices_are_read() {
        let mut body = fields(json!({
            "tools": [{"type": "function", "function": {"name": "Bash", "description": "run", "parameters": {"type": "object"}, "strict": true}}],
            "tool_choice": {"type": "function", "function": {"name": "Bash"}},
        }));
        let read = tools(&mut body).unwrap();
        assert_eq!(
            (read[0].name.as_str(), read[0].parameters.as_str(), read[0].strict),
            ("Bash", r#"{"type":"object"}"#, Some(true))
        );
        let choice = tool_choice(&mut body).unwrap().unwrap();
        assert_eq!((choice.mode(), choice.name.as_str()), (ToolChoiceMode::Tool, "Bash"));
        let mut hosted = fields(json!({"tools": [{"type": "web_search"}]}));
        assert_eq!(tools(&mut hosted).unwrap_err().param.as_deref(), Some("tools[0].type"));
    }

    #[test]
    fn a_data_url_is_decoded_and_a_bad_one_names_its_field() {
        let parsed = parts(
            vec![json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}})],
            "messages[0].content",
        )
        .unwrap();
        let Some(content_part::Kind::Image(image)) = &parsed[0].kind else { panic!("an image") };
        assert_eq!(image.media_type, "image/png");
        assert!(matches!(&image.source, Some(image::Source::Data(bytes)) if bytes.starts_with(b"\x89PNG")));
        let bad = parts(
            vec![json!({"type": "image_url", "image_url": {"url": "data:image/png,nope"}})],
            "messages[0].content",
        );
        assert_eq!(bad.unwrap_err().param.as_deref(), Some("messages[0].content[0].image_url.url"));
    }

    #[test]
    fn tool_calls_round_trip_byte_for_byte() {
        let arguments = r#"{"command": "echo hi",  "n":1.0}"#;
        let mut message = fields(
            json!({"tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "Bash", "arguments": arguments}}]}),
        );
        let calls = tool_calls(&mut message).unwrap();
        assert_eq!(calls[0].arguments, arguments);
        assert_eq!(render_tool_calls(&calls)[0]["function"]["arguments"], arguments);
    }
}

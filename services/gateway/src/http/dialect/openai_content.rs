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
use serde::{Deserialize, de::IgnoredAny};
use serde_json::{Map, Value, json};

use super::{
    Problem,
    fields::{self, Listed, Obj, TextOr, path, refuse_rest, required},
};

/// One of `tools`: `{type, function: {name, description, parameters, strict}}`.
#[derive(Deserialize)]
pub struct ToolBody {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::object")]
    function: Option<FunctionBody>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

impl Listed for ToolBody {
    const LIST: &'static str = "tools";
}

#[derive(Deserialize)]
pub struct FunctionBody {
    #[serde(default, deserialize_with = "fields::opt")]
    name: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    description: Option<String>,
    #[serde(default, deserialize_with = "fields::json_text")]
    parameters: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    strict: Option<bool>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// `tool_choice`: a mode's name, or `{type: "function", function: {name}}`.
pub type ToolChoiceBody = TextOr<IgnoredAny, NamedChoice>;

#[derive(Deserialize)]
pub struct NamedChoice {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::object")]
    function: Option<NamedFunction>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
pub struct NamedFunction {
    #[serde(default, deserialize_with = "fields::opt")]
    name: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// `response_format`.
#[derive(Deserialize)]
pub struct FormatBody {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::object")]
    json_schema: Option<SchemaBody>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
pub struct SchemaBody {
    #[serde(default, deserialize_with = "fields::opt")]
    name: Option<String>,
    #[serde(default, deserialize_with = "fields::json_text")]
    schema: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    strict: Option<bool>,
    #[serde(default, deserialize_with = "fields::opt")]
    description: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// One of an assistant message's `tool_calls`.
#[derive(Deserialize)]
pub struct CallBody {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    id: Option<String>,
    #[serde(default, deserialize_with = "fields::object")]
    function: Option<CalledFunction>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

impl Listed for CallBody {
    const LIST: &'static str = "tool_calls";
}

#[derive(Deserialize)]
pub struct CalledFunction {
    #[serde(default, deserialize_with = "fields::opt")]
    name: Option<String>,
    /// A string of JSON text, kept byte for byte.
    #[serde(default, deserialize_with = "fields::opt")]
    arguments: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// A message's `content`: a string, or parts.
pub type ContentBody = TextOr<Obj<PartBody>, IgnoredAny>;

/// One content part: `text` or `image_url`.
#[derive(Deserialize)]
pub struct PartBody {
    #[serde(default, rename = "type", deserialize_with = "fields::opt")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    text: Option<String>,
    #[serde(default, deserialize_with = "fields::object")]
    image_url: Option<ImageUrl>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
pub struct ImageUrl {
    #[serde(default, deserialize_with = "fields::opt")]
    url: Option<String>,
    #[serde(default, deserialize_with = "fields::opt")]
    detail: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// `tools`: function tools only (the other kinds are OpenAI's own hosted tools).
pub fn tools(listed: Option<Vec<ToolBody>>) -> Result<Vec<Tool>, Problem> {
    listed.unwrap_or_default().into_iter().enumerate().map(|(i, body)| tool(body, &format!("tools[{i}]"))).collect()
}

fn tool(body: ToolBody, at: &str) -> Result<Tool, Problem> {
    let kind = required(body.kind, at, "type")?;
    if kind != "function" {
        return Err(Problem::invalid(
            path(at, "type"),
            format_args!("{kind:?} tools are not supported (only \"function\")"),
        ));
    }
    let function = required(body.function, at, "function")?;
    let within = path(at, "function");
    let tool = Tool {
        name: required(function.name, &within, "name")?,
        description: function.description.unwrap_or_default(),
        parameters: function.parameters.unwrap_or_default(),
        strict: function.strict,
        ..Default::default()
    };
    refuse_rest(&within, &function.rest, &[])?;
    refuse_rest(at, &body.rest, &[])?;
    Ok(tool)
}

/// A `tool_choice` given as a mode's name (OpenAI's Chat Completions and Responses both take
/// them).
pub fn tool_mode(name: &str) -> Result<Option<ToolChoice>, Problem> {
    let mode = match name {
        "auto" => ToolChoiceMode::Auto,
        "none" => ToolChoiceMode::None,
        "required" => ToolChoiceMode::Required,
        _ => {
            return Err(Problem::invalid(
                "tool_choice",
                "must be \"auto\", \"none\", \"required\" or a named function",
            ));
        }
    };
    Ok(Some(ToolChoice { mode: mode.into(), name: String::new() }))
}

/// `tool_choice`: a mode's name, or `{type: "function", function: {name}}`.
pub fn tool_choice(body: Option<ToolChoiceBody>) -> Result<Option<ToolChoice>, Problem> {
    let at = "tool_choice";
    match body {
        None => Ok(None),
        Some(TextOr::Text(name)) => tool_mode(&name),
        Some(TextOr::Object(choice)) => {
            let kind = required(choice.kind, at, "type")?;
            if kind != "function" {
                return Err(Problem::invalid(path(at, "type"), "only \"function\" is supported"));
            }
            let function = required(choice.function, at, "function")?;
            let within = path(at, "function");
            let name = required(function.name, &within, "name")?;
            refuse_rest(&within, &function.rest, &[])?;
            refuse_rest(at, &choice.rest, &[])?;
            Ok(Some(ToolChoice { mode: ToolChoiceMode::Tool.into(), name }))
        }
        Some(TextOr::List(_) | TextOr::Other) => Err(Problem::invalid(at, "must be a string or an object")),
    }
}

/// `response_format`.
pub fn response_format(body: Option<FormatBody>) -> Result<Option<ResponseFormat>, Problem> {
    let Some(format) = body else { return Ok(None) };
    let at = "response_format";
    let kind = required(format.kind, at, "type")?;
    // A schema beside another type is a field that type does not take.
    let unread = kind != "json_schema" && format.json_schema.is_some();
    let parsed = match kind.as_str() {
        "text" => ResponseFormat { r#type: ResponseFormatType::Text.into(), ..Default::default() },
        "json_object" => ResponseFormat { r#type: ResponseFormatType::JsonObject.into(), ..Default::default() },
        "json_schema" => {
            let given = required(format.json_schema, at, "json_schema")?;
            let within = path(at, "json_schema");
            let parsed = ResponseFormat {
                r#type: ResponseFormatType::JsonSchema.into(),
                name: required(given.name, &within, "name")?,
                schema: given.schema.unwrap_or_default(),
                strict: given.strict,
                description: given.description.unwrap_or_default(),
            };
            refuse_rest(&within, &given.rest, &[])?;
            parsed
        }
        _ => {
            return Err(Problem::invalid(
                path(at, "type"),
                format_args!("{kind:?} is not one of \"text\", \"json_object\", \"json_schema\""),
            ));
        }
    };
    refuse_rest(at, &format.rest, &[("json_schema", unread)])?;
    Ok(Some(parsed))
}

/// `reasoning_effort`.
pub fn reasoning(effort: Option<String>) -> Option<ReasoningOptions> {
    effort.map(|effort| ReasoningOptions { effort, ..Default::default() })
}

/// An assistant message's `tool_calls`; `at`: the message's path.
pub fn tool_calls(calls: Option<Vec<CallBody>>, at: &str) -> Result<Vec<ToolCall>, Problem> {
    calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, call)| {
            let at = format!("{}[{i}]", path(at, "tool_calls"));
            if call.kind.as_deref().is_some_and(|kind| kind != "function") {
                return Err(Problem::invalid(path(&at, "type"), "only \"function\" is supported"));
            }
            let function = required(call.function, &at, "function")?;
            let id = required(call.id, &at, "id")?;
            let within = path(&at, "function");
            let parsed = ToolCall {
                id,
                name: required(function.name, &within, "name")?,
                arguments: function.arguments.unwrap_or_default(),
                ..Default::default()
            };
            refuse_rest(&within, &function.rest, &[])?;
            refuse_rest(&at, &call.rest, &[])?;
            Ok(parsed)
        })
        .collect()
}

/// Content parts: `text` and `image_url`; `path`: the content's.
pub fn parts(parts: Vec<Obj<PartBody>>, path_of: &str) -> Result<Vec<ContentPart>, Problem> {
    parts
        .into_iter()
        .enumerate()
        .map(|(j, Obj(part))| {
            let at = format!("{path_of}[{j}]");
            let kind = required(part.kind, &at, "type")?;
            let kind = match kind.as_str() {
                "text" => content_part::Kind::Text(required(part.text.clone(), &at, "text")?),
                "image_url" => {
                    let image = required(part.image_url.as_ref(), &at, "image_url")?;
                    let within = path(&at, "image_url");
                    let url = required(image.url.as_deref(), &within, "url")?;
                    let detail = match image.detail.as_deref() {
                        None | Some("auto") => ImageDetail::Auto,
                        Some("low") => ImageDetail::Low,
                        Some("high") => ImageDetail::High,
                        Some(other) => {
                            return Err(Problem::invalid(
                                path(&within, "detail"),
                                format_args!("{other:?} is not one of auto, low, high"),
                            ));
                        }
                    };
                    let parsed = image_of(url, detail, &path(&within, "url"))?;
                    refuse_rest(&within, &image.rest, &[])?;
                    content_part::Kind::Image(parsed)
                }
                other => {
                    return Err(Problem::invalid(
                        path(&at, "type"),
                        format_args!("{other:?} parts are not supported by llmesh (\"text\", \"image_url\")"),
                    ));
                }
            };
            // A field of the other kind of part is one this kind does not take.
            let text = matches!(kind, content_part::Kind::Text(_));
            let unread = [("image_url", text && part.image_url.is_some()), ("text", !text && part.text.is_some())];
            refuse_rest(&at, &part.rest, &unread)?;
            Ok(ContentPart { kind: Some(kind), ..Default::default() })
        })
        .collect()
}

/// An image by URL, or a `data:` URL's bytes and media type.
pub fn image_of(url: &str, detail: ImageDetail, path: &str) -> Result<Image, Problem> {
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

    /// The parts of a body these tests read.
    #[derive(Deserialize)]
    struct Body {
        #[serde(default, deserialize_with = "fields::objects")]
        tools: Option<Vec<ToolBody>>,
        #[serde(default, deserialize_with = "fields::opt")]
        tool_choice: Option<ToolChoiceBody>,
        #[serde(default, deserialize_with = "fields::objects")]
        tool_calls: Option<Vec<CallBody>>,
        #[serde(default, deserialize_with = "fields::opt")]
        content: Option<ContentBody>,
    }

    fn body(value: Value) -> Body {
        fields::parse(&serde_json::to_vec(&value).unwrap(), usize::MAX).unwrap()
    }

    fn content_parts(value: Value) -> Result<Vec<ContentPart>, Problem> {
        let Some(TextOr::List(listed)) = body(json!({ "content": [value] })).content else { panic!("parts") };
        parts(listed, "messages[0].content")
    }

    #[test]
    fn function_tools_and_choices_are_read() {
        let read = body(json!({
            "tools": [{"type": "function", "function": {"name": "Bash", "description": "run", "parameters": {"type": "object"}, "strict": true}}],
            "tool_choice": {"type": "function", "function": {"name": "Bash"}},
        }));
        let listed = tools(read.tools).unwrap();
        assert_eq!(
            (listed[0].name.as_str(), listed[0].parameters.as_str(), listed[0].strict),
            ("Bash", r#"{"type":"object"}"#, Some(true))
        );
        let choice = tool_choice(read.tool_choice).unwrap().unwrap();
        assert_eq!((choice.mode(), choice.name.as_str()), (ToolChoiceMode::Tool, "Bash"));
        let hosted = body(json!({"tools": [{"type": "web_search"}]}));
        assert_eq!(tools(hosted.tools).unwrap_err().param.as_deref(), Some("tools[0].type"));
        let listed = body(json!({"tool_choice": ["auto"]}));
        assert_eq!(tool_choice(listed.tool_choice).unwrap_err().message, "tool_choice: must be a string or an object");
    }

    #[test]
    fn a_data_url_is_decoded_and_a_bad_one_names_its_field() {
        let parsed =
            content_parts(json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}))
                .unwrap();
        let Some(content_part::Kind::Image(image)) = &parsed[0].kind else { panic!("an image") };
        assert_eq!(image.media_type, "image/png");
        assert!(matches!(&image.source, Some(image::Source::Data(bytes)) if bytes.starts_with(b"\x89PNG")));
        let bad = content_parts(json!({"type": "image_url", "image_url": {"url": "data:image/png,nope"}}));
        assert_eq!(bad.unwrap_err().param.as_deref(), Some("messages[0].content[0].image_url.url"));
        let mixed = content_parts(json!({"type": "text", "text": "a", "image_url": {"url": "https://x"}}));
        assert_eq!(mixed.unwrap_err().message, "messages[0].content[0].image_url: not supported by llmesh");
    }

    #[test]
    fn tool_calls_round_trip_byte_for_byte() {
        let arguments = r#"{"command": "echo hi",  "n":1.0}"#;
        let read = body(
            json!({"tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "Bash", "arguments": arguments}}]}),
        );
        let calls = tool_calls(read.tool_calls, "messages[1]").unwrap();
        assert_eq!(calls[0].arguments, arguments);
        assert_eq!(render_tool_calls(&calls)[0]["function"]["arguments"], arguments);
        let unnamed = body(json!({"tool_calls": [{"id": "call_1", "function": {"arguments": "{}"}}]}));
        assert_eq!(
            tool_calls(unnamed.tool_calls, "messages[1]").unwrap_err().param.as_deref(),
            Some("messages[1].tool_calls[0].function.name")
        );
    }
}

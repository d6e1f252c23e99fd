//! Checks of the request-level options: `tools`, `tool_choice`, `response_format`, `reasoning` and
//! `extensions`. Sizes and counts first, then contents; schemas, `cache_control`, `extra` and
//! `extensions.json` must each be one JSON object (checked without building it).

use super::{
    limits::{Limits, MAX_DIALECT_BYTES, MAX_LEVEL_BYTES, MAX_NAME_BYTES},
    rules::{Invalid, at_most, echo, invalid, json_object, tool_name},
};
use crate::common::v1::{ResponseFormatType, Tool, ToolChoiceMode};
use crate::generation::v1::GenerateRequest;

/// Bytes of one tool that count against `max_tools_bytes`.
pub fn tool_bytes(tool: &Tool) -> usize {
    tool.name.len() + tool.description.len() + tool.parameters.len() + tool.cache_control.len() + tool.extra.len()
}

/// `tools`: count, sizes, then names (unique) and schemas.
pub(crate) fn tools(request: &GenerateRequest, limits: &Limits) -> Result<(), Invalid> {
    let tools = &request.tools;
    if tools.len() > limits.max_tools {
        return invalid(format!("tools: {} tools exceed the limit of {}", tools.len(), limits.max_tools));
    }
    for (i, tool) in tools.iter().enumerate() {
        at_most(&|| format!("tools[{i}].description"), tool.description.len(), limits.max_schema_bytes)?;
        at_most(&|| format!("tools[{i}].parameters"), tool.parameters.len(), limits.max_schema_bytes)?;
        at_most(&|| format!("tools[{i}].cache_control"), tool.cache_control.len(), limits.max_extra_bytes)?;
        at_most(&|| format!("tools[{i}].extra"), tool.extra.len(), limits.max_extra_bytes)?;
        tool_name(&|| format!("tools[{i}].name"), &tool.name)?;
    }
    let total = tools.iter().map(tool_bytes).sum::<usize>();
    at_most(&|| "tools".into(), total, limits.max_tools_bytes)?;
    for (i, tool) in tools.iter().enumerate() {
        if tools[..i].iter().any(|t| t.name == tool.name) {
            return invalid(format!("tools[{i}].name: {} is named twice", echo(&tool.name)));
        }
        json_object(&|| format!("tools[{i}].parameters"), &tool.parameters)?;
        json_object(&|| format!("tools[{i}].cache_control"), &tool.cache_control)?;
        json_object(&|| format!("tools[{i}].extra"), &tool.extra)?;
    }
    Ok(())
}

/// `tool_choice`: a known mode; REQUIRED and TOOL need tools, TOOL one of them by name.
pub(crate) fn tool_choice(request: &GenerateRequest) -> Result<(), Invalid> {
    let Some(choice) = &request.tool_choice else { return Ok(()) };
    let Ok(mode) = ToolChoiceMode::try_from(choice.mode) else {
        return invalid(format!("tool_choice.mode: {} is not a known mode", choice.mode));
    };
    at_most(&|| "tool_choice.name".into(), choice.name.len(), MAX_NAME_BYTES)?;
    match mode {
        ToolChoiceMode::Tool if !request.tools.iter().any(|t| t.name == choice.name) => {
            return invalid(format!("tool_choice.name: {} is not one of the request's tools", echo(&choice.name)));
        }
        ToolChoiceMode::Tool => {}
        _ if !choice.name.is_empty() => {
            return invalid("tool_choice.name: only with mode TOOL_CHOICE_MODE_TOOL".into());
        }
        ToolChoiceMode::Required if request.tools.is_empty() => {
            return invalid("tool_choice.mode: REQUIRED needs tools".into());
        }
        _ => {}
    }
    Ok(())
}

/// `response_format`: a known type; JSON_SCHEMA needs a schema, a JSON object.
pub(crate) fn response_format(request: &GenerateRequest, limits: &Limits) -> Result<(), Invalid> {
    let Some(format) = &request.response_format else { return Ok(()) };
    let bytes = format.name.len() + format.schema.len() + format.description.len();
    at_most(&|| "response_format".into(), bytes, limits.max_schema_bytes)?;
    at_most(&|| "response_format.name".into(), format.name.len(), MAX_NAME_BYTES)?;
    let Ok(kind) = ResponseFormatType::try_from(format.r#type) else {
        return invalid(format!("response_format.type: {} is not a known type", format.r#type));
    };
    if kind == ResponseFormatType::JsonSchema && format.schema.is_empty() {
        return invalid("response_format.schema: required with JSON_SCHEMA".into());
    }
    if kind != ResponseFormatType::JsonSchema && !format.schema.is_empty() {
        return invalid("response_format.schema: only with JSON_SCHEMA".into());
    }
    if !format.name.is_empty() {
        tool_name(&|| "response_format.name".into(), &format.name)?;
    }
    json_object(&|| "response_format.schema".into(), &format.schema)
}

/// `reasoning`: levels are short lowercase words; the budget at most `max_tokens`.
pub(crate) fn reasoning(request: &GenerateRequest, limits: &Limits) -> Result<(), Invalid> {
    let Some(reasoning) = &request.reasoning else { return Ok(()) };
    level(&|| "reasoning.effort".into(), &reasoning.effort)?;
    level(&|| "reasoning.summary".into(), &reasoning.summary)?;
    if let Some(budget) = reasoning.budget_tokens
        && budget > limits.max_tokens
    {
        return invalid(format!("reasoning.budget_tokens: {budget} exceeds the limit of {}", limits.max_tokens));
    }
    Ok(())
}

fn level(field: &dyn Fn() -> String, value: &str) -> Result<(), Invalid> {
    at_most(field, value.len(), MAX_LEVEL_BYTES)?;
    if !value.bytes().all(|b| b.is_ascii_lowercase()) {
        return invalid(format!("{}: {} is not a lowercase word", field(), echo(value)));
    }
    Ok(())
}

/// `extensions`: a dialect name when there is JSON, and the JSON one object.
pub(crate) fn extensions(request: &GenerateRequest, limits: &Limits) -> Result<(), Invalid> {
    let Some(extensions) = &request.extensions else { return Ok(()) };
    at_most(&|| "extensions.dialect".into(), extensions.dialect.len(), MAX_DIALECT_BYTES)?;
    at_most(&|| "extensions.json".into(), extensions.json.len(), limits.max_extensions_bytes)?;
    let plain = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-';
    if !extensions.dialect.bytes().all(plain) {
        return invalid(format!("extensions.dialect: {} is not a dialect name", echo(&extensions.dialect)));
    }
    if !extensions.json.is_empty() && extensions.dialect.is_empty() {
        return invalid("extensions.dialect: required with extensions.json".into());
    }
    json_object(&|| "extensions.json".into(), &extensions.json)
}

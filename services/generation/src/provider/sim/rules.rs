//! What the sim answers to tools, tool results and response formats: fixed rules, so that tests
//! and agents run offline and get the same answer every time. The first rule that applies decides:
//!
//! 1. **Tool results.** The last message is a tool result (role `tool`; the results are the run of
//!    tool messages that ends the conversation): a text answer, `Tool results:` and then one line
//!    per result, in order, `- {tool_call_id}: {text}` (`- {tool_call_id} (error): {text}` when
//!    `is_error`), where `{text}` is the result's content, or its text parts joined with `\n`,
//!    verbatim. Finish reason STOP.
//! 2. **A forced call.** `tool_choice` names a tool (TOOL): one call of it. `required`: the calls
//!    of rule 3 when the last user text has any; else one call of the first tool whose name is a
//!    word of the last user text; else of the first tool. A forced call's arguments are the JSON
//!    object that follows its name in the last user text, verbatim, when there is one; else made
//!    up (below).
//! 3. **Named calls.** With tools, and `tool_choice` not `none`: each place in the last user text
//!    where a tool's name (a whole word) is followed by a JSON object (`Bash {"command":"echo hi"}`)
//!    is a call of that tool with that object, byte for byte, as its arguments; several are
//!    parallel calls in the order of the text, or only the first when `parallel_tool_calls` is
//!    false. No such place: the rules below.
//! 4. **Response format.** JSON_SCHEMA: a JSON document valid against the schema, made up as below
//!    but with every property of an object, required or not. JSON_OBJECT: `{"answer": TEXT}` with
//!    the text the sim would have answered.
//! 5. Otherwise the sim's usual text.
//!
//! Calls have ids `call_{16 hex digits of the answer's seed}_{index}` and finish reason TOOL_CALLS.
//!
//! **Made-up arguments** fill every required property of the tool's parameter schema, in the
//! order of its `required` list: a string is the next word of the last user text (cycling; `sim`
//! when it has none; `minLength` met by repeating it, `maxLength` by cutting it; `date-time`,
//! `date`, `email` and `uri` formats get a fixed valid value), a number or integer 1 (or the
//! nearest bound when `minimum`/`maximum` exclude 1), a boolean true, null null, an array
//! `minItems` items (none by default), an object its own required properties; `const` its value,
//! `enum` its first value, `anyOf`/`oneOf`/`allOf` their first schema, a type list its first type
//! but null, `$ref` to `#/$defs/..` or `#/definitions/..` the schema it names. A schema with no
//! type is a string.
//!
//! The "last user text": the `content` of the last `user` message, or its text parts joined with
//! `\n`; the `prompt` when there are no messages.

use llmesh_proto::{
    common::v1::{ChatMessage, ResponseFormatType, ToolCall, ToolChoiceMode, content_part::Kind},
    generation::v1::GenerateRequest,
};
use serde_json::Value;

/// What the sim answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// This text (rules 1 and 4).
    Text(String),
    /// These calls (rules 2 and 3).
    ToolCalls(Vec<ToolCall>),
    /// `{"answer": TEXT}` with the sim's usual text (rule 4, JSON_OBJECT).
    WrapInJson,
    /// The sim's usual text (rule 5).
    Usual,
}

/// Deepest schema nesting followed when making up a value; deeper is `null`.
const MAX_DEPTH: usize = 32;

/// Decides the answer to `request`; `seed` names its calls.
pub fn decide(request: &GenerateRequest, seed: u64) -> Decision {
    if let Some(text) = tool_results(&request.messages) {
        return Decision::Text(text);
    }
    let user = last_user_text(request);
    let mode = request.tool_choice.as_ref().and_then(|c| ToolChoiceMode::try_from(c.mode).ok());
    let calls = match mode {
        _ if request.tools.is_empty() => Vec::new(),
        Some(ToolChoiceMode::None) => Vec::new(),
        Some(ToolChoiceMode::Tool) => {
            let name = request.tool_choice.as_ref().map_or("", |c| c.name.as_str());
            forced(request, name, &user).into_iter().collect()
        }
        Some(ToolChoiceMode::Required) => {
            let named = named_calls(request, &user);
            if named.is_empty() {
                let words: Vec<&str> = user.split(|c: char| !is_name_char(c)).collect();
                let tool = request.tools.iter().find(|t| words.contains(&t.name.as_str())).or(request.tools.first());
                tool.and_then(|t| forced(request, &t.name, &user)).into_iter().collect()
            } else {
                named
            }
        }
        _ => named_calls(request, &user),
    };
    if !calls.is_empty() {
        let calls = calls
            .into_iter()
            .enumerate()
            .map(|(i, (name, arguments))| ToolCall {
                id: format!("call_{seed:016x}_{i}"),
                name,
                arguments,
                signature: Vec::new(),
            })
            .collect();
        return Decision::ToolCalls(calls);
    }
    match request.response_format.as_ref().map(|f| ResponseFormatType::try_from(f.r#type)) {
        Some(Ok(ResponseFormatType::JsonSchema)) => {
            let schema = request.response_format.as_ref().map_or("", |f| f.schema.as_str());
            let schema: Value = serde_json::from_str(schema).unwrap_or(Value::Null);
            let mut words = Words::new(&user);
            Decision::Text(instance(&schema, &schema, &mut words, true, 0))
        }
        Some(Ok(ResponseFormatType::JsonObject)) => Decision::WrapInJson,
        _ => Decision::Usual,
    }
}

/// Rule 1's text, when the conversation ends with tool results.
fn tool_results(messages: &[ChatMessage]) -> Option<String> {
    let start = messages.iter().rposition(|m| m.role != "tool").map_or(0, |i| i + 1);
    let results = &messages[start..];
    if results.is_empty() {
        return None;
    }
    let mut text = String::from("Tool results:");
    for result in results {
        let error = if result.is_error { " (error)" } else { "" };
        text.push_str(&format!("\n- {}{error}: {}", result.tool_call_id, message_text(result)));
    }
    Some(text)
}

/// A message's text: its content, or its text parts joined with `\n`.
fn message_text(message: &ChatMessage) -> String {
    if !message.content.is_empty() {
        return message.content.clone();
    }
    let texts: Vec<&str> = message
        .parts
        .iter()
        .filter_map(|p| match &p.kind {
            Some(Kind::Text(text)) => Some(text.as_str()),
            _ => None,
        })
        .collect();
    texts.join("\n")
}

/// The last user text (see the module docs).
pub fn last_user_text(request: &GenerateRequest) -> String {
    if request.messages.is_empty() {
        return request.prompt.clone();
    }
    request.messages.iter().rev().find(|m| m.role == "user").map(message_text).unwrap_or_default()
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.:-".contains(c)
}

/// Rule 3: every `Name {json}` in `text` naming one of the tools, in order (only the first when
/// parallel calls are off).
fn named_calls(request: &GenerateRequest, text: &str) -> Vec<(String, String)> {
    let mut calls = Vec::new();
    let mut at = 0;
    while at < text.len() {
        let Some((name, arguments, end)) = named_call_at(request, text, at) else {
            at += text[at..].chars().next().map_or(1, char::len_utf8);
            continue;
        };
        calls.push((name.to_string(), arguments.to_string()));
        if request.parallel_tool_calls == Some(false) {
            break;
        }
        at = end;
    }
    calls
}

/// A tool's name starting at `at` (a whole word; the longest name that fits), followed by
/// optional whitespace and a JSON object: the name, the object's text and where it ends.
fn named_call_at<'a>(request: &'a GenerateRequest, text: &'a str, at: usize) -> Option<(&'a str, &'a str, usize)> {
    if text[..at].chars().next_back().is_some_and(is_name_char) {
        return None;
    }
    let rest = &text[at..];
    let tool = request
        .tools
        .iter()
        .filter(|t| rest.starts_with(t.name.as_str()) && !rest[t.name.len()..].chars().next().is_some_and(is_name_char))
        .max_by_key(|t| t.name.len())?;
    let after = &rest[tool.name.len()..];
    let object = after.trim_start();
    let start = at + tool.name.len() + (after.len() - object.len());
    let length = json_object_length(object)?;
    Some((tool.name.as_str(), &text[start..start + length], start + length))
}

/// The length of the JSON object `text` starts with.
fn json_object_length(text: &str) -> Option<usize> {
    if !text.starts_with('{') {
        return None;
    }
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<serde::de::IgnoredAny>();
    values.next()?.ok()?;
    Some(values.byte_offset())
}

/// A forced call of `name`: the JSON after its name in `text`, else made-up arguments.
fn forced(request: &GenerateRequest, name: &str, text: &str) -> Option<(String, String)> {
    let tool = request.tools.iter().find(|t| t.name == name)?;
    let mut at = 0;
    while let Some(found) = text[at..].find(name) {
        if let Some((found_name, arguments, _)) = named_call_at(request, text, at + found)
            && found_name == name
        {
            return Some((name.to_string(), arguments.to_string()));
        }
        at += found + name.len();
    }
    let schema: Value = serde_json::from_str(&tool.parameters).unwrap_or(Value::Null);
    let mut words = Words::new(text);
    let arguments = match schema {
        Value::Null => "{}".to_string(),
        _ => instance(&schema, &schema, &mut words, false, 0),
    };
    Some((name.to_string(), arguments))
}

/// The words strings are made of, in turn.
struct Words<'a> {
    words: Vec<&'a str>,
    next: usize,
}

impl<'a> Words<'a> {
    fn new(text: &'a str) -> Self {
        Self { words: text.split_whitespace().collect(), next: 0 }
    }

    fn next(&mut self) -> &'a str {
        let word = self.words.get(self.next % self.words.len().max(1)).copied().unwrap_or("sim");
        self.next += 1;
        word
    }
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"sim\"".into())
}

/// A value valid against `schema`, as JSON text; `all`: every property of an object, not only the
/// required ones.
fn instance(schema: &Value, root: &Value, words: &mut Words<'_>, all: bool, depth: usize) -> String {
    if depth > MAX_DEPTH {
        return "null".into();
    }
    let Some(object) = schema.as_object() else {
        // `true` or a non-schema: anything is valid.
        return json_string(words.next());
    };
    if let Some(value) = object.get("const") {
        return value.to_string();
    }
    if let Some(first) = object.get("enum").and_then(Value::as_array).and_then(|values| values.first()) {
        return first.to_string();
    }
    if let Some(target) = object.get("$ref").and_then(Value::as_str).and_then(|r| resolve(root, r)) {
        return instance(target, root, words, all, depth + 1);
    }
    for combinator in ["anyOf", "oneOf", "allOf"] {
        if let Some(first) = object.get(combinator).and_then(Value::as_array).and_then(|s| s.first()) {
            // A nullable field's first schema may be `null`: prefer another.
            let schemas = object.get(combinator).and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
            let pick = schemas.iter().find(|s| s.get("type").and_then(Value::as_str) != Some("null")).unwrap_or(first);
            return instance(pick, root, words, all, depth + 1);
        }
    }
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|k| *k != "null")
            .or(kinds.first().and_then(Value::as_str))
            .unwrap_or("string"),
        _ if object.contains_key("properties") => "object",
        _ => "string",
    };
    match kind {
        "object" => {
            let properties = object.get("properties").and_then(Value::as_object);
            let required: Vec<&str> = object
                .get("required")
                .and_then(Value::as_array)
                .map_or_else(Vec::new, |r| r.iter().filter_map(Value::as_str).collect());
            let mut keys: Vec<&str> = required.clone();
            if all && let Some(properties) = properties {
                keys.extend(properties.keys().map(String::as_str).filter(|k| !required.contains(k)));
            }
            let fields: Vec<String> = keys
                .into_iter()
                .map(|key| {
                    let value = match properties.and_then(|p| p.get(key)) {
                        Some(property) => instance(property, root, words, all, depth + 1),
                        None => json_string(words.next()),
                    };
                    format!("{}:{value}", json_string(key))
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        "array" => {
            let count = object.get("minItems").and_then(Value::as_u64).unwrap_or(0).min(16);
            let items = object.get("items").unwrap_or(&Value::Bool(true));
            let values: Vec<String> = (0..count).map(|_| instance(items, root, words, all, depth + 1)).collect();
            format!("[{}]", values.join(","))
        }
        "integer" | "number" => {
            let bound = |name: &str| object.get(name).and_then(Value::as_f64);
            let mut value = 1.0_f64;
            if let Some(minimum) = bound("minimum").or(bound("exclusiveMinimum")).filter(|m| *m > value) {
                value = minimum.ceil() + if bound("exclusiveMinimum").is_some() { 1.0 } else { 0.0 };
            }
            if let Some(maximum) = bound("maximum").filter(|m| *m < value) {
                value = maximum.floor();
            }
            format!("{value}")
        }
        "boolean" => "true".into(),
        "null" => "null".into(),
        _ => json_string(&string_value(object, words)),
    }
}

fn string_value(object: &serde_json::Map<String, Value>, words: &mut Words<'_>) -> String {
    match object.get("format").and_then(Value::as_str) {
        Some("date-time") => return "1970-01-01T00:00:00Z".into(),
        Some("date") => return "1970-01-01".into(),
        Some("email") => return "sim@example.com".into(),
        Some("uri" | "url") => return "https://example.com/".into(),
        _ => {}
    }
    let word = words.next();
    let min = object.get("minLength").and_then(Value::as_u64).unwrap_or(0).min(4096) as usize;
    let max = object.get("maxLength").and_then(Value::as_u64).map_or(usize::MAX, |m| m as usize);
    let mut text = word.to_string();
    while text.chars().count() < min {
        text.push_str(word.chars().next().map_or("s", |_| word));
    }
    text.chars().take(max).collect()
}

/// `#/$defs/Name` or `#/definitions/Name` (any local JSON pointer) in `root`.
fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    root.pointer(reference.strip_prefix('#')?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmesh_proto::common::v1::{ContentPart, ResponseFormat, Tool, ToolChoice};

    fn tool(name: &str, parameters: &str) -> Tool {
        Tool { name: name.into(), parameters: parameters.into(), ..Default::default() }
    }

    fn user(text: &str) -> ChatMessage {
        ChatMessage { role: "user".into(), content: text.into(), ..Default::default() }
    }

    fn request(text: &str, tools: Vec<Tool>) -> GenerateRequest {
        GenerateRequest { model: "sim".into(), messages: vec![user(text)], tools, ..Default::default() }
    }

    fn calls(decision: Decision) -> Vec<(String, String)> {
        match decision {
            Decision::ToolCalls(calls) => calls.into_iter().map(|c| (c.name, c.arguments)).collect(),
            other => panic!("no calls: {other:?}"),
        }
    }

    const BASH: &str = r#"{"type":"object","properties":{"command":{"type":"string"}},"required":["command"]}"#;

    #[test]
    fn a_named_tool_with_json_is_called_verbatim() {
        let r = request(r#"please run Bash {"command": "echo hi",  "n":1.0} now"#, vec![tool("Bash", BASH)]);
        assert_eq!(calls(decide(&r, 1)), [("Bash".into(), r#"{"command": "echo hi",  "n":1.0}"#.into())]);
        let Decision::ToolCalls(made) = decide(&r, 0xab) else { panic!() };
        assert_eq!(made[0].id, "call_00000000000000ab_0");
    }

    #[test]
    fn several_names_are_parallel_calls_in_order_unless_parallel_is_off() {
        let tools = vec![tool("Bash", BASH), tool("Read", "{}"), tool("BashOutput", "{}")];
        let text = r#"Read {"path":"a"} then BashOutput {} and Bash {"command":"ls"} but not xBash {}"#;
        let mut r = request(text, tools);
        assert_eq!(
            calls(decide(&r, 1)),
            [
                ("Read".into(), r#"{"path":"a"}"#.into()),
                ("BashOutput".into(), "{}".into()),
                ("Bash".into(), r#"{"command":"ls"}"#.into())
            ]
        );
        r.parallel_tool_calls = Some(false);
        assert_eq!(calls(decide(&r, 1)), [("Read".into(), r#"{"path":"a"}"#.into())]);
    }

    #[test]
    fn no_call_without_json_or_with_choice_none() {
        let r = request("run Bash please", vec![tool("Bash", BASH)]);
        assert_eq!(decide(&r, 1), Decision::Usual);
        let mut r = request(r#"Bash {"command":"x"}"#, vec![tool("Bash", BASH)]);
        r.tool_choice = Some(ToolChoice { mode: ToolChoiceMode::None.into(), name: String::new() });
        assert_eq!(decide(&r, 1), Decision::Usual);
        // Without tools, a name and JSON are just text.
        assert_eq!(decide(&request(r#"Bash {"command":"x"}"#, vec![]), 1), Decision::Usual);
    }

    #[test]
    fn a_forced_call_makes_up_required_arguments() {
        let schema = r##"{"type":"object","required":["city","days","metric","unit","tags","where"],
            "properties":{"city":{"type":"string"},"days":{"type":"integer","minimum":3},"metric":{"type":"boolean"},
            "unit":{"enum":["c","f"]},"tags":{"type":"array","items":{"type":"string"}},"where":{"$ref":"#/$defs/P"},
            "optional":{"type":"string"}},"$defs":{"P":{"type":"object","required":["lat"],"properties":{"lat":{"type":"number"}}}}}"##;
        let mut r = request("weather in Paris", vec![tool("Bash", BASH), tool("weather", schema)]);
        r.tool_choice = Some(ToolChoice { mode: ToolChoiceMode::Tool.into(), name: "weather".into() });
        let made = calls(decide(&r, 1));
        assert_eq!(
            made,
            [(
                "weather".into(),
                r#"{"city":"weather","days":3,"metric":true,"unit":"c","tags":[],"where":{"lat":1}}"#.into()
            )]
        );
        // `required`: the tool the user text names, else the first.
        r.tool_choice = Some(ToolChoice { mode: ToolChoiceMode::Required.into(), name: String::new() });
        assert_eq!(calls(decide(&r, 1))[0].0, "weather");
        let mut r = request("hello there", vec![tool("Bash", BASH), tool("weather", schema)]);
        r.tool_choice = Some(ToolChoice { mode: ToolChoiceMode::Required.into(), name: String::new() });
        assert_eq!(calls(decide(&r, 1)), [("Bash".into(), r#"{"command":"hello"}"#.into())]);
        // A forced tool with its JSON in the text takes that JSON.
        let mut r = request(r#"weather {"city":"Oslo"}"#, vec![tool("weather", schema)]);
        r.tool_choice = Some(ToolChoice { mode: ToolChoiceMode::Tool.into(), name: "weather".into() });
        assert_eq!(calls(decide(&r, 1)), [("weather".into(), r#"{"city":"Oslo"}"#.into())]);
    }

    #[test]
    fn tool_results_are_quoted_verbatim() {
        let result = |id: &str, text: &str, is_error| ChatMessage {
            role: "tool".into(),
            tool_call_id: id.into(),
            is_error,
            parts: vec![ContentPart { kind: Some(Kind::Text(text.into())), ..Default::default() }],
            ..Default::default()
        };
        let mut r = request(r#"Bash {"command":"ls"}"#, vec![tool("Bash", BASH)]);
        r.messages.push(ChatMessage { role: "assistant".into(), ..Default::default() });
        r.messages.push(result("call_1", "a.txt  b.txt\n", false));
        r.messages.push(result("call_2", "{\"exit\": 1}", true));
        assert_eq!(
            decide(&r, 1),
            Decision::Text("Tool results:\n- call_1: a.txt  b.txt\n\n- call_2 (error): {\"exit\": 1}".into())
        );
    }

    #[test]
    fn a_json_schema_answer_is_valid_against_it() {
        let schema = r#"{"type":"object","properties":{"name":{"type":"string","minLength":5},"age":{"type":"integer","maximum":0},
            "email":{"type":"string","format":"email"},"nick":{"anyOf":[{"type":"null"},{"type":"string"}]},
            "kind":{"const":"person"}},"required":["name"],"additionalProperties":false}"#;
        let mut r = request("Ada", vec![]);
        r.response_format = Some(ResponseFormat {
            r#type: ResponseFormatType::JsonSchema.into(),
            name: "p".into(),
            schema: schema.into(),
            ..Default::default()
        });
        let Decision::Text(text) = decide(&r, 1) else { panic!() };
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["name"], "AdaAda", "minLength 5: the word repeated");
        assert_eq!(value["age"], 0.0);
        assert_eq!(value["email"], "sim@example.com");
        assert_eq!(value["kind"], "person");
        assert!(value["nick"].is_string());
    }
}

//! A JSON object read field by field, so that every mistake names its field (`messages[2].role`),
//! and a field nobody read — one the mesh does not support — is an error naming it rather than
//! silently ignored. `null` (and an empty array or object) counts as absent: clients that echo a
//! previous answer back (`"tool_calls": null`, `"annotations": []`) ask for nothing with it.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value, value::RawValue};

use super::Problem;

/// An object's fields as the client wrote them: each value's JSON text, read only when asked for,
/// so that JSON llmesh carries as text (a schema) keeps the client's key order.
type RawMap = BTreeMap<String, Box<RawValue>>;

#[derive(Debug)]
pub struct Fields {
    map: RawMap,
    /// Where this object is in the body (`messages[2]`), empty at the top.
    at: String,
    /// Most objects a list of them ([`Fields::objects`]) may hold.
    max_objects: usize,
}

impl Fields {
    /// The fields of an object already read as a value (its key order is the value's, sorted).
    #[cfg(test)]
    pub fn new(map: Map<String, Value>) -> Self {
        Self::within(map, String::new())
    }

    /// A body's text: `Ok(None)` when it is valid JSON but not an object.
    pub fn parse(body: &[u8]) -> Result<Option<Self>, serde_json::Error> {
        match serde_json::from_slice::<RawMap>(body) {
            Ok(map) => Ok(Some(Self { map, at: String::new(), max_objects: usize::MAX })),
            // Only on the way out: is it not JSON at all, or JSON but not an object?
            Err(_) => serde_json::from_slice::<Box<RawValue>>(body).map(|_| None),
        }
    }

    /// At most `max` objects in any list of them: a longer list is refused before any is read
    /// (the request limits refuse it anyway; this spares reading it).
    pub fn with_max_objects(self, max: usize) -> Self {
        Self { max_objects: max, ..self }
    }

    /// An object found at `at` in the body.
    pub fn within(map: Map<String, Value>, at: String) -> Self {
        let map = map
            .into_iter()
            .filter_map(|(name, value)| Some((name, serde_json::value::to_raw_value(&value).ok()?)))
            .collect();
        Self { map, at, max_objects: usize::MAX }
    }

    /// The path of `name` in the body.
    pub fn path(&self, name: &str) -> String {
        if self.at.is_empty() { name.to_string() } else { format!("{}.{name}", self.at) }
    }

    /// `name`'s JSON text, if present (and not empty).
    fn take_raw(&mut self, name: &str) -> Option<Box<RawValue>> {
        self.map.remove(name).filter(|raw| !is_empty(raw))
    }

    /// `name`, if present.
    pub fn take<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, Problem> {
        match self.take_raw(name) {
            None => Ok(None),
            // Through a value, so that a mistake reads as it always has (no line and column).
            Some(raw) => serde_json::from_str::<Value>(raw.get())
                .and_then(serde_json::from_value)
                .map(Some)
                .map_err(|error| Problem::invalid(self.path(name), error)),
        }
    }

    /// `name` as compact JSON text, if present: its keys in the order the client wrote them
    /// (structured outputs follow a schema's order), its whitespace dropped.
    pub fn json_text(&mut self, name: &str) -> Option<String> {
        self.take_raw(name).map(|raw| compact(raw.get()))
    }

    /// `name`, which must be present.
    pub fn required<T: DeserializeOwned>(&mut self, name: &str) -> Result<T, Problem> {
        self.take(name)?.ok_or_else(|| Problem::invalid(self.path(name), "required"))
    }

    /// `name`, which must be absent or `value` (a parameter the mesh takes only at its default).
    pub fn only<T: DeserializeOwned + PartialEq + std::fmt::Debug>(
        &mut self,
        name: &str,
        value: T,
    ) -> Result<(), Problem> {
        match self.take::<T>(name)? {
            Some(given) if given != value => {
                Err(Problem::invalid(self.path(name), format_args!("only {value:?} is supported by llmesh")))
            }
            _ => Ok(()),
        }
    }

    /// `raw` read as an object found at `path`.
    fn object_at(&self, raw: &RawValue, path: String) -> Result<Fields, Problem> {
        if !raw.get().starts_with('{') {
            return Err(Problem::invalid(path, "must be an object"));
        }
        let map = serde_json::from_str(raw.get()).map_err(|error| Problem::invalid(path.clone(), error))?;
        Ok(Fields { map, at: path, max_objects: self.max_objects })
    }

    /// `name` as an object of its own, if present.
    pub fn object(&mut self, name: &str) -> Result<Option<Fields>, Problem> {
        let path = self.path(name);
        match self.take_raw(name) {
            None => Ok(None),
            Some(raw) => self.object_at(&raw, path).map(Some),
        }
    }

    /// `name` as a list of objects, if present.
    pub fn objects(&mut self, name: &str) -> Result<Option<Vec<Fields>>, Problem> {
        let path = self.path(name);
        let Some(raw) = self.take_raw(name) else { return Ok(None) };
        if !raw.get().starts_with('[') {
            // Not a list: the mistake in the words `take` uses.
            self.map.insert(name.to_string(), raw);
            return self.take::<Vec<Value>>(name).map(|_| None);
        }
        let items: Vec<Box<RawValue>> =
            serde_json::from_str(raw.get()).map_err(|error| Problem::invalid(path.clone(), error))?;
        if items.len() > self.max_objects {
            let message = format_args!("{} {name} exceed the limit of {}", items.len(), self.max_objects);
            return Err(Problem::invalid(path, message));
        }
        let objects = items
            .iter()
            .enumerate()
            .map(|(i, item)| self.object_at(item, format!("{path}[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(Some(objects))
    }

    /// Ignores `name` (a hint the mesh has no use for, such as a cache-control mark).
    pub fn ignore(&mut self, name: &str) {
        self.map.remove(name);
    }

    /// What is left unread (but empty values), as a JSON object's text; empty when nothing is: the
    /// fields of a part the mesh carries without acting on them (`extra` in the contract).
    pub fn rest(self) -> String {
        let rest = self.rest_map();
        if rest.is_empty() { String::new() } else { Value::Object(rest).to_string() }
    }

    /// What is left unread (but empty values).
    pub fn rest_map(self) -> Map<String, Value> {
        self.map
            .into_iter()
            .filter(|(_, raw)| !is_empty(raw))
            .filter_map(|(name, raw)| Some((name, serde_json::from_str(raw.get()).ok()?)))
            .collect()
    }

    /// Done reading: a field left over is one the mesh does not support.
    pub fn finish(self) -> Result<(), Problem> {
        match self.map.iter().find(|(_, raw)| !is_empty(raw)) {
            Some((name, _)) => Err(Problem::invalid(self.path(name), "not supported by llmesh")),
            None => Ok(()),
        }
    }
}

/// `null`, `[]` or `{}` (whitespace inside allowed).
fn is_empty(raw: &RawValue) -> bool {
    let text = raw.get();
    let inner = |open: char, close: char| {
        text.strip_prefix(open).and_then(|rest| rest.strip_suffix(close)).is_some_and(|inner| inner.trim().is_empty())
    };
    text == "null" || inner('[', ']') || inner('{', '}')
}

/// Valid JSON text without its insignificant whitespace (strings untouched).
fn compact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if !c.is_ascii_whitespace() {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(value: Value) -> Fields {
        match value {
            Value::Object(map) => Fields::new(map),
            _ => unreachable!(),
        }
    }

    #[test]
    fn mistakes_name_their_field() {
        let mut body = fields(json!({"max_tokens": "many", "messages": [{"role": 5}]}));
        let error = body.take::<u32>("max_tokens").unwrap_err();
        assert_eq!(error.param.as_deref(), Some("max_tokens"));
        assert!(error.message.starts_with("max_tokens: invalid type"), "{}", error.message);
        let mut messages = body.objects("messages").unwrap().unwrap();
        let error = messages[0].required::<String>("role").unwrap_err();
        assert_eq!(error.param.as_deref(), Some("messages[0].role"));
        let error = fields(json!({})).required::<String>("model").unwrap_err();
        assert_eq!(error.message, "model: required");
    }

    #[test]
    fn a_list_longer_than_its_limit_is_refused_before_it_is_read() {
        let mut body = fields(json!({"messages": [{}, {}, {}]})).with_max_objects(2);
        let error = body.objects("messages").unwrap_err();
        assert_eq!(error.param.as_deref(), Some("messages"));
        assert_eq!(error.message, "messages: 3 messages exceed the limit of 2", "as the request limits say it");
        let mut body = fields(json!({"messages": [{}, {}]})).with_max_objects(2);
        assert_eq!(body.objects("messages").unwrap().unwrap().len(), 2);
    }

    #[test]
    fn fields_left_over_are_unsupported_unless_empty() {
        let mut body = fields(json!({"model": "sim", "tools": [{"type": "function"}], "tool_choice": null}));
        let _: String = body.required("model").unwrap();
        let error = body.finish().unwrap_err();
        assert_eq!(error.param.as_deref(), Some("tools"));
        assert_eq!(error.message, "tools: not supported by llmesh");
        let body = fields(json!({"tool_calls": null, "annotations": [], "audio": {}}));
        assert!(body.finish().is_ok());
    }

    #[test]
    fn json_text_keeps_the_clients_key_order_without_whitespace() {
        let body = br#"{"schema": {"type": "object", "properties": {"z": {"type": "string"}, "a": {"description": "a \"quoted\" value, with  spaces"}}}}"#;
        let mut fields = Fields::parse(body).unwrap().unwrap();
        assert_eq!(
            fields.json_text("schema").unwrap(),
            r#"{"type":"object","properties":{"z":{"type":"string"},"a":{"description":"a \"quoted\" value, with  spaces"}}}"#
        );
        assert!(Fields::parse(b"[1]").unwrap().is_none(), "not an object");
        assert!(Fields::parse(b"{").is_err());
        let error = Fields::parse(b"[1").err().unwrap().to_string();
        assert!(error.starts_with("EOF while parsing a list"), "the syntax error, as a value's parse says it: {error}");
        let mut empty = Fields::parse(br#"{"a": [ ], "b": { }, "c": null}"#).unwrap().unwrap();
        assert!(empty.json_text("a").is_none() && empty.take::<Value>("b").unwrap().is_none());
        assert!(empty.finish().is_ok());
    }

    #[test]
    fn defaults_only() {
        let mut body = fields(json!({"n": 1, "presence_penalty": 0.5}));
        assert!(body.only("n", 1u32).is_ok());
        let error = body.only("presence_penalty", 0.0f32).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("presence_penalty"));
    }
}

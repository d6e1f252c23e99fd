//! A JSON object read field by field, so that every mistake names its field (`messages[2].role`),
//! and a field nobody read — one the mesh does not support — is an error naming it rather than
//! silently ignored. `null` (and an empty array or object) counts as absent: clients that echo a
//! previous answer back (`"tool_calls": null`, `"annotations": []`) ask for nothing with it.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::Problem;

#[derive(Debug)]
pub struct Fields {
    map: Map<String, Value>,
    /// Where this object is in the body (`messages[2]`), empty at the top.
    at: String,
    /// Most objects a list of them ([`Fields::objects`]) may hold.
    max_objects: usize,
}

impl Fields {
    pub fn new(map: Map<String, Value>) -> Self {
        Self { map, at: String::new(), max_objects: usize::MAX }
    }

    /// At most `max` objects in any list of them: a longer list is refused before any is read
    /// (the request limits refuse it anyway; this spares reading it).
    pub fn with_max_objects(self, max: usize) -> Self {
        Self { max_objects: max, ..self }
    }

    /// An object found at `at` in the body.
    pub fn within(map: Map<String, Value>, at: String) -> Self {
        Self { map, at, max_objects: usize::MAX }
    }

    /// The path of `name` in the body.
    pub fn path(&self, name: &str) -> String {
        if self.at.is_empty() { name.to_string() } else { format!("{}.{name}", self.at) }
    }

    /// `name`, if present.
    pub fn take<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, Problem> {
        match self.map.remove(name) {
            None => Ok(None),
            Some(value) if is_empty(&value) => Ok(None),
            Some(value) => {
                serde_json::from_value(value).map(Some).map_err(|error| Problem::invalid(self.path(name), error))
            }
        }
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

    /// `name` as an object of its own, if present.
    pub fn object(&mut self, name: &str) -> Result<Option<Fields>, Problem> {
        let path = self.path(name);
        match self.take::<Value>(name)? {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Fields { map, at: path, max_objects: self.max_objects })),
            Some(_) => Err(Problem::invalid(path, "must be an object")),
        }
    }

    /// `name` as a list of objects, if present.
    pub fn objects(&mut self, name: &str) -> Result<Option<Vec<Fields>>, Problem> {
        let path = self.path(name);
        let Some(items) = self.take::<Vec<Value>>(name)? else { return Ok(None) };
        if items.len() > self.max_objects {
            let message = format_args!("{} {name} exceed the limit of {}", items.len(), self.max_objects);
            return Err(Problem::invalid(path, message));
        }
        let max_objects = self.max_objects;
        let objects = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Object(map) => Ok(Fields { map, at: format!("{path}[{i}]"), max_objects }),
                _ => Err(Problem::invalid(format!("{path}[{i}]"), "must be an object")),
            })
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
        self.map.into_iter().filter(|(_, value)| !is_empty(value)).collect()
    }

    /// Done reading: a field left over is one the mesh does not support.
    pub fn finish(self) -> Result<(), Problem> {
        match self.map.iter().find(|(_, value)| !is_empty(value)) {
            Some((name, _)) => Err(Problem::invalid(self.path(name), "not supported by llmesh")),
            None => Ok(()),
        }
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(map) => map.is_empty(),
        _ => false,
    }
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
    fn defaults_only() {
        let mut body = fields(json!({"n": 1, "presence_penalty": 0.5}));
        assert!(body.only("n", 1u32).is_ok());
        let error = body.only("presence_penalty", 0.0f32).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("presence_penalty"));
    }
}

//! The dialects' request bodies read into typed structs — `#[derive(Deserialize)]`, one per object
//! of each provider's wire format — with the field path of every mistake (`messages[2].role`, by
//! `serde_path_to_error`), and the rules every dialect's structs share, each in one place here:
//! - `null`, `[]` and `{}` count as absent ([`opt`]): clients that echo a previous answer back
//!   (`"tool_calls": null`, `"annotations": []`) ask for nothing with it;
//! - an object is an object ([`object`]: anything else is "must be an object"), and a list of
//!   objects holds at most the request limits' `max_messages` ([`objects`]: a longer one is refused
//!   by its length before more of it is read into structs);
//! - JSON llmesh carries as text (a schema) is the client's own text without its whitespace
//!   ([`json_text`]): its key order is kept, which structured outputs follow;
//! - a map or list of plain values (`metadata`) is read whole ([`whole`]): a mistake in it names
//!   the field;
//! - a field that is a string or blocks is a [`TextOr`], refused in its dialect's words when it is
//!   neither;
//! - a struct keeps the fields it does not name (`#[serde(flatten)] rest: Map<String, Value>`):
//!   the top level carries them ([`present`]), an inner object refuses the first of them by name
//!   ([`refuse_rest`]), as a field the mesh does not support.
//!
//! A mistake reads as serde says it, without a line and column (`max_tokens: invalid type: string
//! "many", expected u32`); a body that is not JSON, or not an object, is said of the whole body.
//! The body is read once, in its order: of several mistakes in one body, a value of the wrong type
//! is found first (before a missing field or an over-long list that a check after reading finds),
//! and a field the struct names, given twice, is refused (`duplicate field`).

use std::{cell::Cell, fmt, marker::PhantomData};

use serde::{
    Deserialize, Deserializer,
    de::{
        self, DeserializeOwned, DeserializeSeed, IgnoredAny, IntoDeserializer as _, MapAccess, SeqAccess, Visitor,
        value::{BorrowedStrDeserializer, MapAccessDeserializer, SeqAccessDeserializer, StrDeserializer},
    },
};
use serde_json::{Map, Value, value::RawValue};

use super::Problem;

thread_local! {
    /// The most objects a list of them may hold in the body [`parse`] reads now on this thread
    /// (serde's derived structs take no arguments; the read is synchronous, and `parse` restores it).
    static MAX_OBJECTS: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// `body` as `T`; any list of objects in it holds at most `max_objects`.
///
/// A body that parses is read once, without tracking where the reader is; only one that does not
/// is read again, with the path, to name the field at fault (parsing is deterministic, so the
/// second read stops at the same mistake).
pub fn parse<T: DeserializeOwned>(body: &[u8], max_objects: usize) -> Result<T, Problem> {
    let before = MAX_OBJECTS.with(|max| max.replace(max_objects));
    let parsed = serde_json::from_slice::<T>(body).or_else(|_| with_path::<T>(body));
    MAX_OBJECTS.with(|max| max.set(before));
    parsed
}

/// `body` as `T`, with the path of the first mistake in the problem.
fn with_path<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    let mut json = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(&mut json) {
        Ok(parsed) => match json.end() {
            Ok(()) => Ok(parsed),
            Err(error) => {
                Err(not_an_object(body).unwrap_or_else(|| Problem::invalid("body", without_position(&error))))
            }
        },
        Err(error) => Err(not_an_object(body).unwrap_or_else(|| {
            let path = error.path().to_string();
            // The path of the whole body reads ".".
            let path = if path == "." { "body".to_string() } else { path };
            Problem::invalid(path, without_position(error.inner()))
        })),
    }
}

/// A body that is not JSON, or JSON but not an object: the mistake it is first, whatever a struct
/// found before it (only on the way out).
fn not_an_object(body: &[u8]) -> Option<Problem> {
    match serde_json::from_slice::<Box<RawValue>>(body) {
        Err(error) => Some(Problem::invalid("body", format_args!("not valid JSON ({error})"))),
        Ok(raw) if !raw.get().trim_start().starts_with('{') => Some(Problem::invalid("body", "must be a JSON object")),
        Ok(_) => None,
    }
}

/// A mistake's words without serde_json's ` at line 1 column 40`.
fn without_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let position = format!(" at line {} column {}", error.line(), error.column());
    text.strip_suffix(&position).map(str::to_string).unwrap_or(text)
}

/// The path of `name` in the object at `at` (empty: the top).
pub fn path(at: &str, name: &str) -> String {
    if at.is_empty() { name.to_string() } else { format!("{at}.{name}") }
}

/// `deserialize_with` for any field: `null`, `[]` and `{}` are `None`.
pub fn opt<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    deserializer.deserialize_any(OrAbsent(PhantomData))
}

/// `deserialize_with` for a map or list of plain values (`metadata`, `stop_sequences`; absent as
/// [`opt`] says): read whole, so that a mistake inside names the field (`metadata`), as the
/// contract's validation does, not a key within it.
pub fn whole<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    match opt::<D, Value>(deserializer)? {
        None => Ok(None),
        Some(value) => T::deserialize(value).map(Some).map_err(de::Error::custom),
    }
}

/// `deserialize_with` for an object's field (absent as [`opt`] says).
pub fn object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(opt::<D, Obj<T>>(deserializer)?.map(|Obj(object)| object))
}

/// `deserialize_with` for a list of objects (absent as [`opt`] says), at most the body's limit.
pub fn objects<'de, D, T>(deserializer: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Listed,
{
    Ok(opt::<D, Bounded<T>>(deserializer)?.map(|Bounded(items)| items))
}

/// `deserialize_with` for JSON carried as text: the client's text without its whitespace.
pub fn json_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let raw = Box::<RawValue>::deserialize(deserializer)?;
    Ok((!is_empty_text(raw.get())).then(|| compact(raw.get())))
}

/// What a list of objects is called in the refusal of a long one (`messages`).
pub trait Listed {
    const LIST: &'static str;
}

/// An object; anything else is "must be an object".
pub struct Obj<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ObjVisitor(PhantomData))
    }
}

struct ObjVisitor<T>(PhantomData<T>);

const NOT_AN_OBJECT: &str = "must be an object";

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjVisitor<T> {
    type Value = Obj<T>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map)).map(Obj)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(NOT_AN_OBJECT))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(E::custom(NOT_AN_OBJECT))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(E::custom(NOT_AN_OBJECT))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(E::custom(NOT_AN_OBJECT))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(E::custom(NOT_AN_OBJECT))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(E::custom(NOT_AN_OBJECT))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(NOT_AN_OBJECT))
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(NOT_AN_OBJECT))
    }
}

/// A list of objects, at most [`MAX_OBJECTS`] of them.
struct Bounded<T>(Vec<T>);

impl<'de, T: Deserialize<'de> + Listed> Deserialize<'de> for Bounded<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(BoundedVisitor(PhantomData))
    }
}

struct BoundedVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de> + Listed> Visitor<'de> for BoundedVisitor<T> {
    type Value = Bounded<T>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let max = MAX_OBJECTS.with(Cell::get);
        let mut items = Vec::new();
        while items.len() < max {
            match seq.next_element::<Obj<T>>()? {
                Some(Obj(item)) => items.push(item),
                None => return Ok(Bounded(items)),
            }
        }
        // At the limit: the rest is only counted, for the refusal's words.
        let mut count = items.len();
        while seq.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
        }
        if count > max {
            return Err(de::Error::custom(format_args!("{count} {} exceed the limit of {max}", T::LIST)));
        }
        Ok(Bounded(items))
    }
}

/// [`opt`]'s visitor: a value given to `T` as it came, but an empty one.
struct OrAbsent<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for OrAbsent<T> {
    type Value = Option<T>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        opt(deserializer)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        T::deserialize(v.into_deserializer()).map(Some)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        T::deserialize(v.into_deserializer()).map(Some)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        T::deserialize(v.into_deserializer()).map(Some)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        T::deserialize(v.into_deserializer()).map(Some)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        T::deserialize(StrDeserializer::new(v)).map(Some)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        T::deserialize(BorrowedStrDeserializer::new(v)).map(Some)
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        T::deserialize(v.into_deserializer()).map(Some)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        let mut seen = Seen { access: seq, touched: false, items: 0, ended: false };
        match T::deserialize(SeqAccessDeserializer::new(&mut seen)) {
            Ok(_) if seen.items == 0 => Ok(None),
            Ok(value) => Ok(Some(value)),
            Err(_) if seen.ended && seen.items == 0 => Ok(None),
            // `T` takes no list (a string): `[]` is absent all the same.
            Err(error) if !seen.touched => match seen.access.next_element::<IgnoredAny>()? {
                None => Ok(None),
                Some(_) => Err(error),
            },
            Err(error) => Err(error),
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let mut seen = Seen { access: map, touched: false, items: 0, ended: false };
        match T::deserialize(MapAccessDeserializer::new(&mut seen)) {
            Ok(_) if seen.items == 0 => Ok(None),
            Ok(value) => Ok(Some(value)),
            Err(_) if seen.ended && seen.items == 0 => Ok(None),
            Err(error) if !seen.touched => match seen.access.next_key::<IgnoredAny>()? {
                None => Ok(None),
                Some(_) => Err(error),
            },
            Err(error) => Err(error),
        }
    }
}

/// A list's or an object's access, telling whether it was read and held anything.
struct Seen<A> {
    access: A,
    touched: bool,
    items: usize,
    ended: bool,
}

impl<A> Seen<A> {
    fn saw<T>(&mut self, next: Option<T>) -> Option<T> {
        self.touched = true;
        match next {
            Some(_) => self.items += 1,
            None => self.ended = true,
        }
        next
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Seen<A> {
    type Error = A::Error;

    fn next_element_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, A::Error> {
        self.touched = true;
        let next = self.access.next_element_seed(seed)?;
        Ok(self.saw(next))
    }

    fn size_hint(&self) -> Option<usize> {
        self.access.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Seen<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.touched = true;
        let next = self.access.next_key_seed(seed)?;
        Ok(self.saw(next))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.access.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.access.size_hint()
    }
}

/// A string, a list of `L`, an object as `O`, or something else (`Other`: a number, a boolean),
/// which the caller refuses in its own words (`must be a string or a list of parts`).
pub enum TextOr<L, O> {
    Text(String),
    List(Vec<L>),
    Object(O),
    Other,
}

impl<'de, L: Deserialize<'de>, O: Deserialize<'de>> Deserialize<'de> for TextOr<L, O> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TextOrVisitor(PhantomData))
    }
}

struct TextOrVisitor<L, O>(PhantomData<(L, O)>);

impl<'de, L: Deserialize<'de>, O: Deserialize<'de>> Visitor<'de> for TextOrVisitor<L, O> {
    type Value = TextOr<L, O>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a string, a list or an object")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(TextOr::Text(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(TextOr::Text(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Vec::deserialize(SeqAccessDeserializer::new(seq)).map(TextOr::List)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        O::deserialize(MapAccessDeserializer::new(map)).map(TextOr::Object)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(TextOr::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(TextOr::Other)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(TextOr::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(TextOr::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(TextOr::Other)
    }
}

/// The fields of `rest` that are not empty.
pub fn present(rest: Map<String, Value>) -> Map<String, Value> {
    rest.into_iter().filter(|(_, value)| !is_empty(value)).collect()
}

/// `rest` (an object's fields llmesh carries without acting on them) as a JSON object's text,
/// empty when it has none but empty ones (`extra` in the contract).
pub fn rest_text(rest: Map<String, Value>) -> String {
    let rest = present(rest);
    if rest.is_empty() { String::new() } else { Value::Object(rest).to_string() }
}

/// Refuses the first field by name — of those `rest` holds and those `unread` says are present
/// (a field of another kind of block) — that is not empty: one the mesh does not support here.
pub fn refuse_rest(at: &str, rest: &Map<String, Value>, unread: &[(&str, bool)]) -> Result<(), Problem> {
    let left = rest.iter().filter(|(_, value)| !is_empty(value)).map(|(name, _)| name.as_str());
    let unread = unread.iter().filter(|(_, present)| *present).map(|(name, _)| *name);
    match left.chain(unread).min() {
        Some(name) => Err(Problem::invalid(path(at, name), "not supported by llmesh")),
        None => Ok(()),
    }
}

/// `name`, which must be present.
pub fn required<T>(value: Option<T>, at: &str, name: &str) -> Result<T, Problem> {
    value.ok_or_else(|| Problem::invalid(path(at, name), "required"))
}

/// `value` of `name`, which must be absent or `default` (a parameter the mesh takes only at its
/// default).
pub fn only<T: PartialEq + fmt::Debug>(value: Option<T>, name: &str, default: T) -> Result<(), Problem> {
    match value {
        Some(given) if given != default => {
            Err(Problem::invalid(name, format_args!("only {default:?} is supported by llmesh")))
        }
        _ => Ok(()),
    }
}

/// `null`, `[]` or `{}`.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(fields) => fields.is_empty(),
        _ => false,
    }
}

/// `null`, `[]` or `{}` as text (whitespace inside allowed).
fn is_empty_text(text: &str) -> bool {
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

    #[derive(Debug, Deserialize)]
    struct Body {
        #[serde(default, deserialize_with = "opt")]
        max_tokens: Option<u32>,
        #[serde(default, deserialize_with = "opt")]
        model: Option<String>,
        #[serde(default, deserialize_with = "objects")]
        messages: Option<Vec<Message>>,
        #[serde(default, deserialize_with = "object")]
        options: Option<Message>,
        #[serde(default, deserialize_with = "json_text")]
        schema: Option<String>,
        #[serde(default, deserialize_with = "opt")]
        stop: Option<Vec<String>>,
        #[serde(flatten)]
        rest: Map<String, Value>,
    }

    #[derive(Debug, Deserialize)]
    struct Message {
        #[serde(default, deserialize_with = "opt")]
        role: Option<String>,
        #[serde(flatten)]
        rest: Map<String, Value>,
    }

    impl Listed for Message {
        const LIST: &'static str = "messages";
    }

    fn body(text: &str, max: usize) -> Result<Body, Problem> {
        parse(text.as_bytes(), max)
    }

    #[test]
    fn mistakes_name_their_field_without_a_position() {
        let error = body(r#"{"max_tokens": "many"}"#, 9).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("max_tokens"));
        assert_eq!(error.message, r#"max_tokens: invalid type: string "many", expected u32"#);
        let error = body(r#"{"messages": [{"role": "user"}, {"role": 5}]}"#, 9).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("messages[1].role"));
        let error = body(r#"{"messages": [{"role": "user"}, 5]}"#, 9).unwrap_err();
        assert_eq!(
            (error.param.as_deref(), error.message.as_str()),
            (Some("messages[1]"), "messages[1]: must be an object")
        );
        let error = body(r#"{"options": "x"}"#, 9).unwrap_err();
        assert_eq!(error.message, "options: must be an object");
        let error = body(r#"{"messages": {"role": "user"}}"#, 9).unwrap_err();
        assert_eq!(error.message, "messages: invalid type: map, expected a sequence");
        let message = Message { role: None, rest: Map::new() };
        assert_eq!(required(message.role, "messages[0]", "role").unwrap_err().message, "messages[0].role: required");
    }

    #[test]
    fn a_named_field_given_twice_is_refused() {
        let error = body(r#"{"model": "a", "max_tokens": 1, "model": "b"}"#, 9).unwrap_err();
        assert!(error.message.contains("duplicate field `model`"), "{}", error.message);
        // Inside a list of objects too: the path says where.
        let error = body(r#"{"messages": [{"role": "user", "role": "assistant"}]}"#, 9).unwrap_err();
        assert!(error.message.contains("duplicate field `role`"), "{}", error.message);
        assert!(error.message.starts_with("messages[0]"), "{}", error.message);
    }

    #[test]
    fn a_body_that_is_not_json_or_not_an_object_is_said_of_the_body() {
        let error = body("[1", 9).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("body"));
        assert!(error.message.starts_with("body: not valid JSON (EOF while parsing a list"), "{}", error.message);
        assert_eq!(body("[1]", 9).unwrap_err().message, "body: must be a JSON object");
        // A syntax error after a mistake: the body is not JSON, first.
        let error = body(r#"{"max_tokens": "many", "#, 9).unwrap_err();
        assert!(error.message.starts_with("body: not valid JSON"), "{}", error.message);
        assert!(body(r#"{} x"#, 9).unwrap_err().message.starts_with("body: not valid JSON (trailing characters"));
    }

    #[test]
    fn a_list_longer_than_its_limit_is_refused_by_its_length() {
        let error = body(r#"{"messages": [{}, {}, 5]}"#, 2).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("messages"));
        assert_eq!(error.message, "messages: 3 messages exceed the limit of 2", "as the request limits say it");
        let messages = body(r#"{"messages": [{}, {"role": "user", "name": "a"}]}"#, 2).unwrap().messages.unwrap();
        assert_eq!((messages.len(), messages[1].role.as_deref(), messages[1].rest.len()), (2, Some("user"), 1));
        // The limit is the body's: another parse on the thread is not bound by it.
        assert_eq!(body(r#"{"messages": [{}, {}, {}]}"#, usize::MAX).unwrap().messages.unwrap().len(), 3);
    }

    #[test]
    fn empty_values_are_absent_and_other_fields_are_kept() {
        let read = body(
            r#"{"model": [], "max_tokens": null, "messages": [], "options": {}, "schema": { }, "stop": [],
                "tool_calls": null, "annotations": [], "audio": {}, "top_k": 5}"#,
            9,
        )
        .unwrap();
        assert!(read.model.is_none() && read.max_tokens.is_none() && read.messages.is_none());
        assert!(read.options.is_none() && read.schema.is_none() && read.stop.is_none());
        assert_eq!(present(read.rest.clone()), json!({"top_k": 5}).as_object().unwrap().clone());
        assert_eq!(rest_text(read.rest.clone()), r#"{"top_k":5}"#);
        let error = refuse_rest("messages[0]", &read.rest, &[("id", true)]).unwrap_err();
        assert_eq!(error.message, "messages[0].id: not supported by llmesh", "the first by name");
        assert!(refuse_rest("", &Map::new(), &[("id", false)]).is_ok());
        // A value that is not empty is read as usual.
        let error = body(r#"{"model": ["x"]}"#, 9).unwrap_err();
        assert_eq!(error.message, "model: invalid type: sequence, expected a string");
        assert_eq!(body(r#"{"stop": ["x"]}"#, 9).unwrap().stop.unwrap(), ["x"]);
    }

    #[test]
    fn json_text_keeps_the_clients_key_order_without_whitespace() {
        let text = r#"{"schema": {"type": "object", "properties": {"z": {"type": "string"}, "a": {"description": "a \"quoted\" value, with  spaces"}}}}"#;
        assert_eq!(
            body(text, 9).unwrap().schema.unwrap(),
            r#"{"type":"object","properties":{"z":{"type":"string"},"a":{"description":"a \"quoted\" value, with  spaces"}}}"#
        );
    }

    #[test]
    fn defaults_only() {
        assert!(only(Some(1u32), "n", 1).is_ok() && only(None, "n", 1u32).is_ok());
        let error = only(Some(0.5f32), "presence_penalty", 0.0).unwrap_err();
        assert_eq!(
            (error.param.as_deref(), error.message.as_str()),
            (Some("presence_penalty"), "presence_penalty: only 0.0 is supported by llmesh")
        );
    }
}

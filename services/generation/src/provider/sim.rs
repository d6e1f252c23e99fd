//! The simulated model: deterministic text derived from the request, with configurable time to
//! first token, pace and length. Lets the mesh run, and be load-tested, with no key and no network.
//!
//! Tools, tool results and response formats follow the fixed rules of [`rules`]; text is streamed
//! a word a chunk, and a tool call as a first delta with its id and name and then its arguments in
//! fragments of at most [`ARGUMENT_FRAGMENT_BYTES`] bytes, so that callers' assembly is exercised.
//! Tool calls are never cut by `max_tokens`; text is, with finish reason LENGTH.
//!
//! Usage: the sim's tokenizer is "one word, one token" over every text the request carries
//! (prompt, contents, text parts, document text, tool-call arguments, the tools' names,
//! descriptions and schemas, the response format's schema), plus
//! [`llmesh_proto::validate::IMAGE_TOKENS`] per image (85 with detail LOW): exact for the sim.
//!
//! Its fault-injecting variants (`fail_every`, and the `sim-flaky-N` family) fail as an upstream
//! would: their failures are the model's, not the replica's (see `provider::error`). They exist only
//! where the generation config enables fault models.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

mod rules;

pub use super::failure::Failure;
use super::{
    Event, EventStream,
    error::{Kind, UpstreamError},
};
use futures::StreamExt as _;
use llmesh_proto::{
    common::v1::{FinishReason, ImageDetail, ToolCall, ToolCallDelta, Usage, content_part::Kind as PartKind},
    generation::v1::GenerateRequest,
    validate::{IMAGE_TOKENS, IMAGE_TOKENS_LOW},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Delay before the first token.
    pub time_to_first_token_ms: u64,
    /// Pace after the first token; 0 means as fast as possible.
    pub tokens_per_second: f64,
    /// How many tokens an answer has when max_tokens does not cut it short.
    pub output_tokens: u32,
    /// Fault injection: every Nth call fails (0 never, 1 always).
    pub fail_every: u32,
    /// How injected failures fail.
    pub failure: Failure,
    /// Whether to declare the model deterministic. The sim always is; `false` makes it stand in
    /// for a sampling model, which the gateway does not cache by default.
    pub deterministic: bool,
    /// What ListModels reports; by default the sim takes tools, images, documents and JSON schemas.
    pub catalog: super::Catalog,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            time_to_first_token_ms: 0,
            tokens_per_second: 0.0,
            output_tokens: 24,
            fail_every: 0,
            failure: Failure::Unavailable,
            deterministic: true,
            catalog: super::Catalog {
                context_window: 0,
                max_output_tokens: 0,
                capabilities: ["tools", "images", "documents", "json_schema"].map(String::from).to_vec(),
            },
        }
    }
}

#[derive(Debug)]
pub struct Sim {
    config: SimConfig,
    calls: AtomicU64,
}

/// The `sim-flaky-N` family's prefix, and its name as a metric label.
pub const FLAKY: &str = "sim-flaky";
/// The largest N of `sim-flaky-N`.
pub const FLAKY_MAX: u32 = 1000;

/// The N of `sim-flaky-N` when `model` names one in its canonical form: N written in decimal
/// digits only, without sign or leading zero, from 1 to [`FLAKY_MAX`]. Any other spelling is not a
/// model, so that one N has exactly one name.
pub fn flaky_n(model: &str) -> Option<u32> {
    let digits = model.strip_prefix(FLAKY)?.strip_prefix('-')?;
    // Four digits at most: the check is cheap whatever the length of the name.
    let canonical =
        (1..=4).contains(&digits.len()) && !digits.starts_with('0') && digits.bytes().all(|b| b.is_ascii_digit());
    let n: u32 = if canonical { digits.parse().ok()? } else { return None };
    (1..=FLAKY_MAX).contains(&n).then_some(n)
}

/// Every `sim-flaky-N`: the default sim failing every Nth call to that N. One provider for the
/// whole family, with one call counter per N allocated up front, so that nothing grows with the
/// names clients send.
#[derive(Debug)]
pub struct Flaky {
    config: SimConfig,
    /// `calls[n - 1]` counts the calls to `sim-flaky-n`.
    calls: Box<[AtomicU64]>,
}

impl Default for Flaky {
    fn default() -> Self {
        Self { config: SimConfig::default(), calls: (0..FLAKY_MAX).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl Flaky {
    /// Starts `sim-flaky-n`; `n` comes from [`flaky_n`] (any other value fails every call).
    pub fn stream(&self, n: u32, request: &GenerateRequest, max_tokens: u32) -> EventStream {
        let index = usize::try_from(n).unwrap_or(usize::MAX).wrapping_sub(1);
        let call = self.calls.get(index).map_or(0, |calls| calls.fetch_add(1, Ordering::Relaxed) + 1);
        let config = SimConfig { fail_every: n.max(1), ..self.config.clone() };
        generate(&config, call, request, max_tokens)
    }
}

fn injected(failure: Failure) -> UpstreamError {
    UpstreamError::new(Kind::Injected(failure), "fault-injection model")
}

const WORDS: &[&str] = &[
    "the",
    "mesh",
    "answers",
    "with",
    "a",
    "simulated",
    "reply",
    "about",
    "your",
    "prompt",
    "and",
    "every",
    "token",
    "is",
    "deterministic",
    "so",
    "caches",
    "tests",
    "benchmarks",
    "agree",
    "on",
    "what",
    "came",
    "back",
    "from",
    "model",
    "while",
    "latency",
    "stays",
    "low",
    "under",
    "load",
];

impl Sim {
    pub fn new(config: SimConfig) -> Self {
        Self { config, calls: AtomicU64::new(0) }
    }

    pub fn deterministic(&self) -> bool {
        self.config.deterministic
    }

    pub fn catalog(&self) -> &super::Catalog {
        &self.config.catalog
    }

    pub fn stream(&self, request: &GenerateRequest, max_tokens: u32) -> EventStream {
        let call = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        generate(&self.config, call, request, max_tokens)
    }
}

/// The `call`th answer (counting from 1) of a sim configured as `config`.
fn generate(config: &SimConfig, call: u64, request: &GenerateRequest, max_tokens: u32) -> EventStream {
    if config.fail_every > 0 && call.is_multiple_of(u64::from(config.fail_every)) {
        let error = injected(config.failure);
        return Box::pin(futures::stream::once(async move { Err(error) }));
    }
    let seed = seed_of(request);
    let (events, reason, completion_tokens) = match rules::decide(request, seed) {
        rules::Decision::Usual => {
            let (tokens, reason) = answer(request, config.output_tokens, max_tokens);
            let count = tokens.len();
            (tokens.into_iter().map(Event::Delta).collect(), reason, count)
        }
        rules::Decision::WrapInJson => {
            let (tokens, _) = answer(request, config.output_tokens, max_tokens);
            let text = serde_json::json!({ "answer": tokens.concat() }).to_string();
            words_of(&text, max_tokens)
        }
        rules::Decision::Text(text) => words_of(&text, max_tokens),
        rules::Decision::ToolCalls(calls) => {
            let words = calls.iter().map(|c| c.arguments.split_whitespace().count().max(1)).sum();
            (tool_call_events(calls), FinishReason::ToolCalls, words)
        }
    };
    let usage = usage(request, completion_tokens);
    let first = Duration::from_millis(config.time_to_first_token_ms);
    let gap = if config.tokens_per_second > 0.0 {
        Duration::from_secs_f64(1.0 / config.tokens_per_second)
    } else {
        Duration::ZERO
    };
    let deltas = futures::stream::iter(events.into_iter().enumerate()).then(move |(i, event)| async move {
        let pause = if i == 0 { first } else { gap };
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        Ok(event)
    });
    let finish = futures::stream::once(async move { Ok(Event::Finish { reason, usage }) });
    Box::pin(deltas.chain(finish))
}

/// The longest fragment of a tool call's arguments the sim streams.
pub const ARGUMENT_FRAGMENT_BYTES: usize = 16;

/// `text` a word a chunk (each word with the whitespace after it), cut to `max_tokens` words with
/// LENGTH: the events, the finish reason and the words kept.
fn words_of(text: &str, max_tokens: u32) -> (Vec<Event>, FinishReason, usize) {
    let words: Vec<&str> = text.split_inclusive(char::is_whitespace).collect();
    let limit = max_tokens as usize;
    let reason = if words.len() > limit { FinishReason::Length } else { FinishReason::Stop };
    let kept: Vec<Event> = words.into_iter().take(limit).map(|w| Event::Delta(w.to_string())).collect();
    let count = kept.len();
    (kept, reason, count)
}

/// A call's first delta (index, id, name), then its arguments in fragments.
fn tool_call_events(calls: Vec<ToolCall>) -> Vec<Event> {
    let mut events = Vec::new();
    for (call, index) in calls.into_iter().zip(0u32..) {
        events.push(Event::ToolCall(ToolCallDelta { index, id: call.id, name: call.name, ..Default::default() }));
        let mut rest = call.arguments.as_str();
        while !rest.is_empty() {
            let mut cut = rest.len().min(ARGUMENT_FRAGMENT_BYTES);
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            if cut == 0 {
                cut = rest.chars().next().map_or(rest.len(), char::len_utf8);
            }
            let (fragment, after) = rest.split_at(cut);
            events.push(Event::ToolCall(ToolCallDelta {
                index,
                arguments: fragment.to_string(),
                ..Default::default()
            }));
            rest = after;
        }
    }
    events
}

/// The answer's tokens (each with its leading space) and why it ended.
fn answer(request: &GenerateRequest, output_tokens: u32, max_tokens: u32) -> (Vec<String>, FinishReason) {
    let mut rng = SplitMix64(seed_of(request));
    let natural = output_tokens.max(1) as usize;
    let length = natural.min(max_tokens as usize);
    let tokens: Vec<String> = (0..length)
        .map(|i| {
            let word = WORDS[(rng.next() % WORDS.len() as u64) as usize];
            if i == 0 { capitalise(word) } else { format!(" {word}") }
        })
        .collect();
    let text = tokens.concat();
    let Some(cut) = request.stop.iter().filter_map(|stop| text.find(stop.as_str())).min() else {
        let reason = if length < natural { FinishReason::Length } else { FinishReason::Stop };
        return (tokens, reason);
    };
    // Keep only what precedes the first stop sequence, as OpenAI does.
    let mut kept = Vec::new();
    let mut used = 0;
    for token in tokens {
        if used + token.len() > cut {
            if cut > used {
                kept.push(token[..cut - used].to_string());
            }
            break;
        }
        used += token.len();
        kept.push(token);
    }
    (kept, FinishReason::Stop)
}

fn usage(request: &GenerateRequest, completion_tokens: usize) -> Usage {
    // The sim's tokenizer is "one word, one token", so these counts are exact for it.
    let words = |text: &str| text.split_whitespace().count();
    let mut prompt_tokens = words(&request.prompt);
    for message in &request.messages {
        prompt_tokens += words(&message.content);
        prompt_tokens += message.tool_calls.iter().map(|c| words(&c.arguments)).sum::<usize>();
        for part in &message.parts {
            prompt_tokens += match &part.kind {
                Some(PartKind::Text(text)) => words(text),
                Some(PartKind::Image(image)) if image.detail == ImageDetail::Low as i32 => IMAGE_TOKENS_LOW as usize,
                Some(PartKind::Image(_)) => IMAGE_TOKENS as usize,
                Some(PartKind::Document(document)) => match &document.source {
                    Some(llmesh_proto::common::v1::document::Source::Text(text)) => words(text),
                    _ => 0,
                },
                None => 0,
            };
        }
    }
    for tool in &request.tools {
        prompt_tokens += words(&tool.name) + words(&tool.description) + words(&tool.parameters);
    }
    if let Some(format) = &request.response_format {
        prompt_tokens += words(&format.schema);
    }
    let prompt_tokens = u32::try_from(prompt_tokens).unwrap_or(u32::MAX);
    let completion_tokens = u32::try_from(completion_tokens).unwrap_or(u32::MAX);
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens.saturating_add(completion_tokens),
        estimated: false,
        ..Default::default()
    }
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// FNV-1a over everything that changes the answer.
fn seed_of(request: &GenerateRequest) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    let mut feed = |bytes: &[u8]| {
        for b in bytes.iter().chain(&[0xff]) {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(request.model.as_bytes());
    feed(request.prompt.as_bytes());
    for message in &request.messages {
        feed(message.role.as_bytes());
        feed(message.content.as_bytes());
    }
    feed(&request.seed.unwrap_or_default().to_le_bytes());
    // What came with the second part of the contract changes the answer too; a request without
    // any of it keeps the answer it always had.
    if llmesh_proto::cache_key::uses_the_contracts_second_part(request) {
        feed(llmesh_proto::cache_key::of(request).as_bytes());
    }
    hash
}

struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt as _;

    fn request(prompt: &str) -> GenerateRequest {
        GenerateRequest { model: "sim".into(), prompt: prompt.into(), ..Default::default() }
    }

    async fn collect(sim: &Sim, request: &GenerateRequest, max_tokens: u32) -> (String, FinishReason, Usage) {
        let events: Vec<Event> = sim.stream(request, max_tokens).try_collect().await.unwrap();
        let mut text = String::new();
        for event in &events[..events.len() - 1] {
            let Event::Delta(delta) = event else { panic!("finish before the end: {events:?}") };
            text.push_str(delta);
        }
        let Some(Event::Finish { reason, usage }) = events.last().cloned() else { panic!("no finish: {events:?}") };
        (text, reason, usage)
    }

    #[tokio::test]
    async fn same_request_same_answer_different_prompt_different_answer() {
        let sim = Sim::new(SimConfig::default());
        let (a, _, _) = collect(&sim, &request("hello"), 256).await;
        let (b, _, _) = collect(&sim, &request("hello"), 256).await;
        let (c, _, _) = collect(&sim, &request("goodbye"), 256).await;
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[tokio::test]
    async fn max_tokens_cuts_with_length() {
        let sim = Sim::new(SimConfig::default());
        let (text, reason, usage) = collect(&sim, &request("one two three"), 5).await;
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(usage.completion_tokens, 5);
        assert_eq!(usage.prompt_tokens, 3);
        assert_eq!(usage.total_tokens, 8);
        assert_eq!(text.split_whitespace().count(), 5);
        let (_, reason, usage) = collect(&sim, &request("one two three"), 256).await;
        assert_eq!(reason, FinishReason::Stop);
        assert_eq!(usage.completion_tokens, 24);
    }

    #[tokio::test]
    async fn stop_sequence_ends_the_text_before_it() {
        let sim = Sim::new(SimConfig::default());
        let (full, _, _) = collect(&sim, &request("hello"), 256).await;
        let third_word = full.split(' ').nth(2).unwrap().to_string();
        let stop = format!(" {third_word}");
        let mut req = request("hello");
        req.stop = vec![stop.clone()];
        let (text, reason, _) = collect(&sim, &req, 256).await;
        assert_eq!(reason, FinishReason::Stop);
        assert!(!text.contains(&stop));
        assert!(full.starts_with(&text));
    }

    #[tokio::test]
    async fn tool_calls_stream_as_fragments_that_join_to_the_arguments() {
        use llmesh_proto::common::v1::{ChatMessage, Tool};
        let arguments = r#"{"command": "echo héllo wörld, a long one"}"#;
        let request = GenerateRequest {
            model: "sim".into(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: format!("run Bash {arguments} please"),
                ..Default::default()
            }],
            tools: vec![Tool { name: "Bash".into(), ..Default::default() }],
            ..Default::default()
        };
        let sim = Sim::new(SimConfig::default());
        let events: Vec<Event> = sim.stream(&request, 1).try_collect().await.unwrap();
        let mut joined = String::new();
        let mut fragments = 0;
        for event in &events[..events.len() - 1] {
            let Event::ToolCall(delta) = event else { panic!("not a tool call: {event:?}") };
            assert_eq!(delta.index, 0);
            assert!(delta.arguments.len() <= ARGUMENT_FRAGMENT_BYTES);
            if fragments == 0 && delta.arguments.is_empty() {
                assert_eq!(delta.name, "Bash");
                assert!(delta.id.starts_with("call_"));
            } else {
                fragments += 1;
            }
            joined.push_str(&delta.arguments);
        }
        assert_eq!(joined, arguments);
        assert!(fragments > 1);
        // max_tokens 1 does not cut a tool call.
        let Some(Event::Finish { reason, usage }) = events.last() else { panic!("no finish") };
        assert_eq!(*reason, FinishReason::ToolCalls);
        assert_eq!(usage.completion_tokens, 7, "the arguments' words");
    }

    #[tokio::test]
    async fn a_plain_request_keeps_its_answer() {
        // The rules add nothing to a request without the new fields: the same text as before them.
        let sim = Sim::new(SimConfig::default());
        let (text, _, usage) = collect(&sim, &request("hello"), 256).await;
        assert_eq!(usage.prompt_tokens, 1);
        assert_eq!(text.split_whitespace().count(), 24);
        let mut with_tools = request("hello");
        with_tools.tools = vec![llmesh_proto::common::v1::Tool { name: "f".into(), ..Default::default() }];
        let (other, _, _) = collect(&sim, &with_tools, 256).await;
        assert_ne!(text, other, "tools are part of what the answer depends on");
    }

    #[tokio::test]
    async fn injected_failures() {
        let flaky = Flaky::default();
        let mut failed = Vec::new();
        for _ in 0..9 {
            let first = flaky.stream(3, &request("x"), 256).next().await.unwrap();
            failed.push(first.is_err());
        }
        assert_eq!(failed, [false, false, true, false, false, true, false, false, true]);
        // Each N counts its own calls.
        assert!(flaky.stream(2, &request("x"), 256).next().await.unwrap().is_ok());
        assert!(flaky.stream(2, &request("x"), 256).next().await.unwrap().is_err());
        let error = flaky.stream(1, &request("x"), 256).next().await.unwrap().unwrap_err();
        assert_eq!(error.kind(), Kind::Injected(Failure::Unavailable));

        let limited = Sim::new(SimConfig { fail_every: 1, failure: Failure::RateLimited, ..SimConfig::default() });
        let error = limited.stream(&request("x"), 256).next().await.unwrap().unwrap_err();
        assert_eq!(error.code(), tonic::Code::ResourceExhausted);
        let status = error.into_status("sim-429");
        assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "1000");
    }

    #[test]
    fn only_canonical_flaky_names_exist() {
        assert_eq!(flaky_n("sim-flaky-1"), Some(1));
        assert_eq!(flaky_n("sim-flaky-7"), Some(7));
        assert_eq!(flaky_n("sim-flaky-1000"), Some(1000));
        let long = format!("sim-flaky-{}", "0".repeat(1 << 20));
        for refused in [
            "sim-flaky-0",
            "sim-flaky-007",
            "sim-flaky-+7",
            "sim-flaky--7",
            "sim-flaky- 7",
            "sim-flaky-7 ",
            "sim-flaky-1001",
            "sim-flaky-99999",
            "sim-flaky-",
            "sim-flaky-x",
            "sim-flaky-７",
            "sim-flaky",
            "sim-flaky7",
            "sim",
            &long,
        ] {
            assert_eq!(flaky_n(refused), None, "{refused:.20}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn paces_tokens() {
        let sim = Sim::new(SimConfig {
            time_to_first_token_ms: 100,
            tokens_per_second: 10.0,
            output_tokens: 3,
            ..SimConfig::default()
        });
        let start = tokio::time::Instant::now();
        let mut stream = sim.stream(&request("hi"), 256);
        stream.next().await;
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        stream.next().await;
        stream.next().await;
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }
}

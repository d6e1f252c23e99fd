//! The simulated model: deterministic text derived from the request, with configurable time to
//! first token, pace and length. Lets the mesh run, and be load-tested, with no key and no network.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use futures::StreamExt as _;
use llmesh_proto::{
    common::v1::{FinishReason, Usage},
    generation::v1::GenerateRequest,
};
use serde::{Deserialize, Serialize};
use tonic::{Status, metadata::MetadataValue};

use super::{Event, EventStream};

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
}

/// An injected failure, as a real upstream would fail.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// UNAVAILABLE, like a provider outage.
    #[default]
    Unavailable,
    /// RESOURCE_EXHAUSTED with a one-second retry pushback, like an upstream 429.
    RateLimited,
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
        }
    }
}

/// The retry pushback an injected rate limit asks for.
pub const RATE_LIMIT_PUSHBACK_MS: u64 = 1_000;

#[derive(Debug)]
pub struct Sim {
    config: SimConfig,
    calls: AtomicU64,
}

/// `sim-flaky-N`: the sim failing every Nth call (N from 1 to 1000), for chaos tests without
/// any configuration.
pub fn flaky(model: &str) -> Option<SimConfig> {
    let n: u32 = model.strip_prefix("sim-flaky-")?.parse().ok()?;
    (1..=1000).contains(&n).then(|| SimConfig { fail_every: n, ..SimConfig::default() })
}

fn injected(failure: Failure) -> Status {
    match failure {
        Failure::Unavailable => Status::unavailable("sim: injected failure"),
        Failure::RateLimited => {
            let mut status = Status::resource_exhausted("sim: injected rate limit");
            let pushback = MetadataValue::from(RATE_LIMIT_PUSHBACK_MS);
            status.metadata_mut().insert("grpc-retry-pushback-ms", pushback.clone());
            status.metadata_mut().insert("retry-after-ms", pushback);
            status
        }
    }
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

    pub fn stream(&self, request: &GenerateRequest, max_tokens: u32) -> EventStream {
        let call = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        if self.config.fail_every > 0 && call.is_multiple_of(u64::from(self.config.fail_every)) {
            let status = injected(self.config.failure);
            return Box::pin(futures::stream::once(async move { Err(status) }));
        }
        let (tokens, reason) = answer(request, self.config.output_tokens, max_tokens);
        let usage = usage(request, tokens.len());
        let first = Duration::from_millis(self.config.time_to_first_token_ms);
        let gap = if self.config.tokens_per_second > 0.0 {
            Duration::from_secs_f64(1.0 / self.config.tokens_per_second)
        } else {
            Duration::ZERO
        };
        let deltas = futures::stream::iter(tokens.into_iter().enumerate()).then(move |(i, token)| async move {
            let pause = if i == 0 { first } else { gap };
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            Ok(Event::Delta(token))
        });
        let finish = futures::stream::once(async move { Ok(Event::Finish { reason, usage }) });
        Box::pin(deltas.chain(finish))
    }
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
    let prompt_tokens = request.prompt.split_whitespace().count()
        + request.messages.iter().map(|m| m.content.split_whitespace().count()).sum::<usize>();
    let prompt_tokens = u32::try_from(prompt_tokens).unwrap_or(u32::MAX);
    let completion_tokens = u32::try_from(completion_tokens).unwrap_or(u32::MAX);
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens.saturating_add(completion_tokens),
        estimated: false,
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
    async fn injected_failures() {
        let every_third = Sim::new(flaky("sim-flaky-3").unwrap());
        let mut failed = Vec::new();
        for _ in 0..9 {
            let first = every_third.stream(&request("x"), 256).next().await.unwrap();
            failed.push(first.is_err());
        }
        assert_eq!(failed, [false, false, true, false, false, true, false, false, true]);
        assert!(flaky("sim-flaky-0").is_none() && flaky("sim-flaky-x").is_none() && flaky("sim").is_none());

        let limited = Sim::new(SimConfig { fail_every: 1, failure: Failure::RateLimited, ..SimConfig::default() });
        let status = limited.stream(&request("x"), 256).next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "1000");
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

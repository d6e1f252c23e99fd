//! What each request asks: a prompt drawn from a weighted mix, optionally made unique so that it
//! misses the cache.

use std::{fmt, path::Path};

use anyhow::Context as _;

/// The seed's Locust scenario (section 4 of the monitoring seed): short, medium and long prompts,
/// weighted 3:2:1.
pub const SEED_PROMPTS: [(u32, &str); 3] =
    [(3, "简单提示词"), (2, "中等长度的提示词示例"), (1, "较长的提示词带有上下文信息的示例")];

/// One prompt of the mix and its weight (a share of the total, not a probability).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub weight: u32,
    pub text: String,
}

/// Prompts with weights, drawn in proportion to their weights.
#[derive(Debug, Clone)]
pub struct PromptMix {
    prompts: Vec<Prompt>,
    /// `cumulative[i]` is the sum of the weights of prompts `0..=i`.
    cumulative: Vec<u64>,
}

/// Why a prompts file was refused, with the line it is about (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    ZeroWeight { line: usize },
    FractionalWeight { line: usize },
    EmptyPrompt { line: usize },
    NoPrompts,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroWeight { line } => write!(f, "line {line}: a weight must be at least 1"),
            Self::FractionalWeight { line } => write!(f, "line {line}: a weight must be a whole number"),
            Self::EmptyPrompt { line } => write!(f, "line {line}: the prompt after the weight is empty"),
            Self::NoPrompts => write!(f, "no prompts (every line is blank or a # comment)"),
        }
    }
}

impl std::error::Error for ParseError {}

impl PromptMix {
    /// A mix of `prompts`; `None` when there are none or a weight is 0.
    pub fn new(prompts: Vec<Prompt>) -> Option<Self> {
        if prompts.is_empty() || prompts.iter().any(|p| p.weight == 0) {
            return None;
        }
        Some(Self::weighted(prompts))
    }

    /// The mix of prompts already checked to be non-empty with positive weights.
    fn weighted(prompts: Vec<Prompt>) -> Self {
        let cumulative = prompts
            .iter()
            .scan(0u64, |sum, p| {
                *sum += u64::from(p.weight);
                Some(*sum)
            })
            .collect();
        Self { prompts, cumulative }
    }

    /// The seed's three prompts at 3:2:1.
    pub fn seed() -> Self {
        let prompts = SEED_PROMPTS.iter().map(|&(weight, text)| Prompt { weight, text: text.to_string() }).collect();
        Self::weighted(prompts)
    }

    /// Parses a prompts file: one prompt per line, or `WEIGHT<TAB>PROMPT`. Blank lines and lines
    /// starting with `#` are skipped (write `1<TAB>#...` for a prompt that starts with `#`). A line
    /// whose text before the first tab is not a number is a prompt with a tab in it, weight 1.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut prompts = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            if raw.trim().is_empty() || raw.starts_with('#') {
                continue;
            }
            let (weight, prompt) = match raw.split_once('\t') {
                Some((head, rest)) => match head.trim().parse::<u32>() {
                    Ok(0) => return Err(ParseError::ZeroWeight { line }),
                    Ok(weight) => (weight, rest),
                    Err(_) if head.trim().parse::<f64>().is_ok() => {
                        return Err(ParseError::FractionalWeight { line });
                    }
                    Err(_) => (1, raw),
                },
                None => (1, raw),
            };
            if prompt.trim().is_empty() {
                return Err(ParseError::EmptyPrompt { line });
            }
            prompts.push(Prompt { weight, text: prompt.to_string() });
        }
        Self::new(prompts).ok_or(ParseError::NoPrompts)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("bad prompts file {}", path.display()))
    }

    pub fn prompts(&self) -> &[Prompt] {
        &self.prompts
    }

    /// The sum of the weights.
    pub fn total_weight(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The prompt a draw `r` in `0..total_weight()` lands on: prompt `i` owns `weight[i]`
    /// consecutive values.
    pub fn index_of(&self, r: u64) -> usize {
        self.cumulative.partition_point(|&upto| upto <= r).min(self.prompts.len() - 1)
    }

    pub fn pick(&self, rng: &mut fastrand::Rng) -> &Prompt {
        &self.prompts[self.index_of(rng.u64(0..self.total_weight()))]
    }
}

/// The prompt of each request, a pure function of the seed and the request's sequence number:
/// the same seed sends the same prompts whatever the timing, the mode or the concurrency.
#[derive(Debug, Clone)]
pub struct Workload {
    mix: PromptMix,
    seed: u64,
    /// With `--unique`: a per-run id, so that runs against a long-lived cache miss too.
    nonce_prefix: Option<String>,
}

impl Workload {
    /// `unique_run` is the id appended (with the sequence number) to each prompt, or `None` to send
    /// the prompts as they are.
    pub fn new(mix: PromptMix, seed: u64, unique_run: Option<u64>) -> Self {
        Self { mix, seed, nonce_prefix: unique_run.map(|run| format!("{run:016x}")) }
    }

    pub fn prompt(&self, seq: u64) -> String {
        let mut rng = fastrand::Rng::with_seed(splitmix64(self.seed ^ splitmix64(seq)));
        let prompt = &self.mix.pick(&mut rng).text;
        match &self.nonce_prefix {
            Some(run) => format!("{prompt} [load {run}-{seq}]"),
            None => prompt.clone(),
        }
    }
}

/// A strong 64-bit mix (SplitMix64's finalizer), so that neighbouring sequence numbers draw
/// unrelated values.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn prompt(weight: u32, text: &str) -> Prompt {
        Prompt { weight, text: text.to_string() }
    }

    #[test]
    fn each_prompt_owns_as_many_draws_as_its_weight() {
        let mix = PromptMix::seed();
        assert_eq!(mix.total_weight(), 6);
        let owners: Vec<usize> = (0..6).map(|r| mix.index_of(r)).collect();
        assert_eq!(owners, [0, 0, 0, 1, 1, 2]);
        assert_eq!(mix.prompts()[0].text, "简单提示词");
        assert_eq!(mix.prompts()[2].text, "较长的提示词带有上下文信息的示例");
    }

    #[test]
    fn draws_follow_the_weights() {
        let mix = PromptMix::seed();
        let workload = Workload::new(mix, 42, None);
        let mut counts: HashMap<String, u32> = HashMap::new();
        let n = 60_000;
        for seq in 0..n {
            *counts.entry(workload.prompt(seq)).or_default() += 1;
        }
        let share = |text: &str| f64::from(counts[text]) / n as f64;
        // 3:2:1 is 1/2, 1/3, 1/6; 60 000 draws put each share within about 0.005 of it.
        assert!((share("简单提示词") - 0.5).abs() < 0.01, "{counts:?}");
        assert!((share("中等长度的提示词示例") - 1.0 / 3.0).abs() < 0.01, "{counts:?}");
        assert!((share("较长的提示词带有上下文信息的示例") - 1.0 / 6.0).abs() < 0.01, "{counts:?}");
    }

    #[test]
    fn the_seed_fixes_the_sequence_and_unique_prompts_never_repeat() {
        let a = Workload::new(PromptMix::seed(), 7, None);
        let b = Workload::new(PromptMix::seed(), 7, None);
        assert!((0..100).all(|seq| a.prompt(seq) == b.prompt(seq)));

        let unique = Workload::new(PromptMix::seed(), 7, Some(0xabc));
        let prompts: std::collections::HashSet<String> = (0..1000).map(|seq| unique.prompt(seq)).collect();
        assert_eq!(prompts.len(), 1000);
        assert_eq!(unique.prompt(5), format!("{} [load 0000000000000abc-5]", a.prompt(5)));
    }

    #[test]
    fn parses_weighted_and_plain_lines() {
        let text = "# a comment\n3\tshort\r\nplain prompt\n\n  \n10\tlong one\twith a tab\nnot a weight\there\n";
        let mix = PromptMix::parse(text).unwrap();
        assert_eq!(
            mix.prompts(),
            [
                prompt(3, "short"),
                prompt(1, "plain prompt"),
                prompt(10, "long one\twith a tab"),
                prompt(1, "not a weight\there"),
            ]
        );
        assert_eq!(mix.total_weight(), 15);
        assert_eq!(PromptMix::parse("1\t# not a comment").unwrap().prompts(), [prompt(1, "# not a comment")]);
    }

    #[test]
    fn refuses_bad_files() {
        assert_eq!(PromptMix::parse("ok\n0\tnever").unwrap_err(), ParseError::ZeroWeight { line: 2 });
        assert_eq!(PromptMix::parse("2.5\thalf").unwrap_err(), ParseError::FractionalWeight { line: 1 });
        assert_eq!(PromptMix::parse("a\n\n4\t  ").unwrap_err(), ParseError::EmptyPrompt { line: 3 });
        assert_eq!(PromptMix::parse("\n# only comments\n").unwrap_err(), ParseError::NoPrompts);
        assert_eq!(ParseError::ZeroWeight { line: 2 }.to_string(), "line 2: a weight must be at least 1");
    }

    #[test]
    fn reads_a_file() {
        let path = std::env::temp_dir().join(format!("llmesh-load-prompts-{}.txt", std::process::id()));
        std::fs::write(&path, "2\thello\nworld\n").unwrap();
        let mix = PromptMix::from_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(mix.prompts(), [prompt(2, "hello"), prompt(1, "world")]);
        let missing = PromptMix::from_file(&path).unwrap_err();
        assert!(format!("{missing:#}").contains("cannot read"), "{missing:#}");
    }
}

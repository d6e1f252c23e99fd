//! `llmesh keys`: the lifecycle of the gateway's API keys, on its keys file.
//!
//! - `new` makes a key. The key goes to stdout alone (`KEY=$(llmesh keys new ...)`) and nowhere
//!   else; with `--file` its entry is added to the keys file, without it the entry goes to stderr
//!   with a note saying where it belongs. The key is never written to a file, and cannot be shown
//!   again: the gateway keeps only its SHA-256.
//! - `list` shows each entry on one line (or as JSON): id, prefix, team, models, limits, budget. Never a
//!   digest: the prefix names a key well enough, and a listing gets pasted into tickets.
//! - `revoke` removes one entry; `set` changes one entry's team, models or limits.
//!
//! Every edit is checked against the gateway's own rules and replaces the file atomically (see
//! [`file`]). A running gateway re-reads the file when it changes: a revoked key is refused, a new
//! one accepted, within moments and without a restart.

mod file;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use llmesh_keys::{ApiKey, Budget, check_all, generate_key, parse_keys_file};
use llmesh_ratelimit::budget::Period;
use serde::Serialize;

use self::file::{Changes, Field, KeysFile, Selector};

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Make a new API key: prints the key alone on stdout (it is shown once and stored nowhere)
    /// and adds its entry to the keys file (--file), or prints the entry on stderr.
    New {
        /// The key's public name: the `api_key` label of metrics, what logs show. Unique in the file.
        #[arg(long)]
        id: String,
        /// The keys file to add the entry to (created if missing). Without it the entry is printed
        /// on stderr, to add by hand.
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    },
    /// List the keys of a keys file: id, prefix, team, models, limits and budget (never a digest).
    List {
        #[arg(long)]
        file: PathBuf,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a key from the keys file; the gateway refuses it once it has read the file again.
    Revoke {
        #[command(flatten)]
        key: Which,
        #[arg(long)]
        file: PathBuf,
    },
    /// Change a key's team, models or limits in the keys file.
    Set {
        #[command(flatten)]
        key: Which,
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        settings: Settings,
        /// Remove these settings (back to no team, every model, the `[gateway.rate_limit]` limits).
        #[arg(long, value_enum, value_delimiter = ',')]
        clear: Vec<Field>,
    },
}

/// The entry a command is about.
#[derive(Debug, clap::Args)]
pub struct Which {
    /// The key's id.
    #[arg(long)]
    id: String,
    /// The key's prefix (`lk_` and 8 hex digits), needed only when several keys share the id.
    #[arg(long)]
    prefix: Option<String>,
}

/// What a key may do, beyond the defaults.
#[derive(Debug, clap::Args)]
pub struct Settings {
    /// The team the key belongs to.
    #[arg(long)]
    team: Option<String>,
    /// The only models the key may use, comma-separated (default: every model).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    models: Option<Vec<String>>,
    /// Requests per minute for this key instead of `[gateway.rate_limit]`; 0 is unlimited.
    #[arg(long)]
    requests_per_minute: Option<u32>,
    /// Tokens per minute for this key instead of `[gateway.rate_limit]`; 0 is unlimited.
    #[arg(long)]
    tokens_per_minute: Option<u32>,
    /// A spend budget for this key, in US dollars per `--budget-period` (its team's, in the
    /// file's `[[teams]]`, applies as well).
    #[arg(long)]
    budget_usd: Option<f64>,
    /// The budget's period, a calendar day or month in UTC.
    #[arg(long, value_enum, requires = "budget_usd")]
    budget_period: Option<BudgetPeriod>,
}

/// `--budget-period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BudgetPeriod {
    Day,
    Month,
}

impl Settings {
    fn models(&self) -> Option<Vec<String>> {
        self.models.as_ref().map(|models| {
            models.iter().map(|model| model.trim()).filter(|model| !model.is_empty()).map(str::to_owned).collect()
        })
    }

    fn is_empty(&self) -> bool {
        self.team.is_none()
            && self.models.is_none()
            && self.requests_per_minute.is_none()
            && self.tokens_per_minute.is_none()
            && self.budget_usd.is_none()
    }

    fn budget(&self) -> Option<Budget> {
        let period = match self.budget_period {
            Some(BudgetPeriod::Day) => Period::Day,
            Some(BudgetPeriod::Month) | None => Period::Month,
        };
        self.budget_usd.map(|usd| Budget { usd, period })
    }
}

pub fn run(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::New { id, file: None, settings } => new_key_printed(&id, &settings),
        KeysCommand::New { id, file: Some(path), settings } => new_key_in_file(&id, &path, &settings),
        KeysCommand::List { file, json } => list(&file, &read_entries(&file)?, json),
        KeysCommand::Revoke { key, file } => revoke(&key, &file),
        KeysCommand::Set { key, file, settings, clear } => set(&key, &file, &settings, clear),
    }
}

/// A new key for `id` with `settings`, and its entry.
fn make_key(id: &str, settings: &Settings) -> (String, ApiKey) {
    let (key, mut entry) = generate_key(id);
    entry.team.clone_from(&settings.team);
    entry.models = settings.models().unwrap_or_default();
    entry.requests_per_minute = settings.requests_per_minute;
    entry.tokens_per_minute = settings.tokens_per_minute;
    entry.budget = settings.budget();
    (key, entry)
}

fn new_key_printed(id: &str, settings: &Settings) -> anyhow::Result<()> {
    let (key, entry) = make_key(id, settings);
    check_all(std::slice::from_ref(&entry), &[]).context("the gateway would refuse this key")?;
    let mut err = std::io::stderr().lock();
    writeln!(
        err,
        "# Add this entry to the gateway's keys file (LLMESH_GATEWAY_AUTH__KEYS_FILE), or run again with \
         --file to have it added; the key is on stdout, shown this once."
    )?;
    write!(err, "{}", file::entry_text(&entry))?;
    print_key(&key)
}

fn new_key_in_file(id: &str, path: &Path, settings: &Settings) -> anyhow::Result<()> {
    let mut file = KeysFile::open(path, true)?;
    let (key, entry) = make_key(id, settings);
    let prefix = entry.prefix.clone();
    file.add(entry)?;
    file.save()?;
    writeln!(std::io::stderr(), "added key {id:?} ({prefix}) to {}", file.path().display())?;
    print_key(&key).with_context(|| {
        format!(
            "the entry was added but its key could not be shown: revoke it with \
             `llmesh keys revoke --id {id} --prefix {prefix} --file {}`",
            file.path().display()
        )
    })
}

/// The key alone on stdout, so that `KEY=$(llmesh keys new ...)` holds exactly the key.
fn print_key(key: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{key}")?;
    out.flush()?;
    Ok(())
}

/// The entries of the keys file at `path`, read as the gateway reads them (any layout it accepts,
/// inline arrays included: listing edits nothing).
fn read_entries(path: &Path) -> anyhow::Result<Vec<ApiKey>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read keys file {}", path.display()))?;
    parse_keys_file(&text).with_context(|| format!("invalid keys file {}", path.display()))
}

fn list(path: &Path, entries: &[ApiKey], as_json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if as_json {
        let listed: Vec<Listed<'_>> = entries.iter().map(Listed::from).collect();
        serde_json::to_writer_pretty(&mut out, &listed)?;
        writeln!(out)?;
    } else if entries.is_empty() {
        writeln!(std::io::stderr(), "{} holds no keys (a gateway refuses to start on it)", path.display())?;
    } else {
        let rows: Vec<[String; 7]> = std::iter::once(
            ["ID", "PREFIX", "TEAM", "MODELS", "REQUESTS/MIN", "TOKENS/MIN", "BUDGET"].map(str::to_owned),
        )
        .chain(entries.iter().map(|entry| {
            [
                entry.id.clone(),
                entry.prefix.clone(),
                entry.team.clone().unwrap_or_else(|| "-".to_owned()),
                if entry.models.is_empty() { "all".to_owned() } else { entry.models.join(",") },
                limit(entry.requests_per_minute),
                limit(entry.tokens_per_minute),
                entry.budget.as_ref().map_or_else(|| "-".to_owned(), |b| format!("${}/{}", b.usd, b.period.as_str())),
            ]
        }))
        .collect();
        let mut widths = [0usize; 7];
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for row in &rows {
            let line: Vec<String> = row.iter().zip(widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
            writeln!(out, "{}", line.join("  ").trim_end())?;
        }
    }
    out.flush()?;
    Ok(())
}

/// An entry as `list --json` shows it: everything but the digest. `null` limits are the
/// `[gateway.rate_limit]` defaults, 0 is unlimited; no models is every model.
#[derive(Serialize)]
struct Listed<'a> {
    id: &'a str,
    prefix: &'a str,
    team: Option<&'a str>,
    models: &'a [String],
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    /// `{"usd": 50.0, "period": "month"}`, or null without a budget of its own.
    budget: Option<Budget>,
}

impl<'a> From<&'a ApiKey> for Listed<'a> {
    fn from(entry: &'a ApiKey) -> Self {
        Self {
            id: &entry.id,
            prefix: &entry.prefix,
            team: entry.team.as_deref(),
            models: &entry.models,
            requests_per_minute: entry.requests_per_minute,
            tokens_per_minute: entry.tokens_per_minute,
            budget: entry.budget,
        }
    }
}

/// A limit as `list` shows it.
fn limit(value: Option<u32>) -> String {
    match value {
        None => "default".to_owned(),
        Some(0) => "unlimited".to_owned(),
        Some(n) => n.to_string(),
    }
}

fn revoke(key: &Which, path: &Path) -> anyhow::Result<()> {
    let mut file = KeysFile::open(path, false)?;
    let removed = file.remove(Selector { id: &key.id, prefix: key.prefix.as_deref() })?;
    file.save()?;
    let mut err = std::io::stderr().lock();
    writeln!(err, "revoked key {:?} ({}) in {}", removed.id, removed.prefix, file.path().display())?;
    if file.entries().is_empty() {
        tracing::warn!(
            "{} now holds no keys: a gateway refuses to start on it (auth fails closed) until a key is added",
            file.path().display()
        );
    }
    Ok(())
}

fn set(key: &Which, path: &Path, settings: &Settings, clear: Vec<Field>) -> anyhow::Result<()> {
    if settings.is_empty() && clear.is_empty() {
        bail!(
            "nothing to change: give --team, --models, --requests-per-minute, --tokens-per-minute, --budget-usd \
             or --clear"
        );
    }
    let contradicted = [
        (Field::Team, settings.team.is_some()),
        (Field::Models, settings.models.is_some()),
        (Field::RequestsPerMinute, settings.requests_per_minute.is_some()),
        (Field::TokensPerMinute, settings.tokens_per_minute.is_some()),
        (Field::Budget, settings.budget_usd.is_some()),
    ];
    if let Some((field, _)) = contradicted.iter().find(|(field, given)| *given && clear.contains(field)) {
        let flag = field.key().replace('_', "-");
        bail!("--{flag} and --clear {flag} contradict each other");
    }
    let changes = Changes {
        team: settings.team.clone(),
        models: settings.models(),
        requests_per_minute: settings.requests_per_minute,
        tokens_per_minute: settings.tokens_per_minute,
        budget: settings.budget(),
        clear,
    };
    let mut file = KeysFile::open(path, false)?;
    let changed = file.change(Selector { id: &key.id, prefix: key.prefix.as_deref() }, &changes)?;
    file.save()?;
    writeln!(std::io::stderr(), "changed key {:?} ({}) in {}", changed.id, changed.prefix, file.path().display())?;
    Ok(())
}

//! `llmesh spend`: what a key or a team has spent of its budget in a period, read from the Redis
//! the gateways keep budgets in (`[gateway.rate_limit] redis_url`).
//!
//! The period and the limit come from the keys file when one is given (the key's own budget, or
//! its team's when it has none; the team's `[[teams]]` budget); otherwise `--period` says which
//! (the limit is then the one the gateways last checked a reservation against). The current
//! period by default, or the one `--date` names (`2026-12` for a month, `2026-12-03` for a day).
//! Read-only: it never changes a budget.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use llmesh_keys::{parse_keys_file, parse_teams};
use llmesh_ratelimit::budget::{self, Level, Period, RedisBudget, Scope, Window};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct SpendArgs {
    /// The Redis the gateways keep budgets in (their `rate_limit.redis_url`).
    #[arg(long, env = "LLMESH_GATEWAY_RATE_LIMIT__REDIS_URL")]
    redis: String,
    /// The API key's id.
    #[arg(long, conflicts_with = "team", required_unless_present = "team")]
    key: Option<String>,
    /// The team's name.
    #[arg(long)]
    team: Option<String>,
    /// The gateway's keys file: where the budget's period and limit are read from.
    #[arg(long)]
    keys_file: Option<PathBuf>,
    /// The budget's period when no keys file says it.
    #[arg(long, value_enum)]
    period: Option<PeriodArg>,
    /// Which period: `YYYY-MM` for a month, `YYYY-MM-DD` for a day (default: the current one, UTC).
    #[arg(long)]
    date: Option<String>,
    /// Print JSON (amounts in nano-dollars as well as dollars) instead of a sentence.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PeriodArg {
    Day,
    Month,
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Report {
    scope: &'static str,
    name: String,
    period: &'static str,
    date: String,
    spent_nanos: u64,
    held_nanos: u64,
    limit_nanos: Option<u64>,
    remaining_nanos: Option<u64>,
    spent_usd: f64,
    held_usd: f64,
    limit_usd: Option<f64>,
    remaining_usd: Option<f64>,
}

pub async fn run(args: SpendArgs) -> anyhow::Result<()> {
    let (scope, name) = match (&args.key, &args.team) {
        (Some(key), None) => (Scope::Key, key.clone()),
        (None, Some(team)) => (Scope::Team, team.clone()),
        _ => bail!("name either --key ID or --team NAME"),
    };
    let (period, limit) = budget_of(&args, scope, &name)?;
    let window = match &args.date {
        Some(date) => window_named(period, date)?,
        None => period.window(now_ms()),
    };
    let redis = RedisBudget::new(&args.redis, Duration::from_secs(5))
        .with_context(|| format!("invalid --redis {}", llmesh_util::redact::redact_url(&args.redis)))?;
    let key = budget::bucket_key(period, &window, scope, &name);
    let level = redis
        .read(&key)
        .await
        .with_context(|| format!("cannot read {key} from Redis {}", llmesh_util::redact::redact_url(&args.redis)))?;
    let level = Level { limit: limit.or(level.limit), ..level };
    let report = Report {
        scope: scope.as_str(),
        name,
        period: period.as_str(),
        date: window.date,
        spent_nanos: level.spent,
        held_nanos: level.held,
        limit_nanos: level.limit,
        remaining_nanos: level.remaining(),
        spent_usd: budget::nanos_to_usd(level.spent),
        held_usd: budget::nanos_to_usd(level.held),
        limit_usd: level.limit.map(budget::nanos_to_usd),
        remaining_usd: level.remaining().map(budget::nanos_to_usd),
    };
    #[allow(clippy::print_stdout)]
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let limit = match level.limit {
            Some(limit) => format!(" of ${}", budget::format_usd(limit)),
            None => " (no limit)".to_string(),
        };
        let left = level.remaining().map(|left| format!("; ${} left", budget::format_usd(left))).unwrap_or_default();
        println!(
            "{} {}, {} {} (UTC): spent ${}{limit}; ${} held by calls in flight{left}",
            report.scope,
            report.name,
            report.period,
            report.date,
            budget::format_usd(level.spent),
            budget::format_usd(level.held),
        );
    }
    Ok(())
}

/// The period and limit (nano-dollars) of the budget, from the keys file or `--period`.
fn budget_of(args: &SpendArgs, scope: Scope, name: &str) -> anyhow::Result<(Period, Option<u64>)> {
    let fallback = match args.period {
        Some(PeriodArg::Day) => Period::Day,
        Some(PeriodArg::Month) | None => Period::Month,
    };
    let Some(path) = &args.keys_file else { return Ok((fallback, None)) };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read keys file {}", path.display()))?;
    let invalid = || format!("invalid keys file {}", path.display());
    let teams = parse_teams(&text).with_context(invalid)?;
    let team_budget = |team: &str| teams.iter().find(|t| t.name == team).and_then(|t| t.budget);
    let budget = match scope {
        Scope::Team => team_budget(name),
        Scope::Key => {
            let keys = parse_keys_file(&text).with_context(invalid)?;
            let Some(key) = keys.iter().find(|key| key.id == name) else {
                bail!("keys file {} has no key with id {name:?}", path.display());
            };
            match key.budget {
                Some(own) => Some(own),
                // Counted in its team's period, without a limit of its own.
                None => {
                    let period = key.team.as_deref().and_then(team_budget).map_or(fallback, |b| b.period);
                    return Ok((period, None));
                }
            }
        }
    };
    Ok(match budget {
        Some(budget) => (budget.period, budget::usd_to_nanos(budget.usd)),
        None => (fallback, None),
    })
}

/// The period `date` names.
fn window_named(period: Period, date: &str) -> anyhow::Result<Window> {
    let parts: Vec<&str> = date.split('-').collect();
    let number = |text: &str| text.parse::<u32>().ok();
    let valid = match (period, parts.as_slice()) {
        (Period::Month, [year, month]) => {
            year.len() == 4 && number(year).is_some() && number(month).is_some_and(|m| (1..=12).contains(&m))
        }
        (Period::Day, [year, month, day]) => {
            year.len() == 4
                && number(year).is_some()
                && number(month).is_some_and(|m| (1..=12).contains(&m))
                && number(day).is_some_and(|d| (1..=31).contains(&d))
        }
        _ => false,
    };
    if !valid || parts.iter().skip(1).any(|part| part.len() != 2) {
        let shape = match period {
            Period::Day => "YYYY-MM-DD",
            Period::Month => "YYYY-MM",
        };
        bail!("--date {date:?}: a {} budget's period is named {shape}", period.as_str());
    }
    // Only the name matters for reading: the bounds are not used.
    Ok(Window { date: date.to_string(), start_ms: 0, end_ms: 0 })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_name_their_period() {
        assert_eq!(window_named(Period::Month, "2026-12").unwrap().date, "2026-12");
        assert_eq!(window_named(Period::Day, "2026-12-03").unwrap().date, "2026-12-03");
        for (period, bad) in [
            (Period::Month, "2026-12-03"),
            (Period::Day, "2026-12"),
            (Period::Month, "2026-13"),
            (Period::Month, "26-12"),
            (Period::Day, "2026-1-3"),
        ] {
            assert!(window_named(period, bad).is_err(), "{bad}");
        }
    }
}

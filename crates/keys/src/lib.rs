//! The gateway's keys file, as the gateway reads it and `llmesh keys` / `llmesh spend` write and
//! read it: one crate so that the two can never disagree on the format or its rules.
//!
//! A keys file is TOML with `[[keys]]` tables ([`ApiKey`]) and `[[teams]]` tables ([`Team`]); the
//! same tables may sit inline in the gateway's configuration (`[gateway.auth] keys`, `teams`).
//! An entry stores the key's public prefix and the SHA-256 of the whole key, never the key
//! ([`key`] describes the key format and makes keys). A key or team may carry a spend [`Budget`]
//! in dollars per calendar period, which the gateway counts as a [`BudgetLimit`] in nano-dollars.
//!
//! What it promises:
//! - [`read_keys_file`] fails closed: a configured file that is missing, unreadable, malformed
//!   (an unknown field included) or holds no key is an error naming the file.
//! - [`check`] and [`check_all`] are the rules an entry must meet for the gateway to accept it
//!   (non-empty id, not the reserved [`ANONYMOUS`], a non-empty team when one is named, a
//!   prefix, 64 hex digits of digest, a budget that is an amount; teams named once), each error
//!   naming the entry and the field. `llmesh keys` checks a file with them before writing it.
//!
//! What it does not: watch or reload a file, or decide who a caller is. The gateway's key store
//! (`admission::auth` in `llmesh-gateway`) does, on top of these types.

pub mod key;

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, bail};
use llmesh_ratelimit::budget::{Nanos, Period, usd_to_nanos};
use serde::{Deserialize, Serialize};

pub use key::{KEY_TAG, constant_time_eq, generate_key, prefix_of, sha256_hex};

/// The id of every caller when the gateway's auth is off; no key may have it.
pub const ANONYMOUS: &str = "anonymous";

/// A spend limit in US dollars per calendar period (UTC): `budget = { usd = 50.0, period =
/// "month" }` on a key or a team.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub usd: f64,
    /// `day` or `month` (the default): the calendar period in UTC the amount is for.
    #[serde(default)]
    pub period: Period,
}

impl Budget {
    /// The limit in the unit budgets are counted in; an error for an amount that is not one.
    pub fn limit(&self) -> anyhow::Result<BudgetLimit> {
        match usd_to_nanos(self.usd) {
            Some(nanos) => Ok(BudgetLimit { nanos, period: self.period }),
            None => bail!("`budget.usd` must be a number of dollars from 0 to 9,000,000 (got {})", self.usd),
        }
    }
}

/// A budget as the gateway counts it: nano-dollars per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLimit {
    pub nanos: Nanos,
    pub period: Period,
}

/// A team with a budget shared by every key that names it (`[[teams]]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Team {
    pub name: String,
    pub budget: Option<Budget>,
}

/// One API key, stored as the SHA-256 of the key; `prefix` (the key's first characters) is public
/// and finds the candidate to compare.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKey {
    /// Public name, used in metrics and logs.
    pub id: String,
    /// The team the key belongs to, if any (`llmesh keys new --team`); a key in no team stands
    /// alone. The team's budget, if it has one, applies to the key as well as its own.
    pub team: Option<String>,
    pub prefix: String,
    /// Hex SHA-256 of the whole key.
    pub sha256: String,
    /// Overrides `rate_limit.requests_per_minute` for this key.
    pub requests_per_minute: Option<u32>,
    /// Overrides `rate_limit.tokens_per_minute` for this key.
    pub tokens_per_minute: Option<u32>,
    /// Models this key may use; empty means all.
    pub models: Vec<String>,
    /// Overrides `shed.max_in_flight_per_key` for this key (0: no bound of its own).
    pub max_in_flight: Option<u32>,
    /// Whether this key's answers are cached with everyone's (`shared`, the default), only for
    /// itself (`private`), or not at all (`off`).
    pub cache: CacheScope,
    /// This key's own spend limit (its team's, if any, applies as well).
    pub budget: Option<Budget>,
}

/// Whose cache a key's calls read and write.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    /// One cache for every key: an equal request from any key is answered from it.
    #[default]
    Shared,
    /// Entries of this key's own, which no other key reads (nor this key another's).
    Private,
    /// Never cached, never answered from the cache.
    Off,
}

/// The shape of a keys file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysFile {
    pub keys: Vec<ApiKey>,
    pub teams: Vec<Team>,
}

/// The keys and teams of a configured keys file, at least one key; an error naming the file
/// otherwise (see the crate's promises). The entries are checked by [`check_all`], not here.
pub fn read_keys_file(path: &Path) -> anyhow::Result<KeysFile> {
    if path.as_os_str().is_empty() {
        bail!("`keys_file` is set but empty: name the keys file, or unset it to turn auth off");
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read keys file {}", path.display()))?;
    let file: KeysFile = toml::from_str(&text).with_context(|| format!("invalid keys file {}", path.display()))?;
    if file.keys.is_empty() {
        bail!(
            "keys file {} holds no keys; refusing to start with auth off (add one with \
             `llmesh keys new --id NAME --file {}`, or unset `keys_file` to turn auth off)",
            path.display(),
            path.display()
        );
    }
    Ok(file)
}

/// The entries of a keys file's text (`[[keys]]` tables), in order, as the gateway reads them;
/// each is checked only by [`check`]. `llmesh keys` reads files with it too, so that it never
/// writes one the gateway would refuse.
pub fn parse_keys_file(text: &str) -> anyhow::Result<Vec<ApiKey>> {
    let file: KeysFile = toml::from_str(text)?;
    Ok(file.keys)
}

/// The `[[teams]]` of a keys file's text, in order (`llmesh spend` reads budgets with it).
pub fn parse_teams(text: &str) -> anyhow::Result<Vec<Team>> {
    let file: KeysFile = toml::from_str(text)?;
    Ok(file.teams)
}

/// The budgets of `teams`, by name. A team without a name, named twice, or with a budget that is
/// no amount is an error naming it.
pub fn team_budgets(teams: impl IntoIterator<Item = Team>) -> anyhow::Result<HashMap<String, Option<BudgetLimit>>> {
    let mut budgets = HashMap::new();
    for (index, team) in teams.into_iter().enumerate() {
        let context = || format!("team #{} (name {:?})", index + 1, team.name);
        if team.name.trim().is_empty() {
            return Err(anyhow::anyhow!("`name` is empty")).with_context(context);
        }
        let budget = team.budget.as_ref().map(Budget::limit).transpose().with_context(context)?;
        if budgets.insert(team.name.clone(), budget).is_some() {
            return Err(anyhow::anyhow!("the team is listed twice")).with_context(context);
        }
    }
    Ok(budgets)
}

/// The rules one entry must meet for the gateway to accept it; its digest when it does.
pub fn check(key: &ApiKey) -> anyhow::Result<[u8; 32]> {
    if key.id.trim().is_empty() {
        bail!("`id` is empty");
    }
    if key.id == ANONYMOUS {
        bail!("`id` {ANONYMOUS:?} is reserved for callers when auth is off");
    }
    if key.team.as_deref().is_some_and(|team| team.trim().is_empty()) {
        bail!("`team` is empty (leave it out for a key in no team)");
    }
    if key.prefix.is_empty() {
        bail!("`prefix` is empty (the key's public first characters, e.g. `lk_1f2e3d4c`)");
    }
    let Some(digest) = key::parse_sha256_hex(&key.sha256) else {
        bail!("`sha256` must be the 64 hex digits of the key's SHA-256");
    };
    if let Some(budget) = &key.budget {
        budget.limit()?;
    }
    Ok(digest)
}

/// Every rule of a whole file: the teams ([`team_budgets`]), then each key ([`check`]), an error
/// naming the first entry that breaks one (`API key #2 (id "x")`).
pub fn check_all(keys: &[ApiKey], teams: &[Team]) -> anyhow::Result<()> {
    team_budgets(teams.iter().cloned())?;
    for (index, key) in keys.iter().enumerate() {
        check(key).with_context(|| entry_name(index, key))?;
    }
    Ok(())
}

/// How errors name the key at `index` (0-based) of a list: `API key #1 (id "a")`.
pub fn entry_name(index: usize, key: &ApiKey) -> String {
    format!("API key #{} (id {:?})", index + 1, key.id)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    #[test]
    fn a_generated_entry_passes_and_each_broken_field_is_named() {
        let (_, good) = generate_key("good");
        assert_eq!(check(&good).unwrap(), key::parse_sha256_hex(&good.sha256).unwrap());
        let cases = [
            (ApiKey { id: " ".into(), ..good.clone() }, "`id` is empty"),
            (ApiKey { id: ANONYMOUS.into(), ..good.clone() }, "reserved"),
            (ApiKey { team: Some(String::new()), ..good.clone() }, "`team` is empty"),
            (ApiKey { prefix: String::new(), ..good.clone() }, "`prefix` is empty"),
            (ApiKey { sha256: "abc".into(), ..good.clone() }, "`sha256`"),
            (ApiKey { budget: Some(Budget { usd: f64::NAN, period: Period::Day }), ..good.clone() }, "budget.usd"),
        ];
        for (bad, expected) in cases {
            let error = format!("{:#}", check_all(&[good.clone(), bad], &[]).unwrap_err());
            assert!(error.contains("API key #2") && error.contains(expected), "{error}");
        }
        let team = Team { name: "t".into(), budget: None };
        let error = format!("{:#}", check_all(&[good], &[team.clone(), team]).unwrap_err());
        assert!(error.contains("team #2") && error.contains("listed twice"), "{error}");
    }

    #[test]
    fn a_file_round_trips_through_its_text() {
        let (_, mut entry) = generate_key("round");
        entry.team = Some("search".into());
        entry.models = vec!["sim".into()];
        entry.cache = CacheScope::Private;
        entry.budget = Some(Budget { usd: 2.5, period: Period::Day });
        let text = toml::to_string(&KeysFileOut { keys: vec![entry.clone()] }).unwrap()
            + "\n[[teams]]\nname = \"search\"\nbudget = { usd = 10 }\n";
        assert_eq!(parse_keys_file(&text).unwrap(), [entry]);
        let teams = parse_teams(&text).unwrap();
        assert_eq!(teams[0].budget, Some(Budget { usd: 10.0, period: Period::Month }), "month is the default");
        assert!(parse_keys_file("[[keys]]\nid = \"x\"\nsecret = \"typo\"\n").is_err(), "unknown fields are refused");
    }

    #[derive(Serialize)]
    struct KeysFileOut {
        keys: Vec<ApiKey>,
    }

    #[test]
    fn a_configured_file_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let error = format!("{:#}", read_keys_file(&path).unwrap_err());
        assert!(error.contains("cannot read keys file") && error.contains("keys.toml"), "{error}");
        std::fs::write(&path, "# every key was revoked\n").unwrap();
        assert!(format!("{:#}", read_keys_file(&path).unwrap_err()).contains("holds no keys"));
        std::fs::write(&path, "[[keys]\n").unwrap();
        assert!(format!("{:#}", read_keys_file(&path).unwrap_err()).contains("invalid keys file"));
        let error = format!("{:#}", read_keys_file(Path::new("")).unwrap_err());
        assert!(error.contains("set but empty"), "{error}");
        let (_, entry) = generate_key("one");
        std::fs::write(
            &path,
            format!("[[keys]]\nid = \"one\"\nprefix = \"{}\"\nsha256 = \"{}\"\n", entry.prefix, entry.sha256),
        )
        .unwrap();
        assert_eq!(read_keys_file(&path).unwrap().keys, [entry]);
    }
}

//! Who is calling: API keys from `x-api-key`, checked against SHA-256 digests, become a
//! [`Principal`] in the request extensions.
//!
//! Keys come from `[gateway.auth] keys` and from `keys_file` (a TOML file of `[[keys]]` tables of
//! the same shape, e.g. a mounted secret, written by `llmesh keys`). The file's format, its rules
//! and the format of the keys the gateway issues belong to the `llmesh-keys` crate, which `llmesh
//! keys` shares; this module keeps what runs in the gateway. Teams' budgets come from `[[teams]]`
//! tables, in the same two places; each key's [`Principal`] carries its own budget and its team's
//! (the money itself is counted in Redis, see [`crate::admission::budget`], so changing a limit
//! here changes only the limit).
//!
//! Auth fails closed. It is off (every caller is [`Principal::anonymous`]) only when neither
//! `keys` nor `keys_file` is configured at all. A configured `keys_file` that is missing,
//! unreadable, malformed or holds no key is an error naming the file, so that the gateway does not
//! start: a secret that was not mounted, or was mounted empty, must not quietly open the gateway to
//! everyone.
//!
//! **Keys rotate without a restart** ([`KeyStore::watch`]). The gateway re-reads `keys_file` when it
//! changes (a Kubernetes Secret update, `llmesh keys` editing it in place) and on SIGHUP, and swaps
//! the whole store at once: from the next call on, a removed key is refused and a new one accepted,
//! and every setting of a key (`models`, limits, `max_in_flight`, `cache`) is the new file's.
//! Calls already admitted carry on with the principal they were given. A new file that cannot be
//! used (missing, malformed, a bad entry, no key at all) changes nothing: the keys in use stay,
//! the error is logged naming the file, and it is counted (`llmesh_reloads_total{file="keys",
//! result="error"}`, `llmesh_reload_failing{file="keys"}` 1 until a good file arrives; see
//! [`llmesh_common::reload`]). The reload is generic over the store: whatever a `[[keys]]` entry
//! holds follows it, and so do the `[[teams]]` (a changed budget, a key moved to another team).

mod layer;

use std::{collections::HashMap, fmt, path::PathBuf};

use crate::principal::Principal;
use anyhow::Context as _;
use llmesh_common::reload::{self, Live};
use llmesh_keys::{constant_time_eq, key, read_keys_file, team_budgets};
use serde::{Deserialize, Serialize};

pub use layer::AuthLayer;
pub use llmesh_keys::{ApiKey, Budget, BudgetLimit, CacheScope, Team, generate_key};

/// `[gateway.auth]`. With no keys at all, auth is off and every caller is `anonymous`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// TOML file with `[[keys]]` tables (same shape as `keys`), e.g. a mounted secret, and
    /// `[[teams]]` tables (same shape as `teams`).
    pub keys_file: Option<PathBuf>,
    pub keys: Vec<ApiKey>,
    /// Teams with a budget (a key names its team in `team`).
    pub teams: Vec<Team>,
}

/// The caller a configured key stands for.
fn principal_of(key: &ApiKey, budget: Option<BudgetLimit>, team_budget: Option<BudgetLimit>) -> Principal {
    Principal {
        id: key.id.as_str().into(),
        requests_per_minute: key.requests_per_minute,
        tokens_per_minute: key.tokens_per_minute,
        models: key.models.iter().cloned().collect(),
        max_in_flight: key.max_in_flight,
        cache: key.cache,
        team: key.team.as_deref().map(Into::into),
        budget,
        team_budget,
    }
}

/// Why a key was refused; the message tells the caller which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Missing,
    Unknown,
}

impl Rejection {
    pub fn message(self) -> &'static str {
        match self {
            Self::Missing => "missing x-api-key",
            Self::Unknown => "unknown API key",
        }
    }
}

/// The configured keys, found by their public prefix and compared by digest in constant time.
pub struct KeyStore {
    entries: Vec<Entry>,
    /// Entries by prefix (several when keys share one, e.g. while a key is rotated).
    by_prefix: HashMap<String, Vec<usize>>,
    /// Distinct prefix lengths, shortest first: the candidate prefixes of a presented key.
    prefix_lengths: Vec<usize>,
}

struct Entry {
    digest: [u8; 32],
    principal: Principal,
}

impl KeyStore {
    /// The keys of `[gateway.auth]`: `keys` first, then those of `keys_file`. Fails, naming the
    /// file, when `keys_file` is set but missing, unreadable, malformed or without a key, and on
    /// a malformed entry, naming which. Empty (auth off) only when neither is configured.
    pub fn load(config: &AuthConfig) -> anyhow::Result<Self> {
        let mut keys = config.keys.clone();
        let mut teams = config.teams.clone();
        if let Some(path) = &config.keys_file {
            let file = read_keys_file(path)?;
            keys.extend(file.keys);
            teams.extend(file.teams);
        }
        Self::from_keys_and_teams(keys, teams)
    }

    /// The keys of `[gateway.auth]` as [`KeyStore::load`] reads them, and kept up to date with
    /// `keys_file` (see the module's documentation): a broken file at start-up is an error naming
    /// it; later, it keeps the keys in use. Without a `keys_file` the keys never change.
    ///
    /// `loaded` sees every store that is put in use (the first included) just before calls see
    /// it: what the process derives from the keys file as a whole (whether any budget is
    /// configured) follows the file with it. A broken file calls nothing.
    pub fn watch(config: &AuthConfig, loaded: impl Fn(&Self) + Send + 'static) -> anyhow::Result<Live<Self>> {
        let Some(path) = config.keys_file.clone() else {
            let store = Self::load(config)?;
            loaded(&store);
            return Ok(Live::fixed(store));
        };
        let config = config.clone();
        reload::watch("keys", vec![path], move || {
            let store = Self::load(&config)?;
            tracing::info!(keys = store.len(), budgets = store.has_budgets(), "API keys loaded");
            loaded(&store);
            Ok(store)
        })
    }

    pub fn from_keys(keys: impl IntoIterator<Item = ApiKey>) -> anyhow::Result<Self> {
        Self::from_keys_and_teams(keys, [])
    }

    /// Keys, and the teams whose budgets they share. A team named twice, or a malformed budget,
    /// is an error naming it.
    pub fn from_keys_and_teams(
        keys: impl IntoIterator<Item = ApiKey>,
        teams: impl IntoIterator<Item = Team>,
    ) -> anyhow::Result<Self> {
        let team_budgets = team_budgets(teams)?;
        let mut store = Self { entries: Vec::new(), by_prefix: HashMap::new(), prefix_lengths: Vec::new() };
        for (index, key) in keys.into_iter().enumerate() {
            let entry = validate(&key, &team_budgets).with_context(|| llmesh_keys::entry_name(index, &key))?;
            store.by_prefix.entry(key.prefix.clone()).or_default().push(store.entries.len());
            store.entries.push(entry);
            if !store.prefix_lengths.contains(&key.prefix.len()) {
                store.prefix_lengths.push(key.prefix.len());
            }
        }
        store.prefix_lengths.sort_unstable();
        Ok(store)
    }

    /// No keys configured: auth is off.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether any key has a spend budget, its own or its team's.
    pub fn has_budgets(&self) -> bool {
        self.entries.iter().any(|entry| entry.principal.has_budget())
    }

    /// The ids of the configured keys (an id may repeat: two keys of one owner during rotation).
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|entry| &*entry.principal.id)
    }

    /// The principal a presented key belongs to. Auth off: everyone is anonymous.
    pub fn authenticate(&self, presented: Option<&str>) -> Result<Principal, Rejection> {
        if self.is_empty() {
            return Ok(Principal::anonymous());
        }
        let presented = presented.filter(|key| !key.is_empty()).ok_or(Rejection::Missing)?;
        self.find(presented).cloned().ok_or(Rejection::Unknown)
    }

    fn find(&self, presented: &str) -> Option<&Principal> {
        let digest = key::sha256(presented);
        let mut found = None;
        for &length in &self.prefix_lengths {
            let Some(candidates) = presented.get(..length).and_then(|prefix| self.by_prefix.get(prefix)) else {
                continue;
            };
            for &index in candidates {
                let entry = &self.entries[index];
                // Every candidate is compared: the time taken depends on the public prefix only.
                if constant_time_eq(&entry.digest, &digest) && found.is_none() {
                    found = Some(&entry.principal);
                }
            }
        }
        found
    }
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ids only: digests stay out of logs even though they are not the keys.
        f.debug_struct("KeyStore").field("ids", &self.ids().collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

/// An entry that meets the keys file's rules ([`llmesh_keys::check`]; `llmesh keys` checks the
/// same ones), as the store holds it.
fn validate(key: &ApiKey, team_budgets: &HashMap<String, Option<BudgetLimit>>) -> anyhow::Result<Entry> {
    let digest = llmesh_keys::check(key)?;
    let budget = key.budget.as_ref().map(Budget::limit).transpose()?;
    let team_budget = key.team.as_ref().and_then(|team| team_budgets.get(team).copied().flatten());
    Ok(Entry { digest, principal: principal_of(key, budget, team_budget) })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use llmesh_keys::{parse_keys_file, parse_teams, prefix_of, sha256_hex};
    use llmesh_ratelimit::budget::Period;

    use super::*;

    #[test]
    fn the_anonymous_id_is_the_one_the_keys_file_reserves() {
        assert_eq!(Principal::ANONYMOUS, llmesh_keys::ANONYMOUS);
    }

    fn store_of(keys: &[(&str, &str)]) -> KeyStore {
        KeyStore::from_keys(keys.iter().map(|(id, key)| ApiKey {
            id: (*id).into(),
            prefix: prefix_of(key).unwrap_or(&key[..4]).into(),
            sha256: sha256_hex(key),
            ..ApiKey::default()
        }))
        .unwrap()
    }

    #[test]
    fn no_keys_means_everyone_is_anonymous() {
        let store = KeyStore::from_keys([]).unwrap();
        assert!(store.is_empty());
        let principal = store.authenticate(None).unwrap();
        assert_eq!(&*principal.id, "anonymous");
        assert!(principal.is_anonymous());
        assert_eq!(store.authenticate(Some("anything")).unwrap(), principal);
    }

    #[test]
    fn keys_are_found_by_prefix_and_digest() {
        let (a, _) = generate_key("a");
        let (b, _) = generate_key("b");
        let store = store_of(&[("a", &a), ("b", &b), ("legacy", "legacy-key-without-the-format")]);
        assert_eq!(&*store.authenticate(Some(&a)).unwrap().id, "a");
        assert_eq!(&*store.authenticate(Some(&b)).unwrap().id, "b");
        assert_eq!(&*store.authenticate(Some("legacy-key-without-the-format")).unwrap().id, "legacy");

        assert_eq!(store.authenticate(None), Err(Rejection::Missing));
        assert_eq!(store.authenticate(Some("")), Err(Rejection::Missing));
        // Right prefix, wrong secret; wrong prefix; too short for any prefix.
        let mut wrong = a.clone();
        wrong.pop();
        wrong.push(if a.ends_with('x') { 'y' } else { 'x' });
        assert_eq!(store.authenticate(Some(&wrong)), Err(Rejection::Unknown));
        assert_eq!(store.authenticate(Some(&a.replacen("lk_", "lk-", 1))), Err(Rejection::Unknown));
        assert_eq!(store.authenticate(Some("lk")), Err(Rejection::Unknown));
        assert_eq!(store.authenticate(Some(&a[..a.len() - 1])), Err(Rejection::Unknown));
    }

    #[test]
    fn keys_sharing_a_prefix_are_all_compared() {
        let (old, entry) = generate_key("rotating");
        let new = format!("{}_{}", entry.prefix, "another-secret");
        let store = store_of(&[("rotating", &old), ("rotating-new", &new)]);
        assert_eq!(&*store.authenticate(Some(&old)).unwrap().id, "rotating");
        assert_eq!(&*store.authenticate(Some(&new)).unwrap().id, "rotating-new");
    }

    #[test]
    fn principal_carries_the_key_settings() {
        let (key, mut entry) = generate_key("team");
        entry.requests_per_minute = Some(10);
        entry.tokens_per_minute = Some(0);
        entry.models = vec!["sim-small".into()];
        let store = KeyStore::from_keys([entry]).unwrap();
        let principal = store.authenticate(Some(&key)).unwrap();
        assert_eq!(principal.requests_per_minute, Some(10));
        assert_eq!(principal.tokens_per_minute, Some(0));
        assert!(principal.allows("sim-small"));
        assert!(!principal.allows("sim-large"));
        assert!(Principal::anonymous().allows("sim-large"));
    }

    #[test]
    fn malformed_entries_are_named() {
        let (_, good) = generate_key("good");
        let cases = [
            (ApiKey { id: String::new(), ..good.clone() }, "`id` is empty"),
            (ApiKey { id: "anonymous".into(), ..good.clone() }, "reserved"),
            (ApiKey { team: Some(" ".into()), ..good.clone() }, "`team` is empty"),
            (ApiKey { prefix: String::new(), ..good.clone() }, "`prefix` is empty"),
            (ApiKey { sha256: "abc".into(), ..good.clone() }, "`sha256`"),
        ];
        for (bad, expected) in cases {
            let error = KeyStore::from_keys([good.clone(), bad]).unwrap_err();
            let text = format!("{error:#}");
            assert!(text.contains("API key #2") && text.contains(expected), "{text}");
        }
    }

    #[test]
    fn keys_file_entries_are_merged_after_the_inline_ones() {
        let (inline_key, inline) = generate_key("inline");
        let (file_key, from_file) = generate_key("from-file");
        let path = temp_path();
        let text = format!(
            "# mounted secret\n[[keys]]\nid = \"from-file\"\nprefix = \"{}\"\nsha256 = \"{}\"\n\
             requests_per_minute = 5\nmodels = [\"sim-small\"]\n",
            from_file.prefix, from_file.sha256
        );
        std::fs::write(&path, text).unwrap();
        let config = AuthConfig { keys_file: Some(path.clone()), keys: vec![inline], teams: vec![] };
        let store = KeyStore::load(&config);
        std::fs::remove_file(&path).unwrap();
        let store = store.unwrap();
        assert_eq!(store.ids().collect::<Vec<_>>(), ["inline", "from-file"]);
        assert_eq!(&*store.authenticate(Some(&inline_key)).unwrap().id, "inline");
        let principal = store.authenticate(Some(&file_key)).unwrap();
        assert_eq!(principal.requests_per_minute, Some(5));
        assert_eq!(&*principal.models, ["sim-small".to_owned()]);
    }

    /// The error of loading a keys file of `contents` (None: a path that does not exist), with an
    /// inline key besides so that the store would not be empty without the file.
    fn load_error(contents: Option<&[u8]>) -> (String, String) {
        let path = temp_path();
        if let Some(contents) = contents {
            std::fs::write(&path, contents).unwrap();
        }
        let (_, inline) = generate_key("inline");
        let config = AuthConfig { keys_file: Some(path.clone()), keys: vec![inline], teams: vec![] };
        let error = KeyStore::load(&config).err().map(|e| format!("{e:#}"));
        let _ = std::fs::remove_file(&path);
        (error.unwrap_or_else(|| panic!("{contents:?} loaded")), path.display().to_string())
    }

    fn temp_path() -> PathBuf {
        std::env::temp_dir().join(format!("llmesh-keys-{}-{}.toml", std::process::id(), fastrand::u64(..)))
    }

    #[test]
    fn a_missing_keys_file_is_an_error_naming_it() {
        let (error, path) = load_error(None);
        assert!(error.contains("cannot read keys file") && error.contains(&path), "{error}");
    }

    #[test]
    fn an_unreadable_keys_file_is_an_error_naming_it() {
        // Tests may run as root, who can read any mode: a directory and bytes that are not UTF-8
        // are unreadable for everyone.
        let dir = std::env::temp_dir();
        let config = AuthConfig { keys_file: Some(dir.clone()), keys: vec![], teams: vec![] };
        let error = format!("{:#}", KeyStore::load(&config).unwrap_err());
        assert!(error.contains("cannot read keys file") && error.contains(&dir.display().to_string()), "{error}");

        let (error, path) = load_error(Some(b"[[keys]]\nid = \"\xff\"\n"));
        assert!(error.contains("cannot read keys file") && error.contains(&path), "{error}");
    }

    #[test]
    fn a_malformed_keys_file_is_an_error_naming_it_and_the_field() {
        let (error, path) = load_error(Some(b"[[keys]]\nid = \"x\"\nsecret = \"typo\"\n"));
        assert!(error.contains("invalid keys file") && error.contains(&path) && error.contains("secret"), "{error}");
        let (error, path) = load_error(Some(b"[[keys]\nid = \"x\"\n"));
        assert!(error.contains("invalid keys file") && error.contains(&path), "{error}");
    }

    #[test]
    fn a_keys_file_without_keys_is_an_error_naming_it() {
        let empty: [&[u8]; 4] = [b"", b"\n", b"# every key was revoked\n", b"keys = []\n"];
        for contents in empty {
            let (error, path) = load_error(Some(contents));
            assert!(error.contains("holds no keys") && error.contains(&path), "{contents:?}: {error}");
        }
    }

    #[test]
    fn an_empty_keys_file_setting_is_an_error() {
        // `LLMESH_GATEWAY_AUTH__KEYS_FILE=` set to nothing is a mistake, not a way to turn auth off.
        let config = AuthConfig { keys_file: Some(PathBuf::new()), keys: vec![], teams: vec![] };
        let error = format!("{:#}", KeyStore::load(&config).unwrap_err());
        assert!(error.contains("`keys_file` is set but empty"), "{error}");
    }

    #[test]
    fn auth_is_off_only_without_any_keys_configured() {
        let store = KeyStore::load(&AuthConfig::default()).unwrap();
        assert!(store.is_empty());
        let (_, inline) = generate_key("inline");
        let store = KeyStore::load(&AuthConfig { keys_file: None, keys: vec![inline], teams: vec![] }).unwrap();
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_team_is_read_from_the_keys_file() {
        let (_, entry) = generate_key("in-a-team");
        let text = format!(
            "[[keys]]\nid = \"in-a-team\"\nteam = \"search\"\nprefix = \"{}\"\nsha256 = \"{}\"\n",
            entry.prefix, entry.sha256
        );
        let keys = parse_keys_file(&text).unwrap();
        assert_eq!(keys[0].team.as_deref(), Some("search"));
        assert_eq!(KeyStore::from_keys(keys).unwrap().len(), 1);
    }

    fn keys_file_text(entries: &[&ApiKey]) -> String {
        entries
            .iter()
            .map(|e| format!("[[keys]]\nid = \"{}\"\nprefix = \"{}\"\nsha256 = \"{}\"\n", e.id, e.prefix, e.sha256))
            .collect()
    }

    #[tokio::test]
    async fn a_changed_keys_file_swaps_the_keys_and_a_broken_one_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let (old_key, old) = generate_key("old");
        let (new_key, mut new) = generate_key("new");
        std::fs::write(&path, keys_file_text(&[&old])).unwrap();
        let keys =
            KeyStore::watch(&AuthConfig { keys_file: Some(path.clone()), ..AuthConfig::default() }, |_| {}).unwrap();
        assert_eq!(&*keys.load().authenticate(Some(&old_key)).unwrap().id, "old");
        assert_eq!(keys.load().authenticate(Some(&new_key)), Err(Rejection::Unknown));

        new.models = vec!["sim".into()];
        let fresh = dir.path().join("keys.toml.new");
        std::fs::write(&fresh, keys_file_text(&[&new]) + "models = [\"sim\"]\n").unwrap();
        std::fs::rename(&fresh, &path).unwrap();
        let mut swapped = false;
        for _ in 0..250 {
            if keys.load().authenticate(Some(&new_key)).is_ok() {
                swapped = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(swapped, "the new key was never accepted");
        assert_eq!(keys.load().authenticate(Some(&old_key)), Err(Rejection::Unknown));
        assert!(!keys.load().authenticate(Some(&new_key)).unwrap().allows("sim-large"), "its models did not follow");

        for broken in ["[[keys]\n", "", "[[keys]]\nid = \"x\"\nprefix = \"lk_1\"\nsha256 = \"short\"\n"] {
            std::fs::write(&path, broken).unwrap();
            for _ in 0..250 {
                if keys.failing() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            assert!(keys.failing(), "{broken:?} was not noticed");
            assert_eq!(&*keys.load().authenticate(Some(&new_key)).unwrap().id, "new", "{broken:?} replaced the keys");
            // Good again, so that the next broken version is a change.
            std::fs::write(&path, keys_file_text(&[&new])).unwrap();
            for _ in 0..250 {
                if !keys.failing() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            assert!(!keys.failing());
        }
    }

    /// Waits (bounded) until `done` holds.
    async fn eventually(mut done: impl FnMut() -> bool) -> bool {
        for _ in 0..250 {
            if done() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        done()
    }

    #[tokio::test]
    async fn a_reload_changes_budgets_and_teams_and_a_broken_file_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let (key, entry) = generate_key("spender");
        let file = |key_budget: &str, team: &str, team_budget: &str| {
            format!(
                "[[keys]]\nid = \"spender\"\nteam = \"{team}\"\nprefix = \"{}\"\nsha256 = \"{}\"\n{key_budget}\n\n\
                 [[teams]]\nname = \"{team}\"\n{team_budget}\n",
                entry.prefix, entry.sha256
            )
        };
        std::fs::write(&path, file("", "search", "")).unwrap();
        let budgeted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let seen = budgeted.clone();
        let keys = KeyStore::watch(&AuthConfig { keys_file: Some(path.clone()), ..AuthConfig::default() }, move |s| {
            seen.store(s.has_budgets(), std::sync::atomic::Ordering::Relaxed)
        })
        .unwrap();
        let principal = || keys.load().authenticate(Some(&key)).unwrap();
        let budgeted = move || budgeted.load(std::sync::atomic::Ordering::Relaxed);
        assert!(!principal().has_budget() && !budgeted(), "no budget yet");

        // A budget for the key and one for its team: both reach the next call.
        std::fs::write(&path, file("budget = { usd = 2, period = \"day\" }", "search", "budget = { usd = 30 }"))
            .unwrap();
        assert!(eventually(|| principal().has_budget()).await, "the new budgets were never seen");
        let day = BudgetLimit { nanos: 2_000_000_000, period: Period::Day };
        let month = BudgetLimit { nanos: 30_000_000_000, period: Period::Month };
        assert_eq!((principal().budget, principal().team_budget), (Some(day), Some(month)));
        assert!(budgeted(), "the callback did not see the budgets");

        // The key moves to another team, whose budget is smaller; its own budget is raised.
        std::fs::write(&path, file("budget = { usd = 5, period = \"day\" }", "ads", "budget = { usd = 1 }")).unwrap();
        assert!(eventually(|| principal().team.as_deref() == Some("ads")).await, "the new team was never seen");
        let five = BudgetLimit { nanos: 5_000_000_000, period: Period::Day };
        let one = BudgetLimit { nanos: 1_000_000_000, period: Period::Month };
        assert_eq!((principal().budget, principal().team_budget), (Some(five), Some(one)));

        // Broken: a team listed twice, a budget that is no amount, a team without a name. The
        // keys, their budgets and their teams stay as they were.
        for broken in [
            file("", "ads", "budget = { usd = 1 }") + "[[teams]]\nname = \"ads\"\n",
            file("budget = { usd = -3 }", "ads", ""),
            file("", "ads", "") + "[[teams]]\nname = \"\"\n",
        ] {
            std::fs::write(&path, &broken).unwrap();
            assert!(eventually(|| keys.failing()).await, "{broken:?} was not noticed");
            assert_eq!((principal().budget, principal().team_budget), (Some(five), Some(one)), "{broken:?}");
            assert_eq!(principal().team.as_deref(), Some("ads"));
            assert!(budgeted(), "a broken file reached the callback");
        }

        // Budgets removed: the callback hears of it.
        std::fs::write(&path, file("", "ads", "")).unwrap();
        assert!(eventually(|| !keys.failing() && !principal().has_budget()).await);
        assert!(!budgeted());
    }

    #[test]
    fn budgets_of_keys_and_teams_reach_the_principal() {
        let (key, entry) = generate_key("spender");
        let text = format!(
            "[[keys]]\nid = \"spender\"\nteam = \"search\"\nprefix = \"{}\"\nsha256 = \"{}\"\n\
             budget = {{ usd = 1.5, period = \"day\" }}\n\n[[teams]]\nname = \"search\"\nbudget = {{ usd = 100 }}\n",
            entry.prefix, entry.sha256
        );
        let store =
            KeyStore::from_keys_and_teams(parse_keys_file(&text).unwrap(), parse_teams(&text).unwrap()).unwrap();
        let principal = store.authenticate(Some(&key)).unwrap();
        assert_eq!(principal.team.as_deref(), Some("search"));
        assert_eq!(principal.budget, Some(BudgetLimit { nanos: 1_500_000_000, period: Period::Day }));
        assert_eq!(principal.team_budget, Some(BudgetLimit { nanos: 100_000_000_000, period: Period::Month }));
        assert!(principal.has_budget() && !Principal::anonymous().has_budget());
        // A team without a `[[teams]]` entry has no budget; the key's own still applies.
        let store = KeyStore::from_keys(parse_keys_file(&text).unwrap()).unwrap();
        let principal = store.authenticate(Some(&key)).unwrap();
        assert_eq!((principal.team_budget, principal.budget.map(|b| b.nanos)), (None, Some(1_500_000_000)));
    }

    #[test]
    fn malformed_budgets_and_teams_are_named() {
        let (_, good) = generate_key("good");
        let bad = ApiKey { budget: Some(Budget { usd: -1.0, period: Period::Month }), ..good.clone() };
        let error = format!("{:#}", KeyStore::from_keys([bad]).unwrap_err());
        assert!(error.contains("API key #1") && error.contains("budget.usd"), "{error}");
        let team = |name: &str| Team { name: name.into(), budget: Some(Budget { usd: 1.0, period: Period::Day }) };
        let error = format!("{:#}", KeyStore::from_keys_and_teams([good.clone()], [team("a"), team("a")]).unwrap_err());
        assert!(error.contains("team #2") && error.contains("listed twice"), "{error}");
        let error = format!("{:#}", KeyStore::from_keys_and_teams([good.clone()], [team(" ")]).unwrap_err());
        assert!(error.contains("`name` is empty"), "{error}");
        let nan = Team { name: "n".into(), budget: Some(Budget { usd: f64::INFINITY, period: Period::Day }) };
        assert!(KeyStore::from_keys_and_teams([good], [nan]).is_err());
        assert!(parse_teams("[[teams]]\nname = \"x\"\nbudget = { usd = 1, period = \"week\" }\n").is_err());
    }

    #[test]
    fn debug_output_shows_ids_only() {
        let (_, entry) = generate_key("visible");
        let digest = entry.sha256.clone();
        let store = KeyStore::from_keys([entry]).unwrap();
        let text = format!("{store:?}");
        assert!(text.contains("visible") && !text.contains(&digest), "{text}");
    }
}

//! `llmesh keys` as an operator runs it: the real binary on temporary keys files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use llmesh_keys::{
    check_all,
    key::{parse_sha256_hex, sha256},
    parse_keys_file, read_keys_file, sha256_hex,
};

/// Reads `path` as the gateway does (a file with keys, every entry and team meeting the rules) and
/// gives the id of the entry `key` is accepted for: found by its public prefix, then its digest.
fn accepted(path: &Path, key: &str) -> Option<String> {
    let file = read_keys_file(path).unwrap();
    check_all(&file.keys, &file.teams).unwrap();
    let digest = sha256(key);
    let entry = file.keys.iter().find(|e| key.starts_with(&e.prefix) && parse_sha256_hex(&e.sha256) == Some(digest));
    entry.map(|e| e.id.clone())
}

/// Runs `llmesh keys ARGS` with the default logging (no `RUST_LOG`) and `env` besides.
fn keys_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmesh"))
        .arg("keys")
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn keys(args: &[&str]) -> Output {
    keys_with(args, &[])
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// Runs a command that must succeed and returns its stdout.
fn ok(args: &[&str]) -> String {
    let output = keys(args);
    assert!(output.status.success(), "llmesh keys {args:?} failed:\n{}", stderr(&output));
    stdout(&output)
}

/// `keys new`, returning the key it printed (checked to be alone on stdout).
fn new_key(args: &[&str]) -> String {
    let out = ok(&[&["new"], args].concat());
    let key = out.strip_suffix('\n').unwrap_or_else(|| panic!("no newline after the key: {out:?}"));
    assert!(!key.is_empty() && !key.contains(char::is_whitespace), "stdout is not the key alone: {out:?}");
    key.to_owned()
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn temp_keys_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    (dir, path)
}

#[test]
fn new_twice_writes_two_entries_and_no_secret() {
    let (_dir, path) = temp_keys_file();
    let file = path_str(&path);
    let a = new_key(&["--id", "team-a", "--file", file]);
    let b = new_key(&["--id", "team-b", "--file", file, "--team", "search", "--models", "sim,sim-slow"]);
    assert_ne!(a, b);

    let text = std::fs::read_to_string(&path).unwrap();
    for key in [&a, &b] {
        let secret = &key[key.rfind('_').unwrap() + 1..];
        assert!(!text.contains(key.as_str()) && !text.contains(secret), "a key reached the file:\n{text}");
    }
    let entries = parse_keys_file(&text).unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!((entries[0].id.as_str(), entries[0].sha256.clone()), ("team-a", sha256_hex(&a)));
    assert_eq!(entries[1].team.as_deref(), Some("search"));
    assert_eq!(entries[1].models, ["sim", "sim-slow"]);

    // The gateway accepts both keys from that file.
    assert_eq!(accepted(&path, &a).as_deref(), Some("team-a"));
    assert_eq!(accepted(&path, &b).as_deref(), Some("team-b"));
}

#[test]
fn new_prints_nothing_but_the_key_and_its_entry() {
    let output = keys(&["new", "--id", "solo", "--requests-per-minute", "60"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let key = stdout(&output).trim_end().to_owned();
    let err = stderr(&output);
    // No log lines (the telemetry banner was one), only the note and the entry.
    assert!(!err.contains("INFO") && !err.contains("telemetry"), "{err}");
    assert!(err.starts_with("# Add this entry to the gateway's keys file"), "{err}");
    assert!(!err.contains(&key), "the key is on stderr too:\n{err}");
    let entry = parse_keys_file(&err).unwrap();
    assert_eq!(entry.len(), 1);
    assert_eq!((entry[0].sha256.clone(), entry[0].requests_per_minute), (sha256_hex(&key), Some(60)));

    // RUST_LOG still says what is logged.
    let verbose = keys_with(&["new", "--id", "solo"], &[("RUST_LOG", "info")]);
    assert!(stderr(&verbose).contains("telemetry initialised"), "{}", stderr(&verbose));
}

#[test]
fn a_duplicate_id_is_refused_and_the_file_is_unchanged() {
    let (_dir, path) = temp_keys_file();
    let file = path_str(&path);
    new_key(&["--id", "team-a", "--file", file]);
    let before = std::fs::read(&path).unwrap();

    let output = keys(&["new", "--id", "team-a", "--file", file]);
    assert!(!output.status.success());
    assert!(stdout(&output).is_empty(), "a key was printed for an entry that was not added: {}", stdout(&output));
    assert!(stderr(&output).contains("already has a key with id \"team-a\""), "{}", stderr(&output));
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // So is an id the gateway reserves.
    let output = keys(&["new", "--id", "anonymous", "--file", file]);
    assert!(!output.status.success() && stdout(&output).is_empty());
    assert!(stderr(&output).contains("reserved"), "{}", stderr(&output));
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn revoke_removes_exactly_one_entry_and_keeps_the_comments() {
    let (_dir, path) = temp_keys_file();
    let file = path_str(&path);
    std::fs::write(&path, "# Our keys. Owner: platform team.\n\n").unwrap();
    let a = new_key(&["--id", "a", "--file", file]);
    let b = new_key(&["--id", "b", "--file", file]);
    let c = new_key(&["--id", "c", "--file", file]);
    // A note by hand about c.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[[keys]]\nid = \"c\"", "# c: batch jobs\n[[keys]]\nid = \"c\"");
    std::fs::write(&path, text).unwrap();

    let output = keys(&["revoke", "--id", "b", "--file", file]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).is_empty());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("# Our keys. Owner: platform team.\n\n[[keys]]\nid = \"a\""), "{text}");
    assert!(text.contains("# c: batch jobs\n[[keys]]\nid = \"c\""), "{text}");
    let ids: Vec<String> = parse_keys_file(&text).unwrap().into_iter().map(|key| key.id).collect();
    assert_eq!(ids, ["a", "c"]);
    assert!(accepted(&path, &a).is_some() && accepted(&path, &c).is_some());
    assert!(accepted(&path, &b).is_none());

    // Unknown ids change nothing.
    let output = keys(&["revoke", "--id", "b", "--file", file]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("no key with id \"b\""), "{}", stderr(&output));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

    // Revoking the last key warns that a gateway will not start on the file.
    ok(&["revoke", "--id", "a", "--file", file]);
    let output = keys(&["revoke", "--id", "c", "--file", file]);
    assert!(output.status.success());
    assert!(stderr(&output).contains("now holds no keys"), "{}", stderr(&output));
    assert!(std::fs::read_to_string(&path).unwrap().starts_with("# Our keys. Owner: platform team.\n"));
}

#[test]
fn set_changes_limits_in_place() {
    let (_dir, path) = temp_keys_file();
    let file = path_str(&path);
    new_key(&["--id", "a", "--file", file, "--tokens-per-minute", "1000", "--models", "sim"]);
    new_key(&["--id", "b", "--file", file]);
    ok(&["set", "--id", "a", "--file", file, "--requests-per-minute", "0", "--team", "ops", "--clear", "models"]);
    let entries = parse_keys_file(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(entries[0].requests_per_minute, Some(0));
    assert_eq!(entries[0].tokens_per_minute, Some(1000));
    assert_eq!(entries[0].team.as_deref(), Some("ops"));
    assert!(entries[0].models.is_empty());
    assert_eq!(entries[1].id, "b");
    assert_eq!(entries[1].requests_per_minute, None);

    let before = std::fs::read(&path).unwrap();
    for bad in [
        &["set", "--id", "a", "--file", file][..],
        &["set", "--id", "a", "--file", file, "--team", "x", "--clear", "team"][..],
        &["set", "--id", "a", "--file", file, "--team", " "][..],
        &["set", "--id", "zzz", "--file", file, "--team", "x"][..],
    ] {
        let output = keys(bad);
        assert!(!output.status.success(), "{bad:?} succeeded");
        assert_eq!(std::fs::read(&path).unwrap(), before, "{bad:?} changed the file");
    }
}

#[test]
fn list_shows_every_key_and_no_digest() {
    let (_dir, path) = temp_keys_file();
    let file = path_str(&path);
    new_key(&["--id", "team-a", "--file", file, "--team", "search", "--requests-per-minute", "60"]);
    new_key(&["--id", "team-b", "--file", file, "--models", "sim", "--tokens-per-minute", "0"]);
    let entries = parse_keys_file(&std::fs::read_to_string(&path).unwrap()).unwrap();

    let table = ok(&["list", "--file", file]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    let words = |line: &str| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(words(lines[0]), ["ID", "PREFIX", "TEAM", "MODELS", "REQUESTS/MIN", "TOKENS/MIN", "BUDGET"]);
    assert_eq!(words(lines[1]), ["team-a", &entries[0].prefix, "search", "all", "60", "default", "-"]);
    assert_eq!(words(lines[2]), ["team-b", &entries[1].prefix, "-", "sim", "default", "unlimited", "-"]);

    let json: serde_json::Value = serde_json::from_str(&ok(&["list", "--file", file, "--json"])).unwrap();
    assert_eq!(json[0]["id"], "team-a");
    assert_eq!(json[0]["team"], "search");
    assert_eq!(json[0]["requests_per_minute"], 60);
    assert_eq!(json[1]["models"], serde_json::json!(["sim"]));
    assert_eq!(json[1]["tokens_per_minute"], 0);
    assert!(json[1]["team"].is_null());

    // Not even part of a digest.
    let listed = format!("{table}{json}");
    for entry in &entries {
        for window in entry.sha256.as_bytes().windows(8) {
            assert!(!listed.contains(std::str::from_utf8(window).unwrap()), "a digest shows:\n{listed}");
        }
    }
}

#[test]
fn list_names_a_missing_or_broken_file() {
    let (_dir, path) = temp_keys_file();
    let output = keys(&["list", "--file", path_str(&path)]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains(&format!("cannot read keys file {}", path.display())), "{}", stderr(&output));
    std::fs::write(&path, "[[keys]]\nid = \"a\"\nsecret = \"oops\"\n").unwrap();
    let output = keys(&["list", "--file", path_str(&path)]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("invalid keys file") && stderr(&output).contains("secret"), "{}", stderr(&output));
}

#[test]
fn list_reads_any_layout_the_gateway_reads() {
    // An inline array (written by hand) cannot be edited in place, but it lists.
    let (_dir, path) = temp_keys_file();
    let text = format!("keys = [{{ id = \"inline\", prefix = \"lk_00000000\", sha256 = \"{}\" }}]\n", "0".repeat(64));
    std::fs::write(&path, text).unwrap();
    let table = ok(&["list", "--file", path_str(&path)]);
    assert!(table.lines().nth(1).is_some_and(|line| line.starts_with("inline  lk_00000000")), "{table}");
    let output = keys(&["revoke", "--id", "inline", "--file", path_str(&path)]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("inline array"), "{}", stderr(&output));
}

#[test]
fn budgets_are_set_kept_beside_teams_and_cleared() {
    let (_dir, path) = temp_keys_file();
    let file = path_str(&path);
    new_key(&["--id", "spender", "--team", "search", "--budget-usd", "50", "--file", file]);
    // A team's budget, written by hand, survives every edit.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("\n[[teams]]\nname = \"search\"\nbudget = { usd = 500.0, period = \"day\" }\n");
    std::fs::write(&path, text).unwrap();
    assert!(std::fs::read_to_string(&path).unwrap().contains("budget = { usd = 50.0, period = \"month\" }"));

    ok(&["set", "--id", "spender", "--budget-usd", "2.5", "--budget-period", "day", "--file", file]);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("budget = { usd = 2.5, period = \"day\" }"), "{text}");
    assert!(text.contains("[[teams]]") && text.contains("usd = 500.0"), "the team's budget was lost:\n{text}");
    let listed: serde_json::Value = serde_json::from_str(&ok(&["list", "--json", "--file", file])).unwrap();
    assert_eq!(listed[0]["budget"], serde_json::json!({"usd": 2.5, "period": "day"}));

    // The gateway's own rules: a negative budget is refused and changes nothing.
    let refused = keys(&["set", "--id", "spender", "--budget-usd=-1", "--file", file]);
    assert!(!refused.status.success() && stderr(&refused).contains("budget.usd"), "{}", stderr(&refused));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    let period_alone = keys(&["set", "--id", "spender", "--budget-period", "day", "--file", file]);
    assert!(!period_alone.status.success());

    ok(&["set", "--id", "spender", "--clear", "budget", "--file", file]);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("usd = 2.5") && text.contains("usd = 500.0"), "{text}");
}

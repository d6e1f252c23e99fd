//! Golden files: a test renders what it made as JSON and compares it with a checked-in file, or
//! rewrites the file when `GOLDEN_UPDATE` is set (then read the diff by hand: a golden file that
//! enshrines a bug is a defect). Both sides are compared pretty-printed, so key order and
//! whitespace in the file do not matter.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The files of `dir` whose names end in `suffix`, as (name without it, path), by name. Panics
/// when there are none: a golden test over no cases passes for nothing.
pub fn inputs(dir: &Path, suffix: &str) -> Vec<(String, PathBuf)> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter_map(|path| Some((path.file_name()?.to_str()?.strip_suffix(suffix)?.to_string(), path.clone())))
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no *{suffix} files in {}", dir.display());
    found
}

/// The JSON file at `path`.
pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compares `actual` with the file at `path`, or writes it there with `GOLDEN_UPDATE`. Returns
/// the mismatch, if any, with the lines around its first difference.
pub fn check(path: &Path, actual: &Value) -> Option<String> {
    let text = format!("{}\n", serde_json::to_string_pretty(actual).unwrap());
    if std::env::var_os("GOLDEN_UPDATE").is_some() {
        std::fs::write(path, &text).unwrap();
        return None;
    }
    if !path.exists() {
        return Some(format!("{}: missing (GOLDEN_UPDATE=1 writes it)", path.display()));
    }
    let expected = format!("{}\n", serde_json::to_string_pretty(&read_json(path)).unwrap());
    if expected == text {
        return None;
    }
    let line = expected.lines().zip(text.lines()).position(|(a, b)| a != b).unwrap_or(0);
    let at = |text: &str| text.lines().skip(line.saturating_sub(2)).take(5).collect::<Vec<_>>().join("\n");
    Some(format!(
        "{} differs at line {}:\n--- expected\n{}\n--- actual\n{}",
        path.display(),
        line + 1,
        at(&expected),
        at(&text)
    ))
}

/// Fails with every mismatch at once, so one run shows them all.
pub fn report(failures: Vec<String>) {
    assert!(failures.is_empty(), "{} golden file(s) differ:\n\n{}", failures.len(), failures.join("\n\n"));
}

//! The status page under `llmesh up`: the health service serves it on its admin listener, behind
//! the operator's token. `up` makes a random token in a file of its own (a directory only root and
//! this user can read, removed when `up` ends), gives it to the health service alone — the other
//! admin listeners stay open on loopback, so their `/metrics` answer without it — and points the
//! page at the other services' admin listeners.

use std::{
    io::Write as _,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::PathBuf,
};

use anyhow::Context as _;

/// This `up`'s own directory for the token.
fn dir() -> PathBuf {
    std::env::temp_dir().join(format!("llmesh-up-{}", std::process::id()))
}

/// The token's file, written now: a fresh random token, readable by this user alone.
pub fn token_file() -> anyhow::Result<PathBuf> {
    let dir = dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("operator-token");
    let (token, _) = llmesh_keys::generate_key("operator");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&file)
        .with_context(|| format!("writing {}", file.display()))?;
    out.write_all(token.as_bytes()).with_context(|| format!("writing {}", file.display()))?;
    Ok(file)
}

/// Removes the token's directory (at the end of `up`; nothing to do when there is none).
pub fn remove() {
    let _ = std::fs::remove_dir_all(dir());
}

/// `[health.status] sources` for the admin listeners of the other services, as an environment
/// value: `[{service="gateway",address="http://127.0.0.1:9464"},...]`.
pub fn sources(admins: &[(&str, SocketAddr)]) -> String {
    let listed: Vec<String> =
        admins.iter().map(|(service, addr)| format!("{{service=\"{service}\",address=\"http://{addr}\"}}")).collect();
    format!("[{}]", listed.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_one_inline_table_each() {
        let admins = [("gateway", "127.0.0.1:9464".parse().unwrap()), ("cache", "127.0.0.1:9466".parse().unwrap())];
        assert_eq!(
            sources(&admins),
            r#"[{service="gateway",address="http://127.0.0.1:9464"},{service="cache",address="http://127.0.0.1:9466"}]"#
        );
    }
}

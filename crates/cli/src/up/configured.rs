//! What the operator configured for `up`'s services, read the way the services read it: a key of a
//! section of the config file (`--config`, `LLMESH_CONFIG`), overridden by its environment variable
//! (`LLMESH_<SECTION>_<KEY>`, `__` for nesting).
//!
//! `up` sets some settings of its own (the addresses the services find each other at, the admin
//! listeners, the sim as the default model) through the environment, which would override the
//! file. It asks here first and leaves alone what the operator set; and its banner tells where
//! each store is from what is set here.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::Service;

#[derive(Debug, Default)]
pub struct Configured {
    /// The config file, absolute (the children may run elsewhere), and what it holds.
    file: Option<(PathBuf, toml_edit::DocumentMut)>,
}

impl Configured {
    /// Reads `path` (an error names it when it is missing or not TOML).
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else { return Ok(Self::default()) };
        let absolute = path.canonicalize().with_context(|| format!("--config {}: no such file", path.display()))?;
        let text = std::fs::read_to_string(&absolute).with_context(|| format!("cannot read {}", absolute.display()))?;
        let document = text.parse().with_context(|| format!("{} is not TOML", absolute.display()))?;
        Ok(Self { file: Some((absolute, document)) })
    }

    /// The config file, absolute, when there is one.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_ref().map(|(path, _)| path.as_path())
    }

    /// Whether the environment or the file sets `service`'s `path` (`["admin", "listen"]`).
    pub fn sets(&self, service: Service, path: &[&str]) -> bool {
        self.get(service, path).is_some()
    }

    /// `service`'s `path` as the environment, else the file, sets it (strings unquoted, other
    /// values as TOML writes them).
    pub fn get(&self, service: Service, path: &[&str]) -> Option<String> {
        self.get_with(service, path, |name| std::env::var(name).ok())
    }

    fn get_with(&self, service: Service, path: &[&str], env: impl Fn(&str) -> Option<String>) -> Option<String> {
        if let Some(value) = env(&env_name(service, path)) {
            return Some(value);
        }
        let (_, document) = self.file.as_ref()?;
        let item = path.iter().try_fold(document.get(service.name())?, |item, key| item.get(key))?;
        match item.as_str() {
            Some(text) => Some(text.to_string()),
            None => item.as_value().map(|value| value.to_string().trim().to_string()),
        }
    }
}

/// `gateway`, `["rate_limit", "redis_url"]` -> `LLMESH_GATEWAY_RATE_LIMIT__REDIS_URL`.
pub fn env_name(service: Service, path: &[&str]) -> String {
    format!("{}{}", llmesh_common::config::env_prefix(service.name()), path.join("__").to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.toml");
        std::fs::write(
            &path,
            "[gateway]\ndefault_model = \"gpt-4o-mini\"\nrate_limit.redis_url = \"redis://a/\"\n\
             [generation]\nfault_models = false\n[cache.admin]\nlisten = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        let configured = Configured::load(Some(&path)).unwrap();
        let none = |_: &str| None;
        assert_eq!(configured.get_with(Service::Gateway, &["default_model"], none).as_deref(), Some("gpt-4o-mini"));
        assert_eq!(
            configured.get_with(Service::Gateway, &["rate_limit", "redis_url"], none).as_deref(),
            Some("redis://a/")
        );
        assert_eq!(configured.get_with(Service::Generation, &["fault_models"], none).as_deref(), Some("false"));
        assert_eq!(configured.get_with(Service::Cache, &["admin", "listen"], none).as_deref(), Some("127.0.0.1:9000"));
        assert_eq!(configured.get_with(Service::Health, &["admin", "listen"], none), None);
        let env = |name: &str| (name == "LLMESH_GATEWAY_RATE_LIMIT__REDIS_URL").then(|| "redis://b/".to_string());
        assert_eq!(
            configured.get_with(Service::Gateway, &["rate_limit", "redis_url"], env).as_deref(),
            Some("redis://b/")
        );
        assert_eq!(configured.file(), Some(path.canonicalize().unwrap().as_path()));
    }

    #[test]
    fn a_missing_or_broken_file_is_named() {
        let error = Configured::load(Some(Path::new("/nonexistent/mesh.toml"))).unwrap_err();
        assert!(format!("{error:#}").contains("/nonexistent/mesh.toml"), "{error:#}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.toml");
        std::fs::write(&path, "[gateway\n").unwrap();
        let error = Configured::load(Some(&path)).unwrap_err();
        assert!(format!("{error:#}").contains("broken.toml"), "{error:#}");
    }

    #[test]
    fn environment_names_nest_with_double_underscores() {
        assert_eq!(
            env_name(Service::Generation, &["rate_limit", "redis_url"]),
            "LLMESH_GENERATION_RATE_LIMIT__REDIS_URL"
        );
        assert_eq!(env_name(Service::Cache, &["redis_url"]), "LLMESH_CACHE_REDIS_URL");
    }
}

//! Configuration in layers: built-in defaults, then one section of a TOML file, then environment.
//!
//! One file can configure the whole mesh: each service reads its own section (`[gateway]`,
//! `[generation]`, `[cache]`, `[health]`). Environment variables are scoped the same way:
//! `LLMESH_GATEWAY_LISTEN`, `LLMESH_CACHE_REDIS_URL`, and `__` for nesting
//! (`LLMESH_GATEWAY_LIMITS__MAX_TOKENS`). Errors name the offending key as the operator wrote it:
//! `gateway.limits.max_token` in the file, `LLMESH_GATEWAY_LIMITS__MAX_TOKEN` in the environment
//! (figment's own words would be `default.limits.max_token`, its profile for a section).

use std::{net::SocketAddr, path::PathBuf};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Serialize, de::DeserializeOwned};

/// A service's configuration: its section of the mesh file, and where it listens.
pub trait ServiceConfig: Serialize + DeserializeOwned + Default {
    /// `gateway`, `generation`, ...: the file's section and the `LLMESH_<SECTION>_` prefix.
    const SECTION: &'static str;

    fn listen(&self) -> SocketAddr;

    /// What loading cannot tell: whether the configuration can run (a model's provider can be
    /// built, its key file read). Checked by `--check-config`; a real start finds the same errors
    /// as it builds the service.
    fn check(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// `[<service>.admin]`: the HTTP listener for `/metrics`, `/healthz` and `/debug/pprof/profile`.
/// Off unless `listen` is set. On a loopback address (`127.0.0.1:9464`) it needs nothing else;
/// anywhere else (`0.0.0.0:9464`, for a Prometheus in another container) it must be protected, by
/// `bearer_token_file`, `tls` or both, or the service does not start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    /// A file holding a token; every request must then carry `Authorization: Bearer <token>`.
    /// Re-read when it changes.
    pub bearer_token_file: Option<PathBuf>,
    /// Serve over TLS with the service's `[<service>.tls]`: its certificate, and its client CA
    /// when set (a scraper then needs a mesh client certificate).
    pub tls: bool,
}

impl AdminConfig {
    /// Why this listener may not start as configured, if it may not.
    pub fn check(&self) -> Result<(), String> {
        match self.listen {
            Some(addr) if !addr.ip().is_loopback() && self.bearer_token_file.is_none() && !self.tls => Err(format!(
                "admin.listen {addr} is reachable from other hosts: set admin.bearer_token_file, admin.tls, or \
                 both (or listen on 127.0.0.1)"
            )),
            _ => Ok(()),
        }
    }
}

/// Command-line arguments every service binary accepts.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServiceArgs {
    /// TOML file with a section per service (`[gateway]`, `[generation]`, `[cache]`, `[health]`).
    #[arg(long, env = "LLMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port (the chosen address is logged).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Load and check the configuration, then exit (0 when it is valid).
    #[arg(long)]
    pub check_config: bool,
}

/// Loads the `section` of the configuration over `T::default()`, then the file, then the environment,
/// then `--listen` (as the `listen` key).
pub fn load<T>(section: &str, args: &ServiceArgs) -> Result<T, Box<figment::Error>>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = &args.config {
        figment = figment.merge(Figment::from(Toml::file_exact(path)).focus(section));
    }
    figment = figment.merge(Env::prefixed(&env_prefix(section)).split("__"));
    if let Some(listen) = args.listen {
        figment = figment.merge(Serialized::default("listen", listen.to_string()));
    }
    figment.extract().map_err(|error| Box::new(name_keys(error, section)))
}

/// `error` (each error of its chain) with the key named in `section` (`gateway.bogus_key`), or
/// as its environment variable (`LLMESH_GATEWAY_BOGUS_KEY`), instead of under figment's profile.
fn name_keys(error: figment::Error, section: &str) -> figment::Error {
    let prefix = env_prefix(section);
    let renamed = error.into_iter().map(|mut error| {
        error.metadata = error.metadata.take().map(|metadata| {
            if metadata.name.contains("environment variable") {
                let prefix = prefix.clone();
                metadata.interpolater(move |_: &figment::Profile, keys: &[&str]| {
                    format!("{prefix}{}", keys.join("__").to_ascii_uppercase())
                })
            } else {
                let section = section.to_string();
                metadata.interpolater(move |_: &figment::Profile, keys: &[&str]| {
                    std::iter::once(section.as_str()).chain(keys.iter().copied()).collect::<Vec<_>>().join(".")
                })
            }
        });
        error
    });
    // `a.chain(b)` is `b` followed by `a`: rebuild from the last.
    let mut errors: Vec<figment::Error> = renamed.collect();
    let Some(mut chain) = errors.pop() else {
        return figment::Error::from(String::from("invalid configuration"));
    };
    while let Some(error) = errors.pop() {
        chain = chain.chain(error);
    }
    chain
}

/// `gateway` -> `LLMESH_GATEWAY_`.
pub fn env_prefix(section: &str) -> String {
    format!("LLMESH_{}_", section.to_ascii_uppercase())
}

#[cfg(test)]
// figment::Jail's closures return figment::Error, which is large; fine in tests.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        listen: SocketAddr,
        limits: Limits,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Limits {
        max_tokens: u32,
    }

    impl Default for Demo {
        fn default() -> Self {
            Self { listen: ([127, 0, 0, 1], 1).into(), limits: Limits::default() }
        }
    }

    impl Default for Limits {
        fn default() -> Self {
            Self { max_tokens: 10 }
        }
    }

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("mesh.toml", "[demo]\nlisten = \"127.0.0.1:2\"\n[demo.limits]\nmax_tokens = 20\n")?;
            let mut args = ServiceArgs { config: Some("mesh.toml".into()), listen: None, check_config: false };
            let cfg: Demo = load("demo", &args).map_err(|e| e.to_string())?;
            assert_eq!(cfg.listen.port(), 2);
            assert_eq!(cfg.limits.max_tokens, 20);

            jail.set_env("LLMESH_DEMO_LIMITS__MAX_TOKENS", "30");
            let cfg: Demo = load("demo", &args).map_err(|e| e.to_string())?;
            assert_eq!(cfg.limits.max_tokens, 30);

            args.listen = Some(([127, 0, 0, 1], 3).into());
            let cfg: Demo = load("demo", &args).map_err(|e| e.to_string())?;
            assert_eq!(cfg.listen.port(), 3);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LLMESH_DEMO_LIMITS__MAX_TOKEN", "30");
            let err = load::<Demo>("demo", &ServiceArgs::default()).err().map(|e| e.to_string());
            let err = err.unwrap_or_default();
            assert!(err.contains("LLMESH_DEMO_LIMITS__MAX_TOKEN"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn keys_in_the_file_are_named_by_their_section() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("mesh.toml", "[demo]\nbogus_key = 1\n[demo.limits]\nmax_tokens = \"many\"\n")?;
            let args = ServiceArgs { config: Some("mesh.toml".into()), listen: None, check_config: false };
            let err = load::<Demo>("demo", &args).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("\"demo.bogus_key\""), "{err}");
            assert!(!err.contains("default."), "figment's profile: {err}");
            jail.create_file("mesh.toml", "[demo.limits]\nmax_tokens = \"many\"\n")?;
            let err = load::<Demo>("demo", &args).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("\"demo.limits.max_tokens\""), "{err}");
            Ok(())
        });
    }

    #[test]
    fn an_exposed_admin_listener_needs_protection() {
        let admin = |listen: &str, token: bool, tls: bool| AdminConfig {
            listen: Some(listen.parse().unwrap()),
            bearer_token_file: token.then(|| "token".into()),
            tls,
        };
        assert!(AdminConfig::default().check().is_ok());
        assert!(admin("127.0.0.1:9464", false, false).check().is_ok());
        assert!(admin("[::1]:9464", false, false).check().is_ok());
        let error = admin("0.0.0.0:9464", false, false).check().unwrap_err();
        assert!(error.contains("0.0.0.0:9464") && error.contains("bearer_token_file"), "{error}");
        assert!(admin("0.0.0.0:9464", true, false).check().is_ok());
        assert!(admin("10.0.0.1:9464", false, true).check().is_ok());
    }

    #[test]
    fn missing_file_is_an_error() {
        let args = ServiceArgs { config: Some("/nonexistent/llmesh.toml".into()), listen: None, check_config: false };
        assert!(load::<Demo>("demo", &args).is_err());
    }
}

//! `llmesh up --tls DIR`: the files of `llmesh certs new --out DIR`, and the settings that give
//! each service its part of them.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use llmesh_common::tls::ClientTlsConfig;

use crate::Service;

/// The certificates of `llmesh certs new --out DIR`, by absolute path.
#[derive(Debug, Clone)]
pub struct TlsDir(PathBuf);

impl TlsDir {
    /// The directory, once every file a mesh needs is there (an error names the first missing).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let dir = dir.canonicalize().with_context(|| format!("--tls {}: no such directory", dir.display()))?;
        let tls = Self(dir);
        let mut needed = vec!["ca.pem".to_string(), "client.pem".to_string(), "client-key.pem".to_string()];
        for service in crate::certs::SERVICES {
            needed.push(format!("{service}.pem"));
            needed.push(format!("{service}-key.pem"));
        }
        for name in needed {
            let path = tls.file(&name);
            if !path.is_file() {
                bail!(
                    "{} is missing (make the files with `llmesh certs new --out {}`)",
                    path.display(),
                    tls.0.display()
                );
            }
        }
        Ok(tls)
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn shown(&self, name: &str) -> String {
        self.file(name).display().to_string()
    }

    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig {
            ca: Some(self.file("ca.pem")),
            cert: Some(self.file("client.pem")),
            key: Some(self.file("client-key.pem")),
            server_name: None,
        }
    }

    /// The environment that gives `service` its certificate (and the client CA it requires, and
    /// its client certificate, as its role says).
    pub fn env(&self, service: Service) -> Vec<(String, String)> {
        let prefix = format!("LLMESH_{}_", service.name().to_ascii_uppercase());
        let mut env = vec![
            (format!("{prefix}TLS__CERT"), self.shown(&format!("{}.pem", service.name()))),
            (format!("{prefix}TLS__KEY"), self.shown(&format!("{}-key.pem", service.name()))),
        ];
        // The gateway's port is public: its callers have API keys, not certificates.
        if service != Service::Gateway {
            env.push((format!("{prefix}TLS__CLIENT_CA"), self.shown("ca.pem")));
        }
        // The gateway and health call the other services.
        if matches!(service, Service::Gateway | Service::Health) {
            env.push((format!("{prefix}CLIENT_TLS__CA"), self.shown("ca.pem")));
            env.push((format!("{prefix}CLIENT_TLS__CERT"), self.shown("client.pem")));
            env.push((format!("{prefix}CLIENT_TLS__KEY"), self.shown("client-key.pem")));
        }
        env
    }
}

//! TLS on every port and mTLS inside the mesh, with rustls (aws-lc-rs, the tree's one provider).
//!
//! Two settings per service, each off unless configured:
//!
//! - `[<service>.tls]` ([`TlsConfig`]): the service's own port. `cert` and `key` turn TLS on;
//!   `client_ca` also requires every client to present a certificate signed by that CA (mTLS),
//!   refused at the handshake otherwise. Internal services (generation, the cache, health's API)
//!   set it; the gateway's public port normally does not (its callers have API keys instead).
//! - `[<service>.client_tls]` ([`ClientTlsConfig`]): the calls a service makes to the rest of the
//!   mesh (the gateway to generation and the cache, health to everything). `ca` turns it on and is
//!   what servers' certificates must chain to; `cert` and `key` are the certificate presented.
//!   With it on, **every** mesh call of the process is TLS, whatever the endpoint's scheme says
//!   (replicas found through DNS are bare addresses): there is no plaintext fallback to fall back
//!   to. An `https://` endpoint without it is an error.
//!
//! **Files are re-read when they change** ([`crate::reload`]): a new connection gets the new
//! certificate, CA or key; connections already open (and their calls) keep the session they have.
//! The server side is therefore terminated here, with tokio-rustls on each accepted connection
//! ([`incoming`]), and the TLS streams handed to tonic: tonic's `ServerTlsConfig` is built once and
//! cannot change. The client side connects through [`Connector`] for the same reason.
//!
//! **Fail closed.** A configured file that is missing, unreadable, holds no certificate or key, or a
//! key that does not match its certificate stops start-up with an error naming the file. A broken
//! replacement later keeps the files in use (and is logged, counted and alerted on).
//!
//! Names: a server's certificate is checked against the endpoint's host (an IP address against
//! its IP SANs). Replicas found through DNS are addresses whose IPs no certificate names; there
//! `client_tls.server_name` is the name checked instead, for IP-address endpoints only.

mod connector;
mod incoming;

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context as _, anyhow, bail};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};
use serde::{Deserialize, Serialize};

pub use connector::Connector;
pub use incoming::incoming;

use crate::reload::{self, Live};

/// ALPN of a gRPC port.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of HTTP/1.1 (the gateway's HTTP routes, the admin listener).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// `[<service>.tls]`: TLS on the service's own port. Off unless `cert` is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the service's own certificate first.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// PEM CA certificates; when set, a client must present a certificate one of them signed.
    pub client_ca: Option<PathBuf>,
    /// A plaintext port that answers `grpc.health.v1` only (the port's statuses, nothing else), for
    /// probes that cannot speak TLS: Kubernetes' native gRPC probes. Off unless set.
    pub health_listen: Option<std::net::SocketAddr>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.client_ca.is_some()
    }

    pub fn requires_client_certificates(&self) -> bool {
        self.client_ca.is_some()
    }

    /// The files, checked for completeness; `None` when TLS is off.
    fn files(&self) -> anyhow::Result<Option<(PathBuf, PathBuf, Option<PathBuf>)>> {
        match (&self.cert, &self.key) {
            (None, None) if self.client_ca.is_none() => Ok(None),
            (Some(cert), Some(key)) => Ok(Some((cert.clone(), key.clone(), self.client_ca.clone()))),
            (Some(_), None) => bail!("tls.cert is set but tls.key is not"),
            (None, Some(_)) => bail!("tls.key is set but tls.cert is not"),
            (None, None) => bail!("tls.client_ca is set but tls.cert and tls.key are not: mTLS needs TLS"),
        }
    }
}

/// `[<service>.client_tls]`: how the service calls the rest of the mesh. Off unless `ca` is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// PEM CA certificates the servers' certificates must chain to.
    pub ca: Option<PathBuf>,
    /// PEM certificate chain presented to servers that require one (mTLS).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// The name checked in a server's certificate when the endpoint is an IP address (replicas
    /// found through DNS); unset, the IP itself must be in the certificate.
    pub server_name: Option<String>,
}

impl ClientTlsConfig {
    pub fn enabled(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// A server's TLS settings, kept up to date with their files.
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Live<rustls::ServerConfig>,
    mutual: bool,
}

impl ServerTls {
    /// The TLS of `config` offering `alpn` (most preferred first), or `None` when it is off.
    /// Reads every file now: an error names the file.
    pub fn load(config: &TlsConfig, alpn: &[&[u8]]) -> anyhow::Result<Option<Self>> {
        let Some((cert, key, client_ca)) = config.files()? else { return Ok(None) };
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        let mut paths = vec![cert.clone(), key.clone()];
        paths.extend(client_ca.clone());
        let mutual = client_ca.is_some();
        let live = reload::watch("tls", paths, move || server_config(&cert, &key, client_ca.as_ref(), &alpn))?;
        Ok(Some(Self { config: live, mutual }))
    }

    /// The settings for the next connection.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.config.current()
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.mutual
    }
}

/// A client's TLS settings for mesh calls, kept up to date with their files.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Live<rustls::ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl ClientTls {
    /// The client TLS of `config`, or `None` when it is off. Reads every file now.
    pub fn load(config: &ClientTlsConfig) -> anyhow::Result<Option<Self>> {
        if !config.enabled() {
            return Ok(None);
        }
        let ca = config.ca.clone().ok_or_else(|| {
            anyhow!("client_tls.cert or client_tls.key is set but client_tls.ca is not: name the mesh CA")
        })?;
        let identity = match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            (Some(_), None) => bail!("client_tls.cert is set but client_tls.key is not"),
            (None, Some(_)) => bail!("client_tls.key is set but client_tls.cert is not"),
        };
        let server_name = match &config.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|_| anyhow!("client_tls.server_name {name:?} is not a DNS name"))?,
            ),
            None => None,
        };
        let mut paths = vec![ca.clone()];
        if let Some((cert, key)) = &identity {
            paths.extend([cert.clone(), key.clone()]);
        }
        let live = reload::watch("client_tls", paths, move || client_config(&ca, identity.as_ref()))?;
        Ok(Some(Self { config: live, server_name }))
    }

    /// The settings for the next connection.
    pub fn current(&self) -> Arc<rustls::ClientConfig> {
        self.config.current()
    }

    /// The name to check in the certificate of the server at `host` (a DNS name, or an IP address
    /// with or without brackets).
    pub fn server_name(&self, host: &str) -> anyhow::Result<ServerName<'static>> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
            return Ok(self.server_name.clone().unwrap_or_else(|| ServerName::IpAddress(ip.into())));
        }
        ServerName::try_from(bare.to_owned()).map_err(|_| anyhow!("{host:?} is not a host name a certificate can name"))
    }
}

/// The crypto every TLS configuration here uses: aws-lc-rs, the provider reqwest uses too.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn server_config(
    cert: &PathBuf,
    key: &PathBuf,
    client_ca: Option<&PathBuf>,
    alpn: &[Vec<u8>],
) -> anyhow::Result<rustls::ServerConfig> {
    let chain = read_certificates(cert, "certificate")?;
    let private_key = read_key(key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        Some(path) => {
            let roots = Arc::new(read_roots(path)?);
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .with_context(|| format!("client CA {}: cannot verify clients with it", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, private_key).with_context(|| {
        format!("certificate {} and key {} do not make a usable pair", cert.display(), key.display())
    })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

fn client_config(ca: &PathBuf, identity: Option<&(PathBuf, PathBuf)>) -> anyhow::Result<rustls::ClientConfig> {
    let roots = read_roots(ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => {
            let chain = read_certificates(cert, "client certificate")?;
            builder.with_client_auth_cert(chain, read_key(key)?).with_context(|| {
                format!("client certificate {} and key {} do not make a usable pair", cert.display(), key.display())
            })?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Every certificate in the PEM file at `path`, at least one.
pub fn read_certificates(path: &PathBuf, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {what} file {}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what} file {} is not valid PEM", path.display()))?;
    if certificates.is_empty() {
        bail!("{what} file {} holds no PEM certificate", path.display());
    }
    Ok(certificates)
}

/// The private key in the PEM file at `path`.
pub fn read_key(path: &PathBuf) -> anyhow::Result<PrivateKeyDer<'static>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .with_context(|| format!("key file {} holds no PEM private key", path.display()))
}

/// The CA certificates in the PEM file at `path`, each usable as a trust anchor.
fn read_roots(path: &PathBuf) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates(path, "CA")? {
        roots
            .add(certificate)
            .with_context(|| format!("CA file {} holds a certificate that is no CA", path.display()))?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests;

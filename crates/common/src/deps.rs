//! The way one service calls another: endpoints with the mesh's connection settings (and its TLS),
//! and start-up checks of the services a service depends on. A dependency that does not answer
//! SERVING within the time allowed is an error naming it, so the process exits instead of hanging.
//!
//! **Mesh TLS is per process.** [`use_client_tls`] (called by each service's `serve` with its
//! `[<service>.client_tls]`, and by `llmesh up`) sets how every later [`endpoint`] connects: with it
//! on, over TLS with the mesh's client certificate, whatever the endpoint's scheme; with it off,
//! plaintext, and an `https://` endpoint is an error rather than a silent downgrade. One process
//! has one mesh identity; the last call wins.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::tls::{ClientTls, ClientTlsConfig, Connector};

/// The client TLS of this process's mesh calls (none: plaintext).
static CLIENT_TLS: RwLock<Option<Arc<ClientTls>>> = RwLock::new(None);

/// Makes every later [`endpoint`] of this process connect as `config` says (plaintext when it is
/// off). Reads the files now; an error names the file.
pub fn use_client_tls(config: &ClientTlsConfig) -> anyhow::Result<()> {
    let tls = ClientTls::load(config)?.map(Arc::new);
    if tls.is_some() {
        tracing::info!(mutual = config.cert.is_some(), "mesh calls use TLS");
    }
    *CLIENT_TLS.write().map_err(|_| anyhow!("the client TLS setting is poisoned"))? = tls;
    Ok(())
}

fn client_tls() -> Option<Arc<ClientTls>> {
    CLIENT_TLS.read().ok().and_then(|tls| tls.clone())
}

/// An endpoint of the mesh: tonic's [`Endpoint`] with the mesh's connection settings, and TLS when
/// the process uses it.
#[derive(Debug, Clone)]
pub struct MeshEndpoint {
    endpoint: Endpoint,
    tls: Option<Connector>,
}

impl MeshEndpoint {
    /// Connects now.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        match &self.tls {
            Some(connector) => self.endpoint.connect_with_connector(connector.clone()).await,
            None => self.endpoint.connect().await,
        }
    }

    /// A channel that connects on first use (and reconnects after failures).
    pub fn connect_lazy(&self) -> Channel {
        match &self.tls {
            Some(connector) => self.endpoint.connect_with_connector_lazy(connector.clone()),
            None => self.endpoint.connect_lazy(),
        }
    }

    /// Whether calls go over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// An endpoint with the mesh's connection settings: `http://host:port` or `https://host:port`.
pub fn endpoint(uri: &str, connect_timeout: Duration) -> anyhow::Result<MeshEndpoint> {
    let tls = client_tls();
    let https = uri.starts_with("https://");
    if https && tls.is_none() {
        bail!("{uri}: an https:// endpoint needs client TLS (client_tls.ca: the CA its certificate chains to)");
    }
    // With TLS the connector speaks it; tonic itself must only see a plain URI (it refuses
    // https:// without its own TLS).
    let plain = match (https, &tls) {
        (true, Some(_)) => format!("http://{}", &uri["https://".len()..]),
        _ => uri.to_string(),
    };
    let endpoint = Endpoint::from_shared(plain)
        .with_context(|| format!("invalid endpoint {uri:?}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    Ok(MeshEndpoint { endpoint, tls: tls.map(|tls| Connector::new((*tls).clone())) })
}

/// Waits until `service` at `uri` reports SERVING over `grpc.health.v1`, retrying until `within`.
pub async fn wait_serving(name: &str, uri: &str, service: &str, within: Duration) -> anyhow::Result<()> {
    let endpoint = endpoint(uri, within)?;
    let deadline = tokio::time::Instant::now() + within;
    let mut last_error = anyhow!("no attempt made");
    loop {
        match check(&endpoint, service).await {
            Ok(ServingStatus::Serving) => return Ok(()),
            Ok(status) => last_error = anyhow!("it reports {}", status.as_str_name()),
            Err(error) => last_error = error,
        }
        if tokio::time::Instant::now() + Duration::from_millis(100) >= deadline {
            return Err(last_error.context(format!("cannot reach {name} at {uri} within {} ms", within.as_millis())));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn check(endpoint: &MeshEndpoint, service: &str) -> anyhow::Result<ServingStatus> {
    let channel: Channel = endpoint.connect().await.context("connection failed")?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest { service: service.to_string() })
        .await
        .context("health check failed")?;
    Ok(response.into_inner().status())
}

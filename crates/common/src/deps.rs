//! Start-up checks of the services a service depends on. A dependency that does not answer
//! SERVING within the time allowed is an error naming it, so the process exits instead of hanging.

use std::time::Duration;

use anyhow::{Context as _, anyhow};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// An endpoint with the mesh's connection settings.
pub fn endpoint(uri: &str, connect_timeout: Duration) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(uri.to_string())
        .with_context(|| format!("invalid endpoint {uri:?}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true))
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

async fn check(endpoint: &Endpoint, service: &str) -> anyhow::Result<ServingStatus> {
    let channel: Channel = endpoint.connect().await.context("connection failed")?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest { service: service.to_string() })
        .await
        .context("health check failed")?;
    Ok(response.into_inner().status())
}

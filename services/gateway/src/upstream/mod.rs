//! The way from the gateway to generation, innermost layers first: replicas from static entries or
//! DNS ([`discovery`]), a breaker and a peak-EWMA latency estimate per replica ([`endpoint`]),
//! power-of-two-choices selection ([`pool`]), a per-try timeout, and retries within a budget
//! ([`retry`]) — never after a stream's first chunk.

mod breaker;
mod connect;
mod discovery;
mod endpoint;
mod ewma;
mod pool;
mod retry;

use std::{sync::Arc, time::Duration};

use llmesh_proto::{
    cache::v1::cache_client::CacheClient,
    generation::v1::{
        GenerateRequest, GenerateResponse, GenerateStreamRequest, GenerateStreamResponse, ListModelsRequest,
        ListModelsResponse,
    },
};
use tonic::{Code, Status, Streaming, transport::Channel};

pub use breaker::BreakerConfig;
pub use connect::connect;
pub use pool::{CIRCUIT_OPEN, REASON_KEY};
pub use retry::RetryConfig;

use crate::deadline::{Deadline, MARGIN};

/// A connection that broke under a call (a replica killed mid-call) reaches tonic's client as
/// UNKNOWN or CANCELLED ("operation was canceled") with the transport error as its source; a
/// status the server sent has no source. The former is the replica's trouble, as retryable as any
/// UNAVAILABLE (and not a cancellation by our own caller, which never reaches here).
fn normalize(status: Status) -> Status {
    let transport = std::error::Error::source(&status).is_some();
    if transport && matches!(status.code(), Code::Unknown | Code::Cancelled) {
        return Status::unavailable(format!("generation connection failed: {}", status.message()));
    }
    status
}

/// The timeout sent to generation: a little longer than the gateway's own timer, so the gateway's
/// DEADLINE_EXCEEDED (and its fallback) comes first, not tonic's CANCELLED from the callee.
fn callee_timeout(ours: Duration) -> Duration {
    ours + MARGIN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_connections_are_unavailable_server_statuses_are_kept() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let broken = Status::from_error(Box::new(io));
        assert_eq!(broken.code(), Code::Unknown);
        assert_eq!(normalize(broken).code(), Code::Unavailable);
        assert_eq!(normalize(Status::unknown("the server said so")).code(), Code::Unknown);
        assert_eq!(normalize(Status::cancelled("the server said so")).code(), Code::Cancelled);
        let mut canceled = Status::cancelled("operation was canceled");
        canceled.set_source(std::sync::Arc::new(std::io::Error::other("connection closed")));
        assert_eq!(normalize(canceled).code(), Code::Unavailable);
        assert_eq!(normalize(Status::invalid_argument("bad")).code(), Code::InvalidArgument);
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pool: Arc<pool::Pool>,
    retry: retry::Retry,
    per_try_timeout: Option<Duration>,
    pub cache: Option<CacheClient<Channel>>,
}

/// A stream whose first chunk has arrived: from here on it is never retried.
pub struct Started {
    pub first: GenerateStreamResponse,
    pub rest: Streaming<GenerateStreamResponse>,
}

impl Upstream {
    /// Each replica's address and breaker state, for health and metrics.
    pub fn replicas(&self) -> Vec<(String, &'static str)> {
        self.pool.snapshot().iter().map(|e| (e.addr.clone(), e.state().as_str())).collect()
    }

    fn try_timeout(&self, deadline: Deadline) -> Result<Duration, Status> {
        let remaining = deadline.remaining();
        if remaining.is_zero() {
            return Err(Status::deadline_exceeded("deadline exceeded before calling generation"));
        }
        Ok(self.per_try_timeout.map_or(remaining, |t| t.min(remaining)))
    }

    /// Calls `attempt` on a replica until it succeeds, fails for good, or retries run out.
    async fn with_retries<T, F, Fut>(
        &self,
        method: &'static str,
        deadline: Deadline,
        mut attempt: F,
    ) -> Result<T, Status>
    where
        F: FnMut(endpoint::Lease, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.retry.deposit();
        let mut tries = 0;
        loop {
            tries += 1;
            let per_try = self.try_timeout(deadline)?;
            let lease = self.pool.lease()?;
            let endpoint = lease.addr().to_string();
            let span = tracing::info_span!(
                "generation.attempt",
                otel.kind = "client",
                rpc.system = "grpc",
                rpc.method = method,
                server.address = %endpoint,
                attempt = tries,
            );
            let call = tracing::Instrument::instrument(tokio::time::timeout(per_try, attempt(lease, per_try)), span);
            let result = match call.await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded(format!("generation did not answer within {per_try:?}"))),
            };
            let status = match result {
                Ok(value) => return Ok(value),
                Err(status) => status,
            };
            match self.retry.next(method, tries, &status, deadline.remaining()) {
                Some(wait) => {
                    tracing::debug!(%endpoint, code = ?status.code(), tries, wait_ms = wait.as_millis() as u64, "retrying generation");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(status),
            }
        }
    }

    pub async fn generate(&self, request: &GenerateRequest, deadline: Deadline) -> Result<GenerateResponse, Status> {
        self.with_retries("Generate", deadline, |lease, per_try| async move {
            let mut call = tonic::Request::new(request.clone());
            call.set_timeout(callee_timeout(per_try));
            llmesh_telemetry::inject(&mut call);
            let result = lease.client().generate(call).await.map_err(normalize);
            lease.finish(result.as_ref().map_or_else(Status::code, |_| Code::Ok));
            result.map(tonic::Response::into_inner)
        })
        .await
    }

    /// Starts a stream and waits for its first chunk (retrying until then).
    pub async fn generate_stream(&self, request: &GenerateRequest, deadline: Deadline) -> Result<Started, Status> {
        self.with_retries("GenerateStream", deadline, |lease, per_try| async move {
            let mut call = tonic::Request::new(GenerateStreamRequest::from(request.clone()));
            call.set_timeout(callee_timeout(deadline.remaining()));
            llmesh_telemetry::inject(&mut call);
            let first = async {
                let mut rest = lease.client().generate_stream(call).await.map_err(normalize)?.into_inner();
                let first = rest
                    .message()
                    .await
                    .map_err(normalize)?
                    .ok_or_else(|| Status::unavailable("generation ended the stream before its first chunk"))?;
                Ok::<_, Status>(Started { first, rest })
            };
            let result = match tokio::time::timeout(per_try, first).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded(format!("no first chunk within {per_try:?}"))),
            };
            // The replica is judged by its time to first chunk.
            lease.finish(result.as_ref().map_or_else(Status::code, |_| Code::Ok));
            result
        })
        .await
    }

    pub async fn list_models(&self, deadline: Deadline) -> Result<ListModelsResponse, Status> {
        self.with_retries("ListModels", deadline, |lease, per_try| async move {
            let mut call = tonic::Request::new(ListModelsRequest {});
            call.set_timeout(callee_timeout(per_try));
            llmesh_telemetry::inject(&mut call);
            let result = lease.client().list_models(call).await.map_err(normalize);
            lease.finish(result.as_ref().map_or_else(Status::code, |_| Code::Ok));
            result.map(tonic::Response::into_inner)
        })
        .await
    }
}

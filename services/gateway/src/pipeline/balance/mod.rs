//! The innermost layer: pick a replica and make the call.
//!
//! Power of two choices over peak-EWMA cost ([`pool`], [`ewma`]) among the replicas discovery knows
//! ([`discovery`]: static addresses, or DNS names re-resolved so replicas come and go without a
//! restart), skipping those whose breakers refuse the call.
//!
//! Why not tower's `balance::p2c`: it balances over services that are ready, and readiness is per
//! endpoint, not per request, so it cannot skip a replica only for the model whose breaker is open
//! there, nor hand the attempt's slot (the [`Lease`]: calls in flight, breaker permits, the half-
//! open probe) to the breaker layer that charges the outcome — including a per-try timeout, which
//! drops this layer's future. Its `PeakEwma` also cannot count a fast 429 as slow. So the balancer
//! is ours; it keeps tower's algorithm (p2c, peak EWMA, cost = estimate × (in flight + 1)).
//!
//! The attempt is a plain tonic call: the request goes out with the attempt's deadline (plus a
//! little, so the gateway's own timer fires first) and the caller's trace context. A stream is
//! answered once its first chunk has arrived: the replica is judged by its time to first chunk,
//! and the rest of the stream is the client's.

mod connect;
mod discovery;
mod endpoint;
mod ewma;
mod pool;

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use llmesh_proto::generation::v1::{GenerateStreamRequest, ListModelsRequest, generation_client::GenerationClient};
use tonic::transport::Channel;
use tower::Service;
use tracing::Instrument as _;

pub use connect::connect;
pub use endpoint::{Endpoint, EndpointSettings, Lease};
pub use pool::Pool;

use super::{Ask, Attempt, Call, Reply, Started, UpstreamError};
use crate::deadline::{MARGIN, set_timeout};

/// The balancer over the replicas in `pool`.
#[derive(Debug, Clone)]
pub struct Balance {
    pool: Arc<Pool>,
}

impl Balance {
    pub fn new(pool: Arc<Pool>) -> Self {
        Self { pool }
    }
}

impl Service<Attempt> for Balance {
    type Response = Reply;
    type Error = UpstreamError;
    type Future = BoxFuture<'static, Result<Reply, UpstreamError>>;

    /// Always ready: which replica is chosen at call time, per request.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: Attempt) -> Self::Future {
        let call = &attempt.call;
        let lease = match self.pool.lease(call.ask.request()) {
            Ok(lease) => lease,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        let client = lease.client();
        let span = if llmesh_telemetry::in_a_span() {
            tracing::info_span!(
                "generation.attempt",
                otel.kind = "client",
                rpc.system = "grpc",
                rpc.method = call.ask.method(),
                server.address = %lease.addr(),
                attempt = call.attempt,
            )
        } else {
            tracing::Span::none()
        };
        attempt.picked(lease);
        Box::pin(self::attempt(client, attempt.call).instrument(span))
    }
}

/// One attempt on the chosen replica.
async fn attempt(mut client: GenerationClient<Channel>, call: Call) -> Result<Reply, UpstreamError> {
    let timeout = call.attempt_timeout + MARGIN;
    match call.ask {
        Ask::Generate(request) => {
            let mut outgoing = tonic::Request::new((*request).clone());
            set_timeout(&mut outgoing, timeout);
            llmesh_telemetry::inject(&mut outgoing);
            let response = client.generate(outgoing).await.map_err(UpstreamError::from_client)?;
            Ok(Reply::Generated(response.into_inner()))
        }
        Ask::Stream(request) => {
            let mut outgoing = tonic::Request::new(GenerateStreamRequest::from((*request).clone()));
            // The stream outlives the attempt (which ends at the first chunk): the callee's
            // deadline is the call's.
            set_timeout(&mut outgoing, call.deadline.remaining() + MARGIN);
            llmesh_telemetry::inject(&mut outgoing);
            let mut rest = client.generate_stream(outgoing).await.map_err(UpstreamError::from_client)?.into_inner();
            let first = rest.message().await.map_err(UpstreamError::from_client)?.ok_or_else(|| {
                UpstreamError::Transport(tonic::Status::unavailable(
                    "generation ended the stream before its first chunk",
                ))
            })?;
            Ok(Reply::Streaming(Started { first, rest: Box::pin(rest) }))
        }
        Ask::ListModels => {
            let mut outgoing = tonic::Request::new(ListModelsRequest {});
            set_timeout(&mut outgoing, timeout);
            llmesh_telemetry::inject(&mut outgoing);
            let response = client.list_models(outgoing).await.map_err(UpstreamError::from_client)?;
            Ok(Reply::Models(response.into_inner()))
        }
    }
}

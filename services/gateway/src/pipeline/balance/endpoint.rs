//! One generation replica: its connection, latency estimate, breakers and calls in flight.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use llmesh_proto::generation::v1::{GenerateRequest, generation_client::GenerationClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::ewma::PeakEwma;
use crate::pipeline::{
    UpstreamError,
    breaker::{BreakerConfig, Breakers, Permits},
};

#[derive(Debug)]
pub struct Endpoint {
    pub addr: String,
    client: GenerationClient<Channel>,
    ewma: PeakEwma,
    breakers: Breakers,
    in_flight: AtomicUsize,
    /// What a failed or rate-limited call costs in the latency estimate: a fast 429 must not make
    /// a replica look attractive.
    penalty: Duration,
}

/// Settings every endpoint shares.
#[derive(Debug, Clone)]
pub struct EndpointSettings {
    pub connect_timeout: Duration,
    pub ewma_decay: Duration,
    pub penalty: Duration,
    pub breaker: BreakerConfig,
}

impl Endpoint {
    pub fn new(addr: &str, settings: &EndpointSettings) -> anyhow::Result<Self> {
        let channel = llmesh_common::deps::endpoint(addr, settings.connect_timeout)?.connect_lazy();
        Ok(Self {
            addr: addr.to_string(),
            client: GenerationClient::new(channel),
            ewma: PeakEwma::new(Duration::from_millis(1), settings.ewma_decay),
            breakers: Breakers::new(&settings.breaker, addr),
            in_flight: AtomicUsize::new(0),
            penalty: settings.penalty,
        })
    }

    /// Latency estimate times the calls in flight plus one.
    pub fn cost(&self) -> f64 {
        self.ewma.estimate() * (self.in_flight.load(Ordering::Relaxed) + 1) as f64
    }

    pub fn breakers(&self) -> &Breakers {
        &self.breakers
    }

    /// Whether the breakers would let a call for `request`'s model (any call, without one) through.
    pub fn available(&self, request: Option<&GenerateRequest>) -> bool {
        self.breakers.available(request.map(|r| r.model.as_str()))
    }

    /// A call slot, or `None` when a breaker refuses.
    pub fn lease(self: &Arc<Self>, request: Option<&Arc<GenerateRequest>>) -> Option<Lease> {
        let permits = self.breakers.try_acquire(request.map(|r| r.model.as_str()))?;
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            endpoint: self.clone(),
            permits: Some(permits),
            request: request.cloned(),
            started: Instant::now(),
        })
    }
}

/// One attempt on one endpoint. [`Lease::finish`] reports how it went; dropping it unfinished (the
/// caller went away) counts for nothing.
#[derive(Debug)]
pub struct Lease {
    endpoint: Arc<Endpoint>,
    permits: Option<Permits>,
    /// What was asked (for the model's breaker); `None` for calls about no model.
    request: Option<Arc<GenerateRequest>>,
    started: Instant,
}

impl Lease {
    pub fn client(&self) -> GenerationClient<Channel> {
        self.endpoint.client.clone()
    }

    pub fn addr(&self) -> &str {
        &self.endpoint.addr
    }

    /// Feeds the latency estimate and charges the breakers with the attempt's outcome.
    pub fn finish(mut self, result: Result<(), &UpstreamError>) {
        let rtt = self.started.elapsed();
        let penalised = result.err().is_some_and(UpstreamError::penalised);
        self.endpoint.ewma.observe(if penalised { rtt.max(self.endpoint.penalty) } else { rtt });
        if let Some(permits) = self.permits.take() {
            let model = self.request.as_deref().map(|r| r.model.as_str());
            self.endpoint.breakers.record(permits, model, result);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(permits) = self.permits.take() {
            self.endpoint.breakers.release(permits);
        }
    }
}

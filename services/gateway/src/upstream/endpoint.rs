//! One generation replica: its connection, latency estimate, breaker and calls in flight.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use llmesh_proto::generation::v1::generation_client::GenerationClient;
use tokio::time::Instant;
use tonic::{Code, transport::Channel};

use crate::metrics::{label, metrics};

use super::{
    breaker::{self, Breaker, BreakerConfig, Permit, State},
    ewma::PeakEwma,
};

#[derive(Debug)]
pub struct Endpoint {
    pub addr: String,
    client: GenerationClient<Channel>,
    ewma: PeakEwma,
    breaker: Breaker,
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
            breaker: Breaker::new(settings.breaker.clone()),
            in_flight: AtomicUsize::new(0),
            penalty: settings.penalty,
        })
    }

    /// Latency estimate times the calls in flight plus one.
    pub fn cost(&self) -> f64 {
        self.ewma.estimate() * (self.in_flight.load(Ordering::Relaxed) + 1) as f64
    }

    pub fn available(&self) -> bool {
        self.breaker.available()
    }

    pub fn state(&self) -> State {
        self.breaker.state()
    }

    /// A call slot, or `None` when the breaker refuses.
    pub fn lease(self: &Arc<Self>) -> Option<Lease> {
        let permit = self.breaker.try_acquire()?;
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Lease { endpoint: self.clone(), permit: Some(permit), started: Instant::now() })
    }
}

/// One call on one endpoint. [`Lease::finish`] reports how it went; dropping it unfinished (the
/// caller went away) counts for nothing.
#[derive(Debug)]
pub struct Lease {
    endpoint: Arc<Endpoint>,
    permit: Option<Permit>,
    started: Instant,
}

impl Lease {
    pub fn client(&self) -> GenerationClient<Channel> {
        self.endpoint.client.clone()
    }

    pub fn addr(&self) -> &str {
        &self.endpoint.addr
    }

    /// Feeds the latency estimate and the breaker. `code` is `Code::Ok` on success.
    pub fn finish(mut self, code: Code) {
        let failed = breaker::is_failure(code);
        let rtt = self.started.elapsed();
        self.endpoint.ewma.observe(if failed { rtt.max(self.endpoint.penalty) } else { rtt });
        if let Some(permit) = self.permit.take()
            && let Some(state) = self.endpoint.breaker.record(permit, failed)
        {
            tracing::warn!(endpoint = %self.endpoint.addr, state = state.as_str(), "circuit breaker changed state");
            metrics()
                .breaker_transitions
                .add(1, &[label("endpoint", self.endpoint.addr.clone()), label("to", state.as_str())]);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(permit) = self.permit.take() {
            self.endpoint.breaker.release(permit);
        }
    }
}

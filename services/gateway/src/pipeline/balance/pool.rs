//! The generation replicas and how an attempt picks one: power of two choices over the endpoints
//! whose breakers let the call through, the lower peak-EWMA cost winning.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use llmesh_proto::generation::v1::GenerateRequest;

use super::endpoint::{Endpoint, EndpointSettings, Lease};
use crate::pipeline::UpstreamError;

#[derive(Debug)]
pub struct Pool {
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    settings: EndpointSettings,
}

impl Pool {
    pub fn new(settings: EndpointSettings) -> Self {
        Self { endpoints: RwLock::default(), settings }
    }

    /// Replaces the set of replicas. Endpoints still present keep their state (breakers, latency);
    /// new ones start fresh; gone ones are dropped once their calls end.
    pub fn set(&self, addrs: &[String]) {
        let current = self.snapshot();
        let mut by_addr: HashMap<&str, &Arc<Endpoint>> = current.iter().map(|e| (e.addr.as_str(), e)).collect();
        let mut next = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if let Some(existing) = by_addr.remove(addr.as_str()) {
                next.push(existing.clone());
            } else {
                match Endpoint::new(addr, &self.settings) {
                    Ok(endpoint) => {
                        tracing::info!(endpoint = %addr, "generation replica added");
                        next.push(Arc::new(endpoint));
                    }
                    Err(error) => tracing::warn!(endpoint = %addr, "{error:#}"),
                }
            }
        }
        for gone in by_addr.keys() {
            tracing::info!(endpoint = %gone, "generation replica removed");
        }
        if let Ok(mut endpoints) = self.endpoints.write() {
            *endpoints = Arc::new(next);
        }
    }

    pub fn snapshot(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.read().map(|e| e.clone()).unwrap_or_default()
    }

    /// A call slot on the better of two random replicas whose breakers let `request` through.
    pub fn lease(&self, request: Option<&Arc<GenerateRequest>>) -> Result<Lease, UpstreamError> {
        let endpoints = self.snapshot();
        if endpoints.is_empty() {
            return Err(UpstreamError::NoReplica);
        }
        let asked = request.map(|r| &**r);
        let available: Vec<&Arc<Endpoint>> = endpoints.iter().filter(|e| e.available(asked)).collect();
        let (first, second) = match available.len() {
            0 => return Err(UpstreamError::CircuitOpen),
            1 => (available[0], None),
            n => {
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let (a, b) = (available[a], available[b]);
                if a.cost() <= b.cost() { (a, Some(b)) } else { (b, Some(a)) }
            }
        };
        // Both may refuse when another caller took the half-open probe in between.
        first.lease(request).or_else(|| second.and_then(|e| e.lease(request))).ok_or(UpstreamError::CircuitOpen)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Status;

    use super::*;
    use crate::pipeline::breaker::BreakerConfig;

    fn pool(addrs: &[&str]) -> Pool {
        let settings = EndpointSettings {
            connect_timeout: Duration::from_millis(100),
            ewma_decay: Duration::from_secs(10),
            penalty: Duration::from_secs(1),
            breaker: BreakerConfig { consecutive_failures: 2, recovery_ms: 60_000, ..BreakerConfig::default() },
        };
        let pool = Pool::new(settings);
        pool.set(&addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        pool
    }

    fn asking(model: &str) -> Arc<GenerateRequest> {
        Arc::new(GenerateRequest { model: model.into(), prompt: "hi".into(), ..Default::default() })
    }

    fn upstream_down() -> UpstreamError {
        let mut status = Status::unavailable("upstream down");
        status.metadata_mut().insert(llmesh_proto::failure::ORIGIN_KEY, "upstream".parse().unwrap());
        UpstreamError::from_client(status)
    }

    #[tokio::test(start_paused = true)]
    async fn prefers_the_faster_replica_and_avoids_a_rate_limited_one() {
        let pool = pool(&["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        let sim = asking("sim");
        // Replica 2 answers 429 quickly: penalised, not rewarded.
        let limited = UpstreamError::from_client(Status::resource_exhausted("429"));
        let lease = pool.snapshot()[1].lease(Some(&sim)).unwrap();
        lease.finish(Err(&limited));
        let lease = pool.snapshot()[0].lease(Some(&sim)).unwrap();
        tokio::time::advance(Duration::from_millis(20)).await;
        lease.finish(Ok(()));
        let mut picks = HashMap::new();
        for _ in 0..100 {
            let lease = pool.lease(Some(&sim)).unwrap();
            *picks.entry(lease.addr().to_string()).or_insert(0) += 1;
        }
        assert_eq!(picks.get("http://127.0.0.1:1"), Some(&100), "{picks:?}");
    }

    #[tokio::test]
    async fn a_dead_replica_is_skipped_and_every_breaker_open_fails_fast() {
        let pool = pool(&["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        let sim = asking("sim");
        let refused = UpstreamError::Transport(Status::unavailable("connection refused"));
        for _ in 0..2 {
            pool.snapshot()[0].lease(Some(&sim)).unwrap().finish(Err(&refused));
        }
        for _ in 0..20 {
            assert_eq!(pool.lease(Some(&sim)).unwrap().addr(), "http://127.0.0.1:2");
        }
        for _ in 0..2 {
            pool.snapshot()[1].lease(None).unwrap().finish(Err(&refused));
        }
        assert!(matches!(pool.lease(Some(&sim)), Err(UpstreamError::CircuitOpen)));
        assert!(matches!(pool.lease(None), Err(UpstreamError::CircuitOpen)));
    }

    #[tokio::test]
    async fn a_dead_upstream_for_one_model_leaves_the_others_alone() {
        let pool = pool(&["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        let (dead, fine) = (asking("sim-error"), asking("sim"));
        for _ in 0..10 {
            if let Ok(lease) = pool.lease(Some(&dead)) {
                lease.finish(Err(&upstream_down()));
            }
        }
        assert!(matches!(pool.lease(Some(&dead)), Err(UpstreamError::CircuitOpen)));
        for _ in 0..20 {
            pool.lease(Some(&fine)).expect("another model is unaffected").finish(Ok(()));
        }
        for endpoint in pool.snapshot().iter() {
            assert_eq!(endpoint.breakers().replica().state(), crate::pipeline::breaker::State::Closed);
            assert_eq!(endpoint.breakers().models().len(), 1);
        }
    }

    #[tokio::test]
    async fn set_keeps_existing_endpoints_and_drops_gone_ones() {
        let pool = pool(&["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        let kept = pool.snapshot()[1].clone();
        pool.set(&["http://127.0.0.1:2".to_string(), "http://127.0.0.1:3".to_string()]);
        let now = pool.snapshot();
        assert_eq!(
            now.iter().map(|e| e.addr.as_str()).collect::<Vec<_>>(),
            ["http://127.0.0.1:2", "http://127.0.0.1:3"]
        );
        assert!(Arc::ptr_eq(&now[0], &kept));
        assert!(matches!(Pool::new(pool.settings.clone()).lease(None), Err(UpstreamError::NoReplica)));
    }
}

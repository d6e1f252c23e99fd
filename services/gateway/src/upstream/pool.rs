//! The generation replicas and how a call picks one: power of two choices over the endpoints
//! whose breaker lets calls through, the lower peak-EWMA cost winning.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use tonic::Status;

use super::endpoint::{Endpoint, EndpointSettings, Lease};

/// Metadata a failure carries when no replica could be tried, so the fallback can say why.
pub const REASON_KEY: &str = "llmesh-failure-reason";
pub const CIRCUIT_OPEN: &str = "circuit_open";

#[derive(Debug)]
pub struct Pool {
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    settings: EndpointSettings,
}

impl Pool {
    pub fn new(settings: EndpointSettings) -> Self {
        Self { endpoints: RwLock::default(), settings }
    }

    /// Replaces the set of replicas. Endpoints still present keep their state (breaker, latency);
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

    /// A call slot on the better of two random available replicas.
    pub fn lease(&self) -> Result<Lease, Status> {
        let endpoints = self.snapshot();
        if endpoints.is_empty() {
            return Err(Status::unavailable("no generation replica is known"));
        }
        let available: Vec<&Arc<Endpoint>> = endpoints.iter().filter(|e| e.available()).collect();
        let (first, second) = match available.len() {
            0 => {
                let mut status = Status::unavailable("circuit open for every generation replica");
                if let Ok(value) = CIRCUIT_OPEN.parse() {
                    status.metadata_mut().insert(REASON_KEY, value);
                }
                return Err(status);
            }
            1 => (available[0], None),
            n => {
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let (a, b) = (available[a], available[b]);
                if a.cost() <= b.cost() { (a, Some(b)) } else { (b, Some(a)) }
            }
        };
        first
            .lease()
            .or_else(|| second.and_then(|e| e.lease()))
            .ok_or_else(|| Status::unavailable("generation replicas are recovering; try again"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::upstream::breaker::BreakerConfig;
    use tonic::Code;

    fn pool(addrs: &[&str]) -> Pool {
        let settings = EndpointSettings {
            connect_timeout: Duration::from_millis(100),
            ewma_decay: Duration::from_secs(10),
            penalty: Duration::from_secs(1),
            breaker: BreakerConfig { consecutive_failures: 2, recovery_ms: 1_000, ..BreakerConfig::default() },
        };
        let pool = Pool::new(settings);
        pool.set(&addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        pool
    }

    #[tokio::test(start_paused = true)]
    async fn prefers_the_faster_replica_and_avoids_a_rate_limited_one() {
        let pool = pool(&["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        // Replica 2 answers 429 quickly: penalised, not rewarded.
        for _ in 0..2 {
            let lease = pool.snapshot()[1].lease().unwrap();
            lease.finish(Code::ResourceExhausted);
        }
        let lease = pool.snapshot()[0].lease().unwrap();
        tokio::time::advance(Duration::from_millis(20)).await;
        lease.finish(Code::Ok);
        let mut picks = HashMap::new();
        for _ in 0..100 {
            let lease = pool.lease().unwrap();
            *picks.entry(lease.addr().to_string()).or_insert(0) += 1;
        }
        assert_eq!(picks.get("http://127.0.0.1:1"), Some(&100), "{picks:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn all_breakers_open_fails_fast_with_the_reason() {
        let pool = pool(&["http://127.0.0.1:1"]);
        for _ in 0..2 {
            pool.lease().unwrap().finish(Code::Unavailable);
        }
        let status = pool.lease().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.metadata().get(REASON_KEY).unwrap(), CIRCUIT_OPEN);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(pool.lease().is_ok(), "half-open after recovery");
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
    }
}

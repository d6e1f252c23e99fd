//! The gateway's view of generation, served as `llmesh.health.v1.MeshHealth`: one component per
//! replica with its circuit breaker's state, and one per model breaker a replica keeps (a model
//! whose upstream failed there), for the health service to show beside the others.
//!
//! The overall status follows the replicas: NOT_SERVING only when no replica's own breaker lets
//! calls through. An open model breaker makes it DEGRADED (that model is failing), never
//! NOT_SERVING: the other models are served.
//!
//! It is served on the public port, without an API key (the health service and probes ask it),
//! so a tenant may ask it too: where the replicas are is shown only to a call that presents the
//! operator's token (`authorization: Bearer`, the admin listener's `admin.bearer_token_file`).
//! Any other call gets the same components with their addresses left empty. A watch costs a
//! status a second, so at most [`MAX_WATCHES`] are open at once (RESOURCE_EXHAUSTED past that)
//! and each ends after [`WATCH_MAX`]: the watcher watches again.
//!
//! When any key or team has a spend budget, one more component, [`BUDGET_COMPONENT`], says how
//! the budgets are enforced: SERVING while they are shared through Redis with nothing waiting for
//! it, DEGRADED while each replica enforces its share alone (no Redis, Redis not answering, or
//! settlements and spend still to catch up with), which makes the whole DEGRADED too.

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use llmesh_proto::health::v1::{
    Component, ServingStatus, StatusRequest, StatusResponse, WatchRequest, WatchResponse,
    mesh_health_server::MeshHealth,
};
use llmesh_telemetry::BearerToken;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::{
    admission::Budgets,
    pipeline::{
        balance::Pool,
        breaker::{Breaker, State},
    },
};

/// The component name replicas are reported under.
pub const COMPONENT: &str = "generation-breaker";
/// The component name of a model's breaker on a replica.
pub const MODEL_COMPONENT: &str = "generation-model-breaker";
/// The component name of the spend budgets' store.
pub const BUDGET_COMPONENT: &str = "budget-store";

/// Most watches open at once on one gateway.
pub const MAX_WATCHES: usize = 64;
/// Longest one watch lasts.
pub const WATCH_MAX: Duration = Duration::from_secs(300);
/// The wait suggested to a watch refused for want of room.
const WATCH_RETRY_AFTER_MS: u64 = 1_000;

#[derive(Clone)]
pub struct Replicas {
    pool: Arc<Pool>,
    budgets: Arc<Budgets>,
    /// The operator's token: only a call presenting it sees the replicas' addresses. None
    /// configured: nobody does.
    operator: Option<BearerToken>,
    /// One permit per open watch.
    watches: Arc<Semaphore>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas").field("operator_token", &self.operator.is_some()).finish_non_exhaustive()
    }
}

fn serving(state: State) -> ServingStatus {
    match state {
        State::Closed => ServingStatus::Serving,
        State::HalfOpen => ServingStatus::Degraded,
        State::Open => ServingStatus::NotServing,
    }
}

fn component(name: &str, address: &str, breaker: &Breaker) -> Component {
    let state = breaker.state();
    let detail = match &breaker.scope().model {
        Some(model) => format!("model {model}: circuit breaker {}", state.as_str()),
        None => format!("circuit breaker {}", state.as_str()),
    };
    Component {
        name: name.into(),
        service: llmesh_proto::generation::v1::generation_server::SERVICE_NAME.into(),
        address: address.to_string(),
        status: serving(state).into(),
        detail,
        ..Default::default()
    }
}

impl Replicas {
    pub fn new(pool: Arc<Pool>, budgets: Arc<Budgets>, operator: Option<BearerToken>) -> Self {
        Self { pool, budgets, operator, watches: Arc::new(Semaphore::new(MAX_WATCHES)) }
    }

    fn status(&self) -> StatusResponse {
        let mut components = Vec::new();
        let mut models = Vec::new();
        for endpoint in self.pool.snapshot().iter() {
            components.push(component(COMPONENT, &endpoint.addr, endpoint.breakers().replica()));
            let mut breakers = endpoint.breakers().models();
            breakers.sort_by(|a, b| a.scope().model.cmp(&b.scope().model));
            models.extend(breakers.iter().map(|breaker| component(MODEL_COMPONENT, &endpoint.addr, breaker)));
        }
        let serving = components.iter().any(|c| c.status() == ServingStatus::Serving);
        if self.budgets.in_use() {
            let standing = self.budgets.standing();
            models.push(Component {
                name: BUDGET_COMPONENT.into(),
                service: "redis".into(),
                status: if standing.exact { ServingStatus::Serving } else { ServingStatus::Degraded }.into(),
                detail: standing.detail,
                ..Default::default()
            });
        }
        let all = components.iter().chain(&models).all(|c| c.status() == ServingStatus::Serving);
        let status = match (serving, all) {
            (_, true) => ServingStatus::Serving,
            (true, false) => ServingStatus::Degraded,
            (false, false) => ServingStatus::NotServing,
        };
        components.extend(models);
        StatusResponse { status: status.into(), components, checked_at_unix_ms: 0 }
    }

    /// Whether the call presents the operator's token.
    fn is_operator<T>(&self, request: &Request<T>) -> bool {
        let authorization = request.metadata().get("authorization").map(|value| value.as_bytes());
        self.operator.as_ref().is_some_and(|token| llmesh_telemetry::presents(token, authorization))
    }

    /// The status as the caller may see it.
    fn status_for(&self, operator: bool) -> StatusResponse {
        let mut status = self.status();
        if !operator {
            for component in &mut status.components {
                component.address.clear();
            }
        }
        status
    }
}

#[tonic::async_trait]
impl MeshHealth for Replicas {
    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.status_for(self.is_operator(&request))))
    }

    type WatchStream = futures::stream::BoxStream<'static, Result<WatchResponse, Status>>;

    /// The replicas now, then whenever a breaker changes (checked every second), for at most
    /// [`WATCH_MAX`].
    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let Ok(permit) = self.watches.clone().try_acquire_owned() else {
            let mut status = Status::resource_exhausted(format!(
                "MeshHealth/Watch: {MAX_WATCHES} watches are open on this gateway, the most it keeps; call Status, or watch again later"
            ));
            let wait = tonic::metadata::MetadataValue::from(WATCH_RETRY_AFTER_MS);
            status.metadata_mut().insert("retry-after-ms", wait.clone());
            status.metadata_mut().insert("grpc-retry-pushback-ms", wait);
            return Err(status);
        };
        let operator = self.is_operator(&request);
        let state = (self.clone(), None::<StatusResponse>, permit);
        let changes = futures::stream::unfold(state, move |(replicas, last, permit)| async move {
            loop {
                let now = replicas.status_for(operator);
                if last.as_ref() != Some(&now) {
                    return Some((Ok(WatchResponse { status: Some(now.clone()) }), (replicas, Some(now), permit)));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(Response::new(changes.take_until(tokio::time::sleep(WATCH_MAX)).boxed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        admission::BudgetConfig,
        pipeline::{balance::EndpointSettings, breaker::BreakerConfig},
    };

    fn replicas(operator: Option<&'static str>) -> Replicas {
        let settings = EndpointSettings {
            connect_timeout: Duration::from_millis(100),
            ewma_decay: Duration::from_secs(10),
            penalty: Duration::from_secs(1),
            breaker: BreakerConfig::default(),
        };
        let pool = Arc::new(Pool::new(settings));
        pool.set(&["http://10.1.2.3:50052".to_string()]);
        let budgets = Budgets::new(&BudgetConfig::default(), None, Duration::from_secs(1)).unwrap();
        let operator = operator.map(|token| Arc::new(move || Some(Arc::<str>::from(token))) as BearerToken);
        Replicas::new(pool, budgets, operator)
    }

    fn asking<T>(message: T, authorization: Option<&str>) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = authorization {
            request.metadata_mut().insert("authorization", value.parse().unwrap());
        }
        request
    }

    async fn address(replicas: &Replicas, authorization: Option<&str>) -> String {
        let status = MeshHealth::status(replicas, asking(StatusRequest {}, authorization)).await.unwrap().into_inner();
        assert_eq!(status.components.len(), 1, "{status:?}");
        status.components[0].address.clone()
    }

    #[tokio::test]
    async fn only_the_operator_sees_where_the_replicas_are() {
        let guarded = replicas(Some("secret"));
        assert_eq!(address(&guarded, Some("Bearer secret")).await, "http://10.1.2.3:50052");
        for other in [None, Some("Bearer guess"), Some("secret"), Some("Bearer secret2")] {
            assert_eq!(address(&guarded, other).await, "", "{other:?}");
        }
        // No token configured: nobody.
        assert_eq!(address(&replicas(None), Some("Bearer secret")).await, "");
        // Watches too.
        let mut watch = MeshHealth::watch(&guarded, asking(WatchRequest {}, None)).await.unwrap().into_inner();
        let first = watch.next().await.unwrap().unwrap().status.unwrap();
        assert_eq!(first.components[0].address, "");
    }

    #[tokio::test]
    async fn watches_are_bounded_in_number() {
        let replicas = replicas(None);
        let mut open = Vec::new();
        for _ in 0..MAX_WATCHES {
            open.push(MeshHealth::watch(&replicas, asking(WatchRequest {}, None)).await.unwrap());
        }
        let refused = MeshHealth::watch(&replicas, asking(WatchRequest {}, None)).await.err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
        assert!(refused.metadata().get("retry-after-ms").is_some());
        // One that ends makes room.
        open.pop();
        assert!(MeshHealth::watch(&replicas, asking(WatchRequest {}, None)).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_ends_after_its_limit() {
        let replicas = replicas(None);
        let watch = MeshHealth::watch(&replicas, asking(WatchRequest {}, None)).await.unwrap().into_inner();
        let started = tokio::time::Instant::now();
        let seen: Vec<_> = watch.collect().await;
        assert_eq!(seen.len(), 1, "the state, then no change");
        assert_eq!(started.elapsed(), WATCH_MAX);
    }
}

//! The gateway's view of generation, served as `llmesh.health.v1.MeshHealth`: one component per
//! replica with its circuit breaker's state, for the health service to show beside the others.

use std::time::Duration;

use futures::StreamExt as _;
use llmesh_proto::health::v1::{
    Component, ServingStatus, StatusRequest, StatusResponse, WatchRequest, WatchResponse,
    mesh_health_server::MeshHealth,
};
use tonic::{Request, Response, Status};

use crate::upstream::Upstream;

/// The component name replicas are reported under.
pub const COMPONENT: &str = "generation-breaker";

#[derive(Debug, Clone)]
pub struct Replicas(pub Upstream);

impl Replicas {
    fn status(&self) -> StatusResponse {
        let components: Vec<Component> = self
            .0
            .replicas()
            .into_iter()
            .map(|(address, breaker)| {
                let status = match breaker {
                    "closed" => ServingStatus::Serving,
                    "half_open" => ServingStatus::Degraded,
                    _ => ServingStatus::NotServing,
                };
                Component {
                    name: COMPONENT.into(),
                    service: "llmesh.generation.v1.Generation".into(),
                    address,
                    status: status.into(),
                    detail: format!("circuit breaker {breaker}"),
                    ..Default::default()
                }
            })
            .collect();
        let serving = components.iter().any(|c| c.status() == ServingStatus::Serving);
        let all = components.iter().all(|c| c.status() == ServingStatus::Serving);
        let status = match (serving, all) {
            (_, true) => ServingStatus::Serving,
            (true, false) => ServingStatus::Degraded,
            (false, false) => ServingStatus::NotServing,
        };
        StatusResponse { status: status.into(), components, checked_at_unix_ms: 0 }
    }
}

#[tonic::async_trait]
impl MeshHealth for Replicas {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.status()))
    }

    type WatchStream = futures::stream::BoxStream<'static, Result<WatchResponse, Status>>;

    /// The replicas now, then whenever a breaker changes (checked every second).
    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let replicas = self.clone();
        let changes = futures::stream::unfold((replicas, None::<StatusResponse>), |(replicas, last)| async move {
            loop {
                let now = replicas.status();
                if last.as_ref() != Some(&now) {
                    return Some((Ok(WatchResponse { status: Some(now.clone()) }), (replicas, Some(now))));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(Response::new(changes.boxed()))
    }
}

//! The `llmesh.health.v1.MeshHealth` gRPC service: the monitor's latest picture, once or as a
//! stream of changes.

use futures::StreamExt as _;
use llmesh_proto::health::v1::{
    StatusRequest, StatusResponse, WatchRequest, WatchResponse, mesh_health_server::MeshHealth,
};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
pub struct MeshHealthService {
    state: watch::Receiver<StatusResponse>,
}

impl MeshHealthService {
    pub fn new(state: watch::Receiver<StatusResponse>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl MeshHealth for MeshHealthService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.state.borrow().clone()))
    }

    type WatchStream = futures::stream::BoxStream<'static, Result<WatchResponse, Status>>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let changes = WatchStream::new(self.state.clone()).map(|status| Ok(WatchResponse { status: Some(status) }));
        Ok(Response::new(changes.boxed()))
    }
}

//! What the gateway knows of the models generation serves: refreshed from `ListModels` so the
//! cache can tell deterministic models (safe to cache at any temperature) from sampling ones.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use llmesh_proto::generation::v1::Model;

use crate::{deadline::Deadline, upstream::Upstream};

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: Arc<RwLock<HashMap<String, Model>>>,
}

impl Catalog {
    /// True when `model` is known to answer the same request the same way.
    pub fn deterministic(&self, model: &str) -> bool {
        self.models.read().is_ok_and(|models| models.get(model).is_some_and(|m| m.deterministic))
    }

    pub async fn refresh(&self, upstream: &Upstream) -> Result<(), tonic::Status> {
        let models = upstream.list_models(Deadline::after(Duration::from_secs(2))).await?.models;
        if let Ok(mut current) = self.models.write() {
            *current = models.into_iter().map(|m| (m.name.clone(), m)).collect();
        }
        Ok(())
    }

    /// Refreshes every `every` in the background, for as long as the process runs.
    pub fn keep_fresh(&self, upstream: Upstream, every: Duration) {
        let catalog = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                if let Err(status) = catalog.refresh(&upstream).await {
                    tracing::debug!(code = ?status.code(), "model catalog refresh failed; keeping the last one");
                }
            }
        });
    }
}

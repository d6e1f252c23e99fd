//! What the gateway knows of the models generation serves: refreshed from `ListModels` so the
//! cache can tell deterministic models (safe to cache at any temperature) from sampling ones, and
//! metrics can tell a model generation serves from a name a client made up.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use llmesh_proto::generation::v1::Model;

use crate::{
    deadline::Deadline,
    pipeline::{self, Ask, Call, Generation, Reply, UpstreamError},
    principal::Principal,
};

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: Arc<RwLock<HashMap<String, Model>>>,
}

impl Catalog {
    /// True when `model` is known to answer the same request the same way.
    pub fn deterministic(&self, model: &str) -> bool {
        self.models.read().is_ok_and(|models| models.get(model).is_some_and(|m| m.deterministic))
    }

    /// True when generation lists `model`.
    pub fn knows(&self, model: &str) -> bool {
        self.models.read().is_ok_and(|models| models.contains_key(model))
    }

    pub async fn refresh(&self, generation: &Generation) -> Result<(), UpstreamError> {
        let call = Call::new(Ask::ListModels, Deadline::after(Duration::from_secs(2)), Principal::anonymous());
        let Reply::Models(listed) = pipeline::ask(generation, call).await? else { return Ok(()) };
        if let Ok(mut current) = self.models.write() {
            *current = listed.models.into_iter().map(|m| (m.name.clone(), m)).collect();
        }
        Ok(())
    }

    /// Refreshes every `every` in the background, for as long as the process runs.
    pub fn keep_fresh(&self, generation: Generation, every: Duration) {
        let catalog = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                if let Err(error) = catalog.refresh(&generation).await {
                    tracing::debug!(%error, "model catalog refresh failed; keeping the last one");
                }
            }
        });
    }
}

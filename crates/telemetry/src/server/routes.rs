//! What the trace layer knows about the paths it sees, given by the server that builds it (the
//! telemetry crate knows no service).
//!
//! The layer runs before routing and before any auth, so a path is whatever a client sent.
//! [`Routes`] promises that only the methods the process serves name a span or a metric label:
//! every other path, whatever it is answered (UNIMPLEMENTED by the router, UNAUTHENTICATED by an
//! auth layer that refuses it first, ...), is recorded as the one value `unknown`. Exempt services
//! (probes, tooling) get neither span nor metrics.

use std::collections::HashMap;
use std::sync::Arc;

use opentelemetry::KeyValue;

/// The services exempt from tracing and the methods served; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    /// `/{service}/` of each exempt service.
    exempt: Vec<Box<str>>,
    /// `/{service}/{method}` of each served method, and its `endpoint` label (the method), built
    /// once here so that a call only clones it (a reference count), never formats or allocates it.
    served: HashMap<Box<str>, KeyValue>,
}

impl Routes {
    /// Nothing exempt and nothing served: every call is traced, as `unknown`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls to `service` (`grpc.health.v1.Health`) get no span and no metrics.
    pub fn exempt_service(mut self, service: &str) -> Self {
        self.exempt.push(format!("/{service}/").into_boxed_str());
        self
    }

    /// `service` (`llmesh.gateway.v1.Gateway`) is served with `methods` (`Generate`, ...): calls to
    /// them are named after them.
    pub fn serve<M: AsRef<str>>(mut self, service: &str, methods: impl IntoIterator<Item = M>) -> Self {
        for method in methods {
            let label = KeyValue::new("endpoint", Arc::<str>::from(method.as_ref()));
            self.served.insert(format!("/{service}/{}", method.as_ref()).into_boxed_str(), label);
        }
        self
    }

    /// Whether `path` belongs to an exempt service.
    pub fn is_exempt(&self, path: &str) -> bool {
        self.exempt.iter().any(|prefix| path.starts_with(&**prefix))
    }

    /// Whether `path` is a served method.
    pub fn is_served(&self, path: &str) -> bool {
        self.served.contains_key(path)
    }

    /// The `endpoint` label of a served method's calls; `None` for any other path.
    pub(crate) fn endpoint(&self, path: &str) -> Option<&KeyValue> {
        self.served.get(path)
    }
}

#[cfg(test)]
mod tests {
    use super::Routes;

    #[test]
    fn exempt_and_served_paths() {
        let routes = Routes::new()
            .exempt_service("grpc.health.v1.Health")
            .serve("llmesh.gateway.v1.Gateway", ["Generate", "GenerateStream"]);
        assert!(routes.is_exempt("/grpc.health.v1.Health/Check"));
        assert!(!routes.is_exempt("/grpc.health.v1.HealthX/Check"));
        assert!(!routes.is_exempt("/grpc.health.v1.Health"));
        assert!(routes.is_served("/llmesh.gateway.v1.Gateway/Generate"));
        assert!(routes.is_served("/llmesh.gateway.v1.Gateway/GenerateStream"));
        assert!(!routes.is_served("/llmesh.gateway.v1.Gateway/NoSuch"));
        assert!(!routes.is_served("/llmesh.gateway.v1.Gateway/Generate/"));
        assert!(!routes.is_served("/x.Y/Z"));
        assert!(!Routes::new().is_served("/llmesh.gateway.v1.Gateway/Generate"));
    }
}

//! Who a call is for: the [`Principal`] the auth layer puts into a request's extensions, read by
//! every later step (limits, budgets, the cache's scope, the models a key may use, the fallback).
//! A module of its own so that each of those steps can name it without depending on admission.

use std::sync::Arc;

pub use llmesh_keys::{BudgetLimit, CacheScope};

/// The caller of a request, as the auth layer found it. Cheap to clone (the strings are shared).
///
/// Handlers read it with `request.extensions().get::<Principal>()`; it is always there on the
/// gateway's own RPCs once [`AuthLayer`] is installed (health and reflection get none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's public name (`anonymous` when auth is off): rate-limit bucket, logs, metrics.
    pub id: Arc<str>,
    /// This key's own limit, overriding `[gateway.rate_limit]`; `Some(0)` means unlimited.
    pub requests_per_minute: Option<u32>,
    /// This key's own token limit, overriding `[gateway.rate_limit]`; `Some(0)` means unlimited.
    pub tokens_per_minute: Option<u32>,
    /// Models this key may use; empty means all.
    pub models: Arc<[String]>,
    /// This key's own bound on calls in flight, overriding `[gateway.shed]`; `Some(0)` means none.
    pub max_in_flight: Option<u32>,
    /// Whose cache this key's calls use.
    pub cache: CacheScope,
    /// The key's team, if any.
    pub team: Option<Arc<str>>,
    /// The key's own spend limit.
    pub budget: Option<BudgetLimit>,
    /// Its team's spend limit (shared with the team's other keys).
    pub team_budget: Option<BudgetLimit>,
}

impl Principal {
    /// The id of every caller when auth is off.
    pub const ANONYMOUS: &'static str = "anonymous";

    /// The caller when no keys are configured: no overrides, every model. Built once: each call
    /// of a gateway without keys takes a clone (reference counts, no allocation).
    pub fn anonymous() -> Self {
        static ANONYMOUS: std::sync::LazyLock<Principal> = std::sync::LazyLock::new(|| Principal {
            id: Principal::ANONYMOUS.into(),
            requests_per_minute: None,
            tokens_per_minute: None,
            models: Arc::new([]),
            max_in_flight: None,
            cache: CacheScope::Shared,
            team: None,
            budget: None,
            team_budget: None,
        });
        ANONYMOUS.clone()
    }

    /// The caller the auth layer put in a request's `extensions` (anonymous when auth is off).
    pub fn of(extensions: &http::Extensions) -> Self {
        extensions.get::<Principal>().cloned().unwrap_or_else(Principal::anonymous)
    }

    /// Whether any budget applies to this key's calls (its own, or its team's).
    pub fn has_budget(&self) -> bool {
        self.budget.is_some() || self.team_budget.is_some()
    }

    pub fn is_anonymous(&self) -> bool {
        &*self.id == Self::ANONYMOUS
    }

    /// Whether this key may use `model` (every model when the key lists none).
    pub fn allows(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|allowed| allowed == model)
    }
}

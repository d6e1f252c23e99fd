//! Admission of one generation call, once its request is decoded: the request is valid, the key
//! may use the model, and the key's tokens per minute cover the prompt plus `max_tokens`.
//!
//! The reservation is held by the call as [`Tokens`] and settled exactly once: with the usage the
//! call is charged for ([`Tokens::settle`]), or — when the call ends without settling (the client
//! went away) — with what the client received. Settling also counts the tokens and their cost for
//! the key, so unary calls, streams and every fallback are accounted in one place.

use std::{collections::BTreeMap, sync::Arc};

use llmesh_proto::{
    cache_key,
    common::v1::{CachePolicy, Usage},
    generation::v1::GenerateRequest,
    validate::{self, Limits},
};
use opentelemetry::KeyValue;
use serde::{Deserialize, Serialize};
use tonic::Status;

use super::{CacheScope, Held, Principal, Quota, RateLimiter};
use crate::{
    catalog::Catalog,
    metrics::{label, metrics},
};

/// What a model costs, in US dollars per million tokens (`[gateway.prices.MODEL]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Price {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

/// The model label of a model nobody configured or listed: metric labels come from known sets.
const OTHER_MODEL: &str = "other";

/// Admits generation calls; see the module docs.
#[derive(Debug, Clone)]
pub struct TokenAdmission {
    limits: Arc<Limits>,
    limiter: Arc<RateLimiter>,
    accounting: Arc<Accounting>,
}

/// An admitted call: who asked, what (shared: the pipeline keeps it for retries and fallbacks),
/// and the tokens it holds.
#[derive(Debug)]
pub struct Admitted {
    pub principal: Principal,
    pub request: Arc<GenerateRequest>,
    pub tokens: Tokens,
}

impl TokenAdmission {
    pub fn new(limits: Limits, limiter: Arc<RateLimiter>, prices: BTreeMap<String, Price>, catalog: Catalog) -> Self {
        let accounting = Arc::new(Accounting { prices, catalog, limiter: limiter.clone() });
        Self { limits: Arc::new(limits), limiter, accounting }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Validates `request` and admits it for the caller the auth layer put in `extensions`
    /// (anonymous when auth is off).
    pub async fn admit(&self, extensions: &http::Extensions, mut request: GenerateRequest) -> Result<Admitted, Status> {
        validate::generate_request(&request, &self.limits)?;
        validate::no_reserved_metadata(&request)?;
        let principal = extensions.get::<Principal>().cloned().unwrap_or_else(Principal::anonymous);
        if !principal.allows(&request.model) {
            return Err(Status::permission_denied(format!(
                "model: API key {} may not use {:?}",
                principal.id, request.model
            )));
        }
        scope_cache(&mut request, &principal)?;
        let prompt_tokens = validate::estimated_tokens(validate::prompt_bytes(&request));
        let max_tokens = validate::effective_max_tokens(&request, &self.limits);
        let held = self.limiter.hold_tokens(&principal, prompt_tokens.saturating_add(max_tokens)).await?;
        let tokens = Tokens { held, who: principal.clone(), accounting: self.accounting.clone() };
        Ok(Admitted { principal, request: Arc::new(request), tokens })
    }
}

/// Applies the key's cache scope to its request: a private key's entries are its own (a scope in
/// the cache key, see [`cache_key::SCOPE_METADATA_KEY`]); an `off` key's calls never touch the
/// cache (and so `ONLY_IF_CACHED` finds nothing).
fn scope_cache(request: &mut GenerateRequest, principal: &Principal) -> Result<(), Status> {
    match principal.cache {
        CacheScope::Shared => {}
        CacheScope::Private => {
            request.metadata.insert(cache_key::SCOPE_METADATA_KEY.to_string(), principal.id.to_string());
        }
        CacheScope::Off if request.cache == i32::from(CachePolicy::OnlyIfCached) => {
            return Err(Status::not_found(
                "cache: no cached answer for this request (policy ONLY_IF_CACHED; this key's answers are never cached)",
            ));
        }
        CacheScope::Off => request.cache = CachePolicy::Bypass.into(),
    }
    Ok(())
}

/// The tokens a call holds until it settles.
#[derive(Debug)]
pub struct Tokens {
    held: Held,
    who: Principal,
    accounting: Arc<Accounting>,
}

impl Tokens {
    /// What the key had left once the reservation was taken.
    pub fn quota(&self) -> Quota {
        self.held.quota()
    }

    /// Counts `tokens` more as received (streamed text, before the usage is known).
    pub fn received(&mut self, tokens: u32) {
        self.held.received(tokens);
    }

    /// The reservation itself, for a call whose tokens outlive it (a job: its worker settles them).
    pub fn into_held(self) -> Held {
        self.held
    }

    /// Settles with the usage the call is charged for (`None`: nothing — a cached answer, a
    /// fallback message, a failure), counts it for the key under `model`, and says what is left.
    pub fn settle(self, usage: Option<Usage>, model: &str) -> Quota {
        let Self { held, who, accounting } = self;
        let quota = held.settle(usage.map_or(0, |u| u.total_tokens));
        accounting.count(&who, model, usage, quota.remaining_tokens);
        quota
    }
}

/// Tokens and cost per key and model, and the share of its token limit a key has left.
#[derive(Debug)]
struct Accounting {
    prices: BTreeMap<String, Price>,
    catalog: Catalog,
    limiter: Arc<RateLimiter>,
}

impl Accounting {
    /// A model's label: its name when it is priced or generation lists it, else one shared value.
    fn model_label(&self, model: &str) -> String {
        if self.prices.contains_key(model) || self.catalog.knows(model) {
            model.to_string()
        } else {
            OTHER_MODEL.to_string()
        }
    }

    fn count(&self, who: &Principal, model: &str, usage: Option<Usage>, remaining_tokens: Option<u64>) {
        let metrics = metrics();
        if let Some(usage) = usage {
            let key = KeyValue::new("api_key", who.id.clone());
            let model_label = KeyValue::new("model", self.model_label(model));
            let labels = |kind: &'static str| [key.clone(), model_label.clone(), label("type", kind)];
            metrics.tokens.add(u64::from(usage.prompt_tokens), &labels("input"));
            metrics.tokens.add(u64::from(usage.completion_tokens), &labels("output"));
            if let Some(price) = self.prices.get(model) {
                let cost = (f64::from(usage.prompt_tokens) * price.input_per_million
                    + f64::from(usage.completion_tokens) * price.output_per_million)
                    / 1e6;
                metrics.cost_usd.add(cost, &[key, model_label]);
            }
        }
        if let (Some(remaining), Some(limit)) = (remaining_tokens, self.limiter.token_limit(who)) {
            let ratio = remaining as f64 / f64::from(limit.burst.max(1));
            metrics
                .ratelimit_remaining_ratio
                .record(ratio, &[label("api_key", who.id.clone()), label("kind", "tokens")]);
        }
    }
}

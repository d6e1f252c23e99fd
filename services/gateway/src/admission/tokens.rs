//! Admission of one generation call, once its request is decoded: the request is valid, the key
//! may use the model, the key's tokens per minute cover the prompt plus `max_tokens`, and the
//! key's and its team's spend budgets cover the most the call can cost ([`super::budget`]).
//!
//! Both reservations are held by the call as [`Tokens`] and settled exactly once: with the usage
//! the call is charged for ([`Tokens::settle`], [`Tokens::settle_bill`]), or — when the call
//! ends without settling (the client went away) — with what the client received. Settling also
//! counts the tokens and their cost for the key, so unary calls, streams, jobs (whose reservations
//! their worker settles) and every fallback are accounted in one place.
//!
//! What a call costs against a budget: its usage at its answering model's price (the secondary
//! model's when the fallback answered with it); nothing for a fallback message, a stale cached
//! answer or a failure; `[gateway.budget] cache_hit_share` of the reused usage's price for a cache
//! hit or an answer shared with an identical call in flight. A key with a budget may use only
//! priced models: an unpriced one (or an unpriced fallback secondary model) is refused with
//! FAILED_PRECONDITION, never served free.

use std::{collections::BTreeMap, sync::Arc};

use llmesh_proto::{
    cache_key,
    common::v1::{CachePolicy, Usage},
    generation::v1::GenerateRequest,
    validate::{self, Limits},
};
use opentelemetry::KeyValue;
use serde::{Deserialize, Serialize};

use llmesh_ratelimit::budget::{self, Nanos, Rate};

use super::{
    CacheScope, Held, Quota, RateLimiter,
    budget::{Budgets, Slicing, Spend},
};
use crate::{
    catalog::Catalog,
    error::CallError,
    metrics::{Labels, label, metrics},
    principal::Principal,
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
/// At most this many models get a label of their own (the catalog may grow while the process runs);
/// any further one is labelled [`OTHER_MODEL`].
const MODEL_LABELS: usize = 1_000;

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

impl Price {
    fn rate(&self) -> Rate {
        Rate { input_per_million: self.input_per_million, output_per_million: self.output_per_million }
    }
}

impl TokenAdmission {
    /// `secondary_model`: the model the fallback may answer with instead (its price bounds a
    /// budgeted call's reservation too).
    pub fn new(
        limits: Limits,
        limiter: Arc<RateLimiter>,
        prices: BTreeMap<String, Price>,
        catalog: Catalog,
        budgets: Arc<Budgets>,
        secondary_model: Option<String>,
    ) -> Self {
        let accounting = Arc::new(Accounting {
            prices,
            catalog,
            limiter: limiter.clone(),
            budgets,
            secondary_model,
            model_labels: Labels::new("model", MODEL_LABELS, OTHER_MODEL),
        });
        Self { limits: Arc::new(limits), limiter, accounting }
    }

    pub fn budgets(&self) -> &Arc<Budgets> {
        &self.accounting.budgets
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Validates `request` and admits it for `principal`, the caller the auth layer found.
    pub async fn admit(&self, principal: Principal, request: GenerateRequest) -> Result<Admitted, CallError> {
        self.admit_with(principal, request, Slicing::Allowed).await
    }

    /// [`Self::admit`] for a job: its money is reserved alone, never from a slice (the job
    /// stores its reservation, and a worker settles it).
    pub async fn admit_job(&self, principal: Principal, request: GenerateRequest) -> Result<Admitted, CallError> {
        self.admit_with(principal, request, Slicing::Never).await
    }

    async fn admit_with(
        &self,
        principal: Principal,
        mut request: GenerateRequest,
        slicing: Slicing,
    ) -> Result<Admitted, CallError> {
        validate::generate_request(&request, &self.limits)?;
        validate::no_reserved_metadata(&request)?;
        if !principal.allows(&request.model) {
            return Err(CallError::Forbidden(format!(
                "model: API key {} may not use {:?}",
                principal.id, request.model
            )));
        }
        scope_cache(&mut request, &principal)?;
        let prompt_tokens = validate::estimated_prompt_tokens(&request);
        let max_tokens = validate::effective_max_tokens(&request, &self.limits);
        let held = self.limiter.hold_tokens(&principal, prompt_tokens.saturating_add(max_tokens)).await?;
        // Refused for budget, `held` is dropped: the tokens go back.
        let spend = self.reserve_money(&principal, &request, prompt_tokens, max_tokens, slicing).await?;
        let tokens = Tokens { held, spend, who: principal.clone(), accounting: self.accounting.clone() };
        Ok(Admitted { principal, request: Arc::new(request), tokens })
    }

    /// Reserves the most the call can cost from the principal's budgets (none: no budget applies):
    /// the most prompt tokens any provider can count ([`validate::prompt_tokens_bound`]) and
    /// `max_tokens`, at the dearer of the model and the fallback's secondary model. Not the
    /// quarter-byte `prompt_tokens` the rate limit holds: a budget is never to be passed, and the
    /// settlement charges at most this reservation. `prompt_tokens` stays what a call dropped
    /// half-way pays for its prompt.
    async fn reserve_money(
        &self,
        principal: &Principal,
        request: &GenerateRequest,
        prompt_tokens: u32,
        max_tokens: u32,
        slicing: Slicing,
    ) -> Result<Option<Spend>, CallError> {
        if !principal.has_budget() {
            return Ok(None);
        }
        let (accounting, model) = (&self.accounting, request.model.as_str());
        let rate = accounting.rate_for_budget(model, "")?;
        let bound = validate::prompt_tokens_bound(request);
        let mut amount = budget::cost(bound, max_tokens, rate);
        if let Some(secondary) = accounting.secondary_model.as_deref().filter(|m| *m != model && principal.allows(m)) {
            let secondary_rate = accounting.rate_for_budget(secondary, " (the fallback's secondary model)")?;
            amount = amount.max(budget::cost(bound, max_tokens, secondary_rate));
        }
        accounting.budgets.reserve_with(principal, amount, rate, prompt_tokens, slicing).await
    }
}

/// Applies the key's cache scope to its request: a private key's entries are its own (a scope in
/// the cache key, see [`cache_key::SCOPE_METADATA_KEY`]); an `off` key's calls never touch the
/// cache (and so `ONLY_IF_CACHED` finds nothing).
fn scope_cache(request: &mut GenerateRequest, principal: &Principal) -> Result<(), CallError> {
    match principal.cache {
        CacheScope::Shared => {}
        CacheScope::Private => {
            request.metadata.insert(cache_key::SCOPE_METADATA_KEY.to_string(), principal.id.to_string());
        }
        CacheScope::Off if request.cache == i32::from(CachePolicy::OnlyIfCached) => {
            return Err(CallError::NotFound {
                param: None,
                message: "cache: no cached answer for this request (policy ONLY_IF_CACHED; this key's answers are never cached)"
                    .into(),
            });
        }
        CacheScope::Off => request.cache = CachePolicy::Bypass.into(),
    }
    Ok(())
}

/// The tokens (and money, under a budget) a call holds until it settles.
#[derive(Debug)]
pub struct Tokens {
    held: Held,
    /// `None`: no budget applies.
    spend: Option<Spend>,
    who: Principal,
    accounting: Arc<Accounting>,
}

impl Tokens {
    /// What the key had left once the reservations were taken.
    pub fn quota(&self) -> Quota {
        Quota { remaining_budget: self.spend.as_ref().and_then(Spend::remaining), ..self.held.quota() }
    }

    /// Counts `tokens` more as received (streamed text, before the usage is known).
    pub fn received(&mut self, tokens: u32) {
        self.held.received(tokens);
        if let Some(spend) = self.spend.as_mut() {
            spend.received(tokens);
        }
    }

    /// The reservations themselves, for a call whose reservations outlive it (a job: its worker
    /// settles them).
    pub fn into_parts(self) -> (Held, Option<Spend>) {
        (self.held, self.spend)
    }

    /// Settles with the usage the call is charged for (`None`: nothing — a cached answer, a
    /// fallback message, a failure), counts it for the key under `model`, and says what is left.
    pub fn settle(self, usage: Option<Usage>, model: &str) -> Quota {
        let cost = usage.map(|usage| self.accounting.cost(&usage, model, self.spend.as_ref()));
        self.settle_with(usage, cost.unwrap_or(0), model)
    }

    /// Settles with what an answer of `model` is charged for: its usage in full, or the share of a
    /// reused answer's price that `[gateway.budget] cache_hit_share` says (tokens: nothing).
    pub fn settle_bill(self, bill: Bill, model: &str) -> Quota {
        let reused = match bill {
            Bill::Full(usage) => return self.settle(Some(usage), model),
            Bill::Reused(usage) => usage,
            Bill::Free => return self.settle_with(None, 0, model),
        };
        let share = self.accounting.budgets.cache_hit_share();
        let cost = match share > 0.0 {
            true => (self.accounting.cost(&reused, model, self.spend.as_ref()) as f64 * share).round() as Nanos,
            false => 0,
        };
        self.settle_with(None, cost, model)
    }

    fn settle_with(self, usage: Option<Usage>, cost: Nanos, model: &str) -> Quota {
        let Self { held, spend, who, accounting } = self;
        let mut quota = held.settle(usage.map_or(0, |u| u.total_tokens));
        quota.remaining_budget = spend.and_then(|spend| spend.settle(cost));
        accounting.count(&who, model, usage, quota.remaining_tokens);
        quota
    }
}

/// What an answer is charged for (the answer step reckons it: see `crate::answer::Answer::bill`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bill {
    /// Generation's usage, paid in full: an answer this call made (the secondary model's too).
    Full(Usage),
    /// The usage of an answer this call reused (a cache hit, an identical call's answer), of which
    /// a budget charges `cache_hit_share`; no tokens.
    Reused(Usage),
    /// Nothing: a stale answer, a fallback message, or no usage.
    Free,
}

/// Tokens and cost per key and model, and the share of its token limit a key has left.
#[derive(Debug)]
struct Accounting {
    prices: BTreeMap<String, Price>,
    catalog: Catalog,
    limiter: Arc<RateLimiter>,
    budgets: Arc<Budgets>,
    secondary_model: Option<String>,
    /// The `model` label of each known model.
    model_labels: Labels,
}

impl Accounting {
    /// `model`'s price, which a budgeted call must have: an unpriced model would be served free.
    fn rate_for_budget(&self, model: &str, what: &str) -> Result<Rate, CallError> {
        self.prices.get(model).map(Price::rate).ok_or_else(|| {
            CallError::Precondition(format!(
                "budget: model {model:?}{what} has no price ([gateway.prices.{model}]); \
                 keys with a spend budget may use priced models only"
            ))
        })
    }

    /// What `usage` of `model` costs: at its price, or — for a model priced nowhere, which a
    /// budgeted call was not admitted with — at the reserved model's.
    fn cost(&self, usage: &Usage, model: &str, spend: Option<&Spend>) -> Nanos {
        let rate = match (self.prices.get(model), spend) {
            (Some(price), _) => price.rate(),
            (None, Some(spend)) => spend.rate(),
            (None, None) => return 0,
        };
        budget::cost(usage.prompt_tokens, usage.completion_tokens, rate)
    }

    /// A model's label: its name when it is priced or generation lists it, else one shared value
    /// (built once per model: see [`Labels`]).
    fn model_label(&self, model: &str) -> KeyValue {
        if self.prices.contains_key(model) || self.catalog.knows(model) {
            self.model_labels.get(model)
        } else {
            KeyValue::new("model", OTHER_MODEL)
        }
    }

    fn count(&self, who: &Principal, model: &str, usage: Option<Usage>, remaining_tokens: Option<u64>) {
        let metrics = metrics();
        if let Some(usage) = usage {
            let key = KeyValue::new("api_key", who.id.clone());
            let model_label = self.model_label(model);
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

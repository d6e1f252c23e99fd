//! One model name over several deployments (`provider = "group"`): the same model at other
//! providers, regions or keys. Each call goes to the next deployment by smooth weighted round
//! robin; one that fails before its first event (a 429, a 5xx, a stall, a refused key: anything
//! but the upstream refusing the request itself) is passed over for the call, which goes on to the
//! next, and cools down: no call goes to it for `cooldown_ms`, or for as long as a 429's
//! Retry-After asks when that is longer. When every deployment is cooling, the call is
//! RESOURCE_EXHAUSTED with the shortest wait as its pushback, and no upstream is called. A
//! deployment whose last response's rate-limit headers said nothing remains (`headroom`) is out
//! the same way until the reset they gave, before it ever answers 429. Once a
//! deployment's answer has begun, a failure is the call's: a stream is never resent.
//!
//! A deployment that has no form for the request (an Anthropic one and a JSON_OBJECT response
//! format) is passed over too; when none has, the first one's refusal is the answer.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use llmesh_proto::generation::v1::GenerateRequest;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::Status;

use super::{
    Catalog, EventStream, Mode, ModelConfig, Provider,
    error::{Kind, UpstreamError},
};

/// `[generation.models.NAME]` with `provider = "group"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GroupConfig {
    /// The deployments, each a model entry of its own (any provider but another group) with a
    /// `weight`.
    pub deployments: Vec<DeploymentConfig>,
    /// How long a deployment that failed is passed over.
    pub cooldown_ms: u64,
    /// What ListModels reports for the name, and what generation holds requests to.
    pub catalog: Catalog,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self { deployments: Vec::new(), cooldown_ms: 5_000, catalog: Catalog::default() }
    }
}

/// One deployment of a group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeploymentConfig {
    /// Its share of the calls, against the others' (at least 1).
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(flatten)]
    pub model: ModelConfig,
}

fn one() -> u32 {
    1
}

/// At most this many deployments in a group.
const MAX_DEPLOYMENTS: usize = 64;

#[derive(Debug)]
pub struct Group {
    deployments: Arc<[Provider]>,
    weights: Vec<i64>,
    cooldown: Duration,
    catalog: Catalog,
    state: Arc<Mutex<State>>,
}

/// The round robin's and the cool-downs' state.
#[derive(Debug)]
struct State {
    /// Smooth weighted round robin: each deployment's current weight.
    current: Vec<i64>,
    /// Until when each deployment is passed over.
    cooling: Vec<Option<Instant>>,
}

impl Group {
    /// `name` is the group's, for start-up errors.
    pub fn new(name: &str, config: &GroupConfig, max_response_bytes: u64) -> anyhow::Result<Self> {
        if config.deployments.is_empty() || config.deployments.len() > MAX_DEPLOYMENTS {
            anyhow::bail!("model {name}: a group needs 1 to {MAX_DEPLOYMENTS} deployments");
        }
        let mut deployments = Vec::new();
        for (i, deployment) in config.deployments.iter().enumerate() {
            if matches!(deployment.model, ModelConfig::Group(_)) {
                anyhow::bail!("model {name}: deployments[{i}] is a group; a group's deployments are models");
            }
            if deployment.weight == 0 {
                anyhow::bail!("model {name}: deployments[{i}].weight must be at least 1");
            }
            let named = format!("{name}.deployments[{i}]");
            deployments.push(Provider::from_config(&named, &deployment.model, max_response_bytes)?);
        }
        let n = deployments.len();
        Ok(Self {
            deployments: deployments.into(),
            weights: config.deployments.iter().map(|d| i64::from(d.weight)).collect(),
            cooldown: Duration::from_millis(config.cooldown_ms),
            catalog: config.catalog.clone(),
            state: Arc::new(Mutex::new(State { current: vec![0; n], cooling: vec![None; n] })),
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// True when every deployment answers the same request the same way.
    pub fn deterministic(&self) -> bool {
        self.deployments.iter().all(Provider::deterministic)
    }

    /// The first deployment's upstream model: what ListModels shows.
    pub fn upstream_model<'a>(&'a self, name: &'a str) -> &'a str {
        self.deployments.first().map_or(name, |d| d.upstream_model(name))
    }

    /// The deployments to try, in order: the round robin's pick, then the others by weight; the
    /// cooling ones left out. `Err` with the shortest wait when every one is cooling.
    fn order(&self, now: Instant) -> Result<Vec<usize>, Duration> {
        let Ok(mut state) = self.state.lock() else { return Ok((0..self.deployments.len()).collect()) };
        // Out: cooling after a failure, or out of headroom by its own rate-limit headers.
        let out: Vec<Option<Instant>> = (0..self.deployments.len())
            .map(|i| {
                let cooling = state.cooling[i].filter(|until| *until > now);
                cooling.max(self.deployments[i].exhausted_until(now))
            })
            .collect();
        let available: Vec<usize> = (0..self.deployments.len()).filter(|&i| out[i].is_none()).collect();
        if available.is_empty() {
            let wait = out.iter().flatten().map(|until| until.saturating_duration_since(now)).min();
            return Err(wait.unwrap_or(self.cooldown));
        }
        let total: i64 = available.iter().map(|&i| self.weights[i]).sum();
        for &i in &available {
            state.current[i] += self.weights[i];
        }
        let pick = available.iter().copied().max_by_key(|&i| (state.current[i], std::cmp::Reverse(i))).unwrap_or(0);
        state.current[pick] -= total;
        let mut rest: Vec<usize> = available.into_iter().filter(|&i| i != pick).collect();
        rest.sort_by_key(|&i| (std::cmp::Reverse(self.weights[i]), i));
        Ok(std::iter::once(pick).chain(rest).collect())
    }

    /// Starts the call on the first deployment that takes it, failing over as the module says.
    pub fn stream(&self, request: &GenerateRequest, max_tokens: u32, mode: Mode) -> Result<EventStream, Status> {
        let order = match self.order(Instant::now()) {
            Ok(order) => order,
            Err(wait) => {
                let retry_after_ms = Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1));
                let detail = format!("every deployment of {} is cooling down", request.model);
                let error = UpstreamError::new(Kind::RateLimited { retry_after_ms }, detail);
                return Ok(Box::pin(futures::stream::once(async move { Err(error) })));
            }
        };
        // The first deployment that takes the request is asked now, so that a request no
        // deployment can take is refused at once, as a single provider would refuse it. The others'
        // bodies are built only when the call fails over to them.
        let mut order = order.into_iter();
        let mut refusal = None;
        let (first, events) = loop {
            let Some(i) = order.next() else {
                return Err(refusal.unwrap_or_else(|| Status::internal("a group without deployments")));
            };
            match self.deployments[i].stream(request, max_tokens, mode) {
                Ok(events) => break (i, events),
                Err(status) => {
                    refusal.get_or_insert(status);
                }
            }
        };
        let rest: Vec<usize> = order.collect();
        let request = (!rest.is_empty()).then(|| request.clone());
        let (deployments, state, cooldown) = (self.deployments.clone(), self.state.clone(), self.cooldown);
        let answer = async move {
            let later = rest.into_iter().filter_map(|i| {
                // One that has no form for the request is passed over.
                let request = request.as_ref()?;
                deployments[i].stream(request, max_tokens, mode).ok().map(|events| (i, events))
            });
            let mut last = None;
            for (i, mut events) in std::iter::once((first, events)).chain(later) {
                match events.next().await {
                    Some(Ok(event)) => {
                        return Box::pin(futures::stream::once(async { Ok(event) }).chain(events)) as EventStream;
                    }
                    Some(Err(error)) => {
                        if matches!(error.kind(), Kind::Rejected { .. }) {
                            return Box::pin(futures::stream::once(async { Err(error) }));
                        }
                        cool(&state, i, &error, cooldown);
                        tracing::warn!(deployment = i, error = %error.detail(), "deployment failed before its answer began; cooling it down");
                        last = Some(error);
                    }
                    None => return Box::pin(futures::stream::empty()),
                }
            }
            match last {
                Some(error) => Box::pin(futures::stream::once(async { Err(error) })),
                None => Box::pin(futures::stream::empty()),
            }
        };
        Ok(Box::pin(futures::stream::once(answer).flatten()))
    }
}

/// Passes deployment `i` over for `cooldown`, or for as long as its 429 asked when longer.
fn cool(state: &Mutex<State>, i: usize, error: &UpstreamError, cooldown: Duration) {
    let asked = match error.kind() {
        Kind::RateLimited { retry_after_ms: Some(ms) } => Duration::from_millis(ms),
        _ => Duration::ZERO,
    };
    if let Ok(mut state) = state.lock() {
        state.cooling[i] = Some(Instant::now() + cooldown.max(asked));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::sim::SimConfig;

    fn group(weights: &[u32]) -> Group {
        let deployments = weights
            .iter()
            .map(|&weight| DeploymentConfig { weight, model: ModelConfig::Sim(SimConfig::default()) })
            .collect();
        Group::new("g", &GroupConfig { deployments, ..GroupConfig::default() }, 1 << 20).unwrap()
    }

    #[test]
    fn calls_are_shared_by_weight_smoothly() {
        let group = group(&[3, 1]);
        let now = Instant::now();
        let firsts: Vec<usize> = (0..8).map(|_| group.order(now).unwrap()[0]).collect();
        assert_eq!(firsts, [0, 0, 1, 0, 0, 0, 1, 0]);
        assert_eq!(group.order(now).unwrap().len(), 2, "the others follow, to fail over to");
    }

    #[test]
    fn a_cooling_deployment_is_passed_over_and_all_cooling_is_a_wait() {
        let group = group(&[1, 1]);
        let error = UpstreamError::new(Kind::RateLimited { retry_after_ms: Some(60_000) }, "");
        cool(&group.state, 0, &error, Duration::from_secs(5));
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(group.order(now).unwrap(), [1]);
        }
        cool(&group.state, 1, &UpstreamError::new(Kind::Unreachable, ""), Duration::from_secs(5));
        let now = Instant::now();
        let wait = group.order(now).unwrap_err();
        assert!(wait <= Duration::from_secs(5) && wait > Duration::from_secs(4), "{wait:?}");
        assert_eq!(group.order(now + Duration::from_secs(6)).unwrap(), [1], "the 429 asked for a minute");
    }

    #[test]
    fn a_group_of_groups_or_of_nothing_stops_start_up() {
        let empty = Group::new("g", &GroupConfig::default(), 1).unwrap_err();
        assert_eq!(format!("{empty:#}"), "model g: a group needs 1 to 64 deployments");
        let nested = DeploymentConfig { weight: 1, model: ModelConfig::Group(GroupConfig::default()) };
        let config = GroupConfig { deployments: vec![nested], ..GroupConfig::default() };
        let error = Group::new("g", &config, 1).unwrap_err();
        assert!(format!("{error:#}").contains("deployments[0] is a group"), "{error:#}");
        let zero = DeploymentConfig { weight: 0, model: ModelConfig::Sim(SimConfig::default()) };
        let config = GroupConfig { deployments: vec![zero], ..GroupConfig::default() };
        assert!(format!("{:#}", Group::new("g", &config, 1).unwrap_err()).contains("weight must be at least 1"));
    }
}

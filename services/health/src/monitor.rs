//! The poller: checks every target, folds the answers into one mesh status, publishes it on a
//! watch channel and mirrors it into `grpc.health.v1`.
//!
//! Target addresses may hold credentials (`redis://user:pass@host`, a token in a query string).
//! Wherever the poller shows an address (a component's `address` and `detail`, metric labels,
//! error messages) it shows it through [`redact_url`]: no user information, no query values.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use llmesh_common::deps;
use llmesh_proto::health::v1::{
    Component, ServingStatus, StatusRequest, StatusResponse, mesh_health_client::MeshHealthClient,
};
use llmesh_util::redact::redact_url;
use tokio::{sync::watch, time::Instant};
use tonic::transport::Channel;
use tonic_health::{
    pb::{HealthCheckRequest, health_check_response, health_client::HealthClient},
    server::HealthReporter,
};

use crate::config::{Config, Target};

/// How a target is checked.
enum Probe {
    /// `grpc.health.v1.Health/Check` of the target's service.
    Grpc(HealthClient<Channel>),
    /// Every address `host` resolves to, each checked like `Grpc` (replicas behind a DNS name).
    Dns { host: String, port: u16, clients: std::sync::Mutex<BTreeMap<String, HealthClient<Channel>>> },
    /// `PING` to a Redis the mesh depends on.
    Redis(redis::Client),
}

/// The grpc.health.v1 name gateways answer to: their replicas' breakers are fetched too.
const GATEWAY_SERVICE: &str = llmesh_proto::gateway::v1::gateway_server::SERVICE_NAME;
/// Where breaker components are grouped: optional, an open breaker degrades the mesh.
const BREAKER_SERVICE: &str = "llmesh.gateway.v1.Gateway/breakers";

pub struct Monitor {
    /// Each gRPC target's channel, by address (for the gateway's MeshHealth).
    channels: BTreeMap<String, Channel>,
    /// The operator's token (this service's `admin.bearer_token_file`, the secret every
    /// service's admin listener shares): presented to the gateways, whose `MeshHealth` shows
    /// the replicas' addresses only to the operator.
    operator: Option<llmesh_telemetry::BearerToken>,
    component_up: opentelemetry::metrics::Gauge<u64>,
    dependency_up: opentelemetry::metrics::Gauge<u64>,
    targets: Vec<(Target, Probe)>,
    interval: Duration,
    timeout: Duration,
    reporter: HealthReporter,
    state: watch::Sender<StatusResponse>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Monitor {
    /// `operator`: the operator's token, presented to the gateways (see [`Monitor::breakers`]).
    pub fn new(
        config: &Config,
        reporter: HealthReporter,
        operator: Option<llmesh_telemetry::BearerToken>,
    ) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(config.check_timeout_ms);
        let targets = config
            .targets
            .iter()
            .map(|target| {
                let shown = redact_url(&target.address);
                let probe = if target.address.starts_with("redis://") || target.address.starts_with("rediss://") {
                    // Not `?`: redis' error may quote the URL.
                    let client = llmesh_util::redis::client(target.address.as_str())
                        .map_err(|e| anyhow::anyhow!("health target {shown}: not a Redis URL ({:?})", e.kind()))?;
                    Probe::Redis(client)
                } else if let Some(name) = target.address.strip_prefix("dns://") {
                    let (host, port) = name
                        .trim_end_matches('/')
                        .rsplit_once(':')
                        .ok_or_else(|| anyhow::anyhow!("{shown}: dns:// needs host:port"))?;
                    let port = port.parse().map_err(|_| anyhow::anyhow!("{shown}: bad port"))?;
                    Probe::Dns { host: host.to_string(), port, clients: Default::default() }
                } else {
                    let channel = deps::endpoint(&target.address, timeout)
                        .map_err(|e| anyhow::anyhow!("health target {shown}: invalid endpoint: {}", e.root_cause()))?
                        .connect_lazy();
                    Probe::Grpc(HealthClient::new(channel))
                };
                Ok((target.clone(), probe))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let initial = StatusResponse { status: ServingStatus::Unknown.into(), ..Default::default() };
        let channels = config
            .targets
            .iter()
            .filter(|t| t.service == GATEWAY_SERVICE)
            .filter_map(|t| Some((t.address.clone(), deps::endpoint(&t.address, timeout).ok()?.connect_lazy())))
            .collect();
        let meter = llmesh_telemetry::meter();
        Ok(Self {
            channels,
            operator,
            component_up: meter.u64_gauge("llmesh.component_up").with_description("1 SERVING, 0 not").build(),
            dependency_up: meter
                .u64_gauge("llmesh.dependency_up")
                .with_description("1 when at least one instance of the dependency serves")
                .build(),
            targets,
            interval: Duration::from_millis(config.poll_interval_ms.max(10)),
            timeout,
            reporter,
            state: watch::channel(initial).0,
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<StatusResponse> {
        self.state.subscribe()
    }

    pub async fn run(self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let checks = self.targets.iter().map(|(target, probe)| self.check_all(target, probe));
            let components = futures::future::join_all(checks).await.into_iter().flatten().collect();
            self.publish(components).await;
        }
    }

    /// One component per address behind the target; for a gateway, also the generation replicas
    /// it balances over, with their circuit breakers.
    async fn check_all(&self, target: &Target, probe: &Probe) -> Vec<Component> {
        let Probe::Dns { host, port, clients } = probe else {
            let mut components = vec![self.check(target, probe).await];
            if matches!(probe, Probe::Grpc(_))
                && target.service == GATEWAY_SERVICE
                && components[0].status == i32::from(ServingStatus::Serving)
            {
                components.extend(self.breakers(target).await);
            }
            return components;
        };
        let addrs: Vec<String> = match tokio::net::lookup_host((host.as_str(), *port)).await {
            Ok(found) => found.map(|a| format!("http://{a}")).collect(),
            Err(error) => {
                let mut gone = self.check(target, probe).await;
                gone.detail = format!("cannot resolve {host}: {error}");
                return vec![gone];
            }
        };
        let probes: Vec<(Target, Probe)> = {
            let Ok(mut clients) = clients.lock() else { return Vec::new() };
            clients.retain(|addr, _| addrs.contains(addr));
            addrs
                .iter()
                .filter_map(|addr| {
                    let client = match clients.get(addr) {
                        Some(client) => client.clone(),
                        None => {
                            let channel = deps::endpoint(addr, self.timeout).ok()?.connect_lazy();
                            let client = HealthClient::new(channel);
                            clients.insert(addr.clone(), client.clone());
                            client
                        }
                    };
                    Some((Target { address: addr.clone(), ..target.clone() }, Probe::Grpc(client)))
                })
                .collect()
        };
        futures::future::join_all(probes.iter().map(|(target, probe)| self.check(target, probe))).await
    }

    /// The gateway's own view of generation (its `MeshHealth`): one component per replica, under
    /// the gateway's name, whose status is its circuit breaker's.
    async fn breakers(&self, gateway: &Target) -> Vec<Component> {
        let Some(channel) = self.channels.get(&gateway.address) else { return Vec::new() };
        let mut mesh = MeshHealthClient::new(channel.clone());
        let mut request = tonic::Request::new(StatusRequest {});
        let token = self.operator.as_ref().and_then(|token| token());
        if let Some(value) = token.and_then(|token| format!("Bearer {token}").parse().ok()) {
            request.metadata_mut().insert("authorization", value);
        }
        match tokio::time::timeout(self.timeout, mesh.status(request)).await {
            Ok(Ok(status)) => status
                .into_inner()
                .components
                .into_iter()
                .map(|c| Component {
                    service: BREAKER_SERVICE.into(),
                    address: redact_url(&c.address),
                    detail: format!("{} (seen by the gateway at {})", c.detail, redact_url(&gateway.address)),
                    ..c
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    async fn check(&self, target: &Target, probe: &Probe) -> Component {
        let started = Instant::now();
        let answer = match probe {
            Probe::Grpc(client) => {
                let mut client = client.clone();
                let request = HealthCheckRequest { service: target.service.clone() };
                tokio::time::timeout(self.timeout, async move {
                    match client.check(request).await {
                        Ok(response) => match response.into_inner().status() {
                            health_check_response::ServingStatus::Serving => Ok(()),
                            other => Err(format!("reports {}", other.as_str_name())),
                        },
                        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
                    }
                })
                .await
            }
            Probe::Dns { host, .. } => Ok(Err(format!("{host} resolves to no address"))),
            Probe::Redis(client) => {
                tokio::time::timeout(self.timeout, async {
                    let mut conn = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
                    redis::cmd("PING").query_async::<String>(&mut conn).await.map(drop).map_err(|e| e.to_string())
                })
                .await
            }
        };
        let (status, detail) = match answer {
            Ok(Ok(())) => (ServingStatus::Serving, String::new()),
            Ok(Err(detail)) => (ServingStatus::NotServing, detail),
            Err(_) => (ServingStatus::NotServing, format!("no answer within {} ms", self.timeout.as_millis())),
        };
        Component {
            name: target.name.clone(),
            service: target.service.clone(),
            address: redact_url(&target.address),
            status: status.into(),
            detail,
            latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            last_change_unix_ms: 0,
        }
    }

    async fn publish(&self, mut components: Vec<Component>) {
        // Keep each component's time of last change from the previous round.
        let previous = self.state.borrow().components.clone();
        for component in &mut components {
            let before = previous.iter().find(|p| p.name == component.name && p.address == component.address);
            component.last_change_unix_ms = match before {
                Some(before) if before.status == component.status => before.last_change_unix_ms,
                _ => now_ms(),
            };
        }

        for component in &components {
            let up = u64::from(component.status == i32::from(ServingStatus::Serving));
            let labels = [
                opentelemetry::KeyValue::new("component", component.name.clone()),
                opentelemetry::KeyValue::new("address", component.address.clone()),
            ];
            self.component_up.record(up, &labels);
        }
        let mut names: Vec<&str> = components.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let up = components.iter().any(|c| c.name == name && c.status == i32::from(ServingStatus::Serving));
            self.dependency_up.record(u64::from(up), &[opentelemetry::KeyValue::new("dependency", name.to_string())]);
        }
        let by_service = per_service(&components);
        for (service, status) in &by_service {
            self.reporter.set_service_status(service, grpc_status(*status)).await;
        }
        let overall = overall(by_service.iter().map(|(service, status)| {
            let optional =
                service == BREAKER_SERVICE || self.targets.iter().any(|(t, _)| &t.service == service && !t.required);
            if optional && *status == ServingStatus::NotServing { ServingStatus::Degraded } else { *status }
        }));
        self.reporter.set_service_status("", grpc_status(overall)).await;

        let next = StatusResponse { status: overall.into(), components, checked_at_unix_ms: now_ms() };
        self.state.send_if_modified(|current| {
            let changed = current.status != next.status
                || current.components.len() != next.components.len()
                || current
                    .components
                    .iter()
                    .zip(&next.components)
                    .any(|(a, b)| a.status != b.status || a.detail != b.detail);
            *current = next;
            changed
        });
    }
}

/// One status per watched service name: SERVING when every replica serves, DEGRADED when some do,
/// NOT_SERVING when none does.
fn per_service(components: &[Component]) -> BTreeMap<String, ServingStatus> {
    let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for component in components {
        let entry = counts.entry(component.service.clone()).or_default();
        entry.0 += 1;
        entry.1 += usize::from(component.status == i32::from(ServingStatus::Serving));
    }
    counts
        .into_iter()
        .map(|(service, (total, serving))| {
            let status = match serving {
                0 => ServingStatus::NotServing,
                n if n == total => ServingStatus::Serving,
                _ => ServingStatus::Degraded,
            };
            (service, status)
        })
        .collect()
}

fn overall(statuses: impl Iterator<Item = ServingStatus>) -> ServingStatus {
    statuses.fold(ServingStatus::Serving, |acc, s| match (acc, s) {
        (ServingStatus::NotServing, _) | (_, ServingStatus::NotServing) => ServingStatus::NotServing,
        (ServingStatus::Degraded, _) | (_, ServingStatus::Degraded) => ServingStatus::Degraded,
        _ => ServingStatus::Serving,
    })
}

/// grpc.health.v1 has no "degraded": a service that still answers is SERVING there.
fn grpc_status(status: ServingStatus) -> tonic_health::ServingStatus {
    match status {
        ServingStatus::Serving | ServingStatus::Degraded => tonic_health::ServingStatus::Serving,
        ServingStatus::NotServing => tonic_health::ServingStatus::NotServing,
        ServingStatus::Unspecified | ServingStatus::Unknown => tonic_health::ServingStatus::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Components, their details and the metric labels (made from the components' addresses) show
    /// no credential, for a Redis target and a gRPC one, both unreachable.
    #[tokio::test]
    async fn components_show_no_credentials() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let target = |name: &str, address: String, service: &str| Target {
            name: name.into(),
            address,
            service: service.into(),
            required: false,
        };
        let config = Config {
            check_timeout_ms: 2_000,
            targets: vec![
                target("redis", format!("redis://llmesh:hunter2@127.0.0.1:{port}/0?token=hunter3"), "redis"),
                target(
                    "cache",
                    format!("http://llmesh:hunter4@127.0.0.1:{port}/?token=hunter5"),
                    "llmesh.cache.v1.Cache",
                ),
            ],
            ..Config::default()
        };
        let (reporter, _) = tonic_health::server::health_reporter();
        let monitor = Monitor::new(&config, reporter, None).unwrap();
        let mut components = Vec::new();
        for (target, probe) in &monitor.targets {
            components.extend(monitor.check_all(target, probe).await);
        }
        monitor.publish(components).await;
        let status = monitor.subscribe().borrow().clone();
        assert_eq!(status.components.len(), 2, "{status:?}");
        for component in &status.components {
            assert_eq!(component.status, i32::from(ServingStatus::NotServing), "{component:?}");
            assert!(component.address.contains("***@127.0.0.1"), "{component:?}");
            let shown = format!("{component:?}");
            assert!(!shown.contains("hunter"), "{shown}");
        }
    }

    fn component(service: &str, status: ServingStatus) -> Component {
        Component { service: service.into(), status: status.into(), ..Default::default() }
    }

    #[test]
    fn replicas_fold_into_one_status() {
        let components = [
            component("gen", ServingStatus::Serving),
            component("gen", ServingStatus::NotServing),
            component("cache", ServingStatus::Serving),
            component("gw", ServingStatus::NotServing),
        ];
        let by_service = per_service(&components);
        assert_eq!(by_service["gen"], ServingStatus::Degraded);
        assert_eq!(by_service["cache"], ServingStatus::Serving);
        assert_eq!(by_service["gw"], ServingStatus::NotServing);
        assert_eq!(overall(by_service.values().copied()), ServingStatus::NotServing);
        assert_eq!(overall([ServingStatus::Serving, ServingStatus::Degraded].into_iter()), ServingStatus::Degraded);
        assert_eq!(overall([ServingStatus::Serving].into_iter()), ServingStatus::Serving);
    }
}

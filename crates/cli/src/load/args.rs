//! The flags of `llmesh load`, and the validated [`Plan`] they turn into.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};

use super::{
    pacer::Pacing,
    runner::{Mode, RunPlan},
};

/// The gateway's address in `llmesh up`'s default layout.
const GATEWAY_TARGET: &str = "http://127.0.0.1:50051";
/// Generation's address in `llmesh up`'s default layout.
const GENERATION_TARGET: &str = "http://127.0.0.1:50052";
/// How long a run lasts when neither --duration nor --requests bounds it.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// Arguments of `llmesh load`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct LoadArgs {
    /// Address to send load to [default: http://127.0.0.1:50051 for the gateway, :50052 for
    /// generation]. `host:port` means `http://host:port`.
    #[arg(long, value_name = "URL", help_heading = "Target")]
    pub target: Option<String>,
    /// Which service's API to call: the gateway (the mesh's front door), or generation directly
    /// (the floor: no cache, no gateway hop).
    #[arg(long, value_enum, default_value_t = Service::Gateway, help_heading = "Target")]
    pub service: Service,
    /// How to call it: gRPC (`Generate` / `GenerateStream`), or HTTP/1.1 as OpenAI chat
    /// completions on the gateway's own port (`POST /v1/chat/completions`; server-sent events with
    /// --stream; the key as `Authorization: Bearer`).
    #[arg(long, value_enum, default_value_t = Protocol::Grpc, help_heading = "Target")]
    pub protocol: Protocol,
    /// Model to ask for (`sim` is instant; `sim-slow`, `sim-flaky-3`, `sim-429` inject delays and faults).
    #[arg(long, default_value = "sim", help_heading = "Target")]
    pub model: String,
    /// Sent as `x-api-key` metadata on every call.
    #[arg(long, env = "LLMESH_API_KEY", hide_env_values = true, help_heading = "Target")]
    pub api_key: Option<String>,
    /// Call GenerateStream instead of Generate, and report time to first token.
    #[arg(long, help_heading = "Target")]
    pub stream: bool,
    /// Deadline of each call (sent as `grpc-timeout`, and enforced here too).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, help_heading = "Target")]
    pub timeout: Duration,
    /// PEM CA certificates to check an `https://` target's certificate against [default: the
    /// system's roots].
    #[arg(long, value_name = "FILE", help_heading = "Target")]
    pub cacert: Option<PathBuf>,
    /// PEM client certificate to present (a target that requires mTLS); with --key.
    #[arg(long, value_name = "FILE", requires = "key", help_heading = "Target")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, value_name = "FILE", requires = "cert", help_heading = "Target")]
    pub key: Option<PathBuf>,
    /// HTTP/2 connections to spread calls over, round-robin [default: the CPU count, from 1 to 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024), help_heading = "Target")]
    pub connections: Option<u32>,

    /// Prompts to send, one per line, or `WEIGHT<TAB>PROMPT` to weight a line (default weight 1;
    /// blank lines and lines starting with `#` are skipped) [default: the seed's three prompts,
    /// weighted 3:2:1].
    #[arg(long, value_name = "FILE", help_heading = "Workload")]
    pub prompts: Option<PathBuf>,
    /// Append a nonce unique to each request, so that every call misses the cache. Without it,
    /// prompts repeat and, behind the gateway, mostly hit the cache.
    #[arg(long, help_heading = "Workload")]
    pub unique: bool,
    /// `max_tokens` of each request (0: the model's default).
    #[arg(long, value_name = "N", default_value_t = 0, help_heading = "Workload")]
    pub max_tokens: u32,
    /// Seed of the prompt choice: the same seed sends the same prompts in the same order
    /// [default: random].
    #[arg(long, value_name = "N", help_heading = "Workload")]
    pub seed: Option<u64>,

    /// Open loop: start this many requests per second whatever the responses do. Latency counts
    /// from each request's intended start, so a slow server is not hidden by a late client.
    #[arg(long, value_name = "R", conflicts_with = "concurrency", value_parser = parse_rate, help_heading = "Load")]
    pub rate: Option<f64>,
    /// Closed loop: keep this many calls in flight, each starting when the previous ends
    /// [default: 8, when --rate is not given].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000), help_heading = "Load")]
    pub concurrency: Option<u32>,
    /// Open loop only: the most calls in flight at once. Past it, starts wait (and their latency,
    /// counted from the intended start, shows it).
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Load")]
    pub max_in_flight: u32,
    /// Stop starting requests after this long, e.g. `30s`, `2m`, `500ms` [default: 10s when
    /// --requests is not given].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = "Load")]
    pub duration: Option<Duration>,
    /// Stop after starting this many requests.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), help_heading = "Load")]
    pub requests: Option<u64>,
    /// After the run stops starting requests, how long calls still in flight may take before they
    /// are abandoned (and counted as such).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration, help_heading = "Load")]
    pub grace: Duration,

    /// Also write the report as JSON to FILE (`-`: JSON on stdout, and the human report on stderr).
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub json: Option<String>,
}

const AFTER_HELP: &str = "\
Examples:
  llmesh load --duration 30s --concurrency 16
  llmesh load --rate 200 --duration 1m --unique --stream
  llmesh load --service generation --target 127.0.0.1:50052 --rate 500 --requests 10000
  llmesh load --prompts prompts.txt --json report.json
  llmesh load --protocol http --rate 200 --duration 30s --unique --stream

Ctrl-C stops the run early and still prints the report.";

/// The service whose API `llmesh load` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    /// `llmesh.gateway.v1.Gateway`.
    Gateway,
    /// `llmesh.generation.v1.Generation`.
    Generation,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Generation => "generation",
        }
    }

    /// The fully qualified gRPC service name.
    pub fn grpc_name(self) -> &'static str {
        match self {
            Self::Gateway => llmesh_proto::gateway::v1::gateway_server::SERVICE_NAME,
            Self::Generation => llmesh_proto::generation::v1::generation_server::SERVICE_NAME,
        }
    }
}

/// The protocol `llmesh load` calls with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Grpc,
    /// OpenAI chat completions over HTTP/1.1 (the gateway only).
    Http,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Http => "http",
        }
    }
}

/// Where `--json` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonOut {
    Stdout,
    File(PathBuf),
}

/// The TLS of an `https://` target: the CA to check it against (the system's roots without one),
/// and a client certificate.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca: Option<Vec<u8>>,
    /// Certificate chain and key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A validated `llmesh load` invocation.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: String,
    /// Set for an `https://` target.
    pub tls: Option<TlsFiles>,
    pub service: Service,
    pub protocol: Protocol,
    pub model: String,
    pub api_key: Option<AsciiMetadataValue>,
    pub stream: bool,
    pub max_tokens: u32,
    pub connections: usize,
    pub prompts: Option<PathBuf>,
    pub unique: bool,
    pub seed: u64,
    pub run: RunPlan,
    pub json: Option<JsonOut>,
}

impl LoadArgs {
    /// Resolves defaults and checks what clap cannot.
    pub fn plan(self) -> anyhow::Result<Plan> {
        let default_target = match self.service {
            Service::Gateway => GATEWAY_TARGET,
            Service::Generation => GENERATION_TARGET,
        };
        let target = normalize_target(self.target.as_deref().unwrap_or(default_target))?;
        let api_key = match self.api_key {
            None => None,
            Some(key) => {
                let printable = !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
                let value = MetadataValue::try_from(key.as_str()).ok().filter(|_| printable);
                Some(value.context("--api-key must be printable ASCII (it is sent as gRPC metadata)")?)
            }
        };
        if self.timeout.is_zero() {
            bail!("--timeout must be more than 0");
        }
        if self.model.is_empty() {
            bail!("--model must not be empty");
        }
        if self.protocol == Protocol::Http && self.service == Service::Generation {
            bail!("--protocol http calls the gateway's HTTP routes; generation speaks gRPC only");
        }
        let mode = match (self.rate, self.concurrency) {
            (Some(rate), _) => Mode::Open { rate, max_in_flight: self.max_in_flight as usize },
            (None, concurrency) => Mode::Closed { concurrency: concurrency.unwrap_or(8) as usize },
        };
        let duration = match (self.duration, self.requests) {
            (Some(duration), _) if duration.is_zero() => bail!("--duration must be more than 0"),
            (None, None) => Some(DEFAULT_DURATION),
            (duration, _) => duration,
        };
        let connections = match self.connections {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, usize::from).clamp(1, 4),
        };
        let json = self.json.map(|path| if path == "-" { JsonOut::Stdout } else { JsonOut::File(path.into()) });
        let read = |path: &PathBuf| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
        let https = target.starts_with("https://");
        if !https && (self.cacert.is_some() || self.cert.is_some()) {
            bail!("--cacert, --cert and --key need an https:// --target");
        }
        let tls = match https {
            true => Some(TlsFiles {
                ca: self.cacert.as_ref().map(read).transpose()?,
                identity: match (&self.cert, &self.key) {
                    (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                    _ => None,
                },
            }),
            false => None,
        };
        Ok(Plan {
            target,
            tls,
            service: self.service,
            protocol: self.protocol,
            model: self.model,
            api_key,
            stream: self.stream,
            max_tokens: self.max_tokens,
            connections,
            prompts: self.prompts,
            unique: self.unique,
            seed: self.seed.unwrap_or_else(|| fastrand::u64(..)),
            run: RunPlan {
                mode,
                duration,
                requests: self.requests,
                timeout: self.timeout,
                grace: self.grace,
                pacing: Pacing::Precise,
            },
            json,
        })
    }
}

/// `host:port` becomes `http://host:port`; URLs with a scheme pass unchanged.
fn normalize_target(target: &str) -> anyhow::Result<String> {
    let target = target.trim();
    let url = if target.contains("://") { target.to_string() } else { format!("http://{target}") };
    let uri: tonic::transport::Uri = url.parse().with_context(|| format!("--target {target:?} is not a URL"))?;
    if uri.host().is_none() {
        bail!("--target {target:?} has no host");
    }
    Ok(url)
}

/// `250ms`, `30s`, `1.5m`, `2h`, `100us`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 500ms, 30s, 2m or 1h"))?;
    let seconds_per_unit = match unit.trim() {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit {other:?} in {text:?}: use us, ms, s, m or h")),
    };
    Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|_| format!("{text:?} is out of range"))
}

/// A positive, finite number of requests per second.
fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text.trim().parse().map_err(|_| format!("{text:?} is not a number"))?;
    if rate.is_finite() && rate > 0.0 && rate <= 1e7 {
        Ok(rate)
    } else {
        Err(format!("the rate must be more than 0 and at most 10000000 requests per second, not {text}"))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadArgs,
    }

    fn plan(args: &[&str]) -> anyhow::Result<Plan> {
        let cli = Cli::try_parse_from(std::iter::once("load").chain(args.iter().copied()))?;
        cli.args.plan()
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn defaults_to_a_ten_second_closed_loop_against_the_gateway() {
        let plan = plan(&[]).unwrap();
        assert_eq!(plan.target, "http://127.0.0.1:50051");
        assert_eq!(plan.service, Service::Gateway);
        assert_eq!(plan.model, "sim");
        assert!(matches!(plan.run.mode, Mode::Closed { concurrency: 8 }));
        assert_eq!(plan.run.duration, Some(Duration::from_secs(10)));
        assert_eq!(plan.run.requests, None);
        assert!((1..=4).contains(&plan.connections));
        assert!(plan.api_key.is_none() && plan.json.is_none());
    }

    #[test]
    fn requests_alone_bound_the_run() {
        let plan = plan(&["--requests", "100"]).unwrap();
        assert_eq!((plan.run.duration, plan.run.requests), (None, Some(100)));
        let plan = super::tests::plan(&["--requests", "100", "--duration", "1m"]).unwrap();
        assert_eq!((plan.run.duration, plan.run.requests), (Some(Duration::from_secs(60)), Some(100)));
    }

    #[test]
    fn generation_has_its_own_default_target_and_bare_addresses_get_a_scheme() {
        assert_eq!(plan(&["--service", "generation"]).unwrap().target, "http://127.0.0.1:50052");
        assert_eq!(plan(&["--target", "10.0.0.1:4000"]).unwrap().target, "http://10.0.0.1:4000");
        assert_eq!(plan(&["--target", "https://mesh.example:443"]).unwrap().target, "https://mesh.example:443");
    }

    #[test]
    fn rate_and_concurrency_are_exclusive_and_checked() {
        let open = plan(&["--rate", "250.5", "--connections", "3", "--json", "-"]).unwrap();
        assert!(matches!(open.run.mode, Mode::Open { rate, max_in_flight: 10_000 } if rate == 250.5));
        assert_eq!(open.connections, 3);
        assert_eq!(open.json, Some(JsonOut::Stdout));
        assert!(plan(&["--rate", "10", "--concurrency", "2"]).is_err());
        assert!(plan(&["--rate", "0"]).is_err());
        assert!(plan(&["--rate", "inf"]).is_err());
        assert!(plan(&["--concurrency", "0"]).is_err());
        assert!(plan(&["--requests", "0"]).is_err());
        assert!(plan(&["--duration", "0s"]).is_err());
        assert!(plan(&["--timeout", "0s"]).is_err());
        assert!(plan(&["--api-key", "clé"]).is_err());
        assert_eq!(plan(&["--protocol", "http"]).unwrap().protocol, Protocol::Http);
        assert_eq!(plan(&[]).unwrap().protocol, Protocol::Grpc);
        assert!(plan(&["--protocol", "http", "--service", "generation"]).is_err());
    }
}

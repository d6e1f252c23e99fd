//! Spend budgets through real gateways and a real Redis: one team budget under concurrent unary,
//! streaming and HTTP calls on two gateways settles to exactly the cost of the usage the clients
//! received and never past the budget; each path is charged as documented (a cache hit, a
//! fallback to the secondary model, a job, a cancelled stream, an unpriced model); a Redis that
//! stops answering and comes back loses and double-counts nothing.
//!
//! Prices are whole micro-dollars per token (input $1,000 and output $2,000 per million tokens:
//! 1,000,000 and 2,000,000 nano-dollars a token), so every expected cost is an exact integer.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use llmesh_e2e::{Mesh, MeshOptions, Proc, Redis, run_to_exit};
use llmesh_proto::{
    common::v1::{CachePolicy, Usage},
    gateway::v1::{
        GenerateRequest, GenerateStreamRequest, GetJobRequest, JobState, SubmitJobRequest,
        gateway_client::GatewayClient,
    },
    health::v1::{ServingStatus, StatusRequest, mesh_health_client::MeshHealthClient},
};
use serde_json::{Value, json};
use tonic::{Code, transport::Channel};

/// Nano-dollars per input and output token of `sim` (and of the models priced like it).
const SIM_IN: u64 = 1_000_000;
const SIM_OUT: u64 = 2_000_000;
/// `sim-error` is dearer, so that a fallback charged at the wrong model's price shows.
const ERROR_IN: u64 = 5_000_000;
const ERROR_OUT: u64 = 9_000_000;
const MAX_TOKENS: u32 = 8;
const DOLLAR: u64 = 1_000_000_000;

fn cost(usage: &Usage, input: u64, output: u64) -> u64 {
    u64::from(usage.prompt_tokens) * input + u64::from(usage.completion_tokens) * output
}

/// The most the gateway reserves for a prompt at a price: the most tokens any provider can count
/// for it (its bytes plus the framing of a request, a message and a part:
/// `llmesh_proto::validate::prompt_tokens_bound`) plus `MAX_TOKENS`.
fn reservation(prompt: &str, input: u64, output: u64) -> u64 {
    use llmesh_proto::validate::{BOUND_MESSAGE_TOKENS, BOUND_PART_TOKENS, BOUND_REQUEST_TOKENS};
    let framing = u64::from(BOUND_REQUEST_TOKENS + BOUND_MESSAGE_TOKENS + BOUND_PART_TOKENS);
    (prompt.len() as u64 + framing) * input + u64::from(MAX_TOKENS) * output
}

struct Setup {
    config: tempfile::NamedTempFile,
    keys_file: tempfile::NamedTempFile,
    /// The API keys, by id.
    keys: Vec<(String, String)>,
}

impl Setup {
    /// A config file for the whole mesh and a keys file with `keys` (id, extra TOML) and `teams`
    /// (raw `[[teams]]` tables).
    fn new(redis: &Redis, keys: &[(&str, &str)], teams: &str, gateway_extra: &str) -> Self {
        let mut keys_text = String::new();
        let mut made = Vec::new();
        for (id, extra) in keys {
            let (key, entry) = llmesh_keys::generate_key(id);
            keys_text.push_str(&format!(
                "[[keys]]\nid = \"{id}\"\nprefix = \"{}\"\nsha256 = \"{}\"\n{extra}\n\n",
                entry.prefix, entry.sha256
            ));
            made.push((id.to_string(), key));
        }
        keys_text.push_str(teams);
        let keys_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(keys_file.path(), keys_text).unwrap();
        let url = redis.url();
        let config = format!(
            r#"
[gateway.auth]
keys_file = "{keys}"

[gateway.rate_limit]
redis_url = "{url}"
redis_timeout_ms = 2000

[gateway.queue]
redis_url = "{url}"

[gateway.prices.sim]
input_per_million = 1000.0
output_per_million = 2000.0

[gateway.prices.sim-slow]
input_per_million = 1000.0
output_per_million = 2000.0

[gateway.prices.sim-error]
input_per_million = 5000.0
output_per_million = 9000.0

{gateway_extra}

[generation.queue]
redis_url = "{url}"

[generation.queue.options]
max_retries = 0
"#,
            keys = keys_file.path().display(),
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), config).unwrap();
        Self { config: file, keys_file, keys: made }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![("LLMESH_CONFIG", self.config.path().display().to_string())]
    }

    fn key(&self, id: &str) -> &str {
        &self.keys.iter().find(|(i, _)| i == id).unwrap().1
    }

    fn keys_file(&self) -> &Path {
        self.keys_file.path()
    }
}

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-api-key", key.parse().unwrap());
    request
}

/// A prompt of words of four letters or more.
fn words(label: &str, n: usize) -> String {
    let mut text = format!("budget check {label}");
    for i in 0..n {
        text.push_str(&format!(" word{i:03}"));
    }
    text
}

fn unary(model: &str, prompt: &str) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        prompt: prompt.into(),
        max_tokens: MAX_TOKENS,
        cache: CachePolicy::Bypass.into(),
        ..Default::default()
    }
}

fn streamed(model: &str, prompt: &str) -> GenerateStreamRequest {
    GenerateStreamRequest {
        model: model.into(),
        prompt: prompt.into(),
        max_tokens: MAX_TOKENS,
        cache: CachePolicy::Bypass.into(),
        ..Default::default()
    }
}

/// One bucket's level as `llmesh spend --json` reads it from Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Level {
    spent: u64,
    held: u64,
}

async fn spend(redis: &Redis, who: &[&str], keys_file: &Path) -> (Level, Value) {
    let mut args = vec!["spend", "--redis"];
    let url = redis.url();
    args.push(&url);
    args.extend_from_slice(who);
    let file = keys_file.display().to_string();
    args.extend(["--keys-file", &file, "--json"]);
    let (status, logs) = run_to_exit("llmesh", &args, &[], Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "llmesh spend failed: {logs}");
    let line = logs.lines().find(|line| line.starts_with('{')).unwrap_or_else(|| panic!("no JSON: {logs}"));
    let report: Value = serde_json::from_str(line).unwrap();
    let level = Level { spent: report["spent_nanos"].as_u64().unwrap(), held: report["held_nanos"].as_u64().unwrap() };
    (level, report)
}

/// Waits until nothing is held in `who`'s bucket (every settlement ran), at most 10 s.
async fn settled(redis: &Redis, who: &[&str], keys_file: &Path) -> (Level, Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (level, report) = spend(redis, who, keys_file).await;
        if level.held == 0 || Instant::now() > deadline {
            return (level, report);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `curl -i` of an OpenAI chat completion: status, headers, body.
async fn chat(gateway: std::net::SocketAddr, key: &str, prompt: &str) -> (u16, String, Value) {
    let body = json!({"model": "sim", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": prompt}]})
        .to_string();
    let url = format!("http://{gateway}/v1/chat/completions");
    let auth = format!("authorization: Bearer {key}");
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", "20", "-H", "content-type: application/json", "-H", &auth])
        .args(["-H", "x-llmesh-cache: bypass", "--data-binary", &body, &url])
        .output()
        .await
        .expect("curl");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {text:?}"));
    let status = head.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap();
    (status, head.to_ascii_lowercase(), serde_json::from_str(body).unwrap_or(Value::Null))
}

fn chat_usage(body: &Value) -> Usage {
    let tokens = |name: &str| body["usage"][name].as_u64().unwrap() as u32;
    Usage {
        prompt_tokens: tokens("prompt_tokens"),
        completion_tokens: tokens("completion_tokens"),
        ..Default::default()
    }
}

/// What concurrent clients saw: the cost of what they were answered, and the calls refused.
#[derive(Default)]
struct Tally {
    cost: AtomicU64,
    answered: AtomicU64,
    refused: AtomicU64,
    /// The largest reservation any call asked for.
    largest: AtomicU64,
}

#[tokio::test]
async fn two_gateways_share_one_team_budget_to_the_nano_dollar() {
    let redis = Redis::start().await.unwrap();
    let limit = DOLLAR / 2;
    let setup = Setup::new(
        &redis,
        &[("alice", "team = \"search\""), ("bob", "team = \"search\"")],
        "[[teams]]\nname = \"search\"\nbudget = { usd = 0.5, period = \"day\" }\n",
        // Metrics, for the budget gauges.
        "[gateway.admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let mesh = Mesh::start_with(MeshOptions { env: setup.env(), ..Default::default() }).await;
    let second = mesh.second_gateway(&setup.env()).await;
    let gateways = [&mesh.gateway, &second];

    // Per gateway and key: a gRPC client alternating unary calls and streams, and an HTTP client.
    let tally = Arc::new(Tally::default());
    const CALLS: usize = 12;
    let mut tasks = Vec::new();
    for (g, gateway) in gateways.iter().enumerate() {
        for id in ["alice", "bob"] {
            let key = setup.key(id).to_string();
            let channel = gateway.channel().await;
            let grpc_tally = tally.clone();
            tasks.push(tokio::spawn(async move {
                let tally = grpc_tally;
                let mut client = GatewayClient::new(channel);
                for call in 0..CALLS {
                    let prompt = words(&format!("grpc{g}{id}{call}"), 3 + call % 4);
                    tally.largest.fetch_max(reservation(&prompt, SIM_IN, SIM_OUT), Relaxed);
                    let outcome = if call % 2 == 0 {
                        client.generate(with_key(unary("sim", &prompt), &key)).await.map(|r| r.into_inner().usage)
                    } else {
                        match client.generate_stream(with_key(streamed("sim", &prompt), &key)).await {
                            Ok(stream) => {
                                let mut stream = stream.into_inner();
                                let mut usage = None;
                                while let Some(chunk) = stream.message().await.unwrap() {
                                    usage = chunk.usage.or(usage);
                                }
                                Ok(usage)
                            }
                            Err(status) => Err(status),
                        }
                    };
                    match outcome {
                        Ok(usage) => {
                            tally.cost.fetch_add(cost(&usage.unwrap(), SIM_IN, SIM_OUT), Relaxed);
                            tally.answered.fetch_add(1, Relaxed);
                        }
                        Err(status) => {
                            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                            assert!(status.message().starts_with("budget: team search"), "{status:?}");
                            tally.refused.fetch_add(1, Relaxed);
                        }
                    }
                }
            }));
            let http = gateway.addr;
            let key = setup.key(id).to_string();
            let http_tally = tally.clone();
            tasks.push(tokio::spawn(async move {
                let tally = http_tally;
                for call in 0..CALLS / 2 {
                    let prompt = words(&format!("http{g}{id}{call}"), 4);
                    tally.largest.fetch_max(reservation(&prompt, SIM_IN, SIM_OUT), Relaxed);
                    let (status, head, body) = chat(http, &key, &prompt).await;
                    match status {
                        200 => {
                            tally.cost.fetch_add(cost(&chat_usage(&body), SIM_IN, SIM_OUT), Relaxed);
                            tally.answered.fetch_add(1, Relaxed);
                            assert!(head.contains("x-budget-remaining-usd:"), "{head}");
                        }
                        429 => {
                            assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
                            assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
                            tally.refused.fetch_add(1, Relaxed);
                        }
                        other => panic!("HTTP {other}: {body}"),
                    }
                }
            }));
        }
    }
    let clients = tasks.len() as u64;
    for task in tasks {
        task.await.unwrap();
    }

    let file = setup.keys_file();
    let (team, report) = settled(&redis, &["--team", "search"], file).await;
    let (alice, _) = settled(&redis, &["--key", "alice"], file).await;
    let (bob, _) = settled(&redis, &["--key", "bob"], file).await;
    let expected = tally.cost.load(Relaxed);
    let refused = tally.refused.load(Relaxed);
    eprintln!(
        "answered {}, refused {refused}, settled ${:.9}, clients' cost ${:.9}",
        tally.answered.load(Relaxed),
        team.spent as f64 / 1e9,
        expected as f64 / 1e9
    );
    assert_eq!(team, Level { spent: expected, held: 0 }, "the settled total is the clients' cost: {report}");
    assert_eq!(alice.spent + bob.spent, team.spent, "each call counted in its key's bucket and the team's");
    // Exact only while Redis answers: a replica deciding alone may overshoot (the documented way).
    let alone = [&mesh.gateway, &second].iter().any(|gateway| gateway.logs().contains("Redis unavailable"));
    assert!(!alone, "Redis did not answer within 2 s: the gateways decided alone");
    assert!(team.spent <= limit, "never past the budget: {report}");
    assert_eq!(report["limit_nanos"].as_u64(), Some(limit));
    // The budget was reached (the clients asked for more than it holds) ...
    assert!(refused > 0, "no call was refused: the test did not reach the budget");
    // ... and calls were refused only while the reservations in flight could have taken the rest:
    // a refusal means spent + held + its reservation > limit, and held is at most one reservation
    // per other client, so what was spent in the end is within one reservation per client of it.
    let bound = clients * tally.largest.load(Relaxed);
    assert!(
        team.spent + bound > limit,
        "refused with ${} spent of ${}: more than the bound of ${} early",
        team.spent,
        limit,
        bound
    );
    // Each gateway's gauges show the team's budget as Redis last reported it to that gateway.
    for gateway in gateways {
        let team_budget = "name=\"search\"";
        let shown_limit = gateway.metric_sum("llmesh_budget_limit_usd", team_budget).await;
        assert_eq!(shown_limit, limit as f64 / 1e9, "{}", gateway.name);
        let shown_spent = gateway.metric_sum("llmesh_budget_spent_usd", team_budget).await;
        assert!(shown_spent > 0.0 && shown_spent <= team.spent as f64 / 1e9, "{} shows ${shown_spent}", gateway.name);
        let shown_remaining = gateway.metric_sum("llmesh_budget_remaining_usd", team_budget).await;
        assert!(shown_remaining < shown_limit, "{} shows ${shown_remaining} left", gateway.name);
    }
}

/// The MeshHealth component that says how a gateway enforces the budgets.
async fn budget_health(gateway: &Proc) -> ServingStatus {
    let mut health = MeshHealthClient::new(gateway.channel().await);
    let status = health.status(StatusRequest {}).await.unwrap().into_inner();
    let component = status.components.iter().find(|c| c.name == "budget-store").expect("a budget-store component");
    component.status()
}

#[tokio::test]
async fn each_path_is_charged_as_documented() {
    let redis = Redis::start().await.unwrap();
    let setup = Setup::new(
        &redis,
        &[("wide", "budget = { usd = 100.0 }"), ("tiny", "budget = { usd = 0.3, period = \"day\" }")],
        "",
        "[gateway.fallback]\nsecondary_model = \"sim\"\n\n[gateway.generation.retry]\nmax_attempts = 1\n",
    );
    let mesh = Mesh::start_with(MeshOptions { env: setup.env(), ..Default::default() }).await;
    let mut gateway = mesh.gateway().await;
    let (file, wide) = (setup.keys_file(), setup.key("wide"));
    let who = ["--key", "wide"];
    let mut spent = 0;
    assert_eq!(budget_health(&mesh.gateway).await, ServingStatus::Serving);

    // A unary call: its usage at its model's price, and what is left in the metadata.
    let response = gateway.generate(with_key(unary("sim", &words("plain", 3)), wide)).await.unwrap();
    let left = response.metadata().get("x-budget-remaining-usd").unwrap().to_str().unwrap().to_string();
    spent += cost(&response.into_inner().usage.unwrap(), SIM_IN, SIM_OUT);
    assert_eq!(settled(&redis, &who, file).await.0.spent, spent);
    assert_eq!(left, format!("{:.6}", (100 * DOLLAR - spent) as f64 / 1e9), "what is left after this call");

    // A cache hit costs nothing (`cache_hit_share` 0, the default).
    let cacheable = GenerateRequest {
        cache: CachePolicy::Default.into(),
        temperature: Some(0.0),
        ..unary("sim", &words("cached", 3))
    };
    // The answer is stored in the background: until it is there, a call generates (and pays) again.
    let mut hit = None;
    for _ in 0..50 {
        let answer = gateway.generate(with_key(cacheable.clone(), wide)).await.unwrap().into_inner();
        if answer.cached {
            hit = Some(answer);
            break;
        }
        spent += cost(&answer.usage.unwrap(), SIM_IN, SIM_OUT);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(hit.expect("the answer was cached").usage.is_some());
    assert_eq!(settled(&redis, &who, file).await.0.spent, spent, "the hit was free");

    // The fallback's secondary model answers a failing one: charged at the secondary's price.
    let degraded =
        gateway.generate(with_key(unary("sim-error", &words("fallback", 3)), wide)).await.unwrap().into_inner();
    assert_eq!(degraded.degraded.as_ref().unwrap().source, "secondary_model", "{degraded:?}");
    assert_eq!(degraded.model, "sim");
    let usage = degraded.usage.unwrap();
    spent += cost(&usage, SIM_IN, SIM_OUT);
    assert_ne!(cost(&usage, SIM_IN, SIM_OUT), cost(&usage, ERROR_IN, ERROR_OUT));
    assert_eq!(settled(&redis, &who, file).await.0.spent, spent, "at the secondary model's price");

    // A job: reserved at submit, settled by the worker with its answer's usage.
    let job =
        SubmitJobRequest { model: "sim".into(), prompt: words("job", 4), max_tokens: MAX_TOKENS, ..Default::default() };
    let id = gateway.submit_job(with_key(job, wide)).await.unwrap().into_inner().job.unwrap().id;
    let done = llmesh_e2e::eventually(Duration::from_secs(10), || {
        let (mut gateway, id) = (gateway.clone(), id.clone());
        async move {
            let job = gateway.get_job(with_key(GetJobRequest { job_id: id }, wide)).await.unwrap().into_inner().job?;
            (job.state() == JobState::Succeeded).then_some(job)
        }
    })
    .await
    .expect("the job succeeded");
    spent += cost(&done.result.unwrap().usage.unwrap(), SIM_IN, SIM_OUT);
    assert_eq!(settled(&redis, &who, file).await.0.spent, spent, "the worker settled the job's real cost");

    // A job that fails for good (dead-lettered: no retries here) costs nothing: its reservation
    // goes back whole.
    let failing = SubmitJobRequest {
        model: "sim-error".into(),
        prompt: words("dead", 4),
        max_tokens: MAX_TOKENS,
        ..Default::default()
    };
    let id = gateway.submit_job(with_key(failing, wide)).await.unwrap().into_inner().job.unwrap().id;
    let ended = llmesh_e2e::eventually(Duration::from_secs(10), || {
        let (mut gateway, id) = (gateway.clone(), id.clone());
        async move {
            let job = gateway.get_job(with_key(GetJobRequest { job_id: id }, wide)).await.unwrap().into_inner().job?;
            matches!(job.state(), JobState::DeadLettered | JobState::Failed).then_some(job)
        }
    })
    .await
    .expect("the failing job ended");
    assert_eq!(settled(&redis, &who, file).await.0, Level { spent, held: 0 }, "{ended:?}: refunded whole");

    // A stream the client drops after its first chunk pays for its prompt and what it was sent:
    // at least what the client read, at most the reservation.
    let prompt = words("cancelled", 3);
    let slow = GenerateStreamRequest { max_tokens: 64, ..streamed("sim-slow", &prompt) };
    let mut stream = gateway.generate_stream(with_key(slow, wide)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    drop(stream);
    let charged = settled(&redis, &who, file).await.0.spent - spent;
    let prompt_estimate = (prompt.len() as u64).div_ceil(4);
    let read = (first.delta.len() as u64).div_ceil(4);
    assert!(charged >= prompt_estimate * SIM_IN + read * SIM_OUT, "charged {charged} for what it read");
    assert!(charged <= prompt_estimate * SIM_IN + 64 * SIM_OUT, "charged {charged}: more than the reservation");
    spent += charged;

    // A model without a price is refused under a budget, never served free.
    let unpriced = gateway.generate(with_key(unary("sim-flaky-7", &words("free", 2)), wide)).await.unwrap_err();
    assert_eq!(unpriced.code(), Code::FailedPrecondition, "{unpriced:?}");
    assert!(unpriced.message().contains("no price"), "{unpriced:?}");
    assert_eq!(settled(&redis, &who, file).await.0.spent, spent);

    // Over budget: RESOURCE_EXHAUSTED naming the budget on gRPC, 429 insufficient_quota on HTTP.
    let tiny = setup.key("tiny");
    let mut refused = None;
    for call in 0..20 {
        match gateway.generate(with_key(unary("sim", &words(&format!("tiny{call:02}"), 3)), tiny)).await {
            Ok(_) => {}
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    // Each call reserves $0.123 (107 tokens of prompt bound, 8 of output) and costs at most $0.022.
    let refused = refused.expect("a $0.30 budget runs out within 20 calls of up to $0.022");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().starts_with("budget: key tiny has spent $0.1"), "{refused:?}");
    assert!(refused.message().contains("of its $0.300000 budget for the day"), "{refused:?}");
    assert_eq!(refused.metadata().get("grpc-retry-pushback-ms").unwrap(), "-1");
    let (status, head, body) = chat(mesh.gateway.addr, tiny, &words("http", 3)).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    assert!(head.contains("x-budget-remaining-usd:"), "{head}");
}

#[tokio::test]
async fn redis_pausing_then_back_loses_and_double_counts_nothing() {
    let redis = Redis::start().await.unwrap();
    let setup = Setup::new(&redis, &[("steady", "budget = { usd = 1000.0 }")], "", "[gateway.budget]\nreplicas = 2\n");
    // Short Redis timeouts, so that calls during the pause are decided alone rather than waiting.
    let mut env = setup.env();
    env.push(("LLMESH_GATEWAY_RATE_LIMIT__REDIS_TIMEOUT_MS", "30".into()));
    let mesh = Mesh::start_with(MeshOptions { env: env.clone(), ..Default::default() }).await;
    let second = mesh.second_gateway(&env).await;
    let key = setup.key("steady").to_string();
    let total = Arc::new(AtomicU64::new(0));

    // Calls from both gateways before, during and after a pause of Redis: every command sent
    // during it, reservations and settlements alike, runs only when it ends, long after the
    // gateways gave up waiting for it.
    let (first, other) = (mesh.gateway.channel().await, second.channel().await);
    let run = |channel: Channel, label: &'static str, calls: usize| {
        let (key, total) = (key.clone(), total.clone());
        async move {
            let mut client = GatewayClient::new(channel);
            for call in 0..calls {
                let prompt = words(&format!("{label}{call}"), 3);
                let response = client.generate(with_key(unary("sim", &prompt), &key)).await.unwrap().into_inner();
                total.fetch_add(cost(&response.usage.unwrap(), SIM_IN, SIM_OUT), Relaxed);
            }
        }
    };
    futures::join!(run(first.clone(), "before-a", 10), run(other.clone(), "before-b", 10));
    let pause = tokio::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "CLIENT", "PAUSE", "1500", "ALL"])
        .output()
        .await
        .unwrap();
    assert!(pause.status.success(), "{pause:?}");
    let paused_at = Instant::now();
    let mut degraded_seen = false;
    while paused_at.elapsed() < Duration::from_millis(1_000) {
        futures::join!(run(first.clone(), "during-a", 2), run(other.clone(), "during-b", 2));
        degraded_seen |= budget_health(&mesh.gateway).await == ServingStatus::Degraded;
    }
    assert!(degraded_seen, "the gateway's health never showed the budgets enforced alone");
    futures::join!(run(first.clone(), "after-a", 10), run(other.clone(), "after-b", 10));

    // Once both gateways caught up (their health says the budgets are shared again) everything is
    // in Redis once: the spend decided alone added, the settlements that waited applied, the
    // reservations whose replies were lost voided.
    for gateway in [&mesh.gateway, &second] {
        let caught_up = llmesh_e2e::eventually(Duration::from_secs(15), || async {
            (budget_health(gateway).await == ServingStatus::Serving).then_some(())
        })
        .await;
        assert!(caught_up.is_some(), "{} never caught up with Redis", gateway.name);
    }
    let (level, report) = settled(&redis, &["--key", "steady"], setup.keys_file()).await;
    assert_eq!(level, Level { spent: total.load(Relaxed), held: 0 }, "{report}");
}

/// The attack on a quarter-byte estimate: a prompt of one-letter words (`"a a a …"`, a token a word
/// for `sim`, twice the estimate) with `max_tokens: 1`. Reserved at a quarter-byte a token
/// ($0.197 here) and charged its real $0.392, it took a $1 budget to $1.176 one call at a time, and
/// to about $2 with twenty at once. Reserved at the prompt's byte bound, never past the budget.
#[tokio::test]
async fn one_letter_words_never_take_a_team_past_its_budget() {
    let redis = Redis::start().await.unwrap();
    let limit = DOLLAR;
    let team = |name: &str| format!("[[teams]]\nname = \"{name}\"\nbudget = {{ usd = 1.0, period = \"day\" }}\n\n");
    let setup = Setup::new(
        &redis,
        &[("lone", "team = \"one\""), ("left", "team = \"swarm\""), ("right", "team = \"swarm\"")],
        &(team("one") + &team("swarm")),
        "",
    );
    let mesh = Mesh::start_with(MeshOptions { env: setup.env(), ..Default::default() }).await;
    let second = mesh.second_gateway(&setup.env()).await;
    let file = setup.keys_file();
    let attack = |call: usize| GenerateRequest {
        max_tokens: 1,
        ..unary("sim", &format!("{call:02} {}", "a ".repeat(390).trim_end()))
    };

    // One call at a time.
    let mut gateway = mesh.gateway().await;
    let (mut answered, mut spent) = (0, 0);
    for call in 0..5 {
        match gateway.generate(with_key(attack(call), setup.key("lone"))).await {
            Ok(response) => {
                let usage = response.into_inner().usage.unwrap();
                assert_eq!(usage.prompt_tokens, 391, "sim counts a token a word");
                spent += cost(&usage, SIM_IN, SIM_OUT);
                answered += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().starts_with("budget: team one"), "{status:?}");
            }
        }
        let (level, report) = settled(&redis, &["--team", "one"], file).await;
        assert!(level.spent <= limit, "past the budget after call {call}: {report}");
        assert_eq!(level, Level { spent, held: 0 }, "charged what the calls cost: {report}");
    }
    assert!(answered >= 1, "the attack was never admitted: the test proves nothing");
    assert!(answered < 5, "never refused: the budget was not reached");

    // Twenty at once from two keys of a team, on two gateways.
    let mut tasks = Vec::new();
    for call in 0..20 {
        let gateway = if call % 2 == 0 { &mesh.gateway } else { &second };
        let mut client = GatewayClient::new(gateway.channel().await);
        let key = setup.key(if call % 2 == 0 { "left" } else { "right" }).to_string();
        let request = attack(call);
        tasks.push(tokio::spawn(async move { client.generate(with_key(request, &key)).await }));
    }
    let (mut answered, mut spent) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(response) => {
                spent += cost(&response.into_inner().usage.unwrap(), SIM_IN, SIM_OUT);
                answered += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().starts_with("budget: team swarm"), "{status:?}");
            }
        }
    }
    let (level, report) = settled(&redis, &["--team", "swarm"], file).await;
    eprintln!("twenty at once: {answered} answered, ${:.9} spent of $1", level.spent as f64 / 1e9);
    assert!(answered >= 1, "none admitted: the test proves nothing");
    assert!(level.spent <= limit, "past the budget: {report}");
    assert_eq!(level, Level { spent, held: 0 }, "charged what the answered calls cost: {report}");
}

/// A busy key's calls take their money from slices the gateway reserved ahead; a gateway that
/// stops settles them first, so nothing stays held and the spend is what the calls cost.
#[tokio::test]
async fn a_stopping_gateway_settles_the_slices_it_reserved() {
    let redis = Redis::start().await.unwrap();
    let setup = Setup::new(
        &redis,
        &[("busy", "team = \"big\"")],
        "[[teams]]\nname = \"big\"\nbudget = { usd = 1000.0, period = \"day\" }\n",
        "",
    );
    let mut mesh = Mesh::start_with(MeshOptions { env: setup.env(), ..Default::default() }).await;
    let key = setup.key("busy").to_string();
    let spent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for caller in 0..4 {
        let mut client = GatewayClient::new(mesh.gateway.channel().await);
        let (key, spent) = (key.clone(), spent.clone());
        tasks.push(tokio::spawn(async move {
            for call in 0..25 {
                let request = unary("sim", &words(&format!("slice{caller}x{call}"), 3 + call % 5));
                let usage = client.generate(with_key(request, &key)).await.unwrap().into_inner().usage.unwrap();
                spent.fetch_add(cost(&usage, SIM_IN, SIM_OUT), Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // At once, before a slice's life (100 ms) ends and the gateway's sweep would settle it.
    mesh.gateway.terminate();
    let status = mesh.gateway.wait(Duration::from_secs(10)).await.expect("the gateway exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", mesh.gateway.logs());
    let (level, report) = spend(&redis, &["--team", "big"], setup.keys_file()).await;
    assert_eq!(level, Level { spent: spent.load(Relaxed), held: 0 }, "nothing held after the stop: {report}");
    assert!(mesh.gateway.logs().contains("budget slices settled"), "no slice was used: {}", mesh.gateway.logs());
}

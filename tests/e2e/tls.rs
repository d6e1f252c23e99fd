//! Trust inside the mesh, with the real binaries: TLS at the gateway, mTLS between the services,
//! certificates and API keys replaced on disk while the mesh runs, and Redis over TLS with a
//! password. Certificates come from `llmesh certs new`, as an operator would make them.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use llmesh_e2e::{Mesh, MeshOptions, Proc, Redis, bin, eventually};
use llmesh_proto::{
    cache::v1::{StatsRequest, StoreRequest, cache_client::CacheClient},
    gateway::v1::gateway_client::GatewayClient,
    generation::v1::generation_client::GenerationClient,
    health::v1::{ServingStatus as MeshServing, StatusRequest, mesh_health_client::MeshHealthClient},
};
use tokio::process::Command;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::prompt;

/// The files of one `llmesh certs new --out DIR`.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let output =
            Command::new(bin("llmesh")).args(["certs", "new", "--out"]).arg(dir.path()).output().await.unwrap();
        assert!(output.status.success(), "llmesh certs new failed: {}", String::from_utf8_lossy(&output.stderr));
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn shown(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// A channel to `proc` as a member of the mesh: its CA, its client certificate.
    async fn member(&self, proc: &Proc) -> Result<Channel, String> {
        let (cert, key) = (self.path("client.pem"), self.path("client-key.pem"));
        tls_channel(proc, &self.path("ca.pem"), Some((&cert, &key))).await
    }

    /// The environment `llmesh up --tls` gives each service: a certificate each, mTLS on the
    /// internal ports, the client certificate for the gateway and health.
    fn mesh_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("LLMESH_GATEWAY_TLS__CERT", self.shown("gateway.pem")),
            ("LLMESH_GATEWAY_TLS__KEY", self.shown("gateway-key.pem")),
            ("LLMESH_GENERATION_TLS__CERT", self.shown("generation.pem")),
            ("LLMESH_GENERATION_TLS__KEY", self.shown("generation-key.pem")),
            ("LLMESH_GENERATION_TLS__CLIENT_CA", self.shown("ca.pem")),
            ("LLMESH_CACHE_TLS__CERT", self.shown("cache.pem")),
            ("LLMESH_CACHE_TLS__KEY", self.shown("cache-key.pem")),
            ("LLMESH_CACHE_TLS__CLIENT_CA", self.shown("ca.pem")),
            ("LLMESH_HEALTH_TLS__CERT", self.shown("health.pem")),
            ("LLMESH_HEALTH_TLS__KEY", self.shown("health-key.pem")),
            ("LLMESH_HEALTH_TLS__CLIENT_CA", self.shown("ca.pem")),
        ];
        for (ca, cert, key) in [
            ("LLMESH_GATEWAY_CLIENT_TLS__CA", "LLMESH_GATEWAY_CLIENT_TLS__CERT", "LLMESH_GATEWAY_CLIENT_TLS__KEY"),
            ("LLMESH_HEALTH_CLIENT_TLS__CA", "LLMESH_HEALTH_CLIENT_TLS__CERT", "LLMESH_HEALTH_CLIENT_TLS__KEY"),
        ] {
            env.push((ca, self.shown("ca.pem")));
            env.push((cert, self.shown("client.pem")));
            env.push((key, self.shown("client-key.pem")));
        }
        env
    }
}

/// A TLS channel to `proc` trusting `ca`, presenting `identity` (certificate, key) when given: a
/// client of its own (tonic's TLS), as grpcurl with `-cacert` (and `-cert`, `-key`) would be.
async fn tls_channel(proc: &Proc, ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Channel, String> {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
    }
    let endpoint = Endpoint::from_shared(format!("https://{}", proc.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config(config)
        .unwrap();
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

/// Whether `channel` (if one could be made) gets an answer from `grpc.health.v1`.
async fn answers(channel: Result<Channel, String>) -> bool {
    let Ok(channel) = channel else { return false };
    HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.is_ok()
}

async fn plaintext_answers(proc: &Proc) -> bool {
    answers(Endpoint::from_shared(proc.uri()).unwrap().connect().await.map_err(|e| e.to_string())).await
}

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-api-key", key.parse().unwrap());
    request
}

#[tokio::test]
async fn a_tls_mesh_serves_clients_with_the_ca_and_refuses_plaintext() {
    let certs = Certs::new().await;
    let mesh = Mesh::start_with(MeshOptions { env: certs.mesh_env(), ..Default::default() }).await;
    let ca = certs.path("ca.pem");

    // The gateway's port: the CA is enough (callers bring API keys, not certificates).
    let channel = tls_channel(&mesh.gateway, &ca, None).await.unwrap();
    let mut gateway = GatewayClient::new(channel);
    let first = gateway.generate(prompt("over TLS")).await.unwrap().into_inner();
    assert!(!first.text.is_empty());
    // Through generation and the cache, both over mTLS: equal calls become cache hits (the store
    // happens in the background; the first lookups may spend their budget on the handshake).
    let hit = eventually(Duration::from_secs(5), || {
        let mut gateway = gateway.clone();
        async move { gateway.generate(prompt("over TLS")).await.ok().filter(|r| r.get_ref().cached) }
    })
    .await;
    assert!(hit.is_some(), "the gateway could not store in or read from the cache over mTLS");
    let mut stream = gateway.generate_stream(crate::stream_prompt("streamed over TLS")).await.unwrap().into_inner();
    let mut chunks = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        chunks += usize::from(!chunk.delta.is_empty());
    }
    assert!(chunks > 0);
    assert!(!plaintext_answers(&mesh.gateway).await, "the gateway answered plaintext");

    // Health checked every service over mTLS: the mesh is SERVING.
    let mut health = MeshHealthClient::new(certs.member(&mesh.health).await.unwrap());
    let serving = eventually(Duration::from_secs(10), || {
        let mut health = health.clone();
        async move {
            let status = health.status(StatusRequest {}).await.ok()?.into_inner();
            (status.status() == MeshServing::Serving).then_some(status)
        }
    })
    .await;
    assert!(serving.is_some(), "the mesh never became SERVING over mTLS: {:?}", health.status(StatusRequest {}).await);
}

#[tokio::test]
async fn internal_services_serve_only_the_mesh_certificate() {
    let certs = Certs::new().await;
    let other = Certs::new().await;
    let mesh = Mesh::start_with(MeshOptions { env: certs.mesh_env(), ..Default::default() }).await;
    let ca = certs.path("ca.pem");
    let mesh_client = (certs.path("client.pem"), certs.path("client-key.pem"));
    let foreign_client = (other.path("client.pem"), other.path("client-key.pem"));

    for proc in [&mesh.generation, &mesh.cache, &mesh.health] {
        assert!(!plaintext_answers(proc).await, "{} answered plaintext", proc.name);
        assert!(
            !answers(tls_channel(proc, &ca, None).await).await,
            "{} served a client without a certificate",
            proc.name
        );
        let foreign = tls_channel(proc, &ca, Some((&foreign_client.0, &foreign_client.1))).await;
        assert!(!answers(foreign).await, "{} served a certificate from another CA", proc.name);
        // A server certificate of the mesh is no client certificate (its usage is server auth
        // only): a service whose key leaked cannot call the others with it.
        let (cert, key) = (certs.path("generation.pem"), certs.path("generation-key.pem"));
        let server_cert = tls_channel(proc, &ca, Some((&cert, &key))).await;
        assert!(!answers(server_cert).await, "{} served a mesh server certificate as a client", proc.name);
        let member = tls_channel(proc, &ca, Some((&mesh_client.0, &mesh_client.1))).await;
        assert!(answers(member).await, "{} refused the mesh's client certificate", proc.name);
    }

    // What the issue is about: without a mesh certificate nobody stores a forged answer, nor
    // spends generation's upstream.
    let store = StoreRequest {
        request: Some(llmesh_proto::generation::v1::GenerateRequest {
            model: "sim".into(),
            prompt: "forged".into(),
            ..Default::default()
        }),
        response: Some(llmesh_proto::generation::v1::GenerateResponse {
            model: "sim".into(),
            text: "a forged answer".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Ok(channel) = tls_channel(&mesh.cache, &ca, Some((&foreign_client.0, &foreign_client.1))).await {
        // TLS 1.3: the client may finish its side of the handshake before the server refuses its
        // certificate, so the refusal arrives with the first call.
        assert!(CacheClient::new(channel).store(store.clone()).await.is_err(), "a foreign client stored");
    }
    if let Ok(channel) = tls_channel(&mesh.generation, &ca, None).await {
        let request = llmesh_proto::generation::v1::GenerateRequest {
            model: "sim".into(),
            prompt: "free tokens".into(),
            ..Default::default()
        };
        assert!(GenerationClient::new(channel).generate(request).await.is_err(), "generation served no certificate");
    }
    let member = tls_channel(&mesh.cache, &ca, Some((&mesh_client.0, &mesh_client.1))).await.unwrap();
    assert!(CacheClient::new(member).store(store).await.is_ok(), "the mesh's own client could not store");
}

#[tokio::test]
async fn a_service_with_a_broken_certificate_file_does_not_start() {
    let certs = Certs::new().await;
    let missing = certs.path("no-such.pem");
    let garbage = certs.path("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    for (cert, key, named) in [
        (missing.clone(), certs.path("cache-key.pem"), missing.clone()),
        (garbage.clone(), certs.path("cache-key.pem"), garbage.clone()),
        // A key that is not the certificate's.
        (certs.path("cache.pem"), certs.path("health-key.pem"), certs.path("health-key.pem")),
    ] {
        let env = [
            ("LLMESH_CACHE_TLS__CERT", cert.display().to_string()),
            ("LLMESH_CACHE_TLS__KEY", key.display().to_string()),
        ];
        let (status, logs) =
            llmesh_e2e::run_to_exit("cache", &["--listen", "127.0.0.1:0"], &env, Duration::from_secs(20))
                .await
                .unwrap();
        assert!(!status.success(), "the cache started with {}:\n{logs}", cert.display());
        assert!(logs.contains(&named.display().to_string()), "the error does not name {}:\n{logs}", named.display());
    }
}

#[tokio::test]
async fn certificates_replaced_on_disk_serve_new_connections_without_a_restart() {
    let certs = Certs::new().await;
    let renewed = Certs::new().await;
    // The gateway trusts both CAs for its calls inside the mesh: the services' certificates are
    // renewed by another CA while it runs (a CA rotation's middle step).
    let both = certs.path("both-cas.pem");
    let bundle =
        [std::fs::read(certs.path("ca.pem")).unwrap(), std::fs::read(renewed.path("ca.pem")).unwrap()].concat();
    std::fs::write(&both, bundle).unwrap();
    let mut env = certs.mesh_env();
    env.retain(|(name, _)| *name != "LLMESH_GATEWAY_CLIENT_TLS__CA");
    env.push(("LLMESH_GATEWAY_CLIENT_TLS__CA", both.display().to_string()));
    let mesh = Mesh::start_with(MeshOptions { env, ..Default::default() }).await;
    let (old_ca, new_ca) = (certs.path("ca.pem"), renewed.path("ca.pem"));

    let open = tls_channel(&mesh.gateway, &old_ca, None).await.unwrap();
    let mut before = GatewayClient::new(open);
    assert!(before.generate(prompt("before the renewal")).await.is_ok());
    assert!(!answers(tls_channel(&mesh.gateway, &new_ca, None).await).await, "the new CA was trusted too early");

    // As a Secret update or cert-manager would: each file replaced by a rename; the key first.
    for name in ["gateway-key.pem", "gateway.pem", "generation-key.pem", "generation.pem"] {
        let staged = certs.path(&format!("{name}.new"));
        std::fs::copy(renewed.path(name), &staged).unwrap();
        std::fs::rename(&staged, certs.path(name)).unwrap();
    }
    let renewed_gateway = eventually(Duration::from_secs(10), || async {
        let channel = tls_channel(&mesh.gateway, &new_ca, None).await.ok()?;
        let mut health = HealthClient::new(channel.clone());
        health.check(HealthCheckRequest { service: String::new() }).await.ok()?;
        Some(channel)
    })
    .await
    .expect("new connections never got the renewed certificate");
    // The connection opened before still works, and new calls still reach generation (whose
    // certificate changed under the gateway's open connection too).
    assert!(before.generate(prompt("after the renewal, old connection")).await.is_ok());
    let mut after = GatewayClient::new(renewed_gateway);
    let answer = after.generate(prompt("after the renewal, new connection")).await.unwrap().into_inner();
    assert!(!answer.text.is_empty());
    assert!(!answers(tls_channel(&mesh.gateway, &old_ca, None).await).await, "new connections got the old certificate");
    assert!(!mesh.gateway.logs().contains("keeping the version in use"), "{}", mesh.gateway.logs());
}

/// Writes a keys file of `keys` ((key, id) pairs) at `path`, by a rename.
fn write_keys(path: &Path, entries: &[&llmesh_keys::ApiKey]) {
    let text: String = entries
        .iter()
        .map(|e| format!("[[keys]]\nid = \"{}\"\nprefix = \"{}\"\nsha256 = \"{}\"\n", e.id, e.prefix, e.sha256))
        .collect();
    let staged = path.with_extension("new");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// generation and a gateway on `keys` (admin listener on), without the cache.
async fn gateway_on_keys(keys: &Path) -> (Proc, Proc) {
    let generation = Proc::spawn("generation", &[]).await.unwrap();
    let env = [
        ("LLMESH_GATEWAY_GENERATION__ENDPOINTS", format!("[\"{}\"]", generation.uri())),
        ("LLMESH_GATEWAY_CACHE__ENDPOINT", String::new()),
        ("LLMESH_GATEWAY_AUTH__KEYS_FILE", keys.display().to_string()),
        ("LLMESH_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0".into()),
    ];
    let gateway = Proc::spawn("gateway", &env).await.unwrap();
    (generation, gateway)
}

#[tokio::test]
async fn a_removed_key_is_refused_within_5s_while_another_keys_calls_never_fail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let (leaving_key, leaving) = llmesh_keys::generate_key("leaving");
    let (staying_key, staying) = llmesh_keys::generate_key("staying");
    let (arriving_key, arriving) = llmesh_keys::generate_key("arriving");
    write_keys(&path, &[&leaving, &staying]);
    let (_generation, gateway) = gateway_on_keys(&path).await;
    let client = GatewayClient::new(gateway.channel().await);
    let hello = client.clone().generate(with_key(prompt("hello"), &leaving_key)).await;
    assert!(hello.is_ok(), "{hello:?}\n{}", gateway.logs());

    // Another key's calls, one after another on the same connection, for the whole change.
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(std::sync::Mutex::new(Vec::new())));
    let background = {
        let (stop, calls, failures, mut client) = (stop.clone(), calls.clone(), failures.clone(), client.clone());
        let key = staying_key.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            while !stop.load(Relaxed) && started.elapsed() < Duration::from_secs(30) {
                let n = calls.fetch_add(1, Relaxed);
                if let Err(status) = client.generate(with_key(prompt(&format!("steady {n}")), &key)).await {
                    failures.lock().unwrap().push(status);
                }
            }
        })
    };
    eventually(Duration::from_secs(10), || async { (calls.load(Relaxed) >= 5).then_some(()) }).await.unwrap();

    let changed = Instant::now();
    write_keys(&path, &[&staying, &arriving]);
    let refused = eventually(Duration::from_secs(5), || {
        let mut client = client.clone();
        let key = leaving_key.clone();
        async move {
            match client.generate(with_key(prompt("still here?"), &key)).await {
                Err(status) if status.code() == Code::Unauthenticated => Some(status),
                _ => None,
            }
        }
    })
    .await;
    assert!(refused.is_some(), "the removed key was still accepted 5 s after the change");
    let took = changed.elapsed();
    assert!(
        client.clone().generate(with_key(prompt("new here"), &arriving_key)).await.is_ok(),
        "the new key was refused"
    );

    // Some more of the steady calls after the change, then stop.
    let seen = calls.load(Relaxed);
    eventually(Duration::from_secs(10), || async { (calls.load(Relaxed) >= seen + 5).then_some(()) }).await.unwrap();
    stop.store(true, Relaxed);
    background.await.unwrap();
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "another key's calls failed during the change: {failures:?}");
    assert!(gateway.logs().contains("API keys loaded"), "no reload logged (took {took:?})");
}

#[tokio::test]
async fn a_broken_keys_file_keeps_the_old_keys_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let (key, entry) = llmesh_keys::generate_key("kept");
    write_keys(&path, &[&entry]);
    let (_generation, gateway) = gateway_on_keys(&path).await;
    let mut client = GatewayClient::new(gateway.channel().await);
    assert!(client.generate(with_key(prompt("before"), &key)).await.is_ok());
    let failing = || gateway.metric_sum("llmesh_reload_failing", "file=\"keys\"");

    // A half-written file (a table cut short).
    std::fs::write(&path, "[[keys]]\nid = \"kept\"\nprefix = ").unwrap();
    let noticed = eventually(Duration::from_secs(10), || async { (failing().await == 1.0).then_some(()) }).await;
    assert!(noticed.is_some(), "the broken file was not noticed:\n{}", gateway.logs());
    assert!(client.generate(with_key(prompt("during"), &key)).await.is_ok(), "a broken file dropped the keys");
    assert!(gateway.metric_sum("llmesh_reloads_total", "result=\"error\"").await >= 1.0);
    let logs = gateway.logs();
    assert!(logs.contains("keeping the version in use") && logs.contains(&path.display().to_string()), "{logs}");

    // Fixed again, then SIGHUP: read again even though nothing changed since.
    write_keys(&path, &[&entry]);
    let fixed = eventually(Duration::from_secs(10), || async { (failing().await == 0.0).then_some(()) }).await;
    assert!(fixed.is_some(), "the fixed file was not noticed:\n{}", gateway.logs());
    let ok_before = gateway.metric_sum("llmesh_reloads_total", "result=\"ok\"").await;
    nix::sys::signal::kill(gateway.pid(), nix::sys::signal::Signal::SIGHUP).unwrap();
    let reread = eventually(Duration::from_secs(10), || async {
        (gateway.metric_sum("llmesh_reloads_total", "result=\"ok\"").await > ok_before).then_some(())
    })
    .await;
    assert!(reread.is_some(), "SIGHUP did not re-read the keys:\n{}", gateway.logs());
    assert!(client.generate(with_key(prompt("after"), &key)).await.is_ok(), "the gateway did not survive SIGHUP");
}

/// A redis-server speaking only TLS (the mesh's CA, its cache certificate), with the default user
/// off and one ACL user `llmesh` with `password`.
async fn tls_redis(certs: &Certs, password: &str) -> Redis {
    Redis::builder()
        .tls(certs.path("cache.pem"), certs.path("cache-key.pem"), certs.path("ca.pem"))
        .args(["--user", "default", "off"])
        .args(["--user", "llmesh", "on", &format!(">{password}"), "~*", "&*", "+@all"])
        .start()
        .await
        .unwrap()
}

/// [`tls_redis`], its password in a file (a mounted Secret, as the deploy files do), and the
/// `rediss://` URL every Redis client of the mesh is given for it.
async fn tls_redis_with_password_file(certs: &Certs, password: &str) -> (Redis, String) {
    let redis = tls_redis(certs, password).await;
    let port = redis.port;
    std::fs::write(certs.path("redis-password"), format!("{password}\n")).unwrap();
    let url = format!(
        "rediss://llmesh@127.0.0.1:{port}/0?tls_ca={}&password_file={}",
        certs.shown("ca.pem"),
        certs.shown("redis-password")
    );
    (redis, url)
}

#[tokio::test]
async fn every_redis_client_works_over_rediss_with_a_password_from_a_file() {
    let certs = Certs::new().await;
    let password = "s3cret-for-llmesh";
    let (_redis, url) = tls_redis_with_password_file(&certs, password).await;
    let mut env = certs.mesh_env();
    env.extend([
        ("LLMESH_GATEWAY_QUEUE__REDIS_URL", url.clone()),
        ("LLMESH_GENERATION_QUEUE__REDIS_URL", url.clone()),
        ("LLMESH_GATEWAY_RATE_LIMIT__REDIS_URL", url.clone()),
        ("LLMESH_GATEWAY_RATE_LIMIT__REQUESTS_PER_MINUTE", "1000".into()),
        ("LLMESH_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0".into()),
    ]);
    let mesh = Mesh::start_with(MeshOptions { env, redis_url: Some(url.clone()), ..Default::default() }).await;
    let ca = certs.path("ca.pem");
    let mut gateway = GatewayClient::new(tls_channel(&mesh.gateway, &ca, None).await.unwrap());

    // The cache store on Redis (the cache service would not have started without it): the second
    // equal call is a hit.
    let first = gateway.generate(prompt("cached in redis over TLS")).await.unwrap();
    assert!(!first.get_ref().cached);
    // The store happens in the background.
    let hit = eventually(Duration::from_secs(5), || {
        let mut gateway = gateway.clone();
        async move { gateway.generate(prompt("cached in redis over TLS")).await.ok().filter(|r| r.get_ref().cached) }
    })
    .await;
    assert!(hit.is_some(), "equal calls never hit the cache:\n{}", mesh.cache.logs());
    let stats = CacheClient::new(certs.member(&mesh.cache).await.unwrap()).stats(StatsRequest {}).await.unwrap();
    assert_eq!(stats.get_ref().backend, "redis");
    assert!(stats.get_ref().entries >= 1, "{stats:?}");
    let remaining =
        first.metadata().get("x-ratelimit-remaining-requests").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    assert_eq!(remaining, Some(999), "the rate limit did not count: {:?}", first.metadata());
    let limiter = mesh.gateway.metric_sum("llmesh_ratelimit_decisions_total", "limiter=\"redis\"").await;
    assert!(limiter >= 1.0, "the rate limiter did not use Redis:\n{}", mesh.gateway.logs());

    // The job queue, both ends (the gateway submits, generation's workers run it).
    let submitted = gateway
        .submit_job(llmesh_proto::gateway::v1::SubmitJobRequest {
            model: "sim".into(),
            prompt: "a job over TLS".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = submitted.job.unwrap().id;
    let done = eventually(Duration::from_secs(20), || {
        let (mut gateway, id) = (gateway.clone(), id.clone());
        async move {
            let job = gateway.get_job(llmesh_proto::gateway::v1::GetJobRequest { job_id: id }).await.ok()?;
            let job = job.into_inner().job?;
            (job.state() == llmesh_proto::gateway::v1::JobState::Succeeded).then_some(job)
        }
    })
    .await;
    assert!(done.is_some(), "the job never succeeded:\n{}", mesh.generation.logs());

    // Health's Redis probe.
    let mut health = MeshHealthClient::new(certs.member(&mesh.health).await.unwrap());
    let redis_up = eventually(Duration::from_secs(10), || {
        let mut health = health.clone();
        async move {
            let status = health.status(StatusRequest {}).await.ok()?.into_inner();
            status.components.iter().any(|c| c.name == "redis" && c.status() == MeshServing::Serving).then_some(status)
        }
    })
    .await;
    assert!(redis_up.is_some(), "health never saw Redis serve:\n{}", mesh.health.logs());
    let shown = format!("{:?}", health.status(StatusRequest {}).await.unwrap().into_inner());
    assert!(!shown.contains(password), "the password reached MeshHealth: {shown}");
    for proc in [&mesh.gateway, &mesh.generation, &mesh.cache, &mesh.health] {
        assert!(!proc.logs().contains(password), "the password reached the logs of {}", proc.name);
    }
}

/// A keys file with one key, `spender`, in team `t`: the key's budget is `key_usd` a day and the
/// team's 100 dollars a month. Written by a rename, as `write_keys`.
fn write_budgeted_keys(path: &Path, entry: &llmesh_keys::ApiKey, key_usd: &str) {
    let text = format!(
        "[[keys]]\nid = \"spender\"\nteam = \"t\"\nprefix = \"{}\"\nsha256 = \"{}\"\n\
         budget = {{ usd = {key_usd}, period = \"day\" }}\n\n[[teams]]\nname = \"t\"\nbudget = {{ usd = 100 }}\n",
        entry.prefix, entry.sha256
    );
    let staged = path.with_extension("new");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// A call of at most 8 tokens: its reservation (about 2 cents at the test's prices) fits a dollar.
fn priced(text: &str) -> llmesh_proto::gateway::v1::GenerateRequest {
    llmesh_proto::gateway::v1::GenerateRequest { max_tokens: 8, ..prompt(text) }
}

#[tokio::test]
async fn budgets_and_llmesh_spend_use_rediss_and_a_changed_budget_applies_at_once() {
    let certs = Certs::new().await;
    let password = "budget-s3cret";
    let (_redis, url) = tls_redis_with_password_file(&certs, password).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    let (key, entry) = llmesh_keys::generate_key("spender");
    write_budgeted_keys(&keys, &entry, "1");
    let config = dir.path().join("mesh.toml");
    std::fs::write(&config, "[gateway.prices.sim]\ninput_per_million = 1000.0\noutput_per_million = 2000.0\n").unwrap();
    let generation = Proc::spawn("generation", &[]).await.unwrap();
    let env = [
        ("LLMESH_CONFIG", config.display().to_string()),
        ("LLMESH_GATEWAY_GENERATION__ENDPOINTS", format!("[\"{}\"]", generation.uri())),
        ("LLMESH_GATEWAY_CACHE__ENDPOINT", String::new()),
        ("LLMESH_GATEWAY_AUTH__KEYS_FILE", keys.display().to_string()),
        ("LLMESH_GATEWAY_RATE_LIMIT__REDIS_URL", url.clone()),
        ("LLMESH_GATEWAY_RATE_LIMIT__REDIS_TIMEOUT_MS", "2000".into()),
        ("LLMESH_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0".into()),
    ];
    let gateway = Proc::spawn("gateway", &env).await.unwrap();
    let mut client = GatewayClient::new(gateway.channel().await);

    let answer = client.generate(with_key(priced("priced"), &key)).await;
    let answer = answer.unwrap_or_else(|status| panic!("{status:?}\n{}", gateway.logs()));
    assert!(answer.metadata().get("x-budget-remaining-usd").is_some(), "{:?}", answer.metadata());
    let shared = gateway.metric_sum("llmesh_budget_decisions_total", "store=\"redis\"").await;
    assert!(shared >= 1.0, "the budget was not kept in Redis:\n{}", gateway.logs());
    assert_eq!(gateway.metric_sum("llmesh_budget_decisions_total", "store=\"local\"").await, 0.0);

    // `llmesh spend` reads the same Redis, over TLS with the password from its file.
    let keys_shown = keys.display().to_string();
    let spent = eventually(Duration::from_secs(10), || {
        let (url, keys_shown) = (url.clone(), keys_shown.clone());
        async move {
            let args = ["spend", "--redis", &url, "--key", "spender", "--keys-file", &keys_shown, "--json"];
            let (status, logs) = llmesh_e2e::run_to_exit("llmesh", &args, &[], Duration::from_secs(20)).await.ok()?;
            assert!(status.success(), "llmesh spend failed: {logs}");
            let line = logs.lines().find(|line| line.starts_with('{'))?;
            let report: serde_json::Value = serde_json::from_str(line).ok()?;
            (report["held_nanos"].as_u64() == Some(0) && report["spent_nanos"].as_u64()? > 0).then_some(report)
        }
    })
    .await;
    let spent = spent.expect("llmesh spend never showed the call settled");
    assert_eq!(spent["limit_nanos"].as_u64(), Some(1_000_000_000), "{spent}");

    // The key's budget cut to a thousandth of a cent: the next calls are refused, naming it.
    let changed = Instant::now();
    write_budgeted_keys(&keys, &entry, "0.00001");
    let refused = eventually(Duration::from_secs(10), || {
        let (mut client, key) = (client.clone(), key.clone());
        async move {
            match client.generate(with_key(priced("one more?"), &key)).await {
                Err(status) if status.code() == Code::ResourceExhausted => Some(status),
                _ => None,
            }
        }
    })
    .await;
    let refused = refused.unwrap_or_else(|| panic!("a smaller budget was not applied:\n{}", gateway.logs()));
    assert!(refused.message().contains("budget"), "{refused:?}");
    let took = changed.elapsed();

    // Raised again: accepted again, without a restart.
    write_budgeted_keys(&keys, &entry, "1");
    let accepted = eventually(Duration::from_secs(10), || {
        let (mut client, key) = (client.clone(), key.clone());
        async move { client.generate(with_key(priced("back in budget"), &key)).await.ok() }
    })
    .await;
    assert!(accepted.is_some(), "a raised budget was not applied (the cut took {took:?}):\n{}", gateway.logs());
    for proc in [&gateway, &generation] {
        assert!(!proc.logs().contains(password), "the password reached the logs of {}", proc.name);
    }
}

#[tokio::test]
async fn a_plaintext_probe_port_answers_health_only() {
    let certs = Certs::new().await;
    let env: Vec<(&'static str, String)> = certs
        .mesh_env()
        .into_iter()
        .filter(|(name, _)| name.starts_with("LLMESH_GENERATION_"))
        .chain([("LLMESH_GENERATION_TLS__HEALTH_LISTEN", "127.0.0.1:0".to_string())])
        .collect();
    let generation = Proc::spawn("generation", &env).await.unwrap();
    let probes = eventually(Duration::from_secs(10), || async {
        let logs = generation.logs();
        let line = logs.lines().find(|l| l.contains("plaintext grpc.health.v1 probes on "))?.to_string();
        line.split("probes on ").nth(1)?.split_whitespace().next()?.parse::<std::net::SocketAddr>().ok()
    })
    .await
    .expect("the probe port in the logs");
    let channel = Endpoint::from_shared(format!("http://{probes}")).unwrap().connect().await.unwrap();
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest { service: "llmesh.generation.v1.Generation".into() })
        .await
        .unwrap();
    assert_eq!(status.into_inner().status, 1, "SERVING");
    let request = llmesh_proto::generation::v1::GenerateRequest {
        model: "sim".into(),
        prompt: "through the probe port".into(),
        ..Default::default()
    };
    let refused = GenerationClient::new(channel).generate(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    assert!(!plaintext_answers(&generation).await, "the TLS port answered plaintext");
}

//! Start-up, shutdown and the `llmesh up` launcher.

use std::time::Duration;

use llmesh_e2e::{Proc, bin, free_port, run_to_exit};
use tokio::io::AsyncBufReadExt as _;

#[tokio::test]
async fn gateway_without_generation_exits_naming_it() {
    let dead = format!("[\"http://127.0.0.1:{}\"]", free_port());
    let env =
        [("LLMESH_GATEWAY_GENERATION__ENDPOINTS", dead), ("LLMESH_GATEWAY_STARTUP_TIMEOUT_MS", "500".to_string())];
    let (status, logs) =
        run_to_exit("gateway", &["--listen", "127.0.0.1:0"], &env, Duration::from_secs(10)).await.unwrap();
    assert!(!status.success());
    assert!(logs.contains("cannot reach generation"), "{logs}");
}

#[tokio::test]
async fn gateway_without_cache_exits_naming_it() {
    let generation = Proc::spawn("generation", &[]).await.unwrap();
    let env = [
        ("LLMESH_GATEWAY_GENERATION__ENDPOINTS", format!("[\"{}\"]", generation.uri())),
        ("LLMESH_GATEWAY_CACHE__ENDPOINT", format!("http://127.0.0.1:{}", free_port())),
        ("LLMESH_GATEWAY_STARTUP_TIMEOUT_MS", "500".to_string()),
    ];
    let (status, logs) =
        run_to_exit("gateway", &["--listen", "127.0.0.1:0"], &env, Duration::from_secs(10)).await.unwrap();
    assert!(!status.success());
    assert!(logs.contains("cannot reach cache"), "{logs}");
}

#[tokio::test]
async fn cache_without_redis_exits_naming_it() {
    let env = [
        ("LLMESH_CACHE_REDIS_URL", format!("redis://:hunter2@127.0.0.1:{}/", free_port())),
        ("LLMESH_CACHE_REDIS_CONNECT_TIMEOUT_MS", "500".to_string()),
    ];
    let (status, logs) =
        run_to_exit("cache", &["--listen", "127.0.0.1:0"], &env, Duration::from_secs(10)).await.unwrap();
    assert!(!status.success());
    assert!(logs.contains("cannot reach redis"), "{logs}");
    assert!(!logs.contains("hunter2"), "the password leaked into the logs: {logs}");
}

#[tokio::test]
async fn bad_config_is_named() {
    let env = [("LLMESH_GENERATION_LIMITS__MAX_TOKENZ", "5".to_string())];
    let (status, logs) =
        run_to_exit("generation", &["--listen", "127.0.0.1:0"], &env, Duration::from_secs(10)).await.unwrap();
    assert!(!status.success());
    assert!(logs.contains("max_tokenz"), "{logs}");
}

#[tokio::test]
async fn config_file_sections_apply() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.toml");
    std::fs::write(&path, "[generation.models.tiny]\nprovider = \"sim\"\noutput_tokens = 2\n").unwrap();
    let generation = Proc::spawn("generation", &[("LLMESH_CONFIG", path.display().to_string())]).await.unwrap();
    let mut client = llmesh_proto::generation::v1::generation_client::GenerationClient::new(generation.channel().await);
    let request = llmesh_proto::generation::v1::GenerateRequest {
        model: "tiny".into(),
        prompt: "hi".into(),
        ..Default::default()
    };
    let response = client.generate(request).await.unwrap().into_inner();
    assert_eq!(response.usage.unwrap().completion_tokens, 2);
    // The defaults are still there beside the file's model.
    let models = client.list_models(llmesh_proto::generation::v1::ListModelsRequest {}).await.unwrap().into_inner();
    assert!(models.models.iter().any(|m| m.name == "sim"));
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_finishes_streams_in_flight() {
    let env = [
        ("LLMESH_GENERATION_MODELS__PACED__PROVIDER", "sim".to_string()),
        ("LLMESH_GENERATION_MODELS__PACED__TOKENS_PER_SECOND", "20".to_string()),
        ("LLMESH_GENERATION_MODELS__PACED__OUTPUT_TOKENS", "10".to_string()),
    ];
    let mut generation = Proc::spawn("generation", &env).await.unwrap();
    let mut client = llmesh_proto::generation::v1::generation_client::GenerationClient::new(generation.channel().await);
    let request = llmesh_proto::generation::v1::GenerateStreamRequest {
        model: "paced".into(),
        prompt: "take your time".into(),
        ..Default::default()
    };
    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());

    generation.terminate();
    // The stream in flight (about half a second left) still completes within the grace period.
    let mut rest = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        rest += 1;
        if chunk.finish_reason != 0 {
            break;
        }
    }
    assert_eq!(rest, 10);
    let status = generation.wait(Duration::from_secs(5)).await.expect("exited after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", generation.logs());
    assert!(generation.logs().contains("SIGTERM"), "{}", generation.logs());
}

#[tokio::test]
async fn llmesh_up_runs_the_mesh_and_stops_it() {
    let mut child = tokio::process::Command::new(bin("llmesh"))
        .args(["up", "--base-port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut gateway = None;
    let (mut status_page, mut token_file) = (None, None);
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(addr) = line.trim().strip_prefix("gateway") {
                gateway = Some(addr.trim().to_string());
            }
            if let Some((_, file)) = line.split_once("the password is the token in ") {
                token_file = Some(file.trim_end_matches("):").to_string());
            }
            if let Some(url) = line.trim().strip_prefix("http://").and_then(|rest| rest.strip_suffix("/status")) {
                status_page = Some(url.to_string());
            }
            if line.contains("Ctrl-C stops the mesh") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "llmesh up never printed its banner");
    let gateway = gateway.expect("gateway address in the banner");

    let mut client =
        llmesh_proto::gateway::v1::gateway_client::GatewayClient::connect(format!("http://{gateway}")).await.unwrap();
    let response = client.generate(crate::prompt("hello")).await.unwrap().into_inner();
    assert!(!response.text.is_empty());

    // The status page it printed: behind the token it wrote (a file only this user reads).
    let (page, file) = (status_page.expect("the status page in the banner"), token_file.expect("its token file"));
    let token = std::fs::read_to_string(&file).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(status_code(&page, "/status", None).await.starts_with("HTTP/1.1 401"));
    assert!(status_code(&page, "/status", Some(&token)).await.starts_with("HTTP/1.1 200"));

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
    // Its children are gone too, and so is the token.
    assert!(client.generate(crate::prompt("anyone?")).await.is_err());
    assert!(!std::path::Path::new(&file).exists(), "{file} left behind");
}

/// The status line of a plain HTTP/1.1 GET of `path` at `addr`, with the token as a bearer token.
async fn status_code(addr: &str, path: &str, token: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map(|token| format!("authorization: Bearer {token}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}connection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut head)).await.unwrap().unwrap();
    String::from_utf8_lossy(&head[..read]).to_string()
}

#[tokio::test]
async fn every_service_accepts_the_shipped_configuration() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in ["deploy/config/mesh.toml", "deploy/k8s/mesh.toml"] {
        let path = root.join(file).display().to_string();
        for service in ["gateway", "generation", "cache", "health"] {
            let env = [("LLMESH_CONFIG", path.clone())];
            let (status, logs) =
                run_to_exit(service, &["--check-config"], &env, Duration::from_secs(10)).await.unwrap();
            assert!(status.success(), "{service} rejects {file}:\n{logs}");
        }
    }
    // And a wrong key in the same file is caught.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[gateway]\nrequest_timeout = 5\n").unwrap();
    let env = [("LLMESH_CONFIG", bad.display().to_string())];
    let (status, logs) = run_to_exit("gateway", &["--check-config"], &env, Duration::from_secs(10)).await.unwrap();
    assert!(!status.success());
    assert!(logs.contains("request_timeout"), "{logs}");
}

#[tokio::test]
async fn dns_names_lead_to_replicas_for_the_gateway_and_health() {
    let generation = Proc::spawn("generation", &[]).await.unwrap();
    let cache = Proc::spawn("cache", &[]).await.unwrap();
    let by_name = format!("dns://localhost:{}", generation.addr.port());
    let gateway_env = [
        ("LLMESH_GATEWAY_GENERATION__ENDPOINTS", format!("[\"{by_name}\"]")),
        ("LLMESH_GATEWAY_CACHE__ENDPOINT", cache.uri()),
    ];
    let gateway = Proc::spawn("gateway", &gateway_env).await.unwrap();
    let mut client = llmesh_proto::gateway::v1::gateway_client::GatewayClient::new(gateway.channel().await);
    for i in 0..10 {
        assert!(client.generate(crate::prompt(&format!("by name {i}"))).await.is_ok());
    }

    let targets =
        format!("[{{name=\"generation\",address=\"{by_name}\",service=\"llmesh.generation.v1.Generation\"}}]");
    let health =
        Proc::spawn("health", &[("LLMESH_HEALTH_TARGETS", targets), ("LLMESH_HEALTH_POLL_INTERVAL_MS", "100".into())])
            .await
            .unwrap();
    let mut mesh_health = llmesh_proto::health::v1::mesh_health_client::MeshHealthClient::new(health.channel().await);
    let expected = format!("http://127.0.0.1:{}", generation.addr.port());
    let seen = llmesh_e2e::eventually(Duration::from_secs(5), || {
        let mut mesh_health = mesh_health.clone();
        let expected = expected.clone();
        async move {
            let status = mesh_health.status(llmesh_proto::health::v1::StatusRequest {}).await.ok()?.into_inner();
            status
                .components
                .iter()
                .any(|c| c.address == expected && c.status() == llmesh_proto::health::v1::ServingStatus::Serving)
                .then_some(())
        }
    })
    .await;
    assert!(seen.is_some(), "health never listed the replica behind {by_name}");
    let _ = mesh_health.status(llmesh_proto::health::v1::StatusRequest {}).await;
}

#[tokio::test]
async fn the_gateway_drains_then_finishes_calls_in_flight() {
    let options = llmesh_e2e::MeshOptions {
        env: vec![
            ("LLMESH_GENERATION_MODELS__SIM__TIME_TO_FIRST_TOKEN_MS", "800".into()),
            ("LLMESH_GATEWAY_SHUTDOWN_DRAIN_MS", "500".into()),
            ("LLMESH_GATEWAY_SHUTDOWN_GRACE_MS", "2000".into()),
        ],
        ..Default::default()
    };
    let mut mesh = llmesh_e2e::Mesh::start_with(options).await;
    let gateway = mesh.gateway().await;
    let in_flight = {
        let mut gateway = gateway.clone();
        tokio::spawn(async move { gateway.generate(crate::prompt("finish me")).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let signalled = std::time::Instant::now();
    mesh.gateway.terminate();

    // Health says NOT_SERVING at once, while the gateway still answers (the drain).
    let mut health = tonic_health::pb::health_client::HealthClient::new(mesh.gateway.channel().await);
    let not_serving = llmesh_e2e::eventually(Duration::from_millis(400), || {
        let mut health = health.clone();
        async move {
            let request = tonic_health::pb::HealthCheckRequest { service: "llmesh.gateway.v1.Gateway".into() };
            let status = health.check(request).await.ok()?.into_inner().status();
            (status == tonic_health::pb::health_check_response::ServingStatus::NotServing).then_some(())
        }
    })
    .await;
    assert!(not_serving.is_some(), "health did not report NOT_SERVING during the drain");
    let _ = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;

    // The call in flight finishes normally.
    let answer = in_flight.await.unwrap().expect("the call in flight finished");
    assert!(!answer.get_ref().text.is_empty());
    // And the process exits, cleanly, within drain + grace + 2 s.
    let status = mesh.gateway.wait(Duration::from_millis(500 + 2000 + 2000)).await.expect("the gateway exited");
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() < Duration::from_millis(4500), "{:?}", signalled.elapsed());
}

#[tokio::test]
async fn worker_threads_are_set_by_the_environment() {
    let generation = Proc::spawn("generation", &[("LLMESH_WORKER_THREADS", "3".to_string())]).await.unwrap();
    let task_dir = format!("/proc/{}/task", generation.pid());
    let named_workers = || {
        std::fs::read_dir(&task_dir)
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim() == "tokio-rt-worker")
            .count()
    };
    // A new thread names itself once it first runs: on a busy machine a worker may still carry the
    // process's name just after the listening line. Wait (bounded) until three have their name.
    let started = std::time::Instant::now();
    while named_workers() < 3 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(named_workers(), 3, "threads named tokio-rt-worker in {task_dir}");

    for bad in ["0", "many"] {
        let env = [("LLMESH_WORKER_THREADS", bad.to_string())];
        let (status, logs) =
            run_to_exit("generation", &["--listen", "127.0.0.1:0"], &env, Duration::from_secs(10)).await.unwrap();
        assert!(!status.success());
        assert!(logs.contains(&format!("LLMESH_WORKER_THREADS={bad:?}")), "{logs}");
    }
}

//! Keys made with `llmesh keys` in front of a real gateway, and auth that fails closed.

use std::{path::Path, time::Duration};

use llmesh_e2e::{Mesh, MeshOptions, Proc, bin, run_to_exit};
use llmesh_proto::gateway::v1::gateway_client::GatewayClient;
use tonic::Code;

use crate::prompt;

/// Runs `llmesh keys ARGS` as an operator would and returns its stdout.
async fn llmesh_keys(args: &[&str]) -> String {
    let output = tokio::process::Command::new(bin("llmesh"))
        .arg("keys")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "llmesh keys {args:?} failed:\n{stderr}");
    String::from_utf8(output.stdout).unwrap()
}

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-api-key", key.parse().unwrap());
    request
}

fn file_env(path: &Path) -> (&'static str, String) {
    ("LLMESH_GATEWAY_AUTH__KEYS_FILE", path.display().to_string())
}

#[tokio::test]
async fn a_gateway_on_an_empty_keys_file_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    // What is left after every key was revoked: comments only.
    std::fs::write(&path, "# API keys of the gateway.\n").unwrap();
    // Its dependencies answer, so that the keys file is what stops it.
    let generation = Proc::spawn("generation", &[]).await.unwrap();
    let cache = Proc::spawn("cache", &[]).await.unwrap();
    let env = [
        file_env(&path),
        ("LLMESH_GATEWAY_GENERATION__ENDPOINTS", format!("[\"{}\"]", generation.uri())),
        ("LLMESH_GATEWAY_CACHE__ENDPOINT", cache.uri()),
    ];
    let (status, logs) =
        run_to_exit("gateway", &["--listen", "127.0.0.1:0"], &env, Duration::from_secs(20)).await.unwrap();
    assert!(!status.success(), "the gateway ran with an empty keys file:\n{logs}");
    assert!(logs.contains(&path.display().to_string()) && logs.contains("holds no keys"), "{logs}");
}

#[tokio::test]
async fn keys_made_with_the_cli_are_accepted_and_revoked_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let file = path.to_str().unwrap();
    let kept = llmesh_keys(&["new", "--id", "kept", "--team", "e2e", "--file", file]).await;
    let revoked = llmesh_keys(&["new", "--id", "revoked", "--models", "sim", "--file", file]).await;
    let (kept, revoked) = (kept.trim_end(), revoked.trim_end());
    assert!(kept.starts_with("lk_") && revoked.starts_with("lk_"), "{kept:?} {revoked:?}");

    let mesh = Mesh::start_with(MeshOptions { env: vec![file_env(&path)], ..Default::default() }).await;
    let mut gateway = mesh.gateway().await;
    for key in [kept, revoked] {
        let answer = gateway.generate(with_key(prompt("made by llmesh keys"), key)).await.unwrap();
        assert!(!answer.get_ref().text.is_empty());
    }
    let missing = gateway.generate(prompt("no key")).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    assert!(!mesh.gateway.logs().contains(kept), "the key reached the gateway's logs");

    // A gateway that reads the file after `revoke` refuses that key and still takes the other.
    llmesh_keys(&["revoke", "--id", "revoked", "--file", file]).await;
    let second = mesh.second_gateway(&[file_env(&path)]).await;
    let mut second = GatewayClient::new(second.channel().await);
    let refused = second.generate(with_key(prompt("revoked"), revoked)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(second.generate(with_key(prompt("kept"), kept)).await.is_ok());
}

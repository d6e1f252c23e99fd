//! Compiles `proto/` with protox (pure Rust, no protoc needed) and generates tonic bindings.
//! The encoded descriptor set is written next to the bindings for server reflection.

use std::{env, path::PathBuf};

use prost::Message;

const FILES: &[&str] = &[
    "llmesh/common/v1/common.proto",
    "llmesh/generation/v1/generation.proto",
    "llmesh/gateway/v1/gateway.proto",
    "llmesh/cache/v1/cache.proto",
    "llmesh/health/v1/health.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());

    let fds = protox::compile(FILES, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("llmesh_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}

//! Every input is bounded (issue 13, item 4): oversized fields are refused with a status naming
//! what is wrong, before any work and without growing the process; the cache bounds what it
//! keeps; calls to methods a process does not serve all land on one `endpoint="unknown"` label.

use std::time::Duration;

use llmesh_e2e::{Mesh, MeshOptions, Proc};
use llmesh_proto::{
    cache::v1::{
        InvalidateRequest, LookupRequest, STORE_MANY_MAX_ENTRIES, StoreManyRequest, StoreRequest,
        cache_client::CacheClient, invalidate_request::Target,
    },
    common::v1::FinishReason,
    generation::v1::{GenerateRequest, GenerateResponse, generation_client::GenerationClient},
};
use tonic::{Code, Status};

use crate::demo_keys;

fn request(model: &str) -> GenerateRequest {
    GenerateRequest { model: model.into(), prompt: "hello".into(), ..Default::default() }
}

/// Over the largest valid request with the default limits (`Limits::max_request_bytes`, about
/// 15 MB since the contract carries tools and images; the cache takes 1 MiB more): what a server
/// refuses before reading it.
const HUGE: usize = 20 << 20;

/// A request carrying one metadata value of `bytes` bytes.
fn with_metadata(bytes: usize) -> GenerateRequest {
    GenerateRequest { metadata: [("team".to_string(), "v".repeat(bytes))].into(), ..request("sim") }
}

/// A clear refusal of the client's input: INVALID_ARGUMENT, and a message that starts with
/// `field` and does not repeat the huge value.
fn assert_refused(status: &Status, field: &str, what: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    assert!(status.message().starts_with(field), "{what}: {:?} does not name {field}", status.message());
    assert!(status.message().len() < 300, "{what}: the message echoes the value ({} bytes)", status.message().len());
}

async fn generate_stream(client: &mut GenerationClient<tonic::transport::Channel>, r: GenerateRequest) -> Status {
    match client.generate_stream(llmesh_proto::generation::v1::GenerateStreamRequest::from(r)).await {
        Err(status) => status,
        Ok(stream) => {
            let mut stream = stream.into_inner();
            match stream.message().await {
                Err(status) => status,
                Ok(chunk) => panic!("a stream started: {chunk:?}"),
            }
        }
    }
}

#[tokio::test]
async fn generation_refuses_huge_fields_without_growing() {
    let generation = Proc::spawn("generation", &[]).await.unwrap();
    let mut client = GenerationClient::new(generation.channel().await);

    // Just over a field's limit, but well within a message: the field is named.
    let status = client.generate(request(&"m".repeat(10_000))).await.unwrap_err();
    assert_refused(&status, "model", "a 10 kB model name");
    let status = client.generate(with_metadata(10_000)).await.unwrap_err();
    assert_refused(&status, "metadata", "a 10 kB metadata value");
    let status = client.generate(request("sim flaky")).await.unwrap_err();
    assert_refused(&status, "model", "a model name with a space");

    assert!(HUGE > llmesh_proto::validate::Limits::default().max_request_bytes());
    // Warm up (connections, buffers, the allocator's arenas) before measuring.
    for _ in 0..5 {
        client.generate(request("sim")).await.unwrap();
        let _ = client.generate(with_metadata(HUGE)).await;
    }
    let before = generation.rss_kib() * 1024;

    // Far over what any valid request can be: refused before the message is read. A different
    // name each time: a process that kept something per name would grow by 20 MiB a call.
    for i in 0..50 {
        let (status, what) = match i % 4 {
            0 => (client.generate(with_metadata(HUGE)).await.unwrap_err(), "a 20 MiB metadata value"),
            1 => {
                let model = format!("sim-flaky-{}{i}", "0".repeat(HUGE));
                (client.generate(request(&model)).await.unwrap_err(), "a 20 MiB model name")
            }
            2 => (generate_stream(&mut client, with_metadata(HUGE)).await, "a streamed 20 MiB metadata value"),
            _ => {
                let model = format!("{}{i}", "m".repeat(HUGE));
                (generate_stream(&mut client, request(&model)).await, "a streamed 20 MiB model name")
            }
        };
        assert_refused(&status, "request", what);
        assert!(status.message().contains("exceed the limit of"), "{what}: {status:?}");
    }

    // Still serving, and no bigger for it.
    let answer = client.generate(request("sim")).await.unwrap().into_inner();
    assert!(!answer.text.is_empty());
    let after = generation.rss_kib() * 1024;
    let grown = after.saturating_sub(before);
    assert!(grown <= 32 << 20, "generation's RSS grew by {} MiB over 50 huge requests", grown >> 20);
}

/// A cache service that keeps entries of at most 8 stream chunks, and a client of it.
async fn cache_of_8_chunks() -> (Proc, CacheClient<tonic::transport::Channel>) {
    let cache = Proc::spawn("cache", &[("LLMESH_CACHE_MAX_ENTRY_CHUNKS", "8".to_string())]).await.unwrap();
    let client = CacheClient::new(cache.channel().await);
    (cache, client)
}

/// A store of a finished answer to `request`, in `chunks` chunks.
fn store(request: Option<GenerateRequest>, chunks: usize) -> StoreRequest {
    StoreRequest {
        request,
        response: Some(GenerateResponse {
            text: "hi".into(),
            finish_reason: FinishReason::Stop.into(),
            model: "sim".into(),
            ..Default::default()
        }),
        chunks: vec!["h".to_string(); chunks],
        ttl_ms: 0,
    }
}

#[tokio::test]
async fn the_cache_bounds_what_it_keeps() {
    let (_cache, mut client) = cache_of_8_chunks().await;

    let stored = client.store(store(Some(request("sim")), 8)).await.unwrap().into_inner();
    assert!(stored.stored, "{stored:?}");
    let refused = client.store(store(Some(request("sim")), 9)).await.unwrap().into_inner();
    assert!(!refused.stored && refused.reason.contains("max_entry_chunks"), "{refused:?}");

    // A model name names a Redis key and goes to every gateway: bounded.
    let status = client.store(store(Some(request(&"m".repeat(1000))), 1)).await.unwrap_err();
    assert_refused(&status, "request.model", "a 1000-byte model name");
    let status = client.store(store(Some(with_metadata(HUGE)), 1)).await.unwrap_err();
    assert_refused(&status, "request", "a 20 MiB store");
    let invalidate = |target| InvalidateRequest { target: Some(target) };
    let status = client.invalidate(invalidate(Target::Key("k".repeat(100_000)))).await.unwrap_err();
    assert_refused(&status, "key", "a 100 kB key");
    let status = client.invalidate(invalidate(Target::Model("m".repeat(1000)))).await.unwrap_err();
    assert_refused(&status, "model", "a 1000-byte model");

    assert_eq!(client.invalidate(invalidate(Target::Key(stored.key))).await.unwrap().into_inner().removed, 1);
}

/// `StoreMany` stores or refuses each entry as `Store` would, one bad entry failing only itself,
/// and bounds how many one call may carry.
#[tokio::test]
async fn store_many_answers_each_entry_and_bounds_the_batch() {
    let (_cache, mut client) = cache_of_8_chunks().await;
    let kept = GenerateRequest { prompt: "kept in a batch".into(), ..request("sim") };
    let entries = vec![
        store(Some(kept.clone()), 1),
        store(Some(request("sim")), 9),
        store(Some(request(&"m".repeat(1000))), 1),
        store(None, 1),
    ];
    let results = client.store_many(StoreManyRequest { entries }).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 4, "{results:?}");
    assert!(results[0].stored && results[0].key.len() == 64, "{:?}", results[0]);
    assert!(!results[1].stored && results[1].reason.contains("max_entry_chunks"), "{:?}", results[1]);
    assert!(!results[2].stored && results[2].reason.starts_with("request.model"), "{:?}", results[2]);
    assert!(results[2].reason.len() < 300, "the refusal echoes the model name: {:?}", results[2]);
    assert!(!results[3].stored && results[3].reason.starts_with("request"), "{:?}", results[3]);

    let hit = client.lookup(LookupRequest { request: Some(kept), allow_stale: false }).await.unwrap().into_inner();
    assert!(hit.hit && hit.key == results[0].key, "the batch's entry is not kept: {hit:?}");

    let over = (0..=STORE_MANY_MAX_ENTRIES).map(|_| store(Some(request("sim")), 1)).collect();
    let status = client.store_many(StoreManyRequest { entries: over }).await.unwrap_err();
    assert_refused(&status, "entries", "a batch one entry over the bound");
    let alive = client.store_many(StoreManyRequest { entries: Vec::new() }).await.unwrap().into_inner();
    assert!(alive.results.is_empty(), "{alive:?}");
}

#[tokio::test]
async fn unknown_methods_share_one_label() {
    let (key, file) = demo_keys();
    let options = MeshOptions {
        env: vec![
            ("LLMESH_GATEWAY_AUTH__KEYS_FILE", file),
            ("LLMESH_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0".to_string()),
        ],
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let channel = mesh.gateway.channel().await;

    // Methods the gateway does not serve, without a key (refused by auth before any routing) and
    // with one (UNIMPLEMENTED).
    let mut generation = GenerationClient::new(channel.clone());
    let mut cache = CacheClient::new(channel);
    let status = generation.generate(request("sim")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = cache.invalidate(InvalidateRequest { target: Some(Target::Model("sim".into())) }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let mut keyed = tonic::Request::new(request("sim"));
    keyed.metadata_mut().insert("x-api-key", key.parse().unwrap());
    let status = generation.generate(keyed).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    let gateway = &mesh.gateway;
    let unknown = |status: &'static str| {
        let labels = format!("endpoint=\"unknown\",status=\"{status}\"");
        async move { gateway.metric_sum("llm_requests_total", &labels).await }
    };
    // The metrics are recorded as the answer leaves; give the last one a moment.
    let recorded = llmesh_e2e::eventually(Duration::from_secs(5), || async {
        (unknown("UNAUTHENTICATED").await == 2.0 && unknown("UNIMPLEMENTED").await == 1.0).then_some(())
    })
    .await;
    assert!(recorded.is_some(), "unknown methods were not counted under endpoint=\"unknown\"");
    for endpoint in ["Generate", "Invalidate"] {
        let counted = gateway.metric_sum("llm_requests_total", &format!("endpoint=\"{endpoint}\"")).await;
        assert_eq!(counted, 0.0, "a call to a method the gateway does not serve counted as {endpoint}");
    }
}

//! `init` installs process-wide state, so it has this test binary to itself (one test).

// Test helpers outside #[test] functions unwrap too (as in the other crates' integration tests).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use llmesh_telemetry::{GrpcTraceLayer, Routes, TelemetryConfig};
use tower::{Layer as _, ServiceExt as _};

#[tokio::test]
async fn init_installs_everything_once() {
    // Before init: nothing to render.
    assert_eq!(llmesh_telemetry::render_prometheus(), "");

    // An explicit config, so a developer's OTEL_* variables cannot change the test.
    let telemetry = llmesh_telemetry::init_with_config(TelemetryConfig::new("gateway")).unwrap();
    assert!(telemetry.is_active());
    assert!(telemetry.prometheus().is_some());

    // A second init (another service in the same process) is a no-op, not an error or a panic.
    let again = llmesh_telemetry::init("cache").unwrap();
    assert!(!again.is_active());
    again.shutdown().await;

    // The global propagator and the OpenTelemetry layer are in place: a span has a traceparent.
    let span = tracing::info_span!("outgoing");
    let mut request = tonic::Request::new(());
    span.in_scope(|| llmesh_telemetry::inject(&mut request));
    assert!(request.metadata().get("traceparent").is_some());

    // The layer built after init records into the global provider, which /metrics renders.
    let routes = Routes::new().serve("llmesh.gateway.v1.Gateway", ["Generate"]);
    let service = GrpcTraceLayer::new().with_routes(routes).layer(tower::service_fn(
        |_req: http::Request<tonic::body::Body>| async {
            Ok::<_, std::convert::Infallible>(
                tonic::Status::invalid_argument("bad prompt").into_http::<tonic::body::Body>(),
            )
        },
    ));
    let request = http::Request::builder()
        .uri("http://localhost/llmesh.gateway.v1.Gateway/Generate")
        .body(tonic::body::Body::empty())
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    response.into_body().collect().await.unwrap();

    let text = llmesh_telemetry::render_prometheus();
    for want in [
        "llm_requests_total{endpoint=\"Generate\",status=\"INVALID_ARGUMENT\"} 1\n",
        "llm_response_time_count{endpoint=\"Generate\"} 1\n",
        "llm_active_requests 0\n",
        "\nprocess_cpu_seconds_total ",
        "\nprocess_resident_memory_bytes ",
        "\nprocess_open_fds ",
        "\nprocess_start_time_seconds ",
        "target_info{",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // The plain OTel API on the global meter works too.
    llmesh_telemetry::meter()
        .u64_counter("llmesh.shed")
        .build()
        .add(2, &[opentelemetry::KeyValue::new("reason", "overload")]);
    assert!(llmesh_telemetry::render_prometheus().contains("llmesh_shed_total{reason=\"overload\"} 2\n"));

    let started = Instant::now();
    telemetry.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(3));
}

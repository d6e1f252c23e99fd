//! A request message over a server's `max_decoding_message_size` is a client's mistake, and is
//! answered as one: INVALID_ARGUMENT `request: N bytes exceed the limit of M bytes`, like every
//! other field that is too large, instead of tonic's OUT_OF_RANGE "Error, decoded message length
//! too large: ...".
//!
//! tonic refuses such a message from its length prefix, before reading it, and answers with a
//! trailers-only response. This layer recognises that response by its code and tonic's words and
//! replaces it; any other response (an OUT_OF_RANGE of a handler's own included) passes untouched.
//! A test in this module breaks if a tonic release changes those words.

use tonic::body::Body;
use tower::ServiceExt as _;
use tower::util::BoxCloneSyncService;

use super::{HttpLayer, http_layer};

/// How tonic's message starts (tonic 0.14, `codec/decode.rs`).
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// The layer; see the module docs.
pub(super) fn layer() -> HttpLayer {
    http_layer(|inner| BoxCloneSyncService::new(inner.map_response(rewrite)))
}

fn rewrite(response: http::Response<Body>) -> http::Response<Body> {
    if response.headers().get("grpc-status").map(http::HeaderValue::as_bytes) != Some(b"11") {
        return response;
    }
    let Some(status) = tonic::Status::from_header_map(response.headers()) else { return response };
    match sizes(status.message()) {
        Some((found, limit)) => tonic::Status::invalid_argument(format!(
            "request: {found} bytes exceed the limit of {limit} bytes for one message (the service's limits)"
        ))
        .into_http(),
        None => response,
    }
}

/// `(found, limit)` from "Error, decoded message length too large: found N bytes, the limit is: M
/// bytes".
fn sizes(message: &str) -> Option<(usize, usize)> {
    let rest = message.strip_prefix(TONIC_TOO_LARGE)?;
    let (found, rest) = rest.split_once(" bytes, the limit is: ")?;
    let limit = rest.strip_suffix(" bytes")?;
    Some((found.parse().ok()?, limit.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::{Code, Status};
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    use super::*;

    #[test]
    fn reads_tonics_words() {
        let message = "Error, decoded message length too large: found 2097161 bytes, the limit is: 94581 bytes";
        assert_eq!(sizes(message), Some((2_097_161, 94_581)));
        assert_eq!(sizes("Error, decoded message length too large: found x bytes, the limit is: 1 bytes"), None);
        assert_eq!(sizes("something else"), None);
    }

    #[test]
    fn other_statuses_pass_untouched() {
        for status in [Status::out_of_range("page 3 of 2"), Status::invalid_argument("prompt: required")] {
            let code = status.code();
            let response = rewrite(status.into_http());
            assert_eq!(tonic::Status::from_header_map(response.headers()).map(|s| s.code()), Some(code));
        }
        let ok = rewrite(http::Response::new(Body::empty()));
        assert!(ok.headers().get("grpc-status").is_none());
    }

    /// The real thing: a tonic server with a small limit, behind the layer, and a client sending a
    /// message over it.
    #[tokio::test]
    async fn an_oversized_message_is_invalid_argument_naming_the_sizes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let (_reporter, health) = tonic_health::server::health_reporter();
        let server = tonic::transport::Server::builder()
            .layer(super::super::routes_layer(layer()))
            .add_service(health.max_decoding_message_size(1024))
            .serve_with_incoming(incoming);
        let server = tokio::spawn(server);
        let channel = tokio::time::timeout(
            Duration::from_secs(10),
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("uri").connect(),
        )
        .await
        .expect("connect in time")
        .expect("connect");
        let mut client = HealthClient::new(channel);
        let check = |service: String| HealthCheckRequest { service };

        assert!(client.check(check(String::new())).await.is_ok());
        let status = client.check(check("s".repeat(4096))).await.expect_err("over the limit");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(
            status.message(),
            "request: 4099 bytes exceed the limit of 1024 bytes for one message (the service's limits)"
        );
        // Under the limit, the service's own answer.
        let status = client.check(check("s".repeat(1000))).await.expect_err("no such service");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        // Still serving.
        assert!(client.check(check(String::new())).await.is_ok());
        server.abort();
    }
}

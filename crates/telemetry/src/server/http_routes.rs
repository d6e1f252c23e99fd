//! The plain HTTP routes a server may serve beside its gRPC services (the gateway's OpenAI- and
//! Anthropic-compatible API and the seed's `POST /generate`), as the tracing layer labels them.
//!
//! A route's path is its `endpoint` label and its span name, so the set is fixed here: a client
//! sending other paths gets no series of its own. The outcome of a call on such a route is the
//! `tonic::Code` its response carries in its extensions (the server's own classification, put
//! there by whoever built the response), else the code its HTTP status stands for; a body that
//! ends without a `grpc-status` trailer ended well (HTTP has no trailers to say otherwise).

/// Every HTTP route's path, which is also its `endpoint` label.
pub const HTTP_ROUTES: &[&str] = &["/v1/chat/completions", "/v1/models", "/v1/messages", "/v1/responses", "/generate"];

/// The `endpoint` label of `path` when it is one of [`HTTP_ROUTES`].
pub fn http_route(path: &str) -> Option<&'static str> {
    HTTP_ROUTES.iter().copied().find(|route| *route == path)
}

/// The gRPC code an HTTP route's response status stands for (the reverse of what the HTTP APIs
/// answer for each code): `llm_requests_total{status}` reads the same over both protocols.
pub fn code_of_http_status(status: http::StatusCode) -> tonic::Code {
    use tonic::Code;
    match status.as_u16() {
        200..=299 => Code::Ok,
        400 | 405 | 409 | 422 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        408 | 504 => Code::DeadlineExceeded,
        413 | 429 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        501 => Code::Unimplemented,
        502 | 503 | 529 => Code::Unavailable,
        500 => Code::Internal,
        _ => Code::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_known_routes_are_labels() {
        assert_eq!(http_route("/v1/chat/completions"), Some("/v1/chat/completions"));
        assert_eq!(http_route("/generate"), Some("/generate"));
        assert_eq!(http_route("/generate/x"), None);
        assert_eq!(http_route("/v1/chat/completions2"), None);
    }

    #[test]
    fn statuses_read_as_the_codes_they_answer() {
        use http::StatusCode;
        assert_eq!(code_of_http_status(StatusCode::OK), tonic::Code::Ok);
        assert_eq!(code_of_http_status(StatusCode::BAD_REQUEST), tonic::Code::InvalidArgument);
        assert_eq!(code_of_http_status(StatusCode::TOO_MANY_REQUESTS), tonic::Code::ResourceExhausted);
        assert_eq!(code_of_http_status(StatusCode::NOT_FOUND), tonic::Code::NotFound);
        assert_eq!(code_of_http_status(StatusCode::GATEWAY_TIMEOUT), tonic::Code::DeadlineExceeded);
    }
}

//! The auth layer over tonic's HTTP requests (gRPC calls and the gateway's HTTP routes alike).

use std::{
    future::{Ready, ready},
    task::{Context, Poll},
};

use futures::future::Either;
use http::{HeaderMap, Request, Response};
use llmesh_common::reload::Live;
use tower::{Layer, Service};

use super::KeyStore;
use crate::{admission::is_exempt, error::CallError, principal::Principal};

/// The metadata key that carries the API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// The scheme of an `Authorization` header that carries the API key instead (the OpenAI SDKs').
const BEARER: &str = "Bearer ";

/// Checks `x-api-key` (or, without it, `Authorization: Bearer <key>`, as the OpenAI SDKs send
/// it) and puts the caller's [`Principal`] into the request extensions; refuses
/// with UNAUTHENTICATED otherwise. The key itself is removed from the request, so nothing further
/// in can log or forward it. Health and reflection calls pass without a key (and get no
/// principal). Each call is checked against the keys in force when it arrives
/// ([`KeyStore::watch`] replaces them when the keys file changes).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    keys: Live<KeyStore>,
}

impl AuthLayer {
    /// `keys`: a [`Live`] store from [`KeyStore::watch`], or a fixed `Arc<KeyStore>`.
    pub fn new(keys: impl Into<Live<KeyStore>>) -> Self {
        Self { keys: keys.into() }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner, keys: self.keys.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    keys: Live<KeyStore>,
}

/// The key a request presents: `x-api-key`, else a bearer token. A value that is not visible
/// ASCII cannot be one of our keys (it is presented as one that matches none).
fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(API_KEY_HEADER) {
        return Some(value.to_str().unwrap_or("\u{0}"));
    }
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().unwrap_or("\u{0}");
    // The scheme is case-insensitive (RFC 9110); anything but a bearer token is no key of ours.
    let scheme = value.get(..BEARER.len()).filter(|scheme| scheme.eq_ignore_ascii_case(BEARER))?;
    Some(value[scheme.len()..].trim())
}

impl<S> Auth<S> {
    fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, CallError> {
        self.keys.load().authenticate(presented(headers)).map_err(|rejection| {
            tracing::debug!(reason = rejection.message(), "call refused");
            CallError::Unauthenticated(rejection.message())
        })
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Auth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<ResBody>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if is_exempt(request.uri().path()) {
            return Either::Right(self.inner.call(request));
        }
        match self.authenticate(request.headers()) {
            Ok(principal) => {
                llmesh_telemetry::record_caller(&principal.id, principal.team.as_deref());
                request.headers_mut().remove(API_KEY_HEADER);
                request.headers_mut().remove(http::header::AUTHORIZATION);
                request.extensions_mut().insert(principal);
                Either::Right(self.inner.call(request))
            }
            Err(refused) => Either::Left(ready(Ok(refused.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, sync::Arc};

    use tonic::Code;
    use tower::{ServiceExt as _, service_fn};

    use super::*;
    use crate::admission::auth::generate_key;

    /// Echoes the principal it was given (as `x-principal`) and whether the key reached it.
    async fn echo(request: Request<()>) -> Result<Response<String>, Infallible> {
        let mut response = Response::new(String::new());
        if let Some(principal) = request.extensions().get::<Principal>() {
            response.headers_mut().insert("x-principal", principal.id.parse().unwrap());
        }
        if request.headers().contains_key(API_KEY_HEADER) {
            response.headers_mut().insert("x-saw-key", "1".parse().unwrap());
        }
        if request.headers().contains_key(http::header::AUTHORIZATION) {
            response.headers_mut().insert("x-saw-auth", "1".parse().unwrap());
        }
        Ok(response)
    }

    fn request(path: &str, key: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().uri(format!("http://gateway{path}"));
        if let Some(key) = key {
            builder = builder.header(API_KEY_HEADER, key);
        }
        builder.body(()).unwrap()
    }

    fn code(response: &Response<String>) -> Option<Code> {
        response.headers().get("grpc-status").map(|v| Code::from_bytes(v.as_bytes()))
    }

    const GENERATE: &str = "/llmesh.gateway.v1.Gateway/Generate";

    #[tokio::test]
    async fn valid_keys_become_principals_and_the_key_goes_no_further() {
        let (key, entry) = generate_key("team-a");
        let layer = AuthLayer::new(Arc::new(KeyStore::from_keys([entry]).unwrap()));
        let service = layer.layer(service_fn(echo));
        let response = service.oneshot(request(GENERATE, Some(&key))).await.unwrap();
        assert_eq!(code(&response), None);
        assert_eq!(response.headers()["x-principal"], "team-a");
        assert!(!response.headers().contains_key("x-saw-key"));
    }

    #[tokio::test]
    async fn missing_and_unknown_keys_are_unauthenticated() {
        let (_, entry) = generate_key("team-a");
        let service = AuthLayer::new(Arc::new(KeyStore::from_keys([entry]).unwrap())).layer(service_fn(echo));

        let response = service.clone().oneshot(request(GENERATE, None)).await.unwrap();
        assert_eq!(code(&response), Some(Code::Unauthenticated));
        assert_eq!(response.headers()["grpc-message"], "missing%20x-api-key");

        let (other, _) = generate_key("not-configured");
        let response = service.clone().oneshot(request(GENERATE, Some(&other))).await.unwrap();
        assert_eq!(code(&response), Some(Code::Unauthenticated));
        assert_eq!(response.headers()["grpc-message"], "unknown%20API%20key");
        assert!(!response.headers().contains_key("x-principal"));

        let mut binary = request(GENERATE, None);
        binary.headers_mut().insert(API_KEY_HEADER, http::HeaderValue::from_bytes(&[0xff, 0xfe]).unwrap());
        let response = service.oneshot(binary).await.unwrap();
        assert_eq!(code(&response), Some(Code::Unauthenticated));
    }

    #[tokio::test]
    async fn a_bearer_token_is_a_key_too_and_goes_no_further() {
        let (key, entry) = generate_key("sdk");
        let service = AuthLayer::new(Arc::new(KeyStore::from_keys([entry]).unwrap())).layer(service_fn(echo));
        for header in [format!("Bearer {key}"), format!("bearer  {key}")] {
            let mut request = request("/v1/chat/completions", None);
            request.headers_mut().insert(http::header::AUTHORIZATION, header.parse().unwrap());
            let response = service.clone().oneshot(request).await.unwrap();
            assert_eq!(code(&response), None, "{header}");
            assert_eq!(response.headers()["x-principal"], "sdk");
            assert!(!response.headers().contains_key("x-saw-auth"), "the Authorization header went further");
        }
        // Other schemes carry no key of ours; a wrong bearer token is an unknown key.
        for (header, message) in
            [(format!("Basic {key}"), "missing%20x-api-key"), ("Bearer lk_wrong".to_string(), "unknown%20API%20key")]
        {
            let mut request = request("/v1/chat/completions", None);
            request.headers_mut().insert(http::header::AUTHORIZATION, header.parse().unwrap());
            let response = service.clone().oneshot(request).await.unwrap();
            assert_eq!(code(&response), Some(Code::Unauthenticated), "{header}");
            assert_eq!(response.headers()["grpc-message"], message);
        }
        // x-api-key wins over a bearer token.
        let mut both = request(GENERATE, Some(&key));
        both.headers_mut().insert(http::header::AUTHORIZATION, "Bearer lk_wrong".parse().unwrap());
        let response = service.oneshot(both).await.unwrap();
        assert_eq!(response.headers()["x-principal"], "sdk");
    }

    #[tokio::test]
    async fn health_and_reflection_need_no_key() {
        let (_, entry) = generate_key("team-a");
        let service = AuthLayer::new(Arc::new(KeyStore::from_keys([entry]).unwrap())).layer(service_fn(echo));
        for path in ["/grpc.health.v1.Health/Check", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"] {
            let response = service.clone().oneshot(request(path, None)).await.unwrap();
            assert_eq!(code(&response), None, "{path}");
            assert!(!response.headers().contains_key("x-principal"));
        }
    }

    #[tokio::test]
    async fn without_keys_everyone_is_anonymous() {
        let service = AuthLayer::new(Arc::new(KeyStore::from_keys([]).unwrap())).layer(service_fn(echo));
        let response = service.clone().oneshot(request(GENERATE, None)).await.unwrap();
        assert_eq!(response.headers()["x-principal"], "anonymous");
        let response = service.oneshot(request(GENERATE, Some("whatever"))).await.unwrap();
        assert_eq!(response.headers()["x-principal"], "anonymous");
        assert!(!response.headers().contains_key("x-saw-key"));
    }
}

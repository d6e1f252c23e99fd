//! The auth layer over tonic's HTTP requests.

use std::{
    future::{Ready, ready},
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::Either;
use http::{HeaderMap, Request, Response};
use tonic::Status;
use tower::{Layer, Service};

use super::{KeyStore, Principal};
use crate::admission::is_exempt;

/// The metadata key that carries the API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// Checks `x-api-key` and puts the caller's [`Principal`] into the request extensions; refuses
/// with UNAUTHENTICATED otherwise. The key itself is removed from the request, so nothing further
/// in can log or forward it. Health and reflection calls pass without a key (and get no
/// principal).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    keys: Arc<KeyStore>,
}

impl AuthLayer {
    pub fn new(keys: Arc<KeyStore>) -> Self {
        Self { keys }
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
    keys: Arc<KeyStore>,
}

impl<S> Auth<S> {
    fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, Status> {
        // A value that is not visible ASCII cannot be one of our keys.
        let presented = headers.get(API_KEY_HEADER).map(|value| value.to_str().unwrap_or("\u{0}"));
        self.keys.authenticate(presented).map_err(|rejection| {
            tracing::debug!(reason = rejection.message(), "call refused");
            Status::unauthenticated(rejection.message())
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
                request.headers_mut().remove(API_KEY_HEADER);
                request.extensions_mut().insert(principal);
                Either::Right(self.inner.call(request))
            }
            Err(status) => Either::Left(ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

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

//! Test helpers for the pipeline's layers: calls, answers, and tower-test mocks that fail with an
//! [`UpstreamError`].

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{sync::Arc, time::Duration};

use llmesh_proto::generation::v1::{GenerateRequest, GenerateResponse};
use tonic::metadata::MetadataMap;
use tower::ServiceExt as _;
use tower_test::mock::Mock;

use super::{Ask, Attempt, Call, Reply, UpstreamError};
use crate::{deadline::Deadline, principal::Principal};

/// An error a mock sends, turned back into the [`UpstreamError`] it carries.
#[derive(Debug)]
pub struct Fail(pub UpstreamError);

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Fail {}

/// A mock whose errors are [`Fail`]s, as the pipeline's services want them.
pub fn fail_with<R: Send + 'static>(
    mock: Mock<R, Reply>,
) -> impl tower::Service<R, Response = Reply, Error = UpstreamError, Future: Send> + Clone + Send + Sync + 'static {
    mock.map_err(|error| match error.downcast::<Fail>() {
        Ok(fail) => fail.0,
        Err(other) => panic!("the mock failed on its own: {other}"),
    })
}

/// For mocks that never fail.
pub fn never(error: Box<dyn std::error::Error + Send + Sync>) -> UpstreamError {
    panic!("the mock failed: {error}")
}

pub fn request(text: &str) -> Arc<GenerateRequest> {
    Arc::new(GenerateRequest { model: "sim".into(), prompt: text.into(), ..Default::default() })
}

pub fn generate(text: &str, deadline: Deadline) -> Call {
    Call::new(Ask::Generate(request(text)), deadline, Principal::anonymous())
}

/// One attempt of [`generate`]'s call, as the breaker layer makes it.
pub fn attempt(text: &str, deadline: Deadline) -> Attempt {
    Attempt::new(generate(text, deadline)).0
}

/// A deadline the client chose.
pub fn client_deadline(after: Duration) -> Deadline {
    let mut metadata = MetadataMap::new();
    let value = format!("{}m", (after + crate::deadline::MARGIN).as_millis());
    metadata.insert("grpc-timeout", value.parse().unwrap());
    Deadline::new(&metadata, Duration::from_secs(30))
}

pub fn answer(text: &str) -> Reply {
    Reply::Generated(GenerateResponse { model: "sim".into(), text: text.into(), ..Default::default() })
}

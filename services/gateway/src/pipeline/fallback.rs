//! Graceful degradation, the outermost layer: when generation fails, times out, or every breaker
//! is open, answer from (in order) a secondary model, a stale cache entry, or a configured message —
//! the seed's "服务暂时不可用，请稍后重试" for errors and "请求处理时间过长，请简化您的提示词" for
//! timeouts. The answer says `degraded`, why ([`FallbackReason`]) and where it came from
//! ([`FallbackSource`]).
//!
//! It sits outside the breaker, so an open breaker still degrades gracefully, and outside the
//! retries, so a fallback answers only once retrying has given up. A client's own mistake is never
//! fallen back from ([`UpstreamError::fallback_reason`]), and past the client's own deadline nobody
//! is listening, so the failure stands.
//!
//! The secondary model is a call like any other: it goes through the same retries, breakers and
//! balancer, only for a key that may use that model, and it is charged (its usage is the answer's).
//! The detail a client sees is a fixed description and the trace id, never generation's words.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use futures::future::BoxFuture;
use llmesh_proto::{
    common::v1::{Degraded, FinishReason, Usage},
    generation::v1::{GenerateRequest, GenerateResponse},
};
use pin_project_lite::pin_project;
use serde::{Deserialize, Serialize};
use tower::{Layer, Service, ServiceExt as _};

use super::{Ask, Call, FallbackReason, FallbackSource, Reply, UpstreamError};
use crate::{
    cache::{Cache, Use},
    metrics::{label, metrics},
};

/// `[gateway.fallback]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackConfig {
    pub enabled: bool,
    /// Try this model when the requested one fails (for keys that may use it).
    pub secondary_model: Option<String>,
    /// Answer with an expired cache entry for the same request, when the cache kept one.
    pub stale_cache: bool,
    pub error_message: String,
    pub timeout_message: String,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            secondary_model: None,
            stale_cache: true,
            error_message: "服务暂时不可用，请稍后重试".into(),
            timeout_message: "请求处理时间过长，请简化您的提示词".into(),
        }
    }
}

impl FallbackConfig {
    /// The configured message as an answer.
    fn message(&self, model: &str, reason: FallbackReason) -> GenerateResponse {
        let text = if reason == FallbackReason::Timeout { &self.timeout_message } else { &self.error_message };
        GenerateResponse {
            id: format!("fallback-{}", uuid::Uuid::now_v7().simple()),
            model: model.to_string(),
            text: text.clone(),
            finish_reason: FinishReason::Fallback.into(),
            usage: Some(Usage::default()),
            cached: false,
            degraded: Some(degraded(reason, FallbackSource::Message)),
            provider: "fallback".into(),
            ..Default::default()
        }
    }
}

/// What a degraded answer says about itself: no upstream words, the trace id to find the rest.
fn degraded(reason: FallbackReason, source: FallbackSource) -> Degraded {
    let detail = match llmesh_telemetry::current_trace_id() {
        Some(trace) => format!("{} (trace {trace})", reason.description()),
        None => reason.description().to_string(),
    };
    Degraded { reason: reason.as_str().into(), source: source.as_str().into(), detail }
}

/// Answers a failed call with a degraded one; see the module docs.
#[derive(Debug, Clone)]
pub struct FallbackLayer {
    config: Arc<FallbackConfig>,
    cache: Cache,
}

impl FallbackLayer {
    pub fn new(config: FallbackConfig, cache: Cache) -> Self {
        Self { config: Arc::new(config), cache }
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = Fallback<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Fallback { inner, config: self.config.clone(), cache: self.cache.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct Fallback<S> {
    inner: S,
    config: Arc<FallbackConfig>,
    cache: Cache,
}

impl<S> Service<Call> for Fallback<S>
where
    S: Service<Call, Response = Reply, Error = UpstreamError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Reply;
    type Error = UpstreamError;
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        // Only generations degrade, and only when configured to.
        let recovery = (self.config.enabled && call.ask.request().is_some()).then(|| Recovery {
            call: call.clone(),
            inner: self.inner.clone(),
            config: self.config.clone(),
            cache: self.cache.clone(),
        });
        // The inner service was polled ready for this call; the clone kept for the secondary
        // model takes its own turn (`oneshot`).
        ResponseFuture::Primary { inner: self.inner.call(call), recovery }
    }
}

/// What a failed call needs to be answered another way.
pub struct Recovery<S> {
    call: Call,
    inner: S,
    config: Arc<FallbackConfig>,
    cache: Cache,
}

pin_project! {
    /// The call, then (when it failed in a way a fallback may answer) the recovery, boxed: the
    /// failure path is not the hot one.
    #[project = Projected]
    pub enum ResponseFuture<S: Service<Call>> {
        Primary { #[pin] inner: S::Future, recovery: Option<Recovery<S>> },
        Recovering { answer: BoxFuture<'static, Result<Reply, UpstreamError>> },
    }
}

impl<S> Future for ResponseFuture<S>
where
    S: Service<Call, Response = Reply, Error = UpstreamError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Output = Result<Reply, UpstreamError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let answer = match self.as_mut().project() {
                Projected::Primary { inner, recovery } => {
                    let error = match ready!(inner.poll(cx)) {
                        Ok(reply) => return Poll::Ready(Ok(reply)),
                        Err(error) => error,
                    };
                    let Some(recovery) = recovery.take() else { return Poll::Ready(Err(error)) };
                    let Some(reason) = error.fallback_reason() else { return Poll::Ready(Err(error)) };
                    if recovery.call.deadline.remaining().is_zero() && recovery.call.deadline.client_bound() {
                        return Poll::Ready(Err(error));
                    }
                    Box::pin(recovery.answer(reason, error))
                }
                Projected::Recovering { answer } => return answer.as_mut().poll(cx),
            };
            self.set(ResponseFuture::Recovering { answer });
        }
    }
}

impl<S> Recovery<S>
where
    S: Service<Call, Response = Reply, Error = UpstreamError> + Clone + Send + 'static,
    S::Future: Send,
{
    /// The fallback chain: secondary model, stale cache, message.
    async fn answer(self, reason: FallbackReason, error: UpstreamError) -> Result<Reply, UpstreamError> {
        let Recovery { call, inner, config, cache } = self;
        let Some(request) = call.ask.request().cloned() else { return Err(error) };
        let (response, source) = match secondary(&call, &request, &config, inner).await {
            Some(response) => (response, FallbackSource::SecondaryModel),
            None => match stale(&call, &request, &config, &cache).await {
                Some(response) => (response, FallbackSource::StaleCache),
                None => {
                    tracing::warn!(reason = reason.as_str(), error = %error, "answering with the fallback message");
                    (config.message(&request.model, reason), FallbackSource::Message)
                }
            },
        };
        let mut response = response;
        if source != FallbackSource::Message {
            response.degraded = Some(degraded(reason, source));
        }
        metrics().fallbacks.add(1, &[label("reason", reason.as_str()), label("source", source.as_str())]);
        tracing::info!(reason = reason.as_str(), source = source.as_str(), "answered with a fallback");
        Ok(Reply::Fallback(response, source))
    }
}

/// The secondary model's answer, when one is configured, differs from the one that failed, the key
/// may use it, and there is time left.
async fn secondary<S>(
    call: &Call,
    request: &GenerateRequest,
    config: &FallbackConfig,
    inner: S,
) -> Option<GenerateResponse>
where
    S: Service<Call, Response = Reply, Error = UpstreamError>,
{
    let model = config.secondary_model.as_ref().filter(|m| **m != request.model)?;
    if !call.caller.allows(model) {
        tracing::debug!(key = %call.caller.id, model, "the key may not use the secondary model");
        return None;
    }
    if call.deadline.remaining().is_zero() {
        return None;
    }
    let second = Arc::new(GenerateRequest { model: model.clone(), ..request.clone() });
    match inner.oneshot(call.with_ask(Ask::Generate(second))).await {
        Ok(Reply::Generated(response)) => Some(response),
        Ok(_) => None,
        Err(error) => {
            tracing::warn!(model, error = %error, "the secondary model failed too");
            None
        }
    }
}

/// An expired cache entry for the same request, when configured, the request's policy lets it
/// read the cache (not BYPASS, not REFRESH, nor a key whose answers are never cached: admission
/// made those BYPASS) and the cache kept one.
async fn stale(
    call: &Call,
    request: &GenerateRequest,
    config: &FallbackConfig,
    cache: &Cache,
) -> Option<GenerateResponse> {
    if !config.stale_cache || !Use::of(request.cache, true).read || call.deadline.remaining().is_zero() {
        return None;
    }
    cache.lookup_stale(request, call.deadline.remaining()).await?.response
}

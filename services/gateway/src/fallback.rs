//! Graceful degradation: when generation fails, times out, or every breaker is open, answer from
//! (in order) a secondary model, a stale cache entry, or a configured message — the seed's
//! "服务暂时不可用，请稍后重试" for errors and "请求处理时间过长，请简化您的提示词" for timeouts.
//! The answer says `degraded`, why, and where it came from. It sits outside the breaker, so an
//! open breaker still degrades gracefully. A client's own mistake is never "fallen back" from.

use llmesh_proto::{
    common::v1::{Degraded, FinishReason, Usage},
    generation::v1::GenerateResponse,
};
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};

use crate::upstream::{CIRCUIT_OPEN, REASON_KEY};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackConfig {
    pub enabled: bool,
    /// Try this model when the requested one fails.
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

/// Why a failure may be answered by a fallback (a low-cardinality label), or `None` when the
/// client should see the error as it is.
pub fn reason(status: &Status) -> Option<&'static str> {
    if status.metadata().get(REASON_KEY).is_some_and(|v| v == CIRCUIT_OPEN) {
        return Some("circuit_open");
    }
    match status.code() {
        Code::DeadlineExceeded => Some("timeout"),
        Code::ResourceExhausted => Some("overloaded"),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Aborted => Some("error"),
        _ => None,
    }
}

pub fn degraded(reason: &str, source: &str, status: &Status) -> Degraded {
    Degraded { reason: reason.into(), source: source.into(), detail: status.message().chars().take(300).collect() }
}

impl FallbackConfig {
    /// The configured message as an answer.
    pub fn message(&self, model: &str, reason: &str, status: &Status) -> GenerateResponse {
        let text = if reason == "timeout" { &self.timeout_message } else { &self.error_message };
        GenerateResponse {
            id: format!("fallback-{}", uuid::Uuid::now_v7().simple()),
            model: model.to_string(),
            text: text.clone(),
            finish_reason: FinishReason::Fallback.into(),
            usage: Some(Usage::default()),
            cached: false,
            degraded: Some(degraded(reason, "message", status)),
            provider: "fallback".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_upstream_trouble_falls_back() {
        assert_eq!(reason(&Status::unavailable("down")), Some("error"));
        assert_eq!(reason(&Status::deadline_exceeded("slow")), Some("timeout"));
        assert_eq!(reason(&Status::resource_exhausted("429")), Some("overloaded"));
        let mut open = Status::unavailable("open");
        open.metadata_mut().insert(REASON_KEY, CIRCUIT_OPEN.parse().unwrap());
        assert_eq!(reason(&open), Some("circuit_open"));
        assert_eq!(reason(&Status::invalid_argument("bad")), None);
        assert_eq!(reason(&Status::permission_denied("no")), None);
    }

    #[test]
    fn the_seeds_messages_by_default() {
        let config = FallbackConfig::default();
        let status = Status::deadline_exceeded("slow");
        let answer = config.message("sim", "timeout", &status);
        assert_eq!(answer.text, "请求处理时间过长，请简化您的提示词");
        assert_eq!(answer.finish_reason, i32::from(FinishReason::Fallback));
        assert_eq!(answer.degraded.unwrap().source, "message");
        assert_eq!(config.message("sim", "error", &status).text, "服务暂时不可用，请稍后重试");
    }
}

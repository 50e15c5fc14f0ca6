//! Retry policy as the proxy runs it: which outcomes are retried, exponential backoff with
//! jitter, `Retry-After`, and which methods are safe to repeat.

use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use weft_proto::policy::EffectiveRetry;

/// A compiled `retries` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    /// Retries after the first try.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub allow_non_idempotent: bool,
    pub max_body_bytes: usize,
    pub on: RetryOn,
}

/// Retry conditions (Envoy's `retry_on` vocabulary).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub any_5xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub statuses: Vec<u16>,
    /// gRPC status codes, read from `grpc-status` in the response headers (trailers-only).
    pub grpc: Vec<u16>,
}

impl RetryConfig {
    pub fn from_model(r: &weft_proto::model::RetryPolicy) -> Self {
        let e = EffectiveRetry::from_model(r);
        let mut on = RetryOn::default();
        for c in &e.retry_on {
            match c.as_str() {
                "5xx" => on.any_5xx = true,
                "gateway-error" => on.gateway_error = true,
                "reset" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "refused-stream" => on.refused_stream = true,
                "cancelled" => on.grpc.push(1),
                "deadline-exceeded" => on.grpc.push(4),
                "resource-exhausted" => on.grpc.push(8),
                "internal" => on.grpc.push(13),
                "unavailable" => on.grpc.push(14),
                code => {
                    // Validation admits only the names above and HTTP statuses.
                    if let Ok(code) = code.parse() {
                        on.statuses.push(code);
                    }
                }
            }
        }
        Self {
            attempts: e.attempts,
            per_try_timeout: e.per_try_timeout.map(|m| m.as_duration()),
            backoff_base: e.backoff_base.as_duration(),
            backoff_max: e.backoff_max.as_duration(),
            allow_non_idempotent: e.allow_non_idempotent,
            max_body_bytes: e.max_body_bytes as usize,
            on,
        }
    }

    /// Whether a response with this status and headers should be tried again.
    pub fn retry_response(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let code = status.as_u16();
        if (self.on.any_5xx && status.is_server_error())
            || (self.on.gateway_error && matches!(code, 502..=504))
            || self.on.statuses.contains(&code)
        {
            return true;
        }
        !self.on.grpc.is_empty()
            && headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u16>().ok())
                .is_some_and(|g| self.on.grpc.contains(&g))
    }

    /// The pause before retry number `retry` (1-based): a random point in the upper half of
    /// `min(max, base × 2^(retry-1))` ("equal jitter"), so retries spread without collapsing
    /// to zero.
    pub fn backoff(&self, retry: u32) -> Duration {
        let cap = self
            .backoff_base
            .saturating_mul(1u32 << (retry.saturating_sub(1)).min(20))
            .min(self.backoff_max);
        let half = cap / 2;
        half + Duration::from_nanos(fastrand::u64(0..=half.as_nanos() as u64))
    }
}

/// Methods that may be repeated without changing the outcome (RFC 9110 §9.2.2).
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// `Retry-After` in seconds (the HTTP-date form is not honoured).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::model::{Millis, RetryPolicy};

    fn cfg(on: &[&str]) -> RetryConfig {
        RetryConfig::from_model(&RetryPolicy {
            retry_on: on.iter().map(|s| (*s).to_owned()).collect(),
            backoff_base: Some(Millis(10)),
            backoff_max: Some(Millis(100)),
            ..RetryPolicy::default()
        })
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let c = cfg(&[]);
        for _ in 0..100 {
            let b1 = c.backoff(1);
            assert!(b1 >= Duration::from_millis(5) && b1 <= Duration::from_millis(10));
            let b3 = c.backoff(3);
            assert!(b3 >= Duration::from_millis(20) && b3 <= Duration::from_millis(40));
            let b9 = c.backoff(9);
            assert!(b9 >= Duration::from_millis(50) && b9 <= Duration::from_millis(100));
        }
    }

    #[test]
    fn conditions_match_statuses_and_grpc_codes() {
        let none = HeaderMap::new();
        let c = cfg(&["gateway-error", "409", "unavailable"]);
        assert!(c.retry_response(StatusCode::BAD_GATEWAY, &none));
        assert!(c.retry_response(StatusCode::CONFLICT, &none));
        assert!(!c.retry_response(StatusCode::INTERNAL_SERVER_ERROR, &none));
        let mut grpc = HeaderMap::new();
        grpc.insert("grpc-status", "14".parse().unwrap());
        assert!(c.retry_response(StatusCode::OK, &grpc));
        grpc.insert("grpc-status", "2".parse().unwrap());
        assert!(!c.retry_response(StatusCode::OK, &grpc));
        // The defaults: Istio's.
        let d = cfg(&[]);
        assert!(d.retry_response(StatusCode::SERVICE_UNAVAILABLE, &none));
        assert!(d.on.connect_failure && d.attempts == 2);
    }

    #[test]
    fn methods_and_retry_after() {
        assert!(idempotent(&Method::GET) && idempotent(&Method::PUT));
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
        let mut h = HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
    }
}

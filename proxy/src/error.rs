//! The one place where errors the proxy makes itself become responses.
//!
//! Every such response carries `x-weft-reason: <reason>` and a one-line text body that starts
//! with `weft-proxy:` and names what failed, so an operator can tell a proxy error from an
//! application error at a glance. gRPC callers get the same information as `grpc-status` and
//! `grpc-message` in a trailers-only response, because gRPC clients ignore HTTP status codes.

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Response, StatusCode, Version};

use crate::body::ProxyBody;
use crate::resilience::ResilienceError;
use crate::routing::RouteError;
use crate::upstream::UpstreamError;

/// The header naming why the proxy answered a request itself.
pub const REASON_HEADER: &str = "x-weft-reason";

/// Anything that stops the proxy from returning the upstream's response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Resilience(#[from] ResilienceError),
    #[error("denied by policy {policy:?}")]
    Denied { policy: String },
    #[error("unauthenticated: {0}")]
    Unauthenticated(crate::jwt::JwtError),
    #[error(transparent)]
    Limit(#[from] crate::limits::LimitError),
}

/// gRPC status codes the proxy produces (see `grpc/doc/statuscodes.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum GrpcStatus {
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl ProxyError {
    /// The stable, machine-readable reason: the value of `x-weft-reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Route(RouteError::NoRoute { .. }) => "no_route",
            ProxyError::Route(RouteError::NoEndpoints { .. }) => "no_endpoints",
            ProxyError::Upstream(UpstreamError::Connect { .. }) => "upstream_connect_failed",
            ProxyError::Upstream(UpstreamError::Reset { .. }) => "upstream_reset",
            ProxyError::Upstream(UpstreamError::ConnectTimeout { .. }) => "connect_timeout",
            ProxyError::Upstream(UpstreamError::ConnectionLimit { .. }) => "overflow",
            ProxyError::Resilience(e) => e.reason(),
            ProxyError::Denied { .. } => "denied",
            ProxyError::Unauthenticated(e) => e.reason(),
            ProxyError::Limit(e) => e.reason(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Route(RouteError::NoRoute { .. }) => StatusCode::NOT_FOUND,
            ProxyError::Route(RouteError::NoEndpoints { .. })
            | ProxyError::Upstream(
                UpstreamError::Connect { .. } | UpstreamError::ConnectionLimit { .. },
            ) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(UpstreamError::Reset { .. }) => StatusCode::BAD_GATEWAY,
            ProxyError::Upstream(UpstreamError::ConnectTimeout { .. }) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Resilience(e) => e.status(),
            ProxyError::Denied { .. } => StatusCode::FORBIDDEN,
            ProxyError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Limit(e) => e.status(),
        }
    }

    fn grpc_status(&self) -> u16 {
        match self {
            ProxyError::Route(RouteError::NoRoute { .. }) => GrpcStatus::Unimplemented as u16,
            ProxyError::Upstream(UpstreamError::ConnectTimeout { .. }) => {
                GrpcStatus::DeadlineExceeded as u16
            }
            ProxyError::Resilience(e) => e.grpc_status(),
            ProxyError::Denied { .. } => GrpcStatus::PermissionDenied as u16,
            ProxyError::Unauthenticated(_) => GrpcStatus::Unauthenticated as u16,
            ProxyError::Limit(_) => GrpcStatus::ResourceExhausted as u16,
            _ => GrpcStatus::Unavailable as u16,
        }
    }

    /// The response for a request that spoke `version`; `grpc` when it was a gRPC call.
    pub fn to_response(&self, grpc: bool, version: Version) -> Response<ProxyBody> {
        let message = format!("weft-proxy: {self}");
        let mut resp = if grpc {
            let mut resp = Response::new(ProxyBody::empty());
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(self.grpc_status()));
            h.insert("grpc-message", grpc_message(&message));
            resp
        } else {
            let mut resp = Response::new(ProxyBody::text(format!("{message}\n")));
            *resp.status_mut() = self.status();
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            resp
        };
        resp.headers_mut()
            .insert(REASON_HEADER, HeaderValue::from_static(self.reason()));
        if let ProxyError::Resilience(e) = self
            && let Some(secs) = e.retry_after()
        {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        *resp.version_mut() = version;
        resp
    }
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%` itself.
fn grpc_message(message: &str) -> HeaderValue {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).expect("printable ASCII is a valid header value")
}

/// gRPC requests are recognised by content type (`application/grpc`, `application/grpc+proto`…).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn no_route() -> ProxyError {
        RouteError::NoRoute {
            host: "foo".into(),
            path: "/x".into(),
        }
        .into()
    }

    async fn text(resp: Response<ProxyBody>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn http_errors_map_to_status_reason_and_body() {
        let cases: Vec<(ProxyError, u16, &str, &str)> = vec![
            (
                no_route(),
                404,
                "no_route",
                "weft-proxy: no route for host \"foo\" path \"/x\"",
            ),
            (
                RouteError::NoEndpoints {
                    service: "reviews".into(),
                    subset: "v2".into(),
                }
                .into(),
                503,
                "no_endpoints",
                "service \"reviews\" subset \"v2\"",
            ),
            (
                UpstreamError::Connect {
                    endpoint: "127.0.0.1:9".into(),
                    cause: "Connection refused (os error 111)".into(),
                }
                .into(),
                503,
                "upstream_connect_failed",
                "127.0.0.1:9 failed: Connection refused (os error 111)",
            ),
            (
                UpstreamError::Reset {
                    endpoint: "127.0.0.1:9".into(),
                    cause: "connection closed".into(),
                }
                .into(),
                502,
                "upstream_reset",
                "upstream 127.0.0.1:9",
            ),
        ];
        for (err, status, reason, body) in cases {
            let resp = err.to_response(false, Version::HTTP_11);
            assert_eq!(resp.status().as_u16(), status, "{err}");
            assert_eq!(resp.headers()[REASON_HEADER], reason);
            let text = text(resp).await;
            assert!(text.starts_with("weft-proxy: "), "{text}");
            assert!(text.contains(body), "{text}");
        }
    }

    #[tokio::test]
    async fn grpc_errors_are_trailers_only() {
        let resp = no_route().to_response(true, Version::HTTP_2);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), Version::HTTP_2);
        assert_eq!(resp.headers()["grpc-status"], "12");
        assert_eq!(resp.headers()[REASON_HEADER], "no_route");
        assert_eq!(
            resp.headers()["grpc-message"],
            "weft-proxy: no route for host \"foo\" path \"/x\""
        );
        assert!(http_body::Body::is_end_stream(resp.body()));

        let unavailable: ProxyError = UpstreamError::Reset {
            endpoint: "e:1".into(),
            cause: "100% gone".into(),
        }
        .into();
        let resp = unavailable.to_response(true, Version::HTTP_2);
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert!(
            resp.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .ends_with("100%25 gone")
        );
    }

    #[tokio::test]
    async fn resilience_errors_name_the_policy() {
        use crate::resilience::{ResilienceError, TimeoutKind};
        let t: ProxyError = ResilienceError::Timeout {
            kind: TimeoutKind::PerTry,
            after_ms: 50,
            target: "endpoint e:1".into(),
        }
        .into();
        let resp = t.to_response(false, Version::HTTP_11);
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(resp.headers()[REASON_HEADER], "per_try_timeout");
        let resp = t.to_response(true, Version::HTTP_2);
        assert_eq!(resp.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");

        let limited: ProxyError = ResilienceError::RateLimited {
            limit: "route rule r/0".into(),
            retry_after_secs: 3,
        }
        .into();
        let resp = limited.to_response(false, Version::HTTP_11);
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()["retry-after"], "3");

        let fault: ProxyError = ResilienceError::FaultInjected {
            rule: "r/0".into(),
            status: 418,
            grpc_status: 9,
        }
        .into();
        assert_eq!(
            fault.to_response(false, Version::HTTP_11).status().as_u16(),
            418
        );
        assert_eq!(
            fault.to_response(true, Version::HTTP_2).headers()["grpc-status"],
            "9"
        );
        let timeout: ProxyError = UpstreamError::ConnectTimeout {
            endpoint: "e:1".into(),
            cause: "timed out".into(),
        }
        .into();
        assert_eq!(timeout.reason(), "connect_timeout");
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[tokio::test]
    async fn security_refusals_map_to_403_401_and_grpc_codes() {
        let denied = ProxyError::Denied {
            policy: "no-admin".into(),
        };
        let resp = denied.to_response(false, Version::HTTP_11);
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()[REASON_HEADER], "denied");
        assert!(text(resp).await.contains("denied by policy \"no-admin\""));
        let resp = denied.to_response(true, Version::HTTP_2);
        assert_eq!(resp.headers()["grpc-status"], "7");

        let expired = ProxyError::Unauthenticated(crate::jwt::JwtError::Expired);
        let resp = expired.to_response(false, Version::HTTP_11);
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.headers()[REASON_HEADER], "jwt_expired");
        assert_eq!(
            expired.to_response(true, Version::HTTP_2).headers()["grpc-status"],
            "16"
        );
    }

    #[test]
    fn grpc_is_detected_by_content_type() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
    }
}

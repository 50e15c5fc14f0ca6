//! Resilience in the data plane: everything between "the route picked a backend set" and "the
//! response goes back", per the rule's and the service's policy.
//!
//! - [`call`]: the request path (rate limit → fault → bulkhead → attempts with retries and
//!   timeouts → mirror), the one entry point `forward.rs` calls.
//! - [`stats`]: per-endpoint state (peak EWMA, in-flight, ejection, health) in atomics, shared
//!   across configuration versions through [`registry`], so a config swap does not reset it.
//! - [`retry`], [`budget`], [`timeout`], [`outlier`], [`bulkhead`], [`ratelimit`], [`fault`],
//!   [`mirror`], [`health`], [`replay`]: one concern each. Load-balancing algorithms live in
//!   [`crate::balance`].

pub mod budget;
pub mod bulkhead;
pub mod call;
pub mod connector;
pub mod fault;
pub mod health;
pub mod mirror;
pub mod outlier;
pub mod ratelimit;
pub mod registry;
pub mod replay;
pub mod retry;
pub mod stats;
pub mod timeout;

use http::StatusCode;

pub use registry::Registry;
pub use timeout::TimeoutKind;

/// Requests the proxy refused or cut short because of a resilience policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResilienceError {
    #[error("{kind} of {after_ms} ms expired ({target})")]
    Timeout {
        kind: TimeoutKind,
        after_ms: u64,
        target: String,
    },
    #[error("service {service:?} is at its limit of {limit} concurrent requests (overflow)")]
    Overflow { service: String, limit: u32 },
    /// `limit` names it: `route rule <route>/<rule>`, or `service <name> (inbound)`.
    #[error("rate limit of {limit} exceeded; retry after {retry_after_secs} s")]
    RateLimited {
        limit: String,
        retry_after_secs: u64,
    },
    #[error("fault injected by route rule {rule}: abort with {status}")]
    FaultInjected {
        rule: String,
        status: u16,
        grpc_status: u32,
    },
}

impl ResilienceError {
    pub fn reason(&self) -> &'static str {
        match self {
            ResilienceError::Timeout { kind, .. } => kind.reason(),
            ResilienceError::Overflow { .. } => "overflow",
            ResilienceError::RateLimited { .. } => "rate_limited",
            ResilienceError::FaultInjected { .. } => "fault_injected",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ResilienceError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ResilienceError::Overflow { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ResilienceError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ResilienceError::FaultInjected { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
        }
    }

    /// The gRPC status for gRPC callers.
    pub fn grpc_status(&self) -> u16 {
        match self {
            ResilienceError::Timeout { .. } => 4,     // DEADLINE_EXCEEDED
            ResilienceError::Overflow { .. } => 14,   // UNAVAILABLE
            ResilienceError::RateLimited { .. } => 8, // RESOURCE_EXHAUSTED
            ResilienceError::FaultInjected { grpc_status, .. } => *grpc_status as u16,
        }
    }

    /// `Retry-After` (seconds) for a 429.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ResilienceError::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }
}

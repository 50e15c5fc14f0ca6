//! The outbound request path under policy: rate limit → fault → (request timeout:
//! bulkhead → attempts) → response. Each attempt picks an endpoint (a retry avoids the one
//! that just failed), counts it in flight, applies the per-try timeout, feeds the outcome to
//! peak-EWMA and outlier ejection, and is retried when the rule's conditions, the method, the
//! replay buffer and the service's retry budget all allow it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::balance::BalanceError;
use crate::body::DownstreamBody;
use crate::pool::UpstreamBody;
use http::header::HeaderName;
use http::request::Parts;
use http::{Request, Response};
use weft_proto::model;
use weft_proto::policy::{LbAlgorithm, RetryBudget, retry_defaults};

use super::budget::BudgetConfig;
use super::fault::{self, FaultConfig};
use super::outlier::{self, OutlierConfig};
use super::ratelimit::{RateConfig, TokenBucket};
use super::registry::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, PoolKey, Registry, ServiceShared, rule_key,
};
use super::replay::{ReplayBody, RequestBody};
use super::retry::{self, RetryConfig};
use super::stats::ms_at;
use super::timeout::{TimeoutKind, TrackedBody};
use super::{ResilienceError, mirror};
use crate::balance::EndpointSet;
use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::identity::mesh::MeshClient;
use crate::routing::RouteError;
use crate::upstream::{Upstream, UpstreamError, UpstreamProtocol};
use futures_util::future::Either;

/// A `Retry-After` longer than this is not waited for: the answer goes back instead.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// The load balancer of a service, compiled.
#[derive(Debug, Clone)]
pub struct LbRuntime {
    pub algorithm: LbAlgorithm,
    pub hash_header: Option<HeaderName>,
    pub hash_cookie: Option<String>,
    /// The proxy's zone when the service prefers local endpoints and the proxy has a zone.
    pub local_zone: Option<Arc<str>>,
}

/// A service's policy for one configuration version, with its state shared across versions.
#[derive(Debug)]
pub struct ServiceRuntime {
    pub name: String,
    pub lb: LbRuntime,
    pub outlier: Option<OutlierConfig>,
    pub max_requests: Option<u32>,
    pub max_pending: u32,
    pub budget: BudgetConfig,
    pub shared: Arc<ServiceShared>,
    pub upstream: Upstream,
}

impl ServiceRuntime {
    /// Fails only when TLS origination cannot be set up (its CA file).
    pub fn build(svc: &model::Service, registry: &Registry) -> Result<Self, BalanceError> {
        let p = &svc.policy;
        let lb = p.load_balancer.clone().unwrap_or_default();
        let shared = registry.service(&svc.name);
        let limits = p.limits.clone().unwrap_or_default();
        let tls = p
            .tls
            .as_ref()
            .map(|t| crate::origination::TlsKey::load(t, svc.protocol))
            .transpose()
            .map_err(|reason| BalanceError::Tls {
                service: svc.name.clone(),
                reason,
            })?;
        let upstream = shared.upstream(PoolKey {
            connect_timeout: p
                .connect_timeout
                .map_or(DEFAULT_CONNECT_TIMEOUT, |m| m.as_duration()),
            idle_timeout: p
                .idle_timeout
                .map_or(DEFAULT_IDLE_TIMEOUT, |m| m.as_duration()),
            max_connections: limits.max_connections,
            tls: tls.map(Arc::new),
        });
        Ok(Self {
            name: svc.name.clone(),
            lb: LbRuntime {
                algorithm: lb.algorithm,
                // Validation checked the name.
                hash_header: lb
                    .hash_header
                    .as_deref()
                    .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
                hash_cookie: lb.hash_cookie,
                local_zone: lb
                    .prefer_local_zone
                    .then(|| registry.zone().cloned())
                    .flatten(),
            },
            outlier: p.outlier_detection.as_ref().map(OutlierConfig::from_model),
            max_requests: limits.max_requests,
            max_pending: limits.max_pending.unwrap_or(0),
            // Always a budget: the default one when the service sets none (as Linkerd).
            budget: BudgetConfig::from_model(
                p.retry_budget.as_ref().unwrap_or(&RetryBudget::default()),
            ),
            shared,
            upstream,
        })
    }
}

/// A rule's request policy, compiled.
#[derive(Debug, Default)]
pub struct RulePolicy {
    /// `route/rule`, for messages.
    pub name: String,
    pub timeout: Option<Duration>,
    pub retry: Option<RetryConfig>,
    pub rate_limit: Option<Arc<TokenBucket>>,
    pub fault: Option<FaultConfig>,
    pub mirror: Option<MirrorPolicy>,
    pub stream_idle_timeout: Option<Duration>,
    /// Header edits; applied where the request is routed (see `Forwarder::forward`).
    pub headers: Option<Arc<crate::header_edits::Compiled>>,
    /// URL rewrite; applied where the request is routed, before the header edits.
    pub rewrite: Option<crate::rewrite::Compiled>,
    /// Cross-origin policy; applied where the request is routed (see `crate::cors`).
    pub cors: Option<crate::cors::Cors>,
}

/// Where a rule's copies go, and how many.
#[derive(Debug)]
pub struct MirrorPolicy {
    pub set: Arc<EndpointSet>,
    pub percent: u32,
    /// The identity the mirror's sidecars must present (its service's), when it has one.
    pub identity: Option<Arc<str>>,
}

impl RulePolicy {
    pub fn build(
        route: &str,
        index: usize,
        rule: &model::Rule,
        registry: &Registry,
        mirror: Option<(Arc<EndpointSet>, Option<Arc<str>>)>,
    ) -> Self {
        let name = if rule.name.is_empty() {
            format!("{route}/{index}")
        } else {
            format!("{route}/{}", rule.name)
        };
        Self {
            name,
            timeout: rule.timeout.map(|m| m.as_duration()),
            retry: rule.retries.as_ref().map(RetryConfig::from_model),
            rate_limit: rule
                .rate_limit
                .as_ref()
                .map(|r| registry.bucket(&rule_key(route, index), RateConfig::from_model(r))),
            fault: rule.fault.as_ref().map(FaultConfig::from_model),
            mirror: mirror
                .zip(rule.mirror.as_ref())
                .map(|((set, identity), m)| MirrorPolicy {
                    set,
                    percent: m.percent_or_default(),
                    identity,
                }),
            stream_idle_timeout: rule.stream_idle_timeout.map(|m| m.as_duration()),
            headers: None,
            rewrite: None,
            cors: None,
        }
    }
}

/// Forwards `req` to `set` under `policy`; with the response, which endpoint gave it. `mtls`
/// is how to reach `set` when its service has an identity; `mesh` is this proxy's mesh client
/// (when it has an identity), for a mirror whose service has one of its own.
///
/// Not an `async fn`, like the rest of the request path (see `Forwarder::serve`).
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` would keep the request twice in its future"
)]
pub fn forward(
    set: Arc<EndpointSet>,
    policy: Arc<RulePolicy>,
    req: Request<DownstreamBody>,
    mtls: Option<Mtls>,
    mesh: Option<&MeshClient>,
) -> impl Future<Output = Result<(Response<ProxyBody>, Attempted), ProxyError>> {
    async move {
        if let Some(bucket) = &policy.rate_limit
            && let Err(wait) = bucket.try_take(req.headers())
        {
            return Err(ResilienceError::RateLimited {
                limit: format!("route rule {}", policy.name),
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            }
            .into());
        }
        if let Some(f) = &policy.fault {
            f.apply(&policy.name).await?;
        }
        // Each arm builds its own future: a future kept in a local and then awaited in one of two
        // ways is laid out twice, and the request future (moved at every poll layer) grows by it.
        match policy.timeout {
            None => attempts(&set, &policy, req, mtls.as_ref(), mesh).await,
            Some(t) => tokio::time::timeout(t, attempts(&set, &policy, req, mtls.as_ref(), mesh))
                .await
                .unwrap_or_else(|_| {
                    Err(ResilienceError::Timeout {
                        kind: TimeoutKind::Request,
                        after_ms: t.as_millis() as u64,
                        target: format!("service {:?}", set.service),
                    }
                    .into())
                }),
        }
    }
}

/// How to reach a destination that has a workload identity: the mesh client and the SPIFFE ID
/// its sidecars must prove.
#[derive(Debug, Clone)]
pub struct Mtls {
    pub client: MeshClient,
    pub identity: Arc<str>,
}

/// Which endpoint finally answered and after how many retries, carried on the response for the
/// access log and metrics (the endpoint is chosen per attempt, so only this loop knows it).
#[derive(Debug, Clone)]
pub struct Attempted {
    pub endpoint: http::uri::Authority,
    pub retries: u32,
}

/// A copy of the request head with `body` (extensions are per-connection and not copied).
pub fn request(parts: &Parts, body: RequestBody) -> Request<RequestBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

/// The request is taken apart before the future is made, so that the future holds its head
/// and body once each (see `Forwarder::serve`).
fn attempts<'a>(
    set: &'a Arc<EndpointSet>,
    policy: &'a RulePolicy,
    req: Request<DownstreamBody>,
    mtls: Option<&'a Mtls>,
    mesh: Option<&'a MeshClient>,
) -> impl Future<Output = Result<(Response<ProxyBody>, Attempted), ProxyError>> + 'a {
    let protocol = UpstreamProtocol::resolve(set.protocol, req.version());
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let retry = policy.retry.as_ref();
    let mirror = policy.mirror.as_ref().filter(|m| fault::roll(m.percent));
    let cap = retry
        .map(|r| r.max_body_bytes)
        .or(mirror.map(|_| retry_defaults::MAX_BODY_BYTES as usize));
    // The client's body: kept for replay (up to the cap) when a retry or mirror may need it.
    let (mut stream, replay) = match cap {
        Some(cap) => match ReplayBody::new(body, cap) {
            Ok(r) => (None, Some(r)),
            Err(body) => (Some(body), None),
        },
        None => (Some(body), None),
    };
    let mut mirrored = mirror.is_none();
    // A request that is sent once keeps its own head; others copy it per attempt.
    let single = retry.is_none() && mirror.is_none();
    let mut head = Some(parts);
    async move {
        let rt = &set.runtime;
        let mut permit = match rt.max_requests {
            None => None,
            Some(max) => Some(
                rt.shared
                    .bulkhead
                    .acquire(max, rt.max_pending)
                    .await
                    .ok_or_else(|| ResilienceError::Overflow {
                        service: set.service.clone(),
                        limit: max,
                    })?,
            ),
        };
        // The clock is read once when an attempt starts and once when it ends; everything
        // else (budget, EWMA, ejection) takes its time from those.
        let mut started = Instant::now();
        rt.shared.budget.deposit(&rt.budget, ms_at(started));
        let mut exclude = None;
        let mut retries = 0u32;
        loop {
            let body = match (&replay, stream.take()) {
                (_, Some(b)) => RequestBody::Stream(b),
                (Some(r), None) => match r.replay() {
                    Some(b) => RequestBody::Replay(b),
                    None => unreachable_replay()?,
                },
                (None, None) => unreachable_replay()?,
            };
            if !mirrored
                && let (Some(m), Some(r)) = (mirror, &replay)
                && r.is_complete()
                && let Some(parts) = &head
            {
                mirrored = true;
                mirror_copy(m, parts, r, mesh);
            }
            // The head is kept until the last attempt is made.
            let headers = &head.as_ref().ok_or_else(gone)?.headers;
            let idx = set
                .choose(headers, exclude)
                .ok_or_else(|| RouteError::NoEndpoints {
                    service: set.service.clone(),
                    subset: set.subset.clone(),
                })?;
            let stats = &set.stats[idx];
            let inflight = stats.start();
            let endpoint = set.endpoint(idx).authority.clone();
            let attempt = match head.as_ref() {
                Some(parts) if !single => request(parts, body),
                _ => Request::from_parts(head.take().ok_or_else(gone)?, body),
            };
            let per_try = retry.and_then(|r| r.per_try_timeout);
            let send = || send(mtls, &rt.upstream, attempt, endpoint.clone(), protocol);
            let result: Result<Response<UpstreamBody>, ProxyError> = match per_try {
                None => send().await.map_err(Into::into),
                Some(t) => match tokio::time::timeout(t, send()).await {
                    Ok(r) => r.map_err(Into::into),
                    Err(_) => Err(ResilienceError::Timeout {
                        kind: TimeoutKind::PerTry,
                        after_ms: t.as_millis() as u64,
                        target: format!("endpoint {endpoint}"),
                    }
                    .into()),
                },
            };
            let ended = Instant::now();
            let elapsed = ended.saturating_duration_since(started);
            let now = ms_at(ended);
            let failed = match &result {
                Ok(resp) => {
                    stats.observe_latency_at(elapsed, ended);
                    resp.status().is_server_error()
                }
                Err(_) => {
                    // A fast failure (refused connection) must not look like a fast endpoint to
                    // peak-EWMA; outlier ejection does the rest.
                    stats.observe_latency_at(elapsed.max(Duration::from_millis(100)), ended);
                    true
                }
            };
            if let Some(o) = &rt.outlier
                && outlier::report(o, &set.stats, idx, failed, now)
            {
                rt.shared.ejections.inc();
            }
            if !mirrored && let (Some(m), Some(r)) = (mirror, &replay) {
                // The first attempt has the body (or never will): mirror now or not at all.
                mirrored = true;
                if r.is_complete()
                    && let Some(parts) = &head
                {
                    mirror_copy(m, parts, r, mesh);
                }
            }

            // Should this outcome be tried again?
            let mut wait = None;
            if let Some(r) = retry
                && retries < r.attempts
            {
                let safe = r.allow_non_idempotent || retry::idempotent(&method);
                let wanted = match &result {
                    Ok(resp) if safe && r.retry_response(resp.status(), resp.headers()) => {
                        match retry::retry_after(resp.headers()) {
                            Some(ra) if ra > MAX_RETRY_AFTER => None,
                            ra => Some(ra.unwrap_or_default()),
                        }
                    }
                    Ok(_) => None,
                    // Nothing reached the upstream: safe for every method.
                    Err(ProxyError::Upstream(
                        UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. },
                    )) if r.on.connect_failure => Some(Duration::ZERO),
                    Err(ProxyError::Upstream(UpstreamError::Reset { cause, .. }))
                        if safe
                            && (r.on.reset
                                || (r.on.refused_stream
                                    && cause.to_ascii_lowercase().contains("refused"))) =>
                    {
                        Some(Duration::ZERO)
                    }
                    Err(ProxyError::Resilience(ResilienceError::Timeout { .. })) if safe => {
                        Some(Duration::ZERO)
                    }
                    Err(_) => None,
                };
                let replayable = replay.as_ref().is_some_and(|r| r.replay().is_some());
                if let Some(retry_after) = wanted
                    && replayable
                    && rt.shared.budget.try_withdraw(&rt.budget, now)
                {
                    retries += 1;
                    wait = Some(r.backoff(retries).max(retry_after));
                }
            }
            match wait {
                Some(pause) => {
                    drop(result);
                    drop(inflight);
                    exclude = (set.stats.len() > 1).then_some(idx);
                    tokio::time::sleep(pause).await;
                    started = Instant::now();
                }
                None => {
                    let resp = result?;
                    let idle = policy.stream_idle_timeout;
                    let resp = resp.map(|b| {
                        ProxyBody::Tracked(TrackedBody::new(b, Some(inflight), permit.take(), idle))
                    });
                    // Returned beside the response, not in its extensions: inserting one there
                    // allocates a map and a box per request.
                    return Ok((resp, Attempted { endpoint, retries }));
                }
            }
        }
    }
}

/// Spawns the copy of a request for `m`: over mTLS when the mirror's service has an identity
/// (this proxy's mesh client, that service's identity), whether or not the rule's own backend
/// has one.
fn mirror_copy(
    m: &MirrorPolicy,
    parts: &http::request::Parts,
    body: &ReplayBody,
    mesh: Option<&MeshClient>,
) {
    let mtls = mesh
        .zip(m.identity.as_ref())
        .map(|(client, identity)| Mtls {
            client: client.clone(),
            identity: identity.clone(),
        });
    mirror::spawn(m.set.clone(), parts, body, mtls);
}

/// One attempt, to its own endpoint, over mTLS when the destination has an identity.
pub(super) fn send(
    mtls: Option<&Mtls>,
    upstream: &Upstream,
    attempt: Request<RequestBody>,
    endpoint: http::uri::Authority,
    protocol: UpstreamProtocol,
) -> impl Future<Output = Result<Response<UpstreamBody>, UpstreamError>> {
    // Either future, not an `async fn` around them: one layer (and one copy of the request)
    // less in every request's future.
    match mtls {
        Some(m) => Either::Left(m.client.send(attempt, endpoint, m.identity.clone())),
        None => Either::Right(upstream.send(attempt, endpoint, protocol)),
    }
}

/// The body (and, for a single attempt, the head) is consumed by an attempt; another attempt
/// is made only when it can be replayed. This is the error should that invariant ever break.
fn unreachable_replay() -> Result<RequestBody, ProxyError> {
    Err(gone())
}

fn gone() -> ProxyError {
    UpstreamError::Reset {
        endpoint: "-".into(),
        cause: "request cannot be replayed".into(),
    }
    .into()
}

//! Resilience policy types of the model (per service and per rule), their defaults, their
//! validation and their wire form.
//!
//! Per service (`services[].policy`): load balancer, outlier detection, connection limits
//! (bulkhead), active health check, retry budget. Per rule (`routes[].rules[]`): local rate
//! limit, fault injection, mirroring, stream idle timeout. Every field is optional in YAML;
//! the `*_or_default` helpers say what the proxy uses when one is absent, so the defaults live
//! in one place.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::locate::Seg;
use crate::model::{ClusterPolicy, Millis, RetryPolicy, Rule};
use crate::pb;

/// How a service spreads requests over its endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LbAlgorithm {
    /// Power of two random choices over peak-EWMA latency × in-flight requests.
    #[default]
    P2cEwma,
    /// Power of two random choices over in-flight requests.
    LeastRequest,
    RoundRobin,
    /// Weighted random (what weft did before load balancing was configurable).
    Random,
    /// A ring hash on a header or cookie value; requests without it are balanced by P2C.
    ConsistentHash,
}

impl LbAlgorithm {
    pub const NAMES: &[&str] = &[
        "p2c-ewma",
        "least-request",
        "round-robin",
        "random",
        "consistent-hash",
    ];

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "" | "p2c-ewma" => Self::P2cEwma,
            "least-request" => Self::LeastRequest,
            "round-robin" => Self::RoundRobin,
            "random" => Self::Random,
            "consistent-hash" => Self::ConsistentHash,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancer {
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    /// `consistent-hash`: the header whose value is hashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
    /// `consistent-hash`: the cookie whose value is hashed (when the header is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_cookie: Option<String>,
    /// Keep requests in the calling proxy's zone (its `--zone`; endpoints labelled `zone`)
    /// while enough endpoints there are available, spilling over to the other zones as they fail.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prefer_local_zone: bool,
}

/// Passive outlier ejection (Istio's defaults when a field is absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx answers or connect failures that eject an endpoint (5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_errors: Option<u32>,
    /// How often the ejection multiplier of a healthy endpoint decays by one (10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Millis>,
    /// Ejection time = base × times ejected, capped at 300 s (30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Millis>,
    /// At most this share of endpoints is ejected at once; at least one (10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

impl OutlierDetection {
    pub fn consecutive_errors_or_default(&self) -> u32 {
        self.consecutive_errors.unwrap_or(5)
    }
    pub fn interval_or_default(&self) -> Millis {
        self.interval.unwrap_or(Millis(10_000))
    }
    pub fn base_ejection_time_or_default(&self) -> Millis {
        self.base_ejection_time.unwrap_or(Millis(30_000))
    }
    pub fn max_ejection_percent_or_default(&self) -> u32 {
        self.max_ejection_percent.unwrap_or(10)
    }
}

/// The bulkhead of one upstream service. Absent limits are unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests allowed to wait for a free request slot; absent = 0 (refuse at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
}

/// Active HTTP health checking of every endpoint of a service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub path: String,
    /// Between two probes of one endpoint (10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Millis>,
    /// A probe slower than this fails (1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Millis>,
    /// Consecutive failed probes that mark an endpoint unhealthy (3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// Consecutive good probes that mark it healthy again (2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
}

impl HealthCheck {
    pub fn interval_or_default(&self) -> Millis {
        self.interval.unwrap_or(Millis(10_000))
    }
    pub fn timeout_or_default(&self) -> Millis {
        self.timeout.unwrap_or(Millis(1000))
    }
    pub fn unhealthy_threshold_or_default(&self) -> u32 {
        self.unhealthy_threshold.unwrap_or(3)
    }
    pub fn healthy_threshold_or_default(&self) -> u32 {
        self.healthy_threshold.unwrap_or(2)
    }
}

/// Retries to a service may add at most `ratio_percent`% of its requests, plus
/// `min_retries_per_second`, over a sliding window of `ttl` (Linkerd's defaults: 20%, 10/s, 10s).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Millis>,
}

impl RetryBudget {
    pub fn ratio_percent_or_default(&self) -> u32 {
        self.ratio_percent.unwrap_or(20)
    }
    pub fn min_retries_per_second_or_default(&self) -> u32 {
        self.min_retries_per_second.unwrap_or(10)
    }
    pub fn ttl_or_default(&self) -> Millis {
        self.ttl.unwrap_or(Millis(10_000))
    }
}

/// A local token bucket: `requests` tokens per `interval`, holding at most `burst`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests: u32,
    /// 1s when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Millis>,
    /// `requests` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One bucket per value of a request header (an API key, a user) instead of one for the
    /// rule; requests without the header share one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<RateKey>,
}

/// What a keyed rate limit counts separately.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateKey {
    pub header: String,
}

impl RateLimit {
    pub fn interval_or_default(&self) -> Millis {
        self.interval.unwrap_or(Millis(1000))
    }
    pub fn burst_or_default(&self) -> u32 {
        self.burst.unwrap_or(self.requests)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    pub percent: u32,
    pub duration: Millis,
}

/// Answers `http_status` (or, to gRPC callers, `grpc_status`) without forwarding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    pub percent: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
}

impl FaultAbort {
    pub fn http_status_or_default(&self) -> u16 {
        self.http_status.unwrap_or(503)
    }
    pub fn grpc_status_or_default(&self) -> u32 {
        self.grpc_status.unwrap_or(14)
    }
}

/// Copies `percent`% of requests (whose body fits the replay buffer) to a shadow backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub service: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subset: String,
    /// 100 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
}

impl Mirror {
    pub fn percent_or_default(&self) -> u32 {
        self.percent.unwrap_or(100)
    }
}

/// Retry defaults (Istio/Linkerd): used when a rule sets `retries` without details.
pub mod retry_defaults {
    /// Retries after the first try.
    pub const ATTEMPTS: u32 = 2;
    pub const BACKOFF_BASE_MS: u32 = 25;
    pub const BACKOFF_MAX_MS: u32 = 250;
    pub const MAX_BODY_BYTES: u32 = 64 * 1024;
    /// Istio's default `retryOn`.
    pub const RETRY_ON: &[&str] = &[
        "connect-failure",
        "refused-stream",
        "unavailable",
        "cancelled",
        "503",
    ];
}

/// Validation problems found in policies: (path, reason).
pub type Problems = Vec<(Vec<Seg>, String)>;

fn at(base: &[Seg], more: &[&str]) -> Vec<Seg> {
    let mut p = base.to_vec();
    p.extend(more.iter().map(|k| Seg::Key((*k).to_owned())));
    p
}

fn percent(out: &mut Problems, p: &[Seg], field: &[&str], v: Option<u32>) {
    if let Some(v) = v
        && v > 100
    {
        out.push((at(p, field), format!("{v} is not a percentage (0–100)")));
    }
}

fn positive_ms(out: &mut Problems, p: &[Seg], field: &[&str], v: Option<Millis>) {
    if v.is_some_and(|m| m.0 == 0) {
        out.push((at(p, field), "must be positive".to_owned()));
    }
}

fn positive(out: &mut Problems, p: &[Seg], field: &[&str], v: Option<u32>) {
    if v == Some(0) {
        out.push((at(p, field), "must be at least 1".to_owned()));
    }
}

/// Checks `services[i].policy` (`p` is the path of the policy).
pub fn check_cluster_policy(p: &[Seg], policy: &ClusterPolicy) -> Problems {
    let mut out = Problems::new();
    if let Some(lb) = &policy.load_balancer {
        let p = at(p, &["load_balancer"]);
        let hashed = lb.hash_header.is_some() || lb.hash_cookie.is_some();
        if lb.algorithm == LbAlgorithm::ConsistentHash && !hashed {
            out.push((
                p.clone(),
                "consistent-hash needs hash_header or hash_cookie".to_owned(),
            ));
        }
        if lb.algorithm == LbAlgorithm::ConsistentHash && lb.prefer_local_zone {
            out.push((
                at(&p, &["prefer_local_zone"]),
                "prefer_local_zone does not apply to consistent-hash (the ring keeps a key on one endpoint, whatever its zone)".to_owned(),
            ));
        }
        if lb.algorithm != LbAlgorithm::ConsistentHash && hashed {
            out.push((
                p.clone(),
                format!(
                    "hash_header/hash_cookie apply to consistent-hash, not {}",
                    lb.algorithm.as_str()
                ),
            ));
        }
        if let Some(h) = &lb.hash_header
            && http_header_name(h).is_err()
        {
            out.push((
                at(&p, &["hash_header"]),
                format!("invalid header name {h:?}"),
            ));
        }
    }
    if let Some(o) = &policy.outlier_detection {
        let p = at(p, &["outlier_detection"]);
        positive(&mut out, &p, &["consecutive_errors"], o.consecutive_errors);
        positive_ms(&mut out, &p, &["interval"], o.interval);
        positive_ms(&mut out, &p, &["base_ejection_time"], o.base_ejection_time);
        percent(
            &mut out,
            &p,
            &["max_ejection_percent"],
            o.max_ejection_percent,
        );
    }
    if let Some(l) = &policy.limits {
        let p = at(p, &["limits"]);
        positive(&mut out, &p, &["max_connections"], l.max_connections);
        positive(&mut out, &p, &["max_requests"], l.max_requests);
    }
    if let Some(h) = &policy.health_check {
        let p = at(p, &["health_check"]);
        if !h.path.starts_with('/') {
            out.push((
                at(&p, &["path"]),
                format!("health check path {:?} must start with '/'", h.path),
            ));
        }
        positive_ms(&mut out, &p, &["interval"], h.interval);
        positive_ms(&mut out, &p, &["timeout"], h.timeout);
        positive(&mut out, &p, &["healthy_threshold"], h.healthy_threshold);
        positive(
            &mut out,
            &p,
            &["unhealthy_threshold"],
            h.unhealthy_threshold,
        );
    }
    if let Some(b) = &policy.retry_budget {
        let p = at(p, &["retry_budget"]);
        if b.ratio_percent.is_some_and(|r| r > 1000) {
            out.push((
                at(&p, &["ratio_percent"]),
                "ratio_percent above 1000 is no budget".to_owned(),
            ));
        }
        positive_ms(&mut out, &p, &["ttl"], b.ttl);
    }
    out
}

fn http_header_name(h: &str) -> Result<(), ()> {
    let ok = !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b));
    if ok { Ok(()) } else { Err(()) }
}

/// Checks a rate limit (`p` is its path: a rule's, or a service's inbound one).
pub fn check_rate_limit(p: &[Seg], rl: &RateLimit) -> Problems {
    let mut out = Problems::new();
    positive(&mut out, p, &["requests"], Some(rl.requests));
    positive_ms(&mut out, p, &["interval"], rl.interval);
    positive(&mut out, p, &["burst"], rl.burst);
    if let Some(per) = &rl.per
        && http_header_name(&per.header).is_err()
    {
        out.push((
            at(p, &["per", "header"]),
            format!("invalid header name {:?}", per.header),
        ));
    }
    out
}

/// Checks the resilience fields of a rule (`p` is the path of the rule).
pub fn check_rule(p: &[Seg], rule: &Rule, services: &HashMap<&str, BTreeSet<&str>>) -> Problems {
    let mut out = Problems::new();
    positive_ms(
        &mut out,
        p,
        &["stream_idle_timeout"],
        rule.stream_idle_timeout,
    );
    if let Some(r) = &rule.retries {
        positive_ms(
            &mut out,
            p,
            &["retries", "per_try_timeout"],
            r.per_try_timeout,
        );
        positive_ms(&mut out, p, &["retries", "backoff_base"], r.backoff_base);
    }
    if let Some(rl) = &rule.rate_limit {
        out.extend(check_rate_limit(&at(p, &["rate_limit"]), rl));
    }
    if let Some(h) = &rule.headers {
        out.extend(crate::headers::check(p, h));
    }
    if let Some(r) = &rule.rewrite {
        out.extend(crate::rewrite::check(p, rule, r));
    }
    out.extend(crate::answer::check(p, rule));
    if let Some(c) = &rule.cors {
        out.extend(crate::cors::check(p, c));
    }
    if let Some(f) = &rule.fault {
        let p = at(p, &["fault"]);
        if let Some(d) = &f.delay {
            percent(&mut out, &p, &["delay", "percent"], Some(d.percent));
        }
        if let Some(a) = &f.abort {
            percent(&mut out, &p, &["abort", "percent"], Some(a.percent));
            if let Some(s) = a.http_status
                && !(200..600).contains(&s)
            {
                out.push((
                    at(&p, &["abort", "http_status"]),
                    format!("{s} is not an HTTP status (200–599)"),
                ));
            }
            if let Some(s) = a.grpc_status
                && !(1..=16).contains(&s)
            {
                out.push((
                    at(&p, &["abort", "grpc_status"]),
                    format!("{s} is not a gRPC error status (1–16)"),
                ));
            }
        }
        if f.delay.is_none() && f.abort.is_none() {
            out.push((p, "a fault needs a delay or an abort".to_owned()));
        }
    }
    if let Some(m) = &rule.mirror {
        let p = at(p, &["mirror"]);
        percent(&mut out, &p, &["percent"], m.percent);
        match services.get(m.service.as_str()) {
            None => out.push((
                at(&p, &["service"]),
                format!("unknown mirror service {:?}", m.service),
            )),
            Some(subsets) if !m.subset.is_empty() && !subsets.contains(m.subset.as_str()) => {
                out.push((
                    at(&p, &["subset"]),
                    format!("unknown subset {:?} of service {:?}", m.subset, m.service),
                ));
            }
            Some(_) => {}
        }
    }
    out
}

// ---- wire form ----

fn ms(m: Option<Millis>) -> u32 {
    m.map_or(0, |m| m.0)
}

fn opt_ms(v: u32) -> Option<Millis> {
    (v != 0).then_some(Millis(v))
}

fn opt(v: u32) -> Option<u32> {
    (v != 0).then_some(v)
}

fn opt_str(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// Fills the resilience fields of a wire `ClusterPolicy`.
pub fn cluster_policy_to_pb(m: &ClusterPolicy, out: &mut pb::ClusterPolicy) {
    out.load_balancer = m.load_balancer.as_ref().map(|lb| pb::LoadBalancer {
        algorithm: lb.algorithm.as_str().to_owned(),
        hash_header: lb.hash_header.clone().unwrap_or_default(),
        hash_cookie: lb.hash_cookie.clone().unwrap_or_default(),
        prefer_local_zone: lb.prefer_local_zone,
    });
    out.outlier_detection = m.outlier_detection.as_ref().map(|o| pb::OutlierDetection {
        consecutive_errors: o.consecutive_errors.unwrap_or(0),
        interval_ms: ms(o.interval),
        base_ejection_time_ms: ms(o.base_ejection_time),
        // +1 so that an explicit 0% survives the trip (0 on the wire = default).
        max_ejection_percent_plus_one: o.max_ejection_percent.map_or(0, |p| p + 1),
    });
    out.limits = m.limits.as_ref().map(|l| pb::ConnectionLimits {
        max_connections: l.max_connections.unwrap_or(0),
        max_pending_plus_one: l.max_pending.map_or(0, |p| p.saturating_add(1)),
        max_requests: l.max_requests.unwrap_or(0),
    });
    out.health_check = m.health_check.as_ref().map(|h| pb::HealthCheck {
        path: h.path.clone(),
        interval_ms: ms(h.interval),
        timeout_ms: ms(h.timeout),
        unhealthy_threshold: h.unhealthy_threshold.unwrap_or(0),
        healthy_threshold: h.healthy_threshold.unwrap_or(0),
    });
    out.retry_budget = m.retry_budget.as_ref().map(|b| pb::RetryBudget {
        ratio_percent_plus_one: b.ratio_percent.map_or(0, |r| r + 1),
        min_retries_per_second_plus_one: b.min_retries_per_second.map_or(0, |r| r + 1),
        ttl_ms: ms(b.ttl),
    });
    out.tls = m.tls.as_ref().map(crate::upstream_tls::to_pb);
}

fn minus_one(v: u32) -> Option<u32> {
    v.checked_sub(1)
}

/// Reads the resilience fields of a wire `ClusterPolicy` into the model.
pub fn cluster_policy_from_pb(
    w: &pb::ClusterPolicy,
    out: &mut ClusterPolicy,
) -> Result<(), String> {
    out.load_balancer = match &w.load_balancer {
        None => None,
        Some(lb) => Some(LoadBalancer {
            algorithm: LbAlgorithm::parse(&lb.algorithm).ok_or_else(|| {
                format!(
                    "unknown load balancer {:?} (known: {})",
                    lb.algorithm,
                    LbAlgorithm::NAMES.join(", ")
                )
            })?,
            hash_header: opt_str(&lb.hash_header),
            hash_cookie: opt_str(&lb.hash_cookie),
            prefer_local_zone: lb.prefer_local_zone,
        }),
    };
    out.outlier_detection = w.outlier_detection.map(|o| OutlierDetection {
        consecutive_errors: opt(o.consecutive_errors),
        interval: opt_ms(o.interval_ms),
        base_ejection_time: opt_ms(o.base_ejection_time_ms),
        max_ejection_percent: minus_one(o.max_ejection_percent_plus_one),
    });
    out.limits = w.limits.map(|l| ConnectionLimits {
        max_connections: opt(l.max_connections),
        max_pending: minus_one(l.max_pending_plus_one),
        max_requests: opt(l.max_requests),
    });
    out.health_check = w.health_check.as_ref().map(|h| HealthCheck {
        path: h.path.clone(),
        interval: opt_ms(h.interval_ms),
        timeout: opt_ms(h.timeout_ms),
        unhealthy_threshold: opt(h.unhealthy_threshold),
        healthy_threshold: opt(h.healthy_threshold),
    });
    out.retry_budget = w.retry_budget.map(|b| RetryBudget {
        ratio_percent: minus_one(b.ratio_percent_plus_one),
        min_retries_per_second: minus_one(b.min_retries_per_second_plus_one),
        ttl: opt_ms(b.ttl_ms),
    });
    out.tls = w.tls.as_ref().map(crate::upstream_tls::from_pb);
    Ok(())
}

pub fn rate_limit_to_pb(r: &RateLimit) -> pb::RateLimit {
    pb::RateLimit {
        requests: r.requests,
        interval_ms: ms(r.interval),
        burst: r.burst.unwrap_or(0),
        per_header: r.per.as_ref().map(|k| k.header.clone()).unwrap_or_default(),
    }
}

pub fn rate_limit_from_pb(r: &pb::RateLimit) -> RateLimit {
    RateLimit {
        requests: r.requests,
        interval: opt_ms(r.interval_ms),
        burst: opt(r.burst),
        per: (!r.per_header.is_empty()).then(|| RateKey {
            header: r.per_header.clone(),
        }),
    }
}

/// Fills the resilience fields of a wire `RoutePolicy`.
pub fn route_policy_to_pb(rule: &Rule, out: &mut pb::RoutePolicy) {
    out.stream_idle_timeout_ms = ms(rule.stream_idle_timeout);
    out.headers = rule.headers.as_ref().map(crate::headers::to_pb);
    out.rewrite = rule.rewrite.as_ref().map(crate::rewrite::to_pb);
    out.redirect = rule.redirect.as_ref().map(crate::answer::redirect_to_pb);
    out.direct_response = rule
        .direct_response
        .as_ref()
        .map(crate::answer::direct_to_pb);
    out.cors = rule.cors.as_ref().map(crate::cors::to_pb);
    out.rate_limit = rule.rate_limit.as_ref().map(rate_limit_to_pb);
    out.fault = rule.fault.as_ref().map(|f| pb::Fault {
        delay: f.delay.as_ref().map(|d| pb::FaultDelay {
            percent: d.percent,
            duration_ms: d.duration.0,
        }),
        abort: f.abort.as_ref().map(|a| pb::FaultAbort {
            percent: a.percent,
            http_status: a.http_status.map_or(0, u32::from),
            grpc_status: a.grpc_status.unwrap_or(0),
        }),
    });
    out.mirror = rule.mirror.as_ref().map(|m| pb::Mirror {
        service: m.service.clone(),
        subset: m.subset.clone(),
        percent_plus_one: m.percent.map_or(0, |p| p + 1),
    });
}

/// Reads the resilience fields of a wire `RoutePolicy` into `rule`.
pub fn route_policy_from_pb(w: &pb::RoutePolicy, rule: &mut Rule) {
    rule.stream_idle_timeout = opt_ms(w.stream_idle_timeout_ms);
    rule.headers = w.headers.as_ref().map(crate::headers::from_pb);
    rule.rewrite = w.rewrite.as_ref().map(crate::rewrite::from_pb);
    rule.redirect = w.redirect.as_ref().map(crate::answer::redirect_from_pb);
    rule.direct_response = w
        .direct_response
        .as_ref()
        .map(crate::answer::direct_from_pb);
    rule.cors = w.cors.as_ref().map(crate::cors::from_pb);
    rule.rate_limit = w.rate_limit.as_ref().map(rate_limit_from_pb);
    rule.fault = w.fault.map(|f| Fault {
        delay: f.delay.map(|d| FaultDelay {
            percent: d.percent,
            duration: Millis(d.duration_ms),
        }),
        abort: f.abort.map(|a| FaultAbort {
            percent: a.percent,
            http_status: u16::try_from(a.http_status).ok().filter(|s| *s != 0),
            grpc_status: opt(a.grpc_status),
        }),
    });
    rule.mirror = w.mirror.as_ref().map(|m| Mirror {
        service: m.service.clone(),
        subset: m.subset.clone(),
        percent: minus_one(m.percent_plus_one),
    });
}

/// The retry policy with every default filled in, as the proxy runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveRetry {
    /// Retries after the first try.
    pub attempts: u32,
    pub per_try_timeout: Option<Millis>,
    pub retry_on: Vec<String>,
    pub backoff_base: Millis,
    pub backoff_max: Millis,
    pub allow_non_idempotent: bool,
    pub max_body_bytes: u32,
}

impl EffectiveRetry {
    pub fn from_model(r: &RetryPolicy) -> Self {
        use retry_defaults as d;
        let base = r.backoff_base.unwrap_or(Millis(d::BACKOFF_BASE_MS));
        Self {
            // 0 (absent in YAML) means the default: to disable retries, leave `retries` out.
            attempts: if r.attempts == 0 {
                d::ATTEMPTS
            } else {
                r.attempts
            },
            per_try_timeout: r.per_try_timeout,
            retry_on: if r.retry_on.is_empty() {
                d::RETRY_ON.iter().map(|s| (*s).to_owned()).collect()
            } else {
                r.retry_on.clone()
            },
            backoff_base: base,
            backoff_max: r
                .backoff_max
                .unwrap_or(Millis(d::BACKOFF_MAX_MS.max(base.0.saturating_mul(10)))),
            allow_non_idempotent: r.allow_non_idempotent,
            max_body_bytes: r.max_body_bytes.unwrap_or(d::MAX_BODY_BYTES),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{Limits, parse_yaml};

    const YAML: &str = r#"
services:
  - name: a
    endpoints: [{address: "127.0.0.1:1"}]
    policy:
      connect_timeout: 100ms
      load_balancer: {algorithm: consistent-hash, hash_header: x-user}
      outlier_detection: {consecutive_errors: 3, max_ejection_percent: 0}
      limits: {max_requests: 10, max_pending: 0}
      health_check: {path: /healthz, interval: 50ms}
      retry_budget: {ratio_percent: 20, min_retries_per_second: 0}
  - name: shadow
    endpoints: [{address: "127.0.0.1:2", labels: {zone: zone-a}}]
    policy: {load_balancer: {prefer_local_zone: true}}
routes:
  - name: a
    hosts: [a]
    rules:
      - backends: [{service: a}]
        timeout: 1s
        retries: {attempts: 3, retry_on: [5xx]}
        rate_limit: {requests: 5, interval: 100ms, per: {header: x-api-key}}
        fault: {abort: {percent: 50, http_status: 503}, delay: {percent: 10, duration: 5ms}}
        mirror: {service: shadow, percent: 0}
        stream_idle_timeout: 2s
"#;

    #[test]
    fn policies_round_trip_through_the_wire() {
        let cfg = parse_yaml("m.yaml", YAML, &Limits::default()).unwrap();
        let back = crate::from_resources(&crate::to_resources(&cfg)).unwrap();
        assert_eq!(back.services, cfg.services);
        assert!(
            back.services[1]
                .policy
                .load_balancer
                .as_ref()
                .unwrap()
                .prefer_local_zone
        );
        let (a, b) = (&back.routes[0].rules[0], &cfg.routes[0].rules[0]);
        assert_eq!(a.rate_limit, b.rate_limit);
        assert_eq!(a.fault, b.fault);
        assert_eq!(a.mirror, b.mirror);
        assert_eq!(a.mirror.as_ref().unwrap().percent, Some(0));
        assert_eq!(a.stream_idle_timeout, b.stream_idle_timeout);
    }

    #[test]
    fn bad_policies_are_refused_with_the_place_and_reason() {
        let bad = YAML
            .replace(
                "hash_header: x-user",
                "hash_header: \"x user\", prefer_local_zone: true",
            )
            .replace("percent: 50", "percent: 150")
            .replace("service: shadow", "service: nope")
            .replace("path: /healthz", "path: healthz")
            .replace("header: x-api-key", "header: \"x api\"");
        let err = parse_yaml("m.yaml", &bad, &Limits::default())
            .unwrap_err()
            .to_string();
        for want in [
            "load_balancer.hash_header: invalid header name",
            "load_balancer.prefer_local_zone: prefer_local_zone does not apply to consistent-hash",
            "rate_limit.per.header: invalid header name \"x api\"",
            "fault.abort.percent: 150 is not a percentage",
            "mirror.service: unknown mirror service \"nope\"",
            "health_check.path",
            "m.yaml:",
        ] {
            assert!(err.contains(want), "{want:?} missing in {err}");
        }
    }

    #[test]
    fn retry_defaults_follow_istio() {
        let e = EffectiveRetry::from_model(&RetryPolicy::default());
        assert_eq!(e.attempts, 2);
        assert_eq!(e.backoff_base, Millis(25));
        assert_eq!(e.max_body_bytes, 64 * 1024);
        assert!(e.retry_on.iter().any(|c| c == "connect-failure"));
    }
}

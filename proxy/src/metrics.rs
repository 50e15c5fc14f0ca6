//! Prometheus metrics of the proxy, served on the admin port's `/metrics`.
//!
//! One [`ProxyMetrics`] per process, shared by the listeners, the config client and the admin
//! port. Labels are bounded by the configuration: direction, route, destination service,
//! subset, status code/class, gRPC status, and the proxy's own `x-weft-reason` values — never
//! a path, a host or anything else a client controls.
//!
//! Hot path: the route/service/subset of a request are an [`Arc<TargetLabels>`] built once
//! when a configuration is compiled (see `routing`), so a request's label set is a few
//! pointer copies and integers; recording is a hash lookup under a read lock plus an atomic
//! add, with no allocation once the series exists.
//!
//! Other modules (resilience, identity) record through the small API at the bottom
//! ([`ProxyMetrics::record_retry`], [`ProxyMetrics::record_reason`], …).

use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets in milliseconds: a proxy hop is usually well under a millisecond, so the
/// low end is fine-grained; the top covers slow upstreams and timeouts.
pub const LATENCY_BUCKETS_MS: [f64; 18] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
    5000.0, 10000.0, 30000.0,
];

/// Content type of the text exposition (OpenMetrics, which Prometheus scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Where a request went, as metric labels. Built at config-compile time (one per route and
/// backend) and shared by every request to that target.
#[derive(Debug, Clone)]
pub struct TargetLabels {
    pub route: Arc<str>,
    pub service: Arc<str>,
    pub subset: Arc<str>,
    /// The labels' hash, computed once: the metric families hash their key on every request,
    /// and hashing three strings each time was a visible share of a request's cost.
    hash: u64,
    /// Per direction, this target's series resolved on its first request: a family lookup
    /// hashes and takes a lock, a handle is one atomic add.
    handles: [OnceLock<Handles>; 2],
}

#[derive(Debug, Clone)]
struct Handles {
    /// The `ProxyMetrics` they were resolved from (tests build several).
    owner: u64,
    duration: Histogram,
    /// `code="200"` with no reason: nearly every request.
    ok: OnceLock<Counter>,
}

impl PartialEq for TargetLabels {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && self.route == other.route
            && self.service == other.service
            && self.subset == other.subset
    }
}

impl Eq for TargetLabels {}

impl Hash for TargetLabels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl Default for TargetLabels {
    fn default() -> Self {
        Self::new("", "", "")
    }
}

impl TargetLabels {
    pub fn new(route: &str, service: &str, subset: &str) -> Self {
        let mut h = std::hash::DefaultHasher::new();
        (route, service, subset).hash(&mut h);
        Self {
            route: route.into(),
            service: service.into(),
            subset: subset.into(),
            hash: h.finish(),
            handles: Default::default(),
        }
    }

    /// Labels for a request that never reached a target (no route).
    pub fn none() -> Arc<Self> {
        Arc::new(Self::new("", "", ""))
    }
}

/// `direction` + target: the key of the latency histogram.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TargetKey {
    pub direction: Direction,
    pub target: Arc<TargetLabels>,
}

impl EncodeLabelSet for TargetKey {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("direction", self.direction.as_str()).encode(encoder.encode_label())?;
        ("route", &*self.target.route).encode(encoder.encode_label())?;
        ("service", &*self.target.service).encode(encoder.encode_label())?;
        ("subset", &*self.target.subset).encode(encoder.encode_label())
    }
}

/// The key of the request counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestKey {
    pub target: TargetKey,
    pub code: u16,
    /// Empty when the upstream answered; the `x-weft-reason` when the proxy did.
    pub reason: &'static str,
}

impl EncodeLabelSet for RequestKey {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.target.encode(encoder)?;
        ("code", self.code).encode(encoder.encode_label())?;
        ("class", status_class(self.code)).encode(encoder.encode_label())?;
        ("reason", self.reason).encode(encoder.encode_label())
    }
}

/// The key of the gRPC status counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GrpcKey {
    pub target: TargetKey,
    pub grpc_status: u16,
}

impl EncodeLabelSet for GrpcKey {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.target.encode(encoder)?;
        ("grpc_status", self.grpc_status).encode(encoder.encode_label())
    }
}

/// `2xx`, `4xx`, …
pub fn status_class(code: u16) -> &'static str {
    match code / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type ArcLabels1 = [(&'static str, Arc<str>); 1];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_MS)
}

/// Counters of one listener's TCP connections; cheap to clone (handles share the atomics).
#[derive(Debug, Clone, Default)]
pub struct ConnCounters {
    pub opened: Counter,
    pub closed: Counter,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
}

/// Every metric of the proxy. Create once, share with `Arc`.
#[derive(Debug)]
pub struct ProxyMetrics {
    /// Unique per instance: which instance a target's cached handles belong to.
    id: u64,
    registry: Registry,
    requests: Family<RequestKey, Counter>,
    duration_ms: Family<TargetKey, Histogram, fn() -> Histogram>,
    grpc: Family<GrpcKey, Counter>,
    in_flight: Family<Labels1, Gauge>,
    response_bytes: Family<Labels1, Counter>,
    local_responses: Family<Labels2, Counter>,
    listener_limits: Family<Labels2, Counter>,
    conn_opened: Family<Labels1, Counter>,
    conn_closed: Family<Labels1, Counter>,
    conn_received: Family<Labels1, Counter>,
    conn_sent: Family<Labels1, Counter>,
    retries: Family<ArcLabels1, Counter>,
    timeouts: Family<ArcLabels1, Counter>,
    rate_limited: Family<ArcLabels1, Counter>,
    ejections: Family<ArcLabels1, Counter>,
    bulkhead_overflow: Family<ArcLabels1, Counter>,
    cert_expiry: Gauge<i64, AtomicI64>,
    config_version: Gauge,
    config_applied: Gauge,
    last_ack: Gauge,
    pub spans_exported: Counter,
    pub spans_dropped: Counter,
    pub trace_queue: Gauge,
    pub access_log_dropped: Counter,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft_proxy");
        let requests = Family::<RequestKey, Counter>::default();
        registry.register(
            "requests",
            "Requests by direction, route, destination service and subset, status code and class, and the proxy's reason when it answered itself",
            requests.clone(),
        );
        let duration_ms: Family<TargetKey, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_ms",
            "Time from request received to response headers sent, in milliseconds",
            duration_ms.clone(),
        );
        let grpc = Family::<GrpcKey, Counter>::default();
        registry.register(
            "grpc_responses",
            "gRPC responses by grpc-status (from headers or trailers)",
            grpc.clone(),
        );
        let in_flight = Family::<Labels1, Gauge>::default();
        registry.register(
            "requests_in_flight",
            "Requests being served (until the response body ends)",
            in_flight.clone(),
        );
        let response_bytes = Family::<Labels1, Counter>::default();
        registry.register(
            "response_body_bytes",
            "Response body bytes sent downstream",
            response_bytes.clone(),
        );
        let local_responses = Family::<Labels2, Counter>::default();
        registry.register(
            "local_responses",
            "Responses the proxy made itself, by x-weft-reason",
            local_responses.clone(),
        );
        let listener_limits = Family::<Labels2, Counter>::default();
        registry.register(
            "listener_limits",
            "Connections refused or closed and requests refused by a listener limit (max_connections, header_too_large, header_timeout, idle_timeout, max_requests, connection_rate)",
            listener_limits.clone(),
        );
        let mut by_listener = |name: &str, help: &str| {
            let f = Family::<Labels1, Counter>::default();
            registry.register(name, help, f.clone());
            f
        };
        let conn_opened = by_listener("tcp_connections_opened", "TCP connections accepted");
        let conn_closed = by_listener("tcp_connections_closed", "TCP connections closed");
        let conn_received = by_listener(
            "tcp_received_bytes",
            "Bytes read from downstream connections",
        );
        let conn_sent = by_listener("tcp_sent_bytes", "Bytes written to downstream connections");
        let mut family = |name: &str, help: &str| {
            let f = Family::<ArcLabels1, Counter>::default();
            registry.register(name, help, f.clone());
            f
        };
        let retries = family("retries", "Retries by route");
        let timeouts = family("timeouts", "Requests that timed out, by route");
        let rate_limited = family("rate_limited", "Requests refused by a rate limit, by route");
        let ejections = family(
            "outlier_ejections",
            "Endpoints ejected by outlier detection, by service",
        );
        let bulkhead_overflow = family(
            "bulkhead_overflow",
            "Requests refused because a service's concurrency limit was full",
        );
        let cert_expiry = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "Unix time at which this proxy's workload certificate expires (0: none)",
            cert_expiry.clone(),
        );
        let config_version = Gauge::default();
        registry.register(
            "config_version",
            "Configuration version running (0: none yet)",
            config_version.clone(),
        );
        let config_applied = Gauge::default();
        registry.register(
            "config_applied_timestamp_seconds",
            "Unix time the running configuration was applied",
            config_applied.clone(),
        );
        let last_ack = Gauge::default();
        registry.register(
            "config_last_ack_timestamp_seconds",
            "Unix time of the last ACK sent to the control plane (0: never)",
            last_ack.clone(),
        );
        let spans_exported = Counter::default();
        registry.register(
            "trace_spans_exported",
            "Spans the collector accepted",
            spans_exported.clone(),
        );
        let spans_dropped = Counter::default();
        registry.register(
            "trace_spans_dropped",
            "Spans dropped: export queue full or the collector failed",
            spans_dropped.clone(),
        );
        let trace_queue = Gauge::default();
        registry.register(
            "trace_queue_spans",
            "Spans waiting in the export queue (bounded by its capacity)",
            trace_queue.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            registry,
            requests,
            duration_ms,
            grpc,
            in_flight,
            response_bytes,
            local_responses,
            listener_limits,
            conn_opened,
            conn_closed,
            conn_received,
            conn_sent,
            retries,
            timeouts,
            rate_limited,
            ejections,
            bulkhead_overflow,
            cert_expiry,
            config_version,
            config_applied,
            last_ack,
            spans_exported,
            spans_dropped,
            trace_queue,
            access_log_dropped,
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    // --- request path (called by `observe`) ---

    /// The in-flight gauge of `direction` (a handle: resolve once, update often).
    pub fn in_flight(&self, direction: Direction) -> Gauge {
        self.in_flight
            .get_or_create_owned(&[("direction", direction.as_str())])
    }

    pub fn record_response(&self, key: &RequestKey, elapsed: Duration) {
        let owner = self.id;
        let slot = &key.target.target.handles[key.target.direction as usize];
        let handles = slot.get_or_init(|| Handles {
            owner,
            duration: self.duration_ms.get_or_create_owned(&key.target),
            ok: OnceLock::new(),
        });
        let ms = elapsed.as_secs_f64() * 1000.0;
        if handles.owner == owner {
            handles.duration.observe(ms);
            if key.code == 200 && key.reason.is_empty() {
                handles
                    .ok
                    .get_or_init(|| self.requests.get_or_create_owned(key))
                    .inc();
            } else {
                self.requests.get_or_create(key).inc();
            }
        } else {
            self.requests.get_or_create(key).inc();
            self.duration_ms.get_or_create(&key.target).observe(ms);
        }
        if !key.reason.is_empty() {
            self.record_reason(key.target.direction, key.reason);
        }
    }

    pub fn record_grpc(&self, target: &TargetKey, grpc_status: u16) {
        let key = GrpcKey {
            target: target.clone(),
            grpc_status,
        };
        self.grpc.get_or_create(&key).inc();
    }

    /// The response-bytes counter of `direction` (a handle: resolve once, add often).
    pub fn response_bytes(&self, direction: Direction) -> Counter {
        self.response_bytes
            .get_or_create_owned(&[("direction", direction.as_str())])
    }

    /// Counter handles for one listener's connections, registered on first use.
    pub fn conn_counters(&self, listener: &'static str) -> ConnCounters {
        let key = [("listener", listener)];
        ConnCounters {
            opened: self.conn_opened.get_or_create_owned(&key),
            closed: self.conn_closed.get_or_create_owned(&key),
            bytes_received: self.conn_received.get_or_create_owned(&key),
            bytes_sent: self.conn_sent.get_or_create_owned(&key),
        }
    }

    /// Counter handles for one listener's limits, registered on first use.
    pub fn limit_counters(
        &self,
        listener: &'static str,
        direction: Direction,
    ) -> crate::limits::LimitCounters {
        let counter = |limit| {
            self.listener_limits
                .get_or_create_owned(&[("listener", listener), ("limit", limit)])
        };
        crate::limits::LimitCounters {
            max_connections: counter("max_connections"),
            header_too_large: counter("header_too_large"),
            header_timeout: counter("header_timeout"),
            idle_timeout: counter("idle_timeout"),
            max_requests: counter("max_requests"),
            connection_rate: counter("connection_rate"),
            local_431: self.local_responses.get_or_create_owned(&[
                ("direction", direction.as_str()),
                ("reason", "header_too_large"),
            ]),
            local_429: self.local_responses.get_or_create_owned(&[
                ("direction", direction.as_str()),
                ("reason", "connection_rate_limited"),
            ]),
        }
    }

    // --- API for other modules ---

    /// A proxy-made response (any `x-weft-reason`), whichever module made it.
    pub fn record_reason(&self, direction: Direction, reason: &'static str) {
        self.local_responses
            .get_or_create(&[("direction", direction.as_str()), ("reason", reason)])
            .inc();
    }

    pub fn record_retry(&self, route: &Arc<str>) {
        self.retries
            .get_or_create(&[("route", route.clone())])
            .inc();
    }

    pub fn record_timeout(&self, route: &Arc<str>) {
        self.timeouts
            .get_or_create(&[("route", route.clone())])
            .inc();
    }

    pub fn record_rate_limited(&self, route: &Arc<str>) {
        self.rate_limited
            .get_or_create(&[("route", route.clone())])
            .inc();
    }

    /// The ejection counter of `service` (a handle the service's shared resilience state
    /// keeps, so the outlier detector counts without a lookup).
    pub fn ejections(&self, service: &str) -> Counter {
        self.ejections
            .get_or_create_owned(&[("service", Arc::from(service))])
    }

    pub fn record_bulkhead_overflow(&self, service: &Arc<str>) {
        self.bulkhead_overflow
            .get_or_create(&[("service", service.clone())])
            .inc();
    }

    /// Hook for the identity work: when the workload certificate expires (Unix seconds).
    pub fn set_cert_expiry(&self, unix_seconds: i64) {
        self.cert_expiry.set(unix_seconds);
    }

    /// The running configuration (set on every apply and at scrape time).
    pub fn set_config(&self, version: u64, applied_at_unix_ms: u64) {
        self.config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.config_applied
            .set(i64::try_from(applied_at_unix_ms / 1000).unwrap_or(i64::MAX));
    }

    pub fn set_last_ack(&self, unix_seconds: i64) {
        self.last_ack.set(unix_seconds);
    }
}

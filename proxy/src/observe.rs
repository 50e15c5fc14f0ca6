//! Per-request telemetry: the one wrapper around `Forwarder::handle` that feeds metrics,
//! tracing and access logs.
//!
//! [`Observation::start`] runs before the request is forwarded: it counts the request in
//! flight and, when tracing is on, starts the span and rewrites the propagation headers.
//! [`Observation::respond`] runs when the response headers are ready: it records the request
//! counter and latency, then wraps the body in [`ObservedBody`], which counts bytes, reads a
//! gRPC status from the trailers and, when the body ends (or is dropped), finishes the span
//! and writes the access log line.
//!
//! Unsampled, unlogged requests copy nothing: labels are `Arc`s built at config compile time
//! and the per-direction handles below are resolved once.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderMap, Method, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::access_log::{AccessLog, Entry};
use crate::body::ProxyBody;
use crate::metrics::{Direction, ProxyMetrics, RequestKey, TargetKey, TargetLabels};
use crate::routing::request_host;
use crate::trace::context::hex_string;
use crate::trace::span::Value;
use crate::trace::{ActiveSpan, Kind, SpanData, Tracer};

/// Everything the request path reports to. One per process, shared by both listeners.
#[derive(Debug)]
pub struct Telemetry {
    pub metrics: Arc<ProxyMetrics>,
    pub tracer: Option<Tracer>,
    pub access_log: Option<AccessLog>,
    /// Labels of inbound requests: no route, this proxy's service and `version` label.
    pub inbound_target: Arc<TargetLabels>,
    /// Labels of requests that reached no target (no route).
    no_target: Arc<TargetLabels>,
    outbound: DirectionHandles,
    inbound: DirectionHandles,
}

#[derive(Debug)]
struct DirectionHandles {
    in_flight: Gauge,
    response_bytes: Counter,
}

impl DirectionHandles {
    fn new(metrics: &ProxyMetrics, direction: Direction) -> Self {
        Self {
            in_flight: metrics.in_flight(direction),
            response_bytes: metrics.response_bytes(direction),
        }
    }
}

impl Telemetry {
    pub fn new(
        metrics: Arc<ProxyMetrics>,
        tracer: Option<Tracer>,
        access_log: Option<AccessLog>,
        inbound_target: TargetLabels,
    ) -> Self {
        Self {
            outbound: DirectionHandles::new(&metrics, Direction::Outbound),
            inbound: DirectionHandles::new(&metrics, Direction::Inbound),
            metrics,
            tracer,
            access_log,
            inbound_target: Arc::new(inbound_target),
            no_target: TargetLabels::none(),
        }
    }

    /// Metrics only, into a registry of its own (tests, embedding).
    pub fn disabled() -> Arc<Self> {
        Arc::new(Self::new(
            Arc::new(ProxyMetrics::new()),
            None,
            None,
            TargetLabels::default(),
        ))
    }

    fn handles(&self, direction: Direction) -> &DirectionHandles {
        match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        }
    }
}

/// What the forwarding step learned, for labels, spans and logs.
#[derive(Debug, Default)]
pub struct RequestMeta {
    pub target: Option<Arc<TargetLabels>>,
    pub upstream: Option<Authority>,
    /// The `x-weft-reason` when the proxy answered itself.
    pub reason: Option<&'static str>,
    /// Retries made (set by the resilience work).
    pub retries: u32,
    /// When the request was first seen (the observation's start), and how long it took to
    /// get its response head: the request path reads the clock as little as it can.
    pub started: Option<Instant>,
    pub elapsed: Option<Duration>,
    /// The CORS marks the response will carry, whoever makes it (boxed: rare).
    pub cors: Option<Box<crate::cors::Grant>>,
}

/// Request details copied only when a span is sampled or the request is logged.
#[derive(Debug)]
struct Detail {
    method: Method,
    authority: String,
    path: String,
    version: Version,
    wall_start: SystemTime,
    request_bytes: u64,
}

/// One request being observed.
#[derive(Debug)]
pub struct Observation {
    telemetry: Arc<Telemetry>,
    direction: Direction,
    start: Instant,
    span: Option<ActiveSpan>,
    logged: bool,
    detail: Option<Detail>,
}

impl Observation {
    /// When the request was first seen.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// Call before forwarding: may rewrite the trace headers of `req`.
    pub fn start<B>(
        telemetry: &Arc<Telemetry>,
        direction: Direction,
        req: &mut Request<B>,
    ) -> Self {
        let start = Instant::now();
        telemetry.handles(direction).in_flight.inc();
        let kind = match direction {
            Direction::Outbound => Kind::Client,
            Direction::Inbound => Kind::Server,
        };
        let span = telemetry
            .tracer
            .as_ref()
            .map(|t| t.start(kind, req.headers_mut()));
        let logged = telemetry
            .access_log
            .as_ref()
            .is_some_and(AccessLog::sampled);
        let detail = (logged || span.is_some_and(|s| s.sampled)).then(|| Detail {
            method: req.method().clone(),
            authority: request_host(req).into_owned(),
            path: req.uri().path().to_owned(),
            version: req.version(),
            wall_start: span.map_or_else(SystemTime::now, |s| s.start),
            request_bytes: content_length(req.headers()),
        });
        Self {
            telemetry: telemetry.clone(),
            direction,
            start,
            span,
            logged,
            detail,
        }
    }

    /// Call with the response (the upstream's or the proxy's own): records the request and
    /// returns the response with its body observed until it ends.
    pub fn respond(self, resp: Response<ProxyBody>, meta: RequestMeta) -> Response<ObservedBody> {
        let t = &self.telemetry;
        let target = TargetKey {
            direction: self.direction,
            target: meta.target.clone().unwrap_or_else(|| t.no_target.clone()),
        };
        let code = resp.status().as_u16();
        let reason = meta.reason.unwrap_or("");
        let key = RequestKey {
            target,
            code,
            reason,
        };
        let elapsed = meta.elapsed.unwrap_or_else(|| self.start.elapsed());
        t.metrics.record_response(&key, elapsed);
        // The resilience counters, from what the request went through (its retries) and from
        // the reason of the proxy's own answer.
        let labels = &key.target.target;
        for _ in 0..meta.retries {
            t.metrics.record_retry(&labels.route);
        }
        match reason {
            "request_timeout" | "per_try_timeout" | "connect_timeout" | "stream_idle_timeout" => {
                t.metrics.record_timeout(&labels.route);
            }
            "rate_limited" => t.metrics.record_rate_limited(&labels.route),
            "overflow" => t.metrics.record_bulkhead_overflow(&labels.service),
            _ => {}
        }
        // A trailers-only gRPC response (also the proxy's own errors) has its status here.
        let grpc_status = grpc_status(resp.headers());
        if let Some(g) = grpc_status {
            t.metrics.record_grpc(&key.target, g);
        }
        let (parts, body) = resp.into_parts();
        let finish = Finish {
            key,
            meta,
            obs: self,
            bytes: 0,
            grpc_status,
            grpc_from_headers: grpc_status.is_some(),
            failed: false,
        };
        Response::from_parts(
            parts,
            ObservedBody {
                inner: body,
                finish: Some(Box::new(finish)),
            },
        )
    }
}

fn content_length(h: &HeaderMap) -> u64 {
    h.get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn grpc_status(h: &HeaderMap) -> Option<u16> {
    // A constant name: looking up by `&str` parses and validates it on every response.
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    h.get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// What is recorded when the response body ends.
#[derive(Debug)]
struct Finish {
    key: RequestKey,
    meta: RequestMeta,
    obs: Observation,
    bytes: u64,
    grpc_status: Option<u16>,
    grpc_from_headers: bool,
    /// The body ended with an error (upstream reset mid-stream).
    failed: bool,
}

impl Finish {
    fn run(self) {
        let obs = &self.obs;
        let t = &obs.telemetry;
        let handles = t.handles(obs.direction);
        handles.in_flight.dec();
        if self.bytes > 0 {
            handles.response_bytes.inc_by(self.bytes);
        }
        if !self.grpc_from_headers
            && let Some(g) = self.grpc_status
        {
            t.metrics.record_grpc(&self.key.target, g);
        }
        let Some(detail) = &obs.detail else {
            return;
        };
        let end = SystemTime::now();
        let target = &self.key.target.target;
        if let (Some(span), Some(tracer)) = (obs.span.filter(|s| s.sampled), &t.tracer) {
            tracer.finish(self.span_data(span, detail, end));
        }
        if obs.logged
            && let Some(log) = &t.access_log
        {
            log.log(&Entry {
                start: Some(detail.wall_start),
                trace_id: obs.span.map(|s| hex_string(&s.trace_id)),
                direction: obs.direction.as_str(),
                method: detail.method.as_str(),
                authority: &detail.authority,
                path: &detail.path,
                route: &target.route,
                service: &target.service,
                subset: &target.subset,
                upstream: self.meta.upstream.as_ref().map(ToString::to_string),
                status: self.key.code,
                grpc_status: self.grpc_status,
                reason: self.key.reason,
                duration: obs.start.elapsed(),
                bytes_received: detail.request_bytes,
                bytes_sent: self.bytes,
                retries: self.meta.retries,
            });
        }
    }

    fn span_data(&self, span: ActiveSpan, detail: &Detail, end: SystemTime) -> SpanData {
        let target = &self.key.target.target;
        let name = if target.route.is_empty() {
            detail.method.to_string()
        } else {
            format!("{} {}", detail.method, target.route)
        };
        let mut attributes = vec![
            ("http.request.method", Value::Str(detail.method.to_string())),
            ("url.path", Value::Str(detail.path.clone())),
            ("server.address", Value::Str(detail.authority.clone())),
            (
                "network.protocol.version",
                Value::Str(version(detail.version).into()),
            ),
            (
                "http.response.status_code",
                Value::Int(i64::from(self.key.code)),
            ),
            (
                "weft.direction",
                Value::Str(self.obs.direction.as_str().into()),
            ),
        ];
        let mut add = |k: &'static str, v: &str| {
            if !v.is_empty() {
                attributes.push((k, Value::Str(v.to_owned())));
            }
        };
        add("weft.route", &target.route);
        add("weft.service", &target.service);
        add("weft.subset", &target.subset);
        add("weft.reason", self.key.reason);
        if let Some(up) = &self.meta.upstream {
            add("weft.upstream", up.as_str());
        }
        if let Some(g) = self.grpc_status {
            attributes.push(("rpc.grpc.status_code", Value::Int(i64::from(g))));
        }
        SpanData {
            trace_id: span.trace_id,
            span_id: span.span_id,
            parent_span_id: span.parent_span_id,
            name,
            kind: span.kind,
            start: span.start,
            end,
            attributes,
            error: self.failed
                || self.key.code >= 500
                || !self.key.reason.is_empty()
                || self.grpc_status.is_some_and(|g| g != 0),
        }
    }
}

fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "2",
        Version::HTTP_10 => "1.0",
        _ => "1.1",
    }
}

/// The response body, observed: counts bytes, notes the gRPC status in trailers, and
/// finishes the request's telemetry at its end (or when dropped early).
#[derive(Debug)]
pub struct ObservedBody {
    inner: ProxyBody,
    /// Boxed: the response (and this body in it) is moved several times on its way through
    /// hyper, and the finish record is most of its size.
    finish: Option<Box<Finish>>,
}

impl ObservedBody {
    fn done(&mut self) {
        if let Some(finish) = self.finish.take() {
            finish.run();
        }
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.done();
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = crate::resilience::timeout::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::resilience::timeout::BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(f) = this.finish.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        f.bytes += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref()
                        && let Some(g) = grpc_status(trailers)
                    {
                        f.grpc_status = Some(g);
                    }
                }
                if this.inner.is_end_stream() {
                    this.done();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = this.finish.as_mut() {
                    f.failed = true;
                }
                this.done();
            }
            Poll::Ready(None) => this.done(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[tokio::test]
    async fn a_request_is_counted_and_in_flight_returns_to_zero() {
        let t = Telemetry::disabled();
        let mut req = Request::new(());
        let obs = Observation::start(&t, Direction::Outbound, &mut req);
        let text = t.metrics.encode();
        assert!(
            text.contains("weft_proxy_requests_in_flight{direction=\"outbound\"} 1"),
            "{text}"
        );
        let meta = RequestMeta {
            target: Some(Arc::new(TargetLabels::new("r", "reviews", "v2"))),
            ..RequestMeta::default()
        };
        let resp = obs.respond(Response::new(ProxyBody::text("hello")), meta);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        let text = t.metrics.encode();
        assert!(
            text.contains(
                "weft_proxy_requests_total{direction=\"outbound\",route=\"r\",service=\"reviews\",subset=\"v2\",code=\"200\",class=\"2xx\",reason=\"\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("weft_proxy_requests_in_flight{direction=\"outbound\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("weft_proxy_response_body_bytes_total{direction=\"outbound\"} 5"),
            "{text}"
        );
    }
}

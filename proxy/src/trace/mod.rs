//! Distributed tracing: one span per request (server span on inbound, client span on
//! outbound), a child of the caller's context, propagated upstream and exported over OTLP.
//!
//! [`context`] reads and writes W3C and B3 headers, [`span`] is the finished-span record and
//! its OTLP protobuf form, [`export`] batches spans through a bounded queue to an OTLP/HTTP
//! collector. Sampling is parent-based: a caller's decision is followed; a root decision is
//! a ratio of trace ids (deterministic in the id, so every proxy of a trace agrees).

pub mod context;
pub mod export;
pub mod span;

use std::time::SystemTime;

use http::HeaderMap;

use context::{Incoming, Outgoing, SpanId, TraceId};
pub use export::{ExportConfig, Exporter, OtlpProtocol};
pub use span::{Kind, SpanData};

/// Starts spans and hands finished ones to the exporter. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Tracer {
    /// Root sampling threshold over the trace id's low 64 bits (`ratio * 2^64`).
    threshold: u64,
    always: bool,
    exporter: Exporter,
}

/// A span in progress: what the request path keeps until the response ends.
#[derive(Debug, Clone, Copy)]
pub struct ActiveSpan {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub sampled: bool,
    pub kind: Kind,
    pub start: SystemTime,
}

impl Tracer {
    pub fn new(sample_ratio: f64, exporter: Exporter) -> Self {
        let ratio = sample_ratio.clamp(0.0, 1.0);
        Self {
            threshold: (ratio * u64::MAX as f64) as u64,
            always: ratio >= 1.0,
            exporter,
        }
    }

    /// Reads the caller's context from `headers`, starts a child span and writes it back
    /// into `headers` for the upstream.
    pub fn start(&self, kind: Kind, headers: &mut HeaderMap) -> ActiveSpan {
        let incoming = Incoming::read(headers);
        let trace_id = incoming.parent.map_or_else(random_trace_id, |(t, _)| t);
        let sampled = incoming
            .sampled
            .unwrap_or_else(|| self.sample_root(&trace_id));
        let span = ActiveSpan {
            trace_id,
            span_id: random_span_id(),
            parent_span_id: incoming.parent.map(|(_, s)| s),
            sampled,
            kind,
            start: SystemTime::now(),
        };
        Outgoing {
            trace_id,
            span_id: span.span_id,
            parent_span_id: span.parent_span_id,
            sampled,
            b3: incoming.b3,
        }
        .inject(headers);
        span
    }

    fn sample_root(&self, trace_id: &TraceId) -> bool {
        if self.always {
            return true;
        }
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        u64::from_be_bytes(low) < self.threshold
    }

    /// Queues a finished span; never blocks (a full queue drops and counts).
    pub fn finish(&self, span: SpanData) {
        self.exporter.export(span);
    }

    pub fn queue_len(&self) -> usize {
        self.exporter.queue_len()
    }
}

fn random_trace_id() -> TraceId {
    loop {
        let id = fastrand::u128(..).to_be_bytes();
        if id != [0; 16] {
            return id;
        }
    }
}

fn random_span_id() -> SpanId {
    fastrand::u64(1..).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[tokio::test]
    async fn child_span_keeps_the_trace_and_follows_the_parent_decision() {
        let (exporter, _rx) = Exporter::detached(4);
        let tracer = Tracer::new(0.0, exporter);
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let span = tracer.start(Kind::Client, &mut h);
        assert!(
            span.sampled,
            "the parent sampled it, ratio 0 does not matter"
        );
        assert_eq!(
            context::hex_string(&span.trace_id),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(
            context::hex_string(&span.parent_span_id.unwrap()),
            "b7ad6b7169203331"
        );
        let tp = h["traceparent"].to_str().unwrap().to_owned();
        assert_eq!(
            tp,
            format!(
                "00-0af7651916cd43dd8448eb211c80319c-{}-01",
                context::hex_string(&span.span_id)
            )
        );

        // A root with ratio 0 is not sampled, but still propagated.
        let mut h = HeaderMap::new();
        let root = tracer.start(Kind::Server, &mut h);
        assert!(!root.sampled && root.parent_span_id.is_none());
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn ratio_sampling_is_deterministic_and_roughly_the_ratio() {
        let (exporter, _rx) = Exporter::detached(1);
        let tracer = Tracer::new(0.25, exporter);
        let hits = (0..4000)
            .filter(|_| tracer.sample_root(&random_trace_id()))
            .count();
        assert!((800..1200).contains(&hits), "{hits}/4000 sampled at 0.25");
        let id = random_trace_id();
        assert_eq!(tracer.sample_root(&id), tracer.sample_root(&id));
    }
}

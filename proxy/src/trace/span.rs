//! A finished span and its OTLP protobuf form.
//!
//! The OTLP messages are declared here by hand with `prost` (only the fields weft sets, with
//! the field numbers of `opentelemetry/proto/trace/v1/trace.proto` and its imports), which
//! keeps the build free of a generated-code step and of the OpenTelemetry SDK.

use std::time::{SystemTime, UNIX_EPOCH};

use super::context::{SpanId, TraceId};

/// OTLP span kinds weft produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Inbound: the proxy receives the request for its local application.
    Server = 2,
    /// Outbound: the proxy sends the application's request to another service.
    Client = 3,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// One finished span, ready to export. Built only for sampled requests.
#[derive(Debug, Clone)]
pub struct SpanData {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub name: String,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    pub error: bool,
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `ExportTraceServiceRequest` for `spans`, with `resource` attributes.
pub fn export_request(resource: &[(&'static str, String)], spans: &[SpanData]) -> pb::Request {
    let kv = |key: &str, value: pb::any_value::Value| pb::KeyValue {
        key: key.to_owned(),
        value: Some(pb::AnyValue { value: Some(value) }),
    };
    let spans = spans
        .iter()
        .map(|s| pb::Span {
            trace_id: s.trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            name: s.name.clone(),
            kind: s.kind as i32,
            start_time_unix_nano: unix_nanos(s.start),
            end_time_unix_nano: unix_nanos(s.end),
            attributes: s
                .attributes
                .iter()
                .map(|(k, v)| {
                    kv(
                        k,
                        match v {
                            Value::Str(s) => pb::any_value::Value::StringValue(s.clone()),
                            Value::Int(i) => pb::any_value::Value::IntValue(*i),
                        },
                    )
                })
                .collect(),
            status: Some(pb::Status {
                message: String::new(),
                code: if s.error { 2 } else { 0 },
            }),
        })
        .collect();
    pb::Request {
        resource_spans: vec![pb::ResourceSpans {
            resource: Some(pb::Resource {
                attributes: resource
                    .iter()
                    .map(|(k, v)| kv(k, pb::any_value::Value::StringValue(v.clone())))
                    .collect(),
            }),
            scope_spans: vec![pb::ScopeSpans {
                scope: Some(pb::InstrumentationScope {
                    name: "weft-proxy".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                }),
                spans,
            }],
        }],
    }
}

/// The subset of OTLP's protobuf messages weft sends.
#[allow(clippy::derive_partial_eq_without_eq)]
pub mod pb {
    /// `opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Request {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InstrumentationScope {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub name: String,
        #[prost(int32, tag = "6")]
        pub kind: i32,
        #[prost(fixed64, tag = "7")]
        pub start_time_unix_nano: u64,
        #[prost(fixed64, tag = "8")]
        pub end_time_unix_nano: u64,
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
        #[prost(message, optional, tag = "15")]
        pub status: Option<Status>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(string, tag = "2")]
        pub message: String,
        /// 0 unset, 1 ok, 2 error.
        #[prost(int32, tag = "3")]
        pub code: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(oneof = "any_value::Value", tags = "1, 3")]
        pub value: Option<any_value::Value>,
    }

    pub mod any_value {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(string, tag = "1")]
            StringValue(String),
            #[prost(int64, tag = "3")]
            IntValue(i64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn encodes_ids_kind_and_times_at_their_otlp_field_numbers() {
        let t = UNIX_EPOCH + std::time::Duration::from_nanos(1_000);
        let span = SpanData {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent_span_id: None,
            name: "GET reviews".into(),
            kind: Kind::Client,
            start: t,
            end: t,
            attributes: vec![("http.response.status_code", Value::Int(200))],
            error: false,
        };
        let req = export_request(&[("service.name", "p".into())], &[span]);
        let bytes = req.encode_to_vec();
        let back = pb::Request::decode(bytes.as_slice()).unwrap();
        let s = &back.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(s.trace_id, vec![7; 16]);
        assert!(s.parent_span_id.is_empty());
        assert_eq!((s.kind, s.start_time_unix_nano), (3, 1_000));
        // Field 1 of the request, field 2 of ResourceSpans… the bytes start with the tag of
        // resource_spans (field 1, length-delimited).
        assert_eq!(bytes[0], 0x0a);
    }
}

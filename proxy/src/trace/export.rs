//! OTLP export, over HTTP (protobuf, `<endpoint>/v1/traces`) or gRPC (the collector's
//! `TraceService/Export`, HTTP/2 without TLS): a bounded queue in front of one background task
//! that sends batches.
//!
//! The request path only ever `try_send`s into the queue: when the collector is slow or down
//! the queue fills and new spans are dropped and counted (`weft_proxy_trace_spans_dropped`),
//! so tracing can never slow down or fail a request.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use super::span::{SpanData, export_request};
use crate::metrics::ProxyMetrics;

/// The gRPC method a collector's trace receiver serves.
const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// How spans travel to the collector (`--otlp-protocol`, named as OpenTelemetry's
/// `OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// Protobuf over HTTP/1.1 POST (a collector's port 4318).
    #[default]
    #[value(name = "http/protobuf")]
    HttpProtobuf,
    /// gRPC over HTTP/2 without TLS (a collector's port 4317).
    #[value(name = "grpc")]
    Grpc,
}

/// How the exporter behaves; defaults suit a sidecar.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Collector base URL, e.g. `http://127.0.0.1:4318`; the protocol's path (`/v1/traces`,
    /// or the gRPC method) is appended unless the URL already ends with it.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// Spans held while waiting to be sent; beyond this they are dropped.
    pub queue: usize,
    /// Spans per export request.
    pub batch: usize,
    /// A partial batch waits at most this long.
    pub flush_interval: Duration,
    /// One export request may take this long, connection included.
    pub timeout: Duration,
    /// Resource attributes (`service.name`, …).
    pub resource: Vec<(&'static str, String)>,
}

impl ExportConfig {
    pub fn new(endpoint: String) -> Self {
        Self {
            endpoint,
            protocol: OtlpProtocol::default(),
            queue: 2048,
            batch: 512,
            flush_interval: Duration::from_millis(200),
            timeout: Duration::from_secs(5),
            resource: Vec::new(),
        }
    }

    fn traces_uri(&self) -> Result<Uri, http::uri::InvalidUri> {
        let base = self.endpoint.trim_end_matches('/');
        let path = match self.protocol {
            OtlpProtocol::HttpProtobuf => "/v1/traces",
            OtlpProtocol::Grpc => GRPC_EXPORT,
        };
        if base.ends_with(path) {
            base.parse()
        } else {
            format!("{base}{path}").parse()
        }
    }
}

/// The request path's handle on the queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Exporter {
    tx: mpsc::Sender<SpanData>,
    metrics: Arc<ProxyMetrics>,
}

impl Exporter {
    /// Starts the export task on the current runtime.
    pub fn spawn(
        config: ExportConfig,
        metrics: Arc<ProxyMetrics>,
    ) -> Result<Self, http::uri::InvalidUri> {
        let uri = config.traces_uri()?;
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        tokio::spawn(run(config, uri, rx, metrics.clone()));
        Ok(Self { tx, metrics })
    }

    /// An exporter whose queue nobody drains: for tests of the request side.
    pub fn detached(queue: usize) -> (Self, mpsc::Receiver<SpanData>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        (
            Self {
                tx,
                metrics: Arc::new(ProxyMetrics::new()),
            },
            rx,
        )
    }

    pub fn export(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.metrics.spans_dropped.inc();
        }
    }

    /// Spans waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

async fn run(
    config: ExportConfig,
    uri: Uri,
    mut rx: mpsc::Receiver<SpanData>,
    metrics: Arc<ProxyMetrics>,
) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.timeout));
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(config.protocol == OtlpProtocol::Grpc)
        .build(connector);
    let mut batch = Vec::with_capacity(config.batch);
    // The last failure logged, so a collector that stays down is logged once.
    let mut last_error: Option<String> = None;
    loop {
        if rx.recv_many(&mut batch, config.batch).await == 0 {
            return; // every sender is gone: the proxy is shutting down
        }
        let deadline = tokio::time::Instant::now() + config.flush_interval;
        while batch.len() < config.batch {
            let room = config.batch - batch.len();
            tokio::select! {
                n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let n = batch.len() as u64;
        let message = export_request(&config.resource, &batch);
        batch.clear();
        let send = send(&client, &uri, config.protocol, &message);
        let result = tokio::time::timeout(config.timeout, send).await;
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("no answer within {:?}", config.timeout)),
        };
        match error {
            None => {
                metrics.spans_exported.inc_by(n);
                if last_error.take().is_some() {
                    tracing::info!(collector = %uri, "span export recovered");
                }
            }
            Some(error) => {
                metrics.spans_dropped.inc_by(n);
                if last_error.as_deref() != Some(error.as_str()) {
                    tracing::warn!(collector = %uri, %error, spans = n, "span export failed; dropping spans");
                }
                last_error = Some(error);
            }
        }
    }
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &Uri,
    protocol: OtlpProtocol,
    message: &impl prost::Message,
) -> Result<(), String> {
    let (content_type, body) = match protocol {
        OtlpProtocol::HttpProtobuf => ("application/x-protobuf", message.encode_to_vec()),
        OtlpProtocol::Grpc => ("application/grpc", grpc_frame(message)),
    };
    let mut req = Request::post(uri.clone())
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    if protocol == OtlpProtocol::Grpc {
        req.headers_mut()
            .insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
    let resp = client.request(req).await.map_err(|e| error_chain(&e))?;
    let (head, body) = resp.into_parts();
    let status = head.status;
    // Read to the end (the connection is reused; gRPC's verdict is in the trailers).
    let trailers = body
        .collect()
        .await
        .map_err(|e| error_chain(&e))?
        .trailers()
        .cloned();
    if !status.is_success() {
        return Err(format!("collector answered {status}"));
    }
    if protocol == OtlpProtocol::Grpc {
        // A trailers-only answer carries the status in its head.
        return grpc_verdict(trailers.as_ref().unwrap_or(&head.headers));
    }
    Ok(())
}

/// A gRPC message: uncompressed flag, big-endian length, the protobuf.
fn grpc_frame(message: &impl prost::Message) -> Vec<u8> {
    let len = message.encoded_len();
    let mut out = Vec::with_capacity(5 + len);
    out.push(0);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    message
        .encode(&mut out)
        .expect("a Vec grows to fit the message");
    out
}

/// `grpc-status` 0 is success; anything else (or none) is the collector's refusal, with its
/// `grpc-message`.
fn grpc_verdict(fields: &http::HeaderMap) -> Result<(), String> {
    let code = fields.get("grpc-status").map(http::HeaderValue::as_bytes);
    match code {
        Some(b"0") => Ok(()),
        Some(code) => Err(format!(
            "collector answered grpc-status {}: {}",
            String::from_utf8_lossy(code),
            fields
                .get("grpc-message")
                .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
                .unwrap_or_default()
        )),
        None => Err("collector answered without a grpc-status".into()),
    }
}

/// `outer: cause: root cause`: the legacy client's own message hides the OS error.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_path_is_appended_once() {
        let c = ExportConfig::new("http://127.0.0.1:4318".into());
        assert_eq!(
            c.traces_uri().unwrap().to_string(),
            "http://127.0.0.1:4318/v1/traces"
        );
        let c = ExportConfig::new("http://c:1/v1/traces/".into());
        assert_eq!(c.traces_uri().unwrap().to_string(), "http://c:1/v1/traces");
        let mut c = ExportConfig::new("http://c:4317".into());
        c.protocol = OtlpProtocol::Grpc;
        assert_eq!(
            c.traces_uri().unwrap().to_string(),
            format!("http://c:4317{GRPC_EXPORT}")
        );
    }

    #[test]
    fn grpc_messages_are_framed_and_verdicts_read() {
        let msg = export_request(&[("service.name", "x".into())], &[]);
        let framed = grpc_frame(&msg);
        assert_eq!(framed[0], 0, "not compressed");
        let len = u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, framed.len() - 5);
        assert_eq!(&framed[5..], prost::Message::encode_to_vec(&msg));
        let mut fields = http::HeaderMap::new();
        assert!(
            grpc_verdict(&fields)
                .unwrap_err()
                .contains("without a grpc-status")
        );
        fields.insert("grpc-status", http::HeaderValue::from_static("0"));
        assert!(grpc_verdict(&fields).is_ok());
        fields.insert("grpc-status", http::HeaderValue::from_static("8"));
        fields.insert(
            "grpc-message",
            http::HeaderValue::from_static("too many spans"),
        );
        assert_eq!(
            grpc_verdict(&fields).unwrap_err(),
            "collector answered grpc-status 8: too many spans"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        let (exporter, _rx) = Exporter::detached(2);
        let span = || SpanData {
            trace_id: [1; 16],
            span_id: [1; 8],
            parent_span_id: None,
            name: String::new(),
            kind: super::super::Kind::Server,
            start: std::time::SystemTime::now(),
            end: std::time::SystemTime::now(),
            attributes: vec![],
            error: false,
        };
        for _ in 0..5 {
            exporter.export(span());
        }
        assert_eq!(exporter.queue_len(), 2);
        assert_eq!(exporter.metrics.spans_dropped.get(), 3);
    }
}

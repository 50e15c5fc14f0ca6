//! OTLP/HTTP protobuf export: a bounded queue in front of one background task that sends
//! batches to `<endpoint>/v1/traces`.
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
use prost::Message as _;
use tokio::sync::mpsc;

use super::span::{SpanData, export_request};
use crate::metrics::ProxyMetrics;

/// How the exporter behaves; defaults suit a sidecar.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Collector base URL, e.g. `http://127.0.0.1:4318`; `/v1/traces` is appended unless
    /// the URL already ends with it.
    pub endpoint: String,
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
            queue: 2048,
            batch: 512,
            flush_interval: Duration::from_millis(200),
            timeout: Duration::from_secs(5),
            resource: Vec::new(),
        }
    }

    fn traces_uri(&self) -> Result<Uri, http::uri::InvalidUri> {
        let base = self.endpoint.trim_end_matches('/');
        if base.ends_with("/v1/traces") {
            base.parse()
        } else {
            format!("{base}/v1/traces").parse()
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
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
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
        let body = export_request(&config.resource, &batch).encode_to_vec();
        batch.clear();
        let result = tokio::time::timeout(config.timeout, send(&client, &uri, body)).await;
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
    body: Vec<u8>,
) -> Result<(), String> {
    let req = Request::post(uri.clone())
        .header(header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| error_chain(&e))?;
    let status = resp.status();
    // Drain the answer so the connection can be reused.
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("collector answered {status}"))
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

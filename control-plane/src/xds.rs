//! The config stream server (`weft.config.v1.ConfigService/StreamConfig`), one session per
//! connected proxy.
//!
//! A session registers the proxy, sends a full snapshot, then follows the registry's `watch`
//! channel. It keeps at most one response in flight: a change is sent only once the previous
//! response was ACKed or NACKed, as the delta between what the proxy last ACKed and the newest
//! version — so a burst of changes coalesces into one push. Requests answering anything but
//! the in-flight nonce are stale and ignored.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument as _, debug, info, info_span, warn};
use weft_proto::pb::config_service_server::{ConfigService, ConfigServiceServer};
use weft_proto::pb::{self, ConfigRequest, ConfigResponse};

use crate::registry::{ProxyConn, Registry, Versioned};
use crate::shutdown::Shutdown;

/// How long a new stream may take to send its first request (the node) before it is dropped,
/// so idle or broken clients do not hold a session open.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// HTTP/2 pings detect proxies that vanished without closing their connection (a killed
/// node), so their status turns to disconnected.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves config streams on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    stats: crate::experiment::stats::Aggregator,
    identity: weft_proto::identity_pb::identity_service_server::IdentityServiceServer<
        crate::certify::CertifyServer,
    >,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let service = ConfigServiceServer::new(ConfigServer::new(registry, shutdown.clone()));
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(service)
        // Proxies' traffic reports for experiments, on the same port.
        .add_service(crate::experiment::stats::StatsServer::service(
            stats,
            shutdown.clone(),
        ))
        .add_service(identity)
        .serve_with_incoming_shutdown(incoming, async move { shutdown.wait().await })
        .await
}

/// The tonic service implementation.
#[derive(Debug, Clone)]
pub struct ConfigServer {
    registry: Registry,
    shutdown: Shutdown,
    nonces: Arc<AtomicU64>,
}

impl ConfigServer {
    pub fn new(registry: Registry, shutdown: Shutdown) -> Self {
        Self {
            registry,
            shutdown,
            nonces: Arc::new(AtomicU64::new(1)),
        }
    }
}

#[tonic::async_trait]
impl ConfigService for ConfigServer {
    type StreamConfigStream = ReceiverStream<Result<ConfigResponse, Status>>;

    async fn stream_config(
        &self,
        request: Request<Streaming<ConfigRequest>>,
    ) -> Result<Response<Self::StreamConfigStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        // Answer at once and read the node inside the session: a client may wait for the
        // response headers before sending its first message.
        let (tx, rx) = mpsc::channel(2);
        let session = Session {
            registry: self.registry.clone(),
            shutdown: self.shutdown.clone(),
            nonces: self.nonces.clone(),
            tx,
        };
        let span = info_span!("stream", %peer);
        tokio::spawn(session.run(request.into_inner()).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Session {
    registry: Registry,
    shutdown: Shutdown,
    nonces: Arc<AtomicU64>,
    tx: mpsc::Sender<Result<ConfigResponse, Status>>,
}

impl Session {
    async fn run(self, mut inbound: Streaming<ConfigRequest>) {
        let first = tokio::select! {
            first = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, inbound.next()) => first,
            () = self.shutdown.wait() => return,
        };
        let first = match first {
            Ok(Some(Ok(first))) => first,
            Ok(None) => return debug!("stream closed before its first request"),
            Ok(Some(Err(status))) => {
                return debug!(%status, "stream failed before its first request");
            }
            Err(_) => {
                let msg = format!("no ConfigRequest within {FIRST_REQUEST_TIMEOUT:?}");
                return self.fail(Status::deadline_exceeded(msg)).await;
            }
        };
        let node = match first.node {
            Some(node) if !node.id.is_empty() => node,
            Some(_) => {
                let msg = "the first ConfigRequest's node has an empty id; every proxy needs a unique node id";
                return self.fail(Status::invalid_argument(msg)).await;
            }
            None => {
                let msg = "the first ConfigRequest must carry a node with a non-empty id";
                return self.fail(Status::invalid_argument(msg)).await;
            }
        };
        let current = self.registry.current().version;
        if first.version > current {
            // Versions only grow; a proxy ahead of us means our state was lost (no
            // --state-dir, or a wiped one). It gets our snapshot anyway.
            warn!(node = %node.id, proxy_version = first.version, current,
                "proxy runs a newer version than this control plane has; was its state lost?");
        }
        info!(node = %node.id, service = %node.service, proxy_version = first.version, "proxy connected");
        let conn = self.registry.connect(&node);
        let end = self.follow(&conn, inbound).await;
        info!(node = %node.id, reason = end, "proxy disconnected");
    }

    /// Ends the stream with `status`.
    async fn fail(&self, status: Status) {
        debug!(%status, "refusing stream");
        let _ = self.tx.send(Err(status)).await;
    }

    /// The main loop; returns why the stream ended.
    async fn follow(
        &self,
        conn: &ProxyConn,
        mut inbound: Streaming<ConfigRequest>,
    ) -> &'static str {
        let mut updates = self.registry.subscribe();
        let mut state = StreamState::default();
        loop {
            let current = updates.borrow_and_update().clone();
            if let Some(resp) = state.next_response(&current, || self.nonce()) {
                debug!(node = conn.node_id(), version = resp.version, full = resp.full, nonce = %resp.nonce, "sending config");
                let full = resp.full;
                if self.tx.send(Ok(resp)).await.is_err() {
                    return "client went away";
                }
                self.registry.metrics().pushed(full);
            }
            tokio::select! {
                req = inbound.next() => match req {
                    Some(Ok(req)) => {
                        if let Some((sent_at, nack)) = state.on_request(conn, req) {
                            self.registry.metrics().answered(sent_at.elapsed(), nack);
                        }
                    }
                    Some(Err(status)) => {
                        debug!(%status, "stream error");
                        return "stream error";
                    }
                    None => return "stream closed by the proxy",
                },
                // Changes wait while a response is in flight; the next one coalesces them.
                changed = updates.changed(), if state.in_flight.is_none() => {
                    if changed.is_err() {
                        return "registry closed";
                    }
                }
                () = self.tx.closed() => return "client went away",
                () = self.shutdown.wait() => {
                    let _ = self.tx.send(Err(Status::unavailable("control plane is shutting down"))).await;
                    return "shutdown";
                }
            }
        }
    }

    fn nonce(&self) -> String {
        format!("{:x}", self.nonces.fetch_add(1, Ordering::Relaxed))
    }
}

/// What one stream has sent and what the proxy answered; pure bookkeeping, no I/O.
#[derive(Debug, Default)]
struct StreamState {
    /// The last version the proxy ACKed on this stream, with its resources.
    acked: Option<Arc<Versioned>>,
    in_flight: Option<InFlight>,
    /// The version the proxy last NACKed: not resent, it would be refused again.
    rejected: Option<u64>,
}

#[derive(Debug)]
struct InFlight {
    nonce: String,
    sent: Arc<Versioned>,
    sent_at: Instant,
}

impl StreamState {
    /// The response to send now, if any.
    fn next_response(
        &mut self,
        current: &Arc<Versioned>,
        nonce: impl FnOnce() -> String,
    ) -> Option<ConfigResponse> {
        if self.in_flight.is_some() || self.rejected == Some(current.version) {
            return None;
        }
        let resp = match &self.acked {
            // Nothing ACKed on this stream yet: a delta would have no agreed base, so the
            // snapshot is sent whole (also after the first snapshot was NACKed).
            None => ConfigResponse {
                version: current.version,
                nonce: nonce(),
                full: true,
                clusters: current.resources.clusters.clone(),
                routes: current.resources.routes.clone(),
                ..Default::default()
            },
            Some(acked) if acked.version == current.version => return None,
            // Sent even when the delta is empty (a change that does not alter the wire form),
            // so that every proxy ACKs every version and `status` never shows a false lag.
            Some(acked) => acked
                .resources
                .delta_to(&current.resources)
                .into_response(current.version, nonce()),
        };
        self.in_flight = Some(InFlight {
            nonce: resp.nonce.clone(),
            sent: current.clone(),
            sent_at: Instant::now(),
        });
        Some(resp)
    }

    /// Handles an ACK or NACK; anything not answering the in-flight nonce is ignored.
    /// Returns when the answered response was sent and whether it was a NACK.
    fn on_request(&mut self, conn: &ProxyConn, req: ConfigRequest) -> Option<(Instant, bool)> {
        let answers_in_flight = self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.nonce == req.response_nonce);
        if !answers_in_flight {
            debug!(nonce = %req.response_nonce, "ignoring request for a stale or unknown nonce");
            return None;
        }
        let InFlight { sent, sent_at, .. } = self.in_flight.take()?;
        match req.error_detail {
            None => {
                debug!(node = conn.node_id(), version = sent.version, "ACK");
                conn.ack(sent.version);
                self.acked = Some(sent);
                self.rejected = None;
                Some((sent_at, false))
            }
            Some(pb::ErrorDetail { message }) => {
                let message = if message.is_empty() {
                    "(no reason given)".to_owned()
                } else {
                    message
                };
                warn!(node = conn.node_id(), version = sent.version, error = %message, "NACK: proxy refused the config");
                conn.nack(sent.version, &message);
                self.rejected = Some(sent.version);
                Some((sent_at, true))
            }
        }
    }
}

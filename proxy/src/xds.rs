//! The configuration client: one long-lived `StreamConfig` stream to a control plane.
//!
//! Each response is applied to the resources last ACKed on this stream, converted, validated
//! with this proxy's limits, compiled and swapped in, then ACKed. If any step fails the proxy
//! NACKs with the reason and keeps both its running snapshot and its resources, because the
//! next delta is computed against what it last ACKed.
//!
//! When the stream breaks the proxy keeps serving its last good configuration and reconnects
//! with jittered exponential backoff, trying the configured control planes in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use weft_proto::Resources;
use weft_proto::pb::config_service_client::ConfigServiceClient;
use weft_proto::pb::{ConfigRequest, ConfigResponse, ErrorDetail, Node};

use crate::state::{ProxyState, Source};

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How far one stream got, which decides logging and backoff after it ends.
#[derive(Debug, Default)]
struct Progress {
    /// The stream was established: its end is a state change worth a warning.
    connected: bool,
    /// A response was processed: the stream was healthy, so the backoff starts over.
    applied: bool,
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("invalid control plane address {address:?}: {source}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The error and its causes, flattened: tonic's own message ("transport error") hides
    /// the OS error a reader needs.
    #[error("connect to control plane failed: {0}")]
    Connect(String),
    #[error("control plane refused the stream: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("control plane closed the stream")]
    Closed,
}

/// The identity this proxy announces on every stream.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub service: String,
    pub namespace: String,
    pub labels: HashMap<String, String>,
    /// The admin listener's address, announced so `weftctl top` can scrape `/metrics`.
    pub admin_addr: String,
}

/// Streams configuration from `addresses` into `state` until the task is dropped.
#[derive(Debug)]
pub struct Client {
    addresses: Vec<String>,
    node: Node,
    state: Arc<ProxyState>,
}

impl Client {
    pub fn new(addresses: Vec<String>, node: NodeInfo, state: Arc<ProxyState>) -> Self {
        assert!(!addresses.is_empty(), "at least one control plane address");
        let node = Node {
            id: node.id,
            service: node.service,
            namespace: node.namespace,
            labels: node.labels,
            proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
            admin_addr: node.admin_addr,
        };
        Self {
            addresses,
            node,
            state,
        }
    }

    /// Runs forever; cancel by dropping (aborting) the task.
    pub async fn run(self) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        // The last error logged, so a control plane that stays down is logged once, not on
        // every retry.
        let mut last_error: Option<String> = None;
        for address in self.addresses.iter().cycle() {
            let mut progress = Progress::default();
            let result = self.stream(address, &mut progress).await;
            self.state.set_control_plane(false, Some(address.clone()));
            let error = match result {
                Ok(()) => XdsError::Closed.to_string(),
                Err(e) => e.to_string(),
            };
            if progress.applied {
                // A stream that delivered configuration was healthy: start over quickly.
                backoff.reset();
            }
            if progress.connected || last_error.as_deref() != Some(error.as_str()) {
                tracing::warn!(control_plane = %address, %error, "config stream down; serving the last good configuration and reconnecting");
            } else {
                tracing::debug!(control_plane = %address, %error, "reconnect failed");
            }
            last_error = Some(error);
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// One stream: connect, announce, then apply and answer responses until it ends.
    async fn stream(&self, address: &str, progress: &mut Progress) -> Result<(), XdsError> {
        let endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|source| XdsError::Address {
                address: address.to_owned(),
                source,
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            // The stream is idle between changes; pings find a control plane that vanished
            // without closing the connection.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let endpoint = crate::identity::control_plane_tls(endpoint).map_err(XdsError::Connect)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| XdsError::Connect(error_chain(&e)))?;
        let mut client = ConfigServiceClient::new(channel);

        // Requests are few and each answers one response; a small buffer is plenty.
        let (tx, rx) = mpsc::channel(4);
        let hello = ConfigRequest {
            node: Some(self.node.clone()),
            version: self.state.load().version,
            ..Default::default()
        };
        tx.send(hello).await.map_err(|_| XdsError::Closed)?;
        let mut responses = client
            .stream_config(ReceiverStream::new(rx))
            .await?
            .into_inner();
        progress.connected = true;
        self.state.set_control_plane(true, Some(address.to_owned()));
        tracing::info!(control_plane = %address, "config stream connected");

        // Deltas are against what was last ACKed on this stream; a new stream starts empty
        // and is sent a full snapshot first.
        let mut acked = Resources::default();
        while let Some(resp) = responses.message().await? {
            let answer = self.handle(&mut acked, &resp);
            progress.applied = true;
            tx.send(answer).await.map_err(|_| XdsError::Closed)?;
        }
        Ok(())
    }

    /// Applies one response and returns its ACK or NACK.
    fn handle(&self, acked: &mut Resources, resp: &ConfigResponse) -> ConfigRequest {
        let candidate = acked.apply_delta(resp);
        match self
            .state
            .apply(&candidate, resp.version, Source::ControlPlane)
        {
            Ok(()) => {
                *acked = candidate;
                ConfigRequest {
                    version: resp.version,
                    response_nonce: resp.nonce.clone(),
                    ..Default::default()
                }
            }
            Err(e) => {
                let message = e.to_string();
                let running = self.state.load().version;
                tracing::warn!(
                    version = resp.version,
                    running,
                    error = %message,
                    "configuration refused (NACK); keeping the running version"
                );
                self.state.record_nack(resp.version, message.clone());
                ConfigRequest {
                    version: running,
                    response_nonce: resp.nonce.clone(),
                    error_detail: Some(ErrorDetail { message }),
                    ..Default::default()
                }
            }
        }
    }
}

/// `outer: cause: root cause`, skipping repeated messages.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let msg = e.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        next = e.source();
    }
    out
}

/// Exponential backoff with full jitter: each delay is uniform in `[min, cap]`, where the cap
/// doubles per attempt up to `max`. Jitter keeps a fleet of proxies from reconnecting in step.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    cap: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, cap: min }
    }

    fn reset(&mut self) {
        self.cap = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        let min = self.min.as_millis() as u64;
        let cap = self.cap.as_millis() as u64;
        self.cap = (self.cap * 2).min(self.max);
        Duration::from_millis(fastrand::u64(min..=cap.max(min)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::validate::Limits;
    use weft_proto::{parse_yaml, to_resources};

    const MESH: &str = r#"
services:
  - {name: a, endpoints: [{address: "127.0.0.1:1"}]}
routes:
  - name: a
    hosts: [a]
    rules:
      - {match: {path: {regex: "/[a-z]{3}"}}, backends: [{service: a}]}
"#;

    fn response(yaml: &str, version: u64, full: bool) -> ConfigResponse {
        let res = to_resources(&parse_yaml("m", yaml, &Limits::default()).unwrap());
        ConfigResponse {
            version,
            nonce: format!("n{version}"),
            full,
            clusters: res.clusters,
            routes: res.routes,
            ..Default::default()
        }
    }

    fn client(limits: Limits) -> Client {
        let node = NodeInfo {
            id: "p".into(),
            service: String::new(),
            namespace: "default".into(),
            labels: HashMap::new(),
            admin_addr: String::new(),
        };
        Client::new(
            vec!["http://127.0.0.1:1".into()],
            node,
            Arc::new(ProxyState::new(limits)),
        )
    }

    #[test]
    fn ack_then_nack_keeps_old_snapshot_and_resources() {
        let c = client(Limits {
            regex_size_limit: 64 << 10,
        });
        let mut acked = Resources::default();
        let ack = c.handle(&mut acked, &response(MESH, 3, true));
        assert_eq!((ack.version, ack.response_nonce.as_str()), (3, "n3"));
        assert!(ack.error_detail.is_none());
        let good = acked.clone();

        // A delta whose regex is too big for this proxy's limits.
        let big = MESH.replace("[a-z]{3}", "[a-z]{5000}");
        let nack = c.handle(&mut acked, &response(&big, 4, false));
        assert_eq!((nack.version, nack.response_nonce.as_str()), (3, "n4"));
        let message = nack.error_detail.unwrap().message;
        assert!(message.contains("limit"), "{message}");
        assert_eq!(acked, good, "deltas stay against the last ACKed state");
        assert_eq!(c.state.load().version, 3);
        let nack = c.state.status().last_nack.unwrap();
        assert_eq!(nack.version, 4);
    }

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(10)));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(100)));
        assert_eq!(b.cap, Duration::from_millis(100));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }
}

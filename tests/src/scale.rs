//! Control-plane scale simulator: N config streams (in-process clients speaking the real
//! protocol) against a real `weft-control`, measuring the time from a weight change to every
//! stream having ACKed it, and the control plane's memory per connected proxy.
//!
//! Streams are multiplexed over a few HTTP/2 connections, as proxies behind one node would not
//! be, but the control plane's per-stream work (state, deltas, ACK bookkeeping) is the same.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use weft_proto::pb::config_service_client::ConfigServiceClient;
use weft_proto::pb::{ConfigRequest, Node};

use crate::{ControlPlane, ControlPlaneOpts, mesh::two_versions};

/// Streams per HTTP/2 connection.
const STREAMS_PER_CONN: usize = 100;

#[derive(Debug, Clone)]
pub struct ScaleReport {
    pub proxies: usize,
    pub pushes: usize,
    /// Per push: time until every stream ACKed, in ms, sorted.
    pub convergence_ms: Vec<f64>,
    pub rss_idle_kb: u64,
    pub rss_connected_kb: u64,
}

impl ScaleReport {
    pub fn percentile(&self, p: f64) -> f64 {
        let v = &self.convergence_ms;
        v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
    }

    pub fn kb_per_proxy(&self) -> f64 {
        self.rss_connected_kb.saturating_sub(self.rss_idle_kb) as f64 / self.proxies as f64
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// One simulated proxy: ACKs every response and publishes the highest version it ACKed.
async fn proxy(
    channel: Channel,
    id: usize,
    acked: Arc<AtomicU64>,
    connected: mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(4);
    let node = Node {
        id: format!("sim-{id}"),
        service: "sim".into(),
        namespace: "default".into(),
        ..Node::default()
    };
    tx.send(ConfigRequest {
        node: Some(node),
        ..ConfigRequest::default()
    })
    .await?;
    let mut responses = ConfigServiceClient::new(channel)
        .stream_config(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut first = true;
    while let Some(resp) = responses.message().await? {
        tx.send(ConfigRequest {
            version: resp.version,
            response_nonce: resp.nonce,
            ..ConfigRequest::default()
        })
        .await?;
        acked.fetch_max(resp.version, Ordering::Relaxed);
        if first {
            first = false;
            let _ = connected.send(()).await;
        }
    }
    Ok(())
}

/// Runs the simulation: `proxies` streams, then `pushes` weight changes, each timed until every
/// stream ACKed it (bounded by `deadline` per push).
pub async fn run(
    dir: &std::path::Path,
    proxies: usize,
    pushes: usize,
    deadline: Duration,
) -> anyhow::Result<ScaleReport> {
    let a: std::net::SocketAddr = "127.0.0.1:1".parse()?;
    let b: std::net::SocketAddr = "127.0.0.1:2".parse()?;
    let mesh = two_versions("reviews", a, b, 100, 0);
    let cp = ControlPlane::start(dir, "weft-control", &mesh, ControlPlaneOpts::default()).await;
    let rss_idle_kb = rss_kb(cp.proc.pid());

    let mut channels = Vec::new();
    for _ in 0..proxies.div_ceil(STREAMS_PER_CONN) {
        channels.push(
            Endpoint::from_shared(format!("http://{}", cp.grpc))?
                .connect()
                .await?,
        );
    }
    let acked: Vec<Arc<AtomicU64>> = (0..proxies).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let (conn_tx, mut conn_rx) = mpsc::channel(proxies.max(1));
    let mut tasks = Vec::new();
    for (i, a) in acked.iter().enumerate() {
        let channel = channels[i / STREAMS_PER_CONN].clone();
        tasks.push(tokio::spawn(proxy(channel, i, a.clone(), conn_tx.clone())));
    }
    let start = Instant::now();
    for _ in 0..proxies {
        tokio::time::timeout(
            deadline
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(1)),
            conn_rx.recv(),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!("not every stream got its first snapshot within {deadline:?}")
        })?;
    }
    let rss_connected_kb = rss_kb(cp.proc.pid());

    let mut convergence_ms = Vec::new();
    for i in 0..pushes {
        let w = if i % 2 == 0 { (0, 100) } else { (100, 0) };
        let pushed = Instant::now();
        let version = cp.set_weights("reviews", &[("v1", w.0), ("v2", w.1)]).await;
        loop {
            if acked.iter().all(|a| a.load(Ordering::Relaxed) >= version) {
                break;
            }
            anyhow::ensure!(
                pushed.elapsed() < deadline,
                "push {i}: not every stream ACKed version {version} within {deadline:?}"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        convergence_ms.push(pushed.elapsed().as_secs_f64() * 1000.0);
    }
    for t in tasks {
        t.abort();
    }
    convergence_ms.sort_by(f64::total_cmp);
    Ok(ScaleReport {
        proxies,
        pushes,
        convergence_ms,
        rss_idle_kb,
        rss_connected_kb,
    })
}

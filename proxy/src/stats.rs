//! Per-(service, subset) outbound traffic counters, and the task that reports them to the
//! control plane (`weft.stats.v1.StatsService/Report`), which judges experiments with them.
//!
//! Counters live in one process-wide registry keyed by (service, subset). The routing table
//! resolves a handle per endpoint set when it is compiled, and the registry hands out the same
//! handle again on the next compile, so counts survive config swaps and the request path only
//! does a few relaxed atomic adds. Counters are cumulative; the reporter sends them whole
//! every `--stats-interval` and the control plane takes differences.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use weft_proto::stats::{BUCKETS, bucket_of, pb};

/// The counters of one (service, subset).
#[derive(Debug)]
pub struct Counters {
    pub service: String,
    pub subset: String,
    requests: AtomicU64,
    failures: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

impl Counters {
    fn new(service: &str, subset: &str) -> Self {
        Self {
            service: service.to_owned(),
            subset: subset.to_owned(),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// One request done: `failed` = 5xx or an error the proxy made; `latency` until the
    /// response head (or the failure).
    pub fn record(&self, failed: bool, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ms)].fetch_add(1, Ordering::Relaxed);
    }

    fn to_pb(&self) -> pb::SubsetStats {
        pb::SubsetStats {
            service: self.service.clone(),
            subset: self.subset.clone(),
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            latency_buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// Every counter of this process.
#[derive(Debug, Default)]
pub struct Registry {
    /// Only locked when a table is compiled or a report is built, never per request.
    by_key: Mutex<HashMap<(String, String), Arc<Counters>>>,
}

impl Registry {
    /// The counters of (service, subset), created on first use and kept for good.
    pub fn handle(&self, service: &str, subset: &str) -> Arc<Counters> {
        let mut map = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((service.to_owned(), subset.to_owned()))
            .or_insert_with(|| Arc::new(Counters::new(service, subset)))
            .clone()
    }

    /// A report of every counter that has seen a request.
    pub fn report(&self, node_id: &str, instance: u64) -> pb::StatsReport {
        let map = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        pb::StatsReport {
            node_id: node_id.to_owned(),
            instance,
            subsets: map
                .values()
                .filter(|c| c.requests.load(Ordering::Relaxed) > 0)
                .map(|c| c.to_pb())
                .collect(),
        }
    }
}

/// The registry of this process: counters are facts about the process, like a metrics
/// registry, so every compiled table finds the same ones without threading a handle through.
pub fn global() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

/// Sends this proxy's counters to every control plane in the list, every `interval`, each
/// stream reconnecting with backoff when it ends. Runs until aborted.
///
/// Every replica gets every report (not only the one serving this proxy's config) so that
/// whichever replica leads judges experiments on the whole mesh's traffic, and a replica
/// taking over already has the history.
pub async fn report_loop(control_planes: Vec<String>, node_id: String, interval: Duration) {
    let instance = fastrand::u64(1..);
    let loops: Vec<_> = control_planes
        .into_iter()
        .map(|url| tokio::spawn(report_forever(url, node_id.clone(), instance, interval)))
        .collect();
    // Aborting this task must end the streams too.
    struct AbortAll(Vec<tokio::task::JoinHandle<()>>);
    impl Drop for AbortAll {
        fn drop(&mut self) {
            for task in &self.0 {
                task.abort();
            }
        }
    }
    let _loops = AbortAll(loops);
    std::future::pending::<()>().await;
}

async fn report_forever(url: String, node_id: String, instance: u64, interval: Duration) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match report_to(&url, &node_id, instance, interval).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => {
                tracing::debug!(control_plane = %url, error = %e, "stats report stream ended")
            }
        }
        tokio::time::sleep(backoff + Duration::from_millis(fastrand::u64(0..50))).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn report_to(
    url: &str,
    node_id: &str,
    instance: u64,
    interval: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut client = pb::stats_service_client::StatsServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let node_id = node_id.to_owned();
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if tx.send(global().report(&node_id, instance)).await.is_err() {
                return;
            }
        }
    });
    let result = client.report(ReceiverStream::new(rx)).await;
    sender.abort();
    result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_shared_and_counts_reported() {
        let reg = Registry::default();
        let a = reg.handle("reviews", "v2");
        assert!(
            Arc::ptr_eq(&a, &reg.handle("reviews", "v2")),
            "kept across compiles"
        );
        a.record(false, Duration::from_millis(3));
        a.record(true, Duration::from_millis(300));
        reg.handle("reviews", "v1");
        let r = reg.report("n", 7);
        assert_eq!(r.subsets.len(), 1, "idle counters are not sent");
        let s = &r.subsets[0];
        assert_eq!((s.requests, s.failures), (2, 1));
        assert_eq!(s.latency_buckets[bucket_of(3)], 1);
        assert_eq!(s.latency_buckets[bucket_of(300)], 1);
    }
}

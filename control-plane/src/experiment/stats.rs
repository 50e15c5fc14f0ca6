//! The `weft.stats.v1.StatsService` server and the aggregation of what proxies report.
//!
//! Each proxy streams cumulative counters per (service, subset). The aggregator remembers the
//! last report of every proxy and adds the difference to mesh-wide totals, so totals only
//! grow. A counter that went down, or a new proxy `instance`, is a restarted proxy: what it
//! reports is all new. The first report of a proxy this control plane has not heard from
//! (also every proxy after a control-plane restart) only sets its baseline: its history was
//! counted before, or belongs to no experiment window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status, Streaming};
use weft_proto::stats::Counts;
use weft_proto::stats::pb::stats_service_server::{StatsService, StatsServiceServer};
use weft_proto::stats::pb::{ReportAck, StatsReport};

use crate::shutdown::Shutdown;

type Key = (String, String);

/// Mesh-wide totals per (service, subset); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Aggregator {
    inner: Arc<Mutex<Totals>>,
}

#[derive(Debug, Default)]
struct Totals {
    totals: HashMap<Key, Counts>,
    nodes: HashMap<String, NodeLast>,
}

#[derive(Debug, Default)]
struct NodeLast {
    instance: u64,
    last: HashMap<Key, Counts>,
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one report's differences to the totals.
    pub fn ingest(&self, report: &StatsReport) {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Totals { totals, nodes } = &mut *t;
        let first = !nodes.contains_key(&report.node_id);
        let node = nodes.entry(report.node_id.clone()).or_default();
        let restarted = !first && node.instance != report.instance;
        if restarted {
            node.last.clear();
        }
        node.instance = report.instance;
        for s in &report.subsets {
            let key = (s.service.clone(), s.subset.clone());
            let now = Counts::from_pb(s);
            if !first {
                let before = node.last.get(&key).copied().unwrap_or_default();
                totals
                    .entry(key.clone())
                    .or_default()
                    .add(&now.delta_since(&before));
            }
            node.last.insert(key, now);
        }
    }

    /// Everything counted for (service, subset) so far.
    pub fn totals(&self, service: &str, subset: &str) -> Counts {
        let t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        t.totals
            .get(&(service.to_owned(), subset.to_owned()))
            .copied()
            .unwrap_or_default()
    }
}

/// The tonic service: ingests every report of a stream until it ends or shutdown.
#[derive(Debug, Clone)]
pub struct StatsServer {
    aggregator: Aggregator,
    shutdown: Shutdown,
}

impl StatsServer {
    pub fn service(aggregator: Aggregator, shutdown: Shutdown) -> StatsServiceServer<Self> {
        StatsServiceServer::new(Self {
            aggregator,
            shutdown,
        })
    }
}

#[tonic::async_trait]
impl StatsService for StatsServer {
    async fn report(
        &self,
        request: Request<Streaming<StatsReport>>,
    ) -> Result<Response<ReportAck>, Status> {
        let mut stream = request.into_inner();
        loop {
            tokio::select! {
                msg = stream.message() => match msg? {
                    Some(report) => self.aggregator.ingest(&report),
                    None => return Ok(Response::new(ReportAck {})),
                },
                () = self.shutdown.wait() => {
                    return Err(Status::unavailable("control plane shutting down"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::stats::pb::SubsetStats;

    fn report(node: &str, instance: u64, requests: u64, failures: u64) -> StatsReport {
        StatsReport {
            node_id: node.into(),
            instance,
            subsets: vec![SubsetStats {
                service: "reviews".into(),
                subset: "v2".into(),
                requests,
                failures,
                latency_buckets: vec![requests],
            }],
        }
    }

    #[test]
    fn sums_deltas_across_proxies_and_restarts() {
        let agg = Aggregator::new();
        agg.ingest(&report("a", 1, 100, 1)); // baseline only
        agg.ingest(&report("a", 1, 130, 2));
        agg.ingest(&report("b", 7, 5, 0)); // baseline only
        agg.ingest(&report("b", 7, 25, 0));
        let t = agg.totals("reviews", "v2");
        assert_eq!((t.requests, t.failures), (50, 1));
        // a restarted (new instance): its 10 requests are new.
        agg.ingest(&report("a", 2, 10, 0));
        // b's counters went down without a new instance: also a restart.
        agg.ingest(&report("b", 7, 3, 0));
        let t = agg.totals("reviews", "v2");
        assert_eq!((t.requests, t.failures), (63, 1));
        assert_eq!(t.buckets[0], 63);
        assert_eq!(agg.totals("reviews", "v1").requests, 0);
    }
}

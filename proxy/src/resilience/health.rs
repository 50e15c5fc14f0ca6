//! Active health checks: every `interval`, GET `path` on each endpoint of a service (directly,
//! with its own small client); `unhealthy_threshold` failed probes in a row take the endpoint
//! out of balancing, `healthy_threshold` good ones bring it back. Runs beside passive ejection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use weft_proto::policy::HealthCheck;

use super::stats::EndpointStats;

/// Probes until aborted (the registry aborts it when the configuration changes).
pub async fn run(service: String, hc: HealthCheck, targets: Vec<(String, Arc<EndpointStats>)>) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build_http();
    let interval = hc.interval_or_default().as_duration();
    let timeout = hc.timeout_or_default().as_duration();
    let (down, up) = (
        hc.unhealthy_threshold_or_default(),
        hc.healthy_threshold_or_default(),
    );
    // Consecutive (failures, successes) per endpoint.
    let mut streaks = vec![(0u32, 0u32); targets.len()];
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for ((address, stats), streak) in targets.iter().zip(&mut streaks) {
            let ok = probe(&client, address, &hc.path, timeout).await;
            if ok {
                *streak = (0, streak.1.saturating_add(1));
                if stats.is_unhealthy() && streak.1 >= up {
                    tracing::info!(%service, %address, "endpoint healthy again");
                    stats.set_unhealthy(false);
                }
            } else {
                *streak = (streak.0.saturating_add(1), 0);
                if !stats.is_unhealthy() && streak.0 >= down {
                    tracing::info!(%service, %address, "endpoint failed its health check");
                    stats.set_unhealthy(true);
                }
            }
        }
    }
}

async fn probe(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    address: &str,
    path: &str,
    timeout: Duration,
) -> bool {
    let Ok(uri) = format!("http://{address}{path}").parse::<Uri>() else {
        return false;
    };
    let Ok(req) = Request::get(uri).body(Empty::new()) else {
        return false;
    };
    matches!(
        tokio::time::timeout(timeout, client.request(req)).await,
        Ok(Ok(resp)) if resp.status().is_success()
    )
}

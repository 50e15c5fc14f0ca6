//! Prometheus metrics of the control plane, served on the admin port's `/metrics`.
//!
//! - `weft_control_proxies_connected`: proxies with a live config stream (set at scrape).
//! - `weft_control_pushes_total{kind="full"|"delta"}`: responses sent on config streams.
//! - `weft_control_push_ack_duration_ms`: from a response sent to its ACK or NACK.
//! - `weft_control_nacks_total`: responses a proxy refused.
//! - `weft_control_convergence_ms`: from a new version published to every connected proxy
//!   having ACKed it (or a newer one).
//! - `weft_control_config_version`: the live version (set at scrape).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Milliseconds: a push on loopback takes well under one, a fleet-wide rollout seconds.
const BUCKETS_MS: [f64; 16] = [
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
    10000.0, 30000.0,
];

/// Versions awaiting convergence beyond this many are forgotten (a proxy stuck on an old
/// version must not grow memory without bound).
const MAX_PENDING: usize = 1024;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug)]
pub struct ControlMetrics {
    registry: Registry,
    pub connected: Gauge,
    pub config_version: Gauge,
    pushes: Family<[(&'static str, &'static str); 1], Counter>,
    pub nacks: Counter,
    /// Kubernetes discovery snapshots refused because the merged config did not validate.
    pub discovery_refused: Counter,
    push_ack_ms: Histogram,
    convergence_ms: Histogram,
    /// Published versions not yet ACKed by every connected proxy, with when they were
    /// published.
    pending: Mutex<BTreeMap<u64, Instant>>,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft_control");
        let connected = Gauge::default();
        registry.register(
            "proxies_connected",
            "Proxies with a live config stream",
            connected.clone(),
        );
        let config_version = Gauge::default();
        registry.register(
            "config_version",
            "The live configuration version",
            config_version.clone(),
        );
        let pushes = Family::default();
        registry.register(
            "pushes",
            "Config responses sent to proxies, by kind (full snapshot or delta)",
            pushes.clone(),
        );
        let nacks = Counter::default();
        registry.register("nacks", "Config responses proxies refused", nacks.clone());
        let discovery_refused = Counter::default();
        registry.register(
            "discovery_refused",
            "Kubernetes discovery snapshots refused (the merged config did not validate; the last good one stays)",
            discovery_refused.clone(),
        );
        let push_ack_ms = Histogram::new(BUCKETS_MS);
        registry.register(
            "push_ack_duration_ms",
            "Time from a config response sent to its ACK or NACK, in milliseconds",
            push_ack_ms.clone(),
        );
        let convergence_ms = Histogram::new(BUCKETS_MS);
        registry.register(
            "convergence_ms",
            "Time from a new version published to every connected proxy ACKing it, in milliseconds",
            convergence_ms.clone(),
        );
        Self {
            registry,
            connected,
            config_version,
            pushes,
            nacks,
            discovery_refused,
            push_ack_ms,
            convergence_ms,
            pending: Mutex::default(),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn pushed(&self, full: bool) {
        let kind = if full { "full" } else { "delta" };
        self.pushes.get_or_create(&[("kind", kind)]).inc();
    }

    /// A proxy answered a push sent `elapsed` ago.
    pub fn answered(&self, elapsed: Duration, nack: bool) {
        self.push_ack_ms.observe(ms(elapsed));
        if nack {
            self.nacks.inc();
        }
    }

    /// A new version went live; `proxies` are connected now (none: nothing to converge).
    pub fn published(&self, version: u64, proxies: usize) {
        if proxies == 0 {
            return;
        }
        let mut pending = self.lock();
        pending.insert(version, Instant::now());
        while pending.len() > MAX_PENDING {
            pending.pop_first();
        }
    }

    /// Every connected proxy has ACKed `version` or newer: the versions up to it converged.
    pub fn converged_up_to(&self, version: u64) {
        let mut pending = self.lock();
        while let Some(entry) = pending.first_entry() {
            if *entry.key() > version {
                break;
            }
            let published = entry.remove();
            self.convergence_ms.observe(ms(published.elapsed()));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Instant>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convergence_is_observed_once_per_version() {
        let m = ControlMetrics::new();
        m.published(2, 0); // no proxies: not tracked
        m.published(3, 2);
        m.published(4, 2);
        m.converged_up_to(3);
        assert_eq!(m.lock().len(), 1);
        m.converged_up_to(9);
        assert!(m.lock().is_empty());
        let text = m.encode();
        assert!(
            text.contains("weft_control_convergence_ms_count 2"),
            "{text}"
        );
    }
}

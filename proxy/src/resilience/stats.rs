//! Per-endpoint state in atomics: peak-EWMA latency, in-flight requests, outlier ejection and
//! active health. One [`EndpointStats`] per (service, address), kept by the
//! [`Registry`](super::Registry) across configuration versions.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How fast the latency estimate forgets (Linkerd's peak-EWMA decay).
const EWMA_DECAY_NS: f64 = 10e9;

/// Milliseconds on a process-wide monotonic clock (never 0, so 0 can mean "never").
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] of an instant already read (a request reads the clock once per step).
pub fn ms_at(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_millis() as u64 + 1
}

fn ns_at(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64 + 1
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Latency estimate in ns, as f64 bits; 0 = no sample yet.
    ewma_ns: AtomicU64,
    ewma_at_ns: AtomicU64,
    inflight: AtomicU32,
    pub(crate) consecutive_failures: AtomicU32,
    pub(crate) ejected_until_ms: AtomicU64,
    /// The ejection multiplier: ejection time = base × this.
    pub(crate) ejections: AtomicU32,
    pub(crate) last_ejection_end_ms: AtomicU64,
    unhealthy: AtomicBool,
}

impl EndpointStats {
    /// Whether the balancer may send to this endpoint now.
    pub fn available(&self, now_ms: u64) -> bool {
        !self.is_ejected(now_ms) && !self.unhealthy.load(Relaxed)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Relaxed) > now_ms
    }

    pub fn set_unhealthy(&self, unhealthy: bool) {
        self.unhealthy.store(unhealthy, Relaxed);
    }

    pub fn is_unhealthy(&self) -> bool {
        self.unhealthy.load(Relaxed)
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Relaxed)
    }

    /// The latency estimate in ns (0 before the first sample), decayed toward 0 by the time
    /// since the last sample (as tower's and Finagle's peak EWMA), so an endpoint that was slow
    /// once is tried again eventually.
    pub fn ewma_ns(&self) -> f64 {
        self.ewma_at(ns_at(Instant::now()))
    }

    fn ewma_at(&self, now: u64) -> f64 {
        let raw = f64::from_bits(self.ewma_ns.load(Relaxed));
        let elapsed = now.saturating_sub(self.ewma_at_ns.load(Relaxed)) as f64;
        raw * (-elapsed / EWMA_DECAY_NS).exp()
    }

    /// Peak EWMA: a slower sample is taken at once, a faster one blends in with a weight that
    /// depends on the time since the last sample.
    pub fn observe_latency(&self, rtt: Duration) {
        self.observe_latency_at(rtt, Instant::now());
    }

    /// [`Self::observe_latency`] of a sample taken at `at`.
    pub fn observe_latency_at(&self, rtt: Duration, at: Instant) {
        let rtt = (rtt.as_nanos() as f64).max(1.0);
        let now = ns_at(at);
        let prev = self.ewma_at(now);
        let last = self.ewma_at_ns.swap(now, Relaxed);
        let next = if prev == 0.0 || rtt > prev {
            rtt
        } else {
            let elapsed = now.saturating_sub(last) as f64;
            let w = (-elapsed / EWMA_DECAY_NS).exp();
            prev * w + rtt * (1.0 - w)
        };
        // Racing writers may lose a sample; the estimate stays an estimate.
        self.ewma_ns.store(next.to_bits(), Relaxed);
    }

    /// P2C cost: latency × (in-flight + 1).
    pub fn cost(&self) -> f64 {
        let ewma = self.ewma_ns();
        // No sample yet: a small default so new endpoints are tried but not flooded.
        let ewma = if ewma == 0.0 { 1e6 } else { ewma };
        ewma * f64::from(self.inflight() + 1)
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &std::sync::Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Relaxed);
        InflightGuard(self.clone())
    }
}

#[derive(Debug)]
pub struct InflightGuard(std::sync::Arc<EndpointStats>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let s = EndpointStats::default();
        s.observe_latency(Duration::from_millis(1));
        assert!((s.ewma_ns() - 1e6).abs() < 1e3);
        s.observe_latency(Duration::from_millis(50));
        assert!((s.ewma_ns() - 50e6).abs() < 1e4, "peak is taken at once");
        // A fast sample right after barely moves it (decay is 10 s).
        s.observe_latency(Duration::from_millis(1));
        assert!(s.ewma_ns() > 40e6, "{}", s.ewma_ns());
    }

    #[test]
    fn cost_grows_with_inflight() {
        let s = Arc::new(EndpointStats::default());
        s.observe_latency(Duration::from_millis(2));
        let idle = s.cost();
        let g = s.start();
        assert!((s.cost() - 2.0 * idle).abs() < 1e3);
        drop(g);
        assert_eq!(s.inflight(), 0);
    }
}

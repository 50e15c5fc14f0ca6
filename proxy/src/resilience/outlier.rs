//! Passive outlier ejection (circuit breaking): an endpoint that fails `consecutive_errors`
//! times in a row (5xx, connect failure, timeout) is ejected for base × n (n = how often it
//! was ejected lately, decaying by one per `interval` of good behaviour), capped at 300 s,
//! and never more than `max_ejection_percent` of a set at once — but at least one, like Envoy,
//! when that percentage of a small set is below one endpoint. Recovery is automatic: the
//! endpoint is eligible again once its ejection time has passed.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use weft_proto::policy::OutlierDetection;

use super::stats::EndpointStats;

const MAX_EJECTION_MS: u64 = 300_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    pub consecutive: u32,
    pub interval_ms: u64,
    pub base_ms: u64,
    pub max_percent: u32,
}

impl OutlierConfig {
    pub fn from_model(o: &OutlierDetection) -> Self {
        Self {
            consecutive: o.consecutive_errors_or_default(),
            interval_ms: u64::from(o.interval_or_default().0),
            base_ms: u64::from(o.base_ejection_time_or_default().0),
            max_percent: o.max_ejection_percent_or_default(),
        }
    }
}

/// How many of `n` endpoints may be ejected at once.
pub fn max_ejectable(n: usize, max_percent: u32) -> usize {
    if max_percent == 0 || n == 0 {
        return 0;
    }
    (n * max_percent as usize / 100).max(1)
}

/// Records the outcome of one request to `set[idx]`; returns true when it ejected it.
pub fn report(
    cfg: &OutlierConfig,
    set: &[Arc<EndpointStats>],
    idx: usize,
    failed: bool,
    now_ms: u64,
) -> bool {
    let ep = &set[idx];
    if !failed {
        ep.consecutive_failures.store(0, Relaxed);
        return false;
    }
    let n = ep.consecutive_failures.fetch_add(1, Relaxed) + 1;
    if n < cfg.consecutive || ep.is_ejected(now_ms) {
        return false;
    }
    let ejected = set.iter().filter(|s| s.is_ejected(now_ms)).count();
    if ejected >= max_ejectable(set.len(), cfg.max_percent) {
        return false;
    }
    let last_end = ep.last_ejection_end_ms.load(Relaxed);
    let mut mult = ep.ejections.load(Relaxed);
    if last_end != 0 && cfg.interval_ms > 0 {
        let healthy_for = now_ms.saturating_sub(last_end);
        mult =
            mult.saturating_sub(u32::try_from(healthy_for / cfg.interval_ms).unwrap_or(u32::MAX));
    }
    mult = mult.saturating_add(1);
    let duration =
        (cfg.base_ms.saturating_mul(u64::from(mult))).min(MAX_EJECTION_MS.max(cfg.base_ms));
    let until = now_ms + duration;
    ep.ejections.store(mult, Relaxed);
    ep.ejected_until_ms.store(until, Relaxed);
    ep.last_ejection_end_ms.store(until, Relaxed);
    ep.consecutive_failures.store(0, Relaxed);
    tracing::info!(failures = n, ejected_for_ms = duration, "endpoint ejected");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive: 3,
            interval_ms: 1000,
            base_ms: 100,
            max_percent: 10,
        }
    }

    fn set(n: usize) -> Vec<Arc<EndpointStats>> {
        (0..n).map(|_| Arc::new(EndpointStats::default())).collect()
    }

    #[test]
    fn max_ejectable_allows_one_in_small_sets() {
        assert_eq!(max_ejectable(3, 10), 1);
        assert_eq!(max_ejectable(30, 10), 3);
        assert_eq!(max_ejectable(3, 0), 0);
        assert_eq!(max_ejectable(4, 50), 2);
    }

    #[test]
    fn ejects_after_consecutive_failures_and_recovers() {
        let s = set(3);
        let c = cfg();
        assert!(!report(&c, &s, 0, true, 1000));
        assert!(
            !report(&c, &s, 0, false, 1000),
            "a success resets the streak"
        );
        assert!(!report(&c, &s, 0, true, 1000));
        assert!(!report(&c, &s, 0, true, 1000));
        assert!(report(&c, &s, 0, true, 1000));
        assert!(!s[0].available(1050));
        assert!(s[0].available(1101), "back after base time");
    }

    #[test]
    fn ejection_time_grows_and_the_cap_holds() {
        let s = set(3);
        let c = cfg();
        for _ in 0..3 {
            report(&c, &s, 0, true, 1000);
        }
        assert_eq!(s[0].ejected_until_ms.load(Relaxed), 1100);
        for _ in 0..3 {
            report(&c, &s, 0, true, 1200);
        }
        assert_eq!(s[0].ejected_until_ms.load(Relaxed), 1400, "2 × base");
        // Max 10% of 3 = 1 endpoint: a second failing endpoint stays.
        for _ in 0..3 {
            assert!(!report(&c, &s, 1, true, 1300));
        }
        assert!(s[1].available(1300));
        // After a long healthy time the multiplier decays back.
        for _ in 0..3 {
            report(&c, &s, 0, true, 10_000);
        }
        assert_eq!(s[0].ejected_until_ms.load(Relaxed), 10_100);
    }
}

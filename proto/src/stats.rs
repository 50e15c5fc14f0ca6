//! Traffic statistics shared by the proxy (which counts) and the control plane (which judges
//! experiments): the wire schema `weft.stats.v1`, the fixed latency buckets and the pure
//! arithmetic over counter snapshots (window deltas, success rate, p99).

/// Generated protobuf and tonic code for `weft.stats.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("weft.stats.v1");
}

/// Upper bounds (inclusive, milliseconds) of the latency buckets; one more bucket after the
/// last holds everything slower. Fixed so proxies and control plane never disagree.
pub const BUCKET_BOUNDS_MS: [u64; 14] = [
    1, 2, 5, 10, 25, 50, 100, 150, 250, 500, 1000, 2500, 5000, 10_000,
];

/// Number of buckets, the overflow bucket included.
pub const BUCKETS: usize = BUCKET_BOUNDS_MS.len() + 1;

/// The bucket a latency of `ms` milliseconds falls in.
pub fn bucket_of(ms: u64) -> usize {
    BUCKET_BOUNDS_MS.partition_point(|&b| b < ms)
}

/// Cumulative counters of one (service, subset), or the difference of two such snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub requests: u64,
    pub failures: u64,
    pub buckets: [u64; BUCKETS],
}

impl Counts {
    /// From the wire; missing buckets count 0, extra ones go to the overflow bucket.
    pub fn from_pb(s: &pb::SubsetStats) -> Self {
        let mut buckets = [0; BUCKETS];
        for (i, n) in s.latency_buckets.iter().enumerate() {
            buckets[i.min(BUCKETS - 1)] += n;
        }
        Self {
            requests: s.requests,
            failures: s.failures,
            buckets,
        }
    }

    pub fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.failures += other.failures;
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
    }

    /// True when any counter of `self` is below the one in `earlier`: the counters restarted.
    pub fn went_down_from(&self, earlier: &Counts) -> bool {
        self.requests < earlier.requests
            || self.failures < earlier.failures
            || self
                .buckets
                .iter()
                .zip(earlier.buckets)
                .any(|(a, b)| *a < b)
    }

    /// What happened between the cumulative snapshot `earlier` and `self`. When the counters
    /// restarted in between (they went down), everything in `self` is new.
    pub fn delta_since(&self, earlier: &Counts) -> Counts {
        if self.went_down_from(earlier) {
            return *self;
        }
        let mut d = Counts {
            requests: self.requests - earlier.requests,
            failures: self.failures - earlier.failures,
            buckets: [0; BUCKETS],
        };
        for (i, b) in d.buckets.iter_mut().enumerate() {
            *b = self.buckets[i] - earlier.buckets[i];
        }
        d
    }

    /// Share of requests that did not fail, in percent; `None` without requests.
    pub fn success_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| {
            (self.requests - self.failures.min(self.requests)) as f64 * 100.0 / self.requests as f64
        })
    }

    /// The 99th percentile latency in ms; `None` without requests.
    pub fn p99_ms(&self) -> Option<f64> {
        quantile_ms(&self.buckets, 0.99)
    }
}

/// The `q` quantile of a bucketed histogram, interpolated linearly inside its bucket (as
/// Prometheus' `histogram_quantile` does). A quantile in the overflow bucket reports the last
/// finite bound: "at least that slow". `None` when the histogram is empty.
pub fn quantile_ms(buckets: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let Some(&upper) = BUCKET_BOUNDS_MS.get(i) else {
                return Some(BUCKET_BOUNDS_MS[BUCKET_BOUNDS_MS.len() - 1] as f64);
            };
            let lower = if i == 0 { 0 } else { BUCKET_BOUNDS_MS[i - 1] };
            let into = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
            return Some(lower as f64 + (upper - lower) as f64 * into);
        }
        below += n;
    }
    Some(BUCKET_BOUNDS_MS[BUCKET_BOUNDS_MS.len() - 1] as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(latencies: &[(u64, u64)]) -> Counts {
        let mut c = Counts::default();
        for &(ms, n) in latencies {
            c.requests += n;
            c.buckets[bucket_of(ms)] += n;
        }
        c
    }

    #[test]
    fn buckets_are_inclusive_upper_bounds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 1);
        assert_eq!(bucket_of(3), 2);
        assert_eq!(bucket_of(10_000), 13);
        assert_eq!(bucket_of(10_001), 14);
    }

    #[test]
    fn p99_from_buckets() {
        assert_eq!(Counts::default().p99_ms(), None);
        // 99 fast requests and one slow one: p99 stays in the fast bucket.
        let c = with(&[(1, 99), (200, 1)]);
        assert!(c.p99_ms().unwrap() <= 1.0, "{:?}", c.p99_ms());
        // 5 % at 200 ms: p99 lies in the 150..250 bucket, interpolated.
        let c = with(&[(1, 95), (200, 5)]);
        let p99 = c.p99_ms().unwrap();
        assert!((150.0..=250.0).contains(&p99), "{p99}");
        assert!((p99 - 230.0).abs() < 1e-9, "{p99}");
        // Everything slower than the last bound: the last bound.
        assert_eq!(with(&[(60_000, 3)]).p99_ms(), Some(10_000.0));
    }

    #[test]
    fn deltas_tolerate_counter_resets() {
        let a = Counts {
            requests: 10,
            failures: 1,
            ..with(&[(1, 10)])
        };
        let b = Counts {
            requests: 15,
            failures: 1,
            ..with(&[(1, 15)])
        };
        let d = b.delta_since(&a);
        assert_eq!((d.requests, d.failures, d.buckets[0]), (5, 0, 5));
        // The proxy restarted: 3 requests since, all of them new.
        let restarted = with(&[(1, 3)]);
        assert_eq!(restarted.delta_since(&b), restarted);
        assert_eq!(d.success_rate(), Some(100.0));
        assert_eq!(a.success_rate(), Some(90.0));
        assert_eq!(Counts::default().success_rate(), None);
    }
}

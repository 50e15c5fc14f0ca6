//! Retry budget: retries to a service may add at most `ratio`% of its recent requests plus a
//! reserve of `min_per_second × ttl`, over a sliding window of `ttl` (ten buckets). Stops retry
//! storms: under a total outage the upstream sees at most (1 + ratio) × requests + reserve.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use weft_proto::policy::RetryBudget;

const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetConfig {
    pub ratio_percent: u64,
    pub min_per_second: u64,
    pub ttl_ms: u64,
}

impl BudgetConfig {
    pub fn from_model(b: &RetryBudget) -> Self {
        Self {
            ratio_percent: u64::from(b.ratio_percent_or_default()),
            min_per_second: u64::from(b.min_retries_per_second_or_default()),
            ttl_ms: u64::from(b.ttl_or_default().0).max(BUCKETS as u64),
        }
    }
}

#[derive(Debug, Default)]
struct Bucket {
    epoch: AtomicU64,
    deposits: AtomicU64,
    withdrawals: AtomicU64,
}

/// Counters of one service; lock-free, approximate under races (a budget, not a ledger).
#[derive(Debug, Default)]
pub struct Budget {
    buckets: [Bucket; BUCKETS],
}

impl Budget {
    fn current(&self, cfg: &BudgetConfig, now_ms: u64) -> (u64, &Bucket) {
        let width = cfg.ttl_ms / BUCKETS as u64;
        let epoch = now_ms / width + 1;
        let b = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let seen = b.epoch.load(Relaxed);
        if seen != epoch
            && b.epoch
                .compare_exchange(seen, epoch, Relaxed, Relaxed)
                .is_ok()
        {
            b.deposits.store(0, Relaxed);
            b.withdrawals.store(0, Relaxed);
        }
        (epoch, b)
    }

    /// Every original request deposits.
    pub fn deposit(&self, cfg: &BudgetConfig, now_ms: u64) {
        self.current(cfg, now_ms).1.deposits.fetch_add(1, Relaxed);
    }

    /// A retry may go ahead when this returns true (and is then counted).
    pub fn try_withdraw(&self, cfg: &BudgetConfig, now_ms: u64) -> bool {
        let (epoch, cur) = self.current(cfg, now_ms);
        let (mut deposits, mut withdrawals) = (0u64, 0u64);
        for b in &self.buckets {
            let e = b.epoch.load(Relaxed);
            if e + (BUCKETS as u64) > epoch && e <= epoch {
                deposits += b.deposits.load(Relaxed);
                withdrawals += b.withdrawals.load(Relaxed);
            }
        }
        // In hundredths, to keep the ratio exact in integers.
        let allowed = deposits * cfg.ratio_percent + cfg.min_per_second * cfg.ttl_ms / 10;
        if (withdrawals + 1) * 100 <= allowed {
            cur.withdrawals.fetch_add(1, Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_ratio_plus_reserve() {
        let cfg = BudgetConfig {
            ratio_percent: 20,
            min_per_second: 1,
            ttl_ms: 10_000,
        };
        let b = Budget::default();
        let mut retries = 0;
        for i in 0..1000u64 {
            let now = 1000 + i; // within one second
            b.deposit(&cfg, now);
            // Every request would like three retries.
            for _ in 0..3 {
                if b.try_withdraw(&cfg, now) {
                    retries += 1;
                }
            }
        }
        // 20% of 1000 + 1/s × 10 s.
        assert!((200..=210).contains(&retries), "{retries}");
    }

    #[test]
    fn the_window_slides() {
        let cfg = BudgetConfig {
            ratio_percent: 0,
            min_per_second: 1,
            ttl_ms: 1000,
        };
        let b = Budget::default();
        assert!(b.try_withdraw(&cfg, 100));
        assert!(!b.try_withdraw(&cfg, 150), "reserve of 1 used up");
        assert!(b.try_withdraw(&cfg, 1250), "the old withdrawal aged out");
    }
}

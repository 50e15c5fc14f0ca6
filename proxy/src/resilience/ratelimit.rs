//! Local rate limiting: a token bucket per route rule. An empty bucket answers 429 with
//! `Retry-After` (reason `rate_limited`).

use std::sync::Mutex;
use std::time::Duration;

use weft_proto::policy::RateLimit;

use super::stats::now_ms;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    /// Tokens added per millisecond.
    pub per_ms: f64,
    pub burst: f64,
}

impl RateConfig {
    pub fn from_model(r: &RateLimit) -> Self {
        Self {
            per_ms: f64::from(r.requests) / f64::from(r.interval_or_default().0.max(1)),
            burst: f64::from(r.burst_or_default().max(1)),
        }
    }
}

#[derive(Debug)]
pub struct TokenBucket {
    pub config: RateConfig,
    /// (tokens, last refill in ms). A tiny critical section, never held across `.await`.
    state: Mutex<(f64, u64)>,
}

impl TokenBucket {
    pub fn new(config: RateConfig) -> Self {
        Self {
            config,
            state: Mutex::new((config.burst, now_ms())),
        }
    }

    pub fn try_take(&self) -> Result<(), Duration> {
        self.try_take_at(now_ms())
    }

    /// Takes a token at `now` (ms), or says how long until one is there.
    pub fn try_take_at(&self, now: u64) -> Result<(), Duration> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_sub(s.1) as f64;
        s.0 = (s.0 + elapsed * self.config.per_ms).min(self.config.burst);
        s.1 = now.max(s.1);
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            Ok(())
        } else {
            let wait_ms = ((1.0 - s.0) / self.config.per_ms).ceil();
            Err(Duration::from_millis(wait_ms as u64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_rate() {
        let b = TokenBucket::new(RateConfig {
            per_ms: 10.0 / 1000.0,
            burst: 5.0,
        });
        let t0 = b.state.lock().unwrap().1;
        for _ in 0..5 {
            b.try_take_at(t0).unwrap();
        }
        let wait = b.try_take_at(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(b.try_take_at(t0 + 99).is_err());
        assert!(b.try_take_at(t0 + 200).is_ok());
        // A long pause refills only up to the burst.
        let later = t0 + 60_000;
        for _ in 0..5 {
            b.try_take_at(later).unwrap();
        }
        assert!(b.try_take_at(later).is_err());
    }
}

//! Local rate limiting: a token bucket per route rule (outbound) or per service
//! (`security.rate_limit`, inbound), or per value of a request header in it
//! (`per: {header: …}`; inbound, `x-weft-peer-identity` is one per calling workload). An empty
//! bucket answers 429 with `Retry-After` (reason `rate_limited`).
//!
//! Keyed buckets live in a map of at most [`MAX_KEYS`] values, so that a client sending a new
//! value with every request cannot grow it without bound: when it is full, buckets that have
//! refilled completely are dropped (such a bucket is the same as a new one, so nothing is
//! lost), at most once per [`PURGE_EVERY_MS`]; values that still find no room share one
//! overflow bucket, which is stricter, never looser.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use weft_proto::policy::RateLimit;

use super::stats::now_ms;

/// Most header values with a bucket of their own, per limit.
pub const MAX_KEYS: usize = 10_000;
/// Least time between two purges of refilled buckets.
const PURGE_EVERY_MS: u64 = 1_000;

#[derive(Debug, Clone, PartialEq)]
pub struct RateConfig {
    /// Tokens added per millisecond.
    pub per_ms: f64,
    pub burst: f64,
    /// The header whose values get a bucket each; `None`: one bucket for the rule.
    pub per: Option<HeaderName>,
}

/// Tokens, and the last refill in ms.
type State = (f64, u64);

impl RateConfig {
    pub fn from_model(r: &RateLimit) -> Self {
        Self {
            per_ms: f64::from(r.requests) / f64::from(r.interval_or_default().0.max(1)),
            burst: f64::from(r.burst_or_default().max(1)),
            // Validation has checked the name.
            per: r
                .per
                .as_ref()
                .and_then(|k| HeaderName::from_bytes(k.header.as_bytes()).ok()),
        }
    }

    fn fresh(&self, now: u64) -> State {
        (self.burst, now)
    }

    fn refill(&self, s: &mut State, now: u64) {
        let elapsed = now.saturating_sub(s.1) as f64;
        s.0 = (s.0 + elapsed * self.per_ms).min(self.burst);
        s.1 = now.max(s.1);
    }

    fn take(&self, s: &mut State, now: u64) -> Result<(), Duration> {
        self.refill(s, now);
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            Ok(())
        } else {
            let wait_ms = ((1.0 - s.0) / self.per_ms).ceil();
            Err(Duration::from_millis(wait_ms as u64))
        }
    }
}

#[derive(Debug, Default)]
struct Keyed {
    buckets: HashMap<Box<[u8]>, State>,
    last_purge: u64,
}

#[derive(Debug)]
pub struct TokenBucket {
    pub config: RateConfig,
    /// The rule's bucket; with `per`, the overflow bucket. Tiny critical sections, never held
    /// across `.await`.
    state: Mutex<State>,
    keyed: Mutex<Keyed>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TokenBucket {
    pub fn new(config: RateConfig) -> Self {
        let now = now_ms();
        Self {
            state: Mutex::new(config.fresh(now)),
            config,
            keyed: Mutex::default(),
        }
    }

    /// Takes a token for a request with `headers`, or says how long until one is there.
    pub fn try_take(&self, headers: &HeaderMap) -> Result<(), Duration> {
        self.try_take_at(headers, now_ms())
    }

    /// [`TokenBucket::try_take`] at `now` (ms).
    pub fn try_take_at(&self, headers: &HeaderMap, now: u64) -> Result<(), Duration> {
        let Some(name) = &self.config.per else {
            return self.config.take(&mut lock(&self.state), now);
        };
        let key = headers.get(name).map_or(&[][..], |v| v.as_bytes());
        let mut keyed = lock(&self.keyed);
        if let Some(s) = keyed.buckets.get_mut(key) {
            return self.config.take(s, now);
        }
        if keyed.buckets.len() >= MAX_KEYS && now >= keyed.last_purge + PURGE_EVERY_MS {
            keyed.last_purge = now;
            keyed.buckets.retain(|_, s| {
                self.config.refill(s, now);
                s.0 < self.config.burst
            });
        }
        if keyed.buckets.len() >= MAX_KEYS {
            drop(keyed);
            return self.config.take(&mut lock(&self.state), now);
        }
        let mut s = self.config.fresh(now);
        let taken = self.config.take(&mut s, now);
        keyed.buckets.insert(key.into(), s);
        taken
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
            per: None,
        });
        let h = HeaderMap::new();
        let t0 = b.state.lock().unwrap().1;
        for _ in 0..5 {
            b.try_take_at(&h, t0).unwrap();
        }
        let wait = b.try_take_at(&h, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(b.try_take_at(&h, t0 + 99).is_err());
        assert!(b.try_take_at(&h, t0 + 200).is_ok());
        // A long pause refills only up to the burst.
        let later = t0 + 60_000;
        for _ in 0..5 {
            b.try_take_at(&h, later).unwrap();
        }
        assert!(b.try_take_at(&h, later).is_err());
    }

    fn user(id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-user", id.parse().unwrap());
        h
    }

    #[test]
    fn each_header_value_has_its_own_bucket_and_the_map_stays_bounded() {
        let b = TokenBucket::new(RateConfig {
            per_ms: 1.0 / 1000.0,
            burst: 2.0,
            per: Some(HeaderName::from_static("x-user")),
        });
        let t0 = b.state.lock().unwrap().1;
        for _ in 0..2 {
            b.try_take_at(&user("ann"), t0).unwrap();
        }
        assert!(
            b.try_take_at(&user("ann"), t0).is_err(),
            "ann's bucket is empty"
        );
        b.try_take_at(&user("bob"), t0).expect("bob has his own");
        // Without the header: one shared bucket of its own.
        let none = HeaderMap::new();
        b.try_take_at(&none, t0).unwrap();
        b.try_take_at(&none, t0).unwrap();
        assert!(b.try_take_at(&none, t0).is_err());

        // A flood of new values fills the map (ann, bob and "no header" are in it), then
        // overflows into one shared bucket.
        for i in 0..MAX_KEYS - 3 {
            let _ = b.try_take_at(&user(&format!("u{i}")), t0);
        }
        assert_eq!(lock(&b.keyed).buckets.len(), MAX_KEYS);
        b.try_take_at(&user("late-1"), t0).unwrap();
        b.try_take_at(&user("late-2"), t0).unwrap();
        assert!(
            b.try_take_at(&user("late-3"), t0).is_err(),
            "overflowing values share the rule's bucket"
        );
        assert!(b.try_take_at(&user("ann"), t0).is_err(), "ann keeps hers");
        // Once buckets have refilled they are dropped for new values (ann's too: it is full).
        let later = t0 + 10_000;
        b.try_take_at(&user("new"), later).unwrap();
        assert_eq!(lock(&b.keyed).buckets.len(), 1);
    }
}

//! Bulkhead per upstream service: at most `max_requests` concurrent requests, at most
//! `max_pending` more waiting for a slot (bounded by the request timeout); beyond that a request
//! is refused at once with 503 `overflow`, never queued forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Bulkhead {
    active: AtomicU32,
    pending: AtomicU32,
    freed: Notify,
}

/// Holds one request slot until dropped (with the response body).
#[derive(Debug)]
pub struct Permit(Arc<Bulkhead>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
        self.0.freed.notify_one();
    }
}

struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Bulkhead {
    fn try_acquire(self: &Arc<Self>, max: u32) -> Option<Permit> {
        self.active
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Permit(self.clone()))
    }

    /// A slot, or `None` when both the slots and the waiting room are full.
    pub async fn acquire(self: &Arc<Self>, max_requests: u32, max_pending: u32) -> Option<Permit> {
        if let Some(p) = self.try_acquire(max_requests) {
            return Some(p);
        }
        if self.pending.fetch_add(1, Relaxed) >= max_pending {
            self.pending.fetch_sub(1, Relaxed);
            return None;
        }
        let _waiting = Waiting(&self.pending);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(p) = self.try_acquire(max_requests) {
                return Some(p);
            }
            freed.await;
        }
    }

    pub fn active(&self) -> u32 {
        self.active.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_is_refused_and_pending_waits() {
        let b = Arc::new(Bulkhead::default());
        let p1 = b.acquire(2, 0).await.unwrap();
        let _p2 = b.acquire(2, 0).await.unwrap();
        assert!(b.acquire(2, 0).await.is_none(), "no waiting room");
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.acquire(2, 1).await.is_some() });
        tokio::task::yield_now().await;
        drop(p1);
        assert!(waiter.await.unwrap(), "a freed slot goes to the waiter");
        assert_eq!(b.active(), 1, "the waiter released its slot when done");
    }
}

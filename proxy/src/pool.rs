//! The HTTP/1.1 upstream connection pool: idle keep-alive connections per endpoint, handed out
//! last-in first-out and given back when the response body has been read to its end.
//!
//! Why not hyper-util's legacy client: per request it hashed its key with SipHash twice,
//! allocated a boxed future and a oneshot, and spawned a task that waited for the connection to
//! become idle (about a fifth of the proxy's instructions per request). Here a request costs a
//! lock, a pop and a push; the connection goes back from the response body's `Drop`, which
//! hyper runs as soon as the last byte is written downstream. Only when the connection is not
//! idle yet at that moment (its request body still streaming) does a task wait for it.
//!
//! Idle connections close after the service's idle timeout (between 1× and 1.25× of it: a
//! sweep every quarter of the timeout), or at once when the upstream closes them; a request
//! that finds its pooled connection closing is sent again on another one, since it was never
//! written.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use tower_service::Service;

use crate::resilience::connector::{Connector, TooManyConnections};
use crate::resilience::replay::RequestBody;
use crate::upstream::{UpstreamError, root_cause};

/// Sweeps per idle timeout (an idle connection lives 1× to 1 + 1/SWEEPS× the timeout).
const SWEEPS: u32 = 4;

/// The pool of one service's HTTP/1.1 connections. Cheap to clone.
#[derive(Clone)]
pub struct Http1Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Http1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Pool")
            .field("idle", &self.idle_count())
            .finish_non_exhaustive()
    }
}

struct Inner {
    idle: Mutex<HashMap<Authority, Vec<Idle>, BuildHasherDefault<FxHasher>>>,
    connector: Connector,
    idle_timeout: Duration,
    /// Incremented by each sweep; an idle connection remembers the epoch it was parked in.
    epoch: AtomicU32,
    sweeping: AtomicBool,
}

struct Idle {
    sender: SendRequest<RequestBody>,
    epoch: u32,
}

impl Http1Pool {
    pub fn new(connector: Connector, idle_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                idle: Mutex::default(),
                connector,
                idle_timeout,
                epoch: AtomicU32::new(0),
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Idle connections now parked, over all endpoints.
    pub fn idle_count(&self) -> usize {
        self.inner.lock().values().map(Vec::len).sum()
    }

    /// Sends `req` (origin-form URI, head ready for the wire) to `endpoint` on an idle
    /// connection, or on a new one when none is idle.
    pub async fn send(
        &self,
        endpoint: Authority,
        mut req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        loop {
            let (mut sender, pooled) = match self.inner.checkout(&endpoint) {
                Some(sender) => (sender, true),
                // Boxed: connecting is rare, and its future would otherwise be carried (and
                // moved) by every request's future.
                None => (Box::pin(self.connect(&endpoint)).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let home = Home {
                        pool: self.inner.clone(),
                        endpoint,
                        sender,
                    };
                    return Ok(resp.map(|body| UpstreamBody::pooled(body, home)));
                }
                Err(mut e) => match e.take_message() {
                    // The pooled connection was closing and never took the request: the
                    // request goes out again, on another connection.
                    Some(unsent) if pooled => req = unsent,
                    _ => {
                        return Err(UpstreamError::Reset {
                            endpoint: endpoint.to_string(),
                            cause: root_cause(e.error()),
                        });
                    }
                },
            }
        }
    }

    async fn connect(
        &self,
        endpoint: &Authority,
    ) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(endpoint.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| UpstreamError::Connect {
                endpoint: endpoint.to_string(),
                cause: e.to_string(),
            })?;
        let io = self
            .inner
            .connector
            .clone()
            .call(uri)
            .await
            .map_err(|e| connect_error(endpoint, &*e))?;
        let (sender, conn) =
            http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| UpstreamError::Connect {
                    endpoint: endpoint.to_string(),
                    cause: root_cause(&e),
                })?;
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%endpoint, %error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

fn connect_error(
    endpoint: &Authority,
    err: &(dyn std::error::Error + Send + Sync + 'static),
) -> UpstreamError {
    let endpoint = endpoint.to_string();
    let cause = root_cause(err);
    if let Some(limit) = err.downcast_ref::<TooManyConnections>() {
        UpstreamError::ConnectionLimit {
            endpoint,
            cause: limit.to_string(),
        }
    } else if crate::upstream::timed_out(err) {
        UpstreamError::ConnectTimeout { endpoint, cause }
    } else {
        UpstreamError::Connect { endpoint, cause }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<Authority, Vec<Idle>, BuildHasherDefault<FxHasher>>> {
        // A plain map: a panicking holder cannot leave it inconsistent in a way that matters.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn checkout(&self, endpoint: &Authority) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.lock();
        let list = idle.get_mut(endpoint)?;
        while let Some(entry) = list.pop() {
            if entry.sender.is_ready() {
                return Some(entry.sender);
            }
            // Closed (or closing) since it was parked: dropped here.
        }
        None
    }

    fn put(self: &Arc<Self>, endpoint: Authority, sender: SendRequest<RequestBody>) {
        let epoch = self.epoch.load(Relaxed);
        self.lock()
            .entry(endpoint)
            .or_default()
            .push(Idle { sender, epoch });
        if !self.sweeping.swap(true, Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self), self.idle_timeout));
        }
    }
}

/// Closes connections idle for longer than the timeout, while the pool exists.
async fn sweep(pool: Weak<Inner>, idle_timeout: Duration) {
    let period = (idle_timeout / SWEEPS).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = pool.epoch.fetch_add(1, Relaxed).wrapping_add(1);
        let mut idle = pool.lock();
        idle.retain(|_, list| {
            list.retain(|e| now.wrapping_sub(e.epoch) <= SWEEPS && !e.sender.is_closed());
            !list.is_empty()
        });
    }
}

/// Where a connection goes back to when its response is done.
struct Home {
    pool: Arc<Inner>,
    endpoint: Authority,
    sender: SendRequest<RequestBody>,
}

impl Home {
    fn give_back(self) {
        let Home {
            pool,
            endpoint,
            mut sender,
        } = self;
        if sender.is_ready() {
            pool.put(endpoint, sender);
        } else if !sender.is_closed()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            // Not idle yet (the request body may still be streaming): park it once it is, but
            // never wait longer than an idle connection would live.
            let wait = pool.idle_timeout;
            rt.spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(wait, sender.ready()).await {
                    pool.put(endpoint, sender);
                }
            });
        }
    }
}

/// An upstream response body. When it is pooled and dropped after its end, its connection
/// goes back to the pool; dropped before the end, the connection closes with it.
pub struct UpstreamBody {
    inner: Incoming,
    home: Option<Home>,
    ended: bool,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.home.is_some())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    /// A body whose connection is not this pool's (HTTP/2 multiplexed, mesh mTLS).
    pub fn new(inner: Incoming) -> Self {
        Self {
            inner,
            home: None,
            ended: false,
        }
    }

    fn pooled(inner: Incoming, home: Home) -> Self {
        Self {
            inner,
            home: Some(home),
            ended: false,
        }
    }
}

impl From<Incoming> for UpstreamBody {
    fn from(inner: Incoming) -> Self {
        Self::new(inner)
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // `is_end_stream` covers bodies hyper never polls (empty, HEAD, 304); `ended` covers
        // chunked ones, which only say they are done by ending.
        if let Some(home) = self.home.take()
            && (self.ended || self.inner.is_end_stream())
        {
            home.give_back();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.ended = true,
            // An error leaves the connection in an unknown state: it is not reused.
            Poll::Ready(Some(Err(_))) => this.home = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Firefox's hash (FxHash): a multiply and a rotate per word. The keys are endpoint addresses
/// from the configuration, not attacker-chosen, so SipHash's flooding resistance buys nothing
/// here, and it was a visible share of each request.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u8(&mut self, b: u8) {
        self.write_u64(u64::from(b));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

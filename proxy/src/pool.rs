//! The HTTP/1.1 upstream connection pool: idle keep-alive connections per endpoint, handed out
//! last-in first-out and given back when the response body has been read to its end.
//!
//! Why not hyper-util's legacy client: per request it hashed its key with SipHash twice,
//! allocated a boxed future and a oneshot, spawned a task that waited for the connection to
//! become idle, and drove each connection on a task of its own. Here a request costs a lock, a
//! pop and a push, and is exchanged on the request's own task ([`crate::h1`]); the connection
//! goes back from the body as soon as its last byte is read.
//!
//! Idle connections close after the service's idle timeout (between 1× and 1.25× of it: a
//! sweep every quarter of the timeout), or are dropped at checkout when the upstream closed
//! them meanwhile; a safe request that finds its reused connection closed under it is sent
//! again on another, as Go's net/http does.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
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
use tower_service::Service;

use crate::h1::{Connection, GiveBack, H1Body, SendError};
use crate::resilience::connector::{Connector, TooManyConnections};
use crate::resilience::replay::RequestBody;
use crate::resilience::timeout::BoxError;
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
    idle: Mutex<HashMap<Key, Vec<Idle>, BuildHasherDefault<FxHasher>>>,
    connector: Connector,
    idle_timeout: Duration,
    /// Incremented by each sweep; an idle connection remembers the epoch it was parked in.
    epoch: AtomicU32,
    sweeping: AtomicBool,
}

struct Idle {
    conn: Box<Connection>,
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
    ///
    /// Not an `async fn`: the request is held once by the future (see `Forwarder::serve`).
    pub fn send(
        &self,
        endpoint: Authority,
        mut req: Request<RequestBody>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, UpstreamError>> {
        let endpoint = Key(endpoint);
        async move {
            loop {
                let (conn, reused) = match self.inner.checkout(&endpoint) {
                    Some(conn) => (conn, true),
                    // Boxed: connecting is rare, and its future would otherwise be carried (and
                    // moved) by every request's future.
                    None => (Box::pin(self.connect(&endpoint.0)).await?, false),
                };
                match conn.send(req, reused).await {
                    Ok(exchange) => {
                        let home = Home {
                            pool: self.inner.clone(),
                            endpoint,
                        };
                        let body = UpstreamBody::H1(H1Body::new(exchange.body, home));
                        return Ok(exchange.head.map(|()| body));
                    }
                    // The reused connection was closed under a request that can go again.
                    Err(SendError::Stale(again)) => req = *again,
                    Err(SendError::Failed(e)) => {
                        return Err(UpstreamError::Reset {
                            endpoint: endpoint.0.to_string(),
                            cause: e.to_string(),
                        });
                    }
                }
            }
        }
    }

    async fn connect(&self, endpoint: &Authority) -> Result<Box<Connection>, UpstreamError> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(endpoint.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| UpstreamError::Connect {
                endpoint: endpoint.to_string(),
                cause: e.to_string(),
            })?;
        let conn = self
            .inner
            .connector
            .clone()
            .call(uri)
            .await
            .map_err(|e| connect_error(endpoint, &*e))?;
        let (io, slot) = conn.into_parts();
        Ok(Connection::new(io, slot))
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
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Vec<Idle>, BuildHasherDefault<FxHasher>>> {
        // A plain map: a panicking holder cannot leave it inconsistent in a way that matters.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn checkout(&self, endpoint: &Key) -> Option<Box<Connection>> {
        let mut idle = self.lock();
        let list = idle.get_mut(endpoint)?;
        while let Some(mut entry) = list.pop() {
            if entry.conn.usable() {
                return Some(entry.conn);
            }
            // Closed by the upstream (or sent something unasked) while idle: dropped here.
        }
        None
    }

    fn put(self: &Arc<Self>, endpoint: Key, conn: Box<Connection>) {
        let idle = Idle {
            conn,
            epoch: self.epoch.load(Relaxed),
        };
        let mut map = self.lock();
        match map.get_mut(&endpoint) {
            Some(list) => list.push(idle),
            None => {
                map.insert(endpoint, vec![idle]);
            }
        }
        drop(map);
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
            list.retain_mut(|e| now.wrapping_sub(e.epoch) <= SWEEPS && e.conn.usable());
            !list.is_empty()
        });
    }
}

/// Where a connection goes back to when its response is done.
pub struct Home {
    pool: Arc<Inner>,
    endpoint: Key,
}

impl GiveBack for Home {
    fn give_back(self, conn: Box<Connection>) {
        self.pool.put(self.endpoint, conn);
    }
}

/// An upstream response body: HTTP/1.1 read by the proxy itself (its connection goes back to
/// the pool at the end), or hyper's (HTTP/2, mesh mTLS).
#[derive(Debug)]
pub enum UpstreamBody {
    H1(H1Body<Home>),
    Hyper(Incoming),
}

impl UpstreamBody {
    pub fn new(inner: Incoming) -> Self {
        Self::Hyper(inner)
    }
}

impl From<Incoming> for UpstreamBody {
    fn from(inner: Incoming) -> Self {
        Self::Hyper(inner)
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::H1(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(b) => b.is_end_stream(),
            UpstreamBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(b) => b.size_hint(),
            UpstreamBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// An endpoint as a pool key: compared byte for byte, hashed from its length and last eight
/// bytes (where the `host:port` addresses of a service differ) in one word. Hashing an
/// `Authority` feeds it to the hasher a byte at a time, twice per request.
#[derive(Debug, Clone)]
struct Key(Authority);

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let bytes = self.0.as_str().as_bytes();
        let n = bytes.len().min(8);
        let mut tail = [0u8; 8];
        tail[..n].copy_from_slice(&bytes[bytes.len() - n..]);
        state.write_u64(u64::from_le_bytes(tail) ^ ((bytes.len() as u64) << 56));
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

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

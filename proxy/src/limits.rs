//! Downstream resource limits of the traffic listeners: what one client (or many) may hold of
//! the proxy before it is refused or cut off.
//!
//! | limit | default | enforced by |
//! |---|---|---|
//! | connections per listener | 16384 | [`ListenerLimits::admit`]: over the limit a connection is accepted, answered `503` with `x-weft-reason: max_connections` and closed at once (not left in the backlog, where a client cannot tell a full proxy from a dead one) |
//! | header read timeout | 30 s | hyper (HTTP/1: the whole request head, also the keep-alive idle time between requests); [`crate::connection`] for the first request of any protocol (h2c, a silent socket) |
//! | header bytes | 64 KiB | [`check_headers`]: `431` + `x-weft-reason: header_too_large`; beyond twice the limit hyper's parser (HTTP/1) or h2's `SETTINGS_MAX_HEADER_LIST_SIZE` refuse on their own with a bare `431` |
//! | headers per request | 100 | hyper's parser (HTTP/1, bare `431`) and [`check_headers`] (both) |
//! | HTTP/2 concurrent streams | 256 | h2 (`SETTINGS_MAX_CONCURRENT_STREAMS`) |
//! | HTTP/2 keep-alive ping | every 60 s, 20 s to answer | hyper: a dead peer's connection is closed |
//! | idle connection | 5 min without a new request | [`crate::connection`]: graceful close (in-flight responses finish) |
//! | requests per connection | unlimited | [`crate::connection`]: graceful close after N (HTTP/1 `connection: close`, HTTP/2 GOAWAY) |
//! | request rate per connection | unlimited | [`RateBucket`]: `429` + `x-weft-reason: connection_rate_limited` |
//!
//! Every refusal or cut is counted in `weft_proxy_listener_limits_total{listener, limit}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Request;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::metrics::ConnCounters;

/// hyper's default number of HTTP/1 headers; changing it makes hyper allocate the header
/// array per request, so it is only set when it differs.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// How long a refused connection is given to read the 503 before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_millis(250);

/// The answer to a connection over the listener's limit (plain HTTP/1.1: most clients of a
/// sidecar speak it; anything else just sees the connection close).
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
x-weft-reason: max_connections\r\n\
content-type: text/plain; charset=utf-8\r\n\
content-length: 61\r\n\
connection: close\r\n\r\n\
weft-proxy: too many connections to this listener, try again\n";

/// The limits of one listener (the same for outbound and inbound; flags in `cli`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Open connections per listener; 0 = unlimited.
    pub max_connections: usize,
    /// Time to receive a request head (and, before the first request, any request at all).
    pub header_read_timeout: Duration,
    /// Bytes of one request head: request line plus every `name: value\r\n`.
    pub max_header_bytes: usize,
    /// Headers in one request.
    pub max_headers: usize,
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 PING interval; `None` = no pings.
    pub h2_keepalive_interval: Option<Duration>,
    pub h2_keepalive_timeout: Duration,
    /// A connection without a new request for this long is closed gracefully.
    pub idle_timeout: Duration,
    /// Requests per connection before it is closed gracefully; 0 = unlimited.
    pub max_requests_per_connection: u64,
    /// Requests per second one connection may send (burst: one second's worth); 0 = unlimited.
    pub max_request_rate_per_connection: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 16384,
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 << 10,
            max_headers: HYPER_DEFAULT_MAX_HEADERS,
            h2_max_concurrent_streams: 256,
            h2_keepalive_interval: Some(Duration::from_secs(60)),
            h2_keepalive_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(300),
            max_requests_per_connection: 0,
            max_request_rate_per_connection: 0,
        }
    }
}

impl ServerLimits {
    /// A connection builder (HTTP/1.1 and h2c on one port) that enforces these limits.
    pub fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // The hard cap: twice the limit, so that heads between the two get the proxy's own
        // 431 with a reason (see `check_headers`) and nothing larger is ever buffered.
        let hard_cap = self.max_header_bytes.saturating_mul(2).max(8192);
        let mut h1 = builder.http1();
        h1.timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            // The read buffer bounds the request head: hyper answers 431 when a head does not
            // fit. It also caps how much of a body is read ahead, which flow control wants.
            .max_buf_size(hard_cap)
            // A client that shuts down its write side after the request still gets the
            // response; the connection closes once it is written.
            .half_close(true);
        if self.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            h1.max_headers(self.max_headers);
        }
        let mut h2 = builder.http2();
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(self.h2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(hard_cap).unwrap_or(u32::MAX))
            .keep_alive_interval(self.h2_keepalive_interval)
            .keep_alive_timeout(self.h2_keepalive_timeout);
        builder
    }
}

/// A request refused by a listener limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "request headers of {size} bytes exceed this listener's limit of {limit} bytes (--max-header-bytes)"
    )]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("{count} request headers exceed this listener's limit of {limit} (--max-headers)")]
    TooManyHeaders { count: usize, limit: usize },
    #[error(
        "more than {rate} requests per second on one connection (--max-request-rate-per-connection)"
    )]
    ConnectionRate { rate: u32 },
}

impl LimitError {
    pub fn reason(&self) -> &'static str {
        match self {
            LimitError::ConnectionRate { .. } => "connection_rate_limited",
            _ => "header_too_large",
        }
    }

    pub fn status(&self) -> http::StatusCode {
        match self {
            LimitError::ConnectionRate { .. } => http::StatusCode::TOO_MANY_REQUESTS,
            _ => http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }
}

/// A token bucket of one connection: `rate` requests per second, bursts of `rate`. Only the
/// connection's own requests touch it, so the lock is uncontended (and never held across an
/// await).
#[derive(Debug)]
pub struct RateBucket {
    rate: u32,
    state: std::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl RateBucket {
    pub fn new(rate: u32) -> Self {
        Self {
            rate,
            state: std::sync::Mutex::new((f64::from(rate), tokio::time::Instant::now())),
        }
    }

    /// Takes one token, or says the connection is over its rate.
    pub fn take(&self) -> Result<(), LimitError> {
        self.take_at(tokio::time::Instant::now())
    }

    fn take_at(&self, now: tokio::time::Instant) -> Result<(), LimitError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let rate = f64::from(self.rate);
        let refill = now.saturating_duration_since(state.1).as_secs_f64() * rate;
        *state = ((state.0 + refill).min(rate), now);
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            Ok(())
        } else {
            Err(LimitError::ConnectionRate { rate: self.rate })
        }
    }
}

/// The size of a request head as it would be written in HTTP/1.1, and the header count
/// checked against the limits. O(headers), no allocation.
pub fn check_headers<B>(req: &Request<B>, limits: &ServerLimits) -> Result<(), LimitError> {
    let headers = req.headers();
    if headers.len() > limits.max_headers {
        return Err(LimitError::TooManyHeaders {
            count: headers.len(),
            limit: limits.max_headers,
        });
    }
    let uri = req.uri();
    let mut size = req.method().as_str().len()
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len())
        + " HTTP/1.1\r\n".len()
        + 1;
    for (name, value) in headers {
        size += name.as_str().len() + value.len() + 4;
    }
    if size > limits.max_header_bytes {
        return Err(LimitError::HeadersTooLarge {
            size,
            limit: limits.max_header_bytes,
        });
    }
    Ok(())
}

/// `weft_proxy_listener_limits_total` of one listener, by limit. Handles share the atomics;
/// `Default` gives unregistered counters (for listeners nobody scrapes).
#[derive(Debug, Clone, Default)]
pub struct LimitCounters {
    pub max_connections: Counter,
    pub header_too_large: Counter,
    pub header_timeout: Counter,
    pub idle_timeout: Counter,
    pub max_requests: Counter,
    pub connection_rate: Counter,
    /// `weft_proxy_local_responses_total{reason="header_too_large"}` of the listener's direction.
    pub local_431: Counter,
    /// `weft_proxy_local_responses_total{reason="connection_rate_limited"}`.
    pub local_429: Counter,
}

/// One listener's limits, counters and open-connection count. Shared by its accept loop and
/// its connection tasks.
#[derive(Debug, Default)]
pub struct ListenerLimits {
    pub name: &'static str,
    pub limits: ServerLimits,
    pub conn: ConnCounters,
    pub counters: LimitCounters,
    open: AtomicUsize,
    /// Woken when the last connection closes (for the drain after shutdown).
    idle: Notify,
}

impl ListenerLimits {
    pub fn new(
        name: &'static str,
        limits: ServerLimits,
        conn: ConnCounters,
        counters: LimitCounters,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            limits,
            conn,
            counters,
            open: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Takes a connection slot for `stream`, or refuses it (503 and close, in the background)
    /// when the listener is full. The slot is given back when the returned [`Slot`] drops.
    pub fn admit(self: &Arc<Self>, stream: TcpStream) -> Option<(TcpStream, Slot)> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if self.limits.max_connections != 0 && before >= self.limits.max_connections {
            // Never was a connection of this listener: not counted as opened or closed.
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.counters.max_connections.inc();
            tracing::debug!(
                listener = self.name,
                open = before,
                "connection refused: listener full"
            );
            tokio::spawn(refuse(stream));
            return None;
        }
        self.conn.opened.inc();
        Some((stream, Slot(self.clone())))
    }

    /// Waits until every connection has closed, or `grace` has passed.
    pub async fn drain(&self, grace: Duration) {
        let open = self.open();
        if open > 0 {
            tracing::info!(
                listener = self.name,
                connections = open,
                "draining connections"
            );
        }
        let all_closed = async {
            loop {
                let closed = self.idle.notified();
                tokio::pin!(closed);
                closed.as_mut().enable();
                if self.open() == 0 {
                    return;
                }
                closed.await;
            }
        };
        if tokio::time::timeout(grace, all_closed).await.is_err() {
            tracing::warn!(listener = self.name, grace = ?grace, "grace period over, dropping the remaining connections");
        }
    }
}

/// A connection's place in its listener's count; dropping it counts the connection closed.
#[derive(Debug)]
pub struct Slot(Arc<ListenerLimits>);

impl Slot {
    pub fn listener(&self) -> &ListenerLimits {
        &self.0
    }

    pub fn shared(&self) -> &Arc<ListenerLimits> {
        &self.0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.conn.closed.inc();
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Answers 503 and closes without a reset, so the client reads the answer. A client that
/// opened with TLS (a peer sidecar, on the inbound listener) is sent nothing it would read as
/// a broken record: its connection just closes.
async fn refuse(stream: TcpStream) {
    const TLS_HANDSHAKE: u8 = 0x16;
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(REFUSAL_LINGER, stream.peek(&mut first)).await;
    if !matches!(peeked, Ok(Ok(1)) if first[0] == TLS_HANDSHAKE) {
        let _ = stream.try_write(REFUSAL);
    }
    crate::linger::linger(stream, REFUSAL_LINGER).await;
}

/// Pending connections the kernel queues for a listener before it drops SYNs. std's (and so
/// tokio's) 128 overflows under a burst of connects, and every dropped SYN costs the client a
/// one-second retransmission; Envoy and nginx use a larger queue for the same reason.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener with [`LISTEN_BACKLOG`] (the kernel caps it at `net.core.somaxconn`).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std does: a restarted proxy can bind while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises this process's soft limit on open files to its hard limit (as Envoy and linkerd do),
/// so the connection limits, not the default 1024 descriptors, are what bounds the listeners.
/// Returns the soft limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;

    #[test]
    fn head_size_counts_request_line_and_headers() {
        let limits = ServerLimits {
            max_header_bytes: 100,
            max_headers: 3,
            ..ServerLimits::default()
        };
        let small = Request::get("/a").header("host", "x").body(()).unwrap();
        assert_eq!(check_headers(&small, &limits), Ok(()));
        let big = Request::get("/a")
            .header("x-big", "v".repeat(100))
            .body(())
            .unwrap();
        let err = check_headers(&big, &limits).unwrap_err();
        assert!(matches!(
            err,
            LimitError::HeadersTooLarge { limit: 100, .. }
        ));
        assert!(err.to_string().contains("--max-header-bytes"), "{err}");
        let mut many = Request::get("/").body(()).unwrap();
        for i in 0..4 {
            many.headers_mut().insert(
                http::HeaderName::from_bytes(format!("h{i}").as_bytes()).unwrap(),
                "v".parse().unwrap(),
            );
        }
        assert!(matches!(
            check_headers(&many, &limits),
            Err(LimitError::TooManyHeaders { count: 4, limit: 3 })
        ));
    }

    #[test]
    fn the_rate_bucket_allows_a_burst_then_the_rate() {
        let bucket = RateBucket::new(2);
        let t0 = bucket.state.lock().unwrap().1;
        assert!(bucket.take_at(t0).is_ok() && bucket.take_at(t0).is_ok());
        let err = bucket.take_at(t0).unwrap_err();
        assert_eq!(err.status(), http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.reason(), "connection_rate_limited");
        assert!(
            err.to_string()
                .contains("--max-request-rate-per-connection")
        );
        let later = t0 + Duration::from_millis(500);
        assert!(bucket.take_at(later).is_ok());
        assert!(bucket.take_at(later).is_err());
    }

    #[tokio::test]
    async fn slots_count_open_connections_and_refuse_over_the_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ListenerLimits::new(
            "test",
            ServerLimits {
                max_connections: 1,
                ..ServerLimits::default()
            },
            ConnCounters::default(),
            LimitCounters::default(),
        );
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let first = limits.admit(listener.accept().await.unwrap().0);
        assert!(first.is_some());
        let mut c2 = TcpStream::connect(addr).await.unwrap();
        assert!(limits.admit(listener.accept().await.unwrap().0).is_none());
        let mut answer = Vec::new();
        c2.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("x-weft-reason: max_connections"));
        assert!(answer.ends_with("try again\n"));
        assert_eq!(limits.counters.max_connections.get(), 1);
        assert_eq!(limits.open(), 1);
        drop(first);
        assert_eq!(limits.open(), 0);
        limits.drain(Duration::from_secs(1)).await;
    }
}

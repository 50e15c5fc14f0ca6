//! One downstream connection under its listener's limits: serves it (the HTTP/1.1 fast path
//! of [`crate::h1_server`] first, hyper from the first request the fast path hands over),
//! refuses oversized request heads, closes it when it idles, when it has served its quota of
//! requests, or when the listener shuts down; counts why.
//!
//! Closing is graceful in every case but one: HTTP/1 finishes the response in progress and
//! then closes, HTTP/2 sends GOAWAY and lets open streams finish; either way the close itself
//! lingers ([`crate::linger`]). A connection that has not
//! sent a single request within the header read timeout (a silent socket, a slow h2c
//! preface) has nothing in flight and is dropped at once.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryFutureExt as _;
use futures_util::future::{self, Either as EitherFuture, MapOk, Ready};
use futures_util::task::AtomicWaker;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::DownstreamBody;
use crate::error::{ProxyError, is_grpc};
use crate::h1_server;
use crate::limits::{ListenerLimits, RateBucket, ServerLimits, Slot, check_headers};
use crate::linger::Lingering;
use crate::server::ShutdownSignal;

type BoxError = Box<dyn StdError + Send + Sync>;

/// What the service side of a connection tells its driver.
#[derive(Debug)]
pub struct ConnState {
    pub(crate) started: Instant,
    /// Milliseconds after `started` at which the last request arrived; `u64::MAX` = none yet.
    pub(crate) last_request_ms: AtomicU64,
    requests: AtomicU64,
    /// Notified when the connection has served `max_requests_per_connection`.
    quota_reached: Notify,
    /// With `max_request_rate_per_connection`.
    rate: Option<RateBucket>,
}

impl ConnState {
    fn new(limits: &ServerLimits) -> Self {
        let rate = limits.max_request_rate_per_connection;
        Self {
            started: Instant::now(),
            last_request_ms: AtomicU64::new(u64::MAX),
            requests: AtomicU64::new(0),
            quota_reached: Notify::new(),
            rate: (rate != 0).then(|| RateBucket::new(rate)),
        }
    }

    pub(crate) fn since_start_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }
}

/// The service of one connection: the listener's service behind the per-request limits.
#[derive(Debug, Clone)]
pub struct Limited<S> {
    inner: S,
    conn: Arc<ConnState>,
    listener: Arc<ListenerLimits>,
}

type MapResponse<B> = fn(Response<B>) -> Response<Either<B, crate::body::ProxyBody>>;

impl<S, B> Service<Request<DownstreamBody>> for Limited<S>
where
    S: Service<Request<DownstreamBody>, Response = Response<B>>,
{
    type Response = Response<Either<B, crate::body::ProxyBody>>;
    type Error = S::Error;
    type Future =
        EitherFuture<MapOk<S::Future, MapResponse<B>>, Ready<Result<Self::Response, Self::Error>>>;

    fn call(&self, req: Request<DownstreamBody>) -> Self::Future {
        let conn = &self.conn;
        conn.last_request_ms
            .store(conn.since_start_ms(), Ordering::Relaxed);
        let served = conn.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let limits = &self.listener.limits;
        let last =
            limits.max_requests_per_connection != 0 && served == limits.max_requests_per_connection;
        let h2 = req.version() >= http::Version::HTTP_2;
        if last {
            // Counted here, not when the driver acts: HTTP/1 closes on its own (the answer says
            // `connection: close`); HTTP/2 needs the driver's GOAWAY. (Asking hyper to close an
            // HTTP/1 connection would also add `close` to a 101, which a client cannot switch on.)
            self.listener.counters.max_requests.inc();
            if h2 {
                conn.quota_reached.notify_one();
            }
        }
        let checked = check_headers(&req, limits).inspect_err(|_| {
            self.listener.counters.header_too_large.inc();
            self.listener.counters.local_431.inc();
        });
        let checked = checked.and_then(|()| match &conn.rate {
            Some(bucket) => bucket.take().inspect_err(|_| {
                self.listener.counters.connection_rate.inc();
                self.listener.counters.local_429.inc();
            }),
            None => Ok(()),
        });
        if let Err(e) = checked {
            tracing::debug!(listener = self.listener.name, error = %e, "request refused");
            let grpc = is_grpc(req.headers());
            let resp = ProxyError::Limit(e).to_response(grpc, req.version());
            return EitherFuture::Right(future::ready(Ok(resp.map(Either::Right))));
        }
        // HTTP/1: the last response itself says close (the driver's graceful close may come
        // after it is written); HTTP/2 gets its GOAWAY from the driver.
        let map: MapResponse<B> = if last && !h2 {
            |resp| {
                let mut resp = resp.map(Either::Left);
                // A 101 hands the connection to the new protocol; its `connection: upgrade`
                // must stay for the client to switch.
                if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                resp
            }
        } else {
            |resp| resp.map(Either::Left)
        };
        EitherFuture::Left(self.inner.call(req).map_ok(map))
    }
}

/// The service as hyper calls it: its bodies are [`DownstreamBody::Hyper`].
struct ForHyper<S>(S);

impl<S: Service<Request<DownstreamBody>>> Service<Request<Incoming>> for ForHyper<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.0.call(req.map(DownstreamBody::Hyper))
    }
}

/// Why the driver stopped waiting on the connection's own end.
enum Close {
    Shutdown,
    Idle,
    Quota,
}

/// Serves `io` with `service` on `builder` until the connection ends, applying the limits of
/// the listener that `slot` belongs to. `signal` starts a graceful close (listener shutdown).
pub async fn serve<T, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: T,
    service: S,
    slot: Slot,
    mut signal: ShutdownSignal,
) -> Result<(), BoxError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<DownstreamBody>, Response = Response<B>> + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let shared = slot.shared().clone();
    let listener = &*shared;
    let limits = &listener.limits;
    let state = Arc::new(ConnState::new(limits));
    let service = Limited {
        inner: service,
        conn: state.clone(),
        listener: shared.clone(),
    };
    // Boxed once per connection: the fast path holds a request's future in place, and the
    // connection's future (moved at spawn, awaited by its callers) stays small.
    let io = match Box::pin(h1_server::serve(io, &service, &state, listener, &signal)).await {
        h1_server::Outcome::Closed(result) => return result,
        // The slot goes with the connection: into a lingering close, or an upgrade.
        h1_server::Outcome::Handover(io) => Lingering::new(io, slot),
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), ForHyper(service));
    tokio::pin!(conn);
    let (header_ms, idle_ms) = (
        millis(limits.header_read_timeout),
        millis(limits.idle_timeout),
    );
    let idle = tokio::time::sleep(Duration::from_millis(header_ms.min(idle_ms)));
    tokio::pin!(idle);
    // The watchers (shutdown, quota, idle timer) are polled only after one of them woke the
    // task; every other wakeup is the connection's I/O and polls the connection alone.
    let woken = Arc::new(Flag::default());
    let result = loop {
        let watchers = async {
            tokio::select! {
                biased;
                () = signal.wait() => Some(Close::Shutdown),
                () = state.quota_reached.notified() => Some(Close::Quota),
                () = idle.as_mut() => None,
            }
        };
        // New watchers: polled once, so that they register their wakers.
        woken.set.store(true, Ordering::Release);
        let woke = {
            // Pinned in this block: their borrow of `idle` ends before the arms reset it.
            let watchers = std::pin::pin!(watchers);
            first_of(conn.as_mut(), watchers, &woken).await
        };
        let close = match woke {
            EitherFuture::Left(result) => break result,
            EitherFuture::Right(Some(close)) => close,
            EitherFuture::Right(None) => {
                let last = state.last_request_ms.load(Ordering::Relaxed);
                let due = if last == u64::MAX {
                    header_ms
                } else {
                    last.saturating_add(idle_ms)
                };
                let now = state.since_start_ms();
                if now < due {
                    idle.as_mut()
                        .reset(Instant::now() + Duration::from_millis(due - now));
                    continue;
                }
                if last == u64::MAX {
                    // Not one request within the header read timeout: nothing is in flight.
                    listener.counters.header_timeout.inc();
                    break Ok(());
                }
                Close::Idle
            }
        };
        match close {
            Close::Shutdown => {}
            Close::Idle => {
                listener.counters.idle_timeout.inc();
            }
            Close::Quota => {}
        }
        conn.as_mut().graceful_shutdown();
        break conn.await;
    };
    if let Err(e) = &result
        && let Some(e) = e.downcast_ref::<hyper::Error>()
    {
        if e.is_timeout() {
            listener.counters.header_timeout.inc();
        } else if e.is_parse_too_large() {
            listener.counters.header_too_large.inc();
        }
    }
    result
}

/// Set by the watchers' waker: something other than the connection's I/O woke the task.
#[derive(Debug, Default)]
pub(crate) struct Flag {
    pub(crate) set: AtomicBool,
    pub(crate) task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.set.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Resolves with `main`'s output, or `watchers`' when they finish first; `watchers` is
/// polled only when its own waker fired since it was last polled. The caller sets the flag
/// when `watchers` is new, so that it is polled once and registers its wakers; watchers that
/// outlive one call (the HTTP/1.1 fast path keeps its own for the connection) are not.
pub(crate) async fn first_of<A: Future, B: Future>(
    main: A,
    mut watchers: Pin<&mut B>,
    flag: &Arc<Flag>,
) -> EitherFuture<A::Output, B::Output> {
    let waker = Waker::from(flag.clone());
    let mut main = std::pin::pin!(main);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = main.as_mut().poll(cx) {
            return Poll::Ready(EitherFuture::Left(out));
        }
        flag.task.register(cx.waker());
        if flag.set.swap(false, Ordering::AcqRel)
            && let Poll::Ready(out) = watchers.as_mut().poll(&mut Context::from_waker(&waker))
        {
            return Poll::Ready(EitherFuture::Right(out));
        }
        Poll::Pending
    })
    .await
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_are_polled_only_after_they_woke_the_task() {
        let flag = Arc::new(Flag::default());
        let polls = Arc::new(AtomicU64::new(0));
        let notify = Arc::new(Notify::new());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        // The connection stand-in: woken by 100 messages, never finishing on its own.
        let main = async move {
            while rx.recv().await.is_some() {}
            std::future::pending::<()>().await;
        };
        let (p, n) = (polls.clone(), notify.clone());
        let watchers = async move {
            let mut notified = std::pin::pin!(n.notified());
            std::future::poll_fn(|cx| {
                p.fetch_add(1, Ordering::Relaxed);
                notified.as_mut().poll(cx)
            })
            .await;
            "watcher"
        };
        let driver = tokio::spawn({
            let flag = flag.clone();
            async move {
                flag.set.store(true, Ordering::Release);
                first_of(main, std::pin::pin!(watchers), &flag).await
            }
        });
        for _ in 0..100 {
            tx.send(()).unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(
            polls.load(Ordering::Relaxed),
            1,
            "polled on the connection's wakeups"
        );
        notify.notify_one();
        let out = tokio::time::timeout(Duration::from_secs(5), driver)
            .await
            .expect("the watcher's wakeup was heard")
            .unwrap();
        assert!(matches!(out, EitherFuture::Right("watcher")));
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}

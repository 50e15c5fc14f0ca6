//! A controllable upstream for resilience tests: fails the first N requests with a status,
//! answers every request with a status, adds latency, hangs, reports health on `/healthz`,
//! counts requests (total and in flight) and records request bodies. Every knob can be turned
//! while traffic flows.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How long a "hanging" request hangs (longer than any test waits for it).
const HANG: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct ChaosState {
    hits: AtomicU64,
    active: AtomicU64,
    fail_first: AtomicU64,
    fail_status: AtomicU16,
    always_status: AtomicU16,
    latency_ms: AtomicU64,
    hang: AtomicBool,
    unhealthy: AtomicBool,
    retry_after: AtomicU64,
    bodies: Mutex<Vec<Bytes>>,
}

pub struct ChaosApp {
    pub addr: SocketAddr,
    pub name: String,
    state: Arc<ChaosState>,
    task: JoinHandle<()>,
}

struct Active<'a>(&'a AtomicU64);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

async fn handle(
    name: Arc<str>,
    state: Arc<ChaosState>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/healthz" {
        let status = if state.unhealthy.load(Relaxed) {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        return Response::builder()
            .status(status)
            .body(Full::new(Bytes::new()))
            .expect("response");
    }
    state.hits.fetch_add(1, Relaxed);
    state.active.fetch_add(1, Relaxed);
    let _active = Active(&state.active);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    state.bodies.lock().expect("bodies").push(body);
    let latency = state.latency_ms.load(Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if state.hang.load(Relaxed) {
        tokio::time::sleep(HANG).await;
    }
    let failing = state
        .fail_first
        .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
        .is_ok();
    let status = if failing {
        state.fail_status.load(Relaxed)
    } else {
        match state.always_status.load(Relaxed) {
            0 => 200,
            s => s,
        }
    };
    let mut resp = Response::builder()
        .status(status)
        .header("x-app-version", &*name);
    let retry_after = state.retry_after.load(Relaxed);
    if status >= 500 && retry_after > 0 {
        resp = resp.header("retry-after", retry_after.to_string());
    }
    resp.body(Full::new(Bytes::from(format!("{name} {status}\n"))))
        .expect("response")
}

impl ChaosApp {
    pub async fn start(name: &str) -> ChaosApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("app addr");
        let state = Arc::new(ChaosState::default());
        state.fail_status.store(503, Relaxed);
        let (name_arc, state2): (Arc<str>, _) = (Arc::from(name), state.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (name, state) = (name_arc.clone(), state2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (name, state) = (name.clone(), state.clone());
                        async move { Ok::<_, Infallible>(handle(name, state, req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        ChaosApp {
            addr,
            name: name.to_owned(),
            state,
            task,
        }
    }

    /// The next `n` requests answer `status`.
    pub fn fail_first(&self, n: u64, status: u16) {
        self.state.fail_status.store(status, Relaxed);
        self.state.fail_first.store(n, Relaxed);
    }

    /// Every request answers `status` (`None`: 200).
    pub fn always(&self, status: Option<u16>) {
        self.state.always_status.store(status.unwrap_or(0), Relaxed);
    }

    pub fn latency(&self, latency: Duration) {
        self.state
            .latency_ms
            .store(latency.as_millis() as u64, Relaxed);
    }

    pub fn hang(&self, hang: bool) {
        self.state.hang.store(hang, Relaxed);
    }

    /// What `/healthz` says.
    pub fn healthy(&self, healthy: bool) {
        self.state.unhealthy.store(!healthy, Relaxed);
    }

    /// Failures carry `Retry-After: secs` (0: none).
    pub fn retry_after(&self, secs: u64) {
        self.state.retry_after.store(secs, Relaxed);
    }

    /// Requests seen (not counting `/healthz`).
    pub fn hits(&self) -> u64 {
        self.state.hits.load(Relaxed)
    }

    /// Requests being served right now.
    pub fn active(&self) -> u64 {
        self.state.active.load(Relaxed)
    }

    /// Bodies of the requests seen, in arrival order; clears the record.
    pub fn take_bodies(&self) -> Vec<Bytes> {
        std::mem::take(&mut *self.state.bodies.lock().expect("bodies"))
    }
}

impl Drop for ChaosApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

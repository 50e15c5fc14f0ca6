//! Tools of the chaos suite (`tests/tests/chaos.rs`): a bounded client load that counts
//! requests sent, failed (an HTTP answer other than 200) and lost (no answer at all), an
//! upstream app that can be killed with its open connections, and the result table.
//!
//! The load behaves like a well-behaved client in front of a rolling restart: every request
//! uses a fresh connection to the next proxy of its list, and a request that never reached a
//! proxy — connect refused, or the connection closed before one byte of answer, which is what
//! a draining listener does to connections still in its backlog — is sent again to the next
//! proxy (only GETs are sent, so that is safe). Anything else counts as it came out.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What one scenario's load saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub sent: u64,
    pub failed: u64,
    pub lost: u64,
    /// Requests re-sent to the next proxy because the first never reached one.
    pub resent: u64,
    pub reasons: Vec<String>,
}

impl Tally {
    fn note(&mut self, reason: String) {
        if self.reasons.len() < 5 {
            self.reasons.push(reason);
        }
    }
}

/// Running load; [`Traffic::stop`] ends it.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    targets: Arc<Mutex<Vec<SocketAddr>>>,
    tasks: Vec<JoinHandle<Tally>>,
}

/// How one attempt ended.
enum Attempt {
    Answer(u16, String),
    /// Never reached a proxy: safe to send again elsewhere.
    NotDelivered(String),
    Lost(String),
}

async fn once(target: SocketAddr, host: &str) -> Attempt {
    let stream = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => return Attempt::NotDelivered(format!("connect {target}: {e}")),
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
    else {
        return Attempt::NotDelivered(format!("handshake {target}"));
    };
    let driver = tokio::spawn(conn);
    let req = Request::get("/")
        .header(http::header::HOST, host)
        .body(Empty::new())
        .expect("request");
    let result = match tokio::time::timeout(Duration::from_secs(5), sender.send_request(req)).await
    {
        Err(_) => Attempt::Lost(format!("{target}: no answer in 5 s")),
        // hyper reports a connection closed before any answer byte as "incomplete message".
        Ok(Err(e)) if e.is_incomplete_message() || e.is_canceled() => {
            Attempt::NotDelivered(format!("{target}: closed before answering: {e}"))
        }
        Ok(Err(e)) => {
            // hyper's own text ("connection error") hides which: a reset, a refusal, a timeout.
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            Attempt::Lost(format!("{target}: {e}: {}", cause.unwrap_or_default()))
        }
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let reason = resp
                .headers()
                .get("x-weft-reason")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            match resp.into_body().collect().await {
                Ok(_) => Attempt::Answer(status, reason),
                Err(e) => Attempt::Lost(format!("{target}: body cut: {e}")),
            }
        }
    };
    driver.abort();
    result
}

impl Traffic {
    /// `workers` loops sending GET `host` round-robin over `targets`, each at most `max`
    /// requests and `limit` in time, pausing `pause` between requests.
    pub fn start(
        targets: Vec<SocketAddr>,
        host: &str,
        workers: usize,
        pause: Duration,
        max: u64,
        limit: Duration,
    ) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let targets = Arc::new(Mutex::new(targets));
        let next = Arc::new(AtomicU64::new(0));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, targets, next, host) =
                    (stop.clone(), targets.clone(), next.clone(), host.to_owned());
                tokio::spawn(async move {
                    let started = Instant::now();
                    let mut t = Tally::default();
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < limit && t.sent < max
                    {
                        t.sent += 1;
                        let list = targets.lock().unwrap().clone();
                        let first = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let mut outcome = Attempt::Lost("no proxy to send to".into());
                        // Each proxy once, then the list again after a pause (all down at once).
                        for i in 0..list.len() * 3 {
                            outcome = once(list[(first + i) % list.len()], &host).await;
                            match outcome {
                                Attempt::NotDelivered(_) => {
                                    t.resent += 1;
                                    if (i + 1) % list.len() == 0 {
                                        tokio::time::sleep(Duration::from_millis(50)).await;
                                    }
                                }
                                _ => break,
                            }
                        }
                        match outcome {
                            Attempt::Answer(200, _) => {}
                            Attempt::Answer(code, reason) => {
                                t.failed += 1;
                                t.note(format!("{code} {reason}"));
                            }
                            Attempt::NotDelivered(e) | Attempt::Lost(e) => {
                                t.lost += 1;
                                t.note(e);
                            }
                        }
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                    t
                })
            })
            .collect();
        Traffic {
            stop,
            targets,
            tasks,
        }
    }

    /// Replaces the proxies the load goes to (e.g. a restarted one on new ports).
    pub fn set_targets(&self, targets: Vec<SocketAddr>) {
        *self.targets.lock().unwrap() = targets;
    }

    pub async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        for task in self.tasks {
            let t = task.await.expect("load worker");
            total.sent += t.sent;
            total.failed += t.failed;
            total.lost += t.lost;
            total.resent += t.resent;
            for r in t.reasons {
                total.note(r);
            }
        }
        total
    }
}

/// An HTTP app (answers 200 `ok`) whose [`KillableApp::kill`] closes its listener and every
/// open connection, as a crashed process would.
pub struct KillableApp {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl KillableApp {
    pub async fn start() -> KillableApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("app addr");
        let task = tokio::spawn(async move {
            // Connections live in the set, so aborting this task drops them all.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        conns.spawn(async move {
                            let svc = service_fn(|_req: Request<Incoming>| async {
                                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        KillableApp { addr, task }
    }

    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for KillableApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub tally: Tally,
    /// The most failed + lost requests the scenario allows.
    pub allowed: u64,
}

/// The table the suite prints: scenario, sent, failed, lost, re-sent, allowed, verdict.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<48} {:>7} {:>7} {:>7} {:>7} {:>8}  {}\n",
        "scenario", "sent", "failed", "lost", "re-sent", "allowed", "verdict"
    );
    for r in rows {
        let t = &r.tally;
        let ok = t.failed + t.lost <= r.allowed;
        out.push_str(&format!(
            "{:<48} {:>7} {:>7} {:>7} {:>7} {:>8}  {}\n",
            r.scenario,
            t.sent,
            t.failed,
            t.lost,
            t.resent,
            r.allowed,
            if ok { "ok" } else { "FAIL" }
        ));
    }
    out
}

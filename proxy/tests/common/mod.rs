//! Helpers shared by the integration tests: scratch dirs, the proxy process, a loopback echo
//! upstream and a one-shot HTTP/1.1 or h2c client.

// Each test crate uses a different subset of these.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

pub const DEADLINE: Duration = Duration::from_secs(15);

/// A scratch directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-proxy-cli-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The proxy process; killed when the test ends, however it ends.
pub struct ProxyProcess(pub Child);

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn proxy_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft-proxy"))
}

/// Polls `check` until it returns `Some`, or panics after [`DEADLINE`].
pub async fn poll<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An upstream that answers `<version> <method> <path> host=<host> body=<body>`, and adds a
/// `grpc-status: 0` trailer when asked with `x-want-trailers`.
pub async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let host = req
                        .headers()
                        .get("host")
                        .map(|h| h.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    let head = format!(
                        "{:?} {} {} host={host}",
                        req.version(),
                        req.method(),
                        req.uri().path()
                    );
                    let trailers = req.headers().contains_key("x-want-trailers");
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let text = format!("{head} body={}", String::from_utf8_lossy(&body));
                    let body = Full::new(Bytes::from(text)).with_trailers(async move {
                        trailers.then(|| {
                            let mut t = HeaderMap::new();
                            t.insert("grpc-status", "0".parse().unwrap());
                            Ok::<_, Infallible>(t)
                        })
                    });
                    Ok::<_, Infallible>(Response::new(body))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
    pub trailers: Option<HeaderMap>,
}

/// Sends one request on a fresh connection to `addr`, in HTTP/1.1 or h2c.
pub async fn send(addr: SocketAddr, version: Version, req: Request<Full<Bytes>>) -> Reply {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let resp = if version == Version::HTTP_2 {
        let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        tx.send_request(req).await.unwrap()
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        tx.send_request(req).await.unwrap()
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Reply {
        status,
        headers,
        body: String::from_utf8(collected.to_bytes().to_vec()).unwrap(),
        trailers,
    }
}

pub fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", host)
        .body(Full::default())
        .unwrap()
}

/// Polls the address file the proxy writes, then `/ready`; returns `(outbound, admin)`.
pub async fn wait_for_addrs(addr_file: &std::path::Path) -> serde_json::Value {
    poll("the address file", async || {
        let text = std::fs::read_to_string(addr_file).ok()?;
        serde_json::from_str(&text).ok()
    })
    .await
}

pub fn addr(v: &serde_json::Value, key: &str) -> SocketAddr {
    v[key].as_str().unwrap().parse().unwrap()
}

pub async fn admin_get(admin: SocketAddr, path: &str) -> Reply {
    send(admin, Version::HTTP_11, get("admin", path)).await
}

/// A proxy started on `config` (YAML written to a scratch dir) with loopback port-0 listeners
/// (outbound, inbound, admin) and `extra` flags; returned once `/ready` answers 200.
pub struct Proxy {
    pub process: ProxyProcess,
    pub dir: TempDir,
    pub outbound: SocketAddr,
    /// Only with `--app-addr` among the flags.
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
}

pub async fn start_proxy(config: &str, extra: &[&str]) -> Proxy {
    let dir = TempDir::new();
    let config_path = dir.path("mesh.yaml");
    std::fs::write(&config_path, config).unwrap();
    let addr_file = dir.path("addrs.json");
    let mut args = vec![
        "--config",
        config_path.to_str().unwrap(),
        "--outbound-addr",
        "127.0.0.1:0",
        "--inbound-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--addr-file",
        addr_file.to_str().unwrap(),
        "--log",
        "warn",
    ];
    args.extend_from_slice(extra);
    let process = spawn_proxy(&args);
    let addrs = wait_for_addrs(&addr_file).await;
    let admin = addr(&addrs, "admin");
    poll("/ready", async || {
        (admin_get(admin, "/ready").await.status == StatusCode::OK).then_some(())
    })
    .await;
    Proxy {
        process,
        dir,
        outbound: addr(&addrs, "outbound"),
        inbound: addrs["inbound"].as_str().and_then(|a| a.parse().ok()),
        admin,
    }
}

pub fn spawn_proxy(args: &[&str]) -> ProxyProcess {
    let child = proxy_command()
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    ProxyProcess(child)
}

/// A fuzz run's setting from the environment (`WEFT_FUZZ_ITERS`, `WEFT_FUZZ_SEED`), else
/// `default`: CI runs the defaults, a longer hunt sets them.
pub fn fuzz_setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

//! The HTTP/1.1 upstream pool, seen from a scripted upstream that counts its connections:
//! keep-alive reuse (fixed-length, chunked, empty and HEAD responses), no reuse of a connection
//! whose response was abandoned or that the upstream closes, idle connections closed after the
//! service's idle timeout, and requests in parallel each getting their own connection.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Connections the upstream accepted and saw closed.
#[derive(Default)]
struct Counts {
    opened: AtomicUsize,
    closed: AtomicUsize,
}

impl Counts {
    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }
    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A raw HTTP/1.1 upstream (GET/HEAD, no request bodies) that answers by path:
/// `/fixed` 2 bytes with content-length, `/chunked` chunked, `/empty` 204, `/close`
/// `connection: close` then closes, `/big` 4 MiB, `/slow` 1 s late.
async fn scripted_upstream() -> (SocketAddr, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            c.opened.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let _ = serve(stream).await;
                c.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        // One request head at a time (the proxy never pipelines).
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        let mut line = head.split_whitespace();
        let method = line.next().unwrap_or_default().to_owned();
        let path = line.next().unwrap_or_default().to_owned();
        let body = |b: &str| {
            if method == "HEAD" {
                String::new()
            } else {
                b.to_owned()
            }
        };
        match path.as_str() {
            "/fixed" => {
                let r = format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", body("ok"));
                stream.write_all(r.as_bytes()).await?;
            }
            "/chunked" => {
                let r = format!(
                    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{}",
                    body("2\r\nok\r\n0\r\n\r\n")
                );
                stream.write_all(r.as_bytes()).await?;
            }
            "/empty" => stream.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await?,
            "/close" => {
                stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                    )
                    .await?;
                return Ok(());
            }
            "/big" => {
                let size = 4 << 20;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
                stream.write_all(head.as_bytes()).await?;
                let chunk = vec![b'x'; 64 << 10];
                for _ in 0..size / chunk.len() {
                    stream.write_all(&chunk).await?;
                }
            }
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
                    .await?;
            }
            _ => {
                stream
                    .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    .await?
            }
        }
    }
}

struct Running {
    _proxy: ProxyProcess,
    _dir: TempDir,
    outbound: SocketAddr,
}

async fn start(upstream: SocketAddr, idle_timeout: &str) -> Running {
    let dir = TempDir::new();
    let config = dir.path("mesh.yaml");
    std::fs::write(
        &config,
        format!(
            "services:\n  - {{name: up, protocol: http1, endpoints: [{{address: \"{upstream}\"}}], \
             policy: {{idle_timeout: {idle_timeout}}}}}\n\
             routes:\n  - {{name: up, hosts: [up.local], rules: [{{backends: [{{service: up}}]}}]}}\n"
        ),
    )
    .unwrap();
    let addr_file = dir.path("addrs.json");
    let proxy = spawn_proxy(&[
        "--config",
        config.to_str().unwrap(),
        "--outbound-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--addr-file",
        addr_file.to_str().unwrap(),
        "--log",
        "warn",
    ]);
    let addrs = wait_for_addrs(&addr_file).await;
    let admin = addr(&addrs, "admin");
    poll("/ready", async || {
        (admin_get(admin, "/ready").await.status == StatusCode::OK).then_some(())
    })
    .await;
    Running {
        _proxy: proxy,
        _dir: dir,
        outbound: addr(&addrs, "outbound"),
    }
}

/// One keep-alive client connection to the proxy.
struct Client(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl Client {
    async fn connect(proxy: SocketAddr) -> Self {
        let io = TokioIo::new(TcpStream::connect(proxy).await.unwrap());
        let (tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        Self(tx)
    }

    async fn call(&mut self, method: Method, path: &str) -> (StatusCode, String) {
        self.0.ready().await.unwrap();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "up.local")
            .body(Full::default())
            .unwrap();
        let resp = tokio::time::timeout(DEADLINE, self.0.send_request(req))
            .await
            .expect("the proxy answered")
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

#[tokio::test]
async fn one_upstream_connection_serves_every_kind_of_keep_alive_response() {
    let (up, counts) = scripted_upstream().await;
    let p = start(up, "1m").await;
    let mut c = Client::connect(p.outbound).await;
    for _ in 0..5 {
        for (method, path, status, body) in [
            (Method::GET, "/fixed", StatusCode::OK, "ok"),
            (Method::GET, "/chunked", StatusCode::OK, "ok"),
            (Method::GET, "/empty", StatusCode::NO_CONTENT, ""),
            (Method::HEAD, "/fixed", StatusCode::OK, ""),
            (Method::HEAD, "/chunked", StatusCode::OK, ""),
            (Method::GET, "/nothing", StatusCode::NOT_FOUND, ""),
        ] {
            assert_eq!(
                c.call(method.clone(), path).await,
                (status, body.into()),
                "{method} {path}"
            );
        }
    }
    assert_eq!(
        counts.opened(),
        1,
        "30 sequential requests, one upstream connection"
    );
    assert_eq!(counts.closed(), 0);
}

#[tokio::test]
async fn connections_the_upstream_closes_or_the_client_abandons_are_not_reused() {
    let (up, counts) = scripted_upstream().await;
    let p = start(up, "1m").await;
    let mut c = Client::connect(p.outbound).await;

    // `connection: close`: every request after it needs (and gets) a new connection.
    for i in 1..=3 {
        assert_eq!(
            c.call(Method::GET, "/close").await,
            (StatusCode::OK, "ok".into())
        );
        assert_eq!(
            c.call(Method::GET, "/fixed").await,
            (StatusCode::OK, "ok".into())
        );
        assert_eq!(counts.opened(), i + 1, "after {i} close responses");
    }
    // The last /fixed connection is pooled: the next request takes it.
    let before = counts.opened();
    assert_eq!(c.call(Method::GET, "/fixed").await.0, StatusCode::OK);
    assert_eq!(counts.opened(), before);

    // A client that leaves in the middle of a 4 MiB body: the upstream connection still has
    // bytes in flight, so it must be closed, never handed to the next request.
    let mut raw = TcpStream::connect(p.outbound).await.unwrap();
    raw.write_all(b"GET /big HTTP/1.1\r\nhost: up.local\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1024];
    let n = raw.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(raw);
    let closed_before = counts.closed();
    poll("the abandoned upstream connection closed", async || {
        (counts.closed() > closed_before).then_some(())
    })
    .await;
    // And the pool still serves: from the idle connection, not the abandoned one.
    for _ in 0..3 {
        assert_eq!(
            c.call(Method::GET, "/chunked").await,
            (StatusCode::OK, "ok".into())
        );
    }
    // The abandoned request took the idle connection; one fresh connection serves the rest.
    assert_eq!(counts.opened(), before + 1);
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout() {
    let (up, counts) = scripted_upstream().await;
    let p = start(up, "300ms").await;
    let mut c = Client::connect(p.outbound).await;
    assert_eq!(c.call(Method::GET, "/fixed").await.0, StatusCode::OK);
    let idle_since = Instant::now();
    poll("the idle upstream connection closed", async || {
        (counts.closed() == 1).then_some(())
    })
    .await;
    let after = idle_since.elapsed();
    // Between 1× and 1.25× the timeout (sweeps every quarter), plus scheduling slack.
    assert!(
        after >= Duration::from_millis(290) && after < Duration::from_secs(3),
        "closed after {after:?}"
    );
    // The next request opens a fresh one and is served.
    assert_eq!(c.call(Method::GET, "/fixed").await.0, StatusCode::OK);
    assert_eq!(counts.opened(), 2);
}

#[tokio::test]
async fn requests_in_parallel_each_get_a_connection_and_then_share_them() {
    let (up, counts) = scripted_upstream().await;
    let p = start(up, "1m").await;
    // Four clients wait on /slow at the same time: four upstream connections.
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let proxy = p.outbound;
            tokio::spawn(async move {
                let mut c = Client::connect(proxy).await;
                c.call(Method::GET, "/slow").await
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), (StatusCode::OK, "slow".into()));
    }
    assert_eq!(counts.opened(), 4);
    // Afterwards sequential requests reuse those four: no new connection.
    for _ in 0..20 {
        let reply = send(p.outbound, Version::HTTP_11, get("up.local", "/fixed")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(counts.opened(), 4);
}

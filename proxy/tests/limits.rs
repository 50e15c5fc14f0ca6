//! Hostile downstream clients against a real `weft-proxy` process on loopback: 10,000 idle
//! connections, a slowloris, oversized headers, half-closed connections, a full listener,
//! idle, per-connection quota and request rate. Each test checks that a normal client is still served and
//! that the proxy counts what it refused in `/metrics`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a normal client waits for its answer while the proxy is under attack.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// A proxy routing `echo.local` to a local echo upstream (also its app), with `extra` flags.
async fn start(extra: &[&str]) -> Proxy {
    let echo = start_echo().await;
    let config = format!(
        "services:\n  - {{name: echo, endpoints: [{{address: \"{echo}\"}}]}}\n\
         routes:\n  - {{name: echo, hosts: [echo.local], rules: [{{backends: [{{service: echo}}]}}]}}\n"
    );
    let echo = echo.to_string();
    let mut args = vec!["--app-addr", echo.as_str()];
    args.extend_from_slice(extra);
    start_proxy(&config, &args).await
}

/// One series of the proxy's `/metrics`, e.g. `weft_proxy_listener_limits_total{...}`.
async fn metric(admin: SocketAddr, series: &str) -> u64 {
    let text = admin_get(admin, "/metrics").await.body;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn limit_series(listener: &str, limit: &str) -> String {
    format!("weft_proxy_listener_limits_total{{listener=\"{listener}\",limit=\"{limit}\"}}")
}

fn conn_series(name: &str, listener: &str) -> String {
    format!("weft_proxy_tcp_{name}_total{{listener=\"{listener}\"}}")
}

/// A normal client: one GET on a fresh connection, which must succeed within its timeout.
async fn normal_get(addr: SocketAddr, version: Version) -> Duration {
    let start = Instant::now();
    let reply = tokio::time::timeout(
        CLIENT_TIMEOUT,
        send(addr, version, get("echo.local", "/ok")),
    )
    .await
    .expect("a normal client was not served within its timeout");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(reply.body.contains("GET /ok"), "{}", reply.body);
    start.elapsed()
}

/// Writes `request` on a fresh connection (then half-closes when asked) and reads until the
/// proxy closes, within a deadline.
async fn raw(addr: SocketAddr, request: &[u8], half_close: bool) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("the proxy did not close the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Raises this process's open-files limit so it can hold `n` connections (the proxy, a child,
/// inherits it and raises its own soft limit to the hard one).
fn allow_open_files(n: u64) {
    let soft = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    if soft < n {
        // Root may raise the hard limit too (CI runs as root).
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, n, n);
    }
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    assert!(
        soft >= n,
        "this test needs {n} open files; the limit is {soft} (hard {hard}): raise it with ulimit -n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_do_not_stop_a_normal_client() {
    const IDLE: usize = 10_000;
    allow_open_files(IDLE as u64 + 1_000);
    let p = start(&[]).await;

    let started = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    // Connect in bounded waves: the listen backlog is finite and so is the test's patience.
    for _ in 0..IDLE / 250 {
        let wave: Vec<_> = (0..250)
            .map(|_| tokio::spawn(TcpStream::connect(p.outbound)))
            .collect();
        for c in wave {
            let c = c.await.unwrap().expect("connect an idle client");
            // Closed with a reset: 10,000 sockets in TIME_WAIT would starve the next run of
            // ephemeral ports.
            c.set_zero_linger().unwrap();
            idle.push(c);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "connecting took too long: {} connected after {:?}",
            idle.len(),
            started.elapsed()
        );
    }
    let opened = conn_series("connections_opened", "outbound");
    poll("the proxy to accept every idle connection", async || {
        (metric(p.admin, &opened).await >= IDLE as u64).then_some(())
    })
    .await;
    println!("{IDLE} idle connections open after {:?}", started.elapsed());

    // Served while all of them are held, over HTTP/1.1 and h2c.
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let version = if i % 2 == 0 {
            Version::HTTP_11
        } else {
            Version::HTTP_2
        };
        slowest = slowest.max(normal_get(p.outbound, version).await);
    }
    println!("slowest normal request with {IDLE} idle connections: {slowest:?}");

    // Once they leave, the proxy's count of open connections returns to zero.
    drop(idle);
    let closed = conn_series("connections_closed", "outbound");
    poll("every idle connection to be cleaned up", async || {
        let (o, c) = (
            metric(p.admin, &opened).await,
            metric(p.admin, &closed).await,
        );
        (o == c).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_is_closed_after_the_header_timeout_and_others_are_served() {
    let p = start(&["--header-read-timeout", "1s"]).await;

    // Slowloris: the request head one byte at a time, 100 ms apart, never finished.
    let mut slow = TcpStream::connect(p.outbound).await.unwrap();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        let head = b"GET /slow HTTP/1.1\r\nhost: echo.local\r\nx-slow: ".iter();
        for byte in head.chain(std::iter::repeat(&b'a')).take(400) {
            if slow.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The proxy must have closed it: the read end sees EOF (or a reset).
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await;
        assert!(
            matches!(n, Ok(Ok(0)) | Ok(Err(_))),
            "slowloris connection still open: {n:?}"
        );
        started.elapsed()
    });
    // A silent connection (not one byte: the protocol is never even detected).
    let mut silent = TcpStream::connect(p.outbound).await.unwrap();

    // Meanwhile normal clients are served.
    for _ in 0..5 {
        normal_get(p.outbound, Version::HTTP_11).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("a silent connection outlived the header timeout");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));

    let closed_after = tokio::time::timeout(Duration::from_secs(10), trickle)
        .await
        .expect("slowloris task")
        .unwrap();
    // It kept sending, so only the header timeout can have closed it: after 1 s, well
    // before the 40 s it would take to finish trickling.
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(6),
        "slowloris closed after {closed_after:?}"
    );
    let timeouts = metric(p.admin, &limit_series("outbound", "header_timeout")).await;
    assert!(timeouts >= 2, "header timeouts counted: {timeouts}");
    normal_get(p.outbound, Version::HTTP_2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_with_the_reason() {
    let p = start(&["--max-header-bytes", "8192", "--max-headers", "50"]).await;
    let big = || {
        Request::get("/big")
            .header("host", "echo.local")
            .header("x-big", "b".repeat(12 << 10))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    for (addr, version) in [
        (p.outbound, Version::HTTP_11),
        (p.outbound, Version::HTTP_2),
        (p.inbound.unwrap(), Version::HTTP_11),
    ] {
        let reply = send(addr, version, big()).await;
        assert_eq!(
            reply.status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "{version:?}"
        );
        assert_eq!(reply.headers["x-weft-reason"], "header_too_large");
        assert!(
            reply.body.starts_with("weft-proxy: request headers of "),
            "{}",
            reply.body
        );
        assert!(
            reply
                .body
                .contains("limit of 8192 bytes (--max-header-bytes)"),
            "{}",
            reply.body
        );
    }
    // Too many headers: the same answer.
    let mut many = get("echo.local", "/many");
    for i in 0..60 {
        many.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
            "v".parse().unwrap(),
        );
    }
    let reply = send(p.outbound, Version::HTTP_2, many).await;
    assert_eq!(reply.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(reply.body.contains("(--max-headers)"), "{}", reply.body);

    // Beyond twice the limit the parser refuses before any request exists: a bare 431.
    let huge = format!(
        "GET / HTTP/1.1\r\nhost: echo.local\r\nx-huge: {}\r\n\r\n",
        "h".repeat(64 << 10)
    );
    let answer = raw(p.outbound, huge.as_bytes(), false).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");

    let counted = metric(p.admin, &limit_series("outbound", "header_too_large")).await;
    assert!(counted >= 4, "header_too_large counted {counted}");
    let local = metric(
        p.admin,
        "weft_proxy_local_responses_total{direction=\"inbound\",reason=\"header_too_large\"}",
    )
    .await;
    assert_eq!(local, 1);
    normal_get(p.outbound, Version::HTTP_11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_connections_get_their_response_then_close() {
    let p = start(&[]).await;
    for addr in [p.outbound, p.inbound.unwrap()] {
        let answer = raw(
            addr,
            b"GET /half HTTP/1.1\r\nhost: echo.local\r\n\r\n",
            true,
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.contains("GET /half"), "{answer}");
    }
    // Cleaned up on the proxy's side too, and the inbound listener counts its connections
    // and bytes like the outbound one.
    for listener in ["outbound", "inbound"] {
        let (opened, closed) = (
            conn_series("connections_opened", listener),
            conn_series("connections_closed", listener),
        );
        poll("half-closed connections to be closed", async || {
            let o = metric(p.admin, &opened).await;
            (o >= 1 && o == metric(p.admin, &closed).await).then_some(())
        })
        .await;
        assert!(metric(p.admin, &conn_series("received_bytes", listener)).await > 30);
        assert!(metric(p.admin, &conn_series("sent_bytes", listener)).await > 30);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_refuses_clearly_and_serves_again_once_others_leave() {
    let p = start(&["--max-connections", "3"]).await;
    let opened = conn_series("connections_opened", "outbound");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(p.outbound).await.unwrap());
    }
    poll("three accepted connections", async || {
        (metric(p.admin, &opened).await == 3).then_some(())
    })
    .await;
    let answer = raw(
        p.outbound,
        b"GET / HTTP/1.1\r\nhost: echo.local\r\n\r\n",
        false,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(
        answer.contains("x-weft-reason: max_connections"),
        "{answer}"
    );
    assert!(answer.ends_with("too many connections to this listener, try again\n"));
    assert!(metric(p.admin, &limit_series("outbound", "max_connections")).await >= 1);
    // A TLS client (a ClientHello's record header) is not answered in plaintext: it would take
    // it for a broken record. Its connection just closes.
    let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00];
    assert_eq!(raw(p.outbound, &hello, false).await, "");

    held.pop();
    poll("a free slot", async || {
        let request = b"GET /again HTTP/1.1\r\nhost: echo.local\r\nconnection: close\r\n\r\n";
        raw(p.outbound, request, false)
            .await
            .starts_with("HTTP/1.1 200 ")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_its_request_rate_gets_429() {
    let p = start(&["--max-request-rate-per-connection", "3"]).await;
    let io = TokioIo::new(TcpStream::connect(p.outbound).await.unwrap());
    let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    // A burst of 10 on one connection: the first 3 pass (bucket of one second's worth).
    let mut codes = Vec::new();
    for i in 0..10 {
        let resp = tx
            .send_request(get("echo.local", &format!("/{i}")))
            .await
            .unwrap();
        codes.push(resp.status().as_u16());
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(resp.headers()["x-weft-reason"], "connection_rate_limited");
        }
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 3, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 7, "{codes:?}");
    assert_eq!(
        metric(p.admin, &limit_series("outbound", "connection_rate")).await,
        7
    );
    // Another connection has its own budget.
    normal_get(p.outbound, Version::HTTP_11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_close_after_their_quota_and_when_idle() {
    let p = start(&["--max-requests-per-connection", "2", "--idle-timeout", "1s"]).await;

    // Quota: the second response says close, and the connection ends.
    let io = TokioIo::new(TcpStream::connect(p.outbound).await.unwrap());
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    let conn = tokio::spawn(conn);
    let first = tx.send_request(get("echo.local", "/1")).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    first.into_body().collect().await.unwrap();
    tx.ready().await.unwrap();
    let second = tx.send_request(get("echo.local", "/2")).await.unwrap();
    assert_eq!(second.headers()["connection"], "close");
    second.into_body().collect().await.unwrap();
    tokio::time::timeout(DEADLINE, conn)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        metric(p.admin, &limit_series("outbound", "max_requests")).await,
        1
    );

    // Idle: an h2c connection that served a request and then nothing gets GOAWAY ~1 s later.
    let io = TokioIo::new(TcpStream::connect(p.outbound).await.unwrap());
    let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let started = Instant::now();
    let resp = tx.send_request(get("echo.local", "/h2")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    tokio::time::timeout(DEADLINE, conn)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(900),
        "closed after {lived:?}"
    );
    assert!(metric(p.admin, &limit_series("outbound", "idle_timeout")).await >= 1);
}

//! The proxy's HTTP/1.1 upstream client and its pool, seen from a scripted upstream that counts
//! its connections: keep-alive reuse (fixed-length, chunked, empty and HEAD responses), no
//! reuse of a connection whose response was abandoned or that the upstream closes, idle
//! connections closed after the idle timeout, parallel requests on their own connections;
//! request bodies in every framing (against hyper's server), trailers of a chunked response, an
//! upstream that answers before reading the body, a reused connection closed under a request,
//! broken responses (garbage, a short body, conflicting lengths, a length beside chunks), and a
//! request framed both ways (the request-smuggling shape).

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
/// `connection: close` then closes, `/big` 4 MiB, `/slow` 1 s late, `/once` only as the first
/// request of a connection, `/early` 413 without reading the body, `/garbage` not HTTP,
/// `/short` 3 of 10 bytes, `/trailers` chunked with a chunk extension and trailers.
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
    let mut served = 0;
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
        served += 1;
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
            // Keep-alive for the first request, then closed under the second (the race between
            // an upstream's keep-alive timeout and the proxy's next request).
            "/once" if served > 1 => return Ok(()),
            "/once" => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nonce")
                    .await?
            }
            // Answers at once, without reading the request body, and keeps the connection.
            "/early" => {
                stream
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbig")
                    .await?;
                tokio::time::sleep(Duration::from_secs(3)).await;
                return Ok(());
            }
            "/garbage" => stream.write_all(b"SPDY/9 what\r\n\r\n").await?,
            // A length a lenient reader takes as 5, with a second response hidden behind it.
            "/two-lengths" => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 40\r\n\r\nhelloHTTP/1.1 200 OK\r\nx-smuggled: 1\r\n\r\n")
                    .await?;
                return Ok(());
            }
            // Chunked and a length: the chunks count, and the length must not travel on.
            "/length-and-chunks" => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
                    .await?;
                return Ok(());
            }
            "/trailers" => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;ext=1\r\nok\r\n0\r\ngrpc-status: 0\r\nx-more: 1\r\n\r\n")
                    .await?
            }
            "/short" => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                    .await?;
                return Ok(());
            }
            _ => {
                stream
                    .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    .await?
            }
        }
    }
}

async fn start(upstream: SocketAddr, idle_timeout: &str) -> Proxy {
    let config = format!(
        "services:\n  - {{name: up, protocol: http1, endpoints: [{{address: \"{upstream}\"}}], \
         policy: {{idle_timeout: {idle_timeout}}}}}\n\
         routes:\n  - {{name: up, hosts: [up.local], rules: [{{backends: [{{service: up}}]}}]}}\n"
    );
    start_proxy(&config, &[]).await
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
        let (status, _, body) = self.exchange(method, path).await;
        (status, body)
    }

    /// `method path` to `up.local` without a body: status, headers, body.
    async fn exchange(
        &mut self,
        method: Method,
        path: &str,
    ) -> (StatusCode, http::HeaderMap, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "up.local")
            .body(Full::default())
            .unwrap();
        self.request(req).await
    }

    async fn request(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> (StatusCode, http::HeaderMap, String) {
        self.0.ready().await.unwrap();
        let resp = tokio::time::timeout(DEADLINE, self.0.send_request(req))
            .await
            .expect("the proxy answered")
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
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

#[tokio::test]
async fn request_bodies_cross_in_every_framing() {
    // hyper's server as the upstream: it checks our framing strictly.
    let echo = start_echo().await;
    let p = start(echo, "1m").await;
    let post = |body: &'static [u8]| {
        Request::post("/up")
            .header("host", "up.local")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap()
    };

    // content-length, and an empty body.
    let r = send(p.outbound, Version::HTTP_11, post(b"hello")).await;
    assert_eq!(r.body, "HTTP/1.1 POST /up host=up.local body=hello");
    let r = send(p.outbound, Version::HTTP_11, post(b"")).await;
    assert_eq!(r.body, "HTTP/1.1 POST /up host=up.local body=");

    // A body of unknown length from an HTTP/1.1 client (chunked), in several pieces.
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::convert::Infallible>>(4);
    let streamed = Request::post("/up")
        .header("host", "up.local")
        .body(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap();
    let io = TokioIo::new(TcpStream::connect(p.outbound).await.unwrap());
    let (mut tx_req, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let pending = tokio::spawn(async move { tx_req.send_request(streamed).await });
    for piece in ["one,", "two,", "three"] {
        tx.send(Ok(http_body::Frame::data(Bytes::from(piece))))
            .await
            .unwrap();
    }
    drop(tx);
    let resp = pending.await.unwrap().unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "HTTP/1.1 POST /up host=up.local body=one,two,three");

    // h2c in with a body: sent upstream with a length (HTTP/2 needs none).
    let req = Request::post("http://up.local/h2")
        .version(Version::HTTP_2)
        .body(Full::new(Bytes::from_static(b"ping")))
        .unwrap();
    let r = send(p.outbound, Version::HTTP_2, req).await;
    assert_eq!(r.body, "HTTP/1.1 POST /h2 host=up.local body=ping");

    // A megabyte each way.
    let big = vec![b'z'; 1 << 20];
    let req = Request::post("/big")
        .header("host", "up.local")
        .body(Full::new(Bytes::from(big)))
        .unwrap();
    let r = send(p.outbound, Version::HTTP_11, req).await;
    assert_eq!(
        r.body.len(),
        "HTTP/1.1 POST /big host=up.local body=".len() + (1 << 20)
    );
}

#[tokio::test]
async fn chunked_trailers_from_an_http1_upstream_reach_an_h2_client() {
    let (up, counts) = scripted_upstream().await;
    let p = start(up, "1m").await;
    for _ in 0..3 {
        let req = Request::get("http://up.local/trailers")
            .version(Version::HTTP_2)
            .header("te", "trailers")
            .body(Full::default())
            .unwrap();
        let r = send(p.outbound, Version::HTTP_2, req).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "ok"));
        let trailers = r.trailers.expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-more"], "1");
    }
    // Read to the end, trailers included: the connection was reused.
    assert_eq!(counts.opened(), 1);
}

#[tokio::test]
async fn an_upstream_that_answers_before_reading_the_body_is_heard() {
    let (up, _) = scripted_upstream().await;
    let p = start(up, "1m").await;
    // 8 MiB declared, 256 KiB sent: the upstream answers after the head and reads nothing.
    let mut raw = TcpStream::connect(p.outbound).await.unwrap();
    raw.write_all(b"POST /early HTTP/1.1\r\nhost: up.local\r\ncontent-length: 8388608\r\n\r\n")
        .await
        .unwrap();
    raw.write_all(&vec![b'x'; 256 << 10]).await.unwrap();
    let mut got = Vec::new();
    let answered = tokio::time::timeout(DEADLINE, async {
        let mut chunk = [0u8; 4096];
        while !got.windows(3).any(|w| w == b"big") {
            let n = raw.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed without an answer: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(
        answered.is_ok(),
        "no answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        got.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test]
async fn a_reused_connection_closed_under_a_safe_request_is_retried_on_a_new_one() {
    let (up, counts) = scripted_upstream().await;
    let p = start(up, "1m").await;
    let mut c = Client::connect(p.outbound).await;
    assert_eq!(
        c.call(Method::GET, "/once").await,
        (StatusCode::OK, "once".into())
    );
    // The pooled connection takes the next GET and closes under it: sent again on a new one.
    assert_eq!(
        c.call(Method::GET, "/once").await,
        (StatusCode::OK, "once".into())
    );
    assert_eq!(counts.opened(), 2);
    // A POST is not sent twice by the pool (it may have been processed): the caller hears.
    let (status, headers, body) = c.exchange(Method::POST, "/once").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(headers["x-weft-reason"], "upstream_reset");
    assert!(body.contains("closed before a response"), "{body}");
    assert_eq!(counts.opened(), 2);
}

#[tokio::test]
async fn broken_responses_are_clear_errors_and_the_proxy_carries_on() {
    let (up, _) = scripted_upstream().await;
    let p = start(up, "1m").await;
    let mut c = Client::connect(p.outbound).await;
    let (status, headers, body) = c.exchange(Method::GET, "/garbage").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(headers["x-weft-reason"], "upstream_reset");
    assert!(body.contains("invalid response head"), "{body}");
    // Lengths that disagree leave the end of the body unknowable: a 502 (RFC 9112 §6.3), not
    // a body read to the close with the fields passed on for the client to misread.
    let (status, headers, body) = c.exchange(Method::GET, "/two-lengths").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(headers["x-weft-reason"], "upstream_reset");
    assert!(body.contains("invalid content-length"), "{body}");
    // Transfer-encoding overrides the length, which the client never sees.
    let (status, headers, body) = c.exchange(Method::GET, "/length-and-chunks").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello"));
    assert_ne!(
        headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"2"[..]),
        "{headers:?}"
    );

    // 3 of 10 promised bytes: the client's response breaks off (it cannot be told otherwise
    // once the head is out), and nothing else is affected.
    let mut short = Client::connect(p.outbound).await;
    short.0.ready().await.unwrap();
    let resp = short
        .0
        .send_request(
            Request::get("/short")
                .header("host", "up.local")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    // The head may or may not be out before the body breaks; either way it must not look whole.
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(
            resp.into_body().collect().await.is_err(),
            "a truncated body looked whole"
        );
    }

    assert_eq!(
        c.call(Method::GET, "/fixed").await,
        (StatusCode::OK, "ok".into())
    );
}

/// A request that frames its body twice (transfer-encoding and content-length: the classic
/// request-smuggling shape) reaches the upstream as one request, chunked, without the length
/// a lenient upstream might read it by.
#[tokio::test]
async fn a_request_framed_twice_reaches_the_upstream_once_and_chunked() {
    // A raw upstream that keeps every byte of its one connection up to the end of a chunked
    // body (the last chunk and an empty trailer section).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut io, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"0\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            let n = io.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        let _ = tx.send(got);
        // Held open, as a keep-alive upstream would.
        let _ = io.read(&mut [0u8; 1]).await;
    });
    let p = start(up, "1m").await;
    let mut client = TcpStream::connect(p.outbound).await.unwrap();
    client
        .write_all(
            b"POST /up HTTP/1.1\r\nhost: up.local\r\ntransfer-encoding: chunked\r\n\
              content-length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(DEADLINE, rx).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let (head, body) = text.split_once("\r\n\r\n").expect("a request head");
    assert!(head.starts_with("post /up http/1.1\r\n"), "{text:?}");
    assert!(head.contains("\r\ntransfer-encoding: chunked"), "{text:?}");
    assert!(!head.contains("content-length"), "{text:?}");
    assert_eq!(dechunk(body), "hello", "{text:?}");
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while !answer.ends_with(b"\r\n\r\nok") {
            let mut chunk = [0u8; 1024];
            let n = client.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"));
}

/// The data of a whole chunked body (no extensions, no trailers), or a panic naming the
/// problem.
fn dechunk(mut body: &str) -> String {
    let mut data = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk-size line");
        let size = usize::from_str_radix(size, 16).expect("a hex chunk size");
        if size == 0 {
            assert_eq!(rest, "\r\n", "an empty trailer section ends the body");
            return data;
        }
        data.push_str(&rest[..size]);
        body = rest[size..]
            .strip_prefix("\r\n")
            .expect("CRLF after chunk data");
    }
}

//! The downstream HTTP/1.1 fast path (`h1_server`) and its handover to hyper, seen from a raw
//! client on one connection: pipelined heads, a request with a body (hyper's from then on),
//! `connection: close`, HEAD, HTTP/1.0, chunked responses, the proxy's own answers, bytes
//! that are not HTTP; and upgrades (WebSocket) through the explicit listener.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response as the client read it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A raw client: what it reads past one response stays buffered for the next.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &str) {
        self.stream.write_all(bytes.as_bytes()).await.unwrap();
    }

    /// Reads more; false at end of stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no answer within 10 s; have {:?}",
                    String::from_utf8_lossy(&self.buf)
                )
            })
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next response; `head_only` for the answer to a HEAD request.
    async fn answer(&mut self, head_only: bool) -> Answer {
        let (status, headers, len) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut slots);
            if let httparse::Status::Complete(len) = resp.parse(&self.buf).unwrap() {
                let headers = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (resp.code.unwrap(), headers, len);
            }
            assert!(
                self.fill().await,
                "closed before a response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        self.buf.drain(..len);
        let mut answer = Answer {
            status,
            headers,
            body: String::new(),
        };
        if head_only || status == 204 || status == 304 {
            return answer;
        }
        if answer.header("transfer-encoding") == Some("chunked") {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    assert!(self.fill().await, "closed inside a chunk size");
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&self.buf[..line_end]).unwrap().trim(),
                    16,
                )
                .unwrap();
                while self.buf.len() < line_end + 2 + size + 2 {
                    assert!(self.fill().await, "closed inside a chunk");
                }
                let data = &self.buf[line_end + 2..line_end + 2 + size];
                answer.body.push_str(&String::from_utf8_lossy(data));
                self.buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    return answer;
                }
            }
        }
        let len: usize = answer
            .header("content-length")
            .expect("content-length or chunked")
            .parse()
            .unwrap();
        while self.buf.len() < len {
            assert!(self.fill().await, "closed inside a body");
        }
        answer.body = String::from_utf8_lossy(&self.buf[..len]).into_owned();
        self.buf.drain(..len);
        answer
    }

    /// True when the proxy closed the connection (nothing more to read).
    async fn closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill().await
    }
}

/// A loopback upstream that runs `serve` on each connection it accepts.
async fn raw_upstream<F: Future<Output = ()> + Send + 'static>(
    serve: fn(TcpStream) -> F,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve(stream));
        }
    });
    addr
}

/// An upstream that answers every request head with a chunked body, `abc` then `de`.
async fn chunked_upstream() -> SocketAddr {
    raw_upstream(|mut stream| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..i + 4);
                let resp = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                                    3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
                if stream.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
}

/// An upstream that switches protocols for `Upgrade: websocket` (101, then echoes every byte)
/// and answers anything else with 426 and a body.
async fn upgrade_upstream() -> SocketAddr {
    raw_upstream(|mut stream| async move {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        if !(head.contains("\r\nupgrade: websocket\r\n")
            && head.contains("\r\nconnection: upgrade\r\n"))
        {
            let _ = stream
                .write_all(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 7\r\n\r\nupgrade")
                .await;
            return;
        }
        let switch = "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                              upgrade: websocket\r\nsec-websocket-accept: yes\r\n\r\n";
        stream.write_all(switch.as_bytes()).await.unwrap();
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

async fn proxy() -> Proxy {
    proxy_with(&[]).await
}

async fn proxy_with(args: &[&str]) -> Proxy {
    let (echo, chunked) = (start_echo().await, chunked_upstream().await);
    let ws = upgrade_upstream().await;
    let config = format!(
        r#"services:
  - name: echo
    endpoints: [{{address: "{echo}"}}]
  - name: ws
    endpoints: [{{address: "{ws}"}}]
  - name: chunked
    endpoints: [{{address: "{chunked}"}}]
  - name: empty
    endpoints: []
routes:
  - name: ws
    hosts: [ws]
    rules:
      - backends: [{{service: ws}}]
  - name: chunked
    hosts: [chunked]
    rules:
      - backends: [{{service: chunked}}]
  - name: echo
    hosts: [echo]
    rules:
      - backends: [{{service: echo}}]
  - name: empty
    hosts: [empty]
    rules:
      - backends: [{{service: empty}}]
"#
    );
    start_proxy(&config, args).await
}

#[tokio::test]
async fn one_connection_serves_fast_heads_then_hands_over_at_a_body() {
    let proxy = proxy().await;
    let mut c = Client::connect(proxy.outbound).await;
    // Two heads in one write (pipelined): answered in order.
    c.send("GET /a HTTP/1.1\r\nhost: echo\r\n\r\nGET /b HTTP/1.1\r\nhost: echo\r\n\r\n")
        .await;
    for path in ["/a", "/b"] {
        let a = c.answer(false).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.body, format!("HTTP/1.1 GET {path} host=echo body="));
        assert!(a.header("date").is_some(), "{a:?}");
    }
    // A body: hyper serves it, and the rest of the connection.
    c.send("POST /c HTTP/1.1\r\nhost: echo\r\ncontent-length: 5\r\n\r\nhello")
        .await;
    let a = c.answer(false).await;
    assert_eq!(a.body, "HTTP/1.1 POST /c host=echo body=hello");
    c.send("GET /d HTTP/1.1\r\nhost: echo\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\nGET /e HTTP/1.1\r\nhost: echo\r\n\r\n")
        .await;
    assert_eq!(
        c.answer(false).await.body,
        "HTTP/1.1 GET /d host=echo body=hi"
    );
    assert_eq!(
        c.answer(false).await.body,
        "HTTP/1.1 GET /e host=echo body="
    );
    // `Expect: 100-continue` is hyper's too: the interim answer, then the final one.
    let mut c = Client::connect(proxy.outbound).await;
    c.send("PUT /f HTTP/1.1\r\nhost: echo\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
        .await;
    assert_eq!(c.answer(true).await.status, 100);
    c.send("ok").await;
    assert_eq!(
        c.answer(false).await.body,
        "HTTP/1.1 PUT /f host=echo body=ok"
    );
}

#[tokio::test]
async fn close_head_and_http10_end_or_frame_responses_as_asked() {
    let proxy = proxy().await;
    let mut c = Client::connect(proxy.outbound).await;
    c.send("HEAD /h HTTP/1.1\r\nhost: echo\r\n\r\n").await;
    let a = c.answer(true).await;
    assert_eq!(a.status, 200);
    assert!(a.header("content-length").is_some(), "{a:?}");
    // The HEAD answer carried no body: the next answer on the connection parses cleanly.
    c.send("GET /x HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n")
        .await;
    let a = c.answer(false).await;
    assert_eq!(a.body, "HTTP/1.1 GET /x host=echo body=");
    assert_eq!(a.header("connection"), Some("close"), "{a:?}");
    assert!(
        c.closed().await,
        "the proxy closes after `connection: close`"
    );

    let mut c = Client::connect(proxy.outbound).await;
    c.send("GET /old HTTP/1.0\r\nhost: echo\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body.ends_with("GET /old host=echo body="), "{a:?}");
    assert!(
        c.closed().await,
        "HTTP/1.0 without keep-alive ends after one answer"
    );
}

#[tokio::test]
async fn chunked_and_own_answers_are_framed_and_garbage_gets_400() {
    let proxy = proxy().await;
    let mut c = Client::connect(proxy.outbound).await;
    // A body of unknown length goes on chunked, twice on one connection.
    for _ in 0..2 {
        c.send("GET /t HTTP/1.1\r\nhost: chunked\r\n\r\n").await;
        let a = c.answer(false).await;
        assert_eq!(a.header("transfer-encoding"), Some("chunked"), "{a:?}");
        assert_eq!(a.body, "abcde");
    }
    // The proxy's own answer (no endpoints): a reason, a length, a date; the connection stays.
    c.send("GET / HTTP/1.1\r\nhost: empty\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.status, 503, "{a:?}");
    assert!(a.header("x-weft-reason") == Some("no_endpoints"), "{a:?}");
    assert_eq!(a.header("content-length"), Some(&*a.body.len().to_string()));
    assert!(a.header("date").is_some(), "{a:?}");
    c.send("GET /again HTTP/1.1\r\nhost: echo\r\n\r\n").await;
    assert_eq!(
        c.answer(false).await.body,
        "HTTP/1.1 GET /again host=echo body="
    );
    // Not HTTP at all, after a good request: hyper's 400, then the close.
    c.send("GET /ok HTTP/1.1\r\nhost: echo\r\n\r\n\x01\x02 nonsense\r\n\r\n")
        .await;
    assert_eq!(c.answer(false).await.status, 200);
    let a = c.answer(false).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(c.closed().await);
}

#[tokio::test]
async fn websocket_upgrades_pass_through_the_explicit_listener() {
    // The second time as the connection's last request: its 101 must still switch.
    for args in [&[][..], &["--max-requests-per-connection", "2"]] {
        let proxy = proxy_with(args).await;
        upgrade_after_a_refusal(&proxy).await;
    }
}

async fn upgrade_after_a_refusal(proxy: &Proxy) {
    let mut c = Client::connect(proxy.outbound).await;
    // An upgrade the upstream refuses is an ordinary answer; the connection goes on.
    c.send("GET /chat HTTP/1.1\r\nhost: ws\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n")
        .await;
    let a = c.answer(false).await;
    assert_eq!((a.status, a.body.as_str()), (426, "upgrade"), "{a:?}");
    // Accepted: 101 with the upstream's fields, then bytes both ways.
    c.send(
        "GET /chat HTTP/1.1\r\nhost: ws\r\nconnection: keep-alive, Upgrade\r\n\
         upgrade: websocket\r\nsec-websocket-key: k\r\n\r\n",
    )
    .await;
    let a = c.answer(true).await;
    assert_eq!(a.status, 101, "{a:?}");
    assert_eq!(a.header("upgrade"), Some("websocket"), "{a:?}");
    assert!(
        a.header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("upgrade")),
        "{a:?}"
    );
    assert_eq!(a.header("sec-websocket-accept"), Some("yes"), "{a:?}");
    for frame in ["frame one\n", "frame two\n"] {
        c.send(frame).await;
        while c.buf.len() < frame.len() {
            assert!(c.fill().await, "closed before the echo");
        }
        assert_eq!(String::from_utf8_lossy(&c.buf), frame);
        c.buf.clear();
    }
}

/// A close the proxy decides (here `connection: close`) while the client is still sending is
/// FIN, then reading until the client closes: never a reset, which would leave the client
/// unsure whether what it sent was served. On the fast path and after the handover to hyper.
#[tokio::test]
async fn closes_with_client_bytes_unread_are_not_resets() {
    let proxy = proxy().await;
    // More than one read of the proxy's, less than it discards before giving up.
    let trailing = "x".repeat(32 << 10);
    for (path, request) in [
        (
            "fast",
            "GET /fast HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
        ),
        (
            "hyper",
            "POST /hyper HTTP/1.1\r\nhost: echo\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        ),
    ] {
        let mut c = Client::connect(proxy.outbound).await;
        c.send(&format!("{request}{trailing}")).await;
        let a = c.answer(false).await;
        assert_eq!(a.status, 200, "{path}: {a:?}");
        assert_eq!(a.header("connection"), Some("close"), "{path}: {a:?}");
        // End of stream, not ECONNRESET (which `fill` would also take for an end).
        let mut rest = [0u8; 64];
        let read = c.stream.read(&mut rest).await;
        assert!(matches!(read, Ok(0)), "{path}: {read:?}");
        c.stream.shutdown().await.unwrap();
        assert!(c.stream.take_error().unwrap().is_none(), "{path}: reset");
    }
}

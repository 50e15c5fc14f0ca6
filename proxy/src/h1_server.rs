//! The HTTP/1.1 fast path of a downstream connection, in front of hyper's server.
//!
//! hyper's server was ~40% of the proxy's instructions per request (dispatcher, boxed
//! per-request header timer, moves of the service future into its slot). The fast path reads
//! a head with httparse straight from the connection's buffer (values are slices of it),
//! calls the service in place, and writes the response head with the first body bytes in one
//! write; the connection's timers are checked lazily (one sleep per connection, re-armed only
//! when it fires early).
//!
//! It takes only what is all head: HTTP/1.1 without a body, `Expect`, `Upgrade` or `TE`, and a
//! `Connection` of `close`/`keep-alive` at most. At the first request that is anything else, or
//! that it cannot parse, it hands hyper the connection with every byte read but not used in
//! front ([`Prefixed`]), and hyper serves that request and the rest with all its rules (bodies,
//! 100-continue, 400/431, h2c prior knowledge, half-close). So nothing the fast path does not
//! know is ever guessed at.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::future::Either;
use http::header;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::service::Service;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::body::DownstreamBody;
use crate::connection::{ConnState, Flag, first_of};
use crate::h1::{ContentLength, Span, has_token, header_map, span};
use crate::limits::ListenerLimits;
use crate::linger::{LINGER, linger};
use crate::server::ShutdownSignal;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Headers of a head the fast path parses; more go to hyper (which has the configured limit).
const MAX_HEADERS: usize = 32;
/// A head not complete within this many bytes goes to hyper (which answers 431 past the limit).
const MAX_HEAD: usize = 16 << 10;
const READ_CHUNK: usize = 8 << 10;
/// Body bytes gathered behind the head before they are written.
const MAX_GATHER: usize = 16 << 10;

/// How the fast path left the connection.
pub enum Outcome<T> {
    /// Done: closed by either side, timed out, or shut down.
    Closed(Result<(), BoxError>),
    /// hyper serves the rest: the connection with the unused bytes in front.
    Handover(Prefixed<T>),
}

/// What woke the connection while it waited for a head.
enum Wake {
    Shutdown,
    Timer,
}

/// Serves `io` until the connection ends or a request needs hyper. `conn` and `listener` are
/// the connection's state and its listener's limits and counters; `signal` closes it (at once
/// between requests, after the response in flight otherwise).
pub async fn serve<T, S, B>(
    mut io: T,
    service: &S,
    conn: &ConnState,
    listener: &ListenerLimits,
    signal: &ShutdownSignal,
) -> Outcome<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: Service<Request<DownstreamBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let limits = &listener.limits;
    let (header_ms, idle_ms) = (
        millis(limits.header_read_timeout),
        millis(limits.idle_timeout),
    );
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    // When the connection started waiting for its current head (ms after it was accepted).
    let mut waiting_since = 0;
    // One timer for the connection: it may fire early (deadlines only move later), and is
    // then re-armed for the real deadline. The shutdown signal sits beside it.
    let watch = |mut signal: ShutdownSignal, at_ms: u64| async move {
        tokio::select! {
            biased;
            () = signal.wait() => Wake::Shutdown,
            () = tokio::time::sleep_until(conn.started + Duration::from_millis(at_ms)) => Wake::Timer,
        }
    };
    let mut watchers = pin!(watch(signal.clone(), header_ms));
    let flag = Arc::new(Flag::default());
    flag.set.store(true, Ordering::Release);
    loop {
        let (req, mut close) = loop {
            match parse(&mut buf) {
                Parse::Complete(req, close) => break (req, close),
                Parse::Handover(prefix) => return Outcome::Handover(Prefixed::new(prefix, io)),
                Parse::Partial if buf.len() >= MAX_HEAD => {
                    return Outcome::Handover(Prefixed::new(buf, io));
                }
                Parse::Partial => {}
            }
            buf.reserve(READ_CHUNK);
            let read = std::future::poll_fn(|cx| poll_read_buf(&mut io, cx, &mut buf));
            match first_of(read, watchers.as_mut(), &flag).await {
                Either::Left(Ok(0)) => return Outcome::Closed(Ok(())),
                Either::Left(Ok(_)) => {}
                Either::Left(Err(e)) => return Outcome::Closed(Err(e.into())),
                Either::Right(Wake::Shutdown) => {
                    linger(io, LINGER).await;
                    return Outcome::Closed(Ok(()));
                }
                Either::Right(Wake::Timer) => {
                    let now = conn.since_start_ms();
                    let head_due = waiting_since + header_ms;
                    let last = conn.last_request_ms.load(Ordering::Relaxed);
                    let idle_due = if last == u64::MAX {
                        u64::MAX
                    } else {
                        last.saturating_add(idle_ms)
                    };
                    if now >= head_due {
                        listener.counters.header_timeout.inc();
                        return Outcome::Closed(Ok(()));
                    }
                    if now >= idle_due {
                        listener.counters.idle_timeout.inc();
                        linger(io, LINGER).await;
                        return Outcome::Closed(Ok(()));
                    }
                    watchers.set(watch(signal.clone(), head_due.min(idle_due)));
                    flag.set.store(true, Ordering::Release);
                }
            }
        };
        let head_only = req.method() == Method::HEAD;
        let resp = match service.call(req).await {
            Ok(resp) => resp,
            Err(e) => return Outcome::Closed(Err(e.into())),
        };
        close |= signal.is_triggered();
        match write_response(&mut io, &mut out, resp, head_only, close).await {
            Ok(false) => {}
            Ok(true) => {
                linger(io, LINGER).await;
                return Outcome::Closed(Ok(()));
            }
            Err(e) => return Outcome::Closed(Err(e)),
        }
        waiting_since = conn.since_start_ms();
    }
}

fn poll_read_buf<T: AsyncRead + Unpin>(
    io: &mut T,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

// Returned once per head and matched at once: boxing the request would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Parse {
    Complete(Request<DownstreamBody>, bool),
    Partial,
    /// Not for the fast path: these bytes (the head and what follows) go to hyper.
    Handover(BytesMut),
}

/// A request head from `buf`, taken out of it when complete; `bool`: the client asked to close.
fn parse(buf: &mut BytesMut) -> Parse {
    let mut spans: [Span; MAX_HEADERS] = [(0, 0, 0, 0); MAX_HEADERS];
    let (len, method, path, count, close) = match scan(buf, &mut spans) {
        Scan::Complete {
            len,
            method,
            path,
            count,
            close,
        } => (len, method, path, count, close),
        Scan::Partial => return Parse::Partial,
        Scan::Other => return Parse::Handover(std::mem::take(buf)),
    };
    let bytes = buf.split_to(len).freeze();
    match build(&bytes, method, path, &spans[..count]) {
        Some(req) => Parse::Complete(req, close),
        None => {
            // Rare (a name or value http rejects): give hyper the bytes back, head first.
            let mut all = BytesMut::with_capacity(bytes.len() + buf.len());
            all.extend_from_slice(&bytes);
            all.extend_from_slice(buf);
            buf.clear();
            Parse::Handover(all)
        }
    }
}

enum Scan {
    Complete {
        len: usize,
        method: Method,
        path: std::ops::Range<usize>,
        count: usize,
        close: bool,
    },
    Partial,
    /// Unparsable, or not all head: hyper's.
    Other,
}

/// Parses the head at the start of `buf` into offsets (`spans`: name and value of each
/// header), deciding whether the fast path may serve it.
fn scan(buf: &[u8], spans: &mut [Span; MAX_HEADERS]) -> Scan {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut head, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Scan::Partial,
        Err(_) => return Scan::Other,
    };
    if head.version != Some(1) || head.method == Some("CONNECT") {
        return Scan::Other;
    }
    let mut close = false;
    for (i, h) in head.headers.iter().enumerate() {
        let name = h.name.as_bytes();
        let simple = match name.len() {
            10 if name.eq_ignore_ascii_case(b"connection") => {
                h.value.split(|&b| b == b',').all(|token| {
                    let token = token.trim_ascii();
                    close |= token.eq_ignore_ascii_case(b"close");
                    token.eq_ignore_ascii_case(b"close")
                        || token.eq_ignore_ascii_case(b"keep-alive")
                })
            }
            2 => !name.eq_ignore_ascii_case(b"te"),
            6 => !name.eq_ignore_ascii_case(b"expect"),
            7 => !name.eq_ignore_ascii_case(b"upgrade"),
            14 => !name.eq_ignore_ascii_case(b"content-length"),
            17 => !name.eq_ignore_ascii_case(b"transfer-encoding"),
            _ => true,
        };
        if !simple {
            return Scan::Other;
        }
        spans[i] = span(buf, name, h.value);
    }
    let Ok(method) = Method::from_bytes(head.method.unwrap_or("").as_bytes()) else {
        return Scan::Other;
    };
    let path = head.path.unwrap_or("").as_bytes();
    let start = path.as_ptr() as usize - buf.as_ptr() as usize;
    Scan::Complete {
        len,
        method,
        path: start..start + path.len(),
        count: head.headers.len(),
        close,
    }
}

fn build(
    head: &Bytes,
    method: Method,
    path: std::ops::Range<usize>,
    spans: &[Span],
) -> Option<Request<DownstreamBody>> {
    let uri = Uri::from_maybe_shared(head.slice(path)).ok()?;
    let headers = header_map(head, spans).ok()?;
    let mut req = Request::new(DownstreamBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Some(req)
}

/// How a response body is delimited on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// By closing the connection (a `content-length` the proxy cannot read).
    Close,
}

/// Writes `resp` (head, then body as it comes); returns whether the connection must close.
async fn write_response<T, B>(
    io: &mut T,
    out: &mut Vec<u8>,
    resp: Response<B>,
    head_only: bool,
    mut close: bool,
) -> Result<bool, BoxError>
where
    T: AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = resp.into_parts();
    let status = parts.status;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // The fields that decide framing are noticed while the head is written (comparisons of
    // standard names, not lookups).
    let (mut length, mut has_date, mut has_connection) = (ContentLength::default(), false, false);
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH {
            length.add(value.as_bytes());
        } else if name == header::DATE {
            has_date = true;
        } else if name == header::CONNECTION {
            has_connection = true;
            close |= has_token(value.as_bytes(), b"close");
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut framing = if head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::None
    } else if length.present() {
        length.value().map_or(Framing::Close, Framing::Length)
    } else {
        match body.size_hint().exact() {
            Some(n) => {
                out.extend_from_slice(b"content-length: ");
                push_number(out, n, 10);
                out.extend_from_slice(b"\r\n");
                Framing::Length(n)
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        }
    };
    if !has_date {
        out.extend_from_slice(b"date: ");
        push_date(out);
        out.extend_from_slice(b"\r\n");
    }
    if framing == Framing::Close {
        close = true;
    }
    if close && !has_connection {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if framing == Framing::None {
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(close);
    }
    let mut body = pin!(body);
    loop {
        // Gathered bytes wait only while the body has more at once; before waiting for it,
        // what the client can use (at least the head) is written.
        let frame = match std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await
        {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                io.write_all(out).await?;
                io.flush().await?;
                out.clear();
                std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        let Some(frame) = frame else { break };
        // Trailers are dropped, as hyper does for a client that did not send `TE: trailers`
        // (requests that do go to hyper).
        let Ok(data) = frame.map_err(Into::into)?.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        match &mut framing {
            Framing::Length(left) => {
                let len = data.len() as u64;
                if len > *left {
                    return Err("the response body is longer than its content-length".into());
                }
                *left -= len;
            }
            Framing::Chunked => {
                push_number(out, data.len() as u64, 16);
                out.extend_from_slice(b"\r\n");
            }
            _ => {}
        }
        if out.len() + data.len() <= MAX_GATHER {
            out.extend_from_slice(&data);
        } else {
            write_two(io, out, &data).await?;
            out.clear();
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
        // The body ended short of its length: the client can only learn by the close.
        Framing::Length(left) if left > 0 => close = true,
        _ => {}
    }
    io.write_all(out).await?;
    io.flush().await?;
    Ok(close)
}

/// Writes `a` then `b`, vectored where the stream can (one syscall for both, usually).
async fn write_two<T: AsyncWrite + Unpin>(io: &mut T, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() {
        let n = io
            .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    io.write_all(b).await
}

fn push_number(out: &mut Vec<u8>, mut n: u64, radix: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n % radix) as usize];
        n /= radix;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// The `date` of a response that has none (the proxy's own answers), formatted once a second.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A connection with bytes already read from it in front: what hyper reads first after a
/// handover. Writes go straight through.
pub struct Prefixed<T> {
    prefix: BytesMut,
    io: T,
}

impl<T> Prefixed<T> {
    fn new(prefix: BytesMut, io: T) -> Self {
        Self { prefix, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use http_body_util::{Full, StreamBody};
    use tokio::io::AsyncReadExt;

    fn scanned(head: &str) -> Option<bool> {
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        match scan(head.as_bytes(), &mut spans) {
            Scan::Complete { close, .. } => Some(close),
            Scan::Partial => panic!("partial: {head:?}"),
            Scan::Other => None,
        }
    }

    #[test]
    fn only_heads_without_bodies_or_protocol_changes_are_taken() {
        assert_eq!(scanned("GET / HTTP/1.1\r\nhost: a\r\n\r\n"), Some(false));
        assert_eq!(
            scanned("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n"),
            Some(true)
        );
        for other in [
            "POST / HTTP/1.1\r\ncontent-length: 1\r\n\r\nx",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "PUT / HTTP/1.1\r\nexpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nte: trailers\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "\x01\x02 nonsense\r\n\r\n",
        ] {
            assert_eq!(scanned(other), None, "{other:?}");
        }
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        assert!(matches!(
            scan(b"GET / HTTP/1.1\r\nhost: a\r\n", &mut spans),
            Scan::Partial
        ));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(scanned(&format!("GET / HTTP/1.1\r\n{many}\r\n")), None);
    }

    #[test]
    fn a_parsed_head_is_taken_out_and_the_next_one_stays() {
        let mut buf =
            BytesMut::from(&b"GET /p?q=1 HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\r\nGET /next"[..]);
        let Parse::Complete(req, false) = parse(&mut buf) else {
            panic!("not complete")
        };
        assert_eq!(req.uri(), "/p?q=1");
        assert_eq!(req.headers()["host"], "a");
        assert_eq!(req.headers()["x-a"], "b");
        assert_eq!(&buf[..], b"GET /next");
        // A value http refuses (a raw DEL): hyper gets every byte back, head first.
        let bad = b"GET / HTTP/1.1\r\nx: a\x7fb\r\n\r\nrest";
        let mut buf = BytesMut::from(&bad[..]);
        let Parse::Handover(all) = parse(&mut buf) else {
            panic!("taken")
        };
        assert_eq!(&all[..], bad);
    }

    async fn written(
        resp: Response<impl Body<Data = Bytes, Error = Infallible>>,
        head: bool,
    ) -> (String, bool) {
        let mut io = Vec::new();
        let close = write_response(&mut io, &mut Vec::new(), resp, head, false)
            .await
            .unwrap();
        (String::from_utf8(io).unwrap(), close)
    }

    #[tokio::test]
    async fn responses_are_framed_by_length_chunks_or_nothing() {
        let (text, close) = written(Response::new(Full::new(Bytes::from("hello"))), false).await;
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\nhello") && !close, "{text}");
        // HEAD: the length of what GET would send, no body.
        let (text, _) = written(Response::new(Full::new(Bytes::from("hello"))), true).await;
        assert!(text.ends_with("GMT\r\n\r\n"), "{text}");
        // Unknown length: chunks, the last one empty.
        let frames = futures_util::stream::iter(
            ["ab", "", "cde"].map(|s| Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(s)))),
        );
        let (text, _) = written(Response::new(StreamBody::new(frames)), false).await;
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"),
            "{text}"
        );
        // The upstream's own length and close are kept, and the close is obeyed.
        let resp = Response::builder()
            .status(404)
            .header("content-length", "2")
            .header("connection", "close")
            .header("date", "then")
            .body(Full::new(Bytes::from("no")))
            .unwrap();
        let (text, close) = written(resp, false).await;
        assert_eq!(
            text,
            "HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\nconnection: close\r\ndate: then\r\n\r\nno"
        );
        assert!(close);
        let resp = Response::builder()
            .status(204)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (text, _) = written(resp, false).await;
        assert!(
            !text.contains("content-length") && text.ends_with("\r\n\r\n"),
            "{text}"
        );
    }

    const SEEDS: &[&[u8]] = &[
        b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\nGET /n HTTP/1.1\r\n\r\n",
        b"HEAD / HTTP/1.1\r\nconnection: close\r\nx-a: \t b \r\n\r\n",
        b"POST /p HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc",
        b"OPTIONS * HTTP/1.1\r\nhost: h\r\n\r\n",
        b"GET http://h:8/p HTTP/1.1\r\n\r\n",
        b"DELETE /%7Ex;y?z=%20#f HTTP/1.1\r\nHost: h:80\r\nx-b: 1\r\nX-B: 2\r\nx-c:\r\n\r\n",
    ];

    /// A seed with one to three byte edits: replaced, removed, a separator inserted, or cut.
    fn mutated(rng: &mut fastrand::Rng, i: usize) -> Vec<u8> {
        let mut input = SEEDS[i % SEEDS.len()].to_vec();
        for _ in 0..rng.usize(1..4) {
            let at = rng.usize(..=input.len());
            match rng.u8(..4) {
                0 if at < input.len() => input[at] = rng.u8(..),
                1 if at < input.len() => {
                    input.remove(at);
                }
                2 => input.insert(at, *b" :\r\n\t,\x7f\x00".get(rng.usize(..8)).unwrap()),
                _ => input.truncate(at),
            }
        }
        input
    }

    /// Mutated heads never panic the parser, and no byte is lost or invented: a taken head
    /// leaves exactly what followed it, a handover gives back every byte, a partial head
    /// leaves the buffer as it was.
    #[test]
    fn mutated_heads_are_taken_whole_or_given_back_whole() {
        let mut rng = fastrand::Rng::with_seed(7);
        // Taken, handed over, partial: each must come up often, or the test proves little.
        let mut seen = [0usize; 3];
        for i in 0..20_000 {
            let input = mutated(&mut rng, i);
            let mut buf = BytesMut::from(&input[..]);
            match parse(&mut buf) {
                Parse::Complete(req, _) => {
                    seen[0] += 1;
                    assert!(input.ends_with(&buf), "{input:?}");
                    assert_eq!(req.version(), Version::HTTP_11);
                    assert!(req.headers().len() <= MAX_HEADERS);
                }
                Parse::Handover(all) => {
                    seen[1] += 1;
                    assert_eq!(&all[..], &input[..]);
                    assert!(buf.is_empty());
                }
                Parse::Partial => {
                    seen[2] += 1;
                    assert_eq!(&buf[..], &input[..]);
                }
            }
        }
        assert!(seen.iter().all(|&n| n > 1000), "{seen:?}");
    }

    /// The head hyper's server hands its service for `input`, if it takes one.
    async fn hyper_reads(input: &[u8]) -> Option<http::request::Parts> {
        let (mut near, far) = tokio::io::duplex(64 << 10);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let _ = tx.send(req.into_parts().0);
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(far), service);
        near.write_all(input).await.unwrap();
        near.shutdown().await.unwrap();
        // Bounded: hyper ends at the end of the input (or refuses it) at once.
        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        rx.try_recv().ok()
    }

    /// Every head the fast path takes is the head hyper's server would have read from the
    /// same bytes: method, target, version and every field (the fast path exists only to be
    /// faster, never to read a request otherwise).
    #[tokio::test]
    async fn heads_the_fast_path_takes_are_read_as_hyper_reads_them() {
        let mut rng = fastrand::Rng::with_seed(19);
        let mut taken = 0;
        for i in 0..8_000 {
            let input = mutated(&mut rng, i);
            let Parse::Complete(ours, _) = parse(&mut BytesMut::from(&input[..])) else {
                continue;
            };
            taken += 1;
            let shown = String::from_utf8_lossy(&input);
            let theirs = hyper_reads(&input)
                .await
                .unwrap_or_else(|| panic!("hyper refused a head the fast path took: {shown:?}"));
            let ours = ours.into_parts().0;
            assert_eq!(
                (&ours.method, &ours.uri, ours.version, &ours.headers),
                (&theirs.method, &theirs.uri, theirs.version, &theirs.headers),
                "{shown:?}"
            );
        }
        assert!(taken > 1_000, "{taken}");
    }

    #[tokio::test]
    async fn a_handed_over_connection_reads_the_unused_bytes_first() {
        let (mut near, far) = tokio::io::duplex(64);
        let mut io = Prefixed::new(BytesMut::from(&b"head "[..]), far);
        near.write_all(b"then the socket").await.unwrap();
        drop(near);
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "head then the socket");
    }
}

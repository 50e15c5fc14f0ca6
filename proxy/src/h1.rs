//! HTTP/1.1 to an upstream, run on the request's own task: encode the request head, stream the
//! request body, parse the response head, and decode the response body (content-length,
//! chunked with trailers, or until close) straight from the socket.
//!
//! Why not hyper's client connection: it runs each connection on a task of its own, so every
//! request crossed two channels and woke a second task, and its dispatcher was about a third
//! of the proxy's instructions per request. Here the request's task writes the head itself,
//! reads the response into one buffer per connection, and hands body bytes downstream as
//! slices of that buffer (no copy). Framing rules follow RFC 9112 §6: `transfer-encoding`
//! wins over `content-length` (and such a connection is not reused), conflicting lengths are
//! an error, HEAD/1xx/204/304 have no body, and a body without framing runs until close.

use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::net::TcpStream;

use crate::resilience::connector::Slot;
use crate::resilience::replay::RequestBody;
use crate::resilience::timeout::BoxError;

/// The largest response head (and trailer section) read.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a response head.
pub const MAX_HEADERS: usize = 100;
/// Read buffer space reserved before each read from the socket.
const READ_SPACE: usize = 16 * 1024;
/// The most read from the socket at once.
const MAX_READ: usize = 256 * 1024;
/// Request body chunks up to this size are copied behind their chunk header (one write).
const COPY_MAX: usize = 16 * 1024;

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("writing the request: {0}")]
    Write(io::Error),
    #[error("reading the response: {0}")]
    Read(io::Error),
    #[error("the connection closed before a response")]
    ClosedBeforeResponse,
    #[error("invalid response head: {0}")]
    Head(String),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("reading the request body from the client: {0}")]
    RequestBody(BoxError),
    #[error("the upstream closed the connection {0}")]
    Truncated(&'static str),
    #[error("invalid chunked response body: {0}")]
    Chunked(&'static str),
}

/// A request that failed, and whether it may go again on another connection.
#[derive(Debug)]
pub enum SendError {
    /// A reused connection turned out closed before anything of the response arrived, and the
    /// request is one that is safe to send again (no body, a safe method; as Go's net/http).
    Stale(Box<Request<RequestBody>>),
    Failed(H1Error),
}

/// One keep-alive connection to an upstream, with its read buffer and head-encoding buffer.
pub struct Connection {
    io: TcpStream,
    read: BytesMut,
    write: Vec<u8>,
    _slot: Option<Slot>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.io.peer_addr().ok())
            .finish_non_exhaustive()
    }
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

impl Connection {
    pub fn new(io: TcpStream, slot: Option<Slot>) -> Box<Self> {
        Box::new(Self {
            io,
            read: BytesMut::new(),
            write: Vec::with_capacity(512),
            _slot: slot,
        })
    }

    /// Whether an idle connection can take a request: nothing (no bytes, no EOF) arrived while
    /// it sat in the pool. No system call unless the socket's readiness says something came.
    pub fn usable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readiness can be left over from the last response: look (a read that would block
            // clears it and says the connection is quiet).
            Poll::Ready(Ok(())) => {
                let read =
                    tokio_util::io::poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.read);
                matches!(read, Poll::Pending)
            }
        }
    }

    /// Sends `req` (origin-form URI, hop-by-hop headers already removed) and reads the response
    /// head. The body stays on the connection: [`H1Body`] reads it.
    ///
    /// The head is encoded before the future is made and the request kept in one place (the
    /// future is carried by every request's; see `Forwarder::serve`).
    pub fn send(
        mut self: Box<Self>,
        req: Request<RequestBody>,
        reused: bool,
    ) -> impl Future<Output = Result<Exchange, SendError>> {
        let body = req.body();
        let has_body = !body.is_end_stream() && body.size_hint().exact() != Some(0);
        let declared = content_length(req.headers());
        // A body of known size without the header (from HTTP/2) gets one; otherwise chunked.
        let add_length = if has_body && declared.is_none() {
            body.size_hint().exact()
        } else {
            None
        };
        let chunked = has_body && declared.is_none() && add_length.is_none();
        self.encode_head(&req, add_length, chunked);
        let head_request = req.method() == Method::HEAD;
        // A request without a body is kept until the response starts: when this reused
        // connection turns out closed, it can go again on another.
        let (mut unsent, body) = if has_body {
            (None, Some(req.into_body()))
        } else {
            (Some(req), None)
        };
        async move {
            let mut complete = true;
            if let Some(body) = body {
                // Boxed: streaming a body (selects on the upstream answering early) makes a
                // future of kilobytes that every bodiless request would otherwise carry.
                complete = Box::pin(self.write_with_body(body, chunked))
                    .await
                    .map_err(SendError::Failed)?;
            } else if let Err(e) = write_all(&self.io, &self.write).await {
                return Err(stale_or_failed(unsent.take(), reused, H1Error::Write(e)));
            }

            let (head, framing, keep_alive) = loop {
                match self.read_head().await {
                    Ok(Some(head))
                        if head.resp.status().is_informational()
                            && head.resp.status() != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        // 100 Continue, 103 Early Hints: the final response follows.
                        continue;
                    }
                    Ok(Some(head)) => {
                        let (framing, keep_alive) = framing(&head, head_request);
                        break (head.resp, framing, keep_alive);
                    }
                    // Nothing at all came back: closed (or reset) under the request.
                    Ok(None) => {
                        return Err(stale_or_failed(
                            unsent,
                            reused,
                            H1Error::ClosedBeforeResponse,
                        ));
                    }
                    Err(e @ H1Error::Read(_)) if self.read.is_empty() => {
                        return Err(stale_or_failed(unsent, reused, e));
                    }
                    Err(e) => return Err(SendError::Failed(e)),
                }
            };
            Ok(Exchange {
                head,
                body: BodyState {
                    conn: self,
                    framing,
                    // A request body cut short leaves the upstream mid-message.
                    keep_alive: keep_alive && complete,
                },
            })
        }
    }

    fn encode_head(&mut self, req: &Request<RequestBody>, length: Option<u64>, chunked: bool) {
        let w = &mut self.write;
        w.clear();
        w.extend_from_slice(req.method().as_str().as_bytes());
        w.push(b' ');
        w.extend_from_slice(
            req.uri()
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str)
                .as_bytes(),
        );
        w.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in req.headers() {
            w.extend_from_slice(name.as_str().as_bytes());
            w.extend_from_slice(b": ");
            w.extend_from_slice(value.as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        if let Some(n) = length {
            let _ = write!(w, "content-length: {n}\r\n");
        }
        if chunked {
            w.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        w.extend_from_slice(b"\r\n");
    }

    /// Writes the head and the body, stopping early when the upstream answers first (an early
    /// 413, say). Returns whether the whole body went out.
    async fn write_with_body(
        &mut self,
        mut body: RequestBody,
        chunked: bool,
    ) -> Result<bool, H1Error> {
        let Self {
            io, read, write, ..
        } = self;
        if early_or_written(io, read, write).await? {
            return Ok(false);
        }
        loop {
            let frame = tokio::select! {
                biased;
                r = early_response(io, read) => return r.map(|()| false),
                f = body.frame() => f,
            };
            let frame = match frame {
                None => {
                    let early = chunked && early_or_written(io, read, b"0\r\n\r\n").await?;
                    return Ok(!early);
                }
                Some(Err(e)) => return Err(H1Error::RequestBody(e)),
                Some(Ok(frame)) => frame,
            };
            let early = match frame.into_data() {
                Ok(data) if data.is_empty() => false,
                Ok(data) if chunked => {
                    write.clear();
                    let _ = write!(write, "{:x}\r\n", data.len());
                    if data.len() <= COPY_MAX {
                        // Small chunks: one write, at the price of copying them once.
                        write.extend_from_slice(&data);
                        write.extend_from_slice(b"\r\n");
                        early_or_written(io, read, write).await?
                    } else {
                        early_or_written(io, read, write).await?
                            || early_or_written(io, read, &data).await?
                            || early_or_written(io, read, b"\r\n").await?
                    }
                }
                Ok(data) => early_or_written(io, read, &data).await?,
                Err(frame) => {
                    let Ok(trailers) = frame.into_trailers() else {
                        continue;
                    };
                    if !chunked {
                        // A content-length body cannot carry trailers: they are dropped.
                        continue;
                    }
                    write.clear();
                    write.extend_from_slice(b"0\r\n");
                    for (name, value) in &trailers {
                        write.extend_from_slice(name.as_str().as_bytes());
                        write.extend_from_slice(b": ");
                        write.extend_from_slice(value.as_bytes());
                        write.extend_from_slice(b"\r\n");
                    }
                    write.extend_from_slice(b"\r\n");
                    // The trailers end the body.
                    return Ok(!early_or_written(io, read, write).await?);
                }
            };
            if early {
                return Ok(false);
            }
        }
    }

    /// Reads until a whole response head is buffered and parses it; `None` when the connection
    /// closed first.
    async fn read_head(&mut self) -> Result<Option<Head>, H1Error> {
        loop {
            if !self.read.is_empty()
                && let Some(head) = self.parse_head()?
            {
                return Ok(Some(head));
            }
            if self.read.len() >= MAX_HEAD {
                return Err(H1Error::HeadTooLarge);
            }
            let n = std::future::poll_fn(|cx| self.poll_fill(cx, 0))
                .await
                .map_err(H1Error::Read)?;
            if n == 0 {
                return if self.read.is_empty() {
                    Ok(None)
                } else {
                    Err(H1Error::ClosedBeforeResponse)
                };
            }
        }
    }

    /// Parses a buffered response head. Hop-by-hop fields are read for framing and never
    /// make it into the header map, so the response needs no stripping after.
    fn parse_head(&mut self) -> Result<Option<Head>, H1Error> {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        // Offsets of the end-to-end names and values, so that values become slices of the head.
        let mut spans: [Span; MAX_HEADERS] = [(0, 0, 0, 0); MAX_HEADERS];
        let mut kept = 0;
        let mut facts = Facts::default();
        let mut named: Vec<HeaderName> = Vec::new();
        let buf: &[u8] = &self.read;
        let mut res = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Head(format!(
                    "more than {MAX_HEADERS} header fields"
                )));
            }
            Err(e) => return Err(H1Error::Head(e.to_string())),
        };
        for h in res.headers.iter() {
            let name = h.name.as_bytes();
            match hop_field(name) {
                Hop::No => {
                    if name.eq_ignore_ascii_case(b"content-length") {
                        facts.length.add(h.value);
                    }
                    spans[kept] = span(buf, name, h.value);
                    kept += 1;
                }
                Hop::TransferEncoding => {
                    let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
                    facts.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                }
                Hop::Connection => {
                    for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                        if token.eq_ignore_ascii_case(b"close") {
                            facts.close = true;
                        } else if token.eq_ignore_ascii_case(b"keep-alive") {
                            facts.keep_alive = true;
                        } else if let Ok(other) = HeaderName::from_bytes(token) {
                            // `Connection: x-foo` makes x-foo hop-by-hop too (rare).
                            named.push(other);
                        }
                    }
                }
                Hop::Other => {}
            }
        }
        let status = StatusCode::from_u16(res.code.unwrap_or(0))
            .map_err(|_| H1Error::Head(format!("status {:?}", res.code)))?;
        let version = if res.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let head = self.read.split_to(len).freeze();
        let mut headers = header_map(&head, &spans[..kept]).map_err(H1Error::Head)?;
        for name in named {
            headers.remove(name);
        }
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = version;
        *resp.headers_mut() = headers;
        Ok(Some(Head { resp, facts }))
    }

    /// One read from the socket into the buffer, with room for `want` bytes (within bounds);
    /// `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: u64) -> Poll<io::Result<usize>> {
        // Large bodies are read in large pieces (fewer reads and frames), small ones into what
        // the buffer has.
        let room = usize::try_from(want)
            .unwrap_or(MAX_READ)
            .clamp(READ_SPACE, MAX_READ);
        self.read.reserve(room);
        // Through `AsyncRead`: a short read clears the socket's readiness, so an idle pooled
        // connection later tells "quiet" from "something came" without a system call.
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }
}

/// A response head, and the connection its body is still on.
#[derive(Debug)]
pub struct Exchange {
    pub head: Response<()>,
    pub body: BodyState,
}

/// The connection, positioned at the start of the response body.
#[derive(Debug)]
pub struct BodyState {
    /// Boxed (once per connection, not per request): bodies and responses are moved many
    /// times on their way downstream, and a hundred bytes less in each move shows.
    conn: Box<Connection>,
    framing: Framing,
    keep_alive: bool,
}

/// What a finished body hands back: the connection, when it can take another request.
pub trait GiveBack: Send + 'static {
    fn give_back(self, conn: Box<Connection>);
}

/// A response body read from an upstream connection. At its end the connection goes back
/// through `G` (when the upstream allows keep-alive); dropped before its end, the connection
/// closes with it.
pub struct H1Body<G: GiveBack> {
    state: Option<BodyState>,
    home: Option<G>,
}

impl<G: GiveBack> std::fmt::Debug for H1Body<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("framing", &self.state.as_ref().map(|s| s.framing))
            .finish_non_exhaustive()
    }
}

impl<G: GiveBack> H1Body<G> {
    pub fn new(state: BodyState, home: G) -> Self {
        let mut body = Self {
            state: Some(state),
            home: Some(home),
        };
        if body.state.as_ref().is_some_and(BodyState::at_end) {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        if let Some(state) = self.state.take()
            && state.keep_alive
            // Bytes after the end of the message: the upstream is out of step.
            && state.conn.read.is_empty()
            && let Some(home) = self.home.take()
        {
            home.give_back(state.conn);
        }
    }
}

impl BodyState {
    fn at_end(&self) -> bool {
        matches!(self.framing, Framing::Empty | Framing::Length(0))
    }

    /// Takes up to `max` buffered body bytes (reading when none are buffered); `None` at a
    /// clean end of stream.
    fn poll_take(
        &mut self,
        cx: &mut Context<'_>,
        max: u64,
    ) -> Poll<Result<Option<Bytes>, H1Error>> {
        if self.conn.read.is_empty() {
            let n = ready!(self.conn.poll_fill(cx, max)).map_err(H1Error::Read)?;
            if n == 0 {
                return Poll::Ready(Ok(None));
            }
        }
        let take = usize::try_from(max)
            .unwrap_or(usize::MAX)
            .min(self.conn.read.len());
        Poll::Ready(Ok(Some(self.conn.read.split_to(take).freeze())))
    }

    /// Makes sure `n` bytes are buffered (reading as needed).
    fn poll_need(&mut self, cx: &mut Context<'_>, n: usize) -> Poll<Result<(), H1Error>> {
        while self.conn.read.len() < n {
            let got = ready!(self.conn.poll_fill(cx, 0)).map_err(H1Error::Read)?;
            if got == 0 {
                return Poll::Ready(Err(H1Error::Truncated("inside a chunked body")));
            }
        }
        Poll::Ready(Ok(()))
    }

    /// One more byte than is buffered (an incomplete line or section), unless `limit` bytes
    /// are already buffered: then `too_long`.
    fn poll_more(
        &mut self,
        cx: &mut Context<'_>,
        limit: usize,
        too_long: &'static str,
    ) -> Poll<Result<(), H1Error>> {
        if self.conn.read.len() > limit {
            return Poll::Ready(Err(H1Error::Chunked(too_long)));
        }
        self.poll_need(cx, self.conn.read.len() + 1)
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        loop {
            match self.framing {
                Framing::Empty | Framing::Length(0) => return Poll::Ready(None),
                Framing::Length(rem) => {
                    return match ready!(self.poll_take(cx, rem)) {
                        Ok(Some(data)) => {
                            self.framing = Framing::Length(rem - data.len() as u64);
                            Poll::Ready(Some(Ok(Frame::data(data))))
                        }
                        Ok(None) => Poll::Ready(Some(Err(H1Error::Truncated(
                            "before the end of a content-length body",
                        )))),
                        Err(e) => Poll::Ready(Some(Err(e))),
                    };
                }
                Framing::UntilClose => {
                    return match ready!(self.poll_take(cx, MAX_READ as u64)) {
                        Ok(Some(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
                        Ok(None) => {
                            self.framing = Framing::Empty;
                            Poll::Ready(None)
                        }
                        Err(e) => Poll::Ready(Some(Err(e))),
                    };
                }
                Framing::Chunked(Chunk::Size) => {
                    let parsed = httparse::parse_chunk_size(&self.conn.read);
                    match parsed {
                        Ok(httparse::Status::Complete((used, size))) => {
                            self.conn.read.advance(used);
                            self.framing = Framing::Chunked(if size == 0 {
                                Chunk::Trailers
                            } else {
                                Chunk::Data(size)
                            });
                        }
                        Ok(httparse::Status::Partial) => {
                            if let Err(e) =
                                ready!(self.poll_more(cx, 4096, "chunk size line too long"))
                            {
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                        Err(_) => {
                            return Poll::Ready(Some(Err(H1Error::Chunked("invalid chunk size"))));
                        }
                    }
                }
                Framing::Chunked(Chunk::Data(rem)) => {
                    return match ready!(self.poll_take(cx, rem)) {
                        Ok(Some(data)) => {
                            let left = rem - data.len() as u64;
                            self.framing = Framing::Chunked(if left == 0 {
                                Chunk::DataEnd
                            } else {
                                Chunk::Data(left)
                            });
                            Poll::Ready(Some(Ok(Frame::data(data))))
                        }
                        Ok(None) => Poll::Ready(Some(Err(H1Error::Truncated("inside a chunk")))),
                        Err(e) => Poll::Ready(Some(Err(e))),
                    };
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if let Err(e) = ready!(self.poll_need(cx, 2)) {
                        return Poll::Ready(Some(Err(e)));
                    }
                    if &self.conn.read[..2] != b"\r\n" {
                        return Poll::Ready(Some(Err(H1Error::Chunked(
                            "chunk data not followed by CRLF",
                        ))));
                    }
                    self.conn.read.advance(2);
                    self.framing = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Trailers) => {
                    if let Err(e) = ready!(self.poll_need(cx, 2)) {
                        return Poll::Ready(Some(Err(e)));
                    }
                    if self.conn.read.starts_with(b"\r\n") {
                        self.conn.read.advance(2);
                        self.framing = Framing::Empty;
                        return Poll::Ready(None);
                    }
                    let mut slots = [httparse::EMPTY_HEADER; 32];
                    match httparse::parse_headers(&self.conn.read, &mut slots) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for f in fields {
                                if let (Ok(name), Ok(value)) = (
                                    HeaderName::from_bytes(f.name.as_bytes()),
                                    HeaderValue::from_bytes(f.value),
                                ) {
                                    trailers.append(name, value);
                                }
                            }
                            self.conn.read.advance(used);
                            self.framing = Framing::Empty;
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        Ok(httparse::Status::Partial) => {
                            if let Err(e) =
                                ready!(self.poll_more(cx, MAX_HEAD, "trailers too large"))
                            {
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                        Err(_) => {
                            return Poll::Ready(Some(Err(H1Error::Chunked("invalid trailers"))));
                        }
                    }
                }
            }
        }
    }
}

impl<G: GiveBack> Drop for H1Body<G> {
    fn drop(&mut self) {
        // Bodies hyper never polls (empty, HEAD, 204/304) end here.
        if self.state.as_ref().is_some_and(BodyState::at_end) {
            self.finish();
        }
    }
}

impl<G: GiveBack + Unpin> Body for H1Body<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(state) = this.state.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(state.poll_frame(cx));
        match &frame {
            // An error leaves the connection mid-message: it closes with the body.
            Some(Err(_)) => this.state = None,
            // The last frame (or none): the connection is free before hyper asks again.
            None => this.finish(),
            Some(Ok(_)) if state.at_end() => this.finish(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.state.as_ref().is_none_or(BodyState::at_end)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state.as_ref().map(|s| s.framing) {
            None | Some(Framing::Empty) => SizeHint::with_exact(0),
            Some(Framing::Length(n)) => SizeHint::with_exact(n),
            Some(_) => SizeHint::default(),
        }
    }
}

/// A parsed response head and what its hop-by-hop fields said.
#[derive(Debug)]
struct Head {
    resp: Response<()>,
    facts: Facts,
}

/// What the framing and keep-alive decisions need from the head's fields.
#[derive(Debug, Default)]
struct Facts {
    length: ContentLength,
    /// `transfer-encoding` present: whether its last coding is chunked.
    chunked: Option<bool>,
    close: bool,
    keep_alive: bool,
}

/// The content-length of a message, from each of its `content-length` values in turn: one
/// number (repeated values must agree, RFC 9112 §6.3), anything else is unusable. The one rule
/// for responses read from upstreams, requests sent to them and responses written downstream.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ContentLength {
    value: Option<u64>,
    /// Present but unusable (conflicting or not a number).
    bad: bool,
}

impl ContentLength {
    pub(crate) fn add(&mut self, value: &[u8]) {
        for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u64>().ok());
            match (n, self.value) {
                (Some(n), None) if !self.bad => self.value = Some(n),
                (Some(n), Some(seen)) if n == seen => {}
                _ => {
                    self.value = None;
                    self.bad = true;
                }
            }
        }
    }

    /// The length, when every value was the same number.
    pub(crate) fn value(&self) -> Option<u64> {
        self.value
    }

    /// Whether any value was seen, usable or not.
    pub(crate) fn present(&self) -> bool {
        self.value.is_some() || self.bad
    }
}

/// Whether the comma-separated `value` has `token` (ASCII case-insensitive), e.g. `close` in
/// `Connection`.
pub(crate) fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Offsets of one header's name and value within a buffered head: `(name start, name end,
/// value start, value end)`, so that values become slices of the head once it is frozen.
pub(crate) type Span = (u32, u32, u32, u32);

/// The span of `name` and `value`, both borrowed from the buffer that starts at `base`.
pub(crate) fn span(base: &[u8], name: &[u8], value: &[u8]) -> Span {
    let offset = |s: &[u8]| (s.as_ptr() as usize - base.as_ptr() as usize) as u32;
    let (n, v) = (offset(name), offset(value));
    (n, n + name.len() as u32, v, v + value.len() as u32)
}

/// The header map of a frozen head from its spans: names parsed, values sliced (no copy).
pub(crate) fn header_map(head: &Bytes, spans: &[Span]) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::with_capacity(spans.len());
    for &(ns, ne, vs, ve) in spans {
        let name = HeaderName::from_bytes(&head[ns as usize..ne as usize])
            .map_err(|e| format!("header name: {e}"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
            .map_err(|e| format!("header {name}: {e}"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

enum Hop {
    No,
    Connection,
    TransferEncoding,
    /// keep-alive, proxy-connection, upgrade, te: dropped.
    Other,
}

/// Which hop-by-hop field `name` is (RFC 9110 §7.6.1), by length first: most names are none.
fn hop_field(name: &[u8]) -> Hop {
    let is = |s: &[u8]| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 if is(b"te") => Hop::Other,
        7 if is(b"upgrade") => Hop::Other,
        10 if is(b"connection") => Hop::Connection,
        10 if is(b"keep-alive") => Hop::Other,
        16 if is(b"proxy-connection") => Hop::Other,
        17 if is(b"transfer-encoding") => Hop::TransferEncoding,
        _ => Hop::No,
    }
}

/// Framing of the response body and whether the connection may be reused after it.
fn framing(head: &Head, head_request: bool) -> (Framing, bool) {
    let facts = &head.facts;
    let mut keep_alive = match head.resp.version() {
        Version::HTTP_10 => facts.keep_alive && !facts.close,
        _ => !facts.close,
    };
    let status = head.resp.status();
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            keep_alive = false;
        }
        return (Framing::Empty, keep_alive);
    }
    if let Some(chunked) = facts.chunked {
        if facts.length.present() {
            // Both: transfer-encoding wins, and the connection is not trusted again.
            keep_alive = false;
        }
        return if chunked {
            (Framing::Chunked(Chunk::Size), keep_alive)
        } else {
            (Framing::UntilClose, false)
        };
    }
    match facts.length.value() {
        Some(n) => (Framing::Length(n), keep_alive),
        // No length, or lengths that disagree: read to close, never reuse.
        None => (Framing::UntilClose, false),
    }
}

/// The one content-length of `headers` (all values equal), if valid.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    // The response parser's rule, applied to a request's header map.
    let mut length = ContentLength::default();
    for value in headers.get_all(header::CONTENT_LENGTH) {
        length.add(value.as_bytes());
    }
    length.value()
}

fn stale_or_failed(req: Option<Request<RequestBody>>, reused: bool, err: H1Error) -> SendError {
    match req {
        Some(req) if reused && replayable(req.method()) => SendError::Stale(Box::new(req)),
        _ => SendError::Failed(err),
    }
}

/// Methods that are safe to send again when a reused connection closed under them.
fn replayable(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

async fn write_all(io: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match io.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `buf`, unless the upstream starts answering first: `Ok(true)` then.
async fn early_or_written(
    io: &TcpStream,
    read: &mut BytesMut,
    buf: &[u8],
) -> Result<bool, H1Error> {
    tokio::select! {
        biased;
        r = early_response(io, read) => r.map(|()| true),
        r = write_all(io, buf) => r.map(|()| false).map_err(H1Error::Write),
    }
}

/// Resolves when the upstream sends something (the start of a response) while the request
/// body is still going out; a spurious readiness is looked through.
async fn early_response(io: &TcpStream, read: &mut BytesMut) -> Result<(), H1Error> {
    loop {
        io.readable().await.map_err(H1Error::Read)?;
        read.reserve(READ_SPACE);
        match io.try_read_buf(read) {
            Ok(0) => return Err(H1Error::ClosedBeforeResponse),
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(H1Error::Read(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, head_request: bool) -> (Framing, bool) {
        let mut conn_read = BytesMut::from(text.as_bytes());
        let parsed = parse(&mut conn_read);
        framing(&parsed, head_request)
    }

    fn parse(buf: &mut BytesMut) -> Head {
        // The parser without a socket: the same code path as `Connection::parse_head`.
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let io = TcpStream::connect(addr).await.unwrap();
            let mut conn = Connection::new(io, None);
            conn.read = buf.split();
            conn.parse_head().unwrap().expect("a complete head")
        })
    }

    #[test]
    fn framing_follows_rfc_9112() {
        use Framing::*;
        let ok = "HTTP/1.1 200 OK\r\n";
        assert_eq!(
            head(&format!("{ok}content-length: 5\r\n\r\n"), false),
            (Length(5), true)
        );
        assert_eq!(
            head(&format!("{ok}content-length: 5\r\n\r\n"), true),
            (Empty, true)
        );
        assert_eq!(
            head(
                &format!("{ok}transfer-encoding: gzip, chunked\r\n\r\n"),
                false
            ),
            (Chunked(Chunk::Size), true)
        );
        assert_eq!(
            head(
                &format!("{ok}transfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"),
                false
            ),
            (Chunked(Chunk::Size), false)
        );
        assert_eq!(
            head(&format!("{ok}transfer-encoding: gzip\r\n\r\n"), false),
            (UntilClose, false)
        );
        assert_eq!(
            head(
                &format!("{ok}content-length: 5\r\ncontent-length: 6\r\n\r\n"),
                false
            ),
            (UntilClose, false)
        );
        assert_eq!(head(&format!("{ok}\r\n"), false), (UntilClose, false));
        assert_eq!(
            head("HTTP/1.1 204 No Content\r\n\r\n", false),
            (Empty, true)
        );
        assert_eq!(
            head(
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
                false
            ),
            (Empty, true)
        );
        assert_eq!(
            head(
                &format!("{ok}connection: close\r\ncontent-length: 1\r\n\r\n"),
                false
            ),
            (Length(1), false)
        );
        assert_eq!(
            head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false),
            (Length(1), false)
        );
        assert_eq!(
            head(
                "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n",
                false
            ),
            (Length(1), true)
        );
    }

    #[test]
    fn header_values_are_slices_of_the_head_and_duplicates_are_kept() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 201 Created\r\nx-a: 1\r\nset-cookie: a=1\r\nset-cookie: b=2\r\n\r\nrest"[..],
        );
        let resp = parse(&mut buf).resp;
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(resp.version(), Version::HTTP_11);
        assert_eq!(resp.headers()["x-a"], "1");
        let cookies: Vec<_> = resp.headers().get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
    }

    #[test]
    fn hop_by_hop_fields_frame_the_body_but_never_reach_the_map() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nKeep-Alive: timeout=5\r\n\
               Transfer-Encoding: chunked\r\nx-private: 1\r\nUpgrade: h2c\r\nTE: trailers\r\n\
               Proxy-Connection: close\r\nx-kept: yes\r\n\r\n"[..],
        );
        let head = parse(&mut buf);
        let names: Vec<_> = head.resp.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
        assert_eq!(framing(&head, false), (Framing::Chunked(Chunk::Size), true));
    }

    #[test]
    fn content_length_must_be_one_number() {
        let h = |v: &[&str]| {
            let mut m = HeaderMap::new();
            for v in v {
                m.append(header::CONTENT_LENGTH, HeaderValue::from_str(v).unwrap());
            }
            content_length(&m)
        };
        assert_eq!(h(&["12"]), Some(12));
        assert_eq!(h(&["12", "12"]), Some(12));
        assert_eq!(h(&["12, 12"]), Some(12));
        assert_eq!(h(&["12", "13"]), None);
        assert_eq!(h(&["+12"]), None);
        assert_eq!(h(&["-1"]), None);
        assert_eq!(h(&[""]), None);
        assert_eq!(h(&[]), None);
    }
}

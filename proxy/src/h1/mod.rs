//! HTTP/1.1 to an upstream, run on the request's own task: encode the request head, stream the
//! request body, parse the response head, and decode the response body (content-length,
//! chunked with trailers, or until close) straight from the socket.
//!
//! Why not hyper's client connection: it runs each connection on a task of its own, so every
//! request crossed two channels and woke a second task, and its dispatcher was about a third
//! of the proxy's instructions per request. Here the request's task writes the head itself,
//! reads the response into one buffer per connection, and hands body bytes downstream as
//! slices of that buffer (no copy). Framing rules follow RFC 9112 §6: `transfer-encoding`
//! wins over `content-length` (which is dropped, and such a connection is not reused), a
//! `content-length` that is not one number is an error (dropped where it frames nothing), so
//! is `transfer-encoding` from HTTP/1.0, HEAD/1xx/204/304 have no body, and a body without
//! framing runs until close. `proxy/tests/h1_differential.rs` holds these against hyper's
//! client on mutated responses.

use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::net::TcpStream;

use crate::resilience::connector::Slot;
use crate::resilience::replay::RequestBody;
use crate::resilience::timeout::BoxError;

mod body;
mod head;

pub use body::{BodyState, GiveBack, H1Body};
pub(crate) use head::{ContentLength, Span, has_token, header_map, span};
use head::{Head, content_length, framing};

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
                    Ok(Some(mut head)) => match framing(&mut head, head_request) {
                        Ok((framing, keep_alive)) => break (head.resp, framing, keep_alive),
                        Err(e) => return Err(SendError::Failed(e)),
                    },
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
                && let Some(head) = head::parse(&mut self.read)?
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

//! The response body of an upstream HTTP/1.1 exchange, decoded straight from the
//! connection's read buffer (content-length, chunked with trailers, or until close); at its
//! end the connection goes back to its pool.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};

use super::{Connection, H1Error, MAX_HEAD, MAX_READ};
use crate::resilience::timeout::BoxError;

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// The connection, positioned at the start of the response body.
#[derive(Debug)]
pub struct BodyState {
    /// Boxed (once per connection, not per request): bodies and responses are moved many
    /// times on their way downstream, and a hundred bytes less in each move shows.
    pub(super) conn: Box<Connection>,
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
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
                Framing::Chunked(Chunk::Size) => match chunk_size(&self.conn.read) {
                    Ok(Some((used, size))) => {
                        self.conn.read.advance(used);
                        self.framing = Framing::Chunked(if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        });
                    }
                    Ok(None) => {
                        if let Err(e) = ready!(self.poll_more(cx, 4096, "chunk size line too long"))
                        {
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                    Err(why) => return Poll::Ready(Some(Err(H1Error::Chunked(why)))),
                },
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
                        // A bare LF ends a line for httparse, not for every reader: the
                        // end of the message must not depend on whose rule is used.
                        Ok(httparse::Status::Complete((used, _)))
                            if bare_lf(&self.conn.read[..used]) =>
                        {
                            return Poll::Ready(Some(Err(H1Error::Chunked(
                                "trailer line not ended by CRLF",
                            ))));
                        }
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

/// A chunk-size line at the start of `buf` (RFC 9112 §7.1): `(bytes used, size)`, or `None`
/// when the line is not complete yet.
///
/// Strict where leniency would move the end of the body: one to sixteen hex digits (an empty
/// size is not zero), extensions after `;` skipped but free of control characters, and the
/// line ended by CRLF (a bare LF is not a line end here).
fn chunk_size(buf: &[u8]) -> Result<Option<(usize, u64)>, &'static str> {
    let digits = buf.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return if buf.is_empty() {
            Ok(None)
        } else {
            Err("chunk size is not a hex number")
        };
    }
    if digits > 16 {
        return Err("chunk size too large");
    }
    let mut size = 0u64;
    for &b in &buf[..digits] {
        // At most 16 digits: no overflow.
        size = size << 4 | u64::from(char::from(b).to_digit(16).unwrap_or(0));
    }
    let mut i = digits;
    while i < buf.len() && matches!(buf[i], b' ' | b'\t') {
        i += 1;
    }
    if i < buf.len() && buf[i] == b';' {
        while i < buf.len() && (buf[i] == b'\t' || !buf[i].is_ascii_control()) {
            i += 1;
        }
    }
    match buf.get(i..i + 2) {
        None if buf.len() <= i + 1 && buf.get(i).is_none_or(|&b| b == b'\r') => Ok(None),
        Some(b"\r\n") => Ok(Some((i + 2, size))),
        _ => Err("invalid chunk size line"),
    }
}

/// Whether `section` has an LF without the CR before it.
fn bare_lf(section: &[u8]) -> bool {
    section
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || section[i - 1] != b'\r'))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines_are_read_strictly() {
        assert_eq!(chunk_size(b""), Ok(None));
        assert_eq!(chunk_size(b"1f"), Ok(None));
        assert_eq!(chunk_size(b"1f;name=\"v\"\r"), Ok(None));
        assert_eq!(chunk_size(b"1f\r\nrest"), Ok(Some((4, 31))));
        assert_eq!(chunk_size(b"0\r\n\r\n"), Ok(Some((3, 0))));
        assert_eq!(chunk_size(b"5 ;a=b;c\r\n"), Ok(Some((10, 5))));
        assert_eq!(chunk_size(b"5;\tq\r\n"), Ok(Some((6, 5))));
        assert_eq!(
            chunk_size(b"ffffffffffffffff\r\n"),
            Ok(Some((18, u64::MAX)))
        );
        for bad in [
            &b"\r\n"[..],
            b";ext\r\n",
            b"x\r\n",
            b"5\n",
            b"5\rx",
            b"5 5\r\n",
            b"5;a\x10\r\n",
            b"5;a\nb\r\n",
            b"10000000000000000\r\n",
        ] {
            assert!(chunk_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bare_line_feeds_are_found() {
        assert!(!bare_lf(b"x-t: 1\r\n\r\n"));
        assert!(bare_lf(b"x-t: 1\n\r\n"));
        assert!(bare_lf(b"\n"));
    }
}

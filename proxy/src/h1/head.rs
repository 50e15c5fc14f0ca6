//! Response heads from upstreams: parsing (values kept as slices of the read buffer), the
//! hop-by-hop fields, and the framing and keep-alive rules of RFC 9112 §6 that follow from
//! them. `content-length` and token helpers are shared with the downstream server.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};

use super::body::{Chunk, Framing};
use super::{H1Error, MAX_HEADERS};

/// A parsed response head and what its hop-by-hop fields said.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) resp: Response<()>,
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

/// Framing of the response body and whether the connection may be reused after it; an error
/// when the head makes the body's end unknowable.
pub(super) fn framing(head: &mut Head, head_request: bool) -> Result<(Framing, bool), H1Error> {
    let facts = &head.facts;
    let status = head.resp.status();
    if facts.chunked.is_some() && head.resp.version() == Version::HTTP_10 {
        // §6.1: its framing is faulty whatever else it says (an HTTP/1.0 peer does not chunk;
        // something between may have).
        return Err(H1Error::Head(
            "transfer-encoding in an HTTP/1.0 response".into(),
        ));
    }
    if facts.length.bad || (facts.length.present() && facts.chunked.is_some()) {
        if facts.chunked.is_none() && !bodiless(status, head_request) {
            // §6.3: a content-length that is not one number leaves the end of the body
            // unknowable; a proxy must drop the response (502), not guess by reading to the
            // close (which would also hand the field to a client that may read it otherwise).
            return Err(H1Error::Head("invalid content-length".into()));
        }
        // A length that transfer-encoding overrides, or a broken one where it frames
        // nothing, must not travel on (§6.3).
        head.resp.headers_mut().remove(header::CONTENT_LENGTH);
    }
    let facts = &head.facts;
    let mut keep_alive = match head.resp.version() {
        Version::HTTP_10 => facts.keep_alive && !facts.close,
        _ => !facts.close,
    };
    if bodiless(status, head_request) {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            keep_alive = false;
        }
        return Ok((Framing::Empty, keep_alive));
    }
    if let Some(chunked) = facts.chunked {
        if facts.length.present() {
            // Both: transfer-encoding wins, and the connection is not trusted again.
            keep_alive = false;
        }
        return Ok(if chunked {
            (Framing::Chunked(Chunk::Size), keep_alive)
        } else {
            (Framing::UntilClose, false)
        });
    }
    Ok(match facts.length.value() {
        Some(n) => (Framing::Length(n), keep_alive),
        // No length at all: read to close, never reuse.
        None => (Framing::UntilClose, false),
    })
}

/// A response that has no body whatever its fields say (RFC 9112 §6.3 items 1 and 2).
fn bodiless(status: StatusCode, head_request: bool) -> bool {
    head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// The one content-length of `headers` (all values equal), if valid.
pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    // The response parser's rule, applied to a request's header map.
    let mut length = ContentLength::default();
    for value in headers.get_all(header::CONTENT_LENGTH) {
        length.add(value.as_bytes());
    }
    length.value()
}

/// Parses a buffered response head, taking it off `read`. Hop-by-hop fields are read for
/// framing and never make it into the header map, so the response needs no stripping after.
pub(super) fn parse(read: &mut BytesMut) -> Result<Option<Head>, H1Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    // Offsets of the end-to-end names and values, so that values become slices of the head.
    let mut spans: [Span; MAX_HEADERS] = [(0, 0, 0, 0); MAX_HEADERS];
    let mut kept = 0;
    let mut facts = Facts::default();
    let mut named: Vec<HeaderName> = Vec::new();
    let buf: &[u8] = read;
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
    let head = read.split_to(len).freeze();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, head_request: bool) -> (Framing, bool) {
        framed(text, head_request).unwrap()
    }

    fn framed(text: &str, head_request: bool) -> Result<(Framing, bool), H1Error> {
        let mut conn_read = BytesMut::from(text.as_bytes());
        let mut parsed = parsed(&mut conn_read);
        framing(&mut parsed, head_request)
    }

    fn parsed(buf: &mut BytesMut) -> Head {
        parse(buf).unwrap().expect("a complete head")
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
        // A length that is not one number: the end of the body is unknowable (a 502), unless
        // the response has no body anyway, where the field is dropped.
        for bad in ["5\r\ncontent-length: 6", "5, 6", "+5", "5x", ""] {
            let text = format!("{ok}content-length: {bad}\r\n\r\n");
            assert!(
                matches!(framed(&text, false), Err(H1Error::Head(_))),
                "{text:?}"
            );
            let mut buf = BytesMut::from(
                format!("HTTP/1.1 304 Not Modified\r\ncontent-length: {bad}\r\n\r\n").as_bytes(),
            );
            let mut head = parsed(&mut buf);
            assert_eq!(framing(&mut head, false).unwrap(), (Empty, true));
            assert!(head.resp.headers().is_empty(), "{bad:?}");
        }
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
        let resp = parsed(&mut buf).resp;
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
        let mut head = parsed(&mut buf);
        let names: Vec<_> = head.resp.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
        assert_eq!(
            framing(&mut head, false).unwrap(),
            (Framing::Chunked(Chunk::Size), true)
        );
        // The length that transfer-encoding overrides is dropped, not forwarded.
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"[..],
        );
        let mut head = parsed(&mut buf);
        framing(&mut head, false).unwrap();
        assert!(head.resp.headers().is_empty());
        // Chunked from an HTTP/1.0 peer: something between chunked it; the framing is faulty.
        let text = "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(matches!(framed(text, false), Err(H1Error::Head(_))));
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

//! Trace context propagation: read W3C Trace Context (`traceparent`, `tracestate`) and B3
//! (single `b3` header and multi `X-B3-*` headers), and write the proxy's own span back.
//!
//! W3C wins when a request carries both. The proxy always writes `traceparent`; it writes B3
//! too, in the style it came in, when the request came in with B3, so B3-only applications
//! keep working behind a W3C mesh. `tracestate` is forwarded untouched (the proxy adds no
//! vendor entry). 64-bit B3 trace ids are left-padded with zeros to W3C's 128 bits.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// How the request carried B3, so it is written back the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum B3Style {
    Single,
    Multi,
}

/// What the incoming headers said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Incoming {
    /// The caller's trace and span, when it sent a valid context.
    pub parent: Option<(TraceId, SpanId)>,
    /// The caller's sampling decision, when it made one.
    pub sampled: Option<bool>,
    /// Set when B3 headers were present.
    pub b3: Option<B3Style>,
}

impl Incoming {
    /// Reads W3C first, then B3 single, then B3 multi. Malformed headers count as absent
    /// (the request is never refused for them), as the W3C spec asks.
    pub fn read(headers: &HeaderMap) -> Incoming {
        let b3 = if headers.contains_key(B3) {
            Some(B3Style::Single)
        } else if headers.contains_key(B3_TRACE_ID) || headers.contains_key(B3_SAMPLED) {
            Some(B3Style::Multi)
        } else {
            None
        };
        if let Some((trace, span, sampled)) = headers.get(TRACEPARENT).and_then(parse_traceparent) {
            return Incoming {
                parent: Some((trace, span)),
                sampled: Some(sampled),
                b3,
            };
        }
        let (parent, sampled) = match b3 {
            Some(B3Style::Single) => headers.get(B3).map_or((None, None), parse_b3_single),
            Some(B3Style::Multi) => parse_b3_multi(headers),
            None => (None, None),
        };
        Incoming {
            parent,
            sampled,
            b3,
        }
    }
}

/// The context the proxy sends upstream: its own span as the parent of what follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub sampled: bool,
    pub b3: Option<B3Style>,
}

impl Outgoing {
    /// Replaces the propagation headers in `headers` with this context.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let trace = hex::<32>(&self.trace_id);
        let span = hex::<16>(&self.span_id);
        let flags = if self.sampled { "01" } else { "00" };
        let mut tp = [0u8; 55];
        tp[..3].copy_from_slice(b"00-");
        tp[3..35].copy_from_slice(&trace);
        tp[35] = b'-';
        tp[36..52].copy_from_slice(&span);
        tp[52] = b'-';
        tp[53..].copy_from_slice(flags.as_bytes());
        headers.insert(TRACEPARENT, value(&tp));
        let sampled = if self.sampled { b"1" } else { b"0" };
        match self.b3 {
            None => {}
            Some(B3Style::Single) => {
                let mut b = Vec::with_capacity(68);
                b.extend_from_slice(&trace);
                b.push(b'-');
                b.extend_from_slice(&span);
                b.push(b'-');
                b.extend_from_slice(sampled);
                if let Some(parent) = &self.parent_span_id {
                    b.push(b'-');
                    b.extend_from_slice(&hex::<16>(parent));
                }
                headers.insert(B3, value(&b));
            }
            Some(B3Style::Multi) => {
                headers.insert(B3_TRACE_ID, value(&trace));
                headers.insert(B3_SPAN_ID, value(&span));
                match &self.parent_span_id {
                    Some(parent) => {
                        headers.insert(B3_PARENT_SPAN_ID, value(&hex::<16>(parent)));
                    }
                    None => {
                        headers.remove(B3_PARENT_SPAN_ID);
                    }
                }
                headers.insert(B3_SAMPLED, value(sampled));
                // Debug (flags: 1) implies sampled, which is now explicit.
                headers.remove(B3_FLAGS);
            }
        }
    }
}

fn value(bytes: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(bytes).expect("hex digits and dashes are a valid header value")
}

/// `00-<32 hex trace>-<16 hex span>-<2 hex flags>`; future versions may append fields.
fn parse_traceparent(v: &HeaderValue) -> Option<(TraceId, SpanId, bool)> {
    let s = v.as_bytes();
    if s.len() < 55 || s[2] != b'-' || s[35] != b'-' || s[52] != b'-' {
        return None;
    }
    let version = unhex::<1>(&s[..2])?[0];
    // Version ff is forbidden; version 00 has exactly 55 characters.
    if version == 0xff || (version == 0 && s.len() != 55) || (s.len() > 55 && s[55] != b'-') {
        return None;
    }
    let trace: TraceId = unhex(&s[3..35])?;
    let span: SpanId = unhex(&s[36..52])?;
    let flags = unhex::<1>(&s[53..55])?[0];
    if trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some((trace, span, flags & 1 == 1))
}

/// `{trace}-{span}[-{sampling}[-{parent}]]`, or a lone sampling state `0`, `1` or `d`.
fn parse_b3_single(v: &HeaderValue) -> (Option<(TraceId, SpanId)>, Option<bool>) {
    let Ok(s) = v.to_str() else {
        return (None, None);
    };
    let mut parts = s.trim().split('-');
    let first = parts.next().unwrap_or("");
    let Some(span) = parts.next() else {
        return (None, b3_sampling(first));
    };
    let ids = b3_trace_id(first).zip(unhex::<8>(span.as_bytes()).filter(|s| *s != [0; 8]));
    let sampled = parts.next().and_then(b3_sampling);
    (ids, sampled)
}

fn parse_b3_multi(h: &HeaderMap) -> (Option<(TraceId, SpanId)>, Option<bool>) {
    let get = |name: &HeaderName| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let trace = get(&B3_TRACE_ID).and_then(b3_trace_id);
    let span = get(&B3_SPAN_ID)
        .and_then(|s| unhex::<8>(s.as_bytes()))
        .filter(|s| *s != [0; 8]);
    let sampled = if get(&B3_FLAGS) == Some("1") {
        Some(true)
    } else {
        get(&B3_SAMPLED).and_then(b3_sampling)
    };
    (trace.zip(span), sampled)
}

fn b3_sampling(s: &str) -> Option<bool> {
    match s {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// 16 or 32 hex digits; a 64-bit id is left-padded with zeros.
fn b3_trace_id(s: &str) -> Option<TraceId> {
    let id = match s.len() {
        32 => unhex::<16>(s.as_bytes())?,
        16 => {
            let low: [u8; 8] = unhex(s.as_bytes())?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

/// Lower-case hex of `N / 2` bytes.
pub fn hex<const N: usize>(bytes: &[u8]) -> [u8; N] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; N];
    for (i, b) in bytes.iter().take(N / 2).enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    out
}

/// `hex` as a `String`, for logs.
pub fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly `2 * N` hex digits (either case) into `N` bytes.
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const SPAN: &str = "b7ad6b7169203331";

    fn ids() -> (TraceId, SpanId) {
        (
            unhex(TRACE.as_bytes()).unwrap(),
            unhex(SPAN.as_bytes()).unwrap(),
        )
    }

    #[test]
    fn w3c_is_read_and_wins_over_b3() {
        let h = headers(&[
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("x-b3-traceid", "aaaaaaaaaaaaaaaa"),
        ]);
        let inc = Incoming::read(&h);
        assert_eq!(inc.parent, Some(ids()));
        assert_eq!(inc.sampled, Some(true));
        assert_eq!(inc.b3, Some(B3Style::Multi));
    }

    #[test]
    fn malformed_traceparent_is_ignored() {
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            "garbage",
        ] {
            let h = HeaderMap::from_iter([(TRACEPARENT, HeaderValue::from_static(bad))]);
            assert_eq!(Incoming::read(&h), Incoming::default(), "{bad}");
        }
        // A future version with an extra field is accepted.
        let h = headers(&[(
            "traceparent",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-extra",
        )]);
        assert_eq!(Incoming::read(&h).sampled, Some(false));
    }

    #[test]
    fn b3_single_and_multi() {
        let h = headers(&[(
            "b3",
            "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1-05e3ac9a4f6e3b90",
        )]);
        let inc = Incoming::read(&h);
        assert_eq!((inc.parent, inc.sampled), (Some(ids()), Some(true)));
        assert_eq!(inc.b3, Some(B3Style::Single));

        let inc = Incoming::read(&headers(&[("b3", "0")]));
        assert_eq!((inc.parent, inc.sampled), (None, Some(false)));

        let h = headers(&[
            ("x-b3-traceid", "8448eb211c80319c"),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
        ]);
        let inc = Incoming::read(&h);
        let (trace, span) = inc.parent.unwrap();
        assert_eq!(hex_string(&trace), "00000000000000008448eb211c80319c");
        assert_eq!(hex_string(&span), SPAN);
        assert_eq!(inc.sampled, Some(true));
        assert_eq!(inc.b3, Some(B3Style::Multi));
    }

    #[test]
    fn inject_writes_w3c_and_b3_in_the_incoming_style() {
        let (trace_id, parent) = ids();
        let out = Outgoing {
            trace_id,
            span_id: [1, 2, 3, 4, 5, 6, 7, 8],
            parent_span_id: Some(parent),
            sampled: true,
            b3: None,
        };
        let mut h = headers(&[("tracestate", "congo=t61rcWkgMzE")]);
        out.inject(&mut h);
        assert_eq!(
            h["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-0102030405060708-01"
        );
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
        assert!(!h.contains_key("b3"));

        let mut h = HeaderMap::new();
        Outgoing {
            b3: Some(B3Style::Single),
            sampled: false,
            ..out
        }
        .inject(&mut h);
        assert_eq!(
            h["b3"],
            "0af7651916cd43dd8448eb211c80319c-0102030405060708-0-b7ad6b7169203331"
        );
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));

        let mut h = headers(&[("x-b3-flags", "1")]);
        Outgoing {
            b3: Some(B3Style::Multi),
            ..out
        }
        .inject(&mut h);
        assert_eq!(h["x-b3-traceid"], TRACE);
        assert_eq!(h["x-b3-spanid"], "0102030405060708");
        assert_eq!(h["x-b3-parentspanid"], SPAN);
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(!h.contains_key("x-b3-flags"));
        // What was injected reads back as the same context.
        let back = Incoming::read(&h);
        assert_eq!(back.parent, Some((trace_id, [1, 2, 3, 4, 5, 6, 7, 8])));
    }
}

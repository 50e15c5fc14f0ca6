//! Sticky backend choice: the key (a cookie or a header) whose hash picks the backend, so one
//! user always lands on the same side of an experiment's split, on every proxy.

use http::HeaderMap;
use http::header::{COOKIE, HeaderName};
use weft_proto::experiment::StickySplit;

/// A compiled sticky key.
#[derive(Debug, Clone)]
pub enum Key {
    Cookie(String),
    Header(HeaderName),
}

impl Key {
    /// Validation guarantees exactly one valid name; a header name that still fails to
    /// parse falls back to a cookie key that never matches anything useful.
    pub fn compile(s: &StickySplit) -> Key {
        match (&s.cookie, &s.header) {
            (_, Some(h)) => HeaderName::from_bytes(h.as_bytes())
                .map_or_else(|_| Key::Cookie(h.clone()), Key::Header),
            (Some(c), None) => Key::Cookie(c.clone()),
            (None, None) => Key::Cookie(String::new()),
        }
    }

    /// The hash of the key's value in `headers`; `None` when the request lacks the key.
    pub fn hash(&self, headers: &HeaderMap) -> Option<u64> {
        match self {
            Key::Header(name) => headers.get(name).map(|v| fnv1a(v.as_bytes())),
            Key::Cookie(name) => headers
                .get_all(COOKIE)
                .iter()
                .find_map(|v| cookie_value(v.as_bytes(), name.as_bytes()))
                .map(fnv1a),
        }
    }
}

/// The value of cookie `name` in one `Cookie` header value (`a=1; b=2`).
fn cookie_value<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    header.split(|b| *b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|b| *b == b'=')?;
        (pair[..eq].trim_ascii() == name).then(|| pair[eq + 1..].trim_ascii())
    })
}

/// 64-bit FNV-1a: stable across builds and processes, so every proxy agrees.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cookie_and_hashes_it() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, "theme=dark; user=alice".parse().unwrap());
        let key = Key::Cookie("user".into());
        assert_eq!(key.hash(&h), Some(fnv1a(b"alice")));
        assert_eq!(Key::Cookie("nope".into()).hash(&h), None);
        assert_eq!(cookie_value(b"a=1;b = 2 ", b"b"), Some(&b"2"[..]));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    }
}

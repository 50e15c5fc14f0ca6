//! Protocol detection on a captured connection: peek (never read) the first bytes, with a
//! short timeout, and decide HTTP/2 (the connection preface), HTTP/1 (a method token), TLS (a
//! handshake record) or opaque TCP. A client that says nothing within the timeout is treated
//! as opaque: the server may speak first. Ports declared opaque skip this entirely.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

/// What the first bytes of a connection look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1, upgrades (WebSocket) included: they are routed like any request, and the
    /// connection becomes a byte stream only after the server's `101`.
    Http1,
    Http2,
    /// A TLS ClientHello: passed through untouched (the proxy cannot read it anyway).
    Tls,
    Opaque,
}

impl Detected {
    pub fn is_http(self) -> bool {
        matches!(self, Detected::Http1 | Detected::Http2)
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Classifies the bytes seen so far; `None` when they are a prefix of something that needs
/// more bytes to decide.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        // Record type handshake, then the major version 3 (SSL 3.0 … TLS 1.3).
        return match buf.get(1) {
            None => None,
            Some(3) => Some(Detected::Tls),
            Some(_) => Some(Detected::Opaque),
        };
    }
    if buf.len() >= H2_PREFACE.len() {
        if buf.starts_with(H2_PREFACE) {
            return Some(Detected::Http2);
        }
    } else if H2_PREFACE.starts_with(buf) {
        return None;
    }
    for method in METHODS {
        if buf.len() >= method.len() {
            if buf.starts_with(method) {
                return Some(Detected::Http1);
            }
        } else if method.starts_with(buf) {
            return None;
        }
    }
    Some(Detected::Opaque)
}

/// The most of a ClientHello looked at for its SNI.
const HELLO_PEEK: usize = 4096;

/// How often a partial prefix is peeked again while waiting for the rest.
const REPEEK: Duration = Duration::from_millis(2);

/// Peeks at `stream` until [`classify`] decides or `timeout` passes (then: opaque).
pub async fn detect(stream: &TcpStream, timeout: Duration) -> io::Result<Detected> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 32];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(n) => n?,
            Err(_) => return Ok(Detected::Opaque),
        };
        if n == 0 {
            // Closed before saying anything: nothing to route; pass it on as it is.
            return Ok(Detected::Opaque);
        }
        if let Some(found) = classify(&buf[..n]) {
            return Ok(found);
        }
        if n == seen && tokio::time::Instant::now() >= deadline {
            return Ok(Detected::Opaque);
        }
        seen = n;
        // peek() returns at once while bytes are buffered; wait a moment for more.
        if tokio::time::timeout_at(deadline, tokio::time::sleep(REPEEK))
            .await
            .is_err()
        {
            return Ok(Detected::Opaque);
        }
    }
}

/// The server name (SNI) of a TLS ClientHello at the start of `buf`; `None` when there is
/// none or the hello is not all in `buf`.
pub fn client_hello_sni(buf: &[u8]) -> Option<&str> {
    struct Cursor<'a>(&'a [u8]);
    impl<'a> Cursor<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
            self.0 = rest;
            Some(head)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| usize::from(b[0]))
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        }
        fn vec8(&mut self) -> Option<&'a [u8]> {
            let n = self.u8()?;
            self.take(n)
        }
        fn vec16(&mut self) -> Option<&'a [u8]> {
            let n = self.u16()?;
            self.take(n)
        }
    }
    let mut record = Cursor(buf);
    if record.u8()? != 0x16 {
        return None;
    }
    record.take(2)?; // legacy record version
    let mut hello = Cursor(record.vec16()?);
    if hello.u8()? != 1 {
        return None; // not a ClientHello
    }
    hello.take(3)?; // handshake length
    hello.take(2 + 32)?; // client version, random
    hello.vec8()?; // session id
    hello.vec16()?; // cipher suites
    hello.vec8()?; // compression methods
    let mut extensions = Cursor(hello.vec16()?);
    while let Some(kind) = extensions.u16() {
        let mut data = Cursor(extensions.vec16()?);
        if kind == 0 {
            let mut names = Cursor(data.vec16()?);
            while let Some(name_type) = names.u8() {
                let name = names.vec16()?;
                if name_type == 0 {
                    return std::str::from_utf8(name).ok();
                }
            }
            return None;
        }
    }
    None
}

/// Peeks the ClientHello on `stream` (up to 4 KiB, waiting up to `timeout` for it all) and
/// returns its SNI.
pub async fn peek_sni(stream: &TcpStream, timeout: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; HELLO_PEEK];
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        // The record length says when the hello is all there.
        let complete = n >= 5 && n >= 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
        if complete || n == HELLO_PEEK {
            return client_hello_sni(&buf[..n]).map(str::to_owned);
        }
        tokio::time::timeout_at(deadline, tokio::time::sleep(REPEEK))
            .await
            .ok()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HTTP/2"), None, "a partial preface waits");
        assert_eq!(classify(b"PO"), None);
        assert_eq!(classify(b"GETX"), Some(Detected::Opaque));
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]), Some(Detected::Tls));
        assert_eq!(classify(&[0x16]), None);
        assert_eq!(classify(&[0x16, 0x09]), Some(Detected::Opaque));
        assert_eq!(classify(b"\x00\x00\x00\x01mysql"), Some(Detected::Opaque));
        assert_eq!(classify(b""), None);
    }

    #[test]
    fn reads_the_sni_of_a_real_client_hello() {
        // A ClientHello as rustls writes it.
        let roots = rustls::RootCertStore::empty();
        let config = std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let name = rustls::pki_types::ServerName::try_from("app.example").unwrap();
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        assert_eq!(client_hello_sni(&out), Some("app.example"));
        assert_eq!(client_hello_sni(&out[..out.len() / 2]), None, "partial");
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1"), None);
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_after_the_timeout_and_bytes_are_not_consumed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let started = std::time::Instant::now();
        let found = detect(&server, Duration::from_millis(50)).await.unwrap();
        assert_eq!(found, Detected::Opaque);
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(started.elapsed() < Duration::from_secs(2));

        client.write_all(b"GE").await.unwrap();
        let partial = tokio::spawn(async move {
            let found = detect(&server, Duration::from_secs(5)).await.unwrap();
            let mut buf = [0u8; 16];
            let n = server.peek(&mut buf).await.unwrap();
            (found, buf[..n].to_vec())
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        client
            .write_all(b"T / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let (found, peeked) = partial.await.unwrap();
        assert_eq!(found, Detected::Http1);
        assert!(peeked.starts_with(b"GET"), "nothing was consumed");
    }
}

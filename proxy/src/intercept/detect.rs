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
    Http1,
    /// HTTP/1 whose first request asks for a protocol upgrade (WebSocket): the proxy does not
    /// speak the upgraded protocol, so the connection is passed through as opaque TCP.
    Http1Upgrade,
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

/// Whether an HTTP/1 request head (possibly partial) has an `Upgrade` header; `None` while
/// the head is incomplete.
pub fn head_upgrades(buf: &[u8]) -> Option<bool> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some(
        buf[..end]
            .split(|b| *b == b'\n')
            .skip(1)
            .any(|line| line.len() > 8 && line[..8].eq_ignore_ascii_case(b"upgrade:")),
    )
}

/// The largest request head looked at for an `Upgrade` header; a longer head is plain HTTP/1.
const HEAD_PEEK: usize = 4096;

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
            if found == Detected::Http1 {
                return upgrade(stream, deadline).await;
            }
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

/// HTTP/1 or HTTP/1 with an upgrade, once the first request head is in (or the deadline).
async fn upgrade(stream: &TcpStream, deadline: tokio::time::Instant) -> io::Result<Detected> {
    let mut head = vec![0u8; HEAD_PEEK];
    loop {
        let n = stream.peek(&mut head).await?;
        match head_upgrades(&head[..n]) {
            Some(true) => return Ok(Detected::Http1Upgrade),
            Some(false) => return Ok(Detected::Http1),
            None if n == HEAD_PEEK => return Ok(Detected::Http1),
            None => {}
        }
        if tokio::time::timeout_at(deadline, tokio::time::sleep(REPEEK))
            .await
            .is_err()
        {
            return Ok(Detected::Http1);
        }
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
    fn finds_upgrade_requests() {
        let ws =
            b"GET /chat HTTP/1.1\r\nHost: a\r\nUPGRADE: websocket\r\nConnection: Upgrade\r\n\r\n";
        assert_eq!(head_upgrades(ws), Some(true));
        assert_eq!(
            head_upgrades(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nUpgrade: x"),
            Some(false)
        );
        assert_eq!(
            head_upgrades(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n"),
            None
        );
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

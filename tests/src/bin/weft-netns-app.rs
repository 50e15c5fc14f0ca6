//! A tiny app for the interception tests, run inside a test's network namespace:
//!
//! - `http ADDR`: HTTP/1.1 server answering JSON with the identity headers the inbound sidecar
//!   adds and the `Host` it saw.
//! - `greet ADDR`: a server-speaks-first TCP server (like MySQL): writes a greeting at once,
//!   then echoes.
//! - `first-byte ADDR`: connects and prints `{"ms": <time to the first byte>, "greeting": ...}`.
//! - `tls ADDR`: HTTPS with a self-signed certificate for `app.example`, answering `tls ok`.
//! - `connect ADDR`: exits 0 once something accepts on ADDR.
//! - `upgrade ADDR`: answers an HTTP/1.1 `Upgrade: websocket` request with 101, then echoes.
//! - `upgrade-client ADDR`: sends that request, expects 101, then an echo; prints `{"status", "echo"}`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, addr] = args.as_slice() else {
        bail!("usage: weft-netns-app http|greet|first-byte ADDR");
    };
    match mode.as_str() {
        "http" => http(addr).await,
        "greet" => greet(addr).await,
        "first-byte" => first_byte(addr).await,
        "upgrade" => upgrade(addr).await,
        "tls" => tls(addr).await,
        "connect" => {
            TcpStream::connect(addr.as_str())
                .await
                .context(addr.to_owned())?;
            Ok(())
        }
        "upgrade-client" => upgrade_client(addr).await,
        other => bail!("unknown mode {other:?}"),
    }
}

async fn http(addr: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.context(addr.to_owned())?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let h = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let body = serde_json::json!({
                    "identity": h("x-weft-peer-identity"),
                    "tls": h("x-weft-tls"),
                    "host": h("host"),
                    "path": req.uri().path(),
                });
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(bytes::Bytes::from(
                    body.to_string(),
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn greet(addr: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.context(addr.to_owned())?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            if stream.write_all(b"220 weft greeting\n").await.is_err() {
                return;
            }
            let mut buf = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn first_byte(addr: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .context("no first byte in 10 s")??;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    // The echo proves bytes also flow from the client to the server.
    stream.write_all(b"ping\n").await?;
    let mut echo = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echo))
        .await
        .context("no echo in 10 s")??;
    println!(
        "{}",
        serde_json::json!({
            "ms": ms,
            "greeting": String::from_utf8_lossy(&buf[..n]),
            "echo": String::from_utf8_lossy(&echo),
        })
    );
    Ok(())
}

/// Reads up to the end of an HTTP head (`\r\n\r\n`), byte by byte so nothing after it is
/// consumed.
async fn read_head(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = stream
            .read_u8()
            .await
            .context("connection closed in the head")?;
        head.push(b);
        anyhow::ensure!(head.len() < 8192, "head too long");
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

async fn upgrade(addr: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.context(addr.to_owned())?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(head) = read_head(&mut stream).await else {
                return;
            };
            if !head.to_ascii_lowercase().contains("\r\nupgrade: websocket") {
                let _ = stream
                    .write_all(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n")
                    .await;
                return;
            }
            let _ = stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                .await;
            let mut buf = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn upgrade_client(addr: &str) -> anyhow::Result<()> {
    let work = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!(
                    "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
        let head = read_head(&mut stream).await?;
        let status = head.split_whitespace().nth(1).unwrap_or("").to_owned();
        stream.write_all(b"frame\n").await?;
        let mut echo = [0u8; 6];
        stream.read_exact(&mut echo).await?;
        anyhow::Ok((status, String::from_utf8_lossy(&echo).into_owned()))
    };
    let (status, echo) = tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .context("no upgrade and echo in 10 s")??;
    println!("{}", serde_json::json!({"status": status, "echo": echo}));
    Ok(())
}

async fn tls(addr: &str) -> anyhow::Result<()> {
    let cert = rcgen::generate_simple_self_signed(vec!["app.example".to_owned()])?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("key: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind(addr).await.context(addr.to_owned())?;
    loop {
        let (stream, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(stream).await else {
                return;
            };
            let mut buf = [0u8; 4096];
            if tls.read(&mut buf).await.is_ok() {
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\ntls ok",
                    )
                    .await;
                let _ = tls.shutdown().await;
            }
        });
    }
}

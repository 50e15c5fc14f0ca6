//! A small HTTP client for tests and the demo: requests through a proxy's outbound listener
//! with a chosen `Host`, and JSON calls to admin APIs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// A pooled HTTP/1.1 client.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl HttpClient {
    pub fn http1() -> Self {
        Self {
            inner: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        addr: SocketAddr,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Reply> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header(http::header::HOST, host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.inner.request(req)).await??;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
            .await??
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        self.send(Method::GET, addr, host, path, headers, Bytes::new())
            .await
    }

    pub async fn get_json(
        &self,
        addr: SocketAddr,
        path: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let reply = self.get(addr, &addr.to_string(), path, &[]).await?;
        anyhow::ensure!(
            reply.status.is_success(),
            "GET {path}: {} {}",
            reply.status,
            reply.text()
        );
        Ok(reply.json())
    }

    /// POSTs JSON and returns the status and the JSON answer, whatever the status.
    pub async fn post_json(
        &self,
        addr: SocketAddr,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(StatusCode, serde_json::Value)> {
        let reply = self
            .send(
                Method::POST,
                addr,
                &addr.to_string(),
                path,
                &[("content-type", "application/json")],
                body.to_string(),
            )
            .await?;
        Ok((reply.status, reply.json()))
    }

    pub async fn post_text(
        &self,
        addr: SocketAddr,
        path: &str,
        content_type: &str,
        body: String,
    ) -> anyhow::Result<(StatusCode, serde_json::Value)> {
        let reply = self
            .send(
                Method::POST,
                addr,
                &addr.to_string(),
                path,
                &[("content-type", content_type)],
                body,
            )
            .await?;
        Ok((reply.status, reply.json()))
    }
}

/// Polls `check` until it returns `Some`, or fails after `deadline` with `what` in the message.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// One HTTP/2 (prior knowledge) GET to `addr` with `:authority` = `authority`, as a real h2
/// client sends it: in HTTP/2 the authority travels in the URI, not in a Host header.
pub async fn h2_get(addr: SocketAddr, authority: &str, path: &str) -> anyhow::Result<Reply> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .version(Version::HTTP_2)
        .uri(format!("http://{authority}{path}"))
        .body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await??;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    })
}

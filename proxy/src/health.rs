//! Health plumbing for Kubernetes: `weft-proxy wait-ready` (the legacy sidecar's postStart
//! hook polls the admin `/ready` until a deadline) and the app probes the injector rewrote to
//! `/app-health/<container>/<probe>` on the admin port, which the proxy answers by running the
//! original `httpGet` probe against the app on loopback — so probes keep working when the
//! app's ports accept only mTLS.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::Args;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

/// `weft-proxy wait-ready` flags.
#[derive(Debug, Clone, Args)]
pub struct WaitReadyArgs {
    /// The proxy's admin address (the injector puts it on :15020).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15020")]
    pub admin_addr: SocketAddr,
    /// Give up after this long.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = crate::cli::parse_duration)]
    pub timeout: Duration,
}

const POLL: Duration = Duration::from_millis(100);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// Polls `GET /ready` until it answers 200 (`Ok`) or the deadline passes (`Err` with the
/// last thing seen).
pub fn wait_ready(args: &WaitReadyArgs) -> Result<Duration, String> {
    let start = Instant::now();
    let mut last;
    loop {
        match ready_once(args.admin_addr) {
            Ok(200) => return Ok(start.elapsed()),
            Ok(code) => last = format!("/ready answered {code}"),
            Err(e) => last = format!("cannot reach {}: {e}", args.admin_addr),
        }
        if start.elapsed() >= args.timeout {
            return Err(format!(
                "weft-proxy not ready after {:?}: {last}",
                args.timeout
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// One `GET /ready` over HTTP/1.1 with plain std I/O (no runtime needed in a hook).
fn ready_once(addr: SocketAddr) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, ATTEMPT_TIMEOUT)?;
    s.set_read_timeout(Some(ATTEMPT_TIMEOUT))?;
    s.set_write_timeout(Some(ATTEMPT_TIMEOUT))?;
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: weft-proxy\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let read = s.read(&mut head[n..])?;
        if read == 0 {
            break;
        }
        n += read;
    }
    std::str::from_utf8(&head[..n])
        .ok()
        .and_then(|h| {
            h.strip_prefix("HTTP/1.1 ")
                .or_else(|| h.strip_prefix("HTTP/1.0 "))
        })
        .and_then(|h| h.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))
}

/// Why the probe definitions could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("--app-probes / WEFT_APP_PROBES is not a JSON object of httpGet probes: {0}")]
    Json(#[from] serde_json::Error),
    #[error("--app-probes: probe {probe:?}: {reason}")]
    Probe { probe: String, reason: String },
}

/// One original `httpGet` probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppProbe {
    pub port: u16,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// The app's probes, by `<container>/<probe>`.
#[derive(Debug, Default)]
pub struct AppProbes(HashMap<String, AppProbe>);

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl AppProbes {
    /// Parses the injector's JSON (`weft.io/app-probes`).
    pub fn parse(json: &str) -> Result<Self, ProbeError> {
        let map: HashMap<String, serde_json::Value> = serde_json::from_str(json)?;
        let mut out = HashMap::new();
        for (name, get) in map {
            let bad = |reason: &str| ProbeError::Probe {
                probe: name.clone(),
                reason: reason.to_owned(),
            };
            let port = match get.get("port") {
                Some(serde_json::Value::Number(n)) => {
                    n.as_u64().and_then(|p| u16::try_from(p).ok())
                }
                Some(serde_json::Value::String(s)) => s.parse().ok(),
                _ => None,
            }
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("port must be a number (named ports are not resolved)"))?;
            if get
                .get("scheme")
                .and_then(|s| s.as_str())
                .is_some_and(|s| s != "HTTP")
            {
                return Err(bad("only scheme HTTP is proxied"));
            }
            let path = get.get("path").and_then(|p| p.as_str()).unwrap_or("/");
            let path = if path.starts_with('/') {
                path.to_owned()
            } else {
                format!("/{path}")
            };
            let headers = get
                .get("httpHeaders")
                .and_then(|h| h.as_array())
                .map(|list| {
                    list.iter()
                        .filter_map(|h| {
                            Some((
                                h.get("name")?.as_str()?.to_owned(),
                                h.get("value")?.as_str()?.to_owned(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.insert(
                name,
                AppProbe {
                    port,
                    path,
                    headers,
                },
            );
        }
        Ok(Self(out))
    }

    /// Answers `/app-health/<container>/<probe>`: the app's status code, or 404 for an unknown
    /// probe, or 503 with the reason when the app cannot be reached.
    pub async fn check(&self, name: &str) -> (StatusCode, String) {
        let Some(probe) = self.0.get(name) else {
            return (
                StatusCode::NOT_FOUND,
                format!("no app probe named {name:?}\n"),
            );
        };
        match tokio::time::timeout(PROBE_TIMEOUT, probe.run()).await {
            Ok(Ok(status)) => (status, format!("app probe {name}: {status}\n")),
            Ok(Err(e)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("app probe {name}: {e}\n"),
            ),
            Err(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("app probe {name}: no answer in {PROBE_TIMEOUT:?}\n"),
            ),
        }
    }
}

impl AppProbe {
    async fn run(&self) -> Result<StatusCode, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(conn);
        let mut req = Request::get(self.path.as_str()).header(http::header::HOST, addr.to_string());
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| format!("bad probe request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        Ok(resp.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_injectors_annotation() {
        let probes = AppProbes::parse(
            r#"{"app/readyz": {"path": "healthz", "port": 8080, "httpHeaders": [{"name": "x-a", "value": "1"}]},
                "app/livez": {"port": "9090"}}"#,
        )
        .unwrap();
        assert_eq!(
            probes.0["app/readyz"],
            AppProbe {
                port: 8080,
                path: "/healthz".into(),
                headers: vec![("x-a".into(), "1".into())]
            }
        );
        assert_eq!(probes.0["app/livez"].path, "/");
        let err = AppProbes::parse(r#"{"app/livez": {"port": "http"}}"#).unwrap_err();
        assert!(err.to_string().contains("named ports"), "{err}");
        assert!(AppProbes::parse("[").is_err());
    }

    #[tokio::test]
    async fn proxies_a_probe_to_the_app_and_reports_unknown_ones() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let svc =
                hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let code = if req.uri().path() == "/ok" { 204 } else { 500 };
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .status(code)
                            .body(Empty::<bytes::Bytes>::new())
                            .unwrap(),
                    )
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        let probes = AppProbes::parse(&format!(
            r#"{{"app/readyz": {{"path": "/ok", "port": {port}}}}}"#
        ))
        .unwrap();
        assert_eq!(probes.check("app/readyz").await.0, StatusCode::NO_CONTENT);
        assert_eq!(probes.check("app/nope").await.0, StatusCode::NOT_FOUND);
    }

    #[test]
    fn wait_ready_gives_up_with_a_clear_message() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = wait_ready(&WaitReadyArgs {
            admin_addr: closed,
            timeout: Duration::from_millis(200),
        })
        .unwrap_err();
        assert!(
            err.contains("not ready after") && err.contains("cannot reach"),
            "{err}"
        );
    }
}

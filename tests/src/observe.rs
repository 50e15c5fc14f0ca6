//! Harness for the observability tests: a real OTLP collector (`rotel-agent`, installed by
//! `pip install rotel`) whose debug output the test reads back as spans, an upstream app that
//! echoes the headers it received, and `/metrics` scraping with a real Prometheus parser.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use http::Request;
use hyper::body::Incoming;

use crate::http::HttpClient;
use crate::identity::HeaderApp;
use crate::procs::Proc;

/// Where `rotel-agent` is: `$WEFT_ROTEL_AGENT`, `rotel-agent` on `PATH`, or inside the
/// `rotel` Python package (pip installs the binary there, not on `PATH`).
pub fn rotel_agent() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_ROTEL_AGENT") {
        return Some(PathBuf::from(p));
    }
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v rotel-agent"])
        .output()
        && out.status.success()
    {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !p.is_empty() {
            return Some(PathBuf::from(p));
        }
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && p.is_file()).then_some(p)
}

/// The collector, or `None` to skip: allowed only outside CI. In CI (`CI=true`) a missing
/// collector fails the test, because `.ci/run` installs it.
pub fn collector_or_skip(test: &str) -> Option<PathBuf> {
    match rotel_agent() {
        Some(p) => Some(p),
        None if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("{test}: rotel-agent not found in CI; .ci/run must `pip install rotel`")
        }
        None => {
            eprintln!(
                "\n\n*** SKIPPING {test}: rotel-agent (the OTLP collector) is not installed. ***\n\
                 *** Run `python3 -m pip install rotel` to run this test.                ***\n\n"
            );
            None
        }
    }
}

/// A span as the collector printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Span {
    /// `service.name` of the resource that sent it.
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_id: String,
    pub name: String,
    /// `SPAN_KIND_CLIENT`, `SPAN_KIND_SERVER`, …
    pub kind: String,
    pub attributes: BTreeMap<String, String>,
}

/// A running `rotel-agent` with an OTLP receiver (HTTP and gRPC) on loopback, printing every
/// span it receives (`--debug-log traces --debug-log-verbosity detailed`) to its log file.
pub struct Collector {
    pub proc: Proc,
    pub http: SocketAddr,
    /// The OTLP/gRPC receiver.
    pub grpc: SocketAddr,
    out: PathBuf,
}

/// A free loopback port. The collector cannot be told port 0 and report back, so a port is
/// reserved and released just before it starts; a clash fails its start loudly.
fn free_port() -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr")
}

impl Collector {
    pub async fn start(agent: &Path, dir: &Path, name: &str) -> Collector {
        let (http, grpc) = (free_port(), free_port());
        let args: Vec<String> = [
            "start",
            "--exporter",
            "blackhole",
            "--debug-log",
            "traces",
            "--debug-log-verbosity",
            "detailed",
            "--otlp-http-endpoint",
            &http.to_string(),
            "--otlp-grpc-endpoint",
            &grpc.to_string(),
            "--log-file",
            &dir.join(format!("{name}.agent.log")).display().to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let mut proc = Proc::spawn(name, agent, &args, dir);
        let start = Instant::now();
        // Ready once the OTLP/HTTP receiver accepts connections.
        while tokio::net::TcpStream::connect(http).await.is_err() {
            if let Some(status) = proc.exited() {
                panic!("{name} exited ({status})\n{}", proc.log_tail());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{name} did not listen on {http}\n{}",
                proc.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Collector {
            out: dir.join(format!("{name}.log")),
            proc,
            http,
            grpc,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// The OTLP/gRPC receiver's URL (for `--otlp-protocol grpc`).
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        parse_debug_log(&std::fs::read_to_string(&self.out).unwrap_or_default())
    }
}

/// Parses rotel's detailed debug output.
pub fn parse_debug_log(text: &str) -> Vec<Span> {
    let mut spans = Vec::new();
    let mut service = String::new();
    let mut in_span = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("ResourceSpans #") {
            service.clear();
            in_span = false;
        } else if t.starts_with("Span #") {
            in_span = true;
            spans.push(Span {
                service: service.clone(),
                ..Span::default()
            });
        } else if let Some(attr) = t.strip_prefix("-> ") {
            let Some((k, v)) = attr.split_once(": ") else {
                continue;
            };
            // `Str(x)`, `Int(200)`: keep what is inside the parentheses.
            let v = v
                .split_once('(')
                .and_then(|(_, rest)| rest.strip_suffix(')'))
                .unwrap_or(v)
                .to_owned();
            match spans.last_mut() {
                Some(span) if in_span => {
                    span.attributes.insert(k.to_owned(), v);
                }
                _ if k == "service.name" => service = v,
                _ => {}
            }
        } else if in_span && let Some((k, v)) = t.split_once(':') {
            let Some(span) = spans.last_mut() else {
                continue;
            };
            let v = v.trim().to_owned();
            match k.trim() {
                "Trace ID" => span.trace_id = v,
                "Parent ID" => span.parent_id = v,
                "ID" => span.span_id = v,
                "Name" => span.name = v,
                "Kind" => span.kind = v,
                _ => {}
            }
        }
    }
    spans
}

/// An HTTP app that answers with the request headers it received, as a flat JSON object
/// (lower-case names; repeated headers joined by `, `), which is what the trace-header tests
/// compare.
pub async fn header_app() -> HeaderApp {
    HeaderApp::serve(|req: &Request<Incoming>| {
        let mut seen = serde_json::Map::new();
        for name in req.headers().keys() {
            let values: Vec<&str> = req
                .headers()
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            seen.insert(name.as_str().to_owned(), values.join(", ").into());
        }
        serde_json::Value::Object(seen).to_string()
    })
    .await
}

/// A proxy's `/metrics`, parsed by the `prometheus-parse` crate.
pub async fn scrape(admin: SocketAddr) -> prometheus_parse::Scrape {
    let reply = HttpClient::http1()
        .get(admin, "admin", "/metrics", &[])
        .await
        .expect("GET /metrics");
    assert!(reply.status.is_success(), "/metrics: {}", reply.status);
    let text = reply.text();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{text}"));
    // Strict: every sample line names a metric the parser returned (none silently skipped).
    for line in text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.metric == name || s.metric == base),
            "/metrics line not understood by the parser: {line}"
        );
    }
    assert!(text.ends_with("# EOF\n"), "exposition is complete");
    scrape
}

/// The sum of the samples named `name` whose labels include all of `labels`.
pub fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            _ => 0.0,
        })
        .sum()
}

//! Command-line interface: the typed configuration of one proxy process.
//!
//! The flags are a contract with the end-to-end tests and the demo; change them together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use weft_proto::model::Protocol;
use weft_proto::validate::Limits;

use crate::limits::ServerLimits;

/// weft's data-plane sidecar.
#[derive(Debug, Clone, Parser)]
#[command(name = "weft-proxy", version, about)]
#[command(group(ArgGroup::new("source").required(true).args(["control_plane", "config"])))]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    /// Without a subcommand: run the proxy.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Control plane to stream configuration from, e.g. http://127.0.0.1:15010. Repeat to give
    /// fallbacks; they are tried in order on reconnect.
    #[arg(long = "control-plane", value_name = "URL", value_parser = parse_url)]
    pub control_plane: Vec<String>,

    /// Static mesh YAML (the control plane's format), used instead of a control plane.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where the local application sends its outgoing requests.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15001")]
    pub outbound_addr: SocketAddr,

    /// Where other proxies send requests for the local application; only with --app-addr.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15006")]
    pub inbound_addr: SocketAddr,

    /// The local application the inbound listener forwards to.
    #[arg(long, value_name = "ADDR")]
    pub app_addr: Option<SocketAddr>,

    /// Protocol to speak to the local application; auto = what the downstream spoke.
    #[arg(long, value_enum, default_value_t = AppProtocol::Auto)]
    pub app_protocol: AppProtocol,

    /// Admin listener: /ready, /live, /config.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Unique id of this proxy; default hostname-pid.
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,

    /// The service this proxy fronts.
    #[arg(long, value_name = "NAME", default_value = "")]
    pub service: String,

    #[arg(long, value_name = "NS", default_value = "default")]
    pub namespace: String,

    /// A label of this proxy's node, K=V; repeatable.
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// Once every listener is bound, write their addresses here as JSON (atomically).
    #[arg(long, value_name = "PATH")]
    pub addr_file: Option<PathBuf>,

    /// Upper bound in bytes on one compiled match regex; larger configs are refused (NACK).
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().regex_size_limit)]
    pub regex_size_limit: usize,

    /// Log filter, tracing EnvFilter syntax (e.g. info,weft_proxy=debug).
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log: String,

    /// Export trace spans over OTLP to this collector, e.g. http://127.0.0.1:4318 for
    /// OTLP/HTTP (`/v1/traces` is appended) or http://127.0.0.1:4317 with `--otlp-protocol
    /// grpc`. Without it the proxy neither starts spans nor touches trace headers.
    #[arg(long, value_name = "URL", value_parser = parse_otlp_url)]
    pub otlp_endpoint: Option<String>,

    /// How spans go to `--otlp-endpoint`: protobuf over HTTP, or gRPC (HTTP/2, no TLS).
    #[arg(
        long,
        value_name = "PROTOCOL",
        value_enum,
        default_value = "http/protobuf"
    )]
    pub otlp_protocol: crate::trace::OtlpProtocol,

    /// Share of new traces (requests without a sampling decision) to sample, 0..=1;
    /// a caller's decision is always followed.
    #[arg(long, value_name = "RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    pub trace_sample_ratio: f64,

    /// Write one JSON line per request to `stdout` or to this file (appended). Off by default.
    #[arg(long, value_name = "stdout|PATH")]
    pub access_log: Option<crate::access_log::Target>,

    /// Share of requests written to the access log, 0..=1.
    #[arg(long, value_name = "RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    pub access_log_sample: f64,
    /// How often outbound traffic counters are reported to the control plane (for
    /// experiments), e.g. 1s or 100ms.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_stats_interval)]
    pub stats_interval: std::time::Duration,

    /// Service account this proxy's workload runs as. Turns on workload identity: the proxy
    /// gets a SPIFFE certificate from the control plane (not ready until it has one), speaks
    /// mTLS to destinations that have an identity and accepts mTLS on its inbound listener.
    #[arg(long, value_name = "SA", requires_all = ["identity_token_file", "control_plane"])]
    pub service_account: Option<String>,

    /// File holding the proof of identity sent with each certificate request (the bootstrap
    /// token from `weftctl token`); read again on every renewal.
    #[arg(long, value_name = "FILE", requires = "service_account")]
    pub identity_token_file: Option<PathBuf>,

    /// Roots (PEM) to verify an https:// control plane with (its trust bundle).
    #[arg(long, value_name = "FILE")]
    pub control_plane_ca: Option<PathBuf>,

    /// SPIFFE trust domain (must match the control plane's).
    #[arg(long, value_name = "DOMAIN", default_value = "weft.local")]
    pub trust_domain: String,

    /// Open connections per traffic listener (outbound, inbound); more are answered 503
    /// (`x-weft-reason: max_connections`) and closed. 0 = unlimited.
    #[arg(long, value_name = "N", default_value_t = ServerLimits::default().max_connections)]
    pub max_connections: usize,

    /// Time a client has to send a request head (HTTP/1 also: to start the next request on
    /// a kept-alive connection), e.g. 30s.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Largest request head in bytes (request line and headers); larger ones get 431.
    #[arg(long, value_name = "BYTES", default_value_t = ServerLimits::default().max_header_bytes,
          value_parser = clap::value_parser!(u32).range(1024..=(16 << 20)).map(|v| v as usize))]
    pub max_header_bytes: usize,

    /// Most headers in one request; more get 431.
    #[arg(long, value_name = "N", default_value_t = ServerLimits::default().max_headers,
          value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    pub max_headers: usize,

    /// HTTP/2 streams one downstream connection may have open at once.
    #[arg(long, value_name = "N", default_value_t = ServerLimits::default().h2_max_concurrent_streams,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub h2_max_concurrent_streams: u32,

    /// Interval of HTTP/2 PINGs to downstream connections (a peer that does not answer within
    /// 20 s is disconnected); 0 = no pings.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub h2_keepalive_interval: Duration,

    /// A downstream connection without a new request for this long is closed gracefully.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Requests served on one downstream connection before it is closed gracefully
    /// (HTTP/1 `connection: close`, HTTP/2 GOAWAY); 0 = unlimited.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_requests_per_connection: u64,

    /// Requests per second one downstream connection may send (bursts of as many); more get
    /// 429 (`x-weft-reason: connection_rate_limited`). 0 = unlimited.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_request_rate_per_connection: u32,

    /// Transparent mode (pods after `weft-proxy init`): the outbound listener takes captured
    /// connections and routes them by their original destination; the inbound listener
    /// (always bound) sends captured connections to 127.0.0.1:<original port>.
    #[arg(long)]
    pub transparent: bool,

    /// Ports passed through as opaque TCP without protocol detection (server-speaks-first
    /// protocols), comma-separated; transparent mode only.
    #[arg(long, value_name = "PORTS", default_value = crate::intercept::DEFAULT_OPAQUE_PORTS,
          value_parser = crate::intercept::rules::parse_ports)]
    pub opaque_ports: ::std::vec::Vec<u16>,

    /// How long protocol detection waits for a captured client's first bytes before treating
    /// the connection as opaque TCP.
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub detect_timeout: std::time::Duration,

    /// Where captured connections to destinations outside the mesh go (Istio's
    /// `outboundTrafficPolicy`): `allow-any` passes them through, `registry-only` closes them
    /// (`listener="blackhole"` counters), so a workload reaches only what the mesh declares.
    /// Transparent mode only; the injector sets it from the pod's
    /// `weft.io/outbound-traffic-policy` annotation.
    #[arg(long, value_name = "POLICY", default_value = "allow-any")]
    pub outbound_traffic_policy: OutboundTrafficPolicy,

    /// The app's original HTTP probes, JSON `{"<container>/<probe>": <httpGet>}` (what the
    /// injector stores in the `weft.io/app-probes` annotation); served on the admin port as
    /// `/app-health/<container>/<probe>`.
    #[arg(long, value_name = "JSON", env = "WEFT_APP_PROBES")]
    pub app_probes: Option<String>,

    /// The zone this proxy runs in (the injector passes the pod's
    /// `topology.kubernetes.io/zone` label). Services whose load balancer sets
    /// `prefer_local_zone` keep this proxy's requests on endpoints labelled with the same
    /// `zone` while enough of them are available. Empty: no zone.
    #[arg(long, value_name = "ZONE", env = "WEFT_ZONE")]
    pub zone: Option<String>,

    /// Runtime worker threads; default: the number of available cores.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: Option<u16>,
}

/// `weft-proxy <command>`.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Install the interception iptables rules in this network namespace (the init container).
    Init(crate::intercept::init::InitArgs),
    /// Wait until the proxy's admin `/ready` answers 200 (the legacy sidecar's postStart hook).
    WaitReady(crate::health::WaitReadyArgs),
}

/// `--outbound-traffic-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutboundTrafficPolicy {
    AllowAny,
    RegistryOnly,
}

/// `--app-protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AppProtocol {
    Auto,
    Http1,
    Http2,
}

impl From<AppProtocol> for Protocol {
    fn from(p: AppProtocol) -> Self {
        match p {
            AppProtocol::Auto => Protocol::Auto,
            AppProtocol::Http1 => Protocol::Http1,
            AppProtocol::Http2 => Protocol::Http2,
        }
    }
}

impl Args {
    /// The downstream limits of the traffic listeners.
    pub fn server_limits(&self) -> ServerLimits {
        ServerLimits {
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout,
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers,
            h2_max_concurrent_streams: self.h2_max_concurrent_streams,
            h2_keepalive_interval: (!self.h2_keepalive_interval.is_zero())
                .then_some(self.h2_keepalive_interval),
            idle_timeout: self.idle_timeout,
            max_requests_per_connection: self.max_requests_per_connection,
            max_request_rate_per_connection: self.max_request_rate_per_connection,
            ..ServerLimits::default()
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            regex_size_limit: self.regex_size_limit,
        }
    }

    /// The identity settings, when `--service-account` is given.
    pub fn identity(&self) -> Option<crate::identity::IdentityOptions> {
        Some(crate::identity::IdentityOptions {
            trust_domain: self.trust_domain.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone()?,
            token_file: self.identity_token_file.clone()?,
            control_plane: self.control_plane.clone(),
        })
    }

    /// `--node-id`, or `hostname-pid`.
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}

fn parse_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(_)) => Ok(s.to_owned()),
        (Some("https"), Some(_)) => Ok(s.to_owned()),
        _ => Err("expected a URL like http://127.0.0.1:15010".into()),
    }
}

fn parse_otlp_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(_)) => Ok(s.to_owned()),
        _ => Err("expected an OTLP URL like http://127.0.0.1:4318 (gRPC: :4317)".into()),
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("expected a number from 0 to 1, got {s:?}")),
    }
}

fn parse_stats_interval(s: &str) -> Result<std::time::Duration, String> {
    let ms: weft_proto::model::Millis = s.parse()?;
    if ms.0 < 100 {
        return Err("the stats interval must be at least 100ms".into());
    }
    Ok(ms.as_duration())
}

/// A duration like `30s`, `250ms` or `5m` (the mesh config's syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let ms: weft_proto::model::Millis = s.parse()?;
    Ok(ms.as_duration())
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected K=V, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("weft-proxy").chain(args.iter().copied()))
    }

    #[test]
    fn exactly_one_source_is_required() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--config", "m.yaml", "--control-plane", "http://a:1"]).is_err());
        let a = parse(&[
            "--control-plane",
            "http://a:1",
            "--control-plane",
            "http://b:2",
        ])
        .unwrap();
        assert_eq!(a.control_plane.len(), 2);
        assert!(parse(&["--control-plane", "a:1"]).is_err());
    }

    #[test]
    fn defaults_and_labels() {
        let a = parse(&[
            "--config",
            "m.yaml",
            "--label",
            "version=v1",
            "--label",
            "x=",
        ])
        .unwrap();
        assert_eq!(a.outbound_addr.to_string(), "127.0.0.1:15001");
        assert_eq!(a.inbound_addr.to_string(), "0.0.0.0:15006");
        assert_eq!(a.admin_addr.to_string(), "127.0.0.1:15000");
        assert_eq!(a.namespace, "default");
        assert_eq!(a.regex_size_limit, 1 << 20);
        assert_eq!(
            a.labels,
            [("version".into(), "v1".into()), ("x".into(), String::new())]
        );
        assert!(parse(&["--config", "m", "--label", "novalue"]).is_err());
        assert!(a.node_id().ends_with(&format!("-{}", std::process::id())));
        assert_eq!(
            (a.otlp_endpoint.as_deref(), a.trace_sample_ratio),
            (None, 1.0)
        );
        assert_eq!(a.otlp_protocol, crate::trace::OtlpProtocol::HttpProtobuf);
        let g = parse(&["--config", "m", "--otlp-protocol", "grpc"]).unwrap();
        assert_eq!(g.otlp_protocol, crate::trace::OtlpProtocol::Grpc);
        assert!(parse(&["--config", "m", "--otlp-protocol", "thrift"]).is_err());
        assert!(a.access_log.is_none());
        assert_eq!(a.server_limits(), ServerLimits::default());
        assert!(!a.transparent);
        assert!(a.opaque_ports.contains(&3306));
        assert_eq!(a.detect_timeout, Duration::from_millis(100));
    }

    #[test]
    fn limit_flags() {
        let a = parse(&[
            "--config",
            "m",
            "--max-connections",
            "10",
            "--header-read-timeout",
            "1500ms",
            "--max-header-bytes",
            "8192",
            "--h2-keepalive-interval",
            "0s",
            "--max-requests-per-connection",
            "3",
        ])
        .unwrap();
        let l = a.server_limits();
        assert_eq!(l.max_connections, 10);
        assert_eq!(l.header_read_timeout, Duration::from_millis(1500));
        assert_eq!(l.max_header_bytes, 8192);
        assert_eq!(l.h2_keepalive_interval, None);
        assert_eq!(l.max_requests_per_connection, 3);
        assert!(parse(&["--config", "m", "--max-header-bytes", "10"]).is_err());
        assert!(parse(&["--config", "m", "--idle-timeout", "soon"]).is_err());
    }

    #[test]
    fn subcommands_need_no_config_source() {
        let a = parse(&[
            "init",
            "--proxy-uid",
            "1337",
            "--exclude-inbound-ports",
            "15020",
        ])
        .unwrap();
        match a.command {
            Some(Command::Init(init)) => assert_eq!(init.exclude_inbound_ports, [15020]),
            other => panic!("{other:?}"),
        }
        let a = parse(&["wait-ready", "--timeout", "60s"]).unwrap();
        assert!(matches!(a.command, Some(Command::WaitReady(_))));
        assert!(parse(&["init", "--exclude-inbound-ports", "x"]).is_err());
        let a = parse(&[
            "--config",
            "m",
            "--transparent",
            "--opaque-ports",
            "3306,7000",
        ])
        .unwrap();
        assert_eq!(
            (a.transparent, a.opaque_ports.as_slice()),
            (true, &[3306, 7000][..])
        );
        assert_eq!(a.outbound_traffic_policy, OutboundTrafficPolicy::AllowAny);
        let a = parse(&[
            "--config",
            "m",
            "--transparent",
            "--outbound-traffic-policy",
            "registry-only",
        ])
        .unwrap();
        assert_eq!(
            a.outbound_traffic_policy,
            OutboundTrafficPolicy::RegistryOnly
        );
        assert!(parse(&["--config", "m", "--outbound-traffic-policy", "deny"]).is_err());
    }

    #[test]
    fn observability_flags() {
        let a = parse(&[
            "--config",
            "m",
            "--otlp-endpoint",
            "http://127.0.0.1:4318",
            "--trace-sample-ratio",
            "0.5",
            "--access-log",
            "stdout",
            "--access-log-sample",
            "0.1",
        ])
        .unwrap();
        assert_eq!(a.trace_sample_ratio, 0.5);
        assert_eq!(a.access_log, Some(crate::access_log::Target::Stdout));
        assert!(parse(&["--config", "m", "--trace-sample-ratio", "2"]).is_err());
        assert!(parse(&["--config", "m", "--otlp-endpoint", "127.0.0.1:4318"]).is_err());
    }
}

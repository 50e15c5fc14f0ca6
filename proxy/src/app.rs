//! Wiring: from parsed [`Args`] to running listeners, config client and admin port.
//!
//! Order matters: a static configuration is loaded before any port is bound, so a bad file
//! fails fast; the address file is written only once every listener is bound, so whoever
//! polls it can connect at once.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use weft_proto::validate::ConfigError;
use weft_proto::{parse_yaml, to_resources};

use crate::access_log::AccessLog;
use crate::admin::{self, Admin};
use crate::cli::Args;
use crate::forward::{Forwarder, Mode};
use crate::identity::mesh::MeshClient;
use crate::identity::{self, Identity};
use crate::inbound;
use crate::intercept::{self, Transparent};
use crate::limits::ListenerLimits;
use crate::metrics::{Direction, ProxyMetrics, TargetLabels};
use crate::observe::Telemetry;
use crate::server::{self, Shutdown};
use crate::state::{ApplyError, ProxyState, Source};
use crate::trace::{ExportConfig, Exporter, Tracer};
use crate::upstream::Upstream;
use crate::xds::{self, NodeInfo};

/// How long in-flight connections get to finish after shutdown is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read config file {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    InvalidConfig(#[from] ConfigError),
    #[error("{0}: {1}")]
    ApplyConfig(String, #[source] ApplyError),
    #[error("cannot bind the {name} listener to {addr}: {source}")]
    Bind {
        name: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    AppProbes(#[from] crate::health::ProbeError),
    #[error("invalid --otlp-endpoint {0:?}")]
    OtlpEndpoint(String),
    #[error("cannot open the access log {path}: {source}")]
    AccessLog {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the address file {path}: {source}")]
    AddrFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl StartError {
    /// A problem with the configuration the operator gave (exit code 2), not with the host.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            StartError::ReadConfig { .. }
                | StartError::InvalidConfig(_)
                | StartError::ApplyConfig(..)
                | StartError::OtlpEndpoint(_)
                | StartError::AppProbes(_)
                | StartError::AccessLog { .. }
        )
    }
}

/// The addresses actually bound (useful with port 0).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub outbound: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    pub addrs: BoundAddrs,
    pub state: Arc<ProxyState>,
    pub telemetry: Arc<Telemetry>,
    /// Stops the traffic listeners (also what `POST /drain` triggers).
    traffic: Arc<Shutdown>,
    /// Stops the admin listener, last.
    shutdown: Shutdown,
    servers: Vec<JoinHandle<()>>,
    config_client: Option<JoinHandle<()>>,
    stats_reporter: Option<JoinHandle<()>>,
    renewal: Option<JoinHandle<()>>,
}

/// Loads the configuration source, binds every listener and starts serving.
pub async fn start(args: &Args) -> Result<Proxy, StartError> {
    let telemetry = telemetry(args)?;
    let state = Arc::new(
        ProxyState::with_metrics(args.limits(), telemetry.metrics.clone())
            .in_zone(args.zone.as_deref()),
    );
    if let Some(path) = &args.control_plane_ca {
        let pem = std::fs::read_to_string(path).map_err(|source| StartError::ReadConfig {
            path: path.clone(),
            source,
        })?;
        identity::set_control_plane_ca(pem);
    }
    if let Some(path) = &args.config {
        load_file(path, &state)?;
    }
    // The injector passes the pod annotation through the downward API, which gives an empty
    // value when the pod has no probes to rewrite.
    let probes = match args.app_probes.as_deref().map(str::trim) {
        Some(json) if !json.is_empty() => Some(Arc::new(crate::health::AppProbes::parse(json)?)),
        _ => None,
    };

    let outbound = bind("outbound", args.outbound_addr).await?;
    // Transparent mode needs no --app-addr: the app port is each connection's original port.
    let inbound = match args.app_addr.is_some() || args.transparent {
        true => Some(bind("inbound", args.inbound_addr).await?),
        false => None,
    };
    let admin = bind("admin", args.admin_addr).await?;
    let addrs = BoundAddrs {
        outbound: outbound.1,
        inbound: inbound.as_ref().map(|l| l.1),
        admin: admin.1,
    };
    let (outbound, inbound, admin) = (outbound.0, inbound.map(|l| l.0), admin.0);

    let (shutdown, admin_signal) = Shutdown::new();
    let (traffic, signal) = Shutdown::new();
    let traffic = Arc::new(traffic);
    let upstream = Upstream::new();
    let mut servers = Vec::new();

    // Workload identity: certified (and renewed) in the background; /ready waits for it.
    let mut renewal = None;
    let identity = args.identity().map(|opts| {
        let identity = Arc::new(Identity::default());
        let _ = state.security.identity.set(identity.clone());
        renewal = Some(tokio::spawn(identity::run(opts, identity.clone())));
        identity
    });
    let mesh = identity.clone().map(MeshClient::new);

    let outbound_svc = Forwarder::with(
        Mode::Outbound(state.clone()),
        upstream.clone(),
        telemetry.clone(),
        mesh,
    );
    let listener_limits = |name, direction| {
        let metrics = &telemetry.metrics;
        ListenerLimits::new(
            name,
            args.server_limits(),
            metrics.conn_counters(name),
            metrics.limit_counters(name, direction),
        )
    };
    let outbound_limits = listener_limits("outbound", Direction::Outbound);
    let transparent = args.transparent.then(|| Transparent {
        opaque_ports: args.opaque_ports.clone().into(),
        detect_timeout: args.detect_timeout,
        registry_only: args.outbound_traffic_policy
            == crate::cli::OutboundTrafficPolicy::RegistryOnly,
    });
    if let Some(transparent) = &transparent {
        let ctx = intercept::outbound::Outbound {
            state: state.clone(),
            fwd: outbound_svc,
            transparent: transparent.clone(),
            opaque: telemetry.metrics.conn_counters("passthrough"),
            tunnels: telemetry.metrics.conn_counters("mesh_tcp"),
            blackhole: telemetry.metrics.conn_counters("blackhole"),
        };
        // iptables REDIRECT sends captured IPv6 connections to [::1]: listen there too when
        // the outbound address is IPv4 loopback and the host has IPv6.
        if args.outbound_addr.ip().is_loopback() && args.outbound_addr.is_ipv4() {
            let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addrs.outbound.port()));
            match intercept::bind_v6_only(std::net::Ipv6Addr::LOCALHOST, v6.port()) {
                Ok(l) => servers.push(tokio::spawn(intercept::outbound::serve(
                    l,
                    ctx.clone(),
                    signal.clone(),
                    SHUTDOWN_GRACE,
                    outbound_limits.clone(),
                ))),
                Err(error) => tracing::debug!(%v6, %error, "no IPv6 outbound listener"),
            }
        }
        servers.push(tokio::spawn(intercept::outbound::serve(
            outbound,
            ctx,
            signal.clone(),
            SHUTDOWN_GRACE,
            outbound_limits,
        )));
    } else {
        servers.push(tokio::spawn(server::serve_limited(
            outbound,
            service_fn(move |req| {
                let fwd = outbound_svc.clone();
                async move { Ok::<_, std::convert::Infallible>(fwd.serve(req).await) }
            }),
            signal.clone(),
            SHUTDOWN_GRACE,
            outbound_limits,
        )));
    }

    if let Some(listener) = inbound {
        // Transparent mode without --app-addr: only captured connections are served, each
        // sent to its own original port; this authority is never used.
        let app = args
            .app_addr
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
            .to_string()
            .parse()
            .expect("a socket address is a valid authority");
        let mode = Mode::Inbound {
            app,
            protocol: args.app_protocol.into(),
        };
        // The guard authenticates and authorizes before forwarding; it observes every answer,
        // its own refusals included.
        let inbound_svc = Forwarder::with_telemetry(mode, upstream, telemetry.clone());
        let guard = inbound::Guard::new(
            state.clone(),
            &args.service,
            inbound_svc,
            telemetry.metrics.conn_counters("inbound_mesh_tcp"),
        );
        let captured = transparent.map(|transparent| inbound::Captured {
            transparent,
            has_app_addr: args.app_addr.is_some(),
            opaque: telemetry.metrics.conn_counters("inbound_passthrough"),
        });
        // One connection budget for the inbound port, whichever address family it is on.
        let inbound_limits = listener_limits("inbound", Direction::Inbound);
        // Captured IPv6 arrives at [::]:<inbound port>; with an IPv4 wildcard inbound address
        // listen there too (IPv6-only, so the two do not clash).
        if captured.is_some() && args.inbound_addr.ip() == std::net::Ipv4Addr::UNSPECIFIED {
            let port = addrs.inbound.map_or(0, |a| a.port());
            match intercept::bind_v6_only(std::net::Ipv6Addr::UNSPECIFIED, port) {
                Ok(l) => servers.push(tokio::spawn(inbound::serve(
                    l,
                    guard.clone(),
                    identity.clone(),
                    captured.clone(),
                    signal.clone(),
                    SHUTDOWN_GRACE,
                    inbound_limits.clone(),
                ))),
                Err(error) => tracing::debug!(port, %error, "no IPv6 inbound listener"),
            }
        }
        servers.push(tokio::spawn(inbound::serve(
            listener,
            guard,
            identity,
            captured,
            signal.clone(),
            SHUTDOWN_GRACE,
            inbound_limits,
        )));
    }

    let admin_ctx = Arc::new(
        Admin::new(state.clone(), telemetry.clone(), Some(traffic.clone())).with_probes(probes),
    );
    servers.push(tokio::spawn(server::serve(
        "admin",
        admin,
        service_fn(move |req| admin::handle(admin_ctx.clone(), req)),
        admin_signal,
        SHUTDOWN_GRACE,
    )));

    let config_client = (!args.control_plane.is_empty()).then(|| {
        let node = NodeInfo {
            id: args.node_id(),
            service: args.service.clone(),
            namespace: args.namespace.clone(),
            labels: args.labels.iter().cloned().collect(),
            admin_addr: addrs.admin.to_string(),
        };
        let client = xds::Client::new(args.control_plane.clone(), node, state.clone());
        tokio::spawn(client.run())
    });

    let stats_reporter = (!args.control_plane.is_empty()).then(|| {
        tokio::spawn(crate::stats::report_loop(
            args.control_plane.clone(),
            args.node_id(),
            args.stats_interval,
        ))
    });

    if let Some(path) = &args.addr_file {
        write_addr_file(path, &addrs).map_err(|source| StartError::AddrFile {
            path: path.clone(),
            source,
        })?;
    }
    tracing::info!(
        outbound = %addrs.outbound,
        inbound = ?addrs.inbound,
        admin = %addrs.admin,
        "weft-proxy listening"
    );

    Ok(Proxy {
        addrs,
        state,
        telemetry,
        traffic,
        shutdown,
        servers,
        config_client,
        stats_reporter,
        renewal,
    })
}

impl Proxy {
    /// Stops accepting, lets in-flight connections finish (up to [`SHUTDOWN_GRACE`]) and
    /// stops the config client.
    pub async fn shutdown(self) {
        self.traffic.trigger();
        self.shutdown.trigger();
        if let Some(renewal) = &self.renewal {
            renewal.abort();
        }
        if let Some(client) = &self.config_client {
            client.abort();
        }
        if let Some(reporter) = &self.stats_reporter {
            reporter.abort();
        }
        for server in self.servers {
            let _ = server.await;
        }
    }
}

/// Metrics always; tracing with `--otlp-endpoint`; access logs with `--access-log`.
fn telemetry(args: &Args) -> Result<Arc<Telemetry>, StartError> {
    let metrics = Arc::new(ProxyMetrics::new());
    let tracer = match &args.otlp_endpoint {
        Some(endpoint) => {
            let mut config = ExportConfig::new(endpoint.clone());
            config.protocol = args.otlp_protocol;
            let service = if args.service.is_empty() {
                "weft-proxy".to_owned()
            } else {
                args.service.clone()
            };
            config.resource = vec![
                ("service.name", service),
                ("service.namespace", args.namespace.clone()),
                ("service.instance.id", args.node_id()),
                ("telemetry.sdk.name", "weft-proxy".to_owned()),
            ];
            let exporter = Exporter::spawn(config, metrics.clone())
                .map_err(|_| StartError::OtlpEndpoint(endpoint.clone()))?;
            Some(Tracer::new(args.trace_sample_ratio, exporter))
        }
        None => None,
    };
    let access_log = match &args.access_log {
        Some(target) => Some(
            AccessLog::start(target, args.access_log_sample, metrics.clone()).map_err(
                |source| StartError::AccessLog {
                    path: format!("{target:?}"),
                    source,
                },
            )?,
        ),
        None => None,
    };
    // Inbound requests are labelled with the local service and its `version` label, so a
    // canary's server side is visible as its own subset.
    let version = args
        .labels
        .iter()
        .find(|(k, _)| k == "version")
        .map_or("", |(_, v)| v.as_str());
    let inbound = TargetLabels::new("", &args.service, version);
    Ok(Arc::new(Telemetry::new(
        metrics, tracer, access_log, inbound,
    )))
}

/// Reads and applies a static configuration through the same path as streamed ones.
fn load_file(path: &Path, state: &ProxyState) -> Result<(), StartError> {
    let text = std::fs::read_to_string(path).map_err(|source| StartError::ReadConfig {
        path: path.to_owned(),
        source,
    })?;
    let name = path.display().to_string();
    let cfg = parse_yaml(&name, &text, state.limits())?;
    state
        .apply(&to_resources(&cfg), 1, Source::File)
        .map_err(|e| StartError::ApplyConfig(name, e))
}

/// Binds `addr` and returns the listener with the address actually bound.
async fn bind(
    name: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind { name, addr, source };
    let listener = crate::limits::listen(addr).map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}

/// Writes the bound addresses as JSON to a temp file beside `path`, then renames it into
/// place, so a reader sees either no file or the whole file.
fn write_addr_file(path: &Path, addrs: &BoundAddrs) -> io::Result<()> {
    let json = serde_json::json!({
        "outbound": addrs.outbound.to_string(),
        "inbound": addrs.inbound.map(|a| a.to_string()),
        "admin": addrs.admin.to_string(),
    });
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, format!("{json}\n"))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

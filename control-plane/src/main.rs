//! `weft-control`: the control-plane binary. Parses flags, validates the source, binds the
//! config stream and admin listeners, and serves until SIGTERM/ctrl-c.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use weft_control::server::{self, ControlPlane, Options};
use weft_control::shutdown;
use weft_control::source::Source;

/// How long open streams and requests get to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// weft's control plane: serves the mesh configuration to every proxy.
#[derive(Debug, Parser)]
#[command(name = "weft-control", version)]
struct Args {
    /// Mesh YAML file; without it, the embedded demo mesh. The file is watched: a valid edit
    /// becomes the live config (replacing changes made through the API), an invalid one is
    /// refused and the current config stays.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for persistent state; without it, state is kept in memory only.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Address of the gRPC config stream.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15010")]
    grpc_addr: SocketAddr,
    /// Address of the admin JSON API.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15014")]
    admin_addr: SocketAddr,
    /// After binding, write {"grpc": "ip:port", "admin": "ip:port", "webhook": ...} here.
    #[arg(long, value_name = "PATH")]
    addr_file: Option<PathBuf>,
    /// How often the config file is checked for changes, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..))]
    watch_interval: u64,
    /// Only validate --config and exit: 0 if valid, 2 if not.
    #[arg(long)]
    check: bool,
    /// SPIFFE trust domain of workload identities (spiffe://<domain>/ns/<ns>/sa/<sa>).
    #[arg(long, value_name = "DOMAIN", default_value = "weft.local")]
    trust_domain: String,
    /// Lifetime of workload certificates, e.g. 24h is 1440m; 30s; 500ms.
    #[arg(long, value_name = "DURATION", default_value = "1440m")]
    cert_ttl: weft_proto::model::Millis,
    /// Signing CA certificate (PEM: it first, then its chain; a self-signed last one is the
    /// root). Without it, a root is generated (and kept in --state-dir/ca/).
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Private key of --ca-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Extra trusted roots (PEM), e.g. the previous root during a rotation.
    #[arg(long, value_name = "FILE")]
    trust_bundle: Option<PathBuf>,
    /// Serve the gRPC port over TLS, with a certificate the CA issues to the control plane
    /// (proxies then use https:// and --control-plane-ca with the bundle from
    /// GET /api/v1/identity/bundle).
    #[arg(long)]
    grpc_tls: bool,
    #[command(flatten)]
    webhook: weft_control::webhook::WebhookArgs,
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. "info,weft_control=debug".
    #[arg(long, value_name = "FILTER", default_value = "info")]
    log: String,
}

/// Exit code for an invalid configuration (also `--check`).
const EXIT_INVALID: u8 = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    let source = args.config.clone().map_or(Source::Embedded, Source::File);
    // Read and validate before anything else: a bad file is the operator's most common
    // mistake and gets its own exit code, with file:line.
    let loaded = match source.load() {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    if args.check {
        println!(
            "{}: ok ({} services, {} routes)",
            source.name(),
            loaded.config.services.len(),
            loaded.config.routes.len()
        );
        return ExitCode::SUCCESS;
    }
    if let Err(e) = init_tracing(&args.log) {
        eprintln!("error: {e:#}");
        return ExitCode::from(EXIT_INVALID);
    }
    let opts = Options {
        source,
        state_dir: args.state_dir.clone(),
        grpc_addr: args.grpc_addr,
        admin_addr: args.admin_addr,
        watch_interval: Duration::from_millis(args.watch_interval),
        ca: weft_control::ca::CaOptions {
            trust_domain: args.trust_domain.clone(),
            cert_ttl: args.cert_ttl.as_duration(),
            ca_cert: args.ca_cert.clone(),
            ca_key: args.ca_key.clone(),
            trust_bundle: args.trust_bundle.clone(),
        },
        grpc_tls: args.grpc_tls,
        webhook: args.webhook.options(),
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
        .and_then(|rt| rt.block_on(run(opts, loaded, args.addr_file)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    opts: Options,
    loaded: weft_control::source::Loaded,
    addr_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let cp = ControlPlane::bind(opts, loaded).await?;
    let mut signals = shutdown::OsSignals::install().context("cannot install signal handlers")?;
    if let Some(path) = &addr_file {
        server::write_addr_file(path, cp.grpc_addr(), cp.admin_addr(), cp.webhook_addr())?;
    }
    let (trigger, signal) = shutdown::channel();
    let mut serving = tokio::spawn(cp.serve(signal));
    tokio::select! {
        res = &mut serving => return Ok(res.context("control plane task failed")??),
        () = signals.recv() => trigger.fire(),
    }
    match tokio::time::timeout(DRAIN_TIMEOUT, serving).await {
        Ok(res) => Ok(res.context("control plane task failed")??),
        Err(_) => anyhow::bail!("open connections did not close within {DRAIN_TIMEOUT:?}"),
    }
}

fn init_tracing(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid --log filter {filter:?}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

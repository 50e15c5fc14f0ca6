//! `weft-control`: the control-plane binary. Parses flags, validates the source, binds the
//! config stream and admin listeners, and serves until SIGTERM/ctrl-c.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use weft_control::flags::Args;
use weft_control::server::{self, ControlPlane, Options};
use weft_control::shutdown;

/// How long open streams and requests get to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit code for an invalid configuration (also `--check`).
const EXIT_INVALID: u8 = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    let source = args.source();
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
    let opts = args.options();
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

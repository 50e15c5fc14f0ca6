//! The `weft-proxy` binary: parse flags, start logging and the runtime, run until SIGTERM or
//! ctrl-c, then drain.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use weft_proxy::app;
use weft_proxy::cli::{Args, Command};

/// Exit code for a configuration the operator must fix (same as clap's usage errors).
const EXIT_INVALID_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = init_tracing(&args.log) {
        eprintln!("weft-proxy: {e:#}");
        return ExitCode::FAILURE;
    }
    if let Some(command) = &args.command {
        return run_command(command);
    }
    // Connections are bounded by the listeners' limits, not by the default 1024 descriptors.
    match weft_proxy::limits::raise_nofile_limit() {
        Ok(n) => tracing::debug!(nofile = n, "open-files limit"),
        Err(e) => tracing::warn!("cannot raise the open-files limit: {e}"),
    }
    let workers = args.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    );
    // One worker: a current-thread runtime, as linkerd2-proxy does on one core. The multi-thread
    // scheduler with a single worker still pays for cross-thread wakeups between the main thread
    // and its worker, and its extra thread sleeps and wakes in epoll on every quiet moment.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let proxy = match app::start(&args).await {
        Ok(proxy) => proxy,
        Err(e) => {
            eprintln!("weft-proxy: {e}");
            return if e.is_config_error() {
                ExitCode::from(EXIT_INVALID_CONFIG)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    if let Err(e) = shutdown_signal().await {
        tracing::error!("cannot listen for shutdown signals: {e:#}");
    }
    tracing::info!(grace = ?app::SHUTDOWN_GRACE, "shutting down");
    proxy.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// `weft-proxy init` and `weft-proxy wait-ready`: one-shot, no runtime.
fn run_command(command: &Command) -> ExitCode {
    let result = match command {
        Command::Init(init) => weft_proxy::intercept::init::run(init).map_err(|e| e.to_string()),
        Command::WaitReady(wait) => weft_proxy::health::wait_ready(wait).map(|took| {
            println!("weft-proxy ready after {took:?}");
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(filter: &str) -> anyhow::Result<()> {
    // Through `log_level`, which keeps the reload handle for `POST /log-level`.
    weft_proxy::log_level::init(filter, std::io::stderr().is_terminal())
        .with_context(|| format!("--log {filter:?}"))
}

/// Resolves on ctrl-c or, on Unix, SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("ctrl-c handler")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("ctrl-c handler")?;
    Ok(())
}

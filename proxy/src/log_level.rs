//! The log filter, changeable at run time (`POST /log-level` on the admin port).
//!
//! The binary installs its subscriber with [`init`], which keeps the reload handle here; an
//! embedding without it (tests) gets a clear "not available" error instead.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("invalid log filter {filter:?}: {reason}")]
    Invalid { filter: String, reason: String },
    #[error("the log filter cannot be changed in this process")]
    Unavailable,
    #[error("cannot install the logger: {0}")]
    Init(String),
}

/// Installs the process's subscriber: `filter` (EnvFilter syntax) over a formatter writing
/// to stderr.
pub fn init(filter: &str, ansi: bool) -> Result<(), LogLevelError> {
    let filter = parse(filter)?;
    let (layer, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(layer)
        .with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
        .try_init()
        .map_err(|e| LogLevelError::Init(e.to_string()))?;
    let _ = HANDLE.set(handle);
    Ok(())
}

fn parse(filter: &str) -> Result<EnvFilter, LogLevelError> {
    EnvFilter::try_new(filter).map_err(|e| LogLevelError::Invalid {
        filter: filter.to_owned(),
        reason: e.to_string(),
    })
}

/// Replaces the running filter; returns it as now in force.
pub fn set(filter: &str) -> Result<String, LogLevelError> {
    let filter = filter.trim();
    let parsed = parse(filter)?;
    let handle = HANDLE.get().ok_or(LogLevelError::Unavailable)?;
    handle
        .reload(parsed)
        .map_err(|_| LogLevelError::Unavailable)?;
    tracing::info!(filter, "log filter changed");
    Ok(current().unwrap_or_else(|| filter.to_owned()))
}

/// The running filter, when [`init`] installed one.
pub fn current() -> Option<String> {
    HANDLE.get()?.with_current(ToString::to_string).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_filters_are_refused_with_the_reason() {
        let err = set("info,[[[").unwrap_err();
        assert!(err.to_string().contains("invalid log filter"), "{err}");
    }
}

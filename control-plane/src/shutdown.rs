//! Graceful shutdown: one [`Trigger`] fired by the binary on SIGTERM/ctrl-c, observed by every
//! server, config stream and the file watcher through cloned [`Shutdown`] handles.
//!
//! Config streams are long-lived, so the servers' own graceful shutdown (which waits for open
//! requests) would never finish unless each stream also watches this signal and ends itself.

use tokio::sync::watch;

/// Fires the shutdown; dropping it fires it too, so a panicking owner cannot leave the
/// servers running forever.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

/// Resolves once shutdown was triggered.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }
}

impl Shutdown {
    /// Waits for shutdown; returns at once if it already happened.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means the trigger was dropped: shut down as well.
        let _ = rx.wait_for(|fired| *fired).await;
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }
}

/// SIGINT (ctrl-c) and, on Unix, SIGTERM (what Kubernetes and systemd send).
///
/// Handlers are installed by [`OsSignals::install`], before the process announces itself
/// (`--addr-file`): a signal arriving between "ready" and the first wait would otherwise
/// take the default action and kill the process without draining.
#[derive(Debug)]
pub struct OsSignals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl OsSignals {
    /// Must be called inside a tokio runtime.
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for the next signal.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => tracing::info!("SIGINT received, shutting down"),
            _ = self.term.recv() => tracing::info!("SIGTERM received, shutting down"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("ctrl-c received, shutting down");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_and_fires_on_drop() {
        let (trigger, shutdown) = channel();
        assert!(!shutdown.is_triggered());
        trigger.fire();
        shutdown.wait().await;
        assert!(shutdown.is_triggered());

        let (trigger, shutdown) = channel();
        drop(trigger);
        shutdown.wait().await;
        assert!(shutdown.is_triggered());
    }
}

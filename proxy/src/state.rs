//! The configuration the proxy runs: an atomically swapped [`Snapshot`] plus what the admin
//! port reports about where it came from.
//!
//! Every configuration, streamed or read from a file, goes through [`ProxyState::apply`]:
//! wire resources → model → validation with this proxy's limits → compiled table → swap. Any
//! failure leaves the running snapshot untouched.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, Guard};
use weft_proto::validate::Limits;
use weft_proto::{ConvertError, MeshConfig, Resources, from_resources};

use crate::resilience::Registry;
use crate::routing::{CompileError, Table};

/// Why a configuration was not applied; the message goes into the NACK.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot read resources: {0}")]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Security(#[from] crate::jwt::JwtError),
}

/// Where the running configuration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    ControlPlane,
    File,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::ControlPlane => "control-plane",
            Source::File => "file",
        }
    }
}

/// One applied configuration version: the compiled table the request path uses and the model
/// `/config` shows. Immutable.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub table: Table,
    /// 0 until a first configuration is applied.
    pub version: u64,
    /// `None` until a first configuration is applied.
    pub source: Option<Source>,
    pub applied_at_unix_ms: u64,
    pub config: MeshConfig,
    /// Identities and inbound policies per service (issue 4).
    pub security: crate::policy::SecurityTable,
}

/// A configuration this proxy refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    pub version: u64,
    pub error: String,
}

/// What the admin port reports about the control-plane connection.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub connected: bool,
    /// The control plane connected to, or last tried.
    pub address: Option<String>,
    pub last_nack: Option<Nack>,
}

/// Shared by the listeners (read), the config client (write) and the admin port (read).
#[derive(Debug)]
pub struct ProxyState {
    snapshot: ArcSwap<Snapshot>,
    limits: Limits,
    /// Resilience state that survives configuration swaps.
    registry: Registry,
    /// Rarely written, read by `/config`; never held across an `.await`.
    status: Mutex<Status>,
    /// Certificate status and authorization counters.
    pub security: crate::policy::SecurityState,
}

impl ProxyState {
    pub fn new(limits: Limits) -> Self {
        Self::with_registry(limits, Registry::default())
    }

    /// A state whose resilience counters (outlier ejections) land in `metrics`.
    pub fn with_metrics(limits: Limits, metrics: Arc<crate::metrics::ProxyMetrics>) -> Self {
        Self::with_registry(limits, Registry::with_metrics(metrics))
    }

    /// This proxy's zone (`--zone`), for zone-aware load balancing.
    pub fn in_zone(mut self, zone: Option<&str>) -> Self {
        self.registry.set_zone(zone);
        self
    }

    fn with_registry(limits: Limits, registry: Registry) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            limits,
            registry,
            status: Mutex::new(Status::default()),
            security: crate::policy::SecurityState::default(),
        }
    }

    /// The running snapshot. Meant to be held for the synchronous part of a request only.
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub fn load_full(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// True once a first configuration has been applied.
    pub fn is_ready(&self) -> bool {
        self.snapshot.load().source.is_some() && self.security.is_ready()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Converts, validates and compiles `resources`, then swaps them in as `version`.
    /// On error nothing changes.
    pub fn apply(
        &self,
        resources: &Resources,
        version: u64,
        source: Source,
    ) -> Result<(), ApplyError> {
        let config = from_resources(resources)?;
        let table = Table::compile_shared(&config, &self.limits, &self.registry)?;
        let security = crate::policy::SecurityTable::compile(&config, &self.registry)?;
        // Nothing can fail from here on.
        self.registry.commit(&config);
        let applied_at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        tracing::info!(
            version,
            source = source.as_str(),
            services = config.services.len(),
            routes = config.routes.len(),
            "configuration applied"
        );
        // In-flight requests keep the Arc they loaded; new ones see this from now on.
        self.snapshot.store(Arc::new(Snapshot {
            table,
            version,
            source: Some(source),
            applied_at_unix_ms,
            config,
            security,
        }));
        Ok(())
    }

    pub fn status(&self) -> Status {
        self.lock_status().clone()
    }

    pub fn record_nack(&self, version: u64, error: String) {
        self.lock_status().last_nack = Some(Nack { version, error });
    }

    pub fn set_control_plane(&self, connected: bool, address: Option<String>) {
        let mut status = self.lock_status();
        status.connected = connected;
        status.address = address;
    }

    fn lock_status(&self) -> MutexGuard<'_, Status> {
        // The status is plain data that a panicking writer cannot leave half-updated in a way
        // that matters, so a poisoned lock is used as is.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::{parse_yaml, to_resources};

    const MESH: &str = r#"
services:
  - {name: a, endpoints: [{address: "127.0.0.1:1"}]}
routes:
  - name: a
    hosts: [a]
    rules:
      - {match: {path: {regex: "/[a-z]{3}"}}, backends: [{service: a}]}
"#;

    #[test]
    fn a_refused_config_keeps_the_old_snapshot() {
        let state = ProxyState::new(Limits {
            regex_size_limit: 64 << 10,
        });
        assert!(!state.is_ready());
        let good = to_resources(&parse_yaml("m", MESH, &Limits::default()).unwrap());
        state.apply(&good, 1, Source::ControlPlane).unwrap();
        assert!(state.is_ready());
        let before = state.load_full();

        // Valid for the control plane's default limits, too big for this proxy's.
        let big = MESH.replace("[a-z]{3}", "[a-z]{5000}");
        let big = to_resources(&parse_yaml("m", &big, &Limits::default()).unwrap());
        let err = state.apply(&big, 2, Source::ControlPlane).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");

        let after = state.load_full();
        assert!(Arc::ptr_eq(&before, &after), "the old snapshot stays");
        assert_eq!(after.version, 1);
    }
}

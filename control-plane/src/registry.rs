//! The registry: the single owner of the live, versioned configuration and of what the control
//! plane knows about each proxy.
//!
//! Every change (a source file edit, `apply`, `set-weight`) goes through one path: validate,
//! bump the version by one (unless the result equals the live config), persist to the
//! [`Store`], then publish on a `watch` channel that every config stream follows. Mutations are
//! serialized by one async mutex, so versions are dense and the store always holds the newest;
//! readers (streams, the admin API) never take that mutex — they read the `watch` channel.
//!
//! Per-proxy status (connected, ACKed version, last NACK) lives beside it under a plain mutex
//! that is only held for a few field updates, never across an `.await`.
//!
//! Two layers: the *base* (the source file, `apply`, `set-weight`, experiments) and the
//! *discovered* layer (the latest Kubernetes translation, [`Registry::apply_discovered`]). The
//! served config is [`discovery::merge`]`(base, discovered)` — the base wins on a name clash.
//! Each mutation replaces one layer and keeps the other; validation applies to the merged
//! result, so a discovery snapshot that would make it invalid is refused like a bad file edit
//! (the last good config stays, the reason is in `last_discovery_error`). Both layers are saved
//! together in one state, so every replica and every restart serves the same merged config at
//! the same version.
//!
//! Discovered routes are owned by their HTTPRoute: `set-weight` and experiments on a route
//! that exists only in the discovered layer are refused with [`RegistryError::Discovered`],
//! naming the HTTPRoute. Progressive-delivery controllers (Flagger, Argo Rollouts' Gateway API
//! plugin) shift a canary by editing the HTTPRoute's weights; weft follows that edit, and a
//! second writer that the next HTTPRoute event would silently overwrite is worse than a clear
//! refusal. To drive such a route with weft's own experiments, define it in mesh.yaml (the
//! base then owns it).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tracing::info;
use weft_proto::ops::{self, OpError};
use weft_proto::{Issue, Limits, MeshConfig, Resources, pb, to_resources, validate};

use crate::api;
use crate::discovery;
use crate::metrics::ControlMetrics;
use crate::store::{Revisioned, Store, StoreError, StoredState};

/// How many NACKs `/api/v1/status` keeps over all proxies.
pub const NACK_LOG_LEN: usize = 100;

/// Disconnected proxies stay listed (operators want to see who went away), but not forever:
/// beyond this many, the longest-gone are forgotten so churn cannot grow memory unboundedly.
const MAX_DISCONNECTED: usize = 1024;

/// One version of the configuration, with its wire form computed once for every stream.
#[derive(Debug)]
pub struct Versioned {
    pub version: u64,
    pub config: MeshConfig,
    pub resources: Resources,
}

impl Versioned {
    pub fn new(version: u64, config: MeshConfig) -> Self {
        let resources = to_resources(&config);
        Self {
            version,
            config,
            resources,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The resulting configuration does not validate.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error(transparent)]
    Op(#[from] OpError),
    /// The route comes from the discovered layer; its owner (the HTTPRoute) sets its weights.
    #[error(
        "route {route:?} is discovered from Kubernetes and owned by {owner}: change the weights there (kubectl, Flagger, Argo Rollouts), or define the route in the mesh file to manage it with weft"
    )]
    Discovered { route: String, owner: String },
    /// Nothing was published: a change that is not durable would be lost (and its version
    /// reused) on restart.
    #[error("could not persist version {version}: {source}")]
    Store {
        version: u64,
        #[source]
        source: StoreError,
    },
}

/// The result of a mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The live version afterwards.
    pub version: u64,
    /// False when the change produced the config already live (the version did not move).
    pub changed: bool,
}

/// A handle on the registry; cheap to clone.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    source: String,
    store: Arc<dyn Store>,
    current: watch::Sender<Arc<Versioned>>,
    /// Serializes mutations; holds what the next save builds on.
    writer: tokio::sync::Mutex<Writer>,
    book: Mutex<Book>,
    metrics: ControlMetrics,
    /// Experiment records, persisted with the config; written under `writer` only.
    experiments: Mutex<Vec<crate::experiment::Record>>,
    /// Bumped when another replica's records are taken in.
    experiments_changed: watch::Sender<u64>,
    /// The two layers the live config merges; written under `writer` only, read by anyone.
    layers: Mutex<Layers>,
}

/// The base and discovered layers of the live config (see the module docs).
#[derive(Debug, Clone, Default)]
struct Layers {
    base: MeshConfig,
    discovered: MeshConfig,
}

#[derive(Debug)]
struct Writer {
    /// The hash of the source text the live config derives from, persisted with every save
    /// (see [`StoredState::source_hash`]).
    source_hash: u64,
    /// The store revision the live state was read or saved at; the next save names it.
    revision: u64,
}

/// What a mutation edits: a copy of the live state.
#[derive(Debug)]
struct Change {
    /// The base layer.
    config: MeshConfig,
    discovered: MeshConfig,
    experiments: Vec<crate::experiment::Record>,
    source_hash: u64,
}

/// How often a mutation is redone on top of another replica's save before giving up.
const CONFLICT_RETRIES: usize = 16;

#[derive(Debug, Default)]
struct Book {
    proxies: BTreeMap<String, ProxyRecord>,
    nacks: VecDeque<api::NackEntry>,
    last_source_error: Option<String>,
    last_discovery_error: Option<String>,
    next_conn: u64,
}

#[derive(Debug)]
struct ProxyRecord {
    status: api::ProxyStatus,
    /// Which stream owns this record: a proxy that reconnects before its old stream is torn
    /// down must not be marked disconnected when the old one ends.
    conn: u64,
    disconnected_at_unix_ms: Option<u64>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn describe(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Registry {
    /// Starts from the store and the source file's current content.
    ///
    /// If the store's state derives from the same file content (`source_hash` matches), it is
    /// resumed as is: it includes mutations made through the API. Otherwise the file changed
    /// while the control plane was down and wins, at the stored version + 1 (the version is
    /// kept when the configs are equal), so versions never go backwards across restarts.
    /// Replicas starting together race on the first save; the losers resume the winner's.
    pub async fn open(
        store: Arc<dyn Store>,
        source: impl Into<String>,
        config: MeshConfig,
        source_hash: u64,
    ) -> Result<Self, RegistryError> {
        let limits = Limits::default();
        validate(&config, &limits).map_err(|i| RegistryError::Invalid(describe(&i)))?;
        let mut attempt = 0;
        let (revision, version, layers, experiments) = loop {
            let stored = store
                .load()
                .await
                .map_err(|source| RegistryError::Store { version: 0, source })?;
            let revision = stored.as_ref().map_or(0, |r| r.revision);
            let stored = stored.map(|r| r.state);
            let experiments = stored
                .as_ref()
                .map(|s| s.experiments.clone())
                .unwrap_or_default();
            let resumed = stored.as_ref().is_some_and(|s| {
                // A stored config that no longer validates (a stricter build) is not resumed.
                s.source_hash == source_hash && validate(&s.config, &limits).is_ok()
            });
            let base = match &stored {
                Some(s) if resumed => {
                    info!(version = s.version, "resuming stored configuration");
                    s.config.clone()
                }
                Some(s) if s.config != config => {
                    info!(
                        stored_version = s.version,
                        "source changed since the state was saved; it replaces the stored config"
                    );
                    config.clone()
                }
                _ => config.clone(),
            };
            // The last good discovered layer is served until the API server answers again;
            // it is dropped only if it no longer fits the (changed) base.
            let mut discovered = stored
                .as_ref()
                .map(|s| s.discovered.clone())
                .unwrap_or_default();
            if validate(&discovery::merge(&base, &discovered), &limits).is_err() {
                tracing::warn!("the stored discovered layer does not fit the config; dropped");
                discovered = MeshConfig::default();
            }
            let merged = discovery::merge(&base, &discovered);
            let version = match &stored {
                Some(s) if discovery::merge(&s.config, &s.discovered) == merged => s.version,
                Some(s) => s.version + 1,
                None => 1,
            };
            let layers = Layers { base, discovered };
            let unchanged = stored.as_ref().is_some_and(|s| {
                resumed && s.version == version && s.discovered == layers.discovered
            });
            if unchanged {
                break (revision, version, layers, experiments);
            }
            let state = StoredState {
                version,
                config: layers.base.clone(),
                discovered: layers.discovered.clone(),
                source_hash,
                experiments: experiments.clone(),
            };
            match store.save(&state, revision).await {
                Ok(revision) => break (revision, version, layers, experiments),
                Err(StoreError::Conflict { .. }) if attempt < CONFLICT_RETRIES => attempt += 1,
                Err(source) => return Err(RegistryError::Store { version, source }),
            }
        };
        let merged = discovery::merge(&layers.base, &layers.discovered);
        let (current, _) = watch::channel(Arc::new(Versioned::new(version, merged)));
        let (experiments_changed, _) = watch::channel(0);
        Ok(Self {
            inner: Arc::new(Inner {
                source: source.into(),
                store,
                current,
                writer: tokio::sync::Mutex::new(Writer {
                    source_hash,
                    revision,
                }),
                book: Mutex::default(),
                metrics: ControlMetrics::new(),
                experiments: Mutex::new(experiments),
                experiments_changed,
                layers: Mutex::new(layers),
            }),
        })
    }

    pub fn metrics(&self) -> &ControlMetrics {
        &self.inner.metrics
    }

    /// `/metrics`: gauges mirroring state are set here, at scrape time.
    pub fn encode_metrics(&self) -> String {
        let m = &self.inner.metrics;
        let version = self.current().version;
        m.config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        m.connected
            .set(i64::try_from(self.connected()).unwrap_or(i64::MAX));
        m.encode()
    }

    fn connected(&self) -> usize {
        self.book()
            .proxies
            .values()
            .filter(|p| p.status.connected)
            .count()
    }

    /// The live configuration.
    pub fn current(&self) -> Arc<Versioned> {
        self.inner.current.borrow().clone()
    }

    /// Follows the live configuration; every accepted change is published here.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Versioned>> {
        self.inner.current.subscribe()
    }

    /// Changes when experiment records arrive from another replica (through the store), so
    /// the engine can wake the experiments they concern.
    pub fn subscribe_experiments(&self) -> watch::Receiver<u64> {
        self.inner.experiments_changed.subscribe()
    }

    /// What the state is kept in (for logs and the API).
    pub fn store(&self) -> String {
        self.inner.store.describe()
    }

    /// `--config` path or `embedded`.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Takes in the states other replicas save (a shared store), until `shutdown`; returns at
    /// once for a store only this process writes.
    pub async fn follow(self, shutdown: crate::shutdown::Shutdown) {
        let Some(mut rx) = self.inner.store.watch() else {
            return;
        };
        loop {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(r) => {
                        let mut writer = self.inner.writer.lock().await;
                        self.adopt(&mut writer, r);
                    }
                    None => return,
                },
                () = shutdown.wait() => return,
            }
        }
    }

    /// Makes a state read from the store live, unless it is not newer than what this
    /// registry already has (its own saves come back through the watch too).
    fn adopt(&self, writer: &mut Writer, r: Revisioned) {
        if r.revision <= writer.revision {
            return;
        }
        writer.revision = r.revision;
        writer.source_hash = r.state.source_hash;
        {
            let mut records = self
                .inner
                .experiments
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if *records != r.state.experiments {
                *records = r.state.experiments;
                self.inner.experiments_changed.send_modify(|n| *n += 1);
            }
        }
        let merged = discovery::merge(&r.state.config, &r.state.discovered);
        *self.layers_mut() = Layers {
            base: r.state.config,
            discovered: r.state.discovered,
        };
        let current = self.current();
        if r.state.version > current.version {
            let version = r.state.version;
            self.inner
                .current
                .send_replace(Arc::new(Versioned::new(version, merged)));
            self.inner.metrics.published(version, self.connected());
            info!(version, "new configuration version from the shared store");
        } else if merged != current.config {
            // Cannot happen with a compare-and-swap store; never move a version backwards.
            tracing::warn!(
                stored = r.state.version,
                live = current.version,
                "the store holds a different config at an older version; ignored"
            );
        }
    }

    /// A new version of the source file. The file is declarative: when it changes, its
    /// content replaces the live config, including mutations made through the API.
    pub async fn apply_source(
        &self,
        config: MeshConfig,
        source_hash: u64,
    ) -> Result<Outcome, RegistryError> {
        let (outcome, ()) = self
            .update("source", |c, _| {
                c.config = config.clone();
                c.source_hash = source_hash;
                Ok(())
            })
            .await?;
        self.book().last_source_error = None;
        Ok(outcome)
    }

    /// Records why the source file could not be used; the live config stays.
    pub fn record_source_error(&self, error: String) {
        self.book().last_source_error = Some(error);
    }

    /// A new discovered layer (a Kubernetes snapshot's translation); the base stays. When the
    /// merged result is invalid, the live config stays and the reason is reported in
    /// `last_discovery_error` (like a refused file edit).
    pub async fn apply_discovered(&self, config: MeshConfig) -> Result<Outcome, RegistryError> {
        let result = self
            .update("discovery", |c, _| {
                c.discovered = config.clone();
                Ok(())
            })
            .await;
        let mut book = self.book();
        match &result {
            Ok(_) => book.last_discovery_error = None,
            Err(e) => {
                book.last_discovery_error = Some(e.to_string());
                self.inner.metrics.discovery_refused.inc();
            }
        }
        result.map(|(outcome, ())| outcome)
    }

    /// The owner (HTTPRoute or Service) of `route` when only the discovered layer defines it.
    pub fn discovered_owner(&self, route: &str) -> Option<String> {
        let layers = self.layers();
        Self::owner(&layers.base, &layers.discovered, route)
    }

    fn owner(base: &MeshConfig, discovered: &MeshConfig, route: &str) -> Option<String> {
        if base.routes.iter().any(|r| r.name == route) {
            return None;
        }
        discovery::route_owner(discovered, route)
    }

    /// Replaces the whole configuration (`POST /api/v1/apply`).
    pub async fn apply(&self, config: MeshConfig) -> Result<Outcome, RegistryError> {
        let (outcome, ()) = self
            .update("apply", |c, _| {
                c.config = config.clone();
                Ok(())
            })
            .await?;
        Ok(outcome)
    }

    /// Sets backend weights on one rule of a route (see [`ops::set_weights`]); returns the
    /// outcome and the index of the rule changed.
    pub async fn set_weights(
        &self,
        route: &str,
        rule: Option<usize>,
        weights: &[(String, u32)],
    ) -> Result<(Outcome, usize), RegistryError> {
        self.update("set-weight", |c, _| {
            if let Some(owner) = Self::owner(&c.config, &c.discovered, route) {
                return Err(RegistryError::Discovered {
                    route: route.to_owned(),
                    owner,
                });
            }
            Ok(ops::set_weights(&mut c.config, route, rule, weights)?)
        })
        .await
    }

    /// Every experiment record.
    pub fn experiments(&self) -> Vec<crate::experiment::Record> {
        self.inner
            .experiments
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes the config and the experiment records together, in one version and one save
    /// (so a step's weights and the record saying it was applied never disagree). `f` gets
    /// the base layer and the version a config change would get. The merged config is
    /// validated as every change is.
    pub async fn update_experiments<T>(
        &self,
        cause: &str,
        mut f: impl FnMut(
            &mut MeshConfig,
            &mut Vec<crate::experiment::Record>,
            u64,
        ) -> Result<T, RegistryError>,
    ) -> Result<(Outcome, T), RegistryError> {
        self.update(cause, |c, version| {
            f(&mut c.config, &mut c.experiments, version)
        })
        .await
    }

    /// The one mutation path: `f` edits a copy of the live state; if anything changed, the
    /// config is validated, the version bumped (only when the config changed), the state
    /// saved (a compare-and-swap on the store's revision) and published. The writer lock
    /// spans the store write so versions are saved in order (for etcd that is network I/O —
    /// acceptable, since only mutations queue behind it, never readers). When another replica
    /// saved first, its state is taken in and `f` runs again on top of it.
    async fn update<T>(
        &self,
        cause: &str,
        mut f: impl FnMut(&mut Change, u64) -> Result<T, RegistryError>,
    ) -> Result<(Outcome, T), RegistryError> {
        let mut writer = self.inner.writer.lock().await;
        let mut attempt = 0;
        loop {
            let current = self.current();
            let before = self.experiments();
            let layers = self.layers().clone();
            let mut change = Change {
                config: layers.base.clone(),
                discovered: layers.discovered.clone(),
                experiments: before.clone(),
                source_hash: writer.source_hash,
            };
            let out = f(&mut change, current.version + 1)?;
            let layers_changed =
                change.config != layers.base || change.discovered != layers.discovered;
            let merged = if layers_changed {
                discovery::merge(&change.config, &change.discovered)
            } else {
                current.config.clone()
            };
            let changed = merged != current.config;
            if !layers_changed
                && change.experiments == before
                && change.source_hash == writer.source_hash
            {
                let outcome = Outcome {
                    version: current.version,
                    changed: false,
                };
                return Ok((outcome, out));
            }
            if change.config != layers.base {
                // An experiment of the base (an `apply`) cannot drive a discovered route
                // either; said before validation, whose complaint would be less clear.
                for spec in &change.config.experiments {
                    if let Some(owner) =
                        Self::owner(&change.config, &change.discovered, &spec.route)
                    {
                        return Err(RegistryError::Discovered {
                            route: spec.route.clone(),
                            owner,
                        });
                    }
                }
            }
            if changed {
                validate(&merged, &Limits::default())
                    .map_err(|i| RegistryError::Invalid(describe(&i)))?;
            }
            let version = current.version + u64::from(changed);
            let state = StoredState {
                version,
                config: change.config,
                discovered: change.discovered,
                source_hash: change.source_hash,
                experiments: change.experiments,
            };
            match self.inner.store.save(&state, writer.revision).await {
                Ok(revision) => {
                    writer.revision = revision;
                    writer.source_hash = state.source_hash;
                    *self.layers_mut() = Layers {
                        base: state.config,
                        discovered: state.discovered,
                    };
                    *self
                        .inner
                        .experiments
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = state.experiments;
                    if changed {
                        self.inner
                            .current
                            .send_replace(Arc::new(Versioned::new(version, merged)));
                        self.inner.metrics.published(version, self.connected());
                        info!(version, cause, "new configuration version published");
                    }
                    return Ok((Outcome { version, changed }, out));
                }
                Err(StoreError::Conflict { .. }) if attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    let latest = self
                        .inner
                        .store
                        .load()
                        .await
                        .map_err(|source| RegistryError::Store { version, source })?;
                    if let Some(latest) = latest {
                        self.adopt(&mut writer, latest);
                    }
                }
                Err(source) => return Err(RegistryError::Store { version, source }),
            }
        }
    }

    fn layers(&self) -> MutexGuard<'_, Layers> {
        self.inner.layers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Only under the writer lock (the layers must match the saved state).
    fn layers_mut(&self) -> MutexGuard<'_, Layers> {
        self.layers()
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a proxy whose stream just started; dropping the handle marks it disconnected.
    pub fn connect(&self, node: &pb::Node) -> ProxyConn {
        let mut book = self.book();
        book.next_conn += 1;
        let conn = book.next_conn;
        // The last NACK survives a reconnect (it is history); the ACKed version does not:
        // it is per stream, and the new stream starts with a full snapshot.
        let last_nack = book
            .proxies
            .get(&node.id)
            .and_then(|p| p.status.last_nack.clone());
        let status = api::ProxyStatus {
            node_id: node.id.clone(),
            service: node.service.clone(),
            namespace: node.namespace.clone(),
            labels: node.labels.clone().into_iter().collect(),
            connected: true,
            acked_version: None,
            last_nack,
            connected_at_unix_ms: now_unix_ms(),
            last_ack_at_unix_ms: None,
            admin_addr: (!node.admin_addr.is_empty()).then(|| node.admin_addr.clone()),
            replica: None,
        };
        book.proxies.insert(
            node.id.clone(),
            ProxyRecord {
                status,
                conn,
                disconnected_at_unix_ms: None,
            },
        );
        ProxyConn {
            registry: self.clone(),
            node_id: node.id.clone(),
            conn,
        }
    }

    /// The whole status document (`GET /api/v1/status`).
    pub fn status(&self) -> api::Status {
        let version = self.current().version;
        let book = self.book();
        api::Status {
            version,
            source: self.inner.source.clone(),
            last_source_error: book.last_source_error.clone(),
            last_discovery_error: book.last_discovery_error.clone(),
            proxies: book.proxies.values().map(|p| p.status.clone()).collect(),
            nacks: book.nacks.iter().cloned().collect(),
            roster_error: None,
        }
    }

    /// Runs `f` on the record of `node_id` if `conn` still owns it.
    fn with_proxy(&self, node_id: &str, conn: u64, f: impl FnOnce(&mut Book, &str)) {
        let mut book = self.book();
        if book.proxies.get(node_id).is_some_and(|p| p.conn == conn) {
            f(&mut book, node_id);
        }
    }
}

/// A connected proxy's entry in the registry, owned by its config stream.
#[derive(Debug)]
pub struct ProxyConn {
    registry: Registry,
    node_id: String,
    conn: u64,
}

impl ProxyConn {
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The proxy applied `version`.
    pub fn ack(&self, version: u64) {
        self.registry
            .with_proxy(&self.node_id, self.conn, |book, id| {
                if let Some(p) = book.proxies.get_mut(id) {
                    p.status.acked_version = Some(version);
                    p.status.last_ack_at_unix_ms = Some(now_unix_ms());
                }
                // The oldest version every connected proxy runs has converged.
                let min_acked = book
                    .proxies
                    .values()
                    .filter(|p| p.status.connected)
                    .map(|p| p.status.acked_version.unwrap_or(0))
                    .min();
                if let Some(v) = min_acked {
                    self.registry.inner.metrics.converged_up_to(v);
                }
            });
    }

    /// The proxy refused `version` and keeps running the one it ACKed before.
    pub fn nack(&self, version: u64, error: &str) {
        let at_unix_ms = now_unix_ms();
        self.registry
            .with_proxy(&self.node_id, self.conn, |book, id| {
                if let Some(p) = book.proxies.get_mut(id) {
                    p.status.last_nack = Some(api::LastNack {
                        version,
                        error: error.to_owned(),
                        at_unix_ms,
                    });
                }
                book.nacks.push_back(api::NackEntry {
                    node_id: id.to_owned(),
                    version,
                    error: error.to_owned(),
                    at_unix_ms,
                });
                while book.nacks.len() > NACK_LOG_LEN {
                    book.nacks.pop_front();
                }
            });
    }
}

impl Drop for ProxyConn {
    fn drop(&mut self) {
        self.registry
            .with_proxy(&self.node_id, self.conn, |book, id| {
                if let Some(p) = book.proxies.get_mut(id) {
                    p.status.connected = false;
                    p.disconnected_at_unix_ms = Some(now_unix_ms());
                }
                let gone: Vec<(u64, String)> = book
                    .proxies
                    .values()
                    .filter_map(|p| Some((p.disconnected_at_unix_ms?, p.status.node_id.clone())))
                    .collect();
                if gone.len() > MAX_DISCONNECTED {
                    let mut gone = gone;
                    gone.sort();
                    for (_, id) in gone.iter().take(gone.len() - MAX_DISCONNECTED) {
                        book.proxies.remove(id);
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FileStore, MemoryStore, content_hash};
    use weft_proto::parse_yaml;

    const MESH: &str = include_str!("default-mesh.yaml");

    fn mesh() -> MeshConfig {
        parse_yaml("t", MESH, &Limits::default()).unwrap()
    }

    async fn open(store: Arc<dyn Store>, text: &str) -> Registry {
        let cfg = parse_yaml("t", text, &Limits::default()).unwrap();
        Registry::open(store, "t", cfg, content_hash(text.as_bytes()))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn identical_config_does_not_bump() {
        let reg = open(Arc::new(MemoryStore::new()), MESH).await;
        let mut rx = reg.subscribe();
        rx.borrow_and_update();
        assert_eq!(reg.current().version, 1);
        let out = reg.apply(mesh()).await.unwrap();
        assert_eq!(
            out,
            Outcome {
                version: 1,
                changed: false
            }
        );
        assert!(!rx.has_changed().unwrap(), "nothing published");

        let w = [("v1".to_owned(), 90), ("v2".to_owned(), 10)];
        let (out, rule) = reg.set_weights("reviews", None, &w).await.unwrap();
        assert_eq!((out.version, out.changed, rule), (2, true, 1));
        assert!(rx.has_changed().unwrap());
        // The same weights again: no new version.
        let (out, _) = reg.set_weights("reviews", None, &w).await.unwrap();
        assert_eq!((out.version, out.changed), (2, false));
    }

    #[tokio::test]
    async fn invalid_config_is_refused_and_the_old_one_stays() {
        let reg = open(Arc::new(MemoryStore::new()), MESH).await;
        let mut bad = mesh();
        bad.routes[0].rules[1].backends[0].subset = "v9".into();
        let err = reg.apply(bad).await.unwrap_err();
        assert!(matches!(err, RegistryError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("v9"), "{err}");

        let err = reg
            .set_weights("nope", None, &[("v1".into(), 1)])
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Op(OpError::UnknownRoute(_))));
        assert_eq!(reg.current().version, 1);
        assert_eq!(reg.current().config, mesh());
    }

    #[tokio::test]
    async fn restart_resumes_or_moves_forward() {
        let dir = tempfile::tempdir().unwrap();
        let store = || -> Arc<dyn Store> { Arc::new(FileStore::open(dir.path()).unwrap()) };

        // First run: version 1, then an API mutation → version 2.
        let reg = open(store(), MESH).await;
        let w = [("v1".to_owned(), 50), ("v2".to_owned(), 50)];
        reg.set_weights("reviews", None, &w).await.unwrap();
        let mutated = reg.current().config.clone();
        drop(reg);

        // Same file: the stored config (with the mutation) and its version are resumed.
        let reg = open(store(), MESH).await;
        assert_eq!(reg.current().version, 2);
        assert_eq!(reg.current().config, mutated);
        drop(reg);

        // The file changed while down: it wins, at stored version + 1.
        let edited = MESH.replace("weight: 100", "weight: 70");
        let reg = open(store(), &edited).await;
        assert_eq!(reg.current().version, 3);
        assert_eq!(
            reg.current().config.routes[0].rules[1].backends[0].weight,
            Some(70)
        );
        drop(reg);

        // A comment-only edit keeps the version and does not lose anything either.
        let commented = format!("# note\n{edited}");
        let reg = open(store(), &commented).await;
        assert_eq!(reg.current().version, 3);
    }

    #[tokio::test]
    async fn a_stale_replica_redoes_its_change_on_top_of_the_newer_state() {
        // Two registries on one store: replicas sharing etcd, without the watch.
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let a = open(store.clone(), MESH).await;
        let b = open(store.clone(), MESH).await;
        assert_eq!((a.current().version, b.current().version), (1, 1));
        let (out, _) = a
            .set_weights("reviews", None, &[("v1".into(), 70), ("v2".into(), 30)])
            .await
            .unwrap();
        assert_eq!(out.version, 2);
        // B still runs version 1; its save conflicts, it takes in A's state and redoes.
        let w = [("v1".to_owned(), 40), ("v2".to_owned(), 60)];
        let (out, _) = b.set_weights("reviews", None, &w).await.unwrap();
        assert_eq!(out.version, 3, "never a second version 2");
        let stored = store.load().await.unwrap().unwrap().state;
        assert_eq!(stored.version, 3);
        assert_eq!(stored.config, b.current().config);
        assert_eq!(
            stored.config.routes[0].rules[1].backends[1].weight,
            Some(60)
        );
    }

    /// A discovered layer: service `cart.shop` (one endpoint) and its route, plus a
    /// `reviews` service and route the base (the default mesh) also defines.
    fn discovered() -> MeshConfig {
        let yaml = r#"
services:
  - name: cart.shop
    endpoints: [{address: "10.0.0.1:80"}]
  - name: reviews
    endpoints: [{address: "10.0.0.9:80"}]
routes:
  - name: cart.shop
    hosts: [cart.shop, cart]
    rules:
      - name: "shop/cart#0.0"
        backends: [{service: cart.shop}]
  - name: reviews
    hosts: [reviews]
    rules:
      - backends: [{service: reviews}]
"#;
        parse_yaml("d", yaml, &Limits::default()).unwrap()
    }

    #[tokio::test]
    async fn the_base_wins_and_each_layer_keeps_the_other() {
        let reg = open(Arc::new(MemoryStore::new()), MESH).await;
        let out = reg.apply_discovered(discovered()).await.unwrap();
        assert_eq!((out.version, out.changed), (2, true));
        let live = reg.current().config.clone();
        assert!(live.routes.iter().any(|r| r.name == "cart.shop"));
        // The base's `reviews` beats the discovered one (its subsets are still there).
        let reviews = live.services.iter().find(|s| s.name == "reviews").unwrap();
        assert_eq!(reviews, &mesh().services[0]);
        assert_eq!(
            live.routes.iter().filter(|r| r.name == "reviews").count(),
            1
        );

        // A file reload keeps the discovered layer.
        let edited = MESH.replace("weight: 100", "weight: 70");
        let cfg = parse_yaml("t", &edited, &Limits::default()).unwrap();
        reg.apply_source(cfg, content_hash(edited.as_bytes()))
            .await
            .unwrap();
        assert!(
            reg.current()
                .config
                .routes
                .iter()
                .any(|r| r.name == "cart.shop")
        );
        // A new snapshot keeps the base (and its edit).
        reg.apply_discovered(MeshConfig::default()).await.unwrap();
        let live = reg.current().config.clone();
        assert!(!live.routes.iter().any(|r| r.name == "cart.shop"));
        assert_eq!(live.routes[0].rules[1].backends[0].weight, Some(70));
    }

    #[tokio::test]
    async fn discovered_routes_belong_to_their_httproute() {
        let reg = open(Arc::new(MemoryStore::new()), MESH).await;
        reg.apply_discovered(discovered()).await.unwrap();
        let err = reg
            .set_weights("cart.shop", None, &[("cart.shop".into(), 1)])
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Discovered { .. }), "{err}");
        assert!(err.to_string().contains("HTTPRoute shop/cart"), "{err}");
        // A route the base defines stays the operator's.
        let w = [("v1".to_owned(), 60), ("v2".to_owned(), 40)];
        reg.set_weights("reviews", None, &w).await.unwrap();
        // Nor can an applied experiment drive it.
        let mut with_experiment = mesh();
        let spec = r#"{name: c, route: cart.shop, service: reviews, stable: v1, candidate: v2,
            canary: {steps: [50, 100]}, interval: 1s}"#;
        with_experiment
            .experiments
            .push(serde_yaml_ng::from_str(spec).unwrap());
        let err = reg.apply(with_experiment).await.unwrap_err();
        assert!(matches!(err, RegistryError::Discovered { .. }), "{err}");
    }

    #[tokio::test]
    async fn an_invalid_merge_is_refused_and_reported() {
        let reg = open(Arc::new(MemoryStore::new()), MESH).await;
        reg.apply_discovered(discovered()).await.unwrap();
        let good = reg.current();
        let mut bad = discovered();
        bad.routes[0].rules[0].backends[0].service = "nowhere".into();
        let err = reg.apply_discovered(bad).await.unwrap_err();
        assert!(matches!(err, RegistryError::Invalid(_)), "{err}");
        assert_eq!(reg.current().version, good.version);
        assert_eq!(reg.current().config, good.config);
        let reported = reg.status().last_discovery_error.unwrap();
        assert!(reported.contains("nowhere"), "{reported}");
        reg.apply_discovered(discovered()).await.unwrap();
        assert_eq!(reg.status().last_discovery_error, None);
    }

    #[tokio::test]
    async fn the_discovered_layer_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = || -> Arc<dyn Store> { Arc::new(FileStore::open(dir.path()).unwrap()) };
        let reg = open(store(), MESH).await;
        reg.apply_discovered(discovered()).await.unwrap();
        let before = reg.current();
        drop(reg);
        // The API server may be away at start: the last discovered layer is served.
        let reg = open(store(), MESH).await;
        assert_eq!(reg.current().version, before.version);
        assert_eq!(reg.current().config, before.config);
    }

    #[tokio::test]
    async fn proxy_status_tracks_acks_nacks_and_disconnects() {
        let reg = open(Arc::new(MemoryStore::new()), MESH).await;
        let node = pb::Node {
            id: "p1".into(),
            service: "reviews".into(),
            ..Default::default()
        };
        let conn = reg.connect(&node);
        conn.ack(1);
        conn.nack(2, "bad regex");
        // A reconnect before the old stream ends: the old handle must not win.
        let newer = reg.connect(&node);
        drop(conn);
        let st = reg.status();
        assert!(st.proxies[0].connected);
        assert_eq!(st.nacks.len(), 1);
        drop(newer);
        let p = &reg.status().proxies[0];
        assert!(!p.connected);
        assert_eq!(p.node_id, "p1");
    }
}

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

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tracing::info;
use weft_proto::ops::{self, OpError};
use weft_proto::{Issue, Limits, MeshConfig, Resources, to_resources, validate};

use crate::discovery;
use crate::metrics::ControlMetrics;
use crate::store::{Revisioned, Store, StoreError, StoredState};

mod proxies;
#[cfg(test)]
mod tests;

use proxies::Book;
pub use proxies::{NACK_LOG_LEN, ProxyConn};

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
}

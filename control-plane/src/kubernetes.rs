//! Discovery from a live Kubernetes API server (`--kubernetes`): kube-rs watchers feed
//! [`crate::discovery::translate`], whose result becomes the registry's discovered layer.
//!
//! [`KubeSource`] runs one kube-runtime reflector per resource (Services, EndpointSlices,
//! HTTPRoutes) and namespace (`--discovery-namespace`, or the whole cluster), and implements
//! [`ClusterSource`]: `next` resolves with a snapshot of the three stores after any of them
//! changed, once a burst of events has settled for [`COALESCE`]. It never yields a half-read
//! cluster: the first snapshot waits until every store finished its initial list (a store is
//! swapped whole when a re-list completes, so later snapshots are whole too). Otherwise a
//! control-plane restart would briefly publish Services without endpoints.
//!
//! Failures never end discovery. A watcher error is logged with the resource it concerns and
//! the watcher retries with kube-runtime's default backoff (exponential, capped), re-listing
//! when needed; meanwhile nothing is emitted, so the last good discovered config stays served
//! (it is also in the store, so a restart serves it before the API server answers). A cluster
//! without the Gateway API CRDs answers 404 on the HTTPRoute list (403 if RBAC leaves them
//! out): that is logged once, and Services and EndpointSlices are discovered without routes
//! (the watcher keeps retrying quietly, so installing the CRDs later brings the routes in).
//!
//! [`feed`] connects a source to the registry. In HA mode only the leader writes the
//! discovered layer (followers run their watchers too and take the layer in through the shared
//! store, so a new leader writes its own view at once): replicas with watchers lagging each
//! other would otherwise overwrite each other's newer snapshot with an older one.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use weft_proto::MeshConfig;

use crate::discovery::{ClusterSnapshot, ClusterSource, DiscoveryError, translate};
use crate::leader::Leadership;
use crate::registry::{Registry, RegistryError};
use crate::shutdown::Shutdown;

/// How long a burst of watch events may settle before a snapshot is taken: a rollout changes
/// many EndpointSlices within milliseconds, and each config version is pushed to every proxy.
pub const COALESCE: Duration = Duration::from_millis(100);

/// After a store failure (etcd away), the discovered layer is written again this often.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// `--kubernetes`, `--kubeconfig`, `--discovery-namespace`.
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// A kubeconfig file; `None`: in-cluster service account, else `KUBECONFIG` / ~/.kube.
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces to discover; empty: all.
    pub namespaces: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },
    #[error("cannot find a Kubernetes configuration (in-cluster or KUBECONFIG): {0}")]
    Infer(String),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(String),
}

/// The API server client, for the control plane to start watchers with at serve time.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub namespaces: Vec<String>,
}

impl Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("namespaces", &self.namespaces)
            .finish_non_exhaustive()
    }
}

/// A client for the cluster `opts` names. Nothing is sent yet: an API server that is away at
/// start is retried by the watchers like one that goes away later.
pub async fn client(opts: &KubeOptions) -> Result<Client, KubeError> {
    let config = match &opts.kubeconfig {
        Some(path) => {
            let err = |reason: String| KubeError::Kubeconfig {
                path: path.clone(),
                reason,
            };
            let kubeconfig =
                kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| err(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Infer(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))
}

/// One resource kind's stores (one per namespace watched) and whether all have listed.
struct Kind<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    stores: Vec<Store<K>>,
    ready: Vec<Arc<AtomicBool>>,
}

impl<K> Kind<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    /// Starts a reflector for `K` in each of `namespaces` (all when empty).
    fn start(
        client: &Client,
        namespaces: &[String],
        resource: &'static str,
        optional: bool,
        changed: &Arc<watch::Sender<u64>>,
        tasks: &mut Vec<JoinHandle<()>>,
    ) -> Self {
        let scopes: Vec<Option<&String>> = if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.iter().map(Some).collect()
        };
        let mut kind = Kind {
            stores: Vec::new(),
            ready: Vec::new(),
        };
        for ns in scopes {
            let api: Api<K> = match ns {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let (store, writer) = reflector::store();
            let ready = Arc::new(AtomicBool::new(false));
            let scope =
                ns.map_or_else(|| "all namespaces".to_owned(), |n| format!("namespace {n}"));
            tasks.push(tokio::spawn(reflect(
                api,
                writer,
                Watched {
                    resource,
                    scope,
                    optional,
                    ready: ready.clone(),
                    changed: changed.clone(),
                },
            )));
            kind.stores.push(store);
            kind.ready.push(ready);
        }
        kind
    }

    fn ready(&self) -> bool {
        self.ready.iter().all(|r| r.load(Ordering::Acquire))
    }

    fn objects(&self) -> Vec<K> {
        self.stores
            .iter()
            .flat_map(Store::state)
            .map(|o| (*o).clone())
            .collect()
    }
}

/// What one reflector task reports to.
struct Watched {
    resource: &'static str,
    scope: String,
    /// A 404 on the list (CRD not installed) counts as an empty, listed store.
    optional: bool,
    ready: Arc<AtomicBool>,
    changed: Arc<watch::Sender<u64>>,
}

/// Runs one reflector until its stream ends (it does not: errors are retried with backoff).
async fn reflect<K>(api: Api<K>, writer: reflector::store::Writer<K>, w: Watched)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    let mut stream = std::pin::pin!(stream);
    let mut missing_logged = false;
    let mut failing = false;
    let bump = || w.changed.send_modify(|n| *n = n.wrapping_add(1));
    while let Some(item) = stream.next().await {
        match item {
            Ok(watcher::Event::InitDone) => {
                if failing || missing_logged {
                    info!(resource = w.resource, scope = %w.scope, "watch re-established");
                }
                failing = false;
                missing_logged = false;
                w.ready.store(true, Ordering::Release);
                bump();
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => bump(),
            // The store is swapped whole at InitDone; nothing to emit before.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(e) if w.optional && is_unavailable(&e) => {
                if !missing_logged {
                    warn!(
                        resource = w.resource, scope = %w.scope,
                        "not served by the API server (Gateway API CRDs not installed?) or not readable (RBAC); discovering without them: {e}"
                    );
                    missing_logged = true;
                }
                if !w.ready.swap(true, Ordering::AcqRel) {
                    bump();
                }
            }
            Err(e) => {
                failing = true;
                warn!(
                    resource = w.resource, scope = %w.scope,
                    "watch failed, retrying with backoff; the last discovered config stays: {e}"
                );
            }
        }
    }
}

/// 404 (the CRD is not installed) or 403 (RBAC does not grant it): an optional resource is
/// then discovered as empty rather than holding back the others.
fn is_unavailable(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => {
            matches!(status.code, 403 | 404)
        }
        _ => false,
    }
}

/// Services, EndpointSlices and HTTPRoutes from an API server, as [`ClusterSource`].
pub struct KubeSource {
    services: Kind<Service>,
    slices: Kind<EndpointSlice>,
    routes: Kind<HttpRoute>,
    changed: watch::Receiver<u64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("watchers", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// Starts the watchers (needs a tokio runtime); they stop when the source is dropped.
    pub fn start(client: &Client, namespaces: &[String]) -> Self {
        let (tx, changed) = watch::channel(0);
        let tx = Arc::new(tx);
        let mut tasks = Vec::new();
        let services = Kind::start(client, namespaces, "services", false, &tx, &mut tasks);
        let slices = Kind::start(
            client,
            namespaces,
            "endpointslices.discovery.k8s.io",
            false,
            &tx,
            &mut tasks,
        );
        let routes = Kind::start(
            client,
            namespaces,
            "httproutes.gateway.networking.k8s.io",
            true,
            &tx,
            &mut tasks,
        );
        Self {
            services,
            slices,
            routes,
            changed,
            tasks,
        }
    }

    fn snapshot(&self) -> ClusterSnapshot {
        ClusterSnapshot {
            services: self.services.objects(),
            endpoint_slices: self.slices.objects(),
            http_routes: self.routes.objects(),
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ClusterSource for KubeSource {
    fn next(&mut self) -> BoxFuture<'_, Result<ClusterSnapshot, DiscoveryError>> {
        Box::pin(async move {
            // Ends when the watcher tasks are gone (the source is being dropped).
            loop {
                self.changed
                    .changed()
                    .await
                    .map_err(|_| DiscoveryError::Watch {
                        resource: "all",
                        reason: "the watchers stopped".into(),
                    })?;
                tokio::time::sleep(COALESCE).await;
                self.changed.borrow_and_update();
                if self.services.ready() && self.slices.ready() && self.routes.ready() {
                    return Ok(self.snapshot());
                }
            }
        })
    }
}

/// Translates every snapshot of `source` and makes it the registry's discovered layer (on the
/// leader only, see the module docs), until `shutdown`.
pub async fn feed(
    mut source: impl ClusterSource,
    registry: Registry,
    leadership: Leadership,
    shutdown: Shutdown,
) {
    let (tx, mut latest) = watch::channel::<Option<Arc<MeshConfig>>>(None);
    // The source runs on its own so a leadership change never cancels a `next` half-way.
    let produce = async move {
        let mut seen = BTreeSet::new();
        loop {
            match source.next().await {
                Ok(snapshot) => {
                    let t = translate(&snapshot);
                    // Warnings repeat with every snapshot; log each once while it lasts.
                    let now: BTreeSet<String> = t.warnings.into_iter().collect();
                    for w in now.difference(&seen) {
                        warn!("discovery: {w}");
                    }
                    seen = now;
                    debug!(
                        services = t.config.services.len(),
                        routes = t.config.routes.len(),
                        "cluster snapshot translated"
                    );
                    tx.send_replace(Some(Arc::new(t.config)));
                }
                Err(e) => {
                    warn!("discovery stopped: {e}");
                    return;
                }
            }
        }
    };
    let apply = async move {
        let mut leader = leadership.subscribe();
        loop {
            let config = latest.borrow_and_update().clone();
            let leads = leader.borrow_and_update().is_leader;
            let mut retry = false;
            if let (true, Some(config)) = (leads, config) {
                retry = apply_layer(&registry, &config).await;
            }
            tokio::select! {
                r = latest.changed() => if r.is_err() { return },
                r = leader.changed() => if r.is_err() { return },
                () = tokio::time::sleep(STORE_RETRY), if retry => {}
            }
        }
    };
    tokio::select! {
        () = produce => {}
        () = apply => {}
        () = shutdown.wait() => {}
    }
}

/// Writes one discovered layer; true when it should be retried (the store failed).
async fn apply_layer(registry: &Registry, config: &MeshConfig) -> bool {
    match registry.apply_discovered(config.clone()).await {
        Ok(outcome) if outcome.changed => {
            info!(
                version = outcome.version,
                services = config.services.len(),
                routes = config.routes.len(),
                "discovered configuration applied"
            );
            false
        }
        Ok(_) => false,
        Err(e @ RegistryError::Store { .. }) => {
            warn!("discovered configuration not saved, retrying: {e}");
            true
        }
        Err(e) => {
            warn!(
                version = registry.current().version,
                "discovered configuration refused, the current configuration stays live: {e}"
            );
            false
        }
    }
}

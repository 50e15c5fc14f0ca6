//! Assembles the control plane: store, registry, config stream server, admin API and file
//! watcher, bound to their listeners and run until shutdown.
//!
//! Binding is separate from serving so a caller (the binary, tests) learns the real addresses
//! — port 0 picks free ports — before anything is served, and can publish them with
//! [`write_addr_file`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::info;

use crate::ca::{Ca, CaError, CaOptions};
use crate::certify::{BootstrapTokens, CertifyServer};
use crate::etcd::EtcdStore;
use crate::kubernetes::{KubeError, KubeOptions, KubeSource};
use crate::leader::{Election, Leadership};
use crate::registry::{Registry, RegistryError};
use crate::roster::Roster;
use crate::shutdown::Shutdown;
use crate::source::{Loaded, Source, Watcher};
use crate::store::{FileStore, MemoryStore, Store, StoreError};
use crate::webhook::{WebhookError, WebhookOptions};
use crate::{admin, xds};

/// What the control plane is started with (the binary's flags).
#[derive(Debug, Clone)]
pub struct Options {
    pub source: Source,
    /// `None`: state is kept in memory only.
    pub state_dir: Option<PathBuf>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub watch_interval: Duration,
    /// The workload certificate authority.
    pub ca: CaOptions,
    /// Serve the gRPC port (config stream, Certify) over TLS with a certificate from the CA.
    pub grpc_tls: bool,
    /// Keep the state in etcd, shared with other replicas, and elect a leader there.
    pub etcd: Option<EtcdOptions>,
    /// This replica's name in leader election; default: the admin address.
    pub replica_id: Option<String>,
    /// The sidecar injector's HTTPS endpoint; `None`: not served.
    pub webhook: Option<WebhookOptions>,
    /// Discovery from a Kubernetes API server; `None`: the mesh file only.
    pub kubernetes: Option<KubeOptions>,
}

/// `--etcd-endpoints`, `--etcd-prefix`, `--leader-ttl`.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Keys live under it: `<prefix>/state`, `<prefix>/leader`.
    pub prefix: String,
    /// Lease TTL of the leader: how long a dead leader blocks a takeover.
    pub leader_ttl: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            source: Source::Embedded,
            state_dir: None,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 15010)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 15014)),
            watch_interval: Duration::from_millis(500),
            ca: CaOptions::default(),
            grpc_tls: false,
            etcd: None,
            replica_id: None,
            webhook: None,
            kubernetes: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the address file {path}: {source}")]
    AddrFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config stream server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("admin server failed: {0}")]
    Admin(#[source] std::io::Error),
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    #[error(transparent)]
    Kube(#[from] KubeError),
}

/// A control plane bound to its listeners, not yet serving.
#[derive(Debug)]
pub struct ControlPlane {
    registry: Registry,
    grpc: TcpListener,
    grpc_addr: SocketAddr,
    admin: TcpListener,
    admin_addr: SocketAddr,
    watcher: Option<Watcher>,
    ca: Arc<Ca>,
    tokens: Arc<BootstrapTokens>,
    grpc_tls: Option<tonic::transport::ServerTlsConfig>,
    leadership: Leadership,
    election: Option<Election>,
    /// Replicas on etcd: this replica's proxies published for the others' status.
    roster: Option<Roster>,
    webhook: Option<Webhook>,
    /// The API server client and the namespaces to discover (`--kubernetes`).
    kube: Option<crate::kubernetes::Cluster>,
}

/// The injector endpoint, bound.
#[derive(Debug)]
struct Webhook {
    listener: TcpListener,
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    inject: crate::inject::InjectConfig,
}

/// The CA and bootstrap-token secret every replica on `store` shares (`ca/root`,
/// `ca/token-secret` under its prefix): created by the first replica, read by the others.
async fn shared_identity(
    store: &EtcdStore,
    opts: &Options,
) -> Result<(Ca, BootstrapTokens), ServerError> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct StoredCa {
        cert: String,
        key: String,
    }
    let (cert, key, _) = Ca::local_pems(&opts.ca, opts.state_dir.as_deref(), false)?;
    let ours = serde_json::to_vec(&StoredCa { cert, key }).expect("strings encode");
    let stored = store.create_or_get("ca/root", ours.clone()).await?;
    let created = stored == ours;
    let invalid = |reason: String| CaError::Invalid {
        what: format!("the CA in etcd ({})", store.key("ca/root")),
        reason,
    };
    let shared: StoredCa = serde_json::from_slice(&stored).map_err(|e| invalid(e.to_string()))?;
    let ca = Ca::from_pems(&opts.ca, &shared.cert, &shared.key, created)?;
    let secret = store
        .create_or_get("ca/token-secret", BootstrapTokens::new_secret()?)
        .await?;
    if secret.len() < 32 {
        return Err(invalid(format!("token secret of {} bytes", secret.len())).into());
    }
    tracing::info!(created, "certificate authority shared through etcd");
    Ok((ca, BootstrapTokens::from_secret(&secret)))
}

impl ControlPlane {
    /// Opens the store, builds the registry from `loaded` (the source, already read and
    /// validated by the caller so it can report a bad file its own way) and binds.
    pub async fn bind(opts: Options, loaded: Loaded) -> Result<Self, ServerError> {
        // Boxed: connecting to etcd, opening the CA and binding make a future of ~11 KiB that
        // every caller would otherwise carry.
        Box::pin(Self::bind_inner(opts, loaded)).await
    }

    async fn bind_inner(opts: Options, loaded: Loaded) -> Result<Self, ServerError> {
        let etcd = match &opts.etcd {
            Some(e) => Some(EtcdStore::connect(&e.endpoints, &e.prefix).await?),
            None => None,
        };
        let store: Arc<dyn Store> = match (&etcd, &opts.state_dir) {
            (Some(etcd), _) => Arc::new(etcd.clone()),
            (None, Some(dir)) => Arc::new(FileStore::open(dir)?),
            (None, None) => Arc::new(MemoryStore::new()),
        };
        let (ca, tokens) = match &etcd {
            // Replicas must sign with one CA and accept each other's tokens: the first to start
            // stores its own (its state dir's, or new ones) and every replica uses what is stored.
            Some(store) if opts.ca.ca_cert.is_none() => shared_identity(store, &opts).await?,
            _ => (
                Ca::open(&opts.ca, opts.state_dir.as_deref())?,
                BootstrapTokens::open(opts.state_dir.as_deref())?,
            ),
        };
        let (ca, tokens) = (Arc::new(ca), Arc::new(tokens));
        let registry =
            Registry::open(store, opts.source.name(), loaded.config, loaded.hash).await?;
        let bind = |what, addr| async move {
            let err = |source| ServerError::Bind { what, addr, source };
            let listener = TcpListener::bind(addr).await.map_err(err)?;
            // The real address, which differs from `addr` for port 0.
            let local = listener.local_addr().map_err(err)?;
            Ok::<_, ServerError>((listener, local))
        };
        let (grpc, grpc_addr) = bind("the config stream (gRPC)", opts.grpc_addr).await?;
        let (admin, admin_addr) = bind("the admin API", opts.admin_addr).await?;
        let webhook = match &opts.webhook {
            Some(w) => {
                let tls = crate::webhook::tls_config(w, &ca)?;
                let (listener, addr) = bind("the injector webhook", w.addr).await?;
                Some(Webhook {
                    listener,
                    addr,
                    tls,
                    inject: w.inject.clone(),
                })
            }
            None => None,
        };
        let grpc_tls = if opts.grpc_tls {
            // The control plane's own certificate: its SPIFFE ID plus the names proxies dial.
            let id = ca.spiffe_id("weft-system", "weft-control");
            let hosts = vec![
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
                grpc_addr.ip().to_string(),
            ];
            let (chain, key) = ca.issue_server(&id, &hosts)?;
            Some(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(chain, key)),
            )
        } else {
            None
        };
        // Unique without configuration: pods differ by host name, processes on one host by
        // their admin port (replicas sharing an id would overwrite each other's roster entry).
        let replica = opts
            .replica_id
            .clone()
            .unwrap_or_else(|| format!("{}:{}", host_name(), admin_addr.port()));
        let (leadership, election, roster) = match (&etcd, &opts.etcd) {
            (Some(store), Some(e)) => {
                let election =
                    Election::new(store.client(), store.key("leader"), &replica, e.leader_ttl);
                let roster = Roster::new(store.clone(), &replica, e.leader_ttl);
                (election.leadership(), Some(election), Some(roster))
            }
            _ => (Leadership::single(&replica), None, None),
        };
        let watcher = match &opts.source {
            Source::File(path) => Some(Watcher::new(
                path,
                opts.watch_interval,
                registry.clone(),
                loaded.hash,
            )),
            Source::Embedded => None,
        };
        // A bad kubeconfig is an error at start; an unreachable API server is not (retried).
        let kube = match &opts.kubernetes {
            Some(k) => Some(crate::kubernetes::Cluster {
                client: crate::kubernetes::client(k).await?,
                namespaces: k.namespaces.clone(),
            }),
            None => None,
        };
        Ok(Self {
            kube,
            registry,
            grpc,
            grpc_addr,
            admin,
            admin_addr,
            watcher,
            ca,
            tokens,
            grpc_tls,
            leadership,
            election,
            roster,
            webhook,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The injector webhook's address, when it is served.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.webhook.as_ref().map(|w| w.addr)
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Serves until `shutdown`, then drains: config streams end, open admin requests finish.
    pub async fn serve(self, shutdown: Shutdown) -> Result<(), ServerError> {
        info!(
            grpc = %self.grpc_addr(),
            admin = %self.admin_addr(),
            webhook = ?self.webhook_addr(),
            source = self.registry.source(),
            store = %self.registry.store(),
            version = self.registry.current().version,
            "control plane serving"
        );
        let stats = crate::experiment::stats::Aggregator::new();
        let engine = crate::experiment::Engine::new(
            self.registry.clone(),
            stats.clone(),
            self.leadership.clone(),
            shutdown.clone(),
        );
        // Shared store: take in other replicas' changes; campaign for leadership.
        let follow = tokio::spawn(self.registry.clone().follow(shutdown.clone()));
        let election = self.election.map(|e| tokio::spawn(e.run(shutdown.clone())));
        let roster = self
            .roster
            .clone()
            .map(|r| tokio::spawn(r.run(self.registry.clone(), shutdown.clone())));
        // With an API server, pods may prove their identity with their projected
        // service-account token too.
        let proofs = crate::certify::Proofs {
            bootstrap: self.tokens.clone(),
            review: self
                .kube
                .as_ref()
                .map(|cluster| crate::tokenreview::TokenReviewer::new(cluster.client.clone())),
        };
        let certify = CertifyServer::new(self.ca.clone(), Arc::new(proofs));
        let grpc = xds::serve(
            self.grpc,
            self.registry.clone(),
            stats,
            certify.into_service(),
            self.grpc_tls,
            shutdown.clone(),
        );
        // One admin listener: config and status, experiments, identity tokens and bundle.
        let extra = crate::experiment_api::router(engine.clone())
            .merge(crate::certify::admin_router(
                self.ca.clone(),
                self.tokens.clone(),
            ))
            .merge(crate::leader::router(self.leadership.clone()));
        let admin = admin::serve(
            self.admin,
            self.registry.clone(),
            self.roster,
            extra,
            shutdown.clone(),
        );
        let engine = tokio::spawn(engine.run());
        let discovery = self.kube.map(|cluster| {
            tokio::spawn(crate::kubernetes::feed(
                KubeSource::start(&cluster.client, &cluster.namespaces),
                self.registry.clone(),
                self.leadership.clone(),
                shutdown.clone(),
            ))
        });
        let webhook = self.webhook.map(|w| {
            tokio::spawn(crate::webhook::serve(
                w.listener,
                w.tls,
                w.inject,
                shutdown.clone(),
            ))
        });
        let watch = async {
            if let Some(watcher) = self.watcher {
                watcher.run(shutdown.clone()).await;
            }
            Ok::<(), ServerError>(())
        };
        // The first failure ends the others (dropping them closes their listeners).
        tokio::try_join!(
            async { grpc.await.map_err(ServerError::Grpc) },
            async { admin.await.map_err(ServerError::Admin) },
            watch,
        )?;
        let _ = engine.await;
        if let Some(discovery) = discovery {
            let _ = discovery.await;
        }
        follow.abort();
        if let Some(election) = election {
            // Revokes the lease so another replica takes over at once.
            let _ = tokio::time::timeout(Duration::from_secs(2), election).await;
        }
        if let Some(roster) = roster {
            // Withdraws this replica's entry (its proxies are reconnecting elsewhere).
            let _ = tokio::time::timeout(Duration::from_secs(2), roster).await;
        }
        if let Some(webhook) = webhook {
            let _ = webhook.await;
        }
        info!("control plane stopped");
        Ok(())
    }
}

/// Writes `{"grpc": "...", "admin": "...", "webhook": "..."|null}` to `path` atomically: a
/// temp file in the same directory renamed into place, so a reader polling for it never sees
/// half a file.
pub fn write_addr_file(
    path: &Path,
    grpc: SocketAddr,
    admin: SocketAddr,
    webhook: Option<SocketAddr>,
) -> Result<(), ServerError> {
    let json = serde_json::json!({
        "grpc": grpc.to_string(),
        "admin": admin.to_string(),
        "webhook": webhook.map(|a| a.to_string()),
    });
    let err = |source| ServerError::AddrFile {
        path: path.to_owned(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| err(std::io::Error::other("not a file path")))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, format!("{json}\n")).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// The machine's (in Kubernetes: the pod's) host name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

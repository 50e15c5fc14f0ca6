//! `weft-control`'s command-line flags and their translation into [`Options`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::server::{EtcdOptions, Options};
use crate::source::Source;

/// weft's control plane: serves the mesh configuration to every proxy.
#[derive(Debug, Parser)]
#[command(name = "weft-control", version)]
pub struct Args {
    /// Mesh YAML file; without it, the embedded demo mesh. The file is watched: a valid edit
    /// becomes the live config (replacing changes made through the API), an invalid one is
    /// refused and the current config stays.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for persistent state; without it, state is kept in memory only.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Address of the gRPC config stream.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15010")]
    pub grpc_addr: SocketAddr,
    /// Address of the admin JSON API.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15014")]
    pub admin_addr: SocketAddr,
    /// After binding, write {"grpc": "ip:port", "admin": "ip:port", "webhook": ...} here.
    #[arg(long, value_name = "PATH")]
    pub addr_file: Option<PathBuf>,
    /// How often the config file is checked for changes, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub watch_interval: u64,
    /// Only validate --config and exit: 0 if valid, 2 if not.
    #[arg(long)]
    pub check: bool,
    /// SPIFFE trust domain of workload identities (spiffe://<domain>/ns/<ns>/sa/<sa>).
    #[arg(long, value_name = "DOMAIN", default_value = "weft.local")]
    pub trust_domain: String,
    /// Lifetime of workload certificates, e.g. 24h, 90m, 30s, 500ms.
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    pub cert_ttl: weft_proto::model::Millis,
    /// Signing CA certificate (PEM: it first, then its chain; a self-signed last one is the
    /// root). Without it, a root is generated (and kept in --state-dir/ca/).
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Private key of --ca-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Extra trusted roots (PEM), e.g. the previous root during a rotation.
    #[arg(long, value_name = "FILE")]
    pub trust_bundle: Option<PathBuf>,
    /// Serve the gRPC port over TLS, with a certificate the CA issues to the control plane
    /// (proxies then use https:// and --control-plane-ca with the bundle from
    /// GET /api/v1/identity/bundle).
    #[arg(long)]
    pub grpc_tls: bool,
    /// Keep the state in etcd (comma-separated `http://host:port` endpoints) instead of
    /// --state-dir, shared by every replica given the same endpoints and prefix; one replica
    /// at a time (elected on an etcd lease) drives experiments.
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix in etcd: the state is `<prefix>/state`, the leader `<prefix>/leader`.
    #[arg(long, value_name = "PREFIX", default_value = "/weft")]
    pub etcd_prefix: String,
    /// Lease TTL of the leader (at least 2s): a dead leader is replaced after about this long.
    #[arg(long, value_name = "DURATION", default_value = "3s")]
    pub leader_ttl: weft_proto::model::Millis,
    /// This replica's name in leader election and `weftctl status` (unique per replica);
    /// default: `<host name>:<admin port>`.
    #[arg(long, value_name = "NAME")]
    pub replica_id: Option<String>,
    /// Discover Services, EndpointSlices and Gateway API HTTPRoutes from the Kubernetes API
    /// server (in-cluster service account, else KUBECONFIG); they are merged under the
    /// --config mesh, which wins on a name clash.
    #[arg(long)]
    pub kubernetes: bool,
    /// The kubeconfig file to use with --kubernetes (instead of in-cluster / KUBECONFIG).
    #[arg(long, value_name = "PATH", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Only discover these namespaces (repeatable or comma-separated); default: all.
    #[arg(
        long,
        value_name = "NS",
        value_delimiter = ',',
        requires = "kubernetes"
    )]
    pub discovery_namespace: Vec<String>,
    #[command(flatten)]
    pub webhook: crate::webhook::WebhookArgs,
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. "info,weft_control=debug".
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log: String,
}

impl Args {
    /// The source named by `--config`, or the embedded mesh.
    pub fn source(&self) -> Source {
        self.config.clone().map_or(Source::Embedded, Source::File)
    }

    pub fn options(&self) -> Options {
        Options {
            source: self.source(),
            state_dir: self.state_dir.clone(),
            grpc_addr: self.grpc_addr,
            admin_addr: self.admin_addr,
            watch_interval: Duration::from_millis(self.watch_interval),
            ca: crate::ca::CaOptions {
                trust_domain: self.trust_domain.clone(),
                cert_ttl: self.cert_ttl.as_duration(),
                ca_cert: self.ca_cert.clone(),
                ca_key: self.ca_key.clone(),
                trust_bundle: self.trust_bundle.clone(),
            },
            grpc_tls: self.grpc_tls,
            etcd: (!self.etcd_endpoints.is_empty()).then(|| EtcdOptions {
                endpoints: self.etcd_endpoints.clone(),
                prefix: self.etcd_prefix.clone(),
                leader_ttl: self.leader_ttl.as_duration().max(Duration::from_secs(2)),
            }),
            replica_id: self.replica_id.clone(),
            webhook: self.webhook.options(),
            kubernetes: self.kubernetes.then(|| crate::kubernetes::KubeOptions {
                kubeconfig: self.kubeconfig.clone(),
                namespaces: self.discovery_namespace.clone(),
            }),
        }
    }
}

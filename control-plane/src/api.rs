//! The admin JSON API's message types, shared by the server ([`crate::admin`]) and the client
//! ([`crate::client`], used by `weftctl`) so the two cannot drift apart.
//!
//! The shapes are a contract (see `ARCHITECTURE.md`): fields are only ever added.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weft_proto::MeshConfig;
use weft_proto::model::Route;

/// `GET /api/v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The version of the live configuration.
    pub version: u64,
    /// The `--config` path, or `embedded`.
    pub source: String,
    /// Why the last edit of the source file was refused; `null` once a valid file is read.
    pub last_source_error: Option<String>,
    /// Why the last Kubernetes discovery snapshot was refused (the merged config did not
    /// validate); `null` once one is accepted or without `--kubernetes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_discovery_error: Option<String>,
    /// Every proxy seen since start, sorted by node id; disconnected ones stay listed.
    pub proxies: Vec<ProxyStatus>,
    /// The most recent NACKs over all proxies, oldest first (bounded).
    pub nacks: Vec<NackEntry>,
    /// Replicas on etcd: why the list may miss proxies of other replicas (etcd unreadable,
    /// an entry left out or cut); `null` when it is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roster_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub node_id: String,
    pub service: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub connected: bool,
    /// The last version this proxy ACKed on its current (or last) stream.
    pub acked_version: Option<u64>,
    pub last_nack: Option<LastNack>,
    pub connected_at_unix_ms: u64,
    pub last_ack_at_unix_ms: Option<u64>,
    /// The proxy's admin listener (`/metrics`, `/config`), as it announced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_addr: Option<String>,
    /// Replicas on etcd: the replica this proxy streams (or last streamed) from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastNack {
    /// The version the proxy refused.
    pub version: u64,
    pub error: String,
    pub at_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NackEntry {
    pub node_id: String,
    pub version: u64,
    pub error: String,
    pub at_unix_ms: u64,
}

/// `GET /api/v1/routes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    pub version: u64,
    pub routes: Vec<Route>,
}

/// `GET /api/v1/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub version: u64,
    pub config: MeshConfig,
}

/// Body of `POST /api/v1/routes/{route}/weights`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetWeightsRequest {
    /// Backend name (`v1`, `reviews/v1`, or the service when it has no subset) → weight.
    pub weights: BTreeMap<String, u32>,
    /// The rule index; `null` picks the rule whose backends are exactly the names given.
    #[serde(default)]
    pub rule: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetWeightsResponse {
    /// The version now live (unchanged if the weights already were these).
    pub version: u64,
    pub route: String,
    /// The index of the rule that was changed.
    pub rule: usize,
}

/// Answer to `POST /api/v1/apply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    pub version: u64,
    /// The applied configuration equals the live one; the version did not move.
    pub unchanged: bool,
}

/// The body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

//! What the registry knows about each proxy: connected or not, the version it ACKed, its last
//! NACK, and a bounded log of NACKs over all proxies (`GET /api/v1/status`). Kept under a plain
//! mutex held for a few field updates, never across an `.await`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::MutexGuard;
use std::time::{SystemTime, UNIX_EPOCH};

use weft_proto::pb;

use super::Registry;
use crate::api;

/// How many NACKs `/api/v1/status` keeps over all proxies.
pub const NACK_LOG_LEN: usize = 100;

/// Disconnected proxies stay listed (operators want to see who went away), but not forever:
/// beyond this many, the longest-gone are forgotten so churn cannot grow memory unboundedly.
const MAX_DISCONNECTED: usize = 1024;

#[derive(Debug, Default)]
pub(super) struct Book {
    proxies: BTreeMap<String, ProxyRecord>,
    nacks: VecDeque<api::NackEntry>,
    pub(super) last_source_error: Option<String>,
    pub(super) last_discovery_error: Option<String>,
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

impl Registry {
    pub(super) fn book(&self) -> MutexGuard<'_, Book> {
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

    pub(super) fn connected(&self) -> usize {
        self.book()
            .proxies
            .values()
            .filter(|p| p.status.connected)
            .count()
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

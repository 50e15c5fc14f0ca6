//! The mesh-wide proxy roster of replicas on etcd: each replica publishes the status of the
//! proxies streaming from it under `<prefix>/status/<replica>`, and `GET /api/v1/status` on
//! any replica merges what every live replica published. Without it, `weftctl status` through
//! a Service in front of the replicas listed whichever replica answered: part of the mesh.
//!
//! An entry sits on the replica's own lease, so a replica that dies takes its entry with it
//! (its proxies reconnect to another replica and are listed there). It is rewritten only when
//! the replica's proxies changed, at most once per [`PUBLISH_EVERY`], which bounds how stale
//! the merged view is. Reading the others is bounded by [`READ_TIMEOUT`]: with etcd away,
//! status still answers, with this replica's proxies and the reason the others are missing.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry as Slot;
use std::time::Duration;

use etcd_client::{GetOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::api;
use crate::etcd::{EtcdStore, KeptLease, kept_lease};
use crate::registry::{NACK_LOG_LEN, Registry};
use crate::shutdown::Shutdown;
use crate::store::StoreError;

const PUBLISH_EVERY: Duration = Duration::from_secs(1);
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// etcd refuses requests over 1.5 MiB by default: an entry stays under 1 MiB.
const MAX_ENTRY: usize = 1 << 20;

/// What one replica publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub replica: String,
    pub proxies: Vec<api::ProxyStatus>,
    pub nacks: Vec<api::NackEntry>,
    /// Proxies left out to keep the entry under etcd's request size limit.
    #[serde(default)]
    pub omitted: usize,
}

/// One replica's view of the roster: its id, and where the entries live.
#[derive(Debug, Clone)]
pub struct Roster {
    store: EtcdStore,
    replica: String,
    ttl: Duration,
}

impl Roster {
    /// `ttl`: the entry's lease (the leader lease's TTL: a dead replica's proxies leave the
    /// roster about when its leadership ends).
    pub fn new(store: EtcdStore, replica: &str, ttl: Duration) -> Self {
        Self {
            store,
            replica: replica.to_owned(),
            ttl: ttl.max(Duration::from_secs(2)),
        }
    }

    fn key(&self) -> String {
        self.store.key(&format!("status/{}", self.replica))
    }

    /// Publishes this replica's proxies until `shutdown`, then withdraws the entry.
    pub async fn run(self, registry: Registry, shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match Box::pin(self.term(&registry, &shutdown)).await {
                Ok(()) => return,
                Err(error) => {
                    warn!(%error, "publishing this replica's proxies to etcd failed; retrying")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.wait() => return,
            }
            backoff = (backoff * 2).min(self.ttl);
        }
    }

    /// One lease: publish on change while it holds, until an error or `shutdown`.
    async fn term(&self, registry: &Registry, shutdown: &Shutdown) -> Result<(), StoreError> {
        let mut client = self.store.client();
        let KeptLease { id: lease, lost } = kept_lease(&mut client, self.ttl)
            .await
            .map_err(|(what, e)| self.store.error(what, e))?;
        tokio::pin!(lost);
        let mut publish = tokio::time::interval(PUBLISH_EVERY);
        let mut published: Option<Vec<u8>> = None;
        loop {
            tokio::select! {
                _ = publish.tick() => {
                    let value = encode(self.entry(registry), MAX_ENTRY);
                    if published.as_ref() != Some(&value) {
                        let put = PutOptions::new().with_lease(lease);
                        let put = client.put(self.key(), value.clone(), Some(put));
                        self.store.request("publish the status", READ_TIMEOUT, put).await?;
                        published = Some(value);
                    }
                }
                () = &mut lost => {
                    return Err(self.store.error(
                        "keep the roster lease",
                        format!("lease {lease:x} expired or could not be renewed"),
                    ));
                }
                () = shutdown.wait() => {
                    // The entry goes with the lease: at once, not after the TTL.
                    let _ = tokio::time::timeout(READ_TIMEOUT, client.lease_revoke(lease)).await;
                    return Ok(());
                }
            }
        }
    }

    fn entry(&self, registry: &Registry) -> Entry {
        let status = registry.status();
        Entry {
            replica: self.replica.clone(),
            proxies: status.proxies,
            nacks: status.nacks,
            omitted: 0,
        }
    }

    /// The status document with every live replica's proxies (`GET /api/v1/status`).
    pub async fn status(&self, registry: &Registry) -> api::Status {
        let mut status = registry.status();
        for p in &mut status.proxies {
            p.replica = Some(self.replica.clone());
        }
        match Box::pin(self.others()).await {
            Ok((entries, unreadable)) => {
                let omitted = merge(&mut status, entries);
                let mut notes = unreadable;
                if omitted > 0 {
                    notes.push(format!(
                        "{omitted} proxies of other replicas left out (entry size limit)"
                    ));
                }
                status.roster_error = (!notes.is_empty()).then(|| notes.join("; "));
            }
            Err(e) => {
                status.roster_error = Some(format!("only this replica's proxies are listed: {e}"));
            }
        }
        status
    }

    /// The other replicas' entries, and a note for each one that could not be read.
    async fn others(&self) -> Result<(Vec<Entry>, Vec<String>), StoreError> {
        let mut client = self.store.client();
        let prefix = self.store.key("status/");
        let opts = GetOptions::new().with_prefix();
        let get = client.get(prefix.clone(), Some(opts));
        let resp = self
            .store
            .request("read the other replicas' status", READ_TIMEOUT, get)
            .await?;
        let own = self.key();
        let (mut entries, mut unreadable) = (Vec::new(), Vec::new());
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            if key == own {
                continue;
            }
            match serde_json::from_slice::<Entry>(kv.value()) {
                Ok(entry) => entries.push(entry),
                Err(e) => unreadable.push(format!("{key} is not a status entry: {e}")),
            }
        }
        Ok((entries, unreadable))
    }
}

/// `entry` as JSON of at most `limit` bytes: disconnected proxies are left out first, then
/// connected ones (counted in `omitted`).
fn encode(mut entry: Entry, limit: usize) -> Vec<u8> {
    // Serializing plain data into a Vec cannot fail.
    let mut value = serde_json::to_vec(&entry).unwrap_or_default();
    if value.len() > limit {
        entry.proxies.sort_by_key(|p| !p.connected);
    }
    while value.len() > limit && !entry.proxies.is_empty() {
        let n = entry.proxies.len();
        // Proportionally, with a margin, and at least one less each round.
        let keep = (n * limit / value.len() * 9 / 10).min(n - 1);
        entry.omitted += n - keep;
        entry.proxies.truncate(keep);
        value = serde_json::to_vec(&entry).unwrap_or_default();
    }
    value
}

/// Merges other replicas' entries into `status`: one row per proxy (a connected record wins
/// over a replica's memory of it disconnected, then the newer connection), NACKs in time
/// order and bounded. Returns how many proxies the entries left out.
pub fn merge(status: &mut api::Status, entries: Vec<Entry>) -> usize {
    let mut rows: BTreeMap<String, api::ProxyStatus> = std::mem::take(&mut status.proxies)
        .into_iter()
        .map(|p| (p.node_id.clone(), p))
        .collect();
    let mut omitted = 0;
    for entry in entries {
        omitted += entry.omitted;
        for mut p in entry.proxies {
            p.replica = Some(entry.replica.clone());
            match rows.entry(p.node_id.clone()) {
                Slot::Vacant(v) => {
                    v.insert(p);
                }
                Slot::Occupied(mut o) => {
                    let rank = |p: &api::ProxyStatus| (p.connected, p.connected_at_unix_ms);
                    if rank(&p) > rank(o.get()) {
                        o.insert(p);
                    }
                }
            }
        }
        status.nacks.extend(entry.nacks);
    }
    status.proxies = rows.into_values().collect();
    status.nacks.sort_by_key(|n| n.at_unix_ms);
    let excess = status.nacks.len().saturating_sub(NACK_LOG_LEN);
    status.nacks.drain(..excess);
    omitted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(id: &str, connected: bool, at: u64) -> api::ProxyStatus {
        api::ProxyStatus {
            node_id: id.into(),
            service: "svc".into(),
            namespace: "default".into(),
            labels: BTreeMap::new(),
            connected,
            acked_version: Some(3),
            last_nack: None,
            connected_at_unix_ms: at,
            last_ack_at_unix_ms: None,
            admin_addr: None,
            replica: None,
        }
    }

    fn nack(id: &str, at: u64) -> api::NackEntry {
        api::NackEntry {
            node_id: id.into(),
            version: 2,
            error: "bad".into(),
            at_unix_ms: at,
        }
    }

    fn status(proxies: Vec<api::ProxyStatus>) -> api::Status {
        api::Status {
            version: 3,
            source: "embedded".into(),
            last_source_error: None,
            last_discovery_error: None,
            proxies,
            nacks: vec![nack("x", 5)],
            roster_error: None,
        }
    }

    #[test]
    fn merge_lists_each_proxy_once_where_it_is_connected() {
        let mut local = proxy("moved", false, 10);
        local.replica = Some("cp-a".into());
        let mut s = status(vec![local, proxy("only-a", true, 1)]);
        let entries = vec![
            Entry {
                replica: "cp-b".into(),
                proxies: vec![proxy("moved", true, 20), proxy("only-b", true, 2)],
                nacks: vec![nack("y", 1)],
                omitted: 0,
            },
            Entry {
                replica: "cp-c".into(),
                // An older, closed stream of the same proxy loses to the live one.
                proxies: vec![proxy("moved", false, 30)],
                nacks: vec![],
                omitted: 4,
            },
        ];
        assert_eq!(merge(&mut s, entries), 4);
        let rows: Vec<_> = s
            .proxies
            .iter()
            .map(|p| (p.node_id.as_str(), p.connected, p.replica.as_deref()))
            .collect();
        assert_eq!(
            rows,
            [
                ("moved", true, Some("cp-b")),
                ("only-a", true, None),
                ("only-b", true, Some("cp-b")),
            ]
        );
        let nacks: Vec<_> = s.nacks.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(nacks, ["y", "x"], "in time order");
    }

    #[test]
    fn merged_nacks_stay_bounded_keeping_the_newest() {
        let mut s = status(vec![]);
        let entry = Entry {
            replica: "cp-b".into(),
            proxies: vec![],
            nacks: (0..NACK_LOG_LEN as u64 + 10)
                .map(|i| nack("p", 100 + i))
                .collect(),
            omitted: 0,
        };
        merge(&mut s, vec![entry]);
        assert_eq!(s.nacks.len(), NACK_LOG_LEN);
        assert_eq!(
            s.nacks.last().unwrap().at_unix_ms,
            100 + NACK_LOG_LEN as u64 + 9
        );
    }

    #[test]
    fn an_entry_over_the_limit_drops_disconnected_proxies_first_and_counts_them() {
        let proxies: Vec<_> = (0..200)
            .map(|i| proxy(&format!("p{i:03}"), i % 2 == 0, i))
            .collect();
        let entry = Entry {
            replica: "cp-a".into(),
            proxies,
            nacks: vec![],
            omitted: 0,
        };
        let whole = encode(entry.clone(), usize::MAX);
        let limit = whole.len() / 3;
        let value = encode(entry, limit);
        assert!(value.len() <= limit, "{} > {limit}", value.len());
        let back: Entry = serde_json::from_slice(&value).unwrap();
        assert!(!back.proxies.is_empty());
        assert!(back.proxies.iter().all(|p| p.connected), "connected kept");
        assert_eq!(back.proxies.len() + back.omitted, 200);
    }
}

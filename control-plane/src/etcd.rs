//! The etcd-backed [`Store`]: several `weft-control` replicas share one state.
//!
//! The whole [`StoredState`] is one JSON value under `<prefix>/state`. A save is an etcd
//! transaction "if the key's `mod_revision` is still the one I built on, put" — a
//! compare-and-swap, so two replicas never both save version N: the loser gets
//! [`StoreError::Conflict`], and the registry takes in the winner's state and redoes its change
//! on top. The key's `mod_revision` is the store revision the registry tracks.
//!
//! [`Store::watch`] follows the key with an etcd watch (a server push, so a change reaches
//! every replica in milliseconds). A broken watch is re-established with backoff; it then
//! first yields the state as it is, so nothing saved meanwhile is missed.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::store::{Revisioned, Store, StoreError, StoredState};

/// How long one etcd request may take before it is an error (the caller keeps its state).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings find an etcd member that vanished without closing the connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A connection to etcd and the key prefix this mesh's state lives under.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: String,
    prefix: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://host:port`, several for an etcd cluster) and checks
    /// that etcd answers, so a wrong address fails at start with a clear error.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let joined = endpoints.join(",");
        let err = |what: &'static str| {
            let endpoints = joined.clone();
            move |e: etcd_client::Error| StoreError::Etcd {
                endpoints,
                what,
                reason: e.to_string(),
            }
        };
        let opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let mut client =
            tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(endpoints, Some(opts)))
                .await
                .map_err(|_| timeout(&joined, "connect"))?
                .map_err(err("connect"))?;
        tokio::time::timeout(REQUEST_TIMEOUT, client.status())
            .await
            .map_err(|_| timeout(&joined, "status"))?
            .map_err(err("status"))?;
        info!(endpoints = %joined, prefix, "connected to etcd");
        Ok(Self {
            client,
            endpoints: joined,
            prefix: prefix.trim_end_matches('/').to_owned(),
        })
    }

    /// The client, shared with leader election.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// `<prefix>/<name>`.
    pub fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    /// The value of `<prefix>/<name>`: `value` if this call created the key, else what another
    /// replica stored first. Every replica of one prefix so agrees on one value (the CA, the
    /// token secret) without a leader.
    pub async fn create_or_get(&self, name: &str, value: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let key = self.key(name);
        // A key that does not exist has create_revision 0.
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), value.clone(), None)])
            .or_else([TxnOp::get(key, None)]);
        let what = "create or read a shared secret";
        let resp = self
            .request(
                what,
                REQUEST_TIMEOUT,
                Box::pin(self.client.clone().txn(txn)),
            )
            .await?;
        if resp.succeeded() {
            return Ok(value);
        }
        resp.op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
            .ok_or_else(|| self.error(what, format!("{name} exists but could not be read")))
    }

    /// One etcd request, bounded by `within`; an error or no answer names etcd and `what`.
    pub async fn request<T>(
        &self,
        what: &'static str,
        within: Duration,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(within, fut).await {
            Ok(result) => result.map_err(|e| self.error(what, e)),
            Err(_) => Err(self.error(what, format!("no answer within {within:?}"))),
        }
    }

    pub fn error(&self, what: &'static str, e: impl ToString) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            what,
            reason: e.to_string(),
        }
    }

    fn parse(&self, value: &[u8], revision: i64) -> Result<Revisioned, StoreError> {
        let state: StoredState = serde_json::from_slice(value)
            .map_err(|e| self.error("the stored state is not valid state JSON", e))?;
        Ok(Revisioned {
            state,
            revision: u64::try_from(revision).unwrap_or(0),
        })
    }

    async fn get(&self) -> Result<Option<Revisioned>, StoreError> {
        let key = self.key("state");
        let resp = self
            .client
            .clone()
            .get(key, None)
            .await
            .map_err(|e| self.error("read state", e))?;
        resp.kvs()
            .first()
            .map(|kv| self.parse(kv.value(), kv.mod_revision()))
            .transpose()
    }

    /// Follows the state key into `tx` until the receiver is dropped.
    async fn follow(self, tx: mpsc::Sender<Revisioned>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.follow_once(&tx).await {
                Ok(()) => return,
                Err(e) => warn!(error = %e, "etcd watch broken; re-establishing it"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
        }
    }

    /// One watch: the current state first, then every change after it. `Ok` when the
    /// receiver is gone.
    async fn follow_once(&self, tx: &mpsc::Sender<Revisioned>) -> Result<(), StoreError> {
        let mut from = 0;
        if let Some(r) = self.get().await? {
            from = r.revision;
            if tx.send(r).await.is_err() {
                return Ok(());
            }
        }
        let key = self.key("state");
        let opts = WatchOptions::new().with_start_revision(i64::try_from(from).unwrap_or(0) + 1);
        let mut stream = self
            .client
            .clone()
            .watch(key, Some(opts))
            .await
            .map_err(|e| self.error("watch state", e))?;
        loop {
            let resp = tokio::select! {
                msg = stream.message() => msg.map_err(|e| self.error("watch state", e))?,
                () = tx.closed() => return Ok(()),
            };
            let Some(resp) = resp else {
                return Err(self.error("watch state", "the watch stream ended"));
            };
            if resp.canceled() {
                return Err(self.error("watch state", resp.cancel_reason()));
            }
            for event in resp.events() {
                if event.event_type() != EventType::Put {
                    continue;
                }
                let Some(kv) = event.kv() else { continue };
                match self.parse(kv.value(), kv.mod_revision()) {
                    Ok(r) => {
                        if tx.send(r).await.is_err() {
                            return Ok(());
                        }
                    }
                    // A bad value is not applied; the live state stays.
                    Err(e) => warn!(error = %e, "ignoring an unreadable state in etcd"),
                }
            }
        }
    }
}

/// A lease kept alive every third of its TTL, for keys that must vanish with their owner.
pub struct KeptLease {
    pub id: i64,
    /// Resolves when the lease can no longer be trusted: a renewal refused or unanswered within
    /// a third of the TTL, or an answer with TTL 0 (expired). Renewing at a third leaves two
    /// tries before etcd expires it.
    pub lost: BoxFuture<'static, ()>,
}

/// Grants a lease of `ttl` (whole seconds, at least 2, etcd's minimum) and starts keeping it
/// alive; the error says which step failed.
pub async fn kept_lease(
    client: &mut Client,
    ttl: Duration,
) -> Result<KeptLease, (&'static str, etcd_client::Error)> {
    let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(2);
    let id = client
        .lease_grant(secs, None)
        .await
        .map_err(|e| ("grant a lease", e))?
        .id();
    let (mut keeper, mut acks) = client
        .lease_keep_alive(id)
        .await
        .map_err(|e| ("keep the lease alive", e))?;
    let every = ttl / 3;
    let lost = Box::pin(async move {
        loop {
            tokio::time::sleep(every).await;
            if keeper.keep_alive().await.is_err() {
                return;
            }
            match tokio::time::timeout(every, acks.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                _ => return,
            }
        }
    });
    Ok(KeptLease { id, lost })
}

fn timeout(endpoints: &str, what: &'static str) -> StoreError {
    StoreError::Etcd {
        endpoints: endpoints.to_owned(),
        what,
        reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
    }
}

impl Store for EtcdStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Revisioned>, StoreError>> {
        Box::pin(self.get())
    }

    fn save<'a>(
        &'a self,
        state: &'a StoredState,
        expected: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let json = serde_json::to_vec(state);
        Box::pin(async move {
            let json = json.map_err(|e| self.error("encode state", e))?;
            let key = self.key("state");
            // A key that does not exist has mod_revision 0: `expected` 0 means "create".
            let expected_rev = i64::try_from(expected).unwrap_or(i64::MAX);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    expected_rev,
                )])
                .and_then([TxnOp::put(key, json, None)]);
            let resp = self
                .client
                .clone()
                .txn(txn)
                .await
                .map_err(|e| self.error("save state", e))?;
            if !resp.succeeded() {
                return Err(StoreError::Conflict {
                    store: format!("etcd {}", self.endpoints),
                    expected,
                });
            }
            let revision = resp
                .header()
                .map(|h| h.revision())
                .ok_or_else(|| self.error("save state", "answer without a header"))?;
            Ok(u64::try_from(revision).unwrap_or(0))
        })
    }

    fn watch(&self) -> Option<mpsc::Receiver<Revisioned>> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.clone().follow(tx));
        Some(rx)
    }

    fn describe(&self) -> String {
        format!("etcd {} ({})", self.endpoints, self.key("state"))
    }
}

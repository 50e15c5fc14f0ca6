//! Which control-plane replica drives experiments: leader election on an etcd lease.
//!
//! Each replica grants itself a lease (TTL `--leader-ttl`, kept alive every third of it) and
//! tries to create `<prefix>/leader` with that lease, in a transaction that only succeeds if
//! the key does not exist. The one that created it leads. The others watch the key; when the
//! leader dies its keep-alives stop, etcd expires the lease and deletes the key, and the
//! watchers campaign again. A leader that cannot renew its lease (etcd unreachable) steps
//! down before the TTL passes, so two replicas never both think they lead for long. A clean
//! shutdown revokes the lease, handing over at once.
//!
//! [`Leadership`] is the read side the experiment engine and the admin API use; a single
//! control plane (no etcd) is always the leader.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::shutdown::Shutdown;

/// `GET /api/v1/leader`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderStatus {
    /// This replica's id (`--replica-id`).
    pub replica: String,
    /// Whether this replica drives experiments now.
    pub is_leader: bool,
    /// The replica that leads, as far as this one knows (`null` during an election).
    pub leader: Option<String>,
    /// `single` (no etcd: always the leader) or `etcd`.
    pub mode: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election on etcd: {what}: {reason}")]
    Etcd { what: &'static str, reason: String },
    #[error("leader election: lease {0:x} expired or could not be renewed")]
    LeaseLost(i64),
}

fn etcd(what: &'static str) -> impl Fn(etcd_client::Error) -> LeaderError {
    move |e| LeaderError::Etcd {
        what,
        reason: e.to_string(),
    }
}

/// The read side: whether this replica leads, and a channel that changes when that does.
#[derive(Debug, Clone)]
pub struct Leadership {
    tx: Arc<watch::Sender<LeaderStatus>>,
}

impl Leadership {
    /// A control plane without peers: always the leader.
    pub fn single(replica: &str) -> Self {
        let (tx, _) = watch::channel(LeaderStatus {
            replica: replica.to_owned(),
            is_leader: true,
            leader: Some(replica.to_owned()),
            mode: "single".into(),
        });
        Self { tx: Arc::new(tx) }
    }

    pub fn is_leader(&self) -> bool {
        self.tx.borrow().is_leader
    }

    pub fn status(&self) -> LeaderStatus {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<LeaderStatus> {
        self.tx.subscribe()
    }

    fn set(&self, is_leader: bool, leader: Option<String>) {
        self.tx.send_if_modified(|s| {
            let next = (is_leader, leader);
            let changed = (s.is_leader, s.leader.clone()) != next;
            (s.is_leader, s.leader) = next;
            changed
        });
    }
}

/// The campaign of one replica on etcd; [`Election::run`] drives it.
pub struct Election {
    client: Client,
    key: String,
    ttl: Duration,
    leadership: Leadership,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Election {
    /// `key` is the leader key (`<prefix>/leader`); `ttl` ≥ 2 s (etcd's minimum lease).
    pub fn new(client: Client, key: String, replica: &str, ttl: Duration) -> Self {
        let (tx, _) = watch::channel(LeaderStatus {
            replica: replica.to_owned(),
            is_leader: false,
            leader: None,
            mode: "etcd".into(),
        });
        Self {
            client,
            key,
            ttl,
            leadership: Leadership { tx: Arc::new(tx) },
        }
    }

    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// Campaigns, leads or follows until `shutdown`; a lost lease or connection starts a
    /// new campaign after a short backoff.
    pub async fn run(self, shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.term(&shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    self.leadership.set(false, None);
                    warn!(error = %e, "leader election interrupted; campaigning again");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.wait() => return,
            }
            backoff = (backoff * 2).min(self.ttl);
        }
    }

    /// One lease: campaign, then lead or follow until the lease is lost (`Err`) or shutdown.
    async fn term(&self, shutdown: &Shutdown) -> Result<(), LeaderError> {
        let mut client = self.client.clone();
        let crate::etcd::KeptLease { id: lease, lost } =
            crate::etcd::kept_lease(&mut client, self.ttl)
                .await
                .map_err(|(what, e)| etcd(what)(e))?;
        let ttl = self.ttl;
        let lost = async move {
            lost.await;
            LeaderError::LeaseLost(lease)
        };
        tokio::pin!(lost);
        let me = self.leadership.status().replica;
        loop {
            let put = PutOptions::new().with_lease(lease);
            let txn = Txn::new()
                .when([Compare::create_revision(
                    self.key.clone(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(self.key.clone(), me.clone(), Some(put))])
                .or_else([TxnOp::get(self.key.clone(), None)]);
            let resp = client.txn(txn).await.map_err(etcd("campaign"))?;
            let revision = resp.header().map_or(0, |h| h.revision());
            if resp.succeeded() {
                info!(replica = %me, ttl = ?ttl, "elected leader");
                self.leadership.set(true, Some(me.clone()));
                tokio::select! {
                    e = &mut lost => {
                        self.leadership.set(false, None);
                        return Err(e);
                    }
                    () = shutdown.wait() => {
                        self.leadership.set(false, None);
                        // Hand over now rather than after the TTL.
                        let _ = client.lease_revoke(lease).await;
                        return Ok(());
                    }
                }
            }
            let holder = resp.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            });
            self.leadership.set(false, holder);
            let opts = WatchOptions::new().with_start_revision(revision + 1);
            let mut stream = client
                .watch(self.key.clone(), Some(opts))
                .await
                .map_err(etcd("watch the leader key"))?;
            // Until the key is deleted (the leader's lease expired or was revoked).
            loop {
                tokio::select! {
                    msg = stream.message() => {
                        let resp = msg
                            .map_err(etcd("watch the leader key"))?
                            .ok_or(LeaderError::Etcd {
                                what: "watch the leader key",
                                reason: "the watch stream ended".into(),
                            })?;
                        if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                            break;
                        }
                    }
                    e = &mut lost => return Err(e),
                    () = shutdown.wait() => {
                        let _ = client.lease_revoke(lease).await;
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// `GET /api/v1/leader` (merged into the admin API).
pub fn router(leadership: Leadership) -> axum::Router {
    axum::Router::new()
        .route(
            "/api/v1/leader",
            axum::routing::get(
                |axum::extract::State(l): axum::extract::State<Leadership>| async move {
                    axum::Json(l.status())
                },
            ),
        )
        .with_state(leadership)
}

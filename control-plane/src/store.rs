//! Durable state of the control plane: the live configuration, its version and which source
//! file it derived from.
//!
//! The store sits behind the [`Store`] trait: [`MemoryStore`] (no `--state-dir`: state dies
//! with the process), [`FileStore`] (one JSON file, replaced atomically so a crash never
//! leaves a half-written state behind) and [`crate::etcd::EtcdStore`] (shared by several
//! replicas).
//!
//! Every saved state has a *revision*. A save names the revision it builds on and fails with
//! [`StoreError::Conflict`] when the store moved on meanwhile (another replica wrote): that
//! compare-and-swap is what keeps two replicas from issuing the same version for different
//! content. Local stores have a single writer (this process), so their revision just counts.
//!
//! What is persisted matters for one invariant: versions never go backwards, also across
//! restarts, because reconnecting proxies report the version they run and compare it.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use weft_proto::MeshConfig;

/// The file [`FileStore`] keeps its state in, inside the state directory.
pub const STATE_FILE: &str = "state.json";

/// What the control plane persists after every accepted change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredState {
    /// Version of `config`; only grows.
    pub version: u64,
    /// The base configuration (the source file, with mutations made through the admin API).
    /// The served config is [`crate::discovery::merge`] of it and `discovered`.
    pub config: MeshConfig,
    /// The layer discovered from Kubernetes (`--kubernetes`), kept so a restart or another
    /// replica serves the last good discovered config before the API server answers.
    #[serde(default, skip_serializing_if = "is_empty_mesh")]
    pub discovered: MeshConfig,
    /// [`content_hash`] of the source file text `config` derived from. On restart, a matching
    /// hash means the file did not change meanwhile, so the stored config (with its API
    /// mutations) is still the truth.
    pub source_hash: u64,
    /// Experiments and where each one is, so a restart resumes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experiments: Vec<crate::experiment::Record>,
}

fn is_empty_mesh(m: &MeshConfig) -> bool {
    *m == MeshConfig::default()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state store {path} is not valid state JSON: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state store task failed: {0}")]
    Task(String),
    /// Another writer saved first; reload and redo the change.
    #[error(
        "state store {store}: revision {expected} is no longer the newest (another replica wrote)"
    )]
    Conflict { store: String, expected: u64 },
    #[error("etcd {endpoints}: {what}: {reason}")]
    Etcd {
        endpoints: String,
        what: &'static str,
        reason: String,
    },
}

/// A state as read from the store, with the revision a save building on it must name.
#[derive(Debug, Clone, PartialEq)]
pub struct Revisioned {
    pub state: StoredState,
    pub revision: u64,
}

/// Where the registry persists its state.
///
/// The methods return boxed futures (rather than `async fn`) so the trait stays usable as
/// `Arc<dyn Store>`.
pub trait Store: Send + Sync + fmt::Debug {
    /// The last saved state, or `None` when nothing was ever saved.
    fn load(&self) -> BoxFuture<'_, Result<Option<Revisioned>, StoreError>>;
    /// Durably replaces the saved state if the store still is at revision `expected` (0: the
    /// one [`Store::load`] found nothing at); returns the new revision. When this returns `Ok`,
    /// a crash does not lose the state.
    fn save<'a>(
        &'a self,
        state: &'a StoredState,
        expected: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// States other writers save, in order, as they land; `None` when this process is the
    /// only writer. The stream resumes by itself after a broken connection (it then first
    /// yields the newest state).
    fn watch(&self) -> Option<tokio::sync::mpsc::Receiver<Revisioned>> {
        None
    }
    /// What the store is, for logs and errors (`memory`, the file path, the etcd endpoints).
    fn describe(&self) -> String;
}

/// A 64-bit FNV-1a hash of source text.
///
/// Hand-rolled because the value is persisted: `std`'s `DefaultHasher` may change between
/// Rust releases, which would make every upgrade look like a file edit.
pub fn content_hash(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// Keeps state in memory only: a restart starts again from the source file at version 1.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<Option<Revisioned>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Revisioned>, StoreError>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Box::pin(async move { Ok(state) })
    }

    fn save<'a>(
        &'a self,
        state: &'a StoredState,
        expected: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let mut slot = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let current = slot.as_ref().map_or(0, |r| r.revision);
        let result = if current == expected {
            *slot = Some(Revisioned {
                state: state.clone(),
                revision: expected + 1,
            });
            Ok(expected + 1)
        } else {
            Err(StoreError::Conflict {
                store: "memory".into(),
                expected,
            })
        };
        Box::pin(async move { result })
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

/// Keeps state as `state.json` in a directory.
///
/// Saves are crash-safe: the JSON goes to a temporary file in the same directory, which is
/// fsynced and renamed over the old file, then the directory is fsynced so the rename itself
/// is durable. A reader (or a restart after a crash) sees the old state or the new one, never
/// a mix.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// Uses `dir`, creating it if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    fn load_blocking(path: &Path) -> Result<Option<StoredState>, StoreError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        // A corrupt file is an error, not "no state": starting over at version 1 would make
        // versions go backwards for every connected proxy.
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                path: path.to_owned(),
                source,
            })
    }

    fn save_blocking(dir: &Path, json: &[u8]) -> Result<(), StoreError> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!(".{STATE_FILE}.tmp-{}", std::process::id()));
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(json).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io)?;
        // The rename lives in the directory entry; without this fsync a power loss can
        // resurrect the old file.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

impl Store for FileStore {
    // The file is this process's alone (one writer, serialized by the registry), so the
    // revision is not stored: a load starts it at 1 and each save adds one.
    fn load(&self) -> BoxFuture<'_, Result<Option<Revisioned>, StoreError>> {
        let path = self.path();
        Box::pin(async move {
            let state = tokio::task::spawn_blocking(move || Self::load_blocking(&path))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))??;
            Ok(state.map(|state| Revisioned { state, revision: 1 }))
        })
    }

    fn describe(&self) -> String {
        self.path().display().to_string()
    }

    fn save<'a>(
        &'a self,
        state: &'a StoredState,
        expected: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        // Serialize before leaving the caller's task: `state` is borrowed.
        let json = serde_json::to_vec_pretty(state);
        let dir = self.dir.clone();
        Box::pin(async move {
            let json = json.map_err(|source| StoreError::Corrupt {
                path: dir.join(STATE_FILE),
                source,
            })?;
            // std::fs + fsync in a blocking thread: fsync can take milliseconds and must not
            // stall the runtime's worker threads.
            tokio::task::spawn_blocking(move || Self::save_blocking(&dir, &json))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))??;
            Ok(expected + 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::{Limits, parse_yaml};

    fn state(version: u64) -> StoredState {
        let config =
            parse_yaml("t", include_str!("default-mesh.yaml"), &Limits::default()).unwrap();
        StoredState {
            version,
            config,
            discovered: MeshConfig::default(),
            source_hash: content_hash(b"x"),
            experiments: Vec::new(),
        }
    }

    #[tokio::test]
    async fn file_store_round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("nested")).unwrap();
        assert_eq!(store.load().await.unwrap(), None, "empty store");

        assert_eq!(store.save(&state(3), 0).await.unwrap(), 1);
        assert_eq!(store.save(&state(4), 1).await.unwrap(), 2);
        assert_eq!(store.load().await.unwrap().unwrap().state, state(4));

        // Only the state file remains: the temporary file was renamed, not left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("nested"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![STATE_FILE.to_owned()]);

        // A fresh instance (a restart) reads the same state.
        let again = FileStore::open(dir.path().join("nested")).unwrap();
        assert_eq!(again.load().await.unwrap().unwrap().state, state(4));
    }

    #[tokio::test]
    async fn memory_store_refuses_a_stale_revision() {
        let store = MemoryStore::new();
        assert_eq!(store.save(&state(1), 0).await.unwrap(), 1);
        let err = store.save(&state(2), 0).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { expected: 0, .. }),
            "{err}"
        );
        assert_eq!(store.load().await.unwrap().unwrap().state, state(1));
    }

    #[tokio::test]
    async fn corrupt_state_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let err = FileStore::open(dir.path())
            .unwrap()
            .load()
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(STATE_FILE), "{err}");
    }

    #[test]
    fn content_hash_is_stable() {
        // Persisted values must not change between builds.
        assert_eq!(content_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(content_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}

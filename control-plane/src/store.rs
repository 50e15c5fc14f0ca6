//! Durable state of the control plane: the live configuration, its version and which source
//! file it derived from.
//!
//! The store sits behind the [`Store`] trait so a replicated backend (etcd) can replace the
//! file store later without touching the registry. Two implementations exist today:
//! [`MemoryStore`] (no `--state-dir`: state dies with the process) and [`FileStore`] (one JSON
//! file, replaced atomically so a crash never leaves a half-written state behind).
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
    /// The live configuration, including mutations made through the admin API.
    pub config: MeshConfig,
    /// [`content_hash`] of the source file text `config` derived from. On restart, a matching
    /// hash means the file did not change meanwhile, so the stored config (with its API
    /// mutations) is still the truth.
    pub source_hash: u64,
    /// Experiments and where each one is, so a restart resumes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experiments: Vec<crate::experiment::Record>,
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
}

/// Where the registry persists its state.
///
/// The methods return boxed futures (rather than `async fn`) so the trait stays usable as
/// `Arc<dyn Store>`.
pub trait Store: Send + Sync + fmt::Debug {
    /// The last saved state, or `None` when nothing was ever saved.
    fn load(&self) -> BoxFuture<'_, Result<Option<StoredState>, StoreError>>;
    /// Durably replaces the saved state; when this returns `Ok`, a crash does not lose it.
    fn save<'a>(&'a self, state: &'a StoredState) -> BoxFuture<'a, Result<(), StoreError>>;
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
    state: Mutex<Option<StoredState>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<StoredState>, StoreError>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Box::pin(async move { Ok(state) })
    }

    fn save<'a>(&'a self, state: &'a StoredState) -> BoxFuture<'a, Result<(), StoreError>> {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(state.clone());
        Box::pin(async { Ok(()) })
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
    fn load(&self) -> BoxFuture<'_, Result<Option<StoredState>, StoreError>> {
        let path = self.path();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || Self::load_blocking(&path))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))?
        })
    }

    fn save<'a>(&'a self, state: &'a StoredState) -> BoxFuture<'a, Result<(), StoreError>> {
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
                .map_err(|e| StoreError::Task(e.to_string()))?
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
            source_hash: content_hash(b"x"),
            experiments: Vec::new(),
        }
    }

    #[tokio::test]
    async fn file_store_round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("nested")).unwrap();
        assert_eq!(store.load().await.unwrap(), None, "empty store");

        store.save(&state(3)).await.unwrap();
        store.save(&state(4)).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(state(4)));

        // Only the state file remains: the temporary file was renamed, not left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("nested"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![STATE_FILE.to_owned()]);

        // A fresh instance (a restart) reads the same state.
        let again = FileStore::open(dir.path().join("nested")).unwrap();
        assert_eq!(again.load().await.unwrap(), Some(state(4)));
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

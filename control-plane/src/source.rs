//! The declarative source of the mesh configuration: the `--config` YAML file (or the embedded
//! demo mesh) and the watcher that hot-reloads it.
//!
//! The file is polled rather than watched with inotify: polling `stat` is portable and sees
//! every way a file gets replaced — in-place writes, editors that write a temp file and rename
//! it over the original, and Kubernetes ConfigMap volumes, which swap a `..data` symlink
//! (`metadata` follows symlinks, so the swap shows up as a new inode).
//!
//! A valid edit becomes the live configuration at a new version and replaces any mutations
//! made through the admin API since: the file is the declaration, and when it changes it wins.
//! An invalid edit is refused with `file:line: reason`, logged, shown as `last_source_error`
//! in the status, and the old configuration stays live.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};
use weft_proto::{ConfigError, Limits, MeshConfig, parse_yaml};

use crate::registry::Registry;
use crate::shutdown::Shutdown;
use crate::store::content_hash;

/// The mesh served without `--config`: `control-plane/src/default-mesh.yaml`.
pub const EMBEDDED_MESH: &str = include_str!("default-mesh.yaml");

/// Modification times closer than this to the moment the file was read are not trusted to
/// tell a later write apart (coarse file-system timestamps; the "racy git" problem), so such
/// files are re-read even when their metadata looks unchanged.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Where the configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Embedded,
}

/// A parsed, validated source text.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: MeshConfig,
    /// [`content_hash`] of the text.
    pub hash: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Syntax or validation errors, with `file:line`.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

impl Source {
    /// The name used in messages and in the status: the path, or `embedded`.
    pub fn name(&self) -> String {
        match self {
            Source::File(path) => path.display().to_string(),
            Source::Embedded => "embedded".to_owned(),
        }
    }

    /// Reads and validates the source (blocking; used once at startup and by `--check`).
    pub fn load(&self) -> Result<Loaded, SourceError> {
        match self {
            Source::Embedded => parse(&self.name(), EMBEDDED_MESH.as_bytes()),
            Source::File(path) => {
                let bytes = std::fs::read(path).map_err(|source| SourceError::Read {
                    path: self.name(),
                    source,
                })?;
                parse(&self.name(), &bytes)
            }
        }
    }
}

/// Parses and validates source text; errors read `name:line: reason`.
pub fn parse(name: &str, bytes: &[u8]) -> Result<Loaded, SourceError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::Unreadable {
        source_name: name.to_owned(),
        message: format!("not UTF-8 text: {e}"),
    })?;
    let config = parse_yaml(name, text, &Limits::default())?;
    Ok(Loaded {
        config,
        hash: content_hash(bytes),
    })
}

/// What `stat` says about the file; a change means "read it again".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    inode: (u64, u64),
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let inode = (0, 0);
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
        }
    }
}

/// Polls the `--config` file and feeds valid changes to the registry.
#[derive(Debug)]
pub struct Watcher {
    path: PathBuf,
    name: String,
    interval: Duration,
    registry: Registry,
    /// Hash of the last content handled (accepted or refused); `None` forces a re-parse.
    seen: Option<u64>,
    /// Metadata at the last read, and when that read started.
    last_read: Option<(Fingerprint, SystemTime)>,
    /// The last problem reported, so a broken file is logged once, not every tick.
    reported: Option<String>,
}

impl Watcher {
    /// `hash` is the hash of the content the registry was started from.
    pub fn new(path: &Path, interval: Duration, registry: Registry, hash: u64) -> Self {
        Self {
            path: path.to_owned(),
            name: path.display().to_string(),
            interval,
            registry,
            seen: Some(hash),
            last_read: None,
            reported: None,
        }
    }

    /// Polls until shutdown.
    pub async fn run(mut self, shutdown: Shutdown) {
        let mut ticker = tokio::time::interval(self.interval);
        // After a stall (a suspended VM), one check is enough; no burst of catch-up ticks.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        debug!(path = %self.name, interval = ?self.interval, "watching config file");
        loop {
            tokio::select! {
                _ = ticker.tick() => self.check().await,
                () = shutdown.wait() => return,
            }
        }
    }

    /// One poll: stat, re-read if it may have changed, apply if the content changed.
    pub async fn check(&mut self) {
        let meta = match tokio::fs::metadata(&self.path).await {
            Ok(meta) => meta,
            Err(e) => {
                // Deleted or unreadable: keep serving; re-parse once it is back.
                self.seen = None;
                return self.report(format!("{}: cannot read: {e}", self.name));
            }
        };
        let fingerprint = Fingerprint::of(&meta);
        if let Some((last, read_at)) = self.last_read {
            let settled = fingerprint
                .modified
                .and_then(|m| m.checked_add(RACY_WINDOW))
                .is_some_and(|m| m < read_at);
            if last == fingerprint && settled {
                return;
            }
        }
        let read_at = SystemTime::now();
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(bytes) => bytes,
            Err(e) => {
                self.seen = None;
                return self.report(format!("{}: cannot read: {e}", self.name));
            }
        };
        self.last_read = Some((fingerprint, read_at));
        let hash = content_hash(&bytes);
        if self.seen == Some(hash) {
            return;
        }
        self.seen = Some(hash);
        let loaded = match parse(&self.name, &bytes) {
            Ok(loaded) => loaded,
            Err(e) => return self.report(e.to_string()),
        };
        match self.registry.apply_source(loaded.config, loaded.hash).await {
            Ok(outcome) => {
                self.reported = None;
                if outcome.changed {
                    info!(path = %self.name, version = outcome.version, "config file reloaded");
                } else {
                    debug!(path = %self.name, "config file changed, configuration did not");
                }
            }
            Err(e) => {
                // Most likely the store failed: try again next tick.
                self.seen = None;
                self.report(format!("{}: {e}", self.name));
            }
        }
    }

    fn report(&mut self, error: String) {
        if self.reported.as_ref() != Some(&error) {
            warn!(
                version = self.registry.current().version,
                "config file refused, the current configuration stays live: {error}"
            );
            self.registry.record_source_error(error.clone());
            self.reported = Some(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn embedded_mesh_is_valid() {
        let loaded = Source::Embedded.load().unwrap();
        assert_eq!(loaded.config.routes[0].name, "reviews");
        assert_eq!(loaded.hash, content_hash(EMBEDDED_MESH.as_bytes()));
    }

    /// 1-based line of the first line of `text` containing `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    #[test]
    fn errors_carry_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        let text = EMBEDDED_MESH.replace("subset: v1, weight: 100", "subset: v9, weight: 100");
        std::fs::write(&path, &text).unwrap();
        let err = Source::File(path.clone()).load().unwrap_err().to_string();
        let line = line_of(&text, "subset: v9");
        assert!(
            err.contains(&format!("{}:{line}:", path.display())),
            "{err}"
        );
        assert!(err.contains("v9"), "{err}");
        let missing = Source::File(dir.path().join("nope.yaml")).load();
        assert!(matches!(missing, Err(SourceError::Read { .. })));
    }

    /// Polls `done` until it holds, failing after a deadline.
    async fn wait_until(registry: &Registry, done: impl Fn(&Registry) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(registry) {
            assert!(Instant::now() < deadline, "watcher did not react in time");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn watcher_applies_valid_edits_and_refuses_invalid_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, EMBEDDED_MESH).unwrap();
        let loaded = Source::File(path.clone()).load().unwrap();
        let registry = Registry::open(
            Arc::new(MemoryStore::new()),
            path.display().to_string(),
            loaded.config,
            loaded.hash,
        )
        .await
        .unwrap();
        let (_trigger, shutdown) = crate::shutdown::channel();
        let watcher = Watcher::new(
            &path,
            Duration::from_millis(10),
            registry.clone(),
            loaded.hash,
        );
        tokio::spawn(watcher.run(shutdown));

        // An editor-style save: write a temp file, rename it over the original.
        let tmp = dir.path().join(".mesh.yaml.swp");
        let edited = EMBEDDED_MESH.replace("weight: 100", "weight: 80");
        std::fs::write(&tmp, &edited).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        wait_until(&registry, |r| r.current().version == 2).await;
        assert_eq!(
            registry.current().config.routes[0].rules[1].backends[0].weight,
            Some(80)
        );

        // An invalid edit in place: refused with file:line, version 2 stays live.
        let broken = edited.replace("hosts: [reviews]", "hosts: []");
        std::fs::write(&path, &broken).unwrap();
        wait_until(&registry, |r| r.status().last_source_error.is_some()).await;
        let err = registry.status().last_source_error.unwrap();
        let line = line_of(&broken, "hosts: []");
        assert!(
            err.contains(&format!("{}:{line}:", path.display())),
            "{err}"
        );
        assert_eq!(registry.current().version, 2);

        // Fixed again: accepted, and the error is cleared.
        std::fs::write(&path, EMBEDDED_MESH.replace("weight: 100", "weight: 60")).unwrap();
        wait_until(&registry, |r| r.current().version == 3).await;
        assert_eq!(registry.status().last_source_error, None);
    }
}

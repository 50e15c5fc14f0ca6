//! Finds the workspace's binaries next to the running executable and makes sure they are
//! built and current, so `cargo test -p weft-tests` never runs against stale binaries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The directory holding `weft-proxy`, `weft-control` and `weftctl` for this build profile.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("WEFT_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let exe = std::env::current_exe().expect("current_exe");
        let mut dir = exe.parent().expect("exe has a parent").to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        build(&dir);
        dir
    })
}

/// Runs `cargo build --workspace --bins` for the profile `dir` belongs to. Cargo makes this a
/// no-op when everything is current, and serialises concurrent callers on its own lock.
fn build(dir: &Path) {
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_owned();
    let target_dir = dir.parent().expect("profile dir has a parent");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into()));
    cmd.args(["build", "--quiet", "--workspace", "--bins", "--target-dir"])
        .arg(target_dir);
    if profile != "debug" {
        cmd.args([
            "--profile",
            if profile == "release" {
                "release"
            } else {
                &profile
            },
        ]);
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    // `cargo test` sets the test package's CARGO_PKG_*/CARGO_MANIFEST_* for the test process.
    // Build scripts that watch those names (ring's does) would see them change between this
    // build and the outer one, and both would rebuild ring and all above it every time.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_") || k.starts_with("CARGO_MANIFEST_") || k == "OUT_DIR" {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .status()
        .expect("running cargo build for the weft binaries");
    assert!(
        status.success(),
        "cargo build --workspace --bins failed ({status})"
    );
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins`",
        path.display()
    );
    path
}

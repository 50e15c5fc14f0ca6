//! A real single-member etcd (Debian's `etcd-server`, `/usr/bin/etcd`) for the HA tests, and
//! helpers to run several `weft-control` replicas on it.
//!
//! etcd needs explicit ports: free ones are found by binding port 0 and releasing it just
//! before etcd starts. Its data lives in the test's temp dir; readiness is its `/health`
//! answering `"health":"true"`, polled with a deadline.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::http::HttpClient;
use crate::procs::Proc;
use crate::{ControlPlane, ControlPlaneOpts};

/// Where `etcd` is: `$WEFT_ETCD`, else `etcd` on `PATH`.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_ETCD") {
        return Some(PathBuf::from(p));
    }
    let out = Command::new("sh")
        .args(["-c", "command -v etcd"])
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !p.is_empty()).then(|| PathBuf::from(p))
}

/// The etcd binary, or `None` to skip: allowed only outside CI. In CI (`CI=true`) a missing
/// etcd fails the test, because `.ci/run` installs it.
pub fn etcd_or_skip(test: &str) -> Option<PathBuf> {
    match etcd_binary() {
        Some(p) => Some(p),
        None if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("{test}: etcd not found in CI; .ci/run must `apt-get install etcd-server`")
        }
        None => {
            eprintln!(
                "\n\n*** SKIPPING {test}: etcd is not installed.               ***\n\
                 *** Run `apt-get install etcd-server` to run this test.   ***\n\n"
            );
            None
        }
    }
}

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

/// A running etcd; killed on drop.
pub struct Etcd {
    pub proc: Proc,
    pub client: SocketAddr,
}

impl Etcd {
    pub async fn start(binary: &Path, dir: &Path) -> Etcd {
        let client: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let peer = format!("http://127.0.0.1:{}", free_port());
        let data = dir.join("etcd-data");
        let url = format!("http://{client}");
        let args: Vec<String> = [
            "--name",
            "weft-test",
            "--data-dir",
            &data.display().to_string(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("weft-test={peer}"),
            // A quick election of the single member; lease expiry is checked as often.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let mut proc = Proc::spawn("etcd", binary, &args, dir);
        let http = HttpClient::http1();
        let started = Instant::now();
        loop {
            if let Ok(r) = http.get(client, "etcd", "/health", &[]).await
                && r.text().contains("\"health\":\"true\"")
            {
                break;
            }
            if let Some(status) = proc.exited() {
                panic!(
                    "etcd exited ({status}) before it was healthy\n{}",
                    proc.log_tail()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "etcd not healthy after 20 s\n{}",
                proc.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Etcd { proc, client }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    /// Starts a `weft-control` replica named `name` on this etcd (leader TTL 2 s).
    pub async fn replica(&self, dir: &Path, name: &str, mesh_yaml: &str) -> ControlPlane {
        let opts = ControlPlaneOpts {
            extra_args: replica_args(&self.url(), name),
            ..ControlPlaneOpts::default()
        };
        ControlPlane::start(dir, name, mesh_yaml, opts).await
    }
}

/// The flags of an HA replica on `etcd_url`.
pub fn replica_args(etcd_url: &str, name: &str) -> Vec<String> {
    [
        "--etcd-endpoints",
        etcd_url,
        "--leader-ttl",
        "2s",
        "--replica-id",
        name,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// `GET /api/v1/leader` of a replica.
pub async fn leader_status(cp: &ControlPlane) -> Option<serde_json::Value> {
    HttpClient::http1()
        .get_json(cp.admin, "/api/v1/leader")
        .await
        .ok()
}

//! Starting the real weft binaries on loopback for tests and the demo: every listener on port
//! 0, addresses read back from `--addr-file`, readiness polled with a deadline, logs kept in a
//! file and shown when something fails, and every child killed when its handle drops.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bins::bin;
use crate::http::HttpClient;

/// A child process that is killed when dropped.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("create log file");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log handle"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines the process logged, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = text.lines().collect();
        let start = lines.len().saturating_sub(40);
        format!(
            "--- last log lines of {} ---\n{}",
            self.name,
            lines[start..].join("\n")
        )
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL: the process gets no chance to clean up (a crash, from its peers' view).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for `--addr-file` to appear, failing fast if the process dies first.
async fn read_addr_file(proc: &mut Proc, path: &Path) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str(&text)
        {
            return v;
        }
        if let Some(status) = proc.exited() {
            panic!(
                "{} exited ({status}) before it was ready\n{}",
                proc.name,
                proc.log_tail()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} did not bind in 30 s\n{}",
            proc.name,
            proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn addr(v: &serde_json::Value, key: &str) -> Option<SocketAddr> {
    v.get(key)
        .and_then(|a| a.as_str())
        .map(|a| a.parse().unwrap_or_else(|e| panic!("{key}={a}: {e}")))
}

async fn wait_ready(proc: &mut Proc, admin: SocketAddr, deadline: Duration) {
    let client = HttpClient::http1();
    let start = Instant::now();
    loop {
        if let Ok(r) = client.get(admin, "admin", "/ready", &[]).await
            && r.status.is_success()
        {
            return;
        }
        if let Some(status) = proc.exited() {
            panic!(
                "{} exited ({status}) before it was ready\n{}",
                proc.name,
                proc.log_tail()
            );
        }
        assert!(
            start.elapsed() < deadline,
            "{} not ready after {deadline:?}\n{}",
            proc.name,
            proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A running `weft-control`.
pub struct ControlPlane {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
}

#[derive(Default, Clone)]
pub struct ControlPlaneOpts {
    /// Listen here instead of port 0 (a restart that proxies must find again).
    pub grpc_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
    pub extra_args: Vec<String>,
}

impl ControlPlane {
    pub async fn start(
        dir: &Path,
        name: &str,
        mesh_yaml: &str,
        opts: ControlPlaneOpts,
    ) -> ControlPlane {
        let config_path = dir.join(format!("{name}.yaml"));
        if !config_path.exists() {
            std::fs::write(&config_path, mesh_yaml).expect("write mesh yaml");
        }
        let addr_file = dir.join(format!("{name}.addrs.json"));
        let _ = std::fs::remove_file(&addr_file);
        let or_zero =
            |a: Option<SocketAddr>| a.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        let mut args = vec![
            "--config".into(),
            config_path.display().to_string(),
            "--grpc-addr".into(),
            or_zero(opts.grpc_addr),
            "--admin-addr".into(),
            or_zero(opts.admin_addr),
            // The injector endpoint: never the fixed default port, tests run side by side.
            "--webhook-addr".into(),
            "127.0.0.1:0".into(),
            "--addr-file".into(),
            addr_file.display().to_string(),
            "--watch-interval".into(),
            "100".into(),
            "--log".into(),
            "info".into(),
        ];
        if let Some(state) = &opts.state_dir {
            args.extend(["--state-dir".into(), state.display().to_string()]);
        }
        args.extend(opts.extra_args.iter().cloned());
        let mut proc = Proc::spawn(name, &bin("weft-control"), &args, dir);
        let addrs = read_addr_file(&mut proc, &addr_file).await;
        let grpc = addr(&addrs, "grpc").expect("grpc address");
        let admin = addr(&addrs, "admin").expect("admin address");
        wait_ready(&mut proc, admin, Duration::from_secs(20)).await;
        ControlPlane {
            proc,
            grpc,
            admin,
            config_path,
        }
    }

    pub async fn status(&self) -> serde_json::Value {
        HttpClient::http1()
            .get_json(self.admin, "/api/v1/status")
            .await
            .expect("control-plane status")
    }

    pub async fn version(&self) -> u64 {
        self.status().await["version"]
            .as_u64()
            .expect("status has a version")
    }

    /// Sets weights on a route through the admin API; returns the new version.
    pub async fn set_weights(&self, route: &str, weights: &[(&str, u32)]) -> u64 {
        let map: serde_json::Map<_, _> = weights
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).into()))
            .collect();
        let (status, body) = HttpClient::http1()
            .post_json(
                self.admin,
                &format!("/api/v1/routes/{route}/weights"),
                &serde_json::json!({ "weights": map }),
            )
            .await
            .expect("set weights");
        assert!(
            status.is_success(),
            "set weights {weights:?}: {status} {body}"
        );
        body["version"].as_u64().expect("new version")
    }

    /// Applies mesh YAML; returns the HTTP status and the JSON answer.
    pub async fn apply(&self, yaml: &str) -> (http::StatusCode, serde_json::Value) {
        HttpClient::http1()
            .post_text(
                self.admin,
                "/api/v1/apply",
                "application/yaml",
                yaml.to_owned(),
            )
            .await
            .expect("apply")
    }

    /// Waits until every connected proxy has ACKed `version`.
    pub async fn wait_acked(&self, version: u64, proxies: usize, deadline: Duration) {
        crate::http::eventually(
            deadline,
            &format!("{proxies} proxies to ACK version {version}"),
            || async {
                let status = self.status().await;
                let acked = status["proxies"]
                    .as_array()?
                    .iter()
                    .filter(|p| {
                        p["connected"] == true && p["acked_version"].as_u64() == Some(version)
                    })
                    .count();
                (acked >= proxies).then_some(())
            },
        )
        .await;
    }
}

/// A running `weft-proxy`.
pub struct Proxy {
    pub proc: Proc,
    pub outbound: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub node_id: String,
}

#[derive(Default, Clone)]
pub struct ProxyOpts {
    pub control_plane: Option<SocketAddr>,
    /// Static config instead of a control plane.
    pub config_yaml: Option<String>,
    pub app_addr: Option<SocketAddr>,
    pub service: String,
    pub labels: Vec<(String, String)>,
    pub extra_args: Vec<String>,
}

impl Proxy {
    pub async fn start(dir: &Path, name: &str, opts: ProxyOpts) -> Proxy {
        let addr_file = dir.join(format!("{name}.addrs.json"));
        let _ = std::fs::remove_file(&addr_file);
        let mut args: Vec<String> = vec![
            "--outbound-addr".into(),
            "127.0.0.1:0".into(),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--addr-file".into(),
            addr_file.display().to_string(),
            "--node-id".into(),
            name.into(),
            "--workers".into(),
            "1".into(),
        ];
        if let Some(cp) = opts.control_plane {
            args.extend(["--control-plane".into(), format!("http://{cp}")]);
        }
        if let Some(yaml) = &opts.config_yaml {
            let path = dir.join(format!("{name}.yaml"));
            std::fs::write(&path, yaml).expect("write proxy config");
            args.extend(["--config".into(), path.display().to_string()]);
        }
        if let Some(app) = opts.app_addr {
            args.extend([
                "--app-addr".into(),
                app.to_string(),
                "--inbound-addr".into(),
                "127.0.0.1:0".into(),
            ]);
        }
        if !opts.service.is_empty() {
            args.extend(["--service".into(), opts.service.clone()]);
        }
        for (k, v) in &opts.labels {
            args.extend(["--label".into(), format!("{k}={v}")]);
        }
        args.extend(opts.extra_args.iter().cloned());
        let mut proc = Proc::spawn(name, &bin("weft-proxy"), &args, dir);
        let addrs = read_addr_file(&mut proc, &addr_file).await;
        let outbound = addr(&addrs, "outbound").expect("outbound address");
        let admin = addr(&addrs, "admin").expect("admin address");
        let inbound = addr(&addrs, "inbound");
        wait_ready(&mut proc, admin, Duration::from_secs(20)).await;
        Proxy {
            proc,
            outbound,
            inbound,
            admin,
            node_id: name.to_owned(),
        }
    }

    /// The proxy's `/config` document.
    pub async fn config(&self) -> serde_json::Value {
        HttpClient::http1()
            .get_json(self.admin, "/config")
            .await
            .expect("proxy /config")
    }

    pub async fn version(&self) -> u64 {
        self.config().await["version"]
            .as_u64()
            .expect("/config has a version")
    }
}

/// A control plane serving `yaml` and one proxy (node `proxy`, service `productpage`, no
/// identity) following it.
pub async fn control_and_proxy(dir: &Path, yaml: &str) -> (ControlPlane, Proxy) {
    let cp = ControlPlane::start(dir, "control", yaml, ControlPlaneOpts::default()).await;
    let proxy = Proxy::start(
        dir,
        "proxy",
        ProxyOpts {
            control_plane: Some(cp.grpc),
            service: "productpage".into(),
            ..ProxyOpts::default()
        },
    )
    .await;
    (cp, proxy)
}

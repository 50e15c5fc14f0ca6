//! The local demo (README command 1): a control plane, two versions of a service each behind its
//! own sidecar, and a client sidecar, all on loopback. Traffic flows while a canary experiment
//! shifts `reviews` from v1 to v2 step by step, judged by the proxies' own measurements;
//! `weftctl experiment watch` shows its live progress until it promotes.

use std::time::{Duration, Instant};

use crate::mesh::SidecarMesh;
use crate::{ControlPlaneOpts, Load};

const EXPERIMENT: &str = r#"name: reviews-canary
route: reviews
service: reviews
stable: v1
candidate: v2
canary: {steps: [10, 25, 50, 100]}
interval: 1s
analysis: {success_rate: 99, max_p99: 250ms, min_requests: 20, failure_threshold: 2}
"#;

pub async fn run() -> anyhow::Result<()> {
    println!("weft demo — building binaries (first run compiles for a few minutes)…");
    crate::bins::bin_dir();
    let dir = tempfile::Builder::new().prefix("weft-demo-").tempdir()?;
    let started = Instant::now();

    let client_args = vec!["--stats-interval".to_owned(), "200ms".to_owned()];
    let SidecarMesh {
        apps,
        cp,
        sidecars,
        client_proxy: client_sidecar,
    } = SidecarMesh::start_with(dir.path(), 100, 0, ControlPlaneOpts::default(), client_args).await;
    println!("control plane    grpc {}  admin {}", cp.grpc, cp.admin);
    for (app, sidecar) in apps.iter().zip(&sidecars) {
        println!(
            "reviews {}       app {}  sidecar inbound {}",
            app.name,
            app.addr,
            sidecar.inbound.expect("inbound")
        );
    }
    println!(
        "productpage      sidecar outbound {}  (Host: reviews), traffic flowing",
        client_sidecar.outbound
    );
    println!();

    let load = Load::start(
        client_sidecar.outbound,
        "reviews",
        4,
        Duration::from_millis(2),
        Duration::from_secs(45),
    );
    let spec_path = dir.path().join("reviews-canary.yaml");
    std::fs::write(&spec_path, EXPERIMENT)?;
    let server = format!("http://{}", cp.admin);
    let weftctl = move |args: &[&str]| {
        let mut cmd = std::process::Command::new(crate::bins::bin("weftctl"));
        cmd.args(["--server", &server]).args(args);
        cmd
    };
    println!("$ weftctl experiment start -f reviews-canary.yaml");
    let out = weftctl(&[
        "experiment",
        "start",
        "-f",
        &spec_path.display().to_string(),
    ])
    .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    anyhow::ensure!(
        out.status.success(),
        "start failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("\n$ weftctl experiment watch reviews-canary");
    // Inherits stdout: redraws in place on a terminal, plain lines otherwise.
    let mut watch_cmd = weftctl(&["experiment", "watch", "reviews-canary"]);
    let watch = tokio::task::spawn_blocking(move || watch_cmd.status());
    let watched = tokio::time::timeout(Duration::from_secs(40), watch).await;
    let split = load.stop().await;
    let status =
        watched.map_err(|_| anyhow::anyhow!("the experiment did not finish within 40 s"))???;
    anyhow::ensure!(status.success(), "weftctl experiment watch failed");

    let out = weftctl(&["-o", "json", "experiment", "status", "reviews-canary"]).output()?;
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    println!();
    println!(
        "traffic during the experiment: v1 {} / v2 {} requests, {} failed",
        split.by_version.get("v1").unwrap_or(&0),
        split.by_version.get("v2").unwrap_or(&0),
        split.failed
    );
    println!(
        "demo finished in {:.1} s; cleaning up.",
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(s["phase"] == "succeeded", "experiment ended {}", s["phase"]);
    anyhow::ensure!(split.failed == 0, "{} requests failed", split.failed);
    Ok(())
}

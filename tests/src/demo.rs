//! The local demo (README command 1): a control plane, two versions of a service each behind its
//! own sidecar, and a client sidecar, all on loopback; weights shift 100/0 → 50/50 → 0/100
//! through the control-plane API while traffic flows, and each step prints the split observed.

use std::time::{Duration, Instant};

use crate::HttpClient;
use crate::mesh::{self, SidecarMesh};

const REQUESTS_PER_STEP: u64 = 400;

fn bar(percent: f64) -> String {
    let n = (percent / 2.5).round() as usize;
    format!("{}{}", "█".repeat(n), "·".repeat(40usize.saturating_sub(n)))
}

pub async fn run() -> anyhow::Result<()> {
    println!("weft demo — building binaries (first run compiles for a few minutes)…");
    crate::bins::bin_dir();
    let dir = tempfile::Builder::new().prefix("weft-demo-").tempdir()?;
    let started = Instant::now();

    let SidecarMesh {
        apps,
        cp,
        sidecars,
        client_proxy: client_sidecar,
    } = SidecarMesh::start(dir.path(), 100, 0).await;
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
        "productpage      sidecar outbound {}  (Host: reviews)",
        client_sidecar.outbound
    );
    println!();

    let client = HttpClient::http1();
    let mut failed = 0;
    for (w1, w2) in [(100, 0), (50, 50), (0, 100)] {
        let pushed = Instant::now();
        let version = cp.set_weights("reviews", &[("v1", w1), ("v2", w2)]).await;
        cp.wait_acked(version, 3, Duration::from_secs(10)).await;
        let converged = pushed.elapsed();
        let split = mesh::drive(
            &client,
            client_sidecar.outbound,
            "reviews",
            &[],
            REQUESTS_PER_STEP,
            8,
        )
        .await;
        failed += split.failed;
        println!(
            "set-weight reviews v1={w1} v2={w2} → version {version}, all 3 proxies ACKed in {:.1} ms",
            converged.as_secs_f64() * 1000.0
        );
        for v in ["v1", "v2"] {
            let pct = split.percent(v);
            println!(
                "  {v} {} {pct:5.1}%  ({} of {})",
                bar(pct),
                split.by_version.get(v).unwrap_or(&0),
                split.total()
            );
        }
        if split.failed > 0 {
            println!("  failed: {} ({:?})", split.failed, split.failures);
        }
    }

    println!();
    let out = std::process::Command::new(crate::bins::bin("weftctl"))
        .args(["--server", &format!("http://{}", cp.admin), "status"])
        .output()?;
    println!("$ weftctl status\n{}", String::from_utf8_lossy(&out.stdout));
    println!(
        "demo finished in {:.1} s, {failed} failed requests; cleaning up.",
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(failed == 0, "{failed} requests failed");
    Ok(())
}

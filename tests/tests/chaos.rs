//! The chaos suite: five faults under continuous, bounded load, one table of requests sent,
//! failed (an answer other than 200) and lost (no answer) per scenario.
//!
//! Goals (issue 9): zero failed and lost for (a) 50 weight pushes, (b) the control plane
//! killed and restarted, (c) one of three etcd replicas killed, (e) a proxy drained and
//! restarted behind a client that uses two proxies; for (d) an upstream endpoint killed, only
//! requests in flight at the kill may fail (retries cover the rest). The table is printed
//! before anything is asserted, so a failing run still shows every row.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use weft_tests::etcd::{Etcd, etcd_or_skip};
use weft_tests::mesh::two_versions;
use weft_tests::suite::{KillableApp, Row, Traffic, table};
use weft_tests::{ControlPlane, ControlPlaneOpts, HttpClient, Proxy, ProxyOpts, VersionApp};

const WORKERS: usize = 4;
const PAUSE: Duration = Duration::from_millis(2);
/// Bounds of every load loop: requests per worker and time.
const MAX_PER_WORKER: u64 = 5_000;
const LIMIT: Duration = Duration::from_secs(30);

fn load(targets: Vec<SocketAddr>, host: &str) -> Traffic {
    Traffic::start(targets, host, WORKERS, PAUSE, MAX_PER_WORKER, LIMIT)
}

async fn proxy(dir: &std::path::Path, name: &str, cps: &[SocketAddr]) -> Proxy {
    let extra = cps[1..]
        .iter()
        .flat_map(|cp| ["--control-plane".to_owned(), format!("http://{cp}")])
        .collect();
    let opts = ProxyOpts {
        control_plane: Some(cps[0]),
        service: "productpage".into(),
        extra_args: extra,
        ..ProxyOpts::default()
    };
    Proxy::start(dir, name, opts).await
}

/// Waits until `p` runs `version` or newer.
async fn runs(p: &Proxy, version: u64) {
    weft_tests::eventually(
        Duration::from_secs(10),
        "the proxy to run the version",
        || async { (p.version().await >= version).then_some(()) },
    )
    .await;
}

/// Lets the load run through a fault (this is the scenario's duration, not a readiness wait).
async fn under_load(d: Duration) {
    tokio::time::sleep(d).await;
}

async fn pushes(apps: &[VersionApp; 2]) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let mesh = two_versions("reviews", apps[0].addr, apps[1].addr, 50, 50);
    let cp = ControlPlane::start(dir.path(), "cp", &mesh, ControlPlaneOpts::default()).await;
    let p = proxy(dir.path(), "client", &[cp.grpc]).await;
    let traffic = load(vec![p.outbound], "reviews");
    let mut version = 0;
    for i in 0..50u32 {
        let w = (i * 7) % 101;
        version = cp
            .set_weights("reviews", &[("v1", w), ("v2", 100 - w)])
            .await;
        // Spread over about a second so every push lands on running traffic.
        under_load(Duration::from_millis(20)).await;
    }
    runs(&p, version).await;
    Row {
        scenario: "(a) 50 weight pushes".into(),
        tally: traffic.stop().await,
        allowed: 0,
    }
}

async fn control_plane_restart(apps: &[VersionApp; 2]) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let mesh = two_versions("reviews", apps[0].addr, apps[1].addr, 50, 50);
    let mut opts = ControlPlaneOpts {
        state_dir: Some(dir.path().join("state")),
        ..ControlPlaneOpts::default()
    };
    let mut cp = ControlPlane::start(dir.path(), "cp", &mesh, opts.clone()).await;
    let p = proxy(dir.path(), "client", &[cp.grpc]).await;
    let traffic = load(vec![p.outbound], "reviews");
    under_load(Duration::from_millis(300)).await;
    cp.proc.kill();
    under_load(Duration::from_millis(700)).await;
    (opts.grpc_addr, opts.admin_addr) = (Some(cp.grpc), Some(cp.admin));
    let cp = ControlPlane::start(dir.path(), "cp", &mesh, opts).await;
    let version = cp.set_weights("reviews", &[("v1", 80), ("v2", 20)]).await;
    runs(&p, version).await;
    Row {
        scenario: "(b) control plane killed and restarted".into(),
        tally: traffic.stop().await,
        allowed: 0,
    }
}

async fn replica_killed(apps: &[VersionApp; 2], etcd_bin: &std::path::Path) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(etcd_bin, dir.path()).await;
    let mesh = two_versions("reviews", apps[0].addr, apps[1].addr, 50, 50);
    let mut cps = Vec::new();
    for i in 0..3 {
        cps.push(etcd.replica(dir.path(), &format!("cp{i}"), &mesh).await);
    }
    let addrs: Vec<SocketAddr> = cps.iter().map(|c| c.grpc).collect();
    let p = proxy(dir.path(), "client", &addrs).await;
    let traffic = load(vec![p.outbound], "reviews");
    under_load(Duration::from_millis(300)).await;
    // The replica the proxy streams from dies; a change made on another still reaches it.
    cps[0].proc.kill();
    under_load(Duration::from_millis(300)).await;
    let version = cps[1]
        .set_weights("reviews", &[("v1", 30), ("v2", 70)])
        .await;
    runs(&p, version).await;
    Row {
        scenario: "(c) one of three etcd replicas killed".into(),
        tally: traffic.stop().await,
        allowed: 0,
    }
}

async fn endpoint_killed() -> Row {
    let dir = tempfile::tempdir().unwrap();
    let ups = [KillableApp::start().await, KillableApp::start().await];
    let mesh = format!(
        "services:\n  - name: api\n    endpoints:\n      - {{address: \"{}\"}}\n      - {{address: \"{}\"}}\n\
         routes:\n  - name: api\n    hosts: [api]\n    rules:\n      - name: all\n        backends: [{{service: api}}]\n\
         \x20       retries: {{attempts: 2, retry_on: [connect-failure, reset, \"503\"], backoff_base: 2ms}}\n",
        ups[0].addr, ups[1].addr
    );
    let cp = ControlPlane::start(dir.path(), "cp", &mesh, ControlPlaneOpts::default()).await;
    let p = proxy(dir.path(), "client", &[cp.grpc]).await;
    let traffic = load(vec![p.outbound], "api");
    under_load(Duration::from_millis(300)).await;
    ups[0].kill();
    under_load(Duration::from_millis(1000)).await;
    Row {
        scenario: "(d) an upstream endpoint killed (retries on)".into(),
        tally: traffic.stop().await,
        // At most the requests in flight at the kill, one per worker.
        allowed: WORKERS as u64,
    }
}

async fn proxy_drained_and_restarted(apps: &[VersionApp; 2]) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let mesh = two_versions("reviews", apps[0].addr, apps[1].addr, 50, 50);
    let cp = ControlPlane::start(dir.path(), "cp", &mesh, ControlPlaneOpts::default()).await;
    let mut first = proxy(dir.path(), "client-1", &[cp.grpc]).await;
    let second = proxy(dir.path(), "client-2", &[cp.grpc]).await;
    let traffic = load(vec![first.outbound, second.outbound], "reviews");
    under_load(Duration::from_millis(300)).await;
    // Rolling restart of the first proxy: drain, wait until it refuses new connections,
    // stop it, start it again, put it back in the client's list.
    let reply = HttpClient::http1()
        .send(
            http::Method::POST,
            first.admin,
            "admin",
            "/drain",
            &[],
            bytes::Bytes::new(),
        )
        .await
        .expect("drain");
    assert!(
        reply.status.is_success(),
        "drain: {} {}",
        reply.status,
        reply.text()
    );
    let started = Instant::now();
    while tokio::net::TcpStream::connect(first.outbound).await.is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the drained proxy still accepts"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    under_load(Duration::from_millis(200)).await;
    first.proc.kill();
    let again = proxy(dir.path(), "client-1b", &[cp.grpc]).await;
    traffic.set_targets(vec![again.outbound, second.outbound]);
    under_load(Duration::from_millis(300)).await;
    Row {
        scenario: "(e) proxy drained and restarted (2 proxies)".into(),
        tally: traffic.stop().await,
        allowed: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_suite_under_load() {
    let Some(etcd_bin) = etcd_or_skip("chaos_suite_under_load") else {
        return;
    };
    let apps = [VersionApp::start("v1").await, VersionApp::start("v2").await];
    let rows = vec![
        pushes(&apps).await,
        control_plane_restart(&apps).await,
        replica_killed(&apps, &etcd_bin).await,
        endpoint_killed().await,
        proxy_drained_and_restarted(&apps).await,
    ];
    eprintln!("\nchaos suite\n{}", table(&rows));
    for r in &rows {
        eprintln!("{}: first reasons {:?}", r.scenario, r.tally.reasons);
    }
    for r in &rows {
        assert!(
            r.tally.sent > 100,
            "{}: the load ran ({} sent)",
            r.scenario,
            r.tally.sent
        );
        assert!(
            r.tally.failed + r.tally.lost <= r.allowed,
            "{}: {} failed, {} lost, {} allowed: {:?}",
            r.scenario,
            r.tally.failed,
            r.tally.lost,
            r.allowed,
            r.tally.reasons
        );
    }
}

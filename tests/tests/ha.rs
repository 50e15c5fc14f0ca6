//! HA control plane on a real etcd: replicas share state with compare-and-swap versions, a
//! change on one reaches the proxies of another, one elected leader drives experiments and a
//! surviving replica finishes them when the leader is killed, proxies fail over to another
//! replica, and the load running meanwhile sees no failed request.

use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::etcd::{Etcd, etcd_or_skip, leader_status};
use weft_tests::mesh::two_versions;
use weft_tests::{ControlPlane, HttpClient, Load, Proxy, ProxyOpts, VersionApp, eventually};

/// A client proxy (`productpage`) that knows every replica, `first` first.
async fn client_proxy(
    dir: &std::path::Path,
    name: &str,
    cps: &[&ControlPlane],
    first: usize,
) -> Proxy {
    let mut extra = Vec::new();
    for i in 1..cps.len() {
        let cp = cps[(first + i) % cps.len()];
        extra.extend(["--control-plane".to_owned(), format!("http://{}", cp.grpc)]);
    }
    extra.extend(["--stats-interval".to_owned(), "100ms".to_owned()]);
    let opts = ProxyOpts {
        control_plane: Some(cps[first].grpc),
        service: "productpage".into(),
        extra_args: extra,
        ..ProxyOpts::default()
    };
    Proxy::start(dir, name, opts).await
}

/// The replica that says it leads, once exactly one does.
async fn the_leader(cps: &[&ControlPlane], deadline: Duration) -> usize {
    eventually(deadline, "exactly one leader", || async {
        let mut leaders = Vec::new();
        for (i, cp) in cps.iter().enumerate() {
            let s = leader_status(cp).await?;
            if s["is_leader"] == true {
                leaders.push(i);
            }
        }
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await
}

/// A replica's `/api/v1/status`, and the row of proxy `node` in it.
async fn status_row(cp: &ControlPlane, node: &str) -> Option<(Value, Option<Value>)> {
    let s = HttpClient::http1()
        .get_json(cp.admin, "/api/v1/status")
        .await
        .ok()?;
    let row = s["proxies"]
        .as_array()?
        .iter()
        .find(|p| p["node_id"] == node)
        .cloned();
    Some((s, row))
}

/// `weftctl status` against a replica: its output, after checking it succeeded.
async fn weftctl_status(cp: &ControlPlane) -> String {
    let out = tokio::process::Command::new(weft_tests::bins::bin("weftctl"))
        .args(["--server", &format!("http://{}", cp.admin), "status"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    text
}

async fn experiment(cp: &ControlPlane, name: &str) -> Option<Value> {
    HttpClient::http1()
        .get_json(cp.admin, &format!("/api/v1/experiments/{name}"))
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_during_an_experiment_another_replica_finishes_it_without_failed_requests() {
    let Some(bin) = etcd_or_skip("leader_killed_during_an_experiment") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&bin, dir.path()).await;
    let apps = [VersionApp::start("v1").await, VersionApp::start("v2").await];
    let mesh = two_versions("reviews", apps[0].addr, apps[1].addr, 100, 0);
    let mut cps = Vec::new();
    for i in 0..3 {
        cps.push(etcd.replica(dir.path(), &format!("cp{i}"), &mesh).await);
    }
    let refs: Vec<&ControlPlane> = cps.iter().collect();
    let leader = the_leader(&refs, Duration::from_secs(15)).await;
    // One client proxy per replica, each listing all three.
    let mut proxies = Vec::new();
    for i in 0..3 {
        proxies.push(client_proxy(dir.path(), &format!("client{i}"), &refs, i).await);
    }
    // Load only through the proxies that stream from followers: the leader judges the
    // steps before the kill on stats that reach it only because proxies report to every
    // replica.
    let loads: Vec<Load> = proxies
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, p)| {
            Load::start(
                p.outbound,
                "reviews",
                2,
                Duration::from_millis(2),
                Duration::from_secs(60),
            )
        })
        .collect();

    // Started on a follower: the record goes through etcd to the leader, which drives it.
    let follower = (leader + 1) % 3;
    let spec = "name: ha-canary\nroute: reviews\nservice: reviews\nstable: v1\ncandidate: v2\n\
                canary: {steps: [10, 30, 60, 100]}\ninterval: 1s\n\
                analysis: {success_rate: 99, max_p99: 1s, min_requests: 5}\n";
    let (status, body) = HttpClient::http1()
        .post_text(
            cps[follower].admin,
            "/api/v1/experiments",
            "application/yaml",
            spec.into(),
        )
        .await
        .expect("start the experiment");
    assert!(status.is_success(), "start: {status} {body}");

    // Once the second step is applied, kill the leader (SIGKILL: no lease revoke).
    eventually(
        Duration::from_secs(20),
        "the experiment at step 1",
        || async {
            let s = experiment(&cps[leader], "ha-canary").await?;
            (s["applied_step"].as_u64() >= Some(1)).then_some(())
        },
    )
    .await;
    let killed = cps[leader].grpc;
    cps[leader].proc.kill();
    let killed_at = Instant::now();

    let survivors: Vec<&ControlPlane> = (0..3).filter(|i| *i != leader).map(|i| &cps[i]).collect();
    let new_leader = the_leader(&survivors, Duration::from_secs(15)).await;
    let takeover = killed_at.elapsed();
    let s = eventually(
        Duration::from_secs(30),
        "the experiment to finish",
        || async {
            let s = experiment(survivors[new_leader], "ha-canary").await?;
            matches!(s["phase"].as_str(), Some("succeeded" | "rolled_back")).then_some(s)
        },
    )
    .await;
    assert_eq!(s["phase"], "succeeded", "{s:#}");
    let resumed = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "resumed_after_restart");
    assert!(
        resumed,
        "the new leader resumed the stored experiment: {s:#}"
    );

    // Every proxy ends on a surviving replica with the promoted version.
    let version = survivors[0].version().await;
    assert_eq!(version, survivors[1].version().await, "replicas agree");
    for p in &proxies {
        eventually(
            Duration::from_secs(10),
            "proxy on a survivor at the final version",
            || async {
                let c = p.config().await;
                let addr = c["control_plane"]["address"].as_str()?.to_owned();
                (c["control_plane"]["connected"] == true
                    && !addr.ends_with(&killed.to_string())
                    && c["version"].as_u64() == Some(version))
                .then_some(())
            },
        )
        .await;
    }
    let mut sent = 0;
    let mut failed = 0;
    let mut failures = Vec::new();
    for load in loads {
        let split = load.stop().await;
        sent += split.total();
        failed += split.failed;
        failures.extend(split.failures);
    }
    eprintln!(
        "leader cp{leader} killed; new leader after {takeover:?}; {sent} requests, {failed} failed"
    );
    assert!(sent > 500, "the load ran: {sent}");
    assert_eq!(failed, 0, "{failures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_on_one_replica_reaches_the_proxies_of_another_and_versions_never_collide() {
    let Some(bin) = etcd_or_skip("a_change_on_one_replica") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&bin, dir.path()).await;
    let apps = [VersionApp::start("v1").await, VersionApp::start("v2").await];
    let mesh = two_versions("reviews", apps[0].addr, apps[1].addr, 100, 0);
    let a = etcd.replica(dir.path(), "cp-a", &mesh).await;
    let b = etcd.replica(dir.path(), "cp-b", &mesh).await;
    // The proxy only knows replica B.
    let proxy = client_proxy(dir.path(), "client-b", &[&b], 0).await;
    let client = HttpClient::http1();

    // One CA and one token secret for both (through etcd): a sidecar certified by one replica
    // is trusted by the sidecars of the other, and a token from either works at both.
    let mut bundles = Vec::new();
    let mut tokens = Vec::new();
    for cp in [&a, &b] {
        let reply = client
            .get(cp.admin, "admin", "/api/v1/identity/bundle", &[])
            .await
            .unwrap();
        assert!(
            reply.text().contains("BEGIN CERTIFICATE"),
            "{}",
            reply.text()
        );
        bundles.push(reply.text());
        let body = serde_json::json!({"namespace": "shop", "service_account": "cart"});
        let (status, token) = client
            .post_json(cp.admin, "/api/v1/identity/token", &body)
            .await
            .unwrap();
        assert!(status.is_success(), "{status} {token}");
        tokens.push(token["token"].clone());
    }
    assert_eq!(bundles[0], bundles[1], "one trust bundle");
    assert_eq!(tokens[0], tokens[1], "one token secret");

    // A weight change on A: B's proxy runs it within the convergence target.
    let mut worst = Duration::ZERO;
    for (i, w) in [10, 20, 30, 40, 50].into_iter().enumerate() {
        let started = Instant::now();
        let version = a
            .set_weights("reviews", &[("v1", 100 - w), ("v2", w)])
            .await;
        loop {
            let c = client.get_json(proxy.admin, "/config").await.unwrap();
            if c["version"].as_u64() >= Some(version) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "push {i} never arrived: {c}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        worst = worst.max(started.elapsed());
    }
    eprintln!("change on replica A → applied by a proxy of replica B: worst {worst:?}");
    assert!(
        worst < Duration::from_millis(500),
        "convergence across replicas took {worst:?}"
    );

    // Concurrent changes on both replicas: every accepted change has its own version, and
    // both replicas end on the same version and config.
    let mut tasks = Vec::new();
    for i in 0..10u32 {
        for cp in [&a, &b] {
            let (admin, w) = (cp.admin, 1 + i * 2 + u32::from(cp.admin == b.admin));
            tasks.push(tokio::spawn(async move {
                let body = serde_json::json!({"weights": {"v1": 100 - w, "v2": w}});
                let (status, answer) = HttpClient::http1()
                    .post_json(admin, "/api/v1/routes/reviews/weights", &body)
                    .await
                    .unwrap();
                assert!(status.is_success(), "{status} {answer}");
                answer["version"].as_u64().unwrap()
            }));
        }
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.unwrap());
    }
    versions.sort_unstable();
    let n = versions.len();
    versions.dedup();
    assert_eq!(
        versions.len(),
        n,
        "two changes got the same version: {versions:?}"
    );
    let last = *versions.last().unwrap();
    eventually(
        Duration::from_secs(5),
        "both replicas on the last version",
        || async { (a.version().await == last && b.version().await == last).then_some(()) },
    )
    .await;
    let config = |cp: &ControlPlane| {
        let admin = cp.admin;
        async move {
            HttpClient::http1()
                .get_json(admin, "/api/v1/config")
                .await
                .unwrap()
        }
    };
    assert_eq!(config(&a).await, config(&b).await);
    eventually(
        Duration::from_secs(5),
        "the proxy on the last version",
        || async { (proxy.version().await == last).then_some(()) },
    )
    .await;

    // `weftctl status` names the leader, whichever replica it asks.
    let leader = the_leader(&[&a, &b], Duration::from_secs(10)).await;
    let name = ["cp-a", "cp-b"][leader];
    let text = weftctl_status(&b).await;
    assert!(text.contains(&format!("leader:  {name}")), "{text}");

    // Status lists the whole mesh at any replica: A has no proxy of its own and lists B's,
    // with the replica it streams from.
    let (whole, row) = eventually(
        Duration::from_secs(5),
        "replica A to list the proxy of replica B",
        || async {
            let (s, row) = status_row(&a, "client-b").await?;
            let row = row?;
            (row["acked_version"].as_u64() == Some(last)).then_some((s, row))
        },
    )
    .await;
    assert_eq!(row["replica"], "cp-b", "{whole}");
    assert_eq!(row["connected"], true, "{whole}");
    assert!(whole.get("roster_error").is_none(), "{whole}");
    let text = weftctl_status(&a).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("client-b ") && l.contains(" cp-b ") && l.contains(" yes ")),
        "{text}"
    );

    // A restarted replica resumes at the shared version (never goes backwards).
    drop(a);
    let a = etcd.replica(dir.path(), "cp-a", &mesh).await;
    assert_eq!(a.version().await, last);

    // A replica that dies takes its proxies off the roster when its lease expires (its
    // proxies reconnect elsewhere and are listed there; this one knows only B).
    drop(b);
    eventually(
        Duration::from_secs(10),
        "the dead replica's proxy to leave the roster",
        || async {
            let (_, row) = status_row(&a, "client-b").await?;
            row.is_none().then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn unreachable_etcd_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let port = weft_tests::etcd::free_port();
    let out = tokio::process::Command::new(weft_tests::bins::bin("weft-control"))
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--etcd-endpoints",
            &format!("http://127.0.0.1:{port}"),
        ])
        .current_dir(dir.path())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("weft-control gave up within 20 s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("etcd http://127.0.0.1:{port}")),
        "names etcd and its address: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_down_refuses_changes_with_a_clear_error_and_keeps_serving() {
    let Some(bin) = etcd_or_skip("etcd_down_refuses_changes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(&bin, dir.path()).await;
    let apps = [VersionApp::start("v1").await, VersionApp::start("v2").await];
    let mesh = two_versions("reviews", apps[0].addr, apps[1].addr, 100, 0);
    let cp = etcd.replica(dir.path(), "cp", &mesh).await;
    let proxy = client_proxy(dir.path(), "client", &[&cp], 0).await;
    let version = cp.set_weights("reviews", &[("v1", 60), ("v2", 40)]).await;
    eventually(
        Duration::from_secs(5),
        "the proxy on the change",
        || async { (proxy.version().await == version).then_some(()) },
    )
    .await;

    etcd.proc.kill();
    let body = serde_json::json!({"weights": {"v1": 10, "v2": 90}});
    let (status, answer) = HttpClient::http1()
        .post_json(cp.admin, "/api/v1/routes/reviews/weights", &body)
        .await
        .unwrap();
    assert_eq!(status, http::StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("etcd {}", etcd.url())),
        "names etcd: {error}"
    );
    // Nothing moved: the replica and its proxy keep the last good version, traffic flows.
    assert_eq!(cp.version().await, version);
    assert_eq!(proxy.version().await, version);
    let reply = HttpClient::http1()
        .get(proxy.outbound, "reviews", "/", &[])
        .await
        .unwrap();
    assert_eq!(reply.status, http::StatusCode::OK);

    // Status still answers, promptly, with this replica's proxies and why others may miss.
    let asked = Instant::now();
    let s = HttpClient::http1()
        .get_json(cp.admin, "/api/v1/status")
        .await
        .unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        s["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["node_id"] == "client" && p["connected"] == true),
        "{s}"
    );
    let why = s["roster_error"].as_str().unwrap_or_default();
    assert!(why.contains(&format!("etcd {}", etcd.url())), "{s}");
}

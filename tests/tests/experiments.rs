//! End-to-end experiments: real control plane, sidecars and apps on loopback. The control
//! plane judges the candidate by what the client proxy reports (`--stats-interval 100ms`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::mesh::SidecarMesh;
use weft_tests::{ControlPlaneOpts, HttpClient, Load, eventually};

const STATS: [&str; 2] = ["--stats-interval", "100ms"];

async fn mesh(dir: &std::path::Path, opts: ControlPlaneOpts) -> SidecarMesh {
    let args = STATS.iter().map(|s| (*s).to_owned()).collect();
    SidecarMesh::start_with(dir, 100, 0, opts, args).await
}

fn spec(name: &str, strategy: &str, interval_ms: u64, analysis: &str) -> String {
    format!(
        "name: {name}\nroute: reviews\nservice: reviews\nstable: v1\ncandidate: v2\n\
         {strategy}\ninterval: {interval_ms}ms\nanalysis: {analysis}\n"
    )
}

async fn start(m: &SidecarMesh, yaml: &str) -> Value {
    let (status, body) = HttpClient::http1()
        .post_text(
            m.cp.admin,
            "/api/v1/experiments",
            "application/yaml",
            yaml.to_owned(),
        )
        .await
        .expect("start experiment");
    assert!(status.is_success(), "start: {status} {body}");
    body
}

/// The status, or `None` while the control plane does not know the experiment yet.
async fn try_experiment(m: &SidecarMesh, name: &str) -> Option<Value> {
    HttpClient::http1()
        .get_json(m.cp.admin, &format!("/api/v1/experiments/{name}"))
        .await
        .ok()
}

async fn experiment(m: &SidecarMesh, name: &str) -> Value {
    HttpClient::http1()
        .get_json(m.cp.admin, &format!("/api/v1/experiments/{name}"))
        .await
        .expect("experiment status")
}

/// Waits until the experiment finished; returns its status.
async fn finished(m: &SidecarMesh, name: &str, deadline: Duration) -> Value {
    eventually(
        deadline,
        &format!("experiment {name} to finish"),
        || async {
            let s = try_experiment(m, name).await?;
            matches!(s["phase"].as_str(), Some("succeeded" | "rolled_back")).then_some(s)
        },
    )
    .await
}

/// The candidate weight (percent) of the `split` rule in a model config.
fn split_weight(config: &Value) -> Option<u64> {
    let rules = config["routes"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == "reviews")?["rules"]
        .as_array()?
        .clone();
    let rule = rules.iter().find(|r| r["name"] == "split")?;
    let weight = |subset: &str| {
        rule["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["subset"] == subset))
            .and_then(|b| b["weight"].as_u64())
            .unwrap_or(0)
    };
    let total = weight("v1") + weight("v2");
    (total > 0).then(|| weight("v2") * 100 / total)
}

fn events<'a>(s: &'a Value, kind: &str) -> Vec<&'a Value> {
    s["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthy_canary_promotes_and_proxies_follow_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let m = mesh(dir.path(), ControlPlaneOpts::default()).await;
    // Record every version the client proxy applies, with the split it carried.
    let admin = m.client_proxy.admin;
    let seen = tokio::spawn(async move {
        let client = HttpClient::http1();
        let mut seen: BTreeMap<u64, Option<u64>> = BTreeMap::new();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(40) {
            if let Ok(c) = client.get_json(admin, "/config").await {
                let version = c["version"].as_u64().unwrap_or(0);
                seen.entry(version)
                    .or_insert_with(|| split_weight(&c["config"]));
                if split_weight(&c["config"]) == Some(100) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen
    });
    let load = Load::start(
        m.client_proxy.outbound,
        "reviews",
        4,
        Duration::ZERO,
        Duration::from_secs(40),
    );
    start(
        &m,
        &spec(
            "healthy",
            "canary: {steps: [10, 20, 50, 100]}",
            400,
            "{success_rate: 99, max_p99: 500ms, min_requests: 5}",
        ),
    )
    .await;
    let s = finished(&m, "healthy", Duration::from_secs(30)).await;
    let split = load.stop().await;
    assert_eq!(s["phase"], "succeeded", "{s:#}");
    assert_eq!(split.failed, 0, "{:?}", split.failures);
    assert!(split.by_version.get("v2").copied().unwrap_or(0) > 0);

    // Each step was one new config version carrying exactly that step's weight…
    let steps = events(&s, "step");
    let step_weights: Vec<u64> = steps
        .iter()
        .map(|e| e["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(step_weights, [10, 20, 50, 100], "{s:#}");
    let checks = events(&s, "check");
    assert!(checks.len() >= 4, "one passing check per step at least");
    for c in &checks {
        assert!(
            c["check"]["candidate"]["requests"].as_u64().unwrap() > 0,
            "{c:#}"
        );
    }
    // …and the client proxy applied these versions in order with these weights.
    let seen = seen.await.unwrap();
    for e in &steps {
        let version = e["version"].as_u64().expect("a step carries a version");
        assert_eq!(
            seen.get(&version).copied().flatten(),
            e["weight"].as_u64(),
            "proxy at version {version}: {seen:?}"
        );
    }
    let order: Vec<u64> = seen.values().flatten().copied().collect();
    let mut distinct = order.clone();
    distinct.dedup();
    // The poller may first look after the first step landed; before it, the split was 0.
    if distinct.first() == Some(&0) {
        distinct.remove(0);
    }
    assert_eq!(
        distinct,
        [10, 20, 50, 100],
        "weights the proxy ran, in order"
    );
    let version = m.cp.version().await;
    m.cp.wait_acked(version, 3, Duration::from_secs(10)).await;
}

async fn bad_candidate(name: &str, error_permille: u64, delay_ms: u64) -> (Value, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let m = mesh(dir.path(), ControlPlaneOpts::default()).await;
    m.apps[1].set_faults(error_permille, delay_ms);
    let load = Load::start(
        m.client_proxy.outbound,
        "reviews",
        8,
        Duration::ZERO,
        Duration::from_secs(30),
    );
    let interval = 400;
    let started = Instant::now();
    start(
        &m,
        &spec(
            name,
            "canary: {steps: [50, 100]}",
            interval,
            "{success_rate: 99, max_p99: 100ms, min_requests: 5, failure_threshold: 2}",
        ),
    )
    .await;
    let s = finished(&m, name, Duration::from_secs(20)).await;
    let took = started.elapsed();
    load.stop().await;
    assert_eq!(s["phase"], "rolled_back", "{s:#}");
    assert_eq!(s["weight"], 0);
    // The route is back on stable, and the proxies run that.
    let version = m.cp.version().await;
    m.cp.wait_acked(version, 3, Duration::from_secs(10)).await;
    let cfg = m.client_proxy.config().await;
    assert_eq!(split_weight(&cfg["config"]), Some(0));
    (s, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_candidate_is_rolled_back_with_the_measured_values() {
    let (s, took) = bad_candidate("errors", 50, 0).await;
    // threshold 2 × interval 400 ms, plus slack for reporting and ACKs.
    assert!(
        took < Duration::from_millis(2 * 400 + 1500),
        "took {took:?}"
    );
    let reason = s["reason"].as_str().unwrap();
    assert!(reason.contains("2 failed checks"), "{reason}");
    assert!(reason.contains("success rate"), "{reason}");
    let check = &s["last_check"];
    assert_eq!(check["pass"], false);
    let rate = check["candidate"]["success_rate"].as_f64().unwrap();
    assert!(rate < 99.0 && rate > 80.0, "measured {rate}");
    assert!(check["candidate"]["failures"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_candidate_is_rolled_back_on_p99() {
    let (s, took) = bad_candidate("slow", 0, 200).await;
    assert!(
        took < Duration::from_millis(2 * 400 + 1500),
        "took {took:?}"
    );
    let reason = s["reason"].as_str().unwrap();
    assert!(reason.contains("p99 latency"), "{reason}");
    let p99 = s["last_check"]["candidate"]["p99_ms"].as_f64().unwrap();
    assert!(p99 > 150.0, "measured p99 {p99}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_candidate_traffic_never_promotes() {
    let dir = tempfile::tempdir().unwrap();
    let m = mesh(dir.path(), ControlPlaneOpts::default()).await;
    // Declared in the mesh YAML this time; no traffic flows at all.
    let inbound = |i: usize| m.sidecars[i].inbound.unwrap();
    let yaml = format!(
        "{}experiments:\n  - {}",
        weft_tests::mesh::two_versions("reviews", inbound(0), inbound(1), 100, 0),
        spec(
            "idle",
            "canary: {steps: [50, 100]}",
            300,
            "{success_rate: 99, min_requests: 10, failure_threshold: 3}"
        )
        .trim_end()
        .replace('\n', "\n    ")
    );
    let (status, body) = m.cp.apply(&yaml).await;
    assert!(status.is_success(), "{body}");
    let s = finished(&m, "idle", Duration::from_secs(20)).await;
    assert_eq!(s["phase"], "rolled_back", "{s:#}");
    assert_eq!(s["origin"], "config");
    assert!(events(&s, "promoted").is_empty());
    let checks = events(&s, "check");
    assert_eq!(checks.len(), 3, "{s:#}");
    for c in checks {
        assert_eq!(c["check"]["pass"], false);
        assert_eq!(c["check"]["gates"][0]["gate"], "min_requests");
        assert_eq!(c["check"]["gates"][0]["pass"], false);
    }
    assert!(
        s["reason"]
            .as_str()
            .unwrap()
            .contains("fewer than the minimum 10"),
        "{s:#}"
    );
}

/// The side a sticky cookie value lands on: FNV-1a % 100 < weight → candidate.
fn expected_side(user: &str, weight: u64) -> &'static str {
    let h = user.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    if h % 100 < weight { "v2" } else { "v1" }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ab_test_routes_by_header_and_sticks_by_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let m = mesh(dir.path(), ControlPlaneOpts::default()).await;
    start(
        &m,
        &spec(
            "ab",
            "ab: {iterations: 1000, headers: [{name: x-beta, exact: \"1\"}], sticky_cookie: user, weight: 50}",
            300,
            "{min_requests: 1, failure_threshold: 1000}",
        ),
    )
    .await;
    let s = eventually(
        Duration::from_secs(10),
        "the A/B step to be applied",
        || async {
            let s = experiment(&m, "ab").await;
            (!events(&s, "step").is_empty()).then_some(s)
        },
    )
    .await;
    let version = events(&s, "step")[0]["version"].as_u64().unwrap();
    m.cp.wait_acked(version, 3, Duration::from_secs(10)).await;

    let client = HttpClient::http1();
    let out = m.client_proxy.outbound;
    let version_of = |headers: Vec<(String, String)>| {
        let client = client.clone();
        async move {
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let r = client.get(out, "reviews", "/", &h).await.unwrap();
            assert_eq!(r.status, 200);
            r.header("x-app-version").unwrap().to_owned()
        }
    };
    for _ in 0..30 {
        assert_eq!(version_of(vec![("x-beta".into(), "1".into())]).await, "v2");
        assert_eq!(
            version_of(vec![]).await,
            "v1",
            "users without header or cookie stay"
        );
    }
    let mut sides = BTreeMap::new();
    for user in [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ] {
        let want = expected_side(user, 50);
        let cookie = vec![("cookie".to_owned(), format!("theme=dark; user={user}"))];
        for _ in 0..100 {
            assert_eq!(version_of(cookie.clone()).await, want, "user {user}");
        }
        *sides.entry(want).or_insert(0) += 1;
    }
    assert_eq!(sides.len(), 2, "both sides have users: {sides:?}");

    // Pause and resume are recorded; a paused experiment does not move.
    for (action, phase) in [("pause", "paused"), ("resume", "progressing")] {
        let (status, body) = client
            .post_json(
                m.cp.admin,
                &format!("/api/v1/experiments/ab/{action}"),
                &serde_json::json!({}),
            )
            .await
            .unwrap();
        assert!(status.is_success(), "{action}: {body}");
        assert_eq!(body["phase"], phase);
    }
    let s = experiment(&m, "ab").await;
    assert_eq!(events(&s, "paused").len(), 1);
    assert_eq!(events(&s, "resumed").len(), 1);

    // Abort: everything back on stable, the experiment's rules gone.
    let (status, body) = client
        .post_json(
            m.cp.admin,
            "/api/v1/experiments/ab/abort",
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    assert!(status.is_success(), "{body}");
    assert_eq!(body["phase"], "rolled_back");
    assert_eq!(body["reason"], "aborted by operator");
    let version = m.cp.version().await;
    m.cp.wait_acked(version, 3, Duration::from_secs(10)).await;
    assert_eq!(
        version_of(vec![("x-beta".into(), "1".into())]).await,
        "v1",
        "the experiment's header rule is gone"
    );
    assert_eq!(
        version_of(vec![("x-user-group".into(), "beta".into())]).await,
        "v2",
        "the mesh's own beta rule stays"
    );
    let cookie = vec![("cookie".to_owned(), "user=alice".to_owned())];
    for _ in 0..20 {
        assert_eq!(version_of(cookie.clone()).await, "v1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_plane_restart_resumes_at_the_same_step() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let opts = ControlPlaneOpts {
        state_dir: Some(state.clone()),
        ..ControlPlaneOpts::default()
    };
    let mut m = mesh(dir.path(), opts).await;
    let load = Load::start(
        m.client_proxy.outbound,
        "reviews",
        4,
        Duration::ZERO,
        Duration::from_secs(60),
    );
    start(
        &m,
        &spec(
            "restart",
            "canary: {steps: [10, 20, 50, 100]}",
            500,
            "{success_rate: 99, min_requests: 5, failure_threshold: 4}",
        ),
    )
    .await;
    eventually(
        Duration::from_secs(15),
        "the canary to reach step 2",
        || async {
            let s = experiment(&m, "restart").await;
            (s["step"].as_u64() == Some(1) && s["applied_step"].as_u64() == Some(1)).then_some(())
        },
    )
    .await;
    m.cp.proc.kill();
    // What the killed control plane had saved.
    let saved: Value =
        serde_json::from_slice(&std::fs::read(state.join("state.json")).unwrap()).unwrap();
    let at = saved["experiments"][0]["step"].as_u64().unwrap();
    let events_before = saved["experiments"][0]["events"].as_array().unwrap().len();
    assert!(at >= 1, "{saved:#}");

    let opts = ControlPlaneOpts {
        grpc_addr: Some(m.cp.grpc),
        admin_addr: Some(m.cp.admin),
        state_dir: Some(state),
        ..ControlPlaneOpts::default()
    };
    m.cp = weft_tests::ControlPlane::start(dir.path(), "weft-control", "", opts).await;
    let s = experiment(&m, "restart").await;
    assert_eq!(s["step"].as_u64(), Some(at), "resumed at the same step");
    let s = finished(&m, "restart", Duration::from_secs(30)).await;
    load.stop().await;
    assert_eq!(s["phase"], "succeeded", "{s:#}");
    let resumed = events(&s, "resumed_after_restart");
    assert_eq!(resumed.len(), 1, "{s:#}");
    assert_eq!(resumed[0]["step"].as_u64(), Some(at));
    assert!(
        s["events"].as_array().unwrap().len() > events_before,
        "history kept"
    );
    let weights: Vec<u64> = events(&s, "step")
        .iter()
        .filter_map(|e| e["weight"].as_u64())
        .collect();
    assert_eq!(
        weights,
        [10, 20, 50, 100],
        "no step repeated or skipped: {s:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blue_green_previews_by_header_then_switches_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let m = mesh(dir.path(), ControlPlaneOpts::default()).await;
    let limit = Duration::from_secs(30);
    let out = m.client_proxy.outbound;
    let users = Load::start(out, "reviews", 2, Duration::from_millis(1), limit);
    start(
        &m,
        &spec(
            "bg",
            "blue_green: {iterations: 3, headers: [{name: x-preview, exact: \"1\"}]}",
            300,
            "{success_rate: 99, min_requests: 5}",
        ),
    )
    .await;
    // Testers start once the preview rule is live everywhere.
    let s = eventually(Duration::from_secs(10), "the preview step", || async {
        let s = experiment(&m, "bg").await;
        (!events(&s, "step").is_empty()).then_some(s)
    })
    .await;
    let version = events(&s, "step")[0]["version"].as_u64().unwrap();
    m.cp.wait_acked(version, 3, Duration::from_secs(10)).await;
    let testers = Load::start_with_headers(
        out,
        "reviews",
        &[("x-preview", "1")],
        2,
        Duration::from_millis(1),
        limit,
    );
    // Before the switch, only testers reach v2.
    let s = eventually(Duration::from_secs(10), "two passing checks", || async {
        let s = experiment(&m, "bg").await;
        (s["passed_checks"].as_u64() == Some(2)).then_some(s)
    })
    .await;
    assert_eq!(s["weight"], 0);
    let v = m.cp.version().await;
    let stable_only = HttpClient::http1()
        .get(out, "reviews", "/", &[])
        .await
        .unwrap();
    assert_eq!(
        stable_only.header("x-app-version"),
        Some("v1"),
        "at version {v}"
    );
    let s = finished(&m, "bg", Duration::from_secs(10)).await;
    assert_eq!(s["phase"], "succeeded", "{s:#}");
    let (users, testers) = (users.stop().await, testers.stop().await);
    assert_eq!(testers.failed + users.failed, 0);
    assert!(
        !testers.by_version.contains_key("v1"),
        "testers always on v2: {:?}",
        testers.by_version
    );
    // One switch: the steps were 0 % then 100 %, nothing in between.
    let weights: Vec<u64> = events(&s, "step")
        .iter()
        .chain(events(&s, "promoted").iter())
        .filter_map(|e| e["weight"].as_u64())
        .collect();
    assert_eq!(weights, [0, 100]);
    let version = m.cp.version().await;
    m.cp.wait_acked(version, 3, Duration::from_secs(10)).await;
    for _ in 0..20 {
        let r = HttpClient::http1()
            .get(out, "reviews", "/", &[])
            .await
            .unwrap();
        assert_eq!(r.header("x-app-version"), Some("v2"));
    }
}

/// Runs a blue/green experiment that mirrors all traffic to green, under user load; returns
/// its final status and what the users saw (never a failure).
async fn mirrored_blue_green(m: &SidecarMesh, name: &str) -> (Value, weft_tests::mesh::Split) {
    let strategy = "blue_green: {iterations: 3, mirror: 100}";
    let analysis = "{success_rate: 99, min_requests: 5, failure_threshold: 2}";
    let out = m.client_proxy.outbound;
    let users = Load::start(
        out,
        "reviews",
        2,
        Duration::from_millis(1),
        Duration::from_secs(30),
    );
    start(m, &spec(name, strategy, 300, analysis)).await;
    let s = finished(m, name, Duration::from_secs(20)).await;
    let seen = users.stop().await;
    assert_eq!(seen.failed, 0, "{:?}", seen.failures);
    // What the proxies run now is the finished experiment's route.
    let version = m.cp.version().await;
    m.cp.wait_acked(version, 3, Duration::from_secs(10)).await;
    (s, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blue_green_with_mirroring_judges_green_on_copies_before_anyone_is_switched() {
    let dir = tempfile::tempdir().unwrap();
    let m = mesh(dir.path(), ControlPlaneOpts::default()).await;

    // A broken green, and no testers: only the copies of users' requests reach it. It is
    // rolled back on what they measured, and no user ever saw it.
    m.apps[1].set_faults(500, 0);
    let (s, seen) = mirrored_blue_green(&m, "bg-broken").await;
    assert_eq!(s["phase"], "rolled_back", "{s:#}");
    assert!(
        s["last_check"]["candidate"]["failures"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "judged on the copies: {s:#}"
    );
    assert_eq!(
        seen.by_version.keys().collect::<Vec<_>>(),
        ["v1"],
        "nobody was switched: {:?}",
        seen.by_version
    );
    assert!(m.apps[1].hits() > 0, "the copies reached green");
    // The experiment's mirror went with it.
    let cfg = m.client_proxy.config().await;
    let rules = cfg["config"]["routes"][0]["rules"].as_array().unwrap();
    assert!(rules.iter().all(|r| r.get("mirror").is_none()), "{cfg:#}");

    // A healthy green passes on copies alone and takes everyone at once.
    m.apps[1].set_faults(0, 0);
    let (s, _) = mirrored_blue_green(&m, "bg-healthy").await;
    assert_eq!(s["phase"], "succeeded", "{s:#}");
    let r = HttpClient::http1()
        .get(m.client_proxy.outbound, "reviews", "/", &[])
        .await
        .unwrap();
    assert_eq!(r.header("x-app-version"), Some("v2"));
}

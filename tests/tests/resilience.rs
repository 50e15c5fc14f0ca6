//! End-to-end acceptance of the resilience policies: real `weft-control` and `weft-proxy`
//! processes, controllable upstreams ([`ChaosApp`]) that fail, slow down or hang on demand.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use tempfile::TempDir;
use weft_tests::mesh::{self, Split};
use weft_tests::{
    ChaosApp, ControlPlane, ControlPlaneOpts, HttpClient, Proxy, ProxyOpts, eventually,
};

/// Service `api` at `endpoints` with `policy` (YAML flow-mapping body), one route for host
/// `api` whose single rule gets the `rule` lines, and `extra` services.
fn yaml(endpoints: &[SocketAddr], policy: &str, rule: &str, extra: &str) -> String {
    let eps: String = endpoints
        .iter()
        .map(|a| format!("      - {{address: \"{a}\"}}\n"))
        .collect();
    format!(
        "services:\n  - name: api\n    endpoints:\n{eps}    policy: {{{policy}}}\n{extra}\
         routes:\n  - name: api\n    hosts: [api]\n    rules:\n      - backends: [{{service: api}}]\n{rule}"
    )
}

fn shadow(addr: SocketAddr) -> String {
    format!("  - name: shadow\n    endpoints: [{{address: \"{addr}\"}}]\n")
}

struct Env {
    _dir: TempDir,
    cp: ControlPlane,
    proxy: Proxy,
    client: HttpClient,
}

async fn env(yaml: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), "control", yaml, ControlPlaneOpts::default()).await;
    let proxy = Proxy::start(
        dir.path(),
        "client-proxy",
        ProxyOpts {
            control_plane: Some(cp.grpc),
            service: "client".into(),
            ..ProxyOpts::default()
        },
    )
    .await;
    Env {
        _dir: dir,
        cp,
        proxy,
        client: HttpClient::http1(),
    }
}

impl Env {
    async fn get(&self) -> weft_tests::http::Reply {
        self.client
            .get(self.proxy.outbound, "api", "/", &[])
            .await
            .unwrap()
    }

    async fn post(&self, body: Vec<u8>) -> weft_tests::http::Reply {
        self.client
            .send(Method::POST, self.proxy.outbound, "api", "/", &[], body)
            .await
            .unwrap()
    }

    async fn drive(&self, n: u64, concurrency: u64) -> Split {
        mesh::drive(
            &self.client,
            self.proxy.outbound,
            "api",
            &[],
            n,
            concurrency,
        )
        .await
    }

    /// Applies `yaml` and waits until the proxy runs it.
    async fn apply(&self, yaml: &str) {
        let (status, body) = self.cp.apply(yaml).await;
        assert!(status.is_success(), "apply: {body}");
        let version = body["version"].as_u64().expect("version");
        eventually(Duration::from_secs(5), "the proxy to apply", || async {
            (self.proxy.version().await == version).then_some(())
        })
        .await;
    }
}

fn reason(r: &weft_tests::http::Reply) -> &str {
    r.header("x-weft-reason").unwrap_or("-")
}

fn body_of(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_replay_small_bodies_and_stream_large_ones() {
    let app = ChaosApp::start("a").await;
    let rule = "        retries: {attempts: 3, retry_on: [\"503\"], allow_non_idempotent: true, backoff_base: 2ms}\n";
    let e = env(&yaml(&[app.addr], "", rule, "")).await;

    app.fail_first(2, 503);
    let r = e.get().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(app.hits(), 3, "two failures, then success");

    app.take_bodies();
    app.fail_first(2, 503);
    let small = body_of(10 * 1024);
    let r = e.post(small.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let bodies = app.take_bodies();
    assert_eq!(bodies.len(), 3, "the POST was tried three times");
    for b in &bodies {
        assert_eq!(&b[..], &small[..], "every attempt got the same bytes");
    }
    // Both requests' retries are counted where operators look for them.
    let scrape = weft_tests::observe::scrape(e.proxy.admin).await;
    let retries =
        weft_tests::observe::value(&scrape, "weft_proxy_retries_total", &[("route", "api")]);
    assert_eq!(retries, 4.0, "two retries for the GET, two for the POST");

    app.fail_first(2, 503);
    let large = body_of(1024 * 1024);
    let r = e.post(large.clone()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "not retried");
    let bodies = app.take_bodies();
    assert_eq!(bodies.len(), 1, "a 1 MiB body is sent once");
    assert_eq!(&bodies[0][..], &large[..], "and streamed whole");

    // A non-idempotent method is not retried unless the route says so.
    let rule = "        retries: {attempts: 3, retry_on: [\"503\"], backoff_base: 2ms}\n";
    e.apply(&yaml(&[app.addr], "", rule, "")).await;
    app.take_bodies();
    app.fail_first(1, 503);
    assert_eq!(
        e.post(small.clone()).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(app.take_bodies().len(), 1);
    app.fail_first(1, 503);
    assert_eq!(e.get().await.status, StatusCode::OK, "GET is retried");

    // Retry-After is honoured: the retry waits at least that long.
    app.retry_after(1);
    app.fail_first(1, 503);
    let start = Instant::now();
    assert_eq!(e.get().await.status, StatusCode::OK);
    assert!(
        start.elapsed() >= Duration::from_millis(950),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_extra_attempts() {
    let app = ChaosApp::start("down").await;
    app.always(Some(503));
    let policy = "retry_budget: {ratio_percent: 20, min_retries_per_second: 1, ttl: 10s}";
    let rule = "        retries: {attempts: 3, retry_on: [\"503\"], backoff_base: 1ms}\n";
    let e = env(&yaml(&[app.addr], policy, rule, "")).await;
    let n = 200;
    let split = e.drive(n, 4).await;
    assert_eq!(split.failed, n, "all fail: {:?}", split.failures);
    let seen = app.hits();
    // (1 + 20%) × requests + 1/s × 10 s of reserve.
    let cap = n + n / 5 + 10;
    assert!(seen <= cap, "upstream saw {seen} > {cap}");
    assert!(
        seen > n + n / 10,
        "retries did happen within the budget: {seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoint_is_ejected_and_returns_when_healed() {
    let apps = [
        ChaosApp::start("a").await,
        ChaosApp::start("b").await,
        ChaosApp::start("bad").await,
    ];
    apps[2].always(Some(500));
    let addrs: Vec<_> = apps.iter().map(|a| a.addr).collect();
    // Round robin, so where the ejected endpoint's share goes is exact; the default balancer
    // (P2C over peak-EWMA latency) skips ejected endpoints through the same check, but its split
    // between two healthy endpoints follows their measured latency, which on a busy machine
    // can stay lopsided for seconds (a CI run saw 351/49).
    let policy = "outlier_detection: {consecutive_errors: 3, base_ejection_time: 3s, interval: 10s}, \
                  load_balancer: {algorithm: round-robin}";
    let e = env(&yaml(&addrs, policy, "", "")).await;

    // Until it is ejected the bad endpoint gets its share.
    eventually(
        Duration::from_secs(10),
        "the bad endpoint to be hit 3 times",
        || async {
            e.drive(20, 2).await;
            (apps[2].hits() >= 3).then_some(())
        },
    )
    .await;
    let before = apps[2].hits();
    let split = e.drive(400, 4).await;
    let bad = apps[2].hits() - before;
    assert!(
        bad * 100 < 400 * 5,
        "ejected endpoint got {bad}/400: {split:?}"
    );
    // The healthy ones share what the ejected one no longer gets, half each.
    assert_eq!(split.failed, 0, "{split:?}");
    assert!(
        split.percent("a") > 40.0 && split.percent("b") > 40.0,
        "{split:?}"
    );
    let scrape = weft_tests::observe::scrape(e.proxy.admin).await;
    let ejections = weft_tests::observe::value(
        &scrape,
        "weft_proxy_outlier_ejections_total",
        &[("service", "api")],
    );
    assert!(ejections >= 1.0, "the ejection is counted: {ejections}");

    // Healed: it is back after its ejection time.
    apps[2].always(None);
    let healed = apps[2].hits();
    eventually(
        Duration::from_secs(15),
        "the healed endpoint to get traffic",
        || async {
            let s = e.drive(60, 2).await;
            (s.by_version.get("bad").copied().unwrap_or(0) > 0 && apps[2].hits() > healed + 3)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_aware_balancing_keeps_requests_in_the_zone_and_fails_over() {
    // Random balancing, so the spill's share between the two zone-b endpoints is a fair coin:
    // P2C-EWMA rightly favours the faster one, which made "both share" depend on the machine
    // (CI saw 155/45). The locality unit tests cover every algorithm.
    let apps = [
        ChaosApp::start("a1").await,
        ChaosApp::start("b1").await,
        ChaosApp::start("b2").await,
    ];
    let yaml = format!(
        "services:\n  - name: api\n    endpoints:\n\
         \x20     - {{address: \"{}\", labels: {{zone: zone-a}}}}\n\
         \x20     - {{address: \"{}\", labels: {{zone: zone-b}}}}\n\
         \x20     - {{address: \"{}\", labels: {{zone: zone-b}}}}\n\
         \x20   policy: {{load_balancer: {{algorithm: random, prefer_local_zone: true}}, \
         outlier_detection: {{consecutive_errors: 2, base_ejection_time: 2s, max_ejection_percent: 50}}}}\n\
         routes:\n  - name: api\n    hosts: [api]\n    rules:\n      - backends: [{{service: api}}]\n\
         \x20       retries: {{attempts: 2, retry_on: [5xx], backoff_base: 1ms}}\n",
        apps[0].addr, apps[1].addr, apps[2].addr
    );
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), "control", &yaml, ControlPlaneOpts::default()).await;
    let proxy = Proxy::start(
        dir.path(),
        "client-proxy",
        ProxyOpts {
            control_plane: Some(cp.grpc),
            service: "client".into(),
            extra_args: vec!["--zone".into(), "zone-a".into()],
            ..ProxyOpts::default()
        },
    )
    .await;
    let client = HttpClient::http1();
    let drive = |n| mesh::drive(&client, proxy.outbound, "api", &[], n, 4);

    // Healthy: every request stays in the proxy's zone.
    let split = drive(200).await;
    assert_eq!(split.by_version.get("a1"), Some(&200), "{split:?}");
    assert_eq!(apps[1].hits() + apps[2].hits(), 0);

    // The zone's only endpoint fails: ejected, and requests go to the other zone (the
    // failures before the ejection are retried there, so callers see none).
    apps[0].always(Some(500));
    let split = drive(100).await;
    assert_eq!(split.failed, 0, "{split:?}");
    let a_hits = apps[0].hits();
    let split = drive(200).await;
    assert_eq!(split.failed, 0, "{split:?}");
    assert_eq!(apps[0].hits(), a_hits, "ejected: no request to zone-a");
    assert!(
        split.percent("b1") > 25.0 && split.percent("b2") > 25.0,
        "both zone-b endpoints share: {split:?}"
    );

    // Healed: back home once its ejection ends.
    apps[0].always(None);
    eventually(
        Duration::from_secs(15),
        "requests to return to zone-a",
        || async {
            let s = drive(40).await;
            (s.by_version.get("a1") == Some(&40)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_moves_on_and_request_timeout_answers_504() {
    let (ok, stuck) = (ChaosApp::start("ok").await, ChaosApp::start("stuck").await);
    stuck.hang(true);
    let rule = "        timeout: 3s\n        retries: {attempts: 2, per_try_timeout: 100ms, backoff_base: 1ms}\n";
    let e = env(&yaml(
        &[ok.addr, stuck.addr],
        "load_balancer: {algorithm: round-robin}",
        rule,
        "",
    ))
    .await;
    let split = e.drive(40, 4).await;
    assert_eq!(split.failed, 0, "{:?}", split.failures);
    assert_eq!(split.by_version.get("ok"), Some(&40));
    assert!(stuck.hits() > 0, "some tries went to the hanging endpoint");

    // Only the hanging endpoint: the per-try timeout fires on each try.
    let rule = "        retries: {attempts: 1, per_try_timeout: 50ms, backoff_base: 1ms}\n";
    e.apply(&yaml(&[stuck.addr], "", rule, "")).await;
    let start = Instant::now();
    let r = e.get().await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reason(&r), "per_try_timeout");
    assert!(start.elapsed() < Duration::from_secs(2));

    // The request timeout covers everything.
    let rule = "        timeout: 150ms\n";
    e.apply(&yaml(&[stuck.addr], "", rule, "")).await;
    let start = Instant::now();
    let r = e.get().await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reason(&r), "request_timeout");
    assert!(
        r.text().contains("request_timeout of 150 ms"),
        "{}",
        r.text()
    );
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulkhead_refuses_the_eleventh_concurrent_request_at_once() {
    let app = ChaosApp::start("slow").await;
    app.latency(Duration::from_millis(1500));
    let e = Arc::new(env(&yaml(&[app.addr], "limits: {max_requests: 10}", "", "")).await);
    let mut held = Vec::new();
    for _ in 0..10 {
        let e = e.clone();
        held.push(tokio::spawn(async move { e.get().await.status }));
    }
    eventually(Duration::from_secs(5), "10 requests in flight", || async {
        (app.active() == 10).then_some(())
    })
    .await;
    let start = Instant::now();
    let r = e.get().await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(reason(&r), "overflow");
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "refused at once: {:?}",
        start.elapsed()
    );
    for h in held {
        assert_eq!(h.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(app.hits(), 10, "the refused request never reached the app");
    app.latency(Duration::ZERO);
    assert_eq!(e.get().await.status, StatusCode::OK, "slots are given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_refuses_a_third_connection() {
    let app = ChaosApp::start("slow").await;
    app.latency(Duration::from_millis(1500));
    let e = Arc::new(env(&yaml(&[app.addr], "limits: {max_connections: 2}", "", "")).await);
    let mut held = Vec::new();
    for _ in 0..2 {
        let e = e.clone();
        held.push(tokio::spawn(async move { e.get().await.status }));
    }
    eventually(Duration::from_secs(5), "2 requests in flight", || async {
        (app.active() == 2).then_some(())
    })
    .await;
    // HTTP/1.1 upstream: a third concurrent request needs a third connection.
    let start = Instant::now();
    let r = e.get().await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(reason(&r), "overflow");
    assert!(start.elapsed() < Duration::from_millis(500));
    for h in held {
        assert_eq!(h.await.unwrap(), StatusCode::OK);
    }
    app.latency(Duration::ZERO);
    assert_eq!(
        e.get().await.status,
        StatusCode::OK,
        "pooled connections are reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_avoids_the_slow_endpoint() {
    let apps = [
        ChaosApp::start("fast1").await,
        ChaosApp::start("fast2").await,
        ChaosApp::start("slow").await,
    ];
    apps[2].latency(Duration::from_millis(50));
    let addrs: Vec<_> = apps.iter().map(|a| a.addr).collect();
    let e = env(&yaml(&addrs, "", "", "")).await;
    let split = e.drive(600, 6).await;
    assert_eq!(split.failed, 0, "{:?}", split.failures);
    let (slow, fast) = (
        split.by_version.get("slow").copied().unwrap_or(0),
        split.by_version.get("fast1").copied().unwrap_or(0)
            + split.by_version.get("fast2").copied().unwrap_or(0),
    );
    assert!(
        slow * 5 < fast / 2,
        "slow got {slow}, fast ones {fast} ({split:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_aborts_the_configured_share() {
    let app = ChaosApp::start("a").await;
    let rule = "        fault: {abort: {percent: 50, http_status: 503}}\n";
    let e = env(&yaml(&[app.addr], "", rule, "")).await;
    let (mut aborted, mut ok) = (0u64, 0u64);
    for _ in 0..1000 {
        let r = e.get().await;
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE if reason(&r) == "fault_injected" => aborted += 1,
            other => panic!("unexpected {other} {}", r.text()),
        }
    }
    assert!((450..=550).contains(&aborted), "{aborted} aborted of 1000");
    assert_eq!(app.hits(), ok, "aborted requests never reached the app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_copies_a_share_without_slowing_the_primary() {
    let (primary, shadow_app) = (
        ChaosApp::start("primary").await,
        ChaosApp::start("shadow").await,
    );
    shadow_app.latency(Duration::from_millis(300));
    let rule = "        mirror: {service: shadow, percent: 50}\n";
    let e = env(&yaml(&[primary.addr], "", rule, &shadow(shadow_app.addr))).await;
    let n = 300u64;
    let mut latencies = Vec::new();
    for i in 0..n {
        let start = Instant::now();
        let r = e.post(format!("body {i}").into_bytes()).await;
        latencies.push(start.elapsed());
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-app-version"), Some("primary"));
    }
    latencies.sort();
    let p90 = latencies[latencies.len() * 9 / 10];
    assert!(
        p90 < Duration::from_millis(150),
        "primary p90 {p90:?} with a 300 ms shadow"
    );
    eventually(
        Duration::from_secs(5),
        "mirrored copies to land",
        || async { (shadow_app.active() == 0 && shadow_app.hits() > 0).then_some(()) },
    )
    .await;
    let copies = shadow_app.hits();
    assert!(
        (105..=195).contains(&copies),
        "{copies} copies of {n} at 50%"
    );
    let bodies = shadow_app.take_bodies();
    let primary_bodies = primary.take_bodies();
    for b in &bodies {
        assert!(
            primary_bodies.contains(b),
            "the copy carries the request's body"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after() {
    let app = ChaosApp::start("a").await;
    let rule = "        rate_limit: {requests: 5, interval: 10s}\n";
    let e = env(&yaml(&[app.addr], "", rule, "")).await;
    for _ in 0..5 {
        assert_eq!(e.get().await.status, StatusCode::OK);
    }
    let r = e.get().await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reason(&r), "rate_limited");
    let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&after), "retry-after {after}");
    assert_eq!(app.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_rate_limit_counts_each_header_value_apart() {
    let app = ChaosApp::start("a").await;
    let rule = "        rate_limit: {requests: 3, interval: 10s, per: {header: x-api-key}}\n";
    let e = env(&yaml(&[app.addr], "", rule, "")).await;
    let with_key = |key: &'static str| {
        let e = &e;
        async move {
            e.client
                .get(e.proxy.outbound, "api", "/", &[("x-api-key", key)])
                .await
                .unwrap()
        }
    };
    for _ in 0..3 {
        assert_eq!(with_key("team-a").await.status, StatusCode::OK);
    }
    let r = with_key("team-a").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reason(&r), "rate_limited");
    // Another key has its own three; requests without one share theirs.
    for _ in 0..3 {
        assert_eq!(with_key("team-b").await.status, StatusCode::OK);
        assert_eq!(e.get().await.status, StatusCode::OK);
    }
    assert_eq!(
        with_key("team-b").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(e.get().await.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(app.hits(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_check_takes_an_endpoint_out_and_back() {
    let (a, b) = (ChaosApp::start("a").await, ChaosApp::start("b").await);
    let policy = "health_check: {path: /healthz, interval: 30ms, unhealthy_threshold: 2, healthy_threshold: 1}, \
                  load_balancer: {algorithm: round-robin}";
    let e = env(&yaml(&[a.addr, b.addr], policy, "", "")).await;
    b.healthy(false);
    eventually(Duration::from_secs(5), "b to be taken out", || async {
        let s = e.drive(20, 1).await;
        (s.by_version.get("a") == Some(&20)).then_some(())
    })
    .await;
    b.healthy(true);
    eventually(Duration::from_secs(5), "b to be back", || async {
        let s = e.drive(20, 1).await;
        (s.by_version.get("b").copied().unwrap_or(0) >= 5).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_change_live_without_failing_requests() {
    let apps = [ChaosApp::start("a").await, ChaosApp::start("b").await];
    let addrs: Vec<_> = apps.iter().map(|a| a.addr).collect();
    let shadow_app = ChaosApp::start("shadow").await;
    let extra = shadow(shadow_app.addr);
    let e = Arc::new(env(&yaml(&addrs, "", "", &extra)).await);
    let stop = Arc::new(AtomicBool::new(false));
    let mut drivers = Vec::new();
    for _ in 0..4 {
        let (e, stop) = (e.clone(), stop.clone());
        drivers.push(tokio::spawn(async move {
            let mut split = Split::default();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline
                && split.total() < 100_000
            {
                mesh::record(
                    &mut split,
                    e.client.get(e.proxy.outbound, "api", "/", &[]).await,
                );
            }
            split
        }));
    }
    let steps: [(&str, &str); 9] = [
        ("load_balancer: {algorithm: least-request}", ""),
        (
            "load_balancer: {algorithm: round-robin}, connect_timeout: 500ms, idle_timeout: 2s",
            "        timeout: 5s\n",
        ),
        (
            "load_balancer: {algorithm: consistent-hash, hash_header: x-user}",
            "        retries: {attempts: 2, per_try_timeout: 2s}\n",
        ),
        (
            "outlier_detection: {consecutive_errors: 5}",
            "        rate_limit: {requests: 100000}\n",
        ),
        (
            "limits: {max_requests: 1000, max_pending: 100}",
            "        stream_idle_timeout: 5s\n",
        ),
        (
            "health_check: {path: /healthz, interval: 50ms}",
            "        fault: {delay: {percent: 10, duration: 1ms}}\n",
        ),
        (
            "retry_budget: {ratio_percent: 50}",
            "        mirror: {service: shadow, percent: 20}\n",
        ),
        (
            "load_balancer: {algorithm: random}",
            "        timeout: 4s\n        retries: {attempts: 1}\n",
        ),
        ("", ""),
    ];
    for (policy, rule) in steps {
        e.apply(&yaml(&addrs, policy, rule, &extra)).await;
        let config = e.proxy.config().await;
        if !policy.is_empty() {
            let key = policy.split(':').next().unwrap();
            assert!(
                config["config"]["services"][0]["policy"].get(key).is_some(),
                "/config shows {key}: {config}"
            );
        }
        // Let traffic run under each version.
        let before = apps[0].hits() + apps[1].hits();
        eventually(
            Duration::from_secs(5),
            "traffic under the new policy",
            || async { (apps[0].hits() + apps[1].hits() > before + 50).then_some(()) },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = Split::default();
    for d in drivers {
        total.merge(d.await.unwrap());
    }
    assert_eq!(total.failed, 0, "{:?}", total.failures);
    assert!(total.total() > 400, "{total:?}");
    assert!(shadow_app.hits() > 0, "the mirror step ran");
}

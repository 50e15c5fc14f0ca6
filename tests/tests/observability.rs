//! End-to-end acceptance of observability: real proxies, a real OTLP collector (`rotel-agent`),
//! real upstream apps; spans read back from the collector, `/metrics` parsed as Prometheus text.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use weft_tests::identity::HeaderApp;
use weft_tests::mesh::two_versions;
use weft_tests::observe::{Collector, Span, collector_or_skip, header_app, scrape, value};
use weft_tests::{HttpClient, Proxy, ProxyOpts, VersionApp, eventually};

/// A static mesh with one service `reviews` at `endpoint`.
fn one_service(endpoint: SocketAddr) -> String {
    format!(
        r#"services:
  - name: reviews
    endpoints: [{{address: "{endpoint}", labels: {{version: v1}}}}]
    subsets: {{v1: {{version: v1}}}}
routes:
  - name: reviews
    hosts: [reviews]
    rules: [{{backends: [{{service: reviews, subset: v1}}]}}]
"#
    )
}

/// client proxy (outbound, `productpage`) → server sidecar (inbound, `reviews` v1) → app,
/// both exporting to `collector`.
struct TwoHops {
    app: HeaderApp,
    sidecar: Proxy,
    client: Proxy,
}

async fn two_hops(dir: &Path, collector: &Collector) -> TwoHops {
    let app = header_app().await;
    let otlp = |extra: &[&str]| {
        let mut v = vec![
            "--otlp-endpoint".to_owned(),
            collector.endpoint(),
            "--trace-sample-ratio".to_owned(),
            "1".to_owned(),
        ];
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };
    let sidecar = Proxy::start(
        dir,
        "reviews-sidecar",
        ProxyOpts {
            // The sidecar's own routes do not matter for inbound traffic.
            config_yaml: Some(one_service(app.addr)),
            app_addr: Some(app.addr),
            service: "reviews".into(),
            labels: vec![("version".into(), "v1".into())],
            extra_args: otlp(&[]),
            ..ProxyOpts::default()
        },
    )
    .await;
    let inbound = sidecar.inbound.expect("sidecar inbound");
    let log = dir.join("client-access.log");
    let client = Proxy::start(
        dir,
        "productpage-proxy",
        ProxyOpts {
            config_yaml: Some(one_service(inbound)),
            service: "productpage".into(),
            extra_args: otlp(&["--access-log", &log.display().to_string()]),
            ..ProxyOpts::default()
        },
    )
    .await;
    TwoHops {
        app,
        sidecar,
        client,
    }
}

/// Sends one GET for `reviews` through the client proxy; returns the headers the app saw.
async fn call(hops: &TwoHops, headers: &[(&str, &str)]) -> serde_json::Value {
    let reply = HttpClient::http1()
        .get(hops.client.outbound, "reviews", "/reviews/1", headers)
        .await
        .expect("request through two proxies");
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

fn trace_id_of(traceparent: &str) -> &str {
    traceparent
        .split('-')
        .nth(1)
        .expect("traceparent has a trace id")
}

fn span_id_of(traceparent: &str) -> &str {
    traceparent
        .split('-')
        .nth(2)
        .expect("traceparent has a span id")
}

/// Waits until the collector holds the client and server spans of `trace`.
async fn spans_of(collector: &Collector, trace: &str) -> (Span, Span) {
    eventually(
        Duration::from_secs(10),
        &format!("client and server spans of trace {trace} at the collector"),
        || async {
            let spans: Vec<Span> = collector
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace)
                .collect();
            let client = spans.iter().find(|s| s.kind == "SPAN_KIND_CLIENT")?;
            let server = spans.iter().find(|s| s.kind == "SPAN_KIND_SERVER")?;
            Some((client.clone(), server.clone()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_two_sidecars_share_the_trace_and_link_parents() {
    let Some(agent) = collector_or_skip("spans_of_two_sidecars_share_the_trace_and_link_parents")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(&agent, dir.path(), "collector").await;
    let hops = two_hops(dir.path(), &collector).await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let seen = call(
        &hops,
        &[
            ("traceparent", &format!("00-{trace}-{caller_span}-01")),
            ("tracestate", "vendor=opaque"),
        ],
    )
    .await;
    let tp = seen["traceparent"]
        .as_str()
        .expect("the app got a traceparent");
    assert_eq!(trace_id_of(tp), trace, "the app sees the caller's trace id");
    assert!(tp.ends_with("-01"), "sampled: {tp}");
    assert_eq!(
        seen["tracestate"], "vendor=opaque",
        "tracestate passes through"
    );

    let (client, server) = spans_of(&collector, trace).await;
    assert_eq!(
        client.parent_id, caller_span,
        "client span is a child of the caller"
    );
    assert_eq!(
        server.parent_id, client.span_id,
        "server span is a child of the client span"
    );
    assert_eq!(
        span_id_of(tp),
        server.span_id,
        "the app's parent is the server span"
    );
    assert_eq!(client.service, "productpage");
    assert_eq!(server.service, "reviews");
    assert_eq!(
        client.attributes.get("weft.route").map(String::as_str),
        Some("reviews")
    );
    assert_eq!(
        client.attributes.get("weft.subset").map(String::as_str),
        Some("v1")
    );
    assert_eq!(
        server
            .attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("200")
    );

    // Without any context the client proxy starts the trace: still one trace, linked.
    let seen = call(&hops, &[]).await;
    let tp = seen["traceparent"].as_str().unwrap().to_owned();
    let (client, server) = spans_of(&collector, trace_id_of(&tp)).await;
    assert!(
        client.parent_id.is_empty(),
        "a root client span: {client:?}"
    );
    assert_eq!(server.parent_id, client.span_id);

    // The access log has the request with its trace id.
    let log = dir.path().join("client-access.log");
    let line = eventually(Duration::from_secs(5), "the access log line", || async {
        let text = std::fs::read_to_string(&log).ok()?;
        text.lines().find(|l| l.contains(trace)).map(str::to_owned)
    })
    .await;
    let entry: serde_json::Value = serde_json::from_str(&line).expect("one JSON object a line");
    assert_eq!(entry["route"], "reviews");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["path"], "/reviews/1");
    assert_eq!(entry["upstream"], hops.sidecar.inbound.unwrap().to_string());
    assert!(entry["duration_ms"].as_f64().unwrap() > 0.0);
    drop(hops.app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_in_w3c_out_and_back_keep_the_trace_id() {
    let Some(agent) = collector_or_skip("b3_in_w3c_out_and_back_keep_the_trace_id") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(&agent, dir.path(), "collector").await;
    let hops = two_hops(dir.path(), &collector).await;

    // B3 multi, 64-bit trace id: W3C out carries it zero-padded; B3 out keeps coming too.
    let seen = call(
        &hops,
        &[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    let trace = "0000000000000000a3ce929d0e0e4736";
    let tp = seen["traceparent"]
        .as_str()
        .expect("W3C injected for a B3 caller");
    assert_eq!(trace_id_of(tp), trace);
    assert_eq!(seen["x-b3-traceid"], trace, "B3 out, same trace");
    assert_eq!(seen["x-b3-spanid"].as_str(), Some(span_id_of(tp)));
    let (client, server) = spans_of(&collector, trace).await;
    assert_eq!(client.parent_id, "00f067aa0ba902b7");
    assert_eq!(server.parent_id, client.span_id);

    // B3 single, 128-bit: the same in both formats, written back as a single header.
    let trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let seen = call(&hops, &[("b3", &format!("{trace}-e457b5a2e4d86bd1-1"))]).await;
    assert_eq!(trace_id_of(seen["traceparent"].as_str().unwrap()), trace);
    let b3 = seen["b3"].as_str().expect("b3 single written back");
    assert!(b3.starts_with(&format!("{trace}-")), "{b3}");
    assert!(seen.get("x-b3-traceid").is_none(), "style kept: {seen}");
    spans_of(&collector, trace).await;

    // W3C in: W3C out only, no B3 invented.
    let seen = call(
        &hops,
        &[(
            "traceparent",
            "00-11111111111111112222222222222222-3333333333333333-01",
        )],
    )
    .await;
    assert_eq!(
        trace_id_of(seen["traceparent"].as_str().unwrap()),
        "11111111111111112222222222222222"
    );
    assert!(seen.get("b3").is_none() && seen.get("x-b3-traceid").is_none());
}

/// Median and max of `n` sequential requests' latency.
async fn latencies(client: &HttpClient, proxy: &Proxy, n: usize) -> (Duration, Duration) {
    let mut all = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = client
            .get(proxy.outbound, "reviews", "/", &[])
            .await
            .expect("request");
        assert_eq!(r.status, 200, "{}", r.text());
        all.push(t.elapsed());
    }
    all.sort();
    (all[n / 2], all[n - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_collector_over_otlp_grpc() {
    let Some(agent) = collector_or_skip("spans_reach_a_collector_over_otlp_grpc") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let app = VersionApp::start("v1").await;
    let collector = Collector::start(&agent, dir.path(), "collector").await;
    let proxy = Proxy::start(
        dir.path(),
        "proxy",
        ProxyOpts {
            config_yaml: Some(one_service(app.addr)),
            service: "productpage".into(),
            extra_args: vec![
                "--otlp-protocol".into(),
                "grpc".into(),
                "--otlp-endpoint".into(),
                collector.grpc_endpoint(),
            ],
            ..ProxyOpts::default()
        },
    )
    .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    let reply = HttpClient::http1()
        .get(proxy.outbound, "reviews", "/", &[("traceparent", &parent)])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let span = eventually(Duration::from_secs(10), "the span over gRPC", || async {
        collector
            .spans()
            .into_iter()
            .find(|s| s.trace_id == trace && s.service == "productpage")
    })
    .await;
    assert_eq!(span.parent_id, "00f067aa0ba902b7", "{span:?}");
    // The collector prints a span before the proxy has read the answer to its export.
    let m = eventually(Duration::from_secs(10), "the export counted", || async {
        let m = scrape(proxy.admin).await;
        (value(&m, "weft_proxy_trace_spans_exported_total", &[]) >= 1.0).then_some(m)
    })
    .await;
    assert_eq!(value(&m, "weft_proxy_trace_spans_dropped_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_stuck_collector_never_slows_requests() {
    let Some(agent) = collector_or_skip("a_dead_or_stuck_collector_never_slows_requests") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let app = VersionApp::start("v1").await;
    let mut collector = Collector::start(&agent, dir.path(), "collector").await;
    let proxy = Proxy::start(
        dir.path(),
        "proxy",
        ProxyOpts {
            config_yaml: Some(one_service(app.addr)),
            extra_args: vec!["--otlp-endpoint".into(), collector.endpoint()],
            ..ProxyOpts::default()
        },
    )
    .await;
    let client = HttpClient::http1();
    let (base_median, _) = latencies(&client, &proxy, 200).await;
    eventually(Duration::from_secs(10), "spans exported", || async {
        let m = scrape(proxy.admin).await;
        (value(&m, "weft_proxy_trace_spans_exported_total", &[]) >= 200.0).then_some(())
    })
    .await;

    // Collector stopped: exports fail fast (connection refused); requests do not notice.
    collector.proc.kill();
    let (median, max) = latencies(&client, &proxy, 200).await;
    assert!(
        median <= base_median * 3 + Duration::from_millis(2),
        "median {median:?} vs {base_median:?} with the collector up"
    );
    assert!(
        max < Duration::from_secs(1),
        "max {max:?} (an export blocks for up to 5 s)"
    );
    eventually(
        Duration::from_secs(10),
        "failed exports counted as dropped",
        || async {
            let m = scrape(proxy.admin).await;
            (value(&m, "weft_proxy_trace_spans_dropped_total", &[]) > 0.0).then_some(())
        },
    )
    .await;

    // A collector that accepts connections and never answers: the exporter waits on it, the
    // queue fills to its bound and further spans are dropped, requests still at full speed.
    let stuck = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stuck_proxy = Proxy::start(
        dir.path(),
        "stuck-proxy",
        ProxyOpts {
            config_yaml: Some(one_service(app.addr)),
            extra_args: vec![
                "--otlp-endpoint".into(),
                format!("http://{}", stuck.local_addr().unwrap()),
            ],
            ..ProxyOpts::default()
        },
    )
    .await;
    let split =
        weft_tests::mesh::drive(&client, stuck_proxy.outbound, "reviews", &[], 3000, 8).await;
    assert_eq!(split.failed, 0, "{:?}", split.failures);
    let (median, max) = latencies(&client, &stuck_proxy, 100).await;
    assert!(
        median <= base_median * 3 + Duration::from_millis(2),
        "median {median:?} vs {base_median:?} with the collector up"
    );
    assert!(
        max < Duration::from_secs(1),
        "max {max:?} (an export blocks for up to 5 s)"
    );
    let m = scrape(stuck_proxy.admin).await;
    let queued = value(&m, "weft_proxy_trace_queue_spans", &[]);
    let dropped = value(&m, "weft_proxy_trace_spans_dropped_total", &[]);
    assert!(queued <= 2048.0, "queue bounded: {queued}");
    // 3100 spans: at most one batch (512) in flight plus a full queue (2048) are kept.
    assert!(
        dropped >= 3100.0 - 512.0 - 2048.0,
        "dropped {dropped}, queued {queued}"
    );
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_requests_exactly_by_subset() {
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2) = (VersionApp::start("v1").await, VersionApp::start("v2").await);
    let proxy = Proxy::start(
        dir.path(),
        "proxy",
        ProxyOpts {
            config_yaml: Some(two_versions("reviews", v1.addr, v2.addr, 50, 50)),
            ..ProxyOpts::default()
        },
    )
    .await;
    let client = HttpClient::http1();
    let split = weft_tests::mesh::drive(&client, proxy.outbound, "reviews", &[], 400, 4).await;
    assert_eq!(split.failed, 0, "{:?}", split.failures);
    // The beta rule sends these to v2 whatever the weights.
    let beta = weft_tests::mesh::drive(
        &client,
        proxy.outbound,
        "reviews",
        &[("x-user-group", "beta")],
        50,
        2,
    )
    .await;
    assert_eq!(beta.by_version.get("v2"), Some(&50));

    let m = scrape(proxy.admin).await;
    let ok = |subset: &str| {
        value(
            &m,
            "weft_proxy_requests_total",
            &[
                ("direction", "outbound"),
                ("route", "reviews"),
                ("service", "reviews"),
                ("subset", subset),
                ("code", "200"),
                ("class", "2xx"),
            ],
        )
    };
    let seen = |v: &str| {
        split.by_version.get(v).copied().unwrap_or(0) + beta.by_version.get(v).copied().unwrap_or(0)
    };
    assert!(seen("v1") > 100 && seen("v2") > 100, "{split:?}");
    assert_eq!(ok("v1") as u64, seen("v1"), "v1 counter = v1 answers");
    assert_eq!(ok("v2") as u64, seen("v2"), "v2 counter = v2 answers");
    assert_eq!(v1.hits() + v2.hits(), 450);
    assert_eq!(
        value(&m, "weft_proxy_requests_total", &[]) as u64,
        450,
        "nothing else counted"
    );
    // Latency histograms per subset, with every request observed.
    let count = |subset: &str| {
        m.samples
            .iter()
            .filter(|s| s.metric == "weft_proxy_request_duration_ms")
            .filter(|s| s.labels.get("subset") == Some(subset))
            .map(|s| match &s.value {
                prometheus_parse::Value::Histogram(b) => b.last().map_or(0.0, |b| b.count),
                _ => 0.0,
            })
            .sum::<f64>() as u64
    };
    assert_eq!(count("v1") + count("v2"), 450);
    assert_eq!(value(&m, "weft_proxy_requests_in_flight", &[]), 0.0);
    assert!(
        value(
            &m,
            "weft_proxy_tcp_connections_opened_total",
            &[("listener", "outbound")]
        ) >= 1.0
    );
    assert!(
        value(
            &m,
            "weft_proxy_response_body_bytes_total",
            &[("direction", "outbound")]
        ) >= 450.0 * 3.0
    );
    assert_eq!(value(&m, "weft_proxy_config_version", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_errors_carry_their_reason_in_header_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let app = VersionApp::start("v1").await;
    // A port with nothing listening: bind, note it, release it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = format!(
        r#"services:
  - name: ok
    endpoints: [{{address: "{app}", labels: {{version: v1}}}}]
    subsets: {{v1: {{version: v1}}, v9: {{version: v9}}}}
  - name: down
    endpoints: [{{address: "{closed}"}}]
routes:
  - name: empty
    hosts: [empty]
    rules: [{{backends: [{{service: ok, subset: v9}}]}}]
  - name: down
    hosts: [down]
    rules: [{{backends: [{{service: down}}]}}]
"#,
        app = app.addr
    );
    let proxy = Proxy::start(
        dir.path(),
        "proxy",
        ProxyOpts {
            config_yaml: Some(yaml),
            ..ProxyOpts::default()
        },
    )
    .await;
    let client = HttpClient::http1();
    let cases = [
        ("nowhere", 404, "no_route"),
        ("empty", 503, "no_endpoints"),
        ("down", 503, "upstream_connect_failed"),
    ];
    for (host, status, reason) in cases {
        for _ in 0..3 {
            let r = client.get(proxy.outbound, host, "/", &[]).await.unwrap();
            assert_eq!(r.status.as_u16(), status, "{host}: {}", r.text());
            assert_eq!(r.header("x-weft-reason"), Some(reason), "{host}");
            assert!(r.text().starts_with("weft-proxy: "), "{}", r.text());
        }
    }
    let m = scrape(proxy.admin).await;
    for (_, status, reason) in cases {
        let code = status.to_string();
        assert_eq!(
            value(
                &m,
                "weft_proxy_local_responses_total",
                &[("direction", "outbound"), ("reason", reason)]
            ),
            3.0,
            "{reason}"
        );
        assert_eq!(
            value(
                &m,
                "weft_proxy_requests_total",
                &[("reason", reason), ("code", &code)]
            ),
            3.0,
            "{reason}"
        );
    }
    // Bounded labels: the unknown host is not a label anywhere.
    let text = HttpClient::http1()
        .get(proxy.admin, "admin", "/metrics", &[])
        .await
        .unwrap()
        .text();
    assert!(!text.contains("nowhere"), "no host labels");
    assert_eq!(
        value(
            &m,
            "weft_proxy_requests_total",
            &[
                ("reason", "no_endpoints"),
                ("service", "ok"),
                ("subset", "v9")
            ]
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weftctl_top_control_plane_metrics_and_runtime_log_level() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = weft_tests::mesh::SidecarMesh::start(dir.path(), 50, 50).await;
    let client = HttpClient::http1();

    // Every proxy announced its admin address; the control plane lists it.
    let status = mesh.cp.status().await;
    let admins: Vec<&str> = status["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["admin_addr"].as_str())
        .collect();
    assert_eq!(admins.len(), 3, "{status}");
    assert!(admins.contains(&mesh.client_proxy.admin.to_string().as_str()));

    // `weftctl top --once -o json` while traffic flows (bounded: until it exits, 20 s max).
    let mut top = std::process::Command::new(weft_tests::bins::bin("weftctl"))
        .args([
            "--server",
            &format!("http://{}", mesh.cp.admin),
            "-o",
            "json",
            "top",
            "--once",
            "--interval",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start weftctl top");
    let start = Instant::now();
    let mut sent = 0u64;
    while top.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "weftctl top did not finish"
        );
        let r = client
            .get(mesh.client_proxy.outbound, "reviews", "/", &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        sent += 1;
    }
    let out = top.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("top -o json");
    assert_eq!(v["proxies"], 3, "{v}");
    let rows = v["rows"].as_array().unwrap();
    for subset in ["v1", "v2"] {
        let row = rows
            .iter()
            .find(|r| r["service"] == "reviews" && r["subset"] == subset)
            .unwrap_or_else(|| panic!("no row for reviews/{subset}: {v}"));
        assert!(row["rps"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["success_percent"], 100.0, "{row}");
        assert!(row["p99_ms"].as_f64().unwrap() > 0.0, "{row}");
    }
    let total: u64 = rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
    assert!(
        total > 0 && total <= sent,
        "{total} of {sent} in the window"
    );

    // Control-plane metrics: a weight change converges on all three proxies.
    let version = mesh
        .cp
        .set_weights("reviews", &[("v1", 90), ("v2", 10)])
        .await;
    mesh.cp.wait_acked(version, 3, Duration::from_secs(5)).await;
    eventually(Duration::from_secs(5), "convergence observed", || async {
        let m = scrape_cp(mesh.cp.admin).await;
        let converged = value(&m, "weft_control_convergence_ms_count", &[]);
        let ok = converged >= 1.0
            && value(&m, "weft_control_proxies_connected", &[]) == 3.0
            && value(&m, "weft_control_config_version", &[]) == version as f64
            && value(&m, "weft_control_pushes_total", &[("kind", "delta")]) >= 3.0;
        ok.then_some(())
    })
    .await;

    // Runtime log level on a proxy's admin port.
    let admin = mesh.client_proxy.admin;
    let (status, _) = post_text(admin, "/log-level", "debug").await;
    assert_eq!(status, 200);
    let r = client.get(admin, "admin", "/log-level", &[]).await.unwrap();
    assert_eq!(r.text().trim(), "debug");
    let (status, body) = post_text(admin, "/log-level", "info,[[").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid log filter"), "{body}");
}

async fn post_text(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let r = HttpClient::http1()
        .send(
            http::Method::POST,
            addr,
            "admin",
            path,
            &[],
            body.to_owned(),
        )
        .await
        .unwrap();
    (r.status.as_u16(), r.text())
}

async fn scrape_cp(admin: SocketAddr) -> prometheus_parse::Scrape {
    // The control plane's /metrics is the same format; reuse the strict scrape.
    scrape(admin).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_turns_ready_off_and_stops_accepting() {
    let dir = tempfile::tempdir().unwrap();
    let app = VersionApp::start("v1").await;
    let proxy = Proxy::start(
        dir.path(),
        "proxy",
        ProxyOpts {
            config_yaml: Some(one_service(app.addr)),
            ..ProxyOpts::default()
        },
    )
    .await;
    let client = HttpClient::http1();
    assert_eq!(
        client
            .get(proxy.outbound, "reviews", "/", &[])
            .await
            .unwrap()
            .status,
        200
    );
    let (status, _) = post_text(proxy.admin, "/drain", "").await;
    assert_eq!(status, 200);
    let r = client
        .get(proxy.admin, "admin", "/ready", &[])
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text().trim()),
        (503, "not ready: draining")
    );
    eventually(
        Duration::from_secs(5),
        "the outbound listener to close",
        || async {
            tokio::net::TcpStream::connect(proxy.outbound)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    // The admin port stays up for scraping.
    assert_eq!(
        client
            .get(proxy.admin, "admin", "/live", &[])
            .await
            .unwrap()
            .status,
        200
    );
}

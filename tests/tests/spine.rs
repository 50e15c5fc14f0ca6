//! End-to-end acceptance of the mesh spine: real `weft-control` and `weft-proxy` processes on
//! loopback, real upstream apps, traffic through the proxy's outbound listener.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use tempfile::TempDir;
use weft_tests::mesh::{self, SidecarMesh, Split, two_versions};
use weft_tests::{
    ControlPlane, ControlPlaneOpts, GrpcApp, HttpClient, Proxy, ProxyOpts, VersionApp,
    control_and_proxy, eventually,
};

/// Two app versions, a control plane whose route splits `w1`/`w2`, and one client-side proxy.
struct Mesh {
    dir: TempDir,
    client: HttpClient,
    v1: VersionApp,
    v2: VersionApp,
    cp: ControlPlane,
    proxy: Proxy,
}

async fn mesh(w1: u32, w2: u32, cp_opts: ControlPlaneOpts, proxy_args: &[&str]) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2) = (VersionApp::start("v1").await, VersionApp::start("v2").await);
    let cp = ControlPlane::start(
        dir.path(),
        "control",
        &two_versions("reviews", v1.addr, v2.addr, w1, w2),
        cp_opts,
    )
    .await;
    let proxy = Proxy::start(
        dir.path(),
        "client-proxy",
        ProxyOpts {
            control_plane: Some(cp.grpc),
            service: "productpage".into(),
            extra_args: proxy_args.iter().map(|s| (*s).to_owned()).collect(),
            ..ProxyOpts::default()
        },
    )
    .await;
    Mesh {
        dir,
        client: HttpClient::http1(),
        v1,
        v2,
        cp,
        proxy,
    }
}

impl Mesh {
    async fn drive(&self, n: u64, headers: &[(&str, &str)]) -> Split {
        mesh::drive(&self.client, self.proxy.outbound, "reviews", headers, n, 8).await
    }
}

fn assert_no_failures(split: &Split) {
    assert_eq!(split.failed, 0, "failed requests: {:?}", split.failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_follows_weights() {
    let m = mesh(90, 10, ControlPlaneOpts::default(), &[]).await;
    let split = m.drive(2000, &[]).await;
    assert_no_failures(&split);
    assert_eq!(split.total(), 2000);
    let v2 = split.percent("v2");
    assert!(
        (7.0..=13.0).contains(&v2),
        "v2 share {v2:.1}% is not 10 ± 3 ({split:?})"
    );
    assert_eq!(
        m.v1.hits() + m.v2.hits(),
        2000,
        "every request reached exactly one app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_shift_reaches_the_proxy_within_a_second() {
    // Full chain: client proxy → inbound sidecar of each version → app.
    let dir = tempfile::tempdir().unwrap();
    let SidecarMesh {
        apps: [app1, _app2],
        cp,
        sidecars: _sidecars,
        client_proxy,
    } = SidecarMesh::start(dir.path(), 100, 0).await;
    let client = HttpClient::http1();

    let before = mesh::drive(&client, client_proxy.outbound, "reviews", &[], 100, 4).await;
    assert_no_failures(&before);
    assert_eq!(before.by_version.get("v1"), Some(&100), "{before:?}");
    assert_eq!(
        app1.hits(),
        100,
        "requests went through the v1 sidecar to the v1 app"
    );

    let start = Instant::now();
    let version = cp.set_weights("reviews", &[("v1", 0), ("v2", 100)]).await;
    eventually(
        Duration::from_secs(1),
        "the proxy to apply the new weights",
        || async { (client_proxy.version().await == version).then_some(()) },
    )
    .await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");

    let after = mesh::drive(&client, client_proxy.outbound, "reviews", &[], 100, 4).await;
    assert_no_failures(&after);
    assert_eq!(after.by_version.get("v2"), Some(&100), "{after:?}");

    // The control plane's view agrees: every proxy (three) ACKed the current version.
    cp.wait_acked(version, 3, Duration::from_secs(2)).await;
    let status = cp.status().await;
    assert_eq!(status["version"].as_u64(), Some(version));
    let me = status["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node_id"] == "productpage-sidecar")
        .unwrap();
    assert_eq!(me["acked_version"].as_u64(), Some(version));
    let v1_sidecar = status["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node_id"] == "reviews-v1-sidecar")
        .unwrap();
    assert_eq!(
        v1_sidecar["labels"]["version"], "v1",
        "node identity is registered: {v1_sidecar}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_across_twenty_pushes() {
    let m = Arc::new(mesh(100, 0, ControlPlaneOpts::default(), &[]).await);
    let stop = Arc::new(AtomicBool::new(false));
    let mut drivers = Vec::new();
    for _ in 0..4 {
        let (m, stop) = (m.clone(), stop.clone());
        drivers.push(tokio::spawn(async move {
            let mut split = Split::default();
            let deadline = Instant::now() + Duration::from_secs(60);
            // Bounded in count and time whatever happens to the pushes.
            while !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline
                && split.total() < 200_000
            {
                mesh::record(
                    &mut split,
                    m.client.get(m.proxy.outbound, "reviews", "/", &[]).await,
                );
            }
            split
        }));
    }
    let weights = [(100, 0), (50, 50), (0, 100), (10, 90), (90, 10)];
    let mut last = 0;
    for i in 0..20 {
        let (w1, w2) = weights[i % weights.len()];
        last = m.cp.set_weights("reviews", &[("v1", w1), ("v2", w2)]).await;
        // Each push is in force while the traffic runs.
        eventually(
            Duration::from_secs(5),
            "the proxy to apply a push",
            || async { (m.proxy.version().await == last).then_some(()) },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = Split::default();
    for d in drivers {
        total.merge(d.await.unwrap());
    }
    assert_no_failures(&total);
    assert!(total.total() >= 100, "the load ran: {total:?}");
    assert!(
        total.by_version.contains_key("v1") && total.by_version.contains_key("v2"),
        "{total:?}"
    );
    m.cp.wait_acked(last, 1, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_survives_control_plane_death_and_reconverges() {
    let state = tempfile::tempdir().unwrap();
    let opts = ControlPlaneOpts {
        state_dir: Some(state.path().to_owned()),
        ..ControlPlaneOpts::default()
    };
    let mut m = mesh(100, 0, opts.clone(), &[]).await;
    let v0 = m.cp.version().await;
    m.cp.proc.kill();

    eventually(
        Duration::from_secs(5),
        "the proxy to notice the control plane is gone",
        || async { (m.proxy.config().await["control_plane"]["connected"] == false).then_some(()) },
    )
    .await;
    let alone = m.drive(200, &[]).await;
    assert_no_failures(&alone);
    assert_eq!(
        alone.by_version.get("v1"),
        Some(&200),
        "last config still routes: {alone:?}"
    );
    let ready = m
        .client
        .get(m.proxy.admin, "admin", "/ready", &[])
        .await
        .unwrap();
    assert!(
        ready.status.is_success(),
        "still ready without a control plane"
    );
    assert_eq!(m.proxy.version().await, v0);

    // Same addresses and state: the proxy finds it again by itself.
    let restart = ControlPlaneOpts {
        grpc_addr: Some(m.cp.grpc),
        admin_addr: Some(m.cp.admin),
        ..opts
    };
    m.cp = ControlPlane::start(m.dir.path(), "control", "", restart).await;
    assert!(m.cp.version().await >= v0, "versions never go backwards");
    let version = m.cp.set_weights("reviews", &[("v1", 0), ("v2", 100)]).await;
    eventually(
        Duration::from_secs(20),
        "the proxy to reconnect and converge",
        || async { (m.proxy.version().await == version).then_some(()) },
    )
    .await;
    let after = m.drive(100, &[]).await;
    assert_no_failures(&after);
    assert_eq!(after.by_version.get("v2"), Some(&100), "{after:?}");
    m.cp.wait_acked(version, 1, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_is_refused_and_a_nack_keeps_the_old_one() {
    // This proxy affords less regex than the control plane allows, so it will NACK.
    let m = mesh(
        100,
        0,
        ControlPlaneOpts::default(),
        &["--regex-size-limit", "4096"],
    )
    .await;
    let v0 = m.cp.version().await;
    let good = two_versions("reviews", m.v1.addr, m.v2.addr, 100, 0);

    let unknown_backend = good.replace(
        "{service: reviews, subset: v2}]",
        "{service: ratings, subset: v2}]",
    );
    let (status, body) = m.cp.apply(&unknown_backend).await;
    assert_eq!(status, 400, "{body}");
    let err = body["error"].as_str().unwrap();
    assert!(
        err.contains("unknown backend service \"ratings\"") && err.contains(":17:"),
        "{err}"
    );

    let bad_regex = good.replace("exact: beta", "regex: \"(beta\"");
    let (status, body) = m.cp.apply(&bad_regex).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("invalid regex"),
        "{body}"
    );

    let (status, body) = HttpClient::http1()
        .post_json(
            m.cp.admin,
            "/api/v1/routes/reviews/weights",
            &serde_json::json!({"weights": {"v1": 0, "v2": 0}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("sum to 0"),
        "{body}"
    );
    assert_eq!(
        m.cp.version().await,
        v0,
        "refused changes do not bump the version"
    );

    // Valid for the control plane, too costly for this proxy: NACKed, never applied.
    let costly = two_versions("reviews", m.v1.addr, m.v2.addr, 0, 100)
        .replace("exact: beta", "regex: \"[a-z]{300}\"");
    let (status, body) = m.cp.apply(&costly).await;
    assert!(status.is_success(), "{body}");
    let rejected = body["version"].as_u64().unwrap();
    assert!(rejected > v0);
    let nack = eventually(
        Duration::from_secs(5),
        "the proxy's NACK to reach the control plane",
        || async {
            let status = m.cp.status().await;
            let p = status["proxies"]
                .as_array()?
                .iter()
                .find(|p| p["node_id"] == "client-proxy")?
                .clone();
            (p["last_nack"]["version"].as_u64() == Some(rejected)).then_some(p)
        },
    )
    .await;
    assert!(
        nack["last_nack"]["error"]
            .as_str()
            .unwrap()
            .contains("limit"),
        "{nack}"
    );
    assert_eq!(
        nack["acked_version"].as_u64(),
        Some(v0),
        "a NACKed version is never counted as applied"
    );
    let cfg = m.proxy.config().await;
    assert_eq!(cfg["version"].as_u64(), Some(v0), "{cfg}");
    assert_eq!(
        cfg["last_nack"]["version"].as_u64(),
        Some(rejected),
        "{cfg}"
    );
    // Still routing with the old config (all v1; the rejected one sent everything to v2).
    let split = m.drive(50, &[]).await;
    assert_no_failures(&split);
    assert_eq!(split.by_version.get("v1"), Some(&50), "{split:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_grpc_pass_through_with_trailers() {
    use tonic::transport::Endpoint;
    use weft_tests::apps::echo::{EchoRequest, echo_client::EchoClient};

    let dir = tempfile::tempdir().unwrap();
    let grpc = GrpcApp::start("echo-1").await;
    let web = VersionApp::start("v1").await;
    let yaml = format!(
        r#"
services:
  - {{name: echo, protocol: grpc, endpoints: [{{address: "{}"}}]}}
  - {{name: web, endpoints: [{{address: "{}", labels: {{version: v1}}}}]}}
routes:
  - {{name: echo, hosts: [echo], rules: [{{backends: [{{service: echo}}]}}]}}
  - {{name: web, hosts: [web], rules: [{{backends: [{{service: web}}]}}]}}
"#,
        grpc.addr, web.addr
    );
    let cp = ControlPlane::start(dir.path(), "control", &yaml, ControlPlaneOpts::default()).await;
    let proxy = Proxy::start(
        dir.path(),
        "client-proxy",
        ProxyOpts {
            control_plane: Some(cp.grpc),
            ..ProxyOpts::default()
        },
    )
    .await;

    // Plain HTTP/2 (h2c) in, HTTP/2 out (protocol auto follows the downstream).
    let reply = weft_tests::http::h2_get(proxy.outbound, "web", "/")
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.version, http::Version::HTTP_2);
    assert_eq!(reply.header("x-seen-http-version"), Some("HTTP/2.0"));
    assert_eq!(
        reply.header("x-seen-host"),
        Some("web"),
        "the app sees the authority the client used"
    );

    let channel = Endpoint::from_shared(format!("http://{}", proxy.outbound))
        .unwrap()
        .origin("http://echo".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut echo = EchoClient::new(channel);

    let reply = echo
        .unary(EchoRequest {
            message: "hi".into(),
            count: 0,
            fail_with: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.message.as_str(), reply.served_by.as_str()),
        ("hi", "echo-1")
    );

    let err = echo
        .unary(EchoRequest {
            message: "x".into(),
            count: 0,
            fail_with: tonic::Code::NotFound as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("failed as asked"), "{err:?}");

    let mut stream = echo
        .server_stream(EchoRequest {
            message: "s".into(),
            count: 5,
            fail_with: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(item) = stream.message().await.unwrap() {
        seen.push(item.index);
    }
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);

    // Status and custom metadata after messages travel in real trailers.
    let mut stream = echo
        .server_stream(EchoRequest {
            message: "t".into(),
            count: 3,
            fail_with: tonic::Code::Aborted as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("the stream ended without its status"),
            Err(e) => break e,
        }
    };
    assert_eq!(n, 3);
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert_eq!(
        err.metadata()
            .get("x-trailer")
            .and_then(|v| v.to_str().ok()),
        Some("kept")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rule_sends_beta_users_to_v2() {
    let m = mesh(100, 0, ControlPlaneOpts::default(), &[]).await;
    let beta = m.drive(100, &[("x-user-group", "beta")]).await;
    assert_no_failures(&beta);
    assert_eq!(beta.by_version.get("v2"), Some(&100), "{beta:?}");
    let others = m.drive(100, &[("x-user-group", "alpha")]).await;
    assert_no_failures(&others);
    assert_eq!(others.by_version.get("v1"), Some(&100), "{others:?}");
    let plain = m.drive(100, &[]).await;
    assert_eq!(plain.by_version.get("v1"), Some(&100), "{plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_errors_name_their_reason() {
    let m = mesh(100, 0, ControlPlaneOpts::default(), &[]).await;
    let reply = m
        .client
        .get(m.proxy.outbound, "nowhere", "/x", &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 404);
    assert_eq!(reply.header("x-weft-reason"), Some("no_route"));
    assert!(reply.text().contains("nowhere"), "{}", reply.text());

    // Point v1 at a port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (status, body) =
        m.cp.apply(&two_versions("reviews", dead, m.v2.addr, 100, 0))
            .await;
    assert!(status.is_success(), "{body}");
    let v = body["version"].as_u64().unwrap();
    eventually(Duration::from_secs(5), "the proxy to apply", || async {
        (m.proxy.version().await == v).then_some(())
    })
    .await;
    let reply = m
        .client
        .get(m.proxy.outbound, "reviews", "/", &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(
        reply.header("x-weft-reason"),
        Some("upstream_connect_failed")
    );
    assert!(
        reply.text().contains(&dead.to_string()),
        "names the endpoint: {}",
        reply.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_streams_converge_on_every_push() {
    let dir = tempfile::tempdir().unwrap();
    let report = weft_tests::scale::run(dir.path(), 300, 5, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        report.convergence_ms.len(),
        5,
        "every push reached every stream"
    );
}

/// An app that answers with what it received: every value of every field, the path and
/// query, as JSON.
async fn echo_app() -> weft_tests::identity::HeaderApp {
    weft_tests::identity::HeaderApp::serve(|req| {
        let mut seen = serde_json::Map::new();
        for name in req.headers().keys() {
            let values: Vec<_> = req
                .headers()
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap_or("?").to_owned())
                .collect();
            seen.insert(name.as_str().to_owned(), values.into());
        }
        seen.insert("uri".into(), req.uri().to_string().into());
        seen.insert("method".into(), req.method().as_str().into());
        serde_json::Value::Object(seen).to_string()
    })
    .await
}

/// A mesh whose one route sends `reviews` to `app` under `rule` (YAML lines of the rule, after
/// its backends).
fn one_rule(app: std::net::SocketAddr, rule: &str) -> String {
    format!(
        r#"services:
  - name: reviews
    endpoints: [{{address: "{app}"}}]
routes:
  - name: reviews
    hosts: [reviews]
    rules:
      - backends: [{{service: reviews}}]
{rule}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_edits_apply_to_the_request_and_the_upstreams_response() {
    let dir = tempfile::tempdir().unwrap();
    let app = echo_app().await;
    let yaml = |headers: &str| one_rule(app.addr, &format!("        headers: {headers}"));
    let edits = "{request: {set: {X-Env: prod}, add: {x-via: weft}, remove: [x-debug]}, \
                 response: {set: {x-served-by: weft}, remove: [content-type]}}";
    let (cp, proxy) = control_and_proxy(dir.path(), &yaml(edits)).await;
    let http = HttpClient::http1();
    let r = http
        .get(
            proxy.outbound,
            "reviews",
            "/",
            &[("x-debug", "1"), ("x-env", "dev"), ("x-via", "client")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert!(seen.get("x-debug").is_none(), "removed: {seen}");
    assert_eq!(seen["x-env"], serde_json::json!(["prod"]), "set: {seen}");
    assert_eq!(
        seen["x-via"],
        serde_json::json!(["client", "weft"]),
        "added: {seen}"
    );
    assert_eq!(r.header("x-served-by"), Some("weft"));
    assert_eq!(r.header("content-type"), None, "removed from the response");

    // A rule may not forge the identity header a sidecar vouches for: refused, and named.
    let (status, body) = cp
        .apply(&yaml(
            "{request: {set: {x-weft-peer-identity: spiffe://weft.local/ns/default/sa/admin}}}",
        ))
        .await;
    assert!(status.is_client_error(), "{status} {body}");
    let text = body.to_string();
    assert!(
        text.contains("routes[0].rules[0].headers.request.set.x-weft-peer-identity")
            && text.contains("x-weft-* fields are the mesh's own"),
        "{text}"
    );
    // The running edits stay.
    let again = http.get(proxy.outbound, "reviews", "/", &[]).await.unwrap();
    assert_eq!(again.header("x-served-by"), Some("weft"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_that_answer_themselves_redirect_and_respond_without_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let app = echo_app().await;
    let mesh = |answers: &str| {
        format!(
            r#"services:
  - name: reviews
    endpoints: [{{address: "{}"}}]
routes:
  - name: reviews
    hosts: [reviews]
    rules:
{answers}
      - backends: [{{service: reviews}}]
"#,
            app.addr
        )
    };
    let answers = "      - match: {path: {prefix: /old}}
        redirect: {prefix: /new, code: 308}
      - match: {path: {prefix: /secure}}
        redirect: {scheme: https}
      - match: {path: {prefix: /admin}}
        direct_response: {status: 403, body: \"admin is not served here\\n\"}
        headers: {response: {set: {x-served-by: weft}}}";
    let (cp, proxy) = control_and_proxy(dir.path(), &mesh(answers)).await;
    let http = HttpClient::http1();
    let get = |host: &'static str, path: &'static str| http.get(proxy.outbound, host, path, &[]);
    let r = get("reviews:9080", "/old/books?id=7").await.unwrap();
    assert_eq!(r.status, 308, "{}", r.text());
    assert_eq!(
        r.header("location"),
        Some("http://reviews:9080/new/books?id=7")
    );
    assert!(r.body.is_empty());
    let r = get("reviews:9080", "/secure/login").await.unwrap();
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://reviews/secure/login"));
    let r = get("reviews", "/admin/users").await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "admin is not served here\n");
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(
        r.header("x-served-by"),
        Some("weft"),
        "response edits apply"
    );
    assert_eq!(
        r.header("x-weft-error"),
        None,
        "an answer, not a proxy error"
    );
    // Everything else still reaches the app.
    let r = get("reviews", "/other").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["uri"], "/other");
    // Answers are counted under their route, without a service.
    let m = weft_tests::observe::scrape(proxy.admin).await;
    let count = |code: &str| {
        weft_tests::observe::value(
            &m,
            "weft_proxy_requests_total",
            &[("route", "reviews"), ("service", ""), ("code", code)],
        )
    };
    assert_eq!((count("308"), count("301"), count("403")), (1.0, 1.0, 1.0));

    // A redirect that also forwards is refused, and named; the running answers stay.
    let (status, body) = cp
        .apply(&mesh(
            "      - redirect: {path: /x}\n        backends: [{service: reviews}]",
        ))
        .await;
    assert!(status.is_client_error(), "{status} {body}");
    let text = body.to_string();
    assert!(
        text.contains("routes[0].rules[0].backends")
            && text.contains("answers itself and has no upstream"),
        "{text}"
    );
    let again = get("reviews", "/admin").await.unwrap();
    assert_eq!(again.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_allowed_preflights_and_marks_every_response_to_the_origin() {
    let dir = tempfile::tempdir().unwrap();
    let app = echo_app().await;
    // An address nothing listens on: the proxy's own error answer for /down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mesh = |methods: &str| {
        format!(
            r#"services:
  - name: reviews
    endpoints: [{{address: "{}"}}]
  - name: down
    endpoints: [{{address: "{closed}"}}]
routes:
  - name: reviews
    hosts: [reviews]
    rules:
      - match: {{path: {{prefix: /api}}}}
        backends: [{{service: reviews}}]
        cors: &cors
          allow_origins: [{{exact: "https://shop.example"}}, {{regex: "https://[a-z]+\\.shop\\.example"}}]
          allow_methods: {methods}
          allow_headers: [content-type, x-user]
          expose_headers: [x-request-id]
          max_age: 10m
          allow_credentials: true
      - match: {{path: {{prefix: /down}}}}
        backends: [{{service: down}}]
        cors: *cors
      - backends: [{{service: reviews}}]
"#,
            app.addr
        )
    };
    let (cp, proxy) = control_and_proxy(dir.path(), &mesh("[GET, PUT]")).await;
    let http = HttpClient::http1();
    let send = |method: Method, path: &'static str, headers: Vec<(&'static str, &'static str)>| {
        let http = &http;
        let addr = proxy.outbound;
        async move {
            http.send(method, addr, "reviews", path, &headers, "")
                .await
                .unwrap()
        }
    };
    let preflight = |origin: &'static str| {
        send(
            Method::OPTIONS,
            "/api/cart",
            vec![
                ("origin", origin),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "x-user"),
            ],
        )
    };

    // An allowed origin's preflight is answered by the proxy.
    let r = preflight("https://eu.shop.example").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty(), "not the app's: {}", r.text());
    for (name, value) in [
        ("access-control-allow-origin", "https://eu.shop.example"),
        ("access-control-allow-methods", "GET, PUT"),
        ("access-control-allow-headers", "content-type, x-user"),
        ("access-control-max-age", "600"),
        ("access-control-allow-credentials", "true"),
        ("vary", "origin"),
    ] {
        assert_eq!(r.header(name), Some(value), "{name}");
    }
    // Another origin's preflight goes to the app, unmarked.
    let r = preflight("https://evil.example").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["method"], "OPTIONS", "forwarded");
    assert_eq!(r.header("access-control-allow-origin"), None);

    // The allowed origin's requests are forwarded and their responses marked.
    let r = send(
        Method::PUT,
        "/api/cart",
        vec![("origin", "https://shop.example")],
    )
    .await;
    assert_eq!(r.json()["method"], "PUT");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://shop.example")
    );
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("x-request-id")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    // Not for requests without that origin, nor on rules without a policy.
    for (path, headers) in [
        ("/api/cart", vec![]),
        ("/api/cart", vec![("origin", "https://shop.example.evil")]),
        ("/other", vec![("origin", "https://shop.example")]),
    ] {
        let r = send(Method::GET, path, headers.clone()).await;
        assert_eq!(r.status, 200, "{path} {headers:?}");
        assert_eq!(
            r.header("access-control-allow-origin"),
            None,
            "{path} {headers:?}"
        );
    }
    // The proxy's own error reaches the page readable, so it sees the 503 and not a "CORS error".
    let r = send(
        Method::GET,
        "/down",
        vec![("origin", "https://shop.example")],
    )
    .await;
    assert!(r.status.is_server_error(), "{}", r.status);
    assert!(r.header("x-weft-reason").is_some(), "the proxy's answer");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://shop.example")
    );
    // Answered preflights are counted under the route, without a service.
    let m = weft_tests::observe::scrape(proxy.admin).await;
    let answered = weft_tests::observe::value(
        &m,
        "weft_proxy_requests_total",
        &[("route", "reviews"), ("service", ""), ("code", "200")],
    );
    assert_eq!(answered, 1.0);

    // A bad policy is refused by path; the running one stays.
    let (status, body) = cp.apply(&mesh("[put]")).await;
    assert!(status.is_client_error(), "{status} {body}");
    let text = body.to_string();
    assert!(
        text.contains("routes[0].rules[0].cors.allow_methods[0]")
            && text.contains("is not a method: use upper case"),
        "{text}"
    );
    let r = preflight("https://shop.example").await;
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, PUT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_changes_the_path_and_host_the_upstream_sees() {
    let dir = tempfile::tempdir().unwrap();
    let app = echo_app().await;
    let rules = "        match: {path: {prefix: /api}}
        rewrite: {prefix: /v1, host: reviews-internal}
      - backends: [{service: reviews}]
        rewrite: {path: /fallback}";
    let (_cp, proxy) = control_and_proxy(dir.path(), &one_rule(app.addr, rules)).await;
    let http = HttpClient::http1();
    for (path, uri, host) in [
        ("/api/books?id=7", "/v1/books?id=7", "reviews-internal"),
        ("/api", "/v1", "reviews-internal"),
        ("/other?x=y", "/fallback?x=y", "reviews"),
    ] {
        let r = http
            .get(proxy.outbound, "reviews", path, &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let seen = r.json();
        assert_eq!(seen["uri"], uri, "{path}: {seen}");
        assert_eq!(seen["host"], serde_json::json!([host]), "{path}: {seen}");
    }
}

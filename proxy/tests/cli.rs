//! Integration tests of the real `weft-proxy` binary on loopback: configuration errors, routing
//! over HTTP/1.1 and h2c to a real upstream, the proxy's own error responses, and shutdown.

mod common;

use std::process::Command;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::Full;
use tokio::net::TcpListener;

#[test]
fn invalid_config_exits_2_with_file_and_line() {
    let dir = TempDir::new();
    let cases = [
        // Semantic: an unknown backend service, on line 6.
        (
            "services: []\nroutes:\n  - name: r\n    hosts: [a]\n    rules:\n      - backends: [{service: nope}]\n",
            ":6",
            "unknown backend service \"nope\"",
        ),
        // Syntax: an unknown field, on line 3.
        ("routes:\n  - name: r\n    hostz: [a]\n", ":3", "hostz"),
    ];
    for (yaml, line, reason) in cases {
        let path = dir.path("mesh.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = proxy_command()
            .args(["--config", path.to_str().unwrap()])
            .args([
                "--outbound-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        let located = format!("{}{line}", path.display());
        assert!(stderr.contains(&located), "want {located:?} in {stderr}");
        assert!(stderr.contains(reason), "want {reason:?} in {stderr}");
    }

    let out = proxy_command().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--control-plane"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_http1_and_h2c_and_reports_its_own_errors() {
    let echo = start_echo().await;
    // A port nothing listens on: bind, note it, close.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();

    let dir = TempDir::new();
    let config = dir.path("mesh.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
services:
  - {{name: echo, protocol: http1, endpoints: [{{address: "{echo}"}}]}}
  - {{name: echo2, protocol: http2, endpoints: [{{address: "{echo}"}}]}}
  - {{name: dead, endpoints: [{{address: "{dead}"}}]}}
routes:
  - name: echo
    hosts: [echo.local]
    rules:
      - {{match: {{path: {{prefix: /h2/}}}}, backends: [{{service: echo2}}]}}
      - backends: [{{service: echo}}]
  - name: dead
    hosts: [dead.local]
    rules: [{{backends: [{{service: dead}}]}}]
"#
        ),
    )
    .unwrap();
    let addr_file = dir.path("addrs.json");
    let mut proxy = spawn_proxy(&[
        "--config",
        config.to_str().unwrap(),
        "--outbound-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--addr-file",
        addr_file.to_str().unwrap(),
        "--app-addr",
        &echo.to_string(),
        "--inbound-addr",
        "127.0.0.1:0",
        "--log",
        "warn",
    ]);
    let addrs = wait_for_addrs(&addr_file).await;
    let (outbound, admin) = (addr(&addrs, "outbound"), addr(&addrs, "admin"));
    let inbound = addr(&addrs, "inbound");
    poll("/ready", async || {
        (admin_get(admin, "/ready").await.status == StatusCode::OK).then_some(())
    })
    .await;

    // HTTP/1.1 in, HTTP/1.1 out; Host kept.
    let r = send(
        outbound,
        Version::HTTP_11,
        get("Echo.Local:15001", "/hello"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, "HTTP/1.1 GET /hello host=Echo.Local:15001 body=");

    // h2c in, HTTP/1.1 out (the service says http1); the authority travels as Host.
    let req = Request::get("http://echo.local/hello")
        .version(Version::HTTP_2)
        .body(Full::default())
        .unwrap();
    let r = send(outbound, Version::HTTP_2, req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, "HTTP/1.1 GET /hello host=echo.local body=");

    // h2c in, h2c out, request body streamed up and response trailers streamed back.
    let req = Request::post("http://echo.local/h2/call")
        .version(Version::HTTP_2)
        .header("x-want-trailers", "1")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"ping")))
        .unwrap();
    let r = send(outbound, Version::HTTP_2, req).await;
    assert_eq!(r.body, "HTTP/2.0 POST /h2/call host=echo.local body=ping");
    assert_eq!(r.trailers.unwrap()["grpc-status"], "0");

    // HTTP/1.1 in, h2c out.
    let req = Request::post("/h2/up")
        .header("host", "echo.local")
        .body(Full::new(Bytes::from_static(b"hi")))
        .unwrap();
    let r = send(outbound, Version::HTTP_11, req).await;
    assert_eq!(r.body, "HTTP/2.0 POST /h2/up host=echo.local body=hi");

    // Inbound: everything goes to the app, whatever the host, in the downstream's protocol.
    let r = send(inbound, Version::HTTP_11, get("anything", "/in")).await;
    assert_eq!(r.body, "HTTP/1.1 GET /in host=anything body=");
    let req = Request::get("http://other/in2")
        .version(Version::HTTP_2)
        .body(Full::default())
        .unwrap();
    let r = send(inbound, Version::HTTP_2, req).await;
    assert_eq!(r.body, "HTTP/2.0 GET /in2 host=other body=");

    // The proxy's own errors.
    let r = send(outbound, Version::HTTP_11, get("nope.local", "/x")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.headers["x-weft-reason"], "no_route");
    assert!(
        r.body
            .contains("no route for host \"nope.local\" path \"/x\""),
        "{}",
        r.body
    );

    let r = send(outbound, Version::HTTP_11, get("dead.local", "/")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.headers["x-weft-reason"], "upstream_connect_failed");
    assert!(r.body.contains(&dead.to_string()), "{}", r.body);
    assert!(r.body.to_lowercase().contains("refused"), "{}", r.body);

    // gRPC callers get a trailers-only answer.
    let req = Request::post("http://nope.local/pkg.Svc/Call")
        .version(Version::HTTP_2)
        .header("content-type", "application/grpc")
        .body(Full::default())
        .unwrap();
    let r = send(outbound, Version::HTTP_2, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["grpc-status"], "12");

    // Admin: the config came from the file, as version 1.
    let r = admin_get(admin, "/config").await;
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (v["version"].as_u64(), v["source"].as_str()),
        (Some(1), Some("file"))
    );
    assert_eq!(v["config"]["routes"][0]["name"], "dead");

    // SIGTERM: a clean exit.
    let pid = proxy.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = poll("exit after SIGTERM", async || proxy.0.try_wait().unwrap()).await;
    assert!(status.success(), "{status}");
}

//! The admin JSON API over real sockets, through `weftctl`'s client and raw HTTP for
//! malformed requests.

mod common;

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use weft_control::api;
use weft_control::client::{AdminClient, ClientError};
use weft_control::source::EMBEDDED_MESH;

use common::start;

/// Sends one raw HTTP/1.1 request; returns the status code and the body.
async fn raw(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1;
    (
        code,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn server_error(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Server { status, message } => (status.as_u16(), message),
        other => panic!("expected a server error, got {other}"),
    }
}

#[tokio::test]
async fn reads_and_mutations() {
    let cp = start().await;
    let client = AdminClient::new(&format!("http://{}", cp.admin)).unwrap();

    let status = client.status().await.unwrap();
    assert_eq!((status.version, status.source.as_str()), (1, "embedded"));
    assert!(status.proxies.is_empty() && status.last_source_error.is_none());
    let raw_status = client.status_json().await.unwrap();
    assert!(raw_status["last_source_error"].is_null());

    let routes = client.routes().await.unwrap();
    assert_eq!(routes.routes[0].name, "reviews");
    assert_eq!(
        client.config().await.unwrap().config.services[0].name,
        "reviews"
    );

    let req = api::SetWeightsRequest {
        weights: [("v1".to_owned(), 90), ("v2".to_owned(), 10)].into(),
        rule: None,
    };
    let resp = client.set_weights("reviews", &req).await.unwrap();
    assert_eq!(
        (resp.version, resp.route.as_str(), resp.rule),
        (2, "reviews", 1)
    );

    // Unknown route → 404; impossible split → 400; both with the reason.
    let (code, msg) = server_error(client.set_weights("nope", &req).await.unwrap_err());
    assert_eq!(code, 404);
    assert!(msg.contains("nope"), "{msg}");
    let bad = api::SetWeightsRequest {
        weights: [("v1".to_owned(), 0)].into(),
        rule: Some(1),
    };
    let (code, msg) = server_error(client.set_weights("reviews", &bad).await.unwrap_err());
    assert_eq!(code, 400);
    assert!(msg.contains("sum to 0"), "{msg}");

    // apply: a new config, the same config again, an invalid one (with apply:line).
    let edited = EMBEDDED_MESH.replace("weight: 100", "weight: 75");
    let a = client.apply(edited.clone()).await.unwrap();
    assert_eq!((a.version, a.unchanged), (3, false));
    let a = client.apply(edited).await.unwrap();
    assert_eq!((a.version, a.unchanged), (3, true));
    let broken = EMBEDDED_MESH.replace("subset: v2}", "subset: v7}");
    let line = broken.lines().position(|l| l.contains("v7")).unwrap() + 1;
    let (code, msg) = server_error(client.apply(broken).await.unwrap_err());
    assert_eq!(code, 400);
    assert!(msg.contains(&format!("apply:{line}:")), "{msg}");
    assert_eq!(client.status().await.unwrap().version, 3);
    cp.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let cp = start().await;
    let weights = "/api/v1/routes/reviews/weights";
    let (code, body) = raw(cp.admin, "POST", weights, "{not json").await;
    assert_eq!(code, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("invalid request body"),
        "{body}"
    );
    let (code, body) = raw(cp.admin, "POST", weights, r#"{"weight": {"v1": 1}}"#).await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("weight"), "{body}");
    let (code, body) = raw(cp.admin, "POST", "/api/v1/apply", "services: [").await;
    assert_eq!(code, 400);
    assert!(
        body["error"].as_str().unwrap().starts_with("apply:"),
        "{body}"
    );
    let (code, body) = raw(cp.admin, "GET", "/api/v2/nothing", "").await;
    assert_eq!(code, 404);
    assert!(
        body["error"].as_str().unwrap().contains("/api/v2/nothing"),
        "{body}"
    );
    let (code, _) = raw(cp.admin, "DELETE", "/api/v1/status", "").await;
    assert_eq!(code, 405);
    for health in ["/ready", "/live"] {
        assert_eq!(raw(cp.admin, "GET", health, "").await.0, 200);
    }
    assert_eq!(cp.registry.current().version, 1, "nothing changed");
    cp.stop().await;
}

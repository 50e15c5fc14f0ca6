//! The sidecar injector over real HTTPS: a control plane in-process with its webhook listener
//! on 127.0.0.1:0, a TLS client that verifies the serving certificate against the control
//! plane's CA bundle (or against the operator's own certificate), golden pods injected through
//! AdmissionReview JSON, and malformed input answered with clear errors.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use weft_control::inject::InjectConfig;
use weft_control::server::Options;
use weft_control::webhook::{WebhookOptions, default_hosts};

fn webhook_opts() -> WebhookOptions {
    WebhookOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        cert: None,
        key: None,
        hosts: default_hosts(),
        inject: InjectConfig::default(),
    }
}

/// One HTTP/1.1 request over TLS to `addr`, verifying the server as `name` against `roots_pem`.
async fn https(
    addr: SocketAddr,
    name: &str,
    roots_pem: &str,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Ok((status, String::from_utf8(body.to_vec()).unwrap()))
}

fn post(body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post("/inject")
        .header("host", "weft-control.weft-system.svc")
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

async fn bundle(admin: SocketAddr) -> String {
    let io = TokioIo::new(TcpStream::connect(admin).await.unwrap());
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/api/v1/identity/bundle")
        .header("host", "admin")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

fn read_yaml(path: &Path) -> Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test]
async fn the_injector_answers_admission_reviews_over_verified_https() {
    let cp = common::start_with(Options {
        webhook: Some(webhook_opts()),
        ..Options::default()
    })
    .await;
    let addr = cp.webhook.expect("the webhook listener is bound");
    let roots = bundle(cp.admin).await;
    let name = "weft-control.weft-system.svc";

    // A golden pod through the whole exchange: the returned patch applied to the input is
    // the expected pod.
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/inject");
    let pod = read_yaml(&data.join("plain.yaml"));
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "operation": "CREATE", "object": pod},
    });
    let (status, body) = https(addr, name, &roots, post(review.to_string()))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(
        answer["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    assert_eq!(out, read_yaml(&data.join("plain.golden.yaml")));

    // Malformed input: clear errors, and the endpoint keeps serving.
    let (status, body) = https(addr, name, &roots, post("{not json")).await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error: Value = serde_json::from_str(&body).unwrap();
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed AdmissionReview: "),
        "{body}"
    );
    let no_uid = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"object": {}}});
    let (status, body) = https(addr, name, &roots, post(no_uid.to_string()))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("request.uid is missing"), "{body}");
    let not_a_pod = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u1", "object": {"kind": "Pod", "spec": "nonsense"}}});
    let (status, body) = https(addr, name, &roots, post(not_a_pod.to_string()))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["uid"], "u1");
    if answer["response"]["allowed"] == false {
        assert!(
            answer["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("weft sidecar injection")
        );
    }
    let huge = vec![b' '; weft_control::webhook::MAX_BODY_BYTES + 1];
    let (status, body) = https(addr, name, &roots, post(huge)).await.unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let wrong = Request::get("/inject").body(Full::default()).unwrap();
    assert_eq!(
        https(addr, name, &roots, wrong).await.unwrap().0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let elsewhere = Request::post("/mutate").body(Full::default()).unwrap();
    let (status, body) = https(addr, name, &roots, elsewhere).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("POST /inject"), "{body}");

    // The certificate is only good for the names it was issued for.
    let err = https(addr, "evil.example", &roots, post("{}"))
        .await
        .unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    cp.stop().await;
}

#[tokio::test]
async fn the_operator_can_bring_the_serving_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["injector.test".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let cp = common::start_with(Options {
        webhook: Some(WebhookOptions {
            cert: Some(cert_path),
            key: Some(key_path.clone()),
            ..webhook_opts()
        }),
        ..Options::default()
    })
    .await;
    let (status, body) = https(
        cp.webhook.unwrap(),
        "injector.test",
        &cert.cert.pem(),
        post("[]"),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    cp.stop().await;

    // A key file that is not a key: the control plane refuses to start and says which file.
    std::fs::write(&key_path, "not a key").unwrap();
    let loaded = weft_control::source::Source::Embedded.load().unwrap();
    let opts = Options {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        webhook: Some(WebhookOptions {
            cert: Some(dir.path().join("tls.crt")),
            key: Some(key_path),
            ..webhook_opts()
        }),
        ..Options::default()
    };
    let err = weft_control::server::ControlPlane::bind(opts, loaded)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("tls.key") && err.contains("key"), "{err}");
}

//! End-to-end acceptance of zero-trust identity: the real control plane issues SPIFFE
//! certificates, real sidecars talk mTLS (rustls, TLS 1.3), peer authentication, certificate
//! rotation under load, CSR identity checks, authorization and JWT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use weft_proto::identity_pb::CertifyRequest;
use weft_proto::identity_pb::identity_service_client::IdentityServiceClient;
use weft_tests::identity::{
    ClientCert, HeaderApp, HttpsApp, identity_proxy, mesh_ca, reviews_mesh, tls_client, tls_get,
};
use weft_tests::{ControlPlane, ControlPlaneOpts, HttpClient, Proxy, eventually};

const REVIEWS_ID: &str = "spiffe://weft.local/ns/default/sa/reviews";
const PRODUCTPAGE_ID: &str = "spiffe://weft.local/ns/default/sa/productpage";
const DEADLINE: Duration = Duration::from_secs(20);

/// A control plane (state in `dir/state`), the `reviews` app behind an identity sidecar, and
/// the security YAML applied once the sidecar's inbound address is known.
struct Setup {
    dir: TempDir,
    cp: ControlPlane,
    _app: HeaderApp,
    server: Proxy,
    inbound: SocketAddr,
}

async fn setup(security: &str, cp_args: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let app = HeaderApp::start().await;
    let state = dir.path().join("state");
    // Until the sidecar runs, `reviews` points at the app itself.
    let cp = ControlPlane::start(
        dir.path(),
        "control",
        &reviews_mesh(app.addr, security),
        ControlPlaneOpts {
            state_dir: Some(state),
            extra_args: cp_args.iter().map(|s| (*s).to_owned()).collect(),
            ..ControlPlaneOpts::default()
        },
    )
    .await;
    let server = identity_proxy(
        &cp,
        dir.path(),
        "reviews-sidecar",
        "reviews",
        ("default", "reviews"),
        Some(app.addr),
    )
    .await;
    let inbound = server.inbound.expect("inbound listener");
    let (status, body) = cp.apply(&reviews_mesh(inbound, security)).await;
    assert!(status.is_success(), "apply: {body}");
    let version = body["version"].as_u64().expect("version");
    cp.wait_acked(version, 1, DEADLINE).await;
    Setup {
        dir,
        cp,
        _app: app,
        server,
        inbound,
    }
}

impl Setup {
    async fn client(&self, name: &str, ns: &str, sa: &str) -> Proxy {
        let p = identity_proxy(
            &self.cp,
            self.dir.path(),
            name,
            "productpage",
            (ns, sa),
            None,
        )
        .await;
        let version = self.cp.version().await;
        self.cp.wait_acked(version, 2, DEADLINE).await;
        p
    }

    async fn apply(&self, security: &str, proxies: usize) {
        let (status, body) = self.cp.apply(&reviews_mesh(self.inbound, security)).await;
        assert!(status.is_success(), "apply: {body}");
        self.cp
            .wait_acked(body["version"].as_u64().unwrap(), proxies, DEADLINE)
            .await;
    }
}

const IDENTITY_STRICT: &str = "      identity: spiffe://weft.local/ns/default/sa/reviews
      peer_authentication: {mode: strict}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_talk_mtls_and_the_app_sees_the_callers_identity() {
    let s = setup(IDENTITY_STRICT, &[]).await;
    let client = s
        .client("productpage-sidecar", "default", "productpage")
        .await;
    let http = HttpClient::http1();
    // A spoofed identity header from the calling app must not survive.
    let r = http
        .get(
            client.outbound,
            "reviews",
            "/hello",
            &[("x-weft-peer-identity", "spiffe://evil/ns/x/sa/y")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(
        seen["headers"]["x-weft-peer-identity"], PRODUCTPAGE_ID,
        "{seen}"
    );
    assert_eq!(seen["headers"]["x-weft-tls"], "TLSv1_3", "{seen}");
    assert_eq!(seen["headers"]["host"], "reviews", "{seen}");
    // The app spoke HTTP/1.1, so it is served HTTP/1.1 behind the h2 hop between sidecars.
    assert_eq!(seen["version"], "HTTP/1.1", "{seen}");
    assert!(
        seen["headers"].get("x-weft-app-protocol").is_none(),
        "{seen}"
    );

    // An upgrade request cannot cross the HTTP/2 hop: it goes over mTLS as HTTP/1.1 to the
    // reviews sidecar (STRICT accepts it), which serves it as HTTP (the app gets the caller's
    // identity) and hands it to the app with its upgrade fields.
    let (status, body) = upgrade_through(client.outbound, "/ws").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status} {body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["headers"]["upgrade"], "websocket", "{seen}");
    assert_eq!(seen["headers"]["connection"], "upgrade", "{seen}");
    assert_eq!(seen["path"], "/ws", "{seen}");
    assert_eq!(
        seen["headers"]["x-weft-peer-identity"], PRODUCTPAGE_ID,
        "{seen}"
    );
    assert_eq!(seen["headers"]["x-weft-tls"], "TLSv1_3", "{seen}");

    // A real switch: the app answers 101 and both sidecars splice; bytes go both ways.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (head, mut ws) =
            upgrade_to(client.outbound, weft_tests::identity::ECHO_UPGRADE_PATH).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("x-seen-peer-identity: {PRODUCTPAGE_ID}")),
            "{head}"
        );
        for frame in [&b"frame one\n"[..], b"frame two\n"] {
            ws.write_all(frame).await.unwrap();
            let mut back = vec![0; frame.len()];
            tokio::time::timeout(DEADLINE, ws.read_exact(&mut back))
                .await
                .expect("the echo")
                .unwrap();
            assert_eq!(back, frame);
        }
    }

    // Plaintext straight to the STRICT inbound port is refused.
    let plain = http.get(s.inbound, "reviews", "/hello", &[]).await;
    assert!(plain.is_err(), "plaintext got through: {plain:?}");

    let cfg = s.server.config().await;
    assert_eq!(
        cfg["identity"]["certificate"]["spiffe_id"], REVIEWS_ID,
        "{cfg}"
    );
    assert!(
        cfg["identity"]["authz"]["plaintext_refused"]
            .as_u64()
            .unwrap()
            >= 1,
        "{cfg}"
    );
    let cfg = client.config().await;
    assert_eq!(
        cfg["identity"]["certificate"]["spiffe_id"], PRODUCTPAGE_ID,
        "{cfg}"
    );

    // The outbound side checks who answers: expecting another identity, the call fails
    // rather than talk to the wrong workload.
    s.apply(
        "      identity: spiffe://weft.local/ns/default/sa/ratings
      peer_authentication: {mode: strict}",
        2,
    )
    .await;
    let r = http
        .get(client.outbound, "reviews", "/hello", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("x-weft-reason"), Some("upstream_connect_failed"));
    assert!(
        r.text()
            .contains("expecting spiffe://weft.local/ns/default/sa/ratings"),
        "{}",
        r.text()
    );
}

/// Sends a WebSocket upgrade request for `reviews` at `path` to `outbound`; returns the
/// answer's head and the connection (after a `101`, the upgraded byte stream).
async fn upgrade_to(outbound: SocketAddr, path: &str) -> (String, tokio::net::TcpStream) {
    upgrade_to_host(outbound, "reviews", path).await
}

/// [`upgrade_to`] for the route of `host`.
async fn upgrade_to_host(
    outbound: SocketAddr,
    host: &str,
    path: &str,
) -> (String, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(outbound).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        // Byte by byte: nothing after the head is consumed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let b = stream.read_u8().await.unwrap_or_else(|e| {
                panic!(
                    "closed in the head ({e}): {}",
                    String::from_utf8_lossy(&head)
                )
            });
            head.push(b);
        }
        (String::from_utf8_lossy(&head).into_owned(), stream)
    };
    tokio::time::timeout(DEADLINE, work)
        .await
        .expect("an answer to the upgrade")
}

/// An upgrade request for `path` that the app answers as a plain request: its status line
/// and the app's JSON (or the proxy's error text).
async fn upgrade_through(outbound: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let (head, mut stream) = upgrade_to(outbound, path).await;
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or_else(|| panic!("a content-length: {head}"));
    let mut body = vec![0; len];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut body))
        .await
        .expect("the body")
        .unwrap();
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_bad_certificates_and_permissive_accepts_both() {
    let s = setup(IDENTITY_STRICT, &[]).await;
    let ca = mesh_ca(&s.dir.path().join("state"));
    let good_id = "spiffe://weft.local/ns/default/sa/tester";
    let good = || {
        tls_client(ClientCert::SignedBy {
            issuer: &ca,
            spiffe_id: good_id,
            expired: false,
        })
    };
    // Positive control: the same client code with a certificate of the mesh CA gets through.
    let ok = tls_get(s.inbound, good(), "reviews", "/x").await.unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["headers"]["x-weft-peer-identity"], good_id);

    let bad = [
        ("no certificate", tls_client(ClientCert::None)),
        ("self-signed", tls_client(ClientCert::SelfSigned)),
        ("another CA", tls_client(ClientCert::OtherCa)),
        (
            "expired",
            tls_client(ClientCert::SignedBy {
                issuer: &ca,
                spiffe_id: good_id,
                expired: true,
            }),
        ),
    ];
    for (what, cfg) in bad {
        let r = tls_get(s.inbound, cfg, "reviews", "/x").await;
        assert!(r.is_err(), "{what}: a STRICT port accepted it: {r:?}");
    }
    let plain = HttpClient::http1()
        .get(s.inbound, "reviews", "/x", &[])
        .await;
    assert!(plain.is_err(), "STRICT accepted plaintext: {plain:?}");

    s.apply(
        "      identity: spiffe://weft.local/ns/default/sa/reviews
      peer_authentication: {mode: permissive}",
        1,
    )
    .await;
    let plain = HttpClient::http1()
        .get(s.inbound, "reviews", "/x", &[])
        .await
        .unwrap();
    assert_eq!(plain.status, 200);
    assert!(
        plain.json()["headers"]
            .get("x-weft-peer-identity")
            .is_none()
    );
    let mtls = tls_get(s.inbound, good(), "reviews", "/x").await.unwrap();
    assert_eq!(mtls.json()["headers"]["x-weft-peer-identity"], good_id);
    // Even PERMISSIVE refuses a bad certificate when TLS is attempted.
    assert!(
        tls_get(s.inbound, tls_client(ClientCert::OtherCa), "reviews", "/x")
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_failed_requests() {
    let s = setup(IDENTITY_STRICT, &["--cert-ttl", "2s"]).await;
    let client = s
        .client("productpage-sidecar", "default", "productpage")
        .await;
    let first = client.config().await["identity"]["certificate"].clone();
    let first_server = s.server.config().await["identity"]["certificate"].clone();

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, outbound) = (stop.clone(), client.outbound);
        workers.push(tokio::spawn(async move {
            // Each worker opens fresh connections now and then, so new handshakes happen with
            // the renewed certificates too.
            let (mut ok, mut failures) = (0u64, Vec::new());
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
                let http = HttpClient::http1();
                for _ in 0..20 {
                    match http.get(outbound, "reviews", "/load", &[]).await {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => failures.push(format!("{} {}", r.status, r.text())),
                        Err(e) => failures.push(e.to_string()),
                    }
                }
            }
            (ok, failures)
        }));
    }
    // Wait until both sides have renewed at least three times (2 s lifetime, renewal at 1 s).
    eventually(
        Duration::from_secs(25),
        "three renewals on both sidecars",
        || async {
            let c = client.config().await["identity"]["certificate"]["generation"].as_u64()?;
            let sv = s.server.config().await["identity"]["certificate"]["generation"].as_u64()?;
            (c >= first["generation"].as_u64()? + 3
                && sv >= first_server["generation"].as_u64()? + 3)
                .then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failures) = (0, Vec::new());
    for w in workers {
        let (o, f) = w.await.unwrap();
        ok += o;
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} failed of {}: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100, "too little load to mean anything: {ok}");
    let now = client.config().await["identity"]["certificate"].clone();
    assert!(
        now["not_after_unix_ms"].as_u64() > first["not_after_unix_ms"].as_u64(),
        "expiry moved on: {first} → {now}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_refuses_a_csr_for_another_service_account() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(
        dir.path(),
        "control",
        "services: []\nroutes: []\n",
        ControlPlaneOpts::default(),
    )
    .await;
    // The token comes from weftctl, as an operator would get it.
    let out = std::process::Command::new(weft_tests::bins::bin("weftctl"))
        .args([
            "--server",
            &format!("http://{}", cp.admin),
            "token",
            "--namespace",
            "default",
            "--service-account",
            "productpage",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let csr = |id: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        p.serialize_request(&key).unwrap().pem().unwrap()
    };
    let mut client = IdentityServiceClient::connect(format!("http://{}", cp.grpc))
        .await
        .unwrap();
    let ok = client
        .certify(CertifyRequest {
            csr_pem: csr(PRODUCTPAGE_ID),
            token: token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, PRODUCTPAGE_ID);
    assert!(!ok.trust_bundle_pem.is_empty());

    let err = client
        .certify(CertifyRequest {
            csr_pem: csr(REVIEWS_ID),
            token: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("proof of identity is for"),
        "{err:?}"
    );

    let forged = token.replace(":productpage:", ":reviews:");
    let err = client
        .certify(CertifyRequest {
            csr_pem: csr(REVIEWS_ID),
            token: forged,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_denies_admin_from_other_and_allows_by_identity() {
    let security = format!(
        "      identity: spiffe://weft.local/ns/default/sa/reviews
      peer_authentication: {{mode: strict}}
      authorization:
        - name: no-admin-from-other
          action: deny
          rules: [{{namespaces: [other], paths: [{{prefix: /admin}}]}}]
        - name: callers
          action: allow
          rules:
            - {{principals: [{{exact: \"{PRODUCTPAGE_ID}\"}}]}}
            - {{namespaces: [other], paths: [{{prefix: /public}}]}}"
    );
    let s = setup(&security, &[]).await;
    let friend = s
        .client("productpage-sidecar", "default", "productpage")
        .await;
    let other = s.client("other-sidecar", "other", "intruder").await;
    let http = HttpClient::http1();
    let get = |p: &Proxy, path: &'static str| {
        let (http, outbound) = (http.clone(), p.outbound);
        async move { http.get(outbound, "reviews", path, &[]).await.unwrap() }
    };

    let r = get(&other, "/admin/users").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.header("x-weft-reason"), Some("denied"));
    assert!(r.text().contains("no-admin-from-other"), "{}", r.text());
    assert_eq!(get(&other, "/public/x").await.status, 200);
    let r = get(&other, "/private").await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("no ALLOW policy matched"), "{}", r.text());
    assert_eq!(get(&friend, "/admin/users").await.status, 200);
    assert_eq!(get(&friend, "/private").await.status, 200);

    // Upgrades (WebSocket) are requests too: the same HTTP rules decide.
    let (status, body) = upgrade_through(other.outbound, "/admin/ws").await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status} {body}");
    assert!(body.contains("no-admin-from-other"), "{body}");
    let (status, body) = upgrade_through(other.outbound, "/private/ws").await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status} {body}");
    let (status, body) = upgrade_through(other.outbound, "/public/ws").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status} {body}");
    let (status, body) = upgrade_through(friend.outbound, "/admin/ws").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status} {body}");

    let authz = &s.server.config().await["identity"]["authz"];
    assert!(authz["denied"].as_u64().unwrap() >= 2, "{authz}");
    assert!(authz["allowed"].as_u64().unwrap() >= 3, "{authz}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_is_required_verified_and_its_claims_usable_in_rules() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let secret = b"a-test-secret-of-32-bytes-length";
    let k = {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    };
    let jwks = HeaderApp::fixed(format!(
        r#"{{"keys":[{{"kty":"oct","kid":"k1","alg":"HS256","k":"{k}"}}]}}"#
    ))
    .await;
    let security = format!(
        "      jwt: {{issuer: https://issuer.test, audiences: [reviews], jwks_uri: \"http://{}/jwks\"}}
      authorization:
        - name: admins-for-admin
          rules:
            - {{paths: [{{prefix: /admin}}], claims: {{group: [admins]}}}}
            - {{paths: [{{prefix: /public}}]}}",
        jwks.addr
    );
    let s = setup(&security, &[]).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |exp: u64, aud: &str, group: &str| {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        let claims = serde_json::json!({"iss": "https://issuer.test", "aud": aud, "exp": exp, "sub": "alice", "group": [group]});
        format!(
            "Bearer {}",
            encode(&h, &claims, &EncodingKey::from_secret(secret)).unwrap()
        )
    };
    let http = HttpClient::http1();
    let get = |path: &'static str, auth: Option<String>| {
        let (http, inbound) = (http.clone(), s.inbound);
        async move {
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("authorization", a.as_str())).collect();
            http.get(inbound, "reviews", path, &headers).await.unwrap()
        }
    };

    let cases = [
        (None, "jwt_missing"),
        (Some("Bearer not.a.jwt".to_owned()), "jwt_invalid"),
        (Some(token(now - 3600, "reviews", "admins")), "jwt_expired"),
        (
            Some(token(now + 3600, "someone-else", "admins")),
            "jwt_invalid",
        ),
    ];
    for (auth, reason) in cases {
        let r = get("/public", auth.clone()).await;
        assert_eq!(r.status, 401, "{auth:?}: {}", r.text());
        assert_eq!(
            r.header("x-weft-reason"),
            Some(reason),
            "{auth:?}: {}",
            r.text()
        );
    }
    let user = token(now + 3600, "reviews", "users");
    let admin = token(now + 3600, "reviews", "admins");
    assert_eq!(get("/public", Some(user.clone())).await.status, 200);
    let r = get("/admin", Some(user)).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.header("x-weft-reason"), Some("denied"));
    assert_eq!(get("/admin", Some(admin)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_grpc_port_is_served_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let app = HeaderApp::start().await;
    let cp = ControlPlane::start(
        dir.path(),
        "control",
        &reviews_mesh(app.addr, IDENTITY_STRICT),
        ControlPlaneOpts {
            state_dir: Some(dir.path().join("state")),
            extra_args: vec!["--grpc-tls".into()],
            ..ControlPlaneOpts::default()
        },
    )
    .await;
    let bundle = HttpClient::http1()
        .get(cp.admin, "admin", "/api/v1/identity/bundle", &[])
        .await
        .unwrap();
    assert_eq!(bundle.status, 200);
    let bundle_path = dir.path().join("bundle.pem");
    std::fs::write(&bundle_path, &bundle.body).unwrap();
    let token = weft_tests::identity::token_file(&cp, dir.path(), "default", "reviews").await;

    // Config stream and Certify both over TLS: the proxy becomes ready only with both.
    let proxy = Proxy::start(
        dir.path(),
        "reviews-sidecar",
        weft_tests::ProxyOpts {
            app_addr: Some(app.addr),
            service: "reviews".into(),
            extra_args: [
                "--control-plane",
                &format!("https://{}", cp.grpc),
                "--control-plane-ca",
                &bundle_path.display().to_string(),
                "--service-account",
                "reviews",
                "--identity-token-file",
                &token,
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
            ..weft_tests::ProxyOpts::default()
        },
    )
    .await;
    let cfg = proxy.config().await;
    assert_eq!(
        cfg["identity"]["certificate"]["spiffe_id"], REVIEWS_ID,
        "{cfg}"
    );
    assert!(cfg["version"].as_u64().unwrap() >= 1, "{cfg}");

    // A plaintext gRPC client gets nowhere.
    let plain = async {
        let mut c = IdentityServiceClient::connect(format!("http://{}", cp.grpc)).await?;
        c.certify(CertifyRequest::default()).await?;
        anyhow::Ok(())
    };
    let r = tokio::time::timeout(Duration::from_secs(10), plain)
        .await
        .unwrap();
    assert!(r.is_err(), "plaintext gRPC was answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_trusts_both_roots_during_the_overlap() {
    let s = setup(IDENTITY_STRICT, &["--cert-ttl", "3s"]).await;
    let client = s
        .client("productpage-sidecar", "default", "productpage")
        .await;
    let http = HttpClient::http1();
    let ok = http
        .get(client.outbound, "reviews", "/", &[])
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    let state = s.dir.path().join("state");
    let old_ca = mesh_ca(&state);

    // The operator's new root B; the old root A stays trusted through --trust-bundle.
    let (new_root, new_key) = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        (p.self_signed(&key).unwrap().pem(), key)
    };
    let d = s.dir.path().to_path_buf();
    std::fs::write(d.join("new-root.pem"), &new_root).unwrap();
    std::fs::write(d.join("new-root-key.pem"), new_key.serialize_pem()).unwrap();
    std::fs::copy(state.join("ca/root.pem"), d.join("old-root.pem")).unwrap();
    let (grpc, admin) = (s.cp.grpc, s.cp.admin);
    let mut s = s;
    s.cp.proc.kill();
    s.cp = ControlPlane::start(
        &d,
        "control",
        "",
        ControlPlaneOpts {
            grpc_addr: Some(grpc),
            admin_addr: Some(admin),
            state_dir: Some(state.clone()),
            extra_args: [
                "--cert-ttl",
                "3s",
                "--ca-cert",
                &d.join("new-root.pem").display().to_string(),
                "--ca-key",
                &d.join("new-root-key.pem").display().to_string(),
                "--trust-bundle",
                &d.join("old-root.pem").display().to_string(),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        },
    )
    .await;

    // Both sidecars renew from the new root and get the two-root bundle.
    eventually(
        Duration::from_secs(40),
        "both sidecars to trust two roots",
        || async {
            let a = client.config().await["identity"]["certificate"]["trust_roots"].as_u64()?;
            let b = s.server.config().await["identity"]["certificate"]["trust_roots"].as_u64()?;
            (a == 2 && b == 2).then_some(())
        },
    )
    .await;
    let r = http
        .get(client.outbound, "reviews", "/", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // A workload still holding a certificate from the old root is accepted during the overlap.
    let old_cert = tls_client(ClientCert::SignedBy {
        issuer: &old_ca,
        spiffe_id: PRODUCTPAGE_ID,
        expired: false,
    });
    let r = tls_get(s.inbound, old_cert, "reviews", "/").await.unwrap();
    assert_eq!(r.status, 200);
}

/// Resilience and identity together: retries (each attempt a fresh choice of endpoint) run over
/// the mTLS hop, so a flaky upstream behind a STRICT sidecar is still retried to success.
/// A control plane serving `mesh(reviews)`, the `reviews` sidecar in front of `app` (the mesh
/// then pointing at its inbound) and a `productpage` sidecar, both with identities and acked.
async fn reviews_and_productpage(
    dir: &std::path::Path,
    mesh: impl Fn(SocketAddr) -> String,
    app: SocketAddr,
) -> (ControlPlane, Proxy, Proxy) {
    let cp = ControlPlane::start(dir, "control", &mesh(app), ControlPlaneOpts::default()).await;
    let server = identity_proxy(
        &cp,
        dir,
        "reviews-sidecar",
        "reviews",
        ("default", "reviews"),
        Some(app),
    )
    .await;
    let (status, body) = cp.apply(&mesh(server.inbound.unwrap())).await;
    assert!(status.is_success(), "{body}");
    let client = identity_proxy(
        &cp,
        dir,
        "productpage-sidecar",
        "productpage",
        ("default", "productpage"),
        None,
    )
    .await;
    cp.wait_acked(body["version"].as_u64().unwrap(), 2, DEADLINE)
        .await;
    (cp, server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_apply_over_mtls_between_sidecars() {
    let dir = tempfile::tempdir().unwrap();
    let app = weft_tests::chaos::ChaosApp::start("reviews").await;
    let mesh = |endpoint: SocketAddr| {
        reviews_mesh(endpoint, IDENTITY_STRICT).replace(
            "      - backends: [{service: reviews}]",
            "      - backends: [{service: reviews}]\n        retries: {attempts: 3, retry_on: [\"503\"]}",
        )
    };
    let (_cp, server, client) = reviews_and_productpage(dir.path(), mesh, app.addr).await;

    app.fail_first(2, 503);
    let reply = HttpClient::http1()
        .get(client.outbound, "reviews", "/", &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(app.hits(), 3, "two 503s retried over mTLS, then success");
    // The STRICT inbound only takes mTLS: the retries cannot have gone in plaintext.
    let plain = HttpClient::http1()
        .get(server.inbound.unwrap(), "reviews", "/", &[])
        .await;
    assert!(
        plain.is_err() || plain.unwrap().status != 200,
        "STRICT refuses plaintext"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_rate_limit_per_caller_counts_each_workload_apart() {
    let security = "      identity: spiffe://weft.local/ns/default/sa/reviews
      peer_authentication: {mode: strict}
      rate_limit: {requests: 3, interval: 60s, per: {header: x-weft-peer-identity}}";
    let s = setup(security, &[]).await;
    let friend = s
        .client("productpage-sidecar", "default", "productpage")
        .await;
    let other = s.client("other-sidecar", "other", "intruder").await;
    let http = HttpClient::http1();
    // A caller cannot pick its bucket: the header it sends is replaced by its verified one.
    let get = |p: &Proxy| {
        let (http, outbound) = (http.clone(), p.outbound);
        async move {
            http.get(
                outbound,
                "reviews",
                "/",
                &[("x-weft-peer-identity", "spiffe://weft.local/ns/x/sa/fresh")],
            )
            .await
            .unwrap()
        }
    };
    for _ in 0..3 {
        assert_eq!(get(&friend).await.status, 200);
    }
    let r = get(&friend).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("x-weft-reason"), Some("rate_limited"));
    assert!(r.header("retry-after").is_some());
    assert!(
        r.text().contains("service reviews (inbound)"),
        "{}",
        r.text()
    );
    // Another workload has its own bucket.
    for _ in 0..3 {
        assert_eq!(get(&other).await.status, 200);
    }
    assert_eq!(get(&other).await.status, 429);
    // A new configuration version (another change to the service) does not refill them.
    let version = s.cp.version().await;
    s.apply(
        &security.replace("{mode: strict}", "{mode: strict, ports: {9999: strict}}"),
        3,
    )
    .await;
    assert!(s.cp.version().await > version);
    assert_eq!(get(&friend).await.status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_to_a_service_with_an_identity_goes_over_mtls_from_a_plaintext_route() {
    let dir = tempfile::tempdir().unwrap();
    // The shadow (`reviews`, STRICT) records who each copy came from.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let shadow = {
        let seen = seen.clone();
        HeaderApp::serve(move |req| {
            let who = req
                .headers()
                .get("x-weft-peer-identity")
                .map_or("-".to_owned(), |v| v.to_str().unwrap_or("?").to_owned());
            seen.lock().unwrap().push(who);
            "{}".to_owned()
        })
        .await
    };
    let plain = HeaderApp::start().await;
    // `details` has no identity (a plain app); its route mirrors every request to `reviews`.
    let mesh = |reviews: SocketAddr| {
        format!(
            "{}  - name: details
    hosts: [details]
    rules:
      - backends: [{{service: details}}]
        mirror: {{service: reviews, percent: 100}}
",
            reviews_mesh(reviews, IDENTITY_STRICT).replace(
                "routes:\n",
                &format!(
                    "  - name: details\n    endpoints: [{{address: \"{}\"}}]\nroutes:\n",
                    plain.addr
                ),
            )
        )
    };
    let (_cp, server, client) = reviews_and_productpage(dir.path(), mesh, shadow.addr).await;

    let http = HttpClient::http1();
    let n = 10;
    for _ in 0..n {
        let r = http
            .get(client.outbound, "details", "/", &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        // The primary is the plain app: no identity reached it.
        assert!(
            r.json()["headers"].get("x-weft-peer-identity").is_none(),
            "{}",
            r.text()
        );
    }
    eventually(DEADLINE, "every copy at the shadow", || async {
        (seen.lock().unwrap().len() >= n).then_some(())
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|who| who == PRODUCTPAGE_ID),
        "each copy carries the caller's verified identity: {seen:?}"
    );
    let cfg = server.config().await;
    assert_eq!(
        cfg["identity"]["authz"]["plaintext_refused"], 0,
        "no copy went in plaintext: {cfg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_verifies_the_external_server_and_names_what_failed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let api = HttpsApp::start("api.example", false).await;
    let stale = HttpsApp::start("api.example", true).await;
    let ca = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    let (api_ca, stale_ca) = (ca("api.pem", &api.ca_pem), ca("stale.pem", &stale.ca_pem));
    // One service per case, each on its own host.
    let service = |name: &str, addr: SocketAddr, tls: &str| {
        format!(
            "  - name: {name}\n    endpoints: [{{address: \"{addr}\"}}]\n    policy: {{tls: {tls}}}\n"
        )
    };
    let route = |name: &str| {
        format!(
            "  - name: {name}\n    hosts: [{name}]\n    rules:\n      - backends: [{{service: {name}}}]\n"
        )
    };
    let mesh = |payments_ca: &str| {
        let cases = [
            (
                "payments",
                api.addr,
                format!("{{sni: api.example, ca_file: \"{payments_ca}\"}}"),
            ),
            (
                "expired",
                stale.addr,
                format!("{{sni: api.example, ca_file: \"{stale_ca}\"}}"),
            ),
            (
                "untrusted",
                api.addr,
                format!("{{sni: api.example, ca_file: \"{stale_ca}\"}}"),
            ),
            (
                "misnamed",
                api.addr,
                format!("{{sni: other.example, ca_file: \"{api_ca}\"}}"),
            ),
        ];
        let services: String = cases.iter().map(|(n, a, t)| service(n, *a, t)).collect();
        let routes: String = cases.iter().map(|(n, _, _)| route(n)).collect();
        format!("services:\n{services}routes:\n{routes}")
    };
    let (cp, proxy) = weft_tests::control_and_proxy(dir.path(), &mesh(&api_ca)).await;
    let http = HttpClient::http1();

    // The app speaks plain HTTP; the server sees TLS with the configured name, and the Host the
    // app sent.
    let r = http
        .get(proxy.outbound, "payments", "/charge", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["sni"], "api.example", "{seen}");
    assert_eq!(seen["host"], "payments", "{seen}");
    assert_eq!(seen["path"], "/charge", "{seen}");
    assert_eq!(seen["version"], "HTTP/1.1", "{seen}");
    // Upgrades (WebSocket) go over TLS too.
    let (head, mut stream) = upgrade_to_host(
        proxy.outbound,
        "payments",
        weft_tests::identity::ECHO_UPGRADE_PATH,
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream.write_all(b"over tls").await.unwrap();
    let mut echoed = [0; 8];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut echoed))
        .await
        .expect("the echo")
        .unwrap();
    assert_eq!(&echoed, b"over tls");

    // What failed is named: an expired certificate, an unknown CA, another name.
    for (host, expect) in [
        ("expired", "expired"),
        ("untrusted", "unknownissuer"),
        ("misnamed", "not valid for name"),
    ] {
        let r = http
            .get(proxy.outbound, host, "/charge", &[])
            .await
            .unwrap();
        let text = r.text().to_lowercase();
        assert!(r.status.is_server_error(), "{host}: {} {text}", r.status);
        assert!(
            r.header("x-weft-reason").is_some(),
            "{host}: the proxy's answer"
        );
        assert!(
            text.contains("tls handshake with api.example failed") || host == "misnamed",
            "{host}: {text}"
        );
        assert!(text.contains(expect), "{host}: {text}");
    }

    // A CA file the proxy cannot read: the version is NACKed with the file named, and the
    // running configuration keeps working.
    let missing = dir.path().join("missing.pem").display().to_string();
    let (status, body) = cp.apply(&mesh(&missing)).await;
    assert!(status.is_success(), "valid for the control plane: {body}");
    let rejected = body["version"].as_u64().unwrap();
    let nack = eventually(DEADLINE, "the proxy's NACK", || async {
        let status = cp.status().await;
        let p = status["proxies"]
            .as_array()?
            .iter()
            .find(|p| p["node_id"] == "proxy")?
            .clone();
        (p["last_nack"]["version"].as_u64() == Some(rejected)).then_some(p)
    })
    .await;
    let error = nack["last_nack"]["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("cannot read CA file {missing}")) && error.contains("payments"),
        "{error}"
    );
    let r = http
        .get(proxy.outbound, "payments", "/charge", &[])
        .await
        .unwrap();
    assert_eq!(
        r.status,
        200,
        "the last good configuration stays: {}",
        r.text()
    );
}

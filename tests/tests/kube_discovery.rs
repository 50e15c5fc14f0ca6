//! Discovery from a live (fake) Kubernetes API server: `weft-control --kubernetes
//! --kubeconfig` watches Services, EndpointSlices and an HTTPRoute served by the harness's
//! minimal API server (`weft_tests::kubeapi`, real LIST + WATCH over HTTP), and a real proxy
//! routes real traffic by them — the split, the header rule, then watch events changing the
//! weights and removing an endpoint, and finally the API server going away while the last
//! discovered config keeps serving.

use std::time::Duration;

use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use weft_tests::kubeapi::FakeApiServer;
use weft_tests::mesh::{Split, assert_cart_route, drive};
use weft_tests::{
    ControlPlane, ControlPlaneOpts, HttpClient, Proxy, ProxyOpts, VersionApp, eventually,
};

const CONVERGE: Duration = Duration::from_secs(20);
const HOST: &str = "cart.shop.svc.cluster.local";

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap()
}

fn slice(service: &str, apps: &[&VersionApp]) -> EndpointSlice {
    let endpoints: Vec<_> = apps
        .iter()
        .map(|a| json!({"addresses": [a.addr.ip().to_string()], "conditions": {"ready": true}}))
        .collect();
    // In a cluster every pod of a slice listens on the same port; here each loopback app has
    // its own port, so each slice holds one app.
    let port = apps.first().map_or(80, |a| a.addr.port());
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port}],
        "endpoints": endpoints
    }))
    .unwrap()
}

fn route(w1: u32, w2: u32) -> HttpRoute {
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "cart", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "cart"}],
            "rules": [
                {"matches": [{"headers": [{"name": "x-user-group", "value": "beta"}]}],
                 "backendRefs": [{"name": "cart-v2", "port": 80}]},
                {"backendRefs": [{"name": "cart-v1", "port": 80, "weight": w1},
                                 {"name": "cart-v2", "port": 80, "weight": w2}]}
            ]
        }
    }))
    .unwrap()
}

/// Drives small batches until one satisfies `ok` (the proxy has the config it implies).
async fn until(client: &HttpClient, proxy: &Proxy, what: &str, ok: impl Fn(&Split) -> bool) {
    eventually(CONVERGE, what, || async {
        let split = drive(client, proxy.outbound, HOST, &[], 40, 4).await;
        ok(&split).then_some(())
    })
    .await;
}

async fn start_mesh(
    dir: &std::path::Path,
    api: &FakeApiServer,
    extra: &[&str],
) -> (ControlPlane, Proxy) {
    let kubeconfig = api.kubeconfig(dir);
    let mut args = vec![
        "--kubernetes".to_owned(),
        "--kubeconfig".to_owned(),
        kubeconfig.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let cp = ControlPlane::start(
        dir,
        "control",
        "services: []\nroutes: []\n",
        ControlPlaneOpts {
            extra_args: args,
            ..ControlPlaneOpts::default()
        },
    )
    .await;
    let proxy = Proxy::start(
        dir,
        "client",
        ProxyOpts {
            control_plane: Some(cp.grpc),
            ..ProxyOpts::default()
        },
    )
    .await;
    (cp, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_httproute_canary_routes_and_follows_changes() {
    // Two apps cannot share a port on 127.0.0.1, so v1's second pod ("v1-b") is in a second
    // EndpointSlice of the same Service (a slice has one port).
    let (v1, v1b, v2) = (
        VersionApp::start("v1").await,
        VersionApp::start("v1-b").await,
        VersionApp::start("v2").await,
    );
    let api = FakeApiServer::start(true).await;
    for name in ["cart", "cart-v1", "cart-v2"] {
        api.apply(&service(name));
    }
    api.apply(&slice("cart-v1", &[&v1]));
    let mut second = slice("cart-v1", &[&v1b]);
    second.metadata.name = Some("cart-v1-2".into());
    api.apply(&second);
    api.apply(&slice("cart-v2", &[&v2]));
    api.apply(&route(80, 20));

    let dir = tempfile::tempdir().unwrap();
    let (cp, proxy) = start_mesh(dir.path(), &api, &[]).await;
    let client = HttpClient::http1();
    until(&client, &proxy, "the discovered route to answer", |s| {
        s.failed == 0
    })
    .await;

    // The HTTPRoute's 80/20 split, v1's share spread over its two endpoints; the header rule
    // pins beta users to v2, by the short name too.
    let split = assert_cart_route(&client, proxy.outbound, HOST).await;
    // The balancer (p2c over latency) is not an even split: with the machine busy one app
    // can be slower for a while and get less (seen: 18.6 of v1's 81 points). The second
    // slice's endpoint must get a real share, not half of one.
    assert!(split.percent("v1-b") > 5.0, "both v1 endpoints: {split:?}");

    // The HTTPRoute owns its weights: weftctl's set-weight is refused, naming it.
    let (status, body) = client
        .post_json(
            cp.admin,
            "/api/v1/routes/cart.shop/weights",
            &json!({"weights": {"cart-v1.shop": 50, "cart-v2.shop": 50}}),
        )
        .await
        .unwrap();
    assert_eq!(status, http::StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("HTTPRoute shop/cart"),
        "{body}"
    );

    // An endpoint leaves (its slice is deleted): once the proxy runs the version without it,
    // no request goes to it any more. (Waiting for a sample without v1-b instead can pass
    // early: the latency balancer may skip an endpoint for a while.)
    let before = cp.version().await;
    api.delete(&second);
    let without = eventually(CONVERGE, "the deletion in the config", || async {
        let v = cp.version().await;
        (v > before).then_some(v)
    })
    .await;
    cp.wait_acked(without, 1, CONVERGE).await;
    let after = drive(&client, proxy.outbound, HOST, &[], 300, 4).await;
    assert_eq!(after.failed, 0, "{:?}", after.failures);
    assert_eq!(after.by_version.get("v1-b"), None, "{after:?}");
    assert!(after.percent("v1") > 60.0, "{after:?}");

    // The HTTPRoute is modified to 0/100: the proxy converges to v2 only.
    api.apply(&route(0, 100));
    until(&client, &proxy, "all traffic on v2", |s| {
        s.by_version.get("v2") == Some(&40)
    })
    .await;
    let version = cp.version().await;

    // The API server goes away: the control plane logs it and keeps the last config.
    api.stop();
    eventually(
        CONVERGE,
        "the control plane to notice the API server left",
        || async { cp.proc.log_text().contains("watch failed").then_some(()) },
    )
    .await;
    let last = drive(&client, proxy.outbound, HOST, &[], 200, 4).await;
    assert_eq!(last.by_version.get("v2"), Some(&200), "{last:?}");
    assert_eq!(cp.version().await, version, "the discovered config stays");
    let status = cp.status().await;
    assert!(status["last_discovery_error"].is_null(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_namespaces_are_discovered_without_the_gateway_api_crds() {
    let app = VersionApp::start("v1").await;
    let api = FakeApiServer::start(false).await;
    api.apply(&service("cart"));
    api.apply(&slice("cart", &[&app]));
    // Another namespace, not in --discovery-namespace: never discovered.
    let mut elsewhere = service("cart");
    elsewhere.metadata.namespace = Some("other".into());
    api.apply(&elsewhere);
    let dir = tempfile::tempdir().unwrap();
    let (cp, proxy) = start_mesh(dir.path(), &api, &["--discovery-namespace", "shop"]).await;
    let client = HttpClient::http1();
    until(&client, &proxy, "the Service's own route", |s| {
        s.by_version.get("v1") == Some(&40)
    })
    .await;
    let log = cp.proc.log_text();
    assert_eq!(
        log.matches("Gateway API CRDs not installed").count(),
        1,
        "the missing CRD is logged once:\n{log}"
    );
    let requests = api.requests();
    for watched in [
        "/api/v1/namespaces/shop/services",
        "/namespaces/shop/httproutes",
    ] {
        assert!(requests.iter().any(|r| r.contains(watched)), "{requests:?}");
    }
    let served = cp.status().await["version"].as_u64().unwrap();
    let config = HttpClient::http1()
        .get_json(cp.admin, "/api/v1/config")
        .await
        .unwrap();
    assert_eq!(config["version"].as_u64(), Some(served));
    let names: Vec<&str> = config["config"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["cart.shop"], "only the discovered namespace");
}

/// The weights of the discovered `cart.shop` route's weighted rule, and the version, as
/// replica `cp` serves them.
async fn served_weights(cp: &ControlPlane) -> Option<(u64, Vec<u64>)> {
    let c = HttpClient::http1()
        .get_json(cp.admin, "/api/v1/config")
        .await
        .ok()?;
    let route = c["config"]["routes"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == "cart.shop")?
        .clone();
    let weights = route["rules"][1]["backends"]
        .as_array()?
        .iter()
        .filter_map(|b| b["weight"].as_u64())
        .collect();
    Some((c["version"].as_u64()?, weights))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_only_the_leader_writes_the_discovered_layer() {
    let Some(bin) = weft_tests::etcd::etcd_or_skip("on_etcd_only_the_leader_writes") else {
        return;
    };
    let (v1, v2) = (VersionApp::start("v1").await, VersionApp::start("v2").await);
    let api = FakeApiServer::start(true).await;
    for name in ["cart", "cart-v1", "cart-v2"] {
        api.apply(&service(name));
    }
    api.apply(&slice("cart-v1", &[&v1]));
    api.apply(&slice("cart-v2", &[&v2]));
    api.apply(&route(80, 20));
    let dir = tempfile::tempdir().unwrap();
    let etcd = weft_tests::etcd::Etcd::start(&bin, dir.path()).await;
    let kubeconfig = api.kubeconfig(dir.path());
    let mut cps = Vec::new();
    for name in ["cp-a", "cp-b"] {
        let mut extra = weft_tests::etcd::replica_args(&etcd.url(), name);
        extra.extend([
            "--kubernetes".into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
        ]);
        let opts = ControlPlaneOpts {
            extra_args: extra,
            ..ControlPlaneOpts::default()
        };
        cps.push(ControlPlane::start(dir.path(), name, "services: []\nroutes: []\n", opts).await);
    }
    // Both serve the discovered route at one version.
    let same = |w: Vec<u64>| {
        let cps = &cps;
        async move {
            let mut seen = Vec::new();
            for cp in cps {
                seen.push(served_weights(cp).await?);
            }
            (seen.iter().all(|s| *s == seen[0]) && seen[0].1 == w).then(|| seen[0].0)
        }
    };
    eventually(CONVERGE, "both replicas to serve 80/20", || {
        same(vec![80, 20])
    })
    .await;
    let leader = eventually(CONVERGE, "a leader", || async {
        for (i, cp) in cps.iter().enumerate() {
            if weft_tests::etcd::leader_status(cp).await?["is_leader"] == true {
                return Some(i);
            }
        }
        None
    })
    .await;
    let follower = 1 - leader;
    const APPLIED: &str = "discovered configuration applied";
    assert!(cps[leader].proc.log_text().contains(APPLIED));
    assert!(
        !cps[follower].proc.log_text().contains(APPLIED),
        "the follower wrote:\n{}",
        cps[follower].proc.log_tail()
    );

    // The leader dies; the follower takes over and writes the next change itself.
    cps[leader].proc.kill();
    eventually(CONVERGE, "the follower to lead", || async {
        (weft_tests::etcd::leader_status(&cps[follower]).await?["is_leader"] == true).then_some(())
    })
    .await;
    api.apply(&route(0, 100));
    eventually(CONVERGE, "the new leader to serve 0/100", || async {
        (served_weights(&cps[follower]).await?.1 == vec![0, 100]).then_some(())
    })
    .await;
    assert!(cps[follower].proc.log_text().contains(APPLIED));
}

/// A CSR for `spiffe_id` (a fresh key each time).
fn csr(spiffe_id: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into().unwrap())];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_prove_their_identity_with_the_service_account_token_the_api_server_reviews() {
    use weft_proto::identity_pb::CertifyRequest;
    use weft_proto::identity_pb::identity_service_client::IdentityServiceClient;
    const CART: &str = "spiffe://weft.local/ns/shop/sa/cart";
    let api = FakeApiServer::start(false).await;
    let dir = tempfile::tempdir().unwrap();
    let (cp, _) = start_mesh(dir.path(), &api, &[]).await;
    // What the injector mounts (audience "weft"), and a token of the same pod for another
    // audience (the default one), which must not be replayable here.
    let token = api.service_account_token("shop", "cart", &["weft"]);
    let foreign = api.service_account_token("shop", "cart", &["https://kubernetes.default.svc"]);
    let client = IdentityServiceClient::connect(format!("http://{}", cp.grpc))
        .await
        .unwrap();
    let certify = |csr_pem: String, token: &str| {
        let mut client = client.clone();
        let token = token.to_owned();
        async move { client.certify(CertifyRequest { csr_pem, token }).await }
    };

    let ok = certify(csr(CART), &token).await.unwrap().into_inner();
    assert_eq!(ok.spiffe_id, CART);
    // The token proves its service account, no other.
    let err = certify(csr("spiffe://weft.local/ns/shop/sa/admin"), &token)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = certify(csr(CART), &foreign).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("did not authenticate the token")
            && err.message().contains("audiences"),
        "{err:?}"
    );
    let err = certify(csr(CART), "not-a-token").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("POST /apis/authentication.k8s.io")),
        "{:?}",
        api.requests()
    );
    // Bootstrap tokens keep working beside them.
    let bootstrap = weft_tests::identity::token_file(&cp, dir.path(), "shop", "cart").await;
    let bootstrap = std::fs::read_to_string(bootstrap).unwrap();
    assert_eq!(
        certify(csr(CART), &bootstrap)
            .await
            .unwrap()
            .into_inner()
            .spiffe_id,
        CART
    );

    // A real sidecar with the mounted token file gets its certificate.
    let token_path = dir.path().join("sa-token");
    std::fs::write(&token_path, &token).unwrap();
    let sidecar = Proxy::start(
        dir.path(),
        "cart-sidecar",
        ProxyOpts {
            control_plane: Some(cp.grpc),
            service: "cart".into(),
            extra_args: [
                "--namespace",
                "shop",
                "--service-account",
                "cart",
                "--identity-token-file",
                &token_path.display().to_string(),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
            ..ProxyOpts::default()
        },
    )
    .await;
    let config = sidecar.config().await;
    assert_eq!(
        config["identity"]["certificate"]["spiffe_id"], CART,
        "{config}"
    );

    // The API server away: the refusal says why (and the proxy keeps its certificate).
    api.stop();
    let err = certify(csr(CART), &token).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(
        err.message()
            .contains("TokenReview: the API server could not review the token"),
        "{err:?}"
    );
}

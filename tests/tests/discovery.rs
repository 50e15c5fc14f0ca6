//! Kubernetes discovery end to end: Services, EndpointSlices (pointing at real loopback apps)
//! and an HTTPRoute canary are translated by the control plane's discovery, served to a real
//! proxy, and traffic follows the HTTPRoute's weights and header match; a Service's second
//! port reaches its own endpoints.

use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use weft_control::discovery::{ClusterSnapshot, translate};
use weft_tests::mesh::assert_cart_route;
use weft_tests::{ControlPlane, ControlPlaneOpts, HttpClient, Proxy, ProxyOpts, VersionApp};

fn docs<T: serde::de::DeserializeOwned>(yaml: &str) -> Vec<T> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| T::deserialize(d).unwrap())
        .collect()
}

fn service_and_slice(name: &str, app: Option<&VersionApp>) -> (String, String) {
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n"
    );
    let slice = app.map_or_else(String::new, |a| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [\"{}\"]}}]\n",
            a.addr.port(),
            a.addr.ip()
        )
    });
    (svc, slice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_canary_routes_traffic() {
    let (v1, v2) = (VersionApp::start("v1").await, VersionApp::start("v2").await);
    let (web, admin) = (
        VersionApp::start("web").await,
        VersionApp::start("admin").await,
    );
    // A Service with two ports, each to its own app.
    let ledger = (
        "apiVersion: v1\nkind: Service\nmetadata: {name: ledger, namespace: shop}\nspec: {ports: [{name: http, port: 80}, {name: admin, port: 8081}]}\n".to_owned(),
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: ledger-1, namespace: shop, labels: {{kubernetes.io/service-name: ledger}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}, {{name: admin, port: {}}}]\nendpoints: [{{addresses: [\"127.0.0.1\"]}}]\n",
            web.addr.port(),
            admin.addr.port()
        ),
    );
    let parts = [
        service_and_slice("cart", None),
        service_and_slice("cart-v1", Some(&v1)),
        service_and_slice("cart-v2", Some(&v2)),
        ledger,
    ];
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cart, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: cart}]
  rules:
    - matches: [{headers: [{name: x-user-group, value: beta}]}]
      backendRefs: [{name: cart-v2, port: 80}]
    - backendRefs: [{name: cart-v1, port: 80, weight: 80}, {name: cart-v2, port: 80, weight: 20}]
"#;
    let snapshot = ClusterSnapshot {
        services: parts.iter().flat_map(|(s, _)| docs::<Service>(s)).collect(),
        endpoint_slices: parts
            .iter()
            .filter(|(_, e)| !e.is_empty())
            .flat_map(|(_, e)| docs::<EndpointSlice>(e))
            .collect(),
        http_routes: docs::<HttpRoute>(route),
    };
    let t = translate(&snapshot);
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);

    let dir = tempfile::tempdir().unwrap();
    let yaml = serde_yaml_ng::to_string(&t.config).unwrap();
    let cp = ControlPlane::start(dir.path(), "control", &yaml, ControlPlaneOpts::default()).await;
    let proxy = Proxy::start(
        dir.path(),
        "client",
        ProxyOpts {
            control_plane: Some(cp.grpc),
            ..ProxyOpts::default()
        },
    )
    .await;
    let client = HttpClient::http1();

    assert_cart_route(&client, proxy.outbound, "cart.shop.svc.cluster.local").await;

    for (host, app) in [
        ("ledger.shop", "web"),
        ("ledger.shop:80", "web"),
        ("ledger:8081", "admin"),
        ("ledger.shop.svc.cluster.local:8081", "admin"),
    ] {
        let reply = client.get(proxy.outbound, host, "/", &[]).await.unwrap();
        assert_eq!(reply.status, 200, "{host}: {}", reply.text());
        assert_eq!(reply.text().trim(), app, "{host}");
    }
}

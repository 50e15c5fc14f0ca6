//! Discovery translation tested with the objects a cluster returns: Services, EndpointSlices
//! and Gateway API HTTPRoutes as Kubernetes YAML, deserialized into the real API types.

use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use weft_control::discovery::{ClusterSnapshot, translate};
use weft_proto::model::StringMatch;
use weft_proto::{Limits, validate};

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, appProtocol: http}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: bookinfo}
spec:
  selector: {app: reviews, version: v1}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: bookinfo}
spec:
  selector: {app: reviews, version: v2}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: other}
spec:
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: bookinfo}
spec:
  type: ExternalName
  externalName: legacy.example
"#;

/// Slices for `service` with one ready and one unready endpoint per address.
pub fn slices(service: &str, ready: &[&str], port: u16) -> String {
    let eps: Vec<String> = ready
        .iter()
        .map(|a| format!("  - {{addresses: [\"{a}\"], conditions: {{ready: true}}, zone: z1}}"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-x1\n  namespace: bookinfo\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints:\n{}\n  - {{addresses: [\"127.0.0.99\"], conditions: {{ready: false}}}}\n",
        eps.join("\n")
    )
}

fn docs<T: serde::de::DeserializeOwned>(yaml: &str) -> Vec<T> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| T::deserialize(d).expect("a valid Kubernetes object"))
        .collect()
}

fn snapshot(routes_yaml: &str) -> ClusterSnapshot {
    ClusterSnapshot {
        services: docs::<Service>(SERVICES),
        endpoint_slices: [
            slices("reviews-v1", &["127.0.0.11", "127.0.0.12"], 9080),
            slices("reviews-v2", &["127.0.0.21"], 9080),
        ]
        .iter()
        .flat_map(|y| docs::<EndpointSlice>(y))
        .collect(),
        http_routes: docs::<HttpRoute>(routes_yaml),
    }
}

const CANARY_80_20: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-canary, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
    - backendRefs:
        - {name: reviews-v1, port: 9080, weight: 80}
        - {name: reviews-v2, port: 9080, weight: 20}
    - matches:
        - headers: [{name: X-User-Group, value: beta}]
        - path: {type: PathPrefix, value: /beta}
      backendRefs: [{name: reviews-v2, port: 9080}]
"#;

#[test]
fn httproute_weights_and_header_match_become_weft_rules() {
    let t = translate(&snapshot(CANARY_80_20));
    validate(&t.config, &Limits::default()).expect("the translation validates");

    let svc = t
        .config
        .services
        .iter()
        .find(|s| s.name == "reviews-v1.bookinfo")
        .unwrap();
    let addrs: Vec<_> = svc.endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(
        addrs,
        ["127.0.0.11:9080", "127.0.0.12:9080"],
        "ready endpoints only"
    );
    assert_eq!(svc.endpoints[0].labels["zone"], "z1");

    let route = t
        .config
        .routes
        .iter()
        .find(|r| r.name == "reviews.bookinfo")
        .unwrap();
    assert!(
        route
            .hosts
            .contains(&"reviews.bookinfo.svc.cluster.local".to_owned())
    );
    assert!(
        !route.hosts.contains(&"reviews".to_owned()),
        "short name is ambiguous: reviews exists in two namespaces"
    );
    // Header and path matches are more specific than the catch-all, whatever the YAML order;
    // the two OR'ed matches become two rules.
    assert_eq!(route.rules.len(), 3, "{:#?}", route.rules);
    assert_eq!(
        route.rules[0].matches.path,
        Some(StringMatch::prefix("/beta"))
    );
    assert_eq!(route.rules[1].matches.headers[0].name, "x-user-group");
    assert_eq!(
        route.rules[1].matches.headers[0].value,
        StringMatch::exact("beta")
    );
    for r in &route.rules[..2] {
        assert_eq!(r.backends.len(), 1);
        assert_eq!(r.backends[0].service, "reviews-v2.bookinfo");
    }
    let split: Vec<_> = route.rules[2]
        .backends
        .iter()
        .map(|b| (b.service.as_str(), b.weight()))
        .collect();
    assert_eq!(
        split,
        [("reviews-v1.bookinfo", 80), ("reviews-v2.bookinfo", 20)]
    );
    assert!(route.rules[2].matches.is_any());

    // Services without an HTTPRoute route to themselves; ExternalName is reported, not meshed.
    let own = t
        .config
        .routes
        .iter()
        .find(|r| r.name == "reviews-v1.bookinfo")
        .unwrap();
    assert_eq!(own.rules[0].backends[0].service, "reviews-v1.bookinfo");
    assert!(
        t.warnings.iter().any(|w| w.contains("ExternalName")),
        "{:?}",
        t.warnings
    );
}

#[test]
fn the_deploy_example_translates_cleanly() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/canary/httproute.yaml"
    ))
    .unwrap();
    let t = translate(&snapshot(&example));
    validate(&t.config, &Limits::default()).expect("valid");
    let route = t
        .config
        .routes
        .iter()
        .find(|r| r.name == "reviews.bookinfo")
        .unwrap();
    let weights: Vec<_> = route
        .rules
        .last()
        .unwrap()
        .backends
        .iter()
        .map(|b| b.weight())
        .collect();
    assert_eq!(weights, [90, 10]);
    assert!(
        t.warnings.iter().all(|w| w.contains("ExternalName")),
        "{:?}",
        t.warnings
    );
}

#[test]
fn what_weft_cannot_express_is_left_out_with_a_reason() {
    let bad = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: odd, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}, {group: "", kind: Service, name: ghost}]
  rules:
    - backendRefs: [{name: reviews-v1, weight: 0}, {name: reviews-v2, weight: 0}]
    - backendRefs: [{name: nowhere}, {name: reviews-v1}]
      filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Thing, name: x}}]
"#;
    let t = translate(&snapshot(bad));
    validate(&t.config, &Limits::default()).expect("still a valid configuration");
    let w = t.warnings.join("\n");
    assert!(w.contains("parent Service bookinfo/ghost not found"), "{w}");
    assert!(w.contains("no backend with a positive weight"), "{w}");
    assert!(
        w.contains("backend Service nowhere.bookinfo not found"),
        "{w}"
    );
    assert!(
        w.contains("rule 1: filter ExtensionRef is not supported"),
        "{w}"
    );
    let route = t
        .config
        .routes
        .iter()
        .find(|r| r.name == "reviews.bookinfo")
        .unwrap();
    assert_eq!(route.rules.len(), 1);
    assert_eq!(route.rules[0].backends[0].service, "reviews-v1.bookinfo");
}

#[test]
fn the_base_layer_wins_name_and_host_clashes() {
    use weft_control::discovery::{merge, route_owner};
    let discovered = translate(&snapshot(CANARY_80_20)).config;
    // The operator's file defines reviews-v2.bookinfo itself and answers the host
    // `reviews-v1.bookinfo` with its own route.
    let base = weft_proto::parse_yaml(
        "mesh.yaml",
        r#"
services:
  - name: reviews-v2.bookinfo
    endpoints: [{address: "10.9.9.9:9080"}]
routes:
  - name: pinned
    hosts: [reviews-v1.bookinfo]
    rules:
      - backends: [{service: reviews-v2.bookinfo}]
"#,
        &Limits::default(),
    )
    .unwrap();
    let merged = merge(&base, &discovered);
    validate(&merged, &Limits::default()).expect("the merge validates");
    let v2: Vec<_> = merged
        .services
        .iter()
        .filter(|s| s.name == "reviews-v2.bookinfo")
        .collect();
    assert_eq!(v2.len(), 1);
    assert_eq!(v2[0].endpoints[0].address, "10.9.9.9:9080", "the base's");
    let v1 = merged
        .routes
        .iter()
        .find(|r| r.name == "reviews-v1.bookinfo")
        .unwrap();
    assert!(!v1.hosts.contains(&"reviews-v1.bookinfo".to_owned()));
    assert!(v1.hosts.contains(&"reviews-v1.bookinfo.svc".to_owned()));
    // Nothing discovered: the base alone.
    assert_eq!(merge(&base, &Default::default()), base);

    assert_eq!(
        route_owner(&discovered, "reviews.bookinfo").as_deref(),
        Some("HTTPRoute bookinfo/reviews-canary")
    );
    assert_eq!(
        route_owner(&discovered, "reviews-v1.bookinfo").as_deref(),
        Some("Service bookinfo/reviews-v1 (no HTTPRoute attached)")
    );
    assert_eq!(route_owner(&discovered, "nope"), None);
}

#[test]
fn every_tcp_port_of_a_service_is_meshed_and_routed_by_port() {
    let services = r#"
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00::20"]
  ports:
    - {name: http, port: 9080, appProtocol: http}
    - {name: grpc, port: 9090, appProtocol: grpc}
    - {name: dns, port: 53, protocol: UDP}
"#;
    let slice = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ratings-x1, namespace: bookinfo, labels: {kubernetes.io/service-name: ratings}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: grpc, port: 8090}]
endpoints: [{addresses: ["127.0.0.31"]}]
"#;
    // Attached to the gRPC port only; backends on either port.
    let httproute = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ratings-grpc, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: ratings, port: 9090}]
  rules:
    - matches: [{headers: [{name: x-canary, value: "1"}]}]
      backendRefs: [{name: ratings, port: 9080}]
    - backendRefs: [{name: ratings, port: 9090}]
"#;
    let mut snap = snapshot(httproute);
    snap.services = docs::<Service>(services);
    snap.endpoint_slices = docs::<EndpointSlice>(slice);
    let t = translate(&snap);
    validate(&t.config, &Limits::default()).expect("the translation validates");

    let service = |name: &str| {
        let s = t.config.services.iter().find(|s| s.name == name);
        let s = s.unwrap_or_else(|| panic!("service {name}: {:#?}", t.config.services));
        let addrs: Vec<_> = s.endpoints.iter().map(|e| e.address.clone()).collect();
        (s.protocol, s.ports.clone(), addrs)
    };
    use weft_proto::model::Protocol;
    assert_eq!(
        service("ratings.bookinfo"),
        (
            Protocol::Http1,
            vec![9080],
            vec!["127.0.0.31:8080".to_owned()]
        )
    );
    assert_eq!(
        service("ratings.bookinfo.9090"),
        (
            Protocol::Grpc,
            vec![9090],
            vec!["127.0.0.31:8090".to_owned()]
        )
    );
    assert_eq!(t.config.services.len(), 2, "UDP is not meshed");
    for s in &t.config.services {
        assert_eq!(s.virtual_ips, ["10.96.0.20", "fd00::20"], "{}", s.name);
    }
    // Headless: no cluster IP to stand for the Service.
    let mut headless = snap.clone();
    for svc in &mut headless.services {
        let spec = svc.spec.as_mut().unwrap();
        spec.cluster_ip = Some("None".into());
        spec.cluster_ips = Some(vec!["None".into()]);
    }
    let h = translate(&headless);
    assert!(h.config.services.iter().all(|s| s.virtual_ips.is_empty()));
    assert!(
        t.warnings.iter().any(|w| w.contains("port 53 is UDP")),
        "{:?}",
        t.warnings
    );

    let route = |name: &str| t.config.routes.iter().find(|r| r.name == name).unwrap();
    let first = route("ratings.bookinfo");
    assert!(first.hosts.contains(&"ratings".to_owned()), "{first:?}");
    assert_eq!(first.rules.len(), 1, "the HTTPRoute names port 9090 only");
    assert_eq!(first.rules[0].backends[0].service, "ratings.bookinfo");
    let second = route("ratings.bookinfo.9090");
    assert_eq!(
        second.hosts,
        [
            "ratings:9090",
            "ratings.bookinfo:9090",
            "ratings.bookinfo.svc:9090",
            "ratings.bookinfo.svc.cluster.local:9090"
        ]
    );
    let backends: Vec<_> = second
        .rules
        .iter()
        .map(|r| r.backends[0].service.as_str())
        .collect();
    assert_eq!(backends, ["ratings.bookinfo", "ratings.bookinfo.9090"]);
    assert_eq!(
        weft_control::discovery::route_owner(&t.config, "ratings.bookinfo").unwrap(),
        "Service bookinfo/ratings (no HTTPRoute attached)"
    );

    // Without a port the parentRef attaches to every port's route.
    snap.http_routes = docs::<HttpRoute>(&httproute.replace(", port: 9090}]", "}]"));
    let t = translate(&snap);
    validate(&t.config, &Limits::default()).expect("valid");
    for name in ["ratings.bookinfo", "ratings.bookinfo.9090"] {
        let r = t.config.routes.iter().find(|r| r.name == name).unwrap();
        assert_eq!(r.rules.len(), 2, "{name}: {r:?}");
    }
}

#[test]
fn header_modifier_filters_become_the_rules_header_edits() {
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: edits, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Env, value: prod}]
            add: [{name: x-via, value: weft}]
            remove: [x-debug]
        - type: ResponseHeaderModifier
          responseHeaderModifier: {remove: [server]}
        - type: ExtensionRef
          extensionRef: {group: example.com, kind: Quota, name: gold}
      backendRefs: [{name: reviews-v1}]
    - filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-weft-peer-identity, value: "spiffe://weft.local/ns/bookinfo/sa/admin"}]
      backendRefs: [{name: reviews-v1}]
"#;
    let t = translate(&snapshot(route));
    let cart = t
        .config
        .routes
        .iter()
        .find(|r| r.name == "reviews.bookinfo")
        .expect("the reviews route");
    let edited = cart.rules[0].headers.as_ref().expect("rule 0's edits");
    assert_eq!(edited.request.set["X-Env"], "prod");
    assert_eq!(edited.request.add["x-via"], "weft");
    assert_eq!(edited.request.remove, ["x-debug"]);
    assert_eq!(edited.response.remove, ["server"]);
    // What weft cannot express is named, and the forged identity is left out with its reason.
    assert!(cart.rules[1].headers.is_none(), "{:?}", cart.rules[1]);
    let warnings = t.warnings.join("\n");
    assert!(
        warnings.contains("HTTPRoute bookinfo/edits rule 0: filter ExtensionRef is not supported"),
        "{warnings}"
    );
    assert!(
        warnings.contains("HTTPRoute bookinfo/edits rule 1: header filters left out")
            && warnings.contains("x-weft-peer-identity cannot be edited"),
        "{warnings}"
    );
    validate(&t.config, &Limits::default()).expect("a valid configuration");
}

/// The translation of `http_route` (YAML) in the usual snapshot, validated: the route of
/// `reviews.bookinfo` and the warnings, joined.
fn reviews_route(http_route: &str) -> (weft_proto::model::Route, String) {
    let t = translate(&snapshot(http_route));
    validate(&t.config, &Limits::default()).expect("a valid configuration");
    let route = t
        .config
        .routes
        .iter()
        .find(|r| r.name == "reviews.bookinfo")
        .expect("the reviews route")
        .clone();
    (route, t.warnings.join("\n"))
}

/// The rule of `route` whose path match is the prefix `prefix` (`None`: no path match).
fn rule_at<'r>(
    route: &'r weft_proto::model::Route,
    prefix: Option<&str>,
) -> &'r weft_proto::model::Rule {
    route
        .rules
        .iter()
        .find(|rule| rule.matches.path.as_ref().and_then(|p| p.prefix.as_deref()) == prefix)
        .unwrap_or_else(|| panic!("a rule for {prefix:?}: {route:?}"))
}

#[test]
fn a_cors_filter_becomes_the_rules_cors_policy() {
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: browser, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: CORS
          cors:
            allowOrigins: ["https://shop.example", "https://*.shop.example"]
            allowMethods: [GET, PUT]
            allowHeaders: ["*"]
            exposeHeaders: [x-request-id, "*"]
            allowCredentials: true
            maxAge: 600
      backendRefs: [{name: reviews-v1}]
    - matches: [{path: {type: PathPrefix, value: /public}}]
      filters:
        - type: CORS
          cors: {allowOrigins: ["*"]}
      backendRefs: [{name: reviews-v1}]
    - filters:
        - type: CORS
          cors: {allowOrigins: ["https://shop.example"], allowMethods: [get]}
      backendRefs: [{name: reviews-v1}]
"#;
    let (r, warnings) = reviews_route(route);
    let cors = |path: &str| rule_at(&r, Some(path)).cors.clone();
    let api = cors("/api").expect("/api has a CORS policy");
    assert_eq!(
        api.allow_origins,
        [
            StringMatch::exact("https://shop.example"),
            StringMatch {
                regex: Some(r"https://.*\.shop\.example".into()),
                ..StringMatch::default()
            }
        ]
    );
    assert_eq!(api.allow_methods, ["GET", "PUT"]);
    assert_eq!(api.allow_headers, ["*"]);
    assert_eq!(
        api.expose_headers,
        ["x-request-id"],
        "* is left out with credentials"
    );
    assert_eq!(api.max_age, Some(weft_proto::model::Millis(600_000)));
    assert!(api.allow_credentials);
    let public = cors("/public").expect("/public has a CORS policy");
    assert_eq!(public.allow_origins[0].regex.as_deref(), Some(".*"));
    // The third rule's policy is refused (a lower-case method) and left out, named.
    let last = rule_at(&r, None);
    assert!(last.cors.is_none(), "{last:?}");
    for expected in [
        "HTTPRoute bookinfo/browser rule 0: CORS exposeHeaders \"*\" left out",
        "HTTPRoute bookinfo/browser rule 2: CORS left out: \"get\" is not a method",
    ] {
        assert!(warnings.contains(expected), "{expected}: {warnings}");
    }
}

#[test]
fn rule_timeouts_become_the_rules_timeout_and_per_try_timeout() {
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: slow, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /report}}]
      timeouts: {request: 1m30s, backendRequest: 20s}
      backendRefs: [{name: reviews-v1}]
    - matches: [{path: {type: PathPrefix, value: /stream}}]
      timeouts: {request: 0s}
      backendRefs: [{name: reviews-v1}]
    - timeouts: {request: soon}
      backendRefs: [{name: reviews-v1}]
"#;
    let (r, warnings) = reviews_route(route);
    let rule = |prefix: Option<&str>| rule_at(&r, prefix);
    let report = rule(Some("/report"));
    assert_eq!(report.timeout, Some(weft_proto::model::Millis(90_000)));
    let retries = report.retries.as_ref().expect("a per-try timeout");
    assert_eq!(
        (retries.attempts, retries.per_try_timeout),
        (0, Some(weft_proto::model::Millis(20_000))),
        "one bounded try, no retries added"
    );
    let stream = rule(Some("/stream"));
    assert_eq!(
        (stream.timeout, stream.retries.is_none()),
        (None, true),
        "0s: no timeout"
    );
    assert_eq!(rule(None).timeout, None);
    assert!(
        warnings.contains(
            "HTTPRoute bookinfo/slow rule 2: timeouts.request left out: invalid duration \"soon\""
        ),
        "{warnings}"
    );
}

#[test]
fn a_url_rewrite_filter_becomes_the_rules_rewrite() {
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rewrites, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: URLRewrite
          urlRewrite: {hostname: reviews-internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}}
      backendRefs: [{name: reviews-v1}]
    - matches: [{path: {type: Exact, value: /old}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /new}}
      backendRefs: [{name: reviews-v1}]
    - matches: [{path: {type: Exact, value: /bad}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
      backendRefs: [{name: reviews-v1}]
    - filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /root}}
      backendRefs: [{name: reviews-v1}]
"#;
    let t = translate(&snapshot(route));
    validate(&t.config, &Limits::default()).expect("a valid configuration");
    let rules = &t
        .config
        .routes
        .iter()
        .find(|r| r.name == "reviews.bookinfo")
        .expect("the reviews route")
        .rules;
    let by_name = |n: &str| {
        rules
            .iter()
            .find(|r| r.name.starts_with(&format!("bookinfo/rewrites#{n}")))
            .unwrap_or_else(|| panic!("rule {n} in {rules:?}"))
    };
    let api = by_name("0").rewrite.as_ref().expect("rule 0's rewrite");
    assert_eq!(api.prefix.as_deref(), Some("/v1"));
    assert_eq!(api.host.as_deref(), Some("reviews-internal"));
    assert_eq!(
        by_name("1").rewrite.as_ref().unwrap().path.as_deref(),
        Some("/new")
    );
    // A prefix rewrite on an exact match has no prefix to replace: left out, with the reason.
    assert!(by_name("2").rewrite.is_none());
    let w = t.warnings.join("\n");
    assert!(
        w.contains("HTTPRoute bookinfo/rewrites rule 2: URLRewrite left out")
            && w.contains("needs a rule that matches a path prefix"),
        "{w}"
    );
    // Matching every path, the prefix replaced is `/`.
    let root = by_name("3");
    assert_eq!(root.matches.path, Some(StringMatch::prefix("/")));
    assert_eq!(
        root.rewrite.as_ref().unwrap().prefix.as_deref(),
        Some("/root")
    );
}

/// The `reviews.bookinfo` route's (first) rule made from rule `n` of HTTPRoute `bookinfo/route`.
fn rule_of<'a>(
    t: &'a weft_control::discovery::Translation,
    route: &str,
    n: usize,
) -> Option<&'a weft_proto::model::Rule> {
    t.config
        .routes
        .iter()
        .find(|r| r.name == "reviews.bookinfo")
        .expect("the reviews route")
        .rules
        .iter()
        .find(|r| r.name.starts_with(&format!("bookinfo/{route}#{n}.")))
}

#[test]
fn a_request_redirect_filter_becomes_a_redirect_rule_without_backends() {
    use weft_proto::answer::Redirect;
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: redirects, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - type: RequestRedirect
          requestRedirect:
            scheme: https
            hostname: new.example
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
            statusCode: 301
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-moved, value: "1"}]}
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-env, value: prod}]}
    - matches: [{path: {type: Exact, value: /legacy}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {port: 8443, path: {type: ReplaceFullPath, replaceFullPath: /current}}
    - filters:
        - type: RequestRedirect
          requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
        - type: RequestMirror
          requestMirror: {backendRef: {name: reviews-v2, port: 9080}}
      backendRefs: [{name: reviews-v1, port: 9080}]
    - matches: [{path: {type: PathPrefix, value: /bad-host}}]
      filters: [{type: RequestRedirect, requestRedirect: {hostname: "new.example:8443"}}]
    - matches: [{path: {type: PathPrefix, value: /bad-port}}]
      filters: [{type: RequestRedirect, requestRedirect: {port: 70000}}]
    - matches: [{path: {type: PathPrefix, value: /zero-port}}]
      filters: [{type: RequestRedirect, requestRedirect: {port: 0}}]
    - matches: [{path: {type: PathPrefix, value: /api}}]
      backendRefs: [{name: reviews-v2, port: 9080}]
"#;
    let t = translate(&snapshot(route));
    validate(&t.config, &Limits::default()).expect("a valid configuration");
    let w = t.warnings.join("\n");
    let rule = |n| rule_of(&t, "redirects", n).unwrap_or_else(|| panic!("rule {n}: {t:#?}"));

    // A prefix redirect to https: no backends, the response edits apply, the request edits
    // (which would reach no one) are left out with a warning.
    let old = rule(0);
    assert!(old.backends.is_empty(), "{old:?}");
    assert_eq!(
        old.redirect,
        Some(Redirect {
            scheme: Some("https".into()),
            host: Some("new.example".into()),
            prefix: Some("/new".into()),
            code: Some(301),
            ..Redirect::default()
        })
    );
    let headers = old.headers.as_ref().expect("rule 0's response edits");
    assert_eq!(headers.response.set["x-moved"], "1");
    assert!(headers.request.is_empty(), "{headers:?}");
    assert!(
        w.contains("HTTPRoute bookinfo/redirects rule 0: RequestHeaderModifier left out"),
        "{w}"
    );

    // A full-path redirect gets the Gateway API's default status, 302 (weft's is 301).
    let legacy = rule(1);
    assert!(legacy.backends.is_empty());
    assert_eq!(
        legacy.redirect,
        Some(Redirect {
            port: Some(8443),
            path: Some("/current".into()),
            code: Some(302),
            ..Redirect::default()
        })
    );

    // Matching every path, the prefix replaced is `/`; the backendRefs (and the mirror) are
    // ignored with a warning, since the redirect answers the request.
    let root = rule(2);
    assert_eq!(root.matches.path, Some(StringMatch::prefix("/")));
    assert_eq!(
        root.redirect
            .as_ref()
            .map(|r| (r.prefix.as_deref(), r.code)),
        Some((Some("/v2"), Some(302)))
    );
    assert!(root.backends.is_empty(), "{root:?}");
    assert!(root.mirror.is_none(), "{root:?}");
    assert!(
        w.contains(
            "HTTPRoute bookinfo/redirects rule 2: a RequestRedirect answers the request itself, \
             so its backendRefs, RequestMirror were ignored"
        ),
        "{w}"
    );

    // What weft cannot express is left out (never forwarded), with the reason; the rest stays.
    for (n, reason) in [
        (3, "give the port as redirect.port"),
        (4, "70000 is not a port"),
        (5, "0 is not a port"),
    ] {
        assert!(rule_of(&t, "redirects", n).is_none(), "rule {n}");
        let said = format!(
            "HTTPRoute bookinfo/redirects rule {n}: RequestRedirect cannot be expressed, \
             rule left out: "
        );
        assert!(
            t.warnings
                .iter()
                .any(|l| l.starts_with(&said) && l.contains(reason)),
            "rule {n}: {w}"
        );
    }
    let api = rule(6);
    assert!(api.redirect.is_none());
    assert_eq!(api.backends[0].service, "reviews-v2.bookinfo");
    assert!(
        !w.contains("filter RequestRedirect is not supported"),
        "{w}"
    );
}

#[test]
fn a_request_mirror_filter_becomes_the_rules_mirror() {
    use weft_proto::policy::Mirror;
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirrors, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /quarter}}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: reviews-v2, port: 9080}, percent: 25}
      backendRefs: [{name: reviews-v1, port: 9080}]
    - matches: [{path: {type: PathPrefix, value: /third}}]
      filters:
        - type: RequestMirror
          requestMirror:
            backendRef: {name: reviews-v2, port: 9080}
            fraction: {numerator: 1, denominator: 3}
      backendRefs: [{name: reviews-v1, port: 9080}]
    - matches: [{path: {type: PathPrefix, value: /two-thirds}}]
      filters:
        - type: RequestMirror
          requestMirror:
            backendRef: {name: reviews-v2, port: 9080}
            fraction: {numerator: 2, denominator: 3}
      backendRefs: [{name: reviews-v1, port: 9080}]
    - matches: [{path: {type: PathPrefix, value: /ghost}}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: ghost, port: 9080}}
      backendRefs: [{name: reviews-v1, port: 9080}]
    - matches: [{path: {type: PathPrefix, value: /twice}}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: reviews-v2, port: 9080}}
        - type: RequestMirror
          requestMirror: {backendRef: {name: reviews, namespace: other, port: 80}}
      backendRefs: [{name: reviews-v1, port: 9080}]
"#;
    let t = translate(&snapshot(route));
    validate(&t.config, &Limits::default()).expect("a valid configuration");
    let w = t.warnings.join("\n");
    let rule = |n| rule_of(&t, "mirrors", n).unwrap_or_else(|| panic!("rule {n}: {t:#?}"));
    let to_v2 = |percent| {
        Some(Mirror {
            service: "reviews-v2.bookinfo".into(),
            subset: String::new(),
            percent,
        })
    };
    assert_eq!(rule(0).mirror, to_v2(Some(25)));
    // A fraction becomes the nearest whole percent.
    assert_eq!(rule(1).mirror, to_v2(Some(33)));
    assert_eq!(rule(2).mirror, to_v2(Some(67)));
    // The rule still forwards to its backends.
    for n in 0..5 {
        assert_eq!(
            rule(n).backends[0].service,
            "reviews-v1.bookinfo",
            "rule {n}"
        );
    }
    // An unknown Service: no mirror, and the reason.
    assert!(rule(3).mirror.is_none(), "{:?}", rule(3));
    assert!(
        w.contains(
            "HTTPRoute bookinfo/mirrors rule 3: RequestMirror left out: \
             backend Service ghost.bookinfo not found"
        ),
        "{w}"
    );
    // weft mirrors a rule to one service: the first filter (all requests), and a warning.
    assert_eq!(rule(4).mirror, to_v2(None));
    assert!(
        w.contains(
            "HTTPRoute bookinfo/mirrors rule 4: weft mirrors a rule to one service: \
             the first RequestMirror is kept, 1 more left out"
        ),
        "{w}"
    );
    assert!(!w.contains("filter RequestMirror is not supported"), "{w}");
}

//! Unit tests of route matching; each service has one endpoint whose port names it.

use super::*;
use weft_proto::parse_yaml;

const MESH: &str = r#"
services:
  - {name: exact,   endpoints: [{address: "127.0.0.1:1001"}]}
  - {name: prefix,  endpoints: [{address: "127.0.0.1:1002"}]}
  - {name: regex,   endpoints: [{address: "127.0.0.1:1003"}]}
  - {name: post,    endpoints: [{address: "127.0.0.1:1004"}]}
  - {name: beta,    endpoints: [{address: "127.0.0.1:1005"}]}
  - {name: notbeta, endpoints: [{address: "127.0.0.1:1006"}]}
  - {name: debug,   endpoints: [{address: "127.0.0.1:1007"}]}
  - {name: query,   endpoints: [{address: "127.0.0.1:1008"}]}
  - {name: other,   endpoints: [{address: "127.0.0.1:1009"}]}
  - {name: any,     endpoints: [{address: "127.0.0.1:1010"}]}
  - name: empty
    endpoints: [{address: "127.0.0.1:1011", labels: {version: v1}}]
    subsets: {v2: {version: v2}}
routes:
  - name: main
    hosts: [app.local, APP.example]
    rules:
      - {match: {path: {exact: /exact}}, backends: [{service: exact}]}
      - {match: {path: {regex: "/r/[0-9]+"}}, backends: [{service: regex}]}
      - {match: {path: {prefix: /p/}}, backends: [{service: prefix}]}
      - {match: {methods: [POST, PUT]}, backends: [{service: post}]}
      - {match: {headers: [{name: X-Group, exact: beta}]}, backends: [{service: beta}]}
      - {match: {headers: [{name: x-debug, present: true}, {name: x-env, prefix: prod, invert: true}]}, backends: [{service: debug}]}
      - {match: {query: [{name: q, exact: "a b"}, {name: page, regex: "[0-9]+"}]}, backends: [{service: query}]}
      - {match: {path: {prefix: /empty}}, backends: [{service: empty, subset: v2}]}
      - backends: [{service: other}]
  - name: fallback
    hosts: ["*"]
    rules:
      - backends: [{service: any}]
"#;

fn table() -> Table {
    let cfg = parse_yaml("mesh.yaml", MESH, &Limits::default()).unwrap();
    Table::compile(&cfg, &Limits::default()).unwrap()
}

fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

/// The port of the endpoint a request routes to, or the error.
fn port(t: &Table, r: &Request<()>) -> Result<u16, RouteError> {
    t.route(r).map(|t| t.endpoint.authority.port_u16().unwrap())
}

fn get(t: &Table, host: &str, path: &str) -> Result<u16, RouteError> {
    port(t, &req("GET", path, &[("host", host)]))
}

#[test]
fn hosts_exact_then_wildcard_with_port_and_case_stripped() {
    let t = table();
    assert_eq!(get(&t, "app.local", "/"), Ok(1009));
    assert_eq!(get(&t, "App.Local:8080", "/"), Ok(1009));
    assert_eq!(
        get(&t, "app.example", "/"),
        Ok(1009),
        "hosts are lower-cased"
    );
    assert_eq!(get(&t, "elsewhere", "/"), Ok(1010), "* catches the rest");
    assert_eq!(get(&t, "[::1]:80", "/"), Ok(1010));
    // HTTP/2 and absolute-form: the URI authority wins over Host.
    let r = req("GET", "http://APP.local:1234/exact", &[("host", "nope")]);
    assert_eq!(port(&t, &r), Ok(1001));
    assert_eq!(strip_port("[::1]:80"), "[::1]");
    assert_eq!(strip_port("user@h:1"), "h");
    assert_eq!(strip_port("h"), "h");
}

#[test]
fn a_host_with_a_port_wins_on_that_port_only() {
    // A Kubernetes Service with two ports: `svc` (any port: its first) and `svc:9090`.
    let mesh = r#"
services:
  - {name: first,  endpoints: [{address: "127.0.0.1:2001"}]}
  - {name: second, endpoints: [{address: "127.0.0.1:2002"}]}
  - {name: web,    endpoints: [{address: "127.0.0.1:2003"}]}
routes:
  - {name: svc, hosts: [svc, svc.ns], rules: [{backends: [{service: first}]}]}
  - {name: svc-9090, hosts: ["svc:9090", "SVC.ns:9090"], rules: [{backends: [{service: second}]}]}
  - {name: web, hosts: ["web:80"], rules: [{backends: [{service: web}]}]}
"#;
    let cfg = parse_yaml("mesh.yaml", mesh, &Limits::default()).unwrap();
    let t = Table::compile(&cfg, &Limits::default()).unwrap();
    assert_eq!(get(&t, "svc:9090", "/"), Ok(2002));
    assert_eq!(get(&t, "svc.NS:9090", "/"), Ok(2002));
    assert_eq!(
        get(&t, "svc:9080", "/"),
        Ok(2001),
        "other ports: the portless host"
    );
    assert_eq!(get(&t, "svc", "/"), Ok(2001));
    // No port in the authority: the scheme's default, or where a captured connection went.
    assert_eq!(get(&t, "web", "/"), Ok(2003));
    assert!(
        get(&t, "web:8080", "/").is_err(),
        "web answers port 80 only"
    );
    let captured = |host: &str, port: u16| {
        let r = req("GET", "/", &[("host", host)]);
        let orig = std::net::SocketAddr::from(([10, 0, 0, 1], port));
        t.resolve_at(&r, Some(orig)).map(|r| {
            r.set().expect("forwarded").endpoints()[0]
                .authority
                .port_u16()
                .unwrap()
        })
    };
    assert_eq!(captured("svc", 9090), Ok(2002));
    assert_eq!(
        captured("svc:9080", 9090),
        Ok(2001),
        "the authority's port wins"
    );
    let https = req("GET", "https://web/", &[]);
    assert!(port(&t, &https).is_err(), "https defaults to 443");
    assert_eq!(split_port("[::1]:8080"), ("[::1]", Some(8080)));
    assert_eq!(split_port("u@h:99999"), ("h", None));
    assert_eq!(split_port("h:x"), ("h:x", None));
}

#[test]
fn no_route_names_host_and_path() {
    let cfg = parse_yaml("m", MESH, &Limits::default()).unwrap();
    let mut cfg = cfg;
    cfg.routes.pop();
    let t = Table::compile(&cfg, &Limits::default()).unwrap();
    assert_eq!(
        get(&t, "Foo:80", "/x"),
        Err(RouteError::NoRoute {
            host: "foo".into(),
            path: "/x".into()
        })
    );
}

#[test]
fn paths_exact_prefix_regex_in_rule_order() {
    let t = table();
    assert_eq!(get(&t, "app.local", "/exact"), Ok(1001));
    assert_eq!(get(&t, "app.local", "/exact/"), Ok(1009), "exact is exact");
    assert_eq!(get(&t, "app.local", "/p/x"), Ok(1002));
    assert_eq!(get(&t, "app.local", "/p"), Ok(1009));
    assert_eq!(get(&t, "app.local", "/r/123"), Ok(1003));
    assert_eq!(
        get(&t, "app.local", "/r/12x"),
        Ok(1009),
        "regexes are anchored"
    );
    assert_eq!(
        get(&t, "app.local", "/x/r/1"),
        Ok(1009),
        "regexes are anchored"
    );
}

#[test]
fn methods_match_any_of() {
    let t = table();
    let m = |method| port(&t, &req(method, "/", &[("host", "app.local")]));
    assert_eq!(m("POST"), Ok(1004));
    assert_eq!(m("PUT"), Ok(1004));
    assert_eq!(m("DELETE"), Ok(1009));
}

#[test]
fn headers_exact_present_and_invert() {
    let t = table();
    let h = |headers: &[(&str, &str)]| {
        let mut all = vec![("host", "app.local")];
        all.extend_from_slice(headers);
        port(&t, &req("GET", "/", &all))
    };
    assert_eq!(h(&[("x-group", "beta")]), Ok(1005));
    assert_eq!(h(&[("x-group", "alpha"), ("x-group", "beta")]), Ok(1005));
    assert_eq!(h(&[("x-group", "betamax")]), Ok(1009));
    // present + inverted prefix: x-env absent or not prod*.
    assert_eq!(h(&[("x-debug", "")]), Ok(1007));
    assert_eq!(h(&[("x-debug", "1"), ("x-env", "staging")]), Ok(1007));
    assert_eq!(h(&[("x-debug", "1"), ("x-env", "production")]), Ok(1009));
    assert_eq!(h(&[("x-env", "staging")]), Ok(1009));
}

#[test]
fn query_params_all_must_match_after_decoding() {
    let t = table();
    assert_eq!(get(&t, "app.local", "/?q=a+b&page=3"), Ok(1008));
    assert_eq!(get(&t, "app.local", "/?page=3&x=1&q=a%20b"), Ok(1008));
    assert_eq!(get(&t, "app.local", "/?q=a+b&page=x"), Ok(1009));
    assert_eq!(get(&t, "app.local", "/?q=a+b"), Ok(1009));
    assert_eq!(get(&t, "app.local", "/?page=3"), Ok(1009));
    assert_eq!(decode("100%").as_ref(), b"100%");
    assert_eq!(decode("%4").as_ref(), b"%4");
    assert_eq!(decode("%41%zz").as_ref(), b"A%zz");
}

#[test]
fn empty_subset_is_no_endpoints() {
    let t = table();
    assert_eq!(
        get(&t, "app.local", "/empty"),
        Err(RouteError::NoEndpoints {
            service: "empty".into(),
            subset: "v2".into()
        })
    );
}

#[test]
fn weighted_backends_route_by_weight() {
    let yaml = r#"
services:
  - name: reviews
    endpoints:
      - {address: "127.0.0.1:2001", labels: {version: v1}}
      - {address: "127.0.0.1:2002", labels: {version: v2}}
      - {address: "127.0.0.1:2003", labels: {version: v3}}
    subsets: {v1: {version: v1}, v2: {version: v2}, v3: {version: v3}}
routes:
  - name: reviews
    hosts: [reviews]
    rules:
      - backends:
          - {service: reviews, subset: v1, weight: 90}
          - {service: reviews, subset: v2, weight: 10}
          - {service: reviews, subset: v3, weight: 0}
"#;
    let cfg = parse_yaml("m", yaml, &Limits::default()).unwrap();
    let t = Table::compile(&cfg, &Limits::default()).unwrap();
    let mut counts = [0usize; 3];
    for _ in 0..10_000 {
        let p = get(&t, "reviews", "/").unwrap();
        counts[usize::from(p - 2001)] += 1;
    }
    assert_eq!(counts[2], 0, "weight 0 is never chosen");
    let v1 = counts[0] as f64 / 100.0;
    assert!((88.0..=92.0).contains(&v1), "{counts:?}");
}

#[test]
fn regex_over_the_limit_is_refused() {
    let yaml = MESH.replace("/r/[0-9]+", "/r/[a-z]{50}");
    let cfg = parse_yaml("m", &yaml, &Limits::default()).unwrap();
    let tiny = Limits {
        regex_size_limit: 64,
    };
    let err = Table::compile(&cfg, &tiny).unwrap_err().to_string();
    assert!(err.contains("limit"), "{err}");
}

#[test]
fn captured_requests_route_by_original_destination_when_host_names_no_route() {
    let yaml = r#"
services:
  - {name: server, endpoints: [{address: "10.1.2.2:8080"}]}
  - {name: other,  endpoints: [{address: "10.1.2.3:8080"}]}
  - {name: mysql,  endpoints: [{address: "10.1.2.2:3306"}]}
routes:
  - {name: server, hosts: [server], rules: [{backends: [{service: server}]}]}
  - {name: named,  hosts: [other.example], rules: [{backends: [{service: other}]}]}
"#;
    let cfg = parse_yaml("t.yaml", yaml, &Limits::default()).unwrap();
    let t = Table::compile(&cfg, &Limits::default()).unwrap();
    let req = |host: &str| Request::get("/").header("host", host).body(()).unwrap();
    let service =
        |r: Result<Resolved, RouteError>| r.map(|r| r.set().expect("forwarded").service.clone());
    let server: std::net::SocketAddr = "10.1.2.2:8080".parse().unwrap();
    let other: std::net::SocketAddr = "10.1.2.3:8080".parse().unwrap();
    // Host is the IP: the original destination picks the route of its service.
    assert_eq!(
        service(t.resolve_at(&req("10.1.2.2:8080"), Some(server))),
        Ok("server".into())
    );
    // A route without the service's name in its hosts is still found through its backends.
    assert_eq!(
        service(t.resolve_at(&req("10.1.2.3"), Some(other))),
        Ok("other".into())
    );
    // A Host that names a route wins.
    assert_eq!(
        service(t.resolve_at(&req("server"), Some(other))),
        Ok("server".into())
    );
    assert!(t.resolve_at(&req("10.1.2.2:8080"), None).is_err());
    // Known endpoints (routed or not) are mesh destinations; the rest pass through.
    assert!(t.knows_address(&server));
    assert!(t.knows_address(&"10.1.2.2:3306".parse().unwrap()));
    assert!(!t.knows_address(&"10.1.2.9:80".parse().unwrap()));
}

#[test]
fn a_virtual_ip_stands_for_its_service_on_its_ports() {
    let yaml = r#"
services:
  - name: db
    ports: [3306]
    virtual_ips: ["10.96.0.10", "fd00::10"]
    endpoints: [{address: "10.1.2.2:3306"}, {address: "10.1.2.3:3306"}]
  - {name: web, ports: [80], virtual_ips: ["10.96.0.11"], endpoints: [{address: "10.1.2.4:8080"}]}
routes:
  - {name: web, hosts: [web], rules: [{backends: [{service: web}]}]}
"#;
    let cfg = parse_yaml("t.yaml", yaml, &Limits::default()).unwrap();
    let t = Table::compile(&cfg, &Limits::default()).unwrap();
    let addr = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    assert!(t.knows_address(&addr("10.96.0.10:3306")));
    assert!(t.knows_address(&addr("[fd00::10]:3306")));
    assert!(
        !t.knows_address(&addr("10.96.0.10:80")),
        "only the service's ports"
    );
    // Connections spread over the endpoints behind the virtual IP.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        seen.insert(t.endpoint_behind(&addr("10.96.0.10:3306")).unwrap());
    }
    assert_eq!(seen, [addr("10.1.2.2:3306"), addr("10.1.2.3:3306")].into());
    assert_eq!(t.endpoint_behind(&addr("10.1.2.2:3306")), None);
    // HTTP to a virtual IP whose Host names no route: the service's route.
    let req = Request::get("/")
        .header("host", "10.96.0.11")
        .body(())
        .unwrap();
    let resolved = t.resolve_at(&req, Some(addr("10.96.0.11:80"))).unwrap();
    assert_eq!(resolved.set().expect("forwarded").service, "web");
}

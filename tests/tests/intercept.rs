//! Transparent interception end to end, in network namespaces the tests make: `weft-proxy
//! init` installs the iptables rules in each "pod", the proxies run as uid 1337 in transparent
//! mode, and unmodified clients (`curl`, a raw TCP client) talk to the other pod's IP.
//!
//! Needs root (namespaces, iptables). CI runs as root; elsewhere the tests say loudly that
//! they skip.

use std::path::Path;
use std::time::{Duration, Instant};

use weft_tests::bins::bin;
use weft_tests::netns::{Netns, PodPair, is_root, run};
use weft_tests::procs::Proc;

const PROXY_UID: u32 = 1337;
const DEADLINE: Duration = Duration::from_secs(30);

fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    eprintln!(
        "\n!!!!!!!!!! SKIPPED {test}: not root — the interception tests need network namespaces \
         and iptables (CI runs as root) !!!!!!!!!!\n"
    );
    false
}

fn s(v: &str) -> String {
    v.to_owned()
}

fn proxy_bin() -> String {
    bin("weft-proxy").display().to_string()
}

/// A temp dir the proxy's uid can read (tokens, configs).
fn shared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// `iptables-save -t nat` (and ip6tables) without the timestamp comments.
fn nat_rules(ns: &Netns) -> String {
    let mut out = String::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        let text = ns.output(&[tool, "-t", "nat"]);
        out.extend(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("{l}\n")),
        );
    }
    out
}

fn init(ns: &Netns, extra: &[&str]) {
    let bin = proxy_bin();
    let mut argv = vec![bin.as_str(), "init"];
    argv.extend(extra);
    ns.output(&argv);
}

/// Polls `/ready` at `addr` inside `ns` with `weft-proxy wait-ready`, failing with `proc`'s log.
fn wait_ready(ns: &Netns, proc: &mut Proc, addr: &str) {
    let out = ns
        .command(bin("weft-proxy"))
        .args(["wait-ready", "--admin-addr", addr, "--timeout", "30s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wait-ready {addr}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        proc.log_tail()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ready after"));
}

fn transparent_proxy(ns: &Netns, dir: &Path, name: &str, args: &[String]) -> Proc {
    let mut argv = vec![
        proxy_bin(),
        s("--transparent"),
        s("--outbound-addr"),
        s("127.0.0.1:15001"),
        s("--inbound-addr"),
        s("0.0.0.0:15006"),
        s("--admin-addr"),
        s("0.0.0.0:15020"),
        s("--node-id"),
        s(name),
        s("--workers"),
        s("1"),
        s("--access-log"),
        s("stdout"),
    ];
    argv.extend(args.iter().cloned());
    let mut proc = ns.spawn(name, dir, Some(PROXY_UID), &argv);
    wait_ready(ns, &mut proc, "127.0.0.1:15020");
    proc
}

/// The sum of a metric's samples whose label set contains every `labels` pair.
fn metric(ns: &Netns, name: &str, labels: &[&str]) -> f64 {
    let text = ns.output(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:15020/metrics",
    ]);
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn curl_to_the_other_pods_ip_goes_through_both_sidecars_with_mtls() {
    if !root_or_skip("curl_to_the_other_pods_ip_goes_through_both_sidecars_with_mtls") {
        return;
    }
    let dir = shared_dir();
    let pods = PodPair::new("mtls");
    let (ip_a, ip_b) = (pods.ip_a, pods.ip_b);
    let mesh = format!(
        r#"services:
  - name: client
    endpoints: [{{address: "{ip_a}:8080"}}]
    security:
      identity: spiffe://weft.local/ns/default/sa/client
  - name: server
    endpoints: [{{address: "{ip_b}:8080"}}]
    security:
      identity: spiffe://weft.local/ns/default/sa/server
      peer_authentication: {{mode: strict}}
  # Opaque TCP to the same pod: 3306 declared opaque (server first), 7000 detected as opaque.
  - name: db
    endpoints: [{{address: "{ip_b}:3306"}}, {{address: "{ip_b}:7000"}}]
    security:
      identity: spiffe://weft.local/ns/default/sa/server
  # The same database behind a virtual IP (what discovery makes of a Service's cluster IP).
  - name: db-vip
    ports: [3306]
    virtual_ips: ["10.96.0.10"]
    endpoints: [{{address: "{ip_b}:3306"}}]
    security:
      identity: spiffe://weft.local/ns/default/sa/server
routes:
  - name: server
    hosts: [server]
    rules:
      - backends: [{{service: server}}]
"#
    );
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_path, mesh).unwrap();

    // The control plane runs in pod a (the root namespace is unreachable from the pods); its
    // ports are excluded from pod a's inbound capture.
    let mut cp = pods.a.spawn(
        "control",
        dir.path(),
        None,
        &[
            bin("weft-control").display().to_string(),
            s("--config"),
            mesh_path.display().to_string(),
            s("--grpc-addr"),
            s("0.0.0.0:15010"),
            s("--admin-addr"),
            s("127.0.0.1:15014"),
            s("--state-dir"),
            dir.path().join("state").display().to_string(),
        ],
    );
    wait_ready(&pods.a, &mut cp, "127.0.0.1:15014");
    let token = |sa: &str| {
        let body = pods.a.output(&[
            "curl",
            "-sS",
            "-f",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            &format!(r#"{{"namespace": "default", "service_account": "{sa}"}}"#),
            "http://127.0.0.1:15014/api/v1/identity/token",
        ]);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let path = dir.path().join(format!("{sa}.token"));
        std::fs::write(&path, v["token"].as_str().expect("token")).unwrap();
        path.display().to_string()
    };
    let (token_a, token_b) = (token("client"), token("server"));

    // Interception; running init twice changes nothing.
    init(&pods.a, &["--exclude-inbound-ports", "15020,15010,15014"]);
    let once = nat_rules(&pods.a);
    assert!(
        once.contains("-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "{once}"
    );
    init(&pods.a, &["--exclude-inbound-ports", "15020,15010,15014"]);
    assert_eq!(
        nat_rules(&pods.a),
        once,
        "a second init must yield the same rules"
    );
    init(&pods.b, &["--exclude-inbound-ports", "15020"]);

    let app_bin = bin("weft-netns-app").display().to_string();
    let _app = pods.b.spawn(
        "app",
        dir.path(),
        None,
        &[app_bin.clone(), s("http"), s("0.0.0.0:8080")],
    );
    let db = pods.b.spawn(
        "db",
        dir.path(),
        None,
        &[app_bin.clone(), s("greet"), s("0.0.0.0:3306")],
    );
    let chatty = pods.b.spawn(
        "chatty",
        dir.path(),
        None,
        &[app_bin, s("greet"), s("0.0.0.0:7000")],
    );
    let identity = |sa: &str, token: &str| {
        vec![
            s("--service"),
            s(sa),
            s("--namespace"),
            s("default"),
            s("--service-account"),
            s(sa),
            s("--identity-token-file"),
            s(token),
        ]
    };
    let mut args_a = vec![s("--control-plane"), s("http://127.0.0.1:15010")];
    args_a.extend(identity("client", &token_a));
    let proxy_a = transparent_proxy(&pods.a, dir.path(), "proxy-a", &args_a);
    let mut args_b = vec![s("--control-plane"), format!("http://{ip_a}:15010")];
    args_b.extend(identity("server", &token_b));
    // The injector's probe rewrite: the kubelet asks :15020/app-health/..., the proxy runs the
    // app's original probe on loopback.
    args_b.extend([
        s("--app-probes"),
        s(r#"{"app/readyz": {"path": "/healthz", "port": 8080}}"#),
    ]);
    let proxy_b = transparent_proxy(&pods.b, dir.path(), "proxy-b", &args_b);

    // The app in pod b binds 8080 a moment after its process starts: poll with a deadline.
    let url = format!("http://{ip_b}:8080/hello");
    let start = Instant::now();
    let body = loop {
        let out = pods
            .a
            .command("curl")
            .args(["-sS", "-f", "--max-time", "5", &url])
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "curl {url}: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            proxy_a.log_tail(),
            proxy_b.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        seen["identity"], "spiffe://weft.local/ns/default/sa/client",
        "the server app sees the caller's SPIFFE ID: {seen}"
    );
    assert_eq!(seen["tls"], "TLSv1_3", "{seen}");
    assert_eq!(seen["path"], "/hello");

    // The app may still use the proxy explicitly (Host names the service): not redirected,
    // routed by Host, same mTLS.
    let explicit = pods.a.output(&[
        "curl",
        "-sS",
        "-f",
        "--max-time",
        "5",
        "-H",
        "Host: server",
        "http://127.0.0.1:15001/explicit",
    ]);
    let seen: serde_json::Value = serde_json::from_str(&explicit).unwrap();
    assert_eq!(
        seen["identity"], "spiffe://weft.local/ns/default/sa/client",
        "{seen}"
    );
    assert_eq!(seen["path"], "/explicit");

    // Both sidecars handled it: the client's outbound and the server's inbound.
    let out = metric(
        &pods.a,
        "weft_proxy_requests_total",
        &[
            r#"direction="outbound""#,
            r#"service="server""#,
            r#"code="200""#,
        ],
    );
    assert!(
        out >= 1.0,
        "proxy a counted {out} outbound requests\n{}",
        proxy_a.log_tail()
    );
    let inb = metric(
        &pods.b,
        "weft_proxy_requests_total",
        &[r#"direction="inbound""#, r#"code="200""#],
    );
    assert!(
        inb >= 1.0,
        "proxy b counted {inb} inbound requests\n{}",
        proxy_b.log_tail()
    );

    // Opaque TCP to a service with an identity goes over mTLS too (ALPN weft-tcp), so STRICT
    // accepts it: a server-first port declared opaque, and one where detection gave up.
    wait_listening(&pods.b, "127.0.0.1:3306", &db);
    wait_listening(&pods.b, "127.0.0.1:7000", &chatty);
    // The virtual IP is routed out of pod a (as a cluster's would be) and never answered
    // there: only the proxy, capturing it, can reach the endpoint behind it.
    run(pods
        .a
        .command("ip")
        .args(["route", "add", "10.96.0.0/16", "dev", "eth0"]));
    for dest in [
        format!("{ip_b}:3306"),
        format!("{ip_b}:7000"),
        "10.96.0.10:3306".to_owned(),
    ] {
        let (_, v) = first_byte(&pods, &dest);
        assert_eq!(v["greeting"], "220 weft greeting\n", "{dest}: {v}");
        assert_eq!(v["echo"], "ping\n", "{dest}: {v}");
    }
    let tunnels_out = metric(
        &pods.a,
        "weft_proxy_tcp_connections_opened_total",
        &[r#"listener="mesh_tcp""#],
    );
    let tunnels_in = metric(
        &pods.b,
        "weft_proxy_tcp_connections_opened_total",
        &[r#"listener="inbound_mesh_tcp""#],
    );
    let plain_in = metric(
        &pods.b,
        "weft_proxy_tcp_connections_opened_total",
        &[r#"listener="inbound_passthrough""#],
    );
    assert_eq!(
        (tunnels_out, tunnels_in, plain_in),
        (3.0, 3.0, 0.0),
        "opaque connections over mTLS out of a, into b, and in plaintext into b\n{}\n{}",
        proxy_a.log_tail(),
        proxy_b.log_tail()
    );
    // Plaintext to the opaque port (sent as the proxy's uid, which pod a does not capture) is
    // refused under STRICT: it is no longer the way around mTLS it used to be.
    let plain = pods
        .a
        .command("setpriv")
        .args([
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            "curl",
            "-sS",
            "--max-time",
            "5",
        ])
        .arg(format!("http://{ip_b}:3306/"))
        .output()
        .unwrap();
    assert!(
        !plain.status.success(),
        "plaintext to a STRICT opaque port got through: {}",
        String::from_utf8_lossy(&plain.stdout)
    );
    let cfg: serde_json::Value = serde_json::from_str(&pods.b.output(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:15020/config",
    ]))
    .unwrap();
    assert_eq!(
        cfg["identity"]["authz"]["plaintext_refused"], 1,
        "{}",
        cfg["identity"]["authz"]
    );

    // Probes from outside the pod (as the kubelet sends them) reach the health port, which is
    // not captured, and are answered with the app's own status.
    let probe = |path: &str| {
        pods.a.output(&[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            &format!("http://{ip_b}:15020{path}"),
        ])
    };
    assert_eq!(probe("/app-health/app/readyz"), "200");
    assert_eq!(probe("/app-health/app/livez"), "404");

    // --cleanup removes every weft chain and jump.
    init(&pods.a, &["--cleanup"]);
    let after = nat_rules(&pods.a);
    assert!(!after.contains("WEFT"), "left after --cleanup:\n{after}");
    init(&pods.a, &["--cleanup"]);
}

/// Runs the server-first client in pod a against `dest`; returns (ms to the first byte, output).
fn first_byte(pods: &PodPair, dest: &str) -> (f64, serde_json::Value) {
    let out = pods.a.output(&[
        &bin("weft-netns-app").display().to_string(),
        "first-byte",
        dest,
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    (v["ms"].as_f64().unwrap(), v)
}

/// Polls until something accepts on `addr` inside `ns` (directly, not through a proxy).
fn wait_listening(ns: &Netns, addr: &str, app: &Proc) {
    let start = Instant::now();
    let client = bin("weft-netns-app");
    while !ns
        .command(&client)
        .args(["connect", addr])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(
            start.elapsed() < DEADLINE,
            "nothing listens on {addr} in {}\n{}",
            ns.name,
            app.log_tail()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn server_first_ports_declared_opaque_never_wait_for_detection() {
    if !root_or_skip("server_first_ports_declared_opaque_never_wait_for_detection") {
        return;
    }
    let dir = shared_dir();
    let pods = PodPair::new("opaque");
    let ip_b = pods.ip_b;
    // No identities here: static config, no control plane.
    let mesh = format!(
        r#"services:
  - name: mysql
    endpoints: [{{address: "{ip_b}:3306"}}]
  - name: chatty
    endpoints: [{{address: "{ip_b}:7000"}}]
  - name: ws
    endpoints: [{{address: "{ip_b}:8090"}}]
  - name: tls
    endpoints: [{{address: "{ip_b}:8443"}}]
routes:
  - name: ws
    hosts: [ws]
    rules:
      - backends: [{{service: ws}}]
"#
    );
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_path, mesh).unwrap();
    for ns in [&pods.a, &pods.b] {
        init(ns, &["--exclude-inbound-ports", "15020"]);
    }
    let app = bin("weft-netns-app").display().to_string();
    let mysql = pods.b.spawn(
        "mysql",
        dir.path(),
        None,
        // Dual-stack: the IPv6 check below uses it too.
        &[app.clone(), s("greet"), s("[::]:3306")],
    );
    let chatty = pods.b.spawn(
        "chatty",
        dir.path(),
        None,
        &[app.clone(), s("greet"), s("0.0.0.0:7000")],
    );
    let ws = pods.b.spawn(
        "ws",
        dir.path(),
        None,
        &[app.clone(), s("upgrade"), s("0.0.0.0:8090")],
    );
    let tls_app = pods
        .b
        .spawn("tls", dir.path(), None, &[app, s("tls"), s("0.0.0.0:8443")]);
    let config = vec![s("--config"), mesh_path.display().to_string()];
    let proxy_a = transparent_proxy(&pods.a, dir.path(), "proxy-a", &config);
    let _proxy_b = transparent_proxy(&pods.b, dir.path(), "proxy-b", &config);

    for (port, app) in [
        (3306, &mysql),
        (7000, &chatty),
        (8090, &ws),
        (8443, &tls_app),
    ] {
        wait_listening(&pods.b, &format!("127.0.0.1:{port}"), app);
    }

    // 3306 is in the default opaque list: the greeting arrives without detection (best of
    // three, so one scheduling hiccup on a busy CI machine does not decide).
    let dest = format!("{ip_b}:3306");
    let mut best = f64::MAX;
    for _ in 0..3 {
        let (ms, v) = first_byte(&pods, &dest);
        assert_eq!(v["greeting"], "220 weft greeting\n", "{v}");
        assert_eq!(v["echo"], "ping\n", "{v}");
        best = best.min(ms);
    }
    assert!(
        best < 50.0,
        "first byte of a declared opaque port after {best} ms"
    );

    // IPv6: ip6tables captured it and IP6T_SO_ORIGINAL_DST recovered [ip6_b]:3306 (the
    // proxies listen on [::1]:15001 and [::]:15006 too). The latency bound is asserted over
    // IPv4 above: a fresh IPv6 link may still be resolving its neighbours (one SYN
    // retransmit, 1 s).
    match pods.ip6_b {
        Some(ip6_b) => {
            let (_, v) = first_byte(&pods, &format!("[{ip6_b}]:3306"));
            assert_eq!(v["greeting"], "220 weft greeting\n", "{v}");
            assert_eq!(v["echo"], "ping\n", "{v}");
            let v6_in = metric(
                &pods.b,
                "weft_proxy_tcp_connections_opened_total",
                &[r#"listener="inbound_passthrough""#],
            );
            assert!(
                v6_in >= 4.0,
                "proxy b passed {v6_in} inbound connections to the app"
            );
        }
        None => {
            eprintln!("!!!!!!!!!! the kernel has no IPv6: the IPv6 check is skipped !!!!!!!!!!")
        }
    }

    // 7000 is not declared: it still works, once detection gave up waiting (100 ms per side).
    let (ms, v) = first_byte(&pods, &format!("{ip_b}:7000"));
    assert_eq!(v["greeting"], "220 weft greeting\n", "{v}");
    assert_eq!(v["echo"], "ping\n", "{v}");
    assert!(
        ms >= 100.0,
        "an undeclared server-first port waited only {ms} ms: no detection?"
    );

    // A WebSocket upgrade to a mesh service with an HTTP route is routed as a request by both
    // sidecars (captured: by the service behind the address), then spliced after the 101.
    let out = pods.a.output(&[
        &bin("weft-netns-app").display().to_string(),
        "upgrade-client",
        &format!("{ip_b}:8090"),
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["status"], "101", "{v}");
    assert_eq!(v["echo"], "frame\n", "{v}");

    // The app's own TLS (SNI app.example, not the mesh's) passes through both sidecars.
    let body = pods.a.output(&[
        "curl",
        "-sS",
        "-k",
        "--max-time",
        "10",
        "--resolve",
        &format!("app.example:8443:{ip_b}"),
        "https://app.example:8443/",
    ]);
    assert_eq!(body, "tls ok");

    // 3 × 3306, 7000 and TLS: all opaque on proxy a.
    let passthrough = metric(
        &pods.a,
        "weft_proxy_tcp_connections_opened_total",
        &[r#"listener="passthrough""#],
    );
    assert!(
        passthrough >= 5.0,
        "proxy a passed through {passthrough} connections\n{}",
        proxy_a.log_tail()
    );
    // The upgrade was a request on both sides, answered 101.
    for (pod, direction) in [(&pods.a, "outbound"), (&pods.b, "inbound")] {
        let switched = metric(
            pod,
            "weft_proxy_requests_total",
            &[&format!(r#"direction="{direction}""#), r#"code="101""#],
        );
        assert_eq!(
            switched,
            1.0,
            "{direction} upgrades\n{}",
            proxy_a.log_tail()
        );
    }
}

#[test]
fn registry_only_closes_connections_outside_the_mesh_and_allow_any_passes_them() {
    if !root_or_skip("registry_only_closes_connections_outside_the_mesh_and_allow_any_passes_them")
    {
        return;
    }
    let dir = shared_dir();
    let pods = PodPair::new("egress");
    let (ip_a, ip_b) = (pods.ip_a, pods.ip_b);
    // Port 7000 of each pod is a mesh service; 7100 is not.
    let mesh = format!(
        r#"services:
  - name: chatty-a
    endpoints: [{{address: "{ip_a}:7000"}}]
  - name: chatty-b
    endpoints: [{{address: "{ip_b}:7000"}}]
"#
    );
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_path, mesh).unwrap();
    let app = bin("weft-netns-app").display().to_string();
    let mut apps = Vec::new();
    for ns in [&pods.a, &pods.b] {
        init(ns, &["--exclude-inbound-ports", "15020"]);
        for port in [7000, 7100] {
            let greet = ns.spawn(
                &format!("greet-{port}"),
                dir.path(),
                None,
                &[app.clone(), s("greet"), format!("0.0.0.0:{port}")],
            );
            wait_listening(ns, &format!("127.0.0.1:{port}"), &greet);
            apps.push(greet);
        }
    }
    let config = vec![s("--config"), mesh_path.display().to_string()];
    let mut registry_only = config.clone();
    registry_only.extend([s("--outbound-traffic-policy"), s("registry-only")]);
    let proxy_a = transparent_proxy(&pods.a, dir.path(), "proxy-a", &registry_only);
    let _proxy_b = transparent_proxy(&pods.b, dir.path(), "proxy-b", &config);
    let greet_from = |ns: &Netns, dest: String| {
        let out = ns
            .command(bin("weft-netns-app"))
            .args(["first-byte", &dest])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };

    // Registry-only pod a: the mesh service answers, the other port is closed unanswered.
    let (ok, out) = greet_from(&pods.a, format!("{ip_b}:7000"));
    assert!(
        ok && out.contains("220 weft greeting"),
        "{out}\n{}",
        proxy_a.log_tail()
    );
    let (ok, out) = greet_from(&pods.a, format!("{ip_b}:7100"));
    assert!(
        !ok && !out.contains("greeting"),
        "outside the mesh, answered: {out}"
    );
    assert_eq!(
        metric(
            &pods.a,
            "weft_proxy_tcp_connections_opened_total",
            &[r#"listener="blackhole""#]
        ),
        1.0,
        "{}",
        proxy_a.log_tail()
    );
    // Allow-any pod b (the default) still passes the same kind of destination through.
    let (ok, out) = greet_from(&pods.b, format!("{ip_a}:7100"));
    assert!(ok && out.contains("220 weft greeting"), "{out}");
    assert_eq!(
        metric(
            &pods.b,
            "weft_proxy_tcp_connections_opened_total",
            &[r#"listener="blackhole""#]
        ),
        0.0
    );
}

/// The injector and the proxy agree on flags: the init container's args, run with
/// `--dry-run`, produce the rules (no root needed), and the legacy hook's `wait-ready` is a
/// command the proxy knows.
#[test]
fn the_injected_init_args_are_what_weft_proxy_init_takes() {
    use weft_control::inject::{Decision, InjectConfig, inject};
    let pod = serde_json::json!({
        "metadata": {"name": "p", "annotations": {"weft.io/native-sidecar": "false"}},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    });
    let Decision::Patch(ops) = inject(&pod, &InjectConfig::default()).unwrap() else {
        panic!("not injected")
    };
    let containers: Vec<&serde_json::Value> = ops.iter().map(|op| &op["value"]).collect();
    let find = |name: &str| {
        containers
            .iter()
            .flat_map(|v| match v.as_array() {
                Some(list) => list.iter().collect::<Vec<_>>(),
                None => vec![*v],
            })
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name} in {ops:?}"))
            .clone()
    };
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let init_args = strings(&find("weft-init")["args"]);
    let out = std::process::Command::new(bin("weft-proxy"))
        .args(&init_args)
        .args(["--dry-run", "--no-ipv6"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{init_args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("-A WEFT_INBOUND -p tcp --dport 15020 -j RETURN"),
        "{stdout}"
    );
    assert!(stdout.contains("--uid-owner 1337"), "{stdout}");

    let proxy = find("weft-proxy");
    let proxy_args = strings(&proxy["args"]);
    assert!(proxy_args.contains(&s("--transparent")));
    // Every flag the injector gives the proxy is one the proxy has.
    let proxy_help = std::process::Command::new(bin("weft-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    let proxy_help = String::from_utf8_lossy(&proxy_help.stdout);
    let known: Vec<&str> = proxy_help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=')
        .collect();
    for flag in proxy_args.iter().filter(|a| a.starts_with("--")) {
        assert!(known.contains(&flag.as_str()), "weft-proxy has no {flag}");
    }
    // The identity proof is the projected token the pod mounts, for the audience the control
    // plane reviews.
    let after = |flag: &str| {
        let i = proxy_args.iter().position(|a| a == flag).unwrap();
        proxy_args[i + 1].clone()
    };
    assert_eq!(after("--service-account"), "$(SERVICE_ACCOUNT)");
    let token_file = after("--identity-token-file");
    let mount = proxy["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "weft-token")
        .unwrap()["mountPath"]
        .as_str()
        .unwrap()
        .to_owned();
    let volumes: Vec<&serde_json::Value> = ops
        .iter()
        .flat_map(|op| match op["value"].as_array() {
            Some(list) => list.iter().collect::<Vec<_>>(),
            None => vec![&op["value"]],
        })
        .filter(|v| v["name"] == "weft-token" && v.get("projected").is_some())
        .collect();
    let source = &volumes[0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(
        token_file,
        format!("{mount}/{}", source["path"].as_str().unwrap())
    );
    assert_eq!(source["audience"], weft_control::tokenreview::AUDIENCE);
    let hook = strings(&proxy["lifecycle"]["postStart"]["exec"]["command"]);
    assert_eq!(hook[..2], ["weft-proxy", "wait-ready"]);
    let help = std::process::Command::new(bin("weft-proxy"))
        .args([&hook[1], "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in hook[2..].iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(flag.as_str()),
            "wait-ready has no {flag}: {help}"
        );
    }
}

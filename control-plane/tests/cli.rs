//! The real binaries: `weft-control` started on port 0 with `--addr-file`, driven by
//! `weftctl`. Children are killed by a drop guard; every wait polls with a deadline.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CONTROL: &str = env!("CARGO_BIN_EXE_weft-control");
const WEFTCTL: &str = env!("CARGO_BIN_EXE_weftctl");
const MESH: &str = include_str!("../src/default-mesh.yaml");
const DEADLINE: Duration = Duration::from_secs(20);

/// Kills the child when the test ends, however it ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct ControlPlane {
    child: Guard,
    admin: SocketAddr,
    log: PathBuf,
}

impl ControlPlane {
    fn start(dir: &Path) -> Self {
        let addr_file = dir.join("addrs.json");
        let _ = std::fs::remove_file(&addr_file);
        let log = dir.join("control.log");
        let child = Command::new(CONTROL)
            .arg("--config")
            .arg(dir.join("mesh.yaml"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(["--webhook-addr", "127.0.0.1:0"])
            .arg("--addr-file")
            .arg(&addr_file)
            .args(["--watch-interval", "50", "--log", "info"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut cp = ControlPlane {
            child: Guard(child),
            admin: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        let addrs: serde_json::Value = cp.poll("the address file", || {
            let text = std::fs::read_to_string(&addr_file).ok()?;
            serde_json::from_str(&text).ok()
        });
        assert!(
            addrs["grpc"]
                .as_str()
                .unwrap()
                .parse::<SocketAddr>()
                .is_ok()
        );
        cp.admin = addrs["admin"].as_str().unwrap().parse().unwrap();
        let admin = cp.admin;
        cp.poll("/ready", || (get(admin, "/ready")? == 200).then_some(()));
        cp
    }

    fn url(&self) -> String {
        format!("http://{}", self.admin)
    }

    fn weftctl(&self, args: &[&str]) -> Output {
        Command::new(WEFTCTL)
            .args(["--server", &self.url()])
            .args(args)
            .output()
            .unwrap()
    }

    /// Polls `f` until `Some`, failing early (with the log) if the process died.
    fn poll<T>(&mut self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(v) = f() {
                return v;
            }
            if let Some(status) = self.child.0.try_wait().unwrap() {
                panic!(
                    "weft-control exited ({status}) before {what}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        let out = self.weftctl(&["-o", "json", "status"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Polls `weftctl -o json status` until `f` returns `Some`.
    fn wait_status<T>(&mut self, what: &str, f: impl Fn(&serde_json::Value) -> Option<T>) -> T {
        let url = self.url();
        self.poll(what, || {
            let out = Command::new(WEFTCTL)
                .args(["--server", &url, "-o", "json", "status"])
                .output()
                .ok()?;
            f(&serde_json::from_slice(&out.stdout).ok()?)
        })
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.0.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A plain HTTP/1.1 GET; the status code, or `None` if the server is not up yet.
fn get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.get(9..12)?.parse().ok()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn check_validates_and_exits_2_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, MESH).unwrap();
    let out = Command::new(CONTROL)
        .arg("--check")
        .arg("--config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ok (1 services, 1 routes)"));

    let bad = dir.path().join("bad.yaml");
    let yaml = MESH.replace("address: \"127.0.0.1:19082\"", "address: \"nowhere\"");
    std::fs::write(&bad, &yaml).unwrap();
    let expected = format!("{}:{}:", bad.display(), line_of(&yaml, "nowhere"));
    let out = Command::new(CONTROL)
        .arg("--check")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains(&expected),
        "{}",
        text(&out.stderr)
    );

    // Starting (not --check) with an invalid file fails the same way, before binding.
    let out = Command::new(CONTROL)
        .arg("--config")
        .arg(&bad)
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--webhook-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains(&expected),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn weftctl_drives_a_running_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), MESH).unwrap();
    let cp = ControlPlane::start(dir.path());

    let out = cp.weftctl(&["routes"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let routes = text(&out.stdout);
    assert!(
        routes.contains("route reviews\n  hosts: reviews"),
        "{routes}"
    );
    assert!(
        routes.contains("header x-user-group = beta → reviews/v2 100%"),
        "{routes}"
    );
    assert!(
        routes.contains("→ reviews/v1 100%, reviews/v2 0%"),
        "{routes}"
    );

    let out = cp.weftctl(&["set-weight", "reviews", "v1=50", "v2=50"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "route reviews rule #1: v1=50 v2=50 → version 2"
    );

    let status = cp.status();
    assert_eq!(status["version"], 2);
    assert_eq!(
        status["source"],
        dir.path().join("mesh.yaml").display().to_string()
    );
    assert!(status["proxies"].as_array().unwrap().is_empty());
    assert!(status["last_source_error"].is_null());
    let out = cp.weftctl(&["status"]);
    assert!(
        text(&out.stdout).contains("version: 2"),
        "{}",
        text(&out.stdout)
    );

    // A refused apply: exit 1, the server's reason (with apply:line) on stderr.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        MESH.replace("hosts: [reviews]", "hosts: [\"bad host\"]"),
    )
    .unwrap();
    let out = cp.weftctl(&["apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("apply:{}:", line_of(MESH, "hosts: [reviews]"))),
        "{err}"
    );

    let good = dir.path().join("good.yaml");
    std::fs::write(&good, MESH).unwrap();
    let out = cp.weftctl(&["apply", "-f", good.to_str().unwrap()]);
    assert_eq!(
        text(&out.stdout).trim(),
        "applied: version 3",
        "{}",
        text(&out.stderr)
    );
    let out = cp.weftctl(&["apply", "-f", good.to_str().unwrap()]);
    assert_eq!(text(&out.stdout).trim(), "unchanged (version 3)");

    // Unknown route: exit 1 with the server's error.
    let out = cp.weftctl(&["set-weight", "ratings", "v1=1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no route named \"ratings\""),
        "{}",
        text(&out.stderr)
    );

    // WEFT_SERVER is honoured; a dead server is named in the error.
    let out = Command::new(WEFTCTL)
        .env("WEFT_SERVER", cp.url())
        .arg("status")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let url = cp.url();
    assert!(cp.terminate().success(), "graceful exit on SIGTERM");
    let out = Command::new(WEFTCTL)
        .args(["--server", &url, "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("cannot connect to weft-control at {url}")),
        "{err}"
    );
}

#[test]
fn file_edits_reload_and_state_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mesh.yaml");
    std::fs::write(&config, MESH).unwrap();
    let cp = ControlPlane::start(dir.path());
    assert!(
        cp.weftctl(&["set-weight", "reviews", "v1=30", "v2=70"])
            .status
            .success()
    );

    // A restart with the same file resumes the mutated config at its version.
    assert!(cp.terminate().success());
    let mut cp = ControlPlane::start(dir.path());
    let status = cp.status();
    assert_eq!(status["version"], 2);
    let out = cp.weftctl(&["routes"]);
    assert!(text(&out.stdout).contains("reviews/v1 30%, reviews/v2 70%"));

    // An invalid edit is refused and reported; a valid one wins over the API mutation.
    std::fs::write(&config, MESH.replace("rules:", "rulez:")).unwrap();
    let err = cp.wait_status("the refused edit", |s| {
        s["last_source_error"].as_str().map(str::to_owned)
    });
    assert!(err.contains(&format!("{}:", config.display())), "{err}");
    assert_eq!(cp.status()["version"], 2, "old config stays live");
    let edited = MESH
        .replace("weight: 100", "weight: 90")
        .replace("weight: 0}", "weight: 10}");
    std::fs::write(&config, edited).unwrap();
    cp.wait_status("the reload", |s| (s["version"] == 3).then_some(()));
    assert!(cp.status()["last_source_error"].is_null());
    let out = cp.weftctl(&["routes"]);
    assert!(text(&out.stdout).contains("reviews/v1 90%, reviews/v2 10%"));
}

/// The control plane's Deployment in `deploy/` passes flags this binary takes (a renamed or
/// mistyped flag would crash-loop the pod).
#[test]
fn the_deployed_args_are_flags_weft_control_takes() {
    use clap::Parser as _;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/base/control-plane.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let mut checked = 0;
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let doc: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc).unwrap();
        if doc["kind"] != "Deployment" {
            continue;
        }
        for c in doc["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap()
        {
            let args: Vec<&str> = c["args"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            let argv = std::iter::once("weft-control").chain(args.iter().copied());
            let parsed = weft_control::flags::Args::try_parse_from(argv)
                .unwrap_or_else(|e| panic!("{path}: {args:?}: {e}"));
            let webhook = parsed.options().webhook.expect("the injector is served");
            assert_eq!(
                webhook.inject.control_plane,
                "http://weft-control.weft-system.svc:15010"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 1, "one control-plane container in {path}");
}

#[test]
fn durations_in_flags_take_hours_and_sums() {
    use clap::Parser as _;
    let ttl = |extra: &[&str]| {
        let argv = ["weft-control"].into_iter().chain(extra.iter().copied());
        weft_control::flags::Args::try_parse_from(argv).map(|a| a.options().ca.cert_ttl)
    };
    assert_eq!(ttl(&[]).unwrap(), Duration::from_secs(24 * 3600), "default");
    assert_eq!(
        ttl(&["--cert-ttl", "1h30m"]).unwrap(),
        Duration::from_secs(5400)
    );
    assert_eq!(
        ttl(&["--cert-ttl", "500ms"]).unwrap(),
        Duration::from_millis(500)
    );
    let err = ttl(&["--cert-ttl", "1d"]).unwrap_err().to_string();
    assert!(
        err.contains("--cert-ttl") && err.contains("each number needs a unit: h, m, s or ms"),
        "{err}"
    );
}

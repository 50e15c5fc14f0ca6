//! Network namespaces made by a test, for the interception tests: two "pods" joined by a veth
//! pair (created inside the namespaces, never in the host's), commands run in them with
//! `ip netns exec` (optionally as another uid through `setpriv`), and everything deleted when
//! the handle drops — also when the test panics.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::procs::Proc;

/// Whether this process runs as root (needed for namespaces and iptables).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Runs `cmd`, panicking with its stderr unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One network namespace; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Netns {
        // A namespace left over by a killed earlier run with this name goes first.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run(ns.command("ip").args(["link", "set", "lo", "up"]));
        ns
    }

    /// `program` to run inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `argv` inside the namespace and returns its stdout (panics on failure).
    pub fn output(&self, argv: &[&str]) -> String {
        let out = run(self.command(argv[0]).args(&argv[1..]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `argv` inside the namespace, as `uid`/gid `uid` when given; killed on drop.
    pub fn spawn(&self, name: &str, dir: &Path, uid: Option<u32>, argv: &[String]) -> Proc {
        let mut args: Vec<String> = vec!["netns".into(), "exec".into(), self.name.clone()];
        if let Some(uid) = uid {
            args.extend([
                "setpriv".into(),
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
            ]);
        }
        args.extend(argv.iter().cloned());
        Proc::spawn(name, Path::new("ip"), &args, dir)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Two pods on one /24, `a` at .1 and `b` at .2, each with `eth0`; also on one IPv6 /64
/// when the kernel has IPv6 (ULA, `::1` and `::2`, no duplicate-address detection so they are
/// usable at once).
pub struct PodPair {
    pub a: Netns,
    pub b: Netns,
    pub ip_a: Ipv4Addr,
    pub ip_b: Ipv4Addr,
    /// `None` when the kernel has no IPv6.
    pub ip6_b: Option<Ipv6Addr>,
}

impl PodPair {
    /// Names and subnet are unique per process and call (the namespaces are isolated, so the
    /// subnet only has to differ between the pairs of one run).
    pub fn new(tag: &str) -> PodPair {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let a = Netns::new(format!("weft-{tag}-{pid}-{seq}-a"));
        let b = Netns::new(format!("weft-{tag}-{pid}-{seq}-b"));
        let net = [10, 100 + (seq % 100) as u8, (pid % 256) as u8];
        let ip_a = Ipv4Addr::new(net[0], net[1], net[2], 1);
        let ip_b = Ipv4Addr::new(net[0], net[1], net[2], 2);
        run(a.command("ip").args([
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b.name,
        ]));
        let ipv6 = Path::new("/proc/net/if_inet6").exists();
        let ip6 = |host| Ipv6Addr::new(0xfd77, seq as u16, (pid & 0xffff) as u16, 0, 0, 0, 0, host);
        for (ns, ip, ip6) in [(&a, ip_a, ip6(1)), (&b, ip_b, ip6(2))] {
            run(ns
                .command("ip")
                .args(["addr", "add", &format!("{ip}/24"), "dev", "eth0"]));
            if ipv6 {
                run(ns.command("ip").args([
                    "-6",
                    "addr",
                    "add",
                    &format!("{ip6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ]));
            }
            run(ns.command("ip").args(["link", "set", "eth0", "up"]));
        }
        PodPair {
            a,
            b,
            ip_a,
            ip_b,
            ip6_b: ipv6.then(|| ip6(2)),
        }
    }
}

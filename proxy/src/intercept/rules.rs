//! The interception ruleset as a pure function: options in, `iptables-restore` input out.
//!
//! Istio's layout, with weft's names. In the `nat` table:
//! - `PREROUTING → WEFT_INBOUND`: inbound TCP (minus excluded ports, or only the included
//!   ones) jumps to `WEFT_IN_REDIRECT`, which redirects to the proxy's inbound port.
//! - `OUTPUT → WEFT_OUTPUT`: the proxy's own traffic (uid/gid) returns, so nothing loops; the
//!   app's traffic to loopback is left alone; the proxy calling its own pod IP goes to
//!   `WEFT_IN_REDIRECT` (it is then inbound traffic, as in Istio); excluded ports and CIDRs
//!   return; what remains (or only the included CIDRs) jumps to `WEFT_REDIRECT` → the
//!   outbound port.
//!
//! The whole ruleset is one `iptables-restore --noflush` input: the `:CHAIN` lines create or
//! flush weft's chains, then the jumps from the built-in chains are deleted (when present)
//! and added again, so running it twice yields the same rules and it applies atomically.

use std::fmt::Write as _;
use std::net::IpAddr;

/// weft's chains, all in the `nat` table.
pub const CHAINS: [&str; 4] = [
    "WEFT_INBOUND",
    "WEFT_IN_REDIRECT",
    "WEFT_OUTPUT",
    "WEFT_REDIRECT",
];

/// The jumps from built-in chains into weft's chains.
pub const JUMPS: [(&str, &str); 2] = [("PREROUTING", "WEFT_INBOUND"), ("OUTPUT", "WEFT_OUTPUT")];

/// IPv4 or IPv6: which tool and which loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    pub fn restore_tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    pub fn save_tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
}

/// A CIDR as `iptables -d` takes it; parsed so that bad input is refused before any rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR (e.g. 10.0.0.0/8): bad address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `*` (everything) or an explicit list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection<T> {
    All,
    Only(Vec<T>),
}

/// What to capture; mirrors the `weft-proxy init` flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub include_inbound_ports: Selection<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub include_outbound_cidrs: Selection<Cidr>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            proxy_uid: 1337,
            proxy_gid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            include_inbound_ports: Selection::All,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_outbound_cidrs: Selection::All,
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

fn of_family(c: &Cidr, family: Family) -> bool {
    c.addr.is_ipv4() == (family == Family::V4)
}

impl Rules {
    /// The `iptables-restore --noflush` input that installs the rules for `family`;
    /// `jumps` are the jumps into weft's chains already there (see [`existing_jumps`]),
    /// deleted first so they are never doubled.
    pub fn install(&self, family: Family, jumps: &[Vec<String>]) -> String {
        let mut out = String::from("*nat\n");
        for chain in CHAINS {
            // Creates the chain, or flushes it if it exists (with --noflush, only ours).
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        delete_jumps(&mut out, jumps);
        let (uid, gid, lo) = (self.proxy_uid, self.proxy_gid, family.loopback());
        let mut rule = |r: String| {
            out.push_str(&r);
            out.push('\n');
        };
        rule(format!(
            "-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        rule(format!(
            "-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        ));

        // Inbound. The proxy's own ports are never captured: a redirect to them would loop.
        let mut excluded = self.exclude_inbound_ports.clone();
        excluded.push(self.inbound_port);
        excluded.push(self.outbound_port);
        excluded.sort_unstable();
        excluded.dedup();
        for port in &excluded {
            rule(format!("-A WEFT_INBOUND -p tcp --dport {port} -j RETURN"));
        }
        match &self.include_inbound_ports {
            Selection::All => rule("-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT".into()),
            Selection::Only(ports) => {
                for port in ports {
                    rule(format!(
                        "-A WEFT_INBOUND -p tcp --dport {port} -j WEFT_IN_REDIRECT"
                    ));
                }
            }
        }

        // Outbound, in Istio's order: the proxy calling its own pod IP over lo is inbound
        // traffic; the app's loopback traffic is its own business; the proxy's traffic leaves
        // as it is (no loop).
        for owner in [format!("--uid-owner {uid}"), format!("--gid-owner {gid}")] {
            rule(format!(
                "-A WEFT_OUTPUT ! -d {lo} -o lo -p tcp -m owner {owner} -j WEFT_IN_REDIRECT"
            ));
            rule(format!("-A WEFT_OUTPUT -o lo -m owner ! {owner} -j RETURN"));
            rule(format!("-A WEFT_OUTPUT -m owner {owner} -j RETURN"));
        }
        rule(format!("-A WEFT_OUTPUT -d {lo} -j RETURN"));
        for port in &self.exclude_outbound_ports {
            rule(format!("-A WEFT_OUTPUT -p tcp --dport {port} -j RETURN"));
        }
        for cidr in self
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| of_family(c, family))
        {
            rule(format!("-A WEFT_OUTPUT -d {cidr} -j RETURN"));
        }
        match &self.include_outbound_cidrs {
            Selection::All => rule("-A WEFT_OUTPUT -p tcp -j WEFT_REDIRECT".into()),
            Selection::Only(cidrs) => {
                for cidr in cidrs.iter().filter(|c| of_family(c, family)) {
                    rule(format!("-A WEFT_OUTPUT -d {cidr} -p tcp -j WEFT_REDIRECT"));
                }
            }
        }
        for (from, to) in JUMPS {
            rule(format!("-A {from} -p tcp -j {to}"));
        }
        out.push_str("COMMIT\n");
        out
    }
}

/// The `iptables-restore --noflush` input that removes weft's chains (flushed first, since a
/// chain can only be deleted when empty and unreferenced). `existing` are the chains present.
pub fn cleanup(existing: &[&str], jumps: &[Vec<String>]) -> String {
    let mut out = String::from("*nat\n");
    delete_jumps(&mut out, jumps);
    for chain in CHAINS.iter().filter(|c| existing.contains(c)) {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for chain in CHAINS.iter().filter(|c| existing.contains(c)) {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

fn delete_jumps(out: &mut String, jumps: &[Vec<String>]) {
    for jump in jumps {
        let _ = writeln!(out, "-D {}", jump.join(" "));
    }
}

/// The jump rules (as `iptables -D` arguments) present in an `iptables-save -t nat` dump, so
/// they can be deleted before the chains are installed or removed.
pub fn existing_jumps(save: &str) -> Vec<Vec<String>> {
    save.lines()
        .filter_map(|line| line.strip_prefix("-A "))
        .filter(|rule| {
            let mut words = rule.split_whitespace();
            let chain = words.next().unwrap_or("");
            JUMPS.iter().any(|(from, _)| *from == chain)
                && rule
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w[0] == "-j" && CHAINS.contains(&w[1]))
        })
        .map(|rule| rule.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// weft's chains present in an `iptables-save -t nat` dump.
pub fn existing_chains(save: &str) -> Vec<&'static str> {
    CHAINS
        .into_iter()
        .filter(|chain| {
            save.lines().any(|l| {
                l.strip_prefix(':')
                    .and_then(|l| l.split_whitespace().next())
                    == Some(chain)
            })
        })
        .collect()
}

/// Parses a comma-separated port list (`80,443`); empty means none.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
        })
        .collect()
}

/// Parses a comma-separated CIDR list; empty means none.
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::parse)
        .collect()
}

/// `*` or a list, parsed with `item`.
pub fn parse_selection<T>(
    s: &str,
    item: fn(&str) -> Result<Vec<T>, String>,
) -> Result<Selection<T>, String> {
    if s.trim() == "*" {
        Ok(Selection::All)
    } else {
        item(s).map(Selection::Only)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_capture_everything_but_the_proxy() {
        let v4 = Rules::default().install(Family::V4, &[]);
        assert_eq!(
            v4,
            "*nat
:WEFT_INBOUND - [0:0]
:WEFT_IN_REDIRECT - [0:0]
:WEFT_OUTPUT - [0:0]
:WEFT_REDIRECT - [0:0]
-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A WEFT_INBOUND -p tcp --dport 15001 -j RETURN
-A WEFT_INBOUND -p tcp --dport 15006 -j RETURN
-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT
-A WEFT_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j WEFT_IN_REDIRECT
-A WEFT_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A WEFT_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner 1337 -j WEFT_IN_REDIRECT
-A WEFT_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A WEFT_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A WEFT_OUTPUT -d 127.0.0.1/32 -j RETURN
-A WEFT_OUTPUT -p tcp -j WEFT_REDIRECT
-A PREROUTING -p tcp -j WEFT_INBOUND
-A OUTPUT -p tcp -j WEFT_OUTPUT
COMMIT
"
        );
        assert!(
            Rules::default()
                .install(Family::V6, &[])
                .contains("! -d ::1/128 -o lo")
        );
    }

    #[test]
    fn includes_and_excludes_per_family() {
        let rules = Rules {
            include_inbound_ports: Selection::Only(vec![8080, 9090]),
            exclude_inbound_ports: vec![15020, 15006],
            exclude_outbound_ports: vec![5432],
            include_outbound_cidrs: Selection::Only(parse_cidrs("10.0.0.0/8,fd00::/8").unwrap()),
            exclude_outbound_cidrs: parse_cidrs("10.96.0.1").unwrap(),
            ..Rules::default()
        };
        let v4 = rules.install(Family::V4, &[]);
        for line in [
            "-A WEFT_INBOUND -p tcp --dport 15020 -j RETURN",
            "-A WEFT_INBOUND -p tcp --dport 8080 -j WEFT_IN_REDIRECT",
            "-A WEFT_INBOUND -p tcp --dport 9090 -j WEFT_IN_REDIRECT",
            "-A WEFT_OUTPUT -p tcp --dport 5432 -j RETURN",
            "-A WEFT_OUTPUT -d 10.96.0.1/32 -j RETURN",
            "-A WEFT_OUTPUT -d 10.0.0.0/8 -p tcp -j WEFT_REDIRECT",
        ] {
            assert!(v4.lines().any(|l| l == line), "{line} missing from\n{v4}");
        }
        assert_eq!(
            v4.matches("--dport 15006 -j RETURN").count(),
            1,
            "deduplicated"
        );
        assert!(!v4.contains("-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT"));
        assert!(!v4.contains("fd00::"));
        let v6 = rules.install(Family::V6, &[]);
        assert!(v6.contains("-A WEFT_OUTPUT -d fd00::/8 -p tcp -j WEFT_REDIRECT"));
        assert!(!v6.contains("10.0.0.0"));
    }

    #[test]
    fn parsing_refuses_bad_input_with_reasons() {
        assert_eq!(parse_ports(" 80, 443,").unwrap(), [80, 443]);
        assert!(parse_ports("0").unwrap_err().contains("not a port"));
        assert!(parse_ports("http").unwrap_err().contains("\"http\""));
        assert!(parse_cidrs("10.0.0.0/33").unwrap_err().contains("0..=32"));
        assert!(parse_cidrs("ten/8").unwrap_err().contains("bad address"));
        assert_eq!(parse_selection("*", parse_ports).unwrap(), Selection::All);
        assert_eq!(
            parse_selection("", parse_ports).unwrap(),
            Selection::Only(vec![])
        );
    }

    #[test]
    fn finds_existing_jumps_and_chains_in_a_dump() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:WEFT_OUTPUT - [0:0]\n:WEFT_REDIRECT - [0:0]\n\
                    -A PREROUTING -p tcp -j WEFT_INBOUND\n-A OUTPUT -p tcp -j OTHER\n\
                    -A OUTPUT -p tcp -j WEFT_OUTPUT\n-A WEFT_OUTPUT -p tcp -j WEFT_REDIRECT\nCOMMIT\n";
        let jumps = existing_jumps(save);
        assert_eq!(jumps.len(), 2);
        assert_eq!(jumps[0].join(" "), "PREROUTING -p tcp -j WEFT_INBOUND");
        assert_eq!(existing_chains(save), ["WEFT_OUTPUT", "WEFT_REDIRECT"]);
        // Installing again deletes the old jumps in the same transaction before adding them.
        let again = Rules::default().install(Family::V4, &jumps);
        let lines: Vec<&str> = again.lines().collect();
        let deleted = lines
            .iter()
            .position(|l| *l == "-D PREROUTING -p tcp -j WEFT_INBOUND")
            .unwrap();
        let added = lines
            .iter()
            .position(|l| *l == "-A PREROUTING -p tcp -j WEFT_INBOUND")
            .unwrap();
        assert!(deleted < added, "{again}");
        assert_eq!(again.matches("-A PREROUTING").count(), 1);
        assert_eq!(
            cleanup(&["WEFT_OUTPUT"], &jumps[1..]),
            "*nat\n-D OUTPUT -p tcp -j WEFT_OUTPUT\n:WEFT_OUTPUT - [0:0]\n-X WEFT_OUTPUT\nCOMMIT\n"
        );
    }
}

//! `weftctl`'s human-readable output: pure functions from API answers to text, so the
//! formatting is unit-tested without a server.

use std::fmt::Write as _;

use weft_proto::model::{Backend, NamedMatch, Route, RouteMatch, StringMatch};

use crate::api;

/// NACK reasons longer than this are cut in the status table (`-o json` has them whole).
const NACK_WIDTH: usize = 60;

/// `weftctl status`: the version and source (and, for replicas on etcd, who leads), then one
/// row per proxy. Proxies not on the current version are marked with `*`.
pub fn status(s: &api::Status, leader: Option<&crate::leader::LeaderStatus>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "version: {}", s.version);
    let _ = writeln!(out, "source:  {}", s.source);
    if let Some(l) = leader.filter(|l| l.mode != "single") {
        let who = match (&l.leader, l.is_leader) {
            (_, true) => format!("{} (this replica)", l.replica),
            (Some(other), false) => format!("{other} (this replica is {})", l.replica),
            (None, false) => format!("none yet: election running (this replica is {})", l.replica),
        };
        let _ = writeln!(out, "leader:  {who}");
    }
    if let Some(err) = &s.last_source_error {
        let _ = writeln!(
            out,
            "source error (last edit refused, version {} stays live):",
            s.version
        );
        let _ = writeln!(out, "  {err}");
    }
    if let Some(err) = &s.last_discovery_error {
        let _ = writeln!(
            out,
            "discovery error (last Kubernetes snapshot refused, version {} stays live):",
            s.version
        );
        let _ = writeln!(out, "  {err}");
    }
    if let Some(err) = &s.roster_error {
        let _ = writeln!(out, "proxies of other replicas may be missing:");
        let _ = writeln!(out, "  {err}");
    }
    out.push('\n');
    if s.proxies.is_empty() {
        out.push_str("no proxies have connected\n");
        return out;
    }
    // Replicas on etcd: which one each proxy streams from.
    let replicas = s.proxies.iter().any(|p| p.replica.is_some());
    let mut head = vec!["NODE", "SERVICE"];
    if replicas {
        head.push("REPLICA");
    }
    head.extend(["CONNECTED", "ACKED", "NACK"]);
    let mut rows = vec![head.into_iter().map(str::to_owned).collect::<Vec<_>>()];
    let mut behind = false;
    for p in &s.proxies {
        let stale = p.acked_version != Some(s.version);
        behind |= stale;
        let acked = p
            .acked_version
            .map_or_else(|| "-".to_owned(), |v| v.to_string());
        let nack = p.last_nack.as_ref().map_or_else(
            || "-".to_owned(),
            |n| truncate(&format!("v{}: {}", n.version, n.error), NACK_WIDTH),
        );
        let or_dash = |v: &str| if v.is_empty() { "-" } else { v }.to_owned();
        let mut row = vec![p.node_id.clone(), or_dash(&p.service)];
        if replicas {
            row.push(or_dash(p.replica.as_deref().unwrap_or_default()));
        }
        row.extend([
            if p.connected { "yes" } else { "no" }.to_owned(),
            if stale { format!("{acked} *") } else { acked },
            nack,
        ]);
        rows.push(row);
    }
    let mut widths = vec![0; rows[0].len()];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths.iter().copied()).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if behind {
        let _ = writeln!(out, "\n* not on the current version {}", s.version);
    }
    out
}

/// `weftctl routes`: per route its hosts and each rule's match → backends as percentages.
pub fn routes(r: &api::Routes) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "version: {}", r.version);
    if r.routes.is_empty() {
        out.push_str("\nno routes\n");
    }
    for route in &r.routes {
        out.push('\n');
        out.push_str(&route_text(route));
    }
    out
}

fn route_text(route: &Route) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "route {}", route.name);
    let _ = writeln!(out, "  hosts: {}", route.hosts.join(", "));
    for (i, rule) in route.rules.iter().enumerate() {
        let name = if rule.name.is_empty() {
            String::new()
        } else {
            format!(" ({})", rule.name)
        };
        let _ = writeln!(
            out,
            "  #{i}{name}: {} → {}",
            match_summary(&rule.matches),
            answer_summary(rule).unwrap_or_else(|| backends_summary(&rule.backends))
        );
        if let Some(cors) = &rule.cors {
            // The origins are what a "CORS error" in a browser is usually about.
            let origins: Vec<_> = cors.allow_origins.iter().map(string_match).collect();
            let _ = writeln!(out, "      cors origins: {}", origins.join(", "));
        }
    }
    out
}

/// `path prefix /api, method GET|POST, header x-user-group = beta`, or `any request`.
pub fn match_summary(m: &RouteMatch) -> String {
    let mut parts = Vec::new();
    if let Some(path) = &m.path {
        parts.push(format!("path {}", string_match(path)));
    }
    if !m.methods.is_empty() {
        parts.push(format!("method {}", m.methods.join("|")));
    }
    let named = |kind: &str, n: &NamedMatch| {
        let not = if n.invert { "not " } else { "" };
        format!("{kind} {} {not}{}", n.name, string_match(&n.value))
    };
    parts.extend(m.headers.iter().map(|h| named("header", h)));
    parts.extend(m.query.iter().map(|q| named("query", q)));
    if parts.is_empty() {
        "any request".to_owned()
    } else {
        parts.join(", ")
    }
}

fn string_match(m: &StringMatch) -> String {
    if let Some(s) = &m.exact {
        format!("= {s}")
    } else if let Some(s) = &m.prefix {
        format!("prefix {s}")
    } else if let Some(s) = &m.regex {
        format!("~ {s}")
    } else if m.present == Some(true) {
        "present".to_owned()
    } else if m.present == Some(false) {
        "absent".to_owned()
    } else {
        "(any)".to_owned()
    }
}

/// `redirect 308 (scheme https, prefix /new)` or `respond 404`, for a rule that answers itself.
fn answer_summary(rule: &weft_proto::model::Rule) -> Option<String> {
    if let Some(d) = &rule.direct_response {
        return Some(format!("respond {}", d.status));
    }
    let r = rule.redirect.as_ref()?;
    let parts: Vec<String> = [
        ("scheme", r.scheme.clone()),
        ("host", r.host.clone()),
        ("port", r.port.map(|p| p.to_string())),
        ("path", r.path.clone()),
        ("prefix", r.prefix.clone()),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some(format!("{k} {}", v?)))
    .collect();
    let code = r.code_or_default();
    Some(if parts.is_empty() {
        format!("redirect {code}")
    } else {
        format!("redirect {code} ({})", parts.join(", "))
    })
}

/// `reviews/v1 90%, reviews/v2 10%`.
pub fn backends_summary(backends: &[Backend]) -> String {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight())).sum();
    backends
        .iter()
        .map(|b| format!("{} {}", b.label(), percent(b.weight(), total)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn percent(weight: u32, total: u64) -> String {
    if total == 0 {
        return "0%".to_owned();
    }
    let p = f64::from(weight) * 100.0 / total as f64;
    if (p - p.round()).abs() < 0.05 {
        format!("{}%", p.round())
    } else {
        format!("{p:.1}%")
    }
}

/// `weftctl set-weight`: `route reviews rule #1: v1=90 v2=10 → version 7`.
pub fn set_weight(resp: &api::SetWeightsResponse, weights: &[(String, u32)]) -> String {
    let split = weights
        .iter()
        .map(|(n, w)| format!("{n}={w}"))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "route {} rule #{}: {split} → version {}",
        resp.route, resp.rule, resp.version
    )
}

/// `-o json`: the answer as pretty JSON.
pub fn json(v: &impl serde::Serialize) -> String {
    // Serializing plain data to a String cannot fail; say so rather than panic if it does.
    serde_json::to_string_pretty(v)
        .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
}

/// `weftctl apply`: the new version, or `unchanged`.
pub fn apply(resp: &api::ApplyResponse) -> String {
    if resp.unchanged {
        format!("unchanged (version {})", resp.version)
    } else {
        format!("applied: version {}", resp.version)
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let cut: String = s.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::EMBEDDED_MESH;
    use weft_proto::{Limits, parse_yaml};

    fn proxy(id: &str, acked: Option<u64>, nack: Option<&str>) -> api::ProxyStatus {
        api::ProxyStatus {
            node_id: id.into(),
            service: "reviews".into(),
            namespace: String::new(),
            labels: Default::default(),
            connected: acked.is_some(),
            acked_version: acked,
            last_nack: nack.map(|e| api::LastNack {
                version: 8,
                error: e.into(),
                at_unix_ms: 1,
            }),
            connected_at_unix_ms: 1,
            last_ack_at_unix_ms: None,
            admin_addr: None,
            replica: None,
        }
    }

    #[test]
    fn status_table_marks_stale_proxies() {
        let s = api::Status {
            version: 7,
            source: "embedded".into(),
            last_source_error: None,
            last_discovery_error: None,
            proxies: vec![
                proxy("a-proxy", Some(7), None),
                proxy("b", None, Some(&"x".repeat(100))),
            ],
            nacks: vec![],
            roster_error: None,
        };
        let text = status(&s, None);
        assert!(text.contains("version: 7\nsource:  embedded\n"), "{text}");
        assert!(
            text.contains("NODE     SERVICE  CONNECTED  ACKED  NACK"),
            "{text}"
        );
        assert!(
            text.contains("a-proxy  reviews  yes        7      -\n"),
            "{text}"
        );
        assert!(
            text.contains("b        reviews  no         - *    v8: xxx"),
            "{text}"
        );
        assert!(text.contains("…"), "{text}");
        assert!(text.contains("* not on the current version 7"), "{text}");
        assert!(!text.contains("leader:"), "{text}");
        let leader = crate::leader::LeaderStatus {
            replica: "cp-b".into(),
            is_leader: false,
            leader: Some("cp-a".into()),
            mode: "etcd".into(),
        };
        let text = status(&s, Some(&leader));
        assert!(
            text.contains("source:  embedded\nleader:  cp-a (this replica is cp-b)\n"),
            "{text}"
        );
    }

    #[test]
    fn status_table_of_replicas_names_each_proxys_replica_and_a_partial_list() {
        let mut a = proxy("a-proxy", Some(7), None);
        a.replica = Some("cp-a".into());
        let mut b = proxy("b", Some(7), None);
        b.replica = Some("cp-b".into());
        let s = api::Status {
            version: 7,
            source: "embedded".into(),
            last_source_error: None,
            last_discovery_error: None,
            proxies: vec![a, b],
            nacks: vec![],
            roster_error: Some("only this replica's proxies are listed: etcd down".into()),
        };
        let text = status(&s, None);
        assert!(
            text.contains("NODE     SERVICE  REPLICA  CONNECTED  ACKED  NACK\n"),
            "{text}"
        );
        assert!(
            text.contains("b        reviews  cp-b     yes        7      -\n"),
            "{text}"
        );
        assert!(
            text.contains("proxies of other replicas may be missing:\n  only this replica's proxies are listed: etcd down\n"),
            "{text}"
        );
    }

    #[test]
    fn routes_show_matches_and_percentages() {
        let cfg = parse_yaml("t", EMBEDDED_MESH, &Limits::default()).unwrap();
        let text = routes(&api::Routes {
            version: 3,
            routes: cfg.routes,
        });
        assert!(text.contains("route reviews\n  hosts: reviews\n"), "{text}");
        assert!(
            text.contains("#0 (beta-users): header x-user-group = beta → reviews/v2 100%"),
            "{text}"
        );
        assert!(
            text.contains("#1 (default): any request → reviews/v1 100%, reviews/v2 0%"),
            "{text}"
        );
        assert_eq!(percent(1, 3), "33.3%");
        assert_eq!(percent(0, 0), "0%");
        let yaml = "services: [{name: a, endpoints: [{address: \"127.0.0.1:9\"}]}]
routes:
  - name: a
    hosts: [a]
    rules:
      - {match: {path: {prefix: /old}}, redirect: {scheme: https, prefix: /new, code: 308}}
      - {redirect: {port: 8443}}
      - {match: {path: {exact: /gone}}, direct_response: {status: 410}}
      - {backends: [{service: a}], cors: {allow_origins: [{exact: \"https://a.example\"}, {regex: \"https://.*\"}]}}
";
        let cfg = parse_yaml("t", yaml, &Limits::default()).unwrap();
        let text = routes(&api::Routes {
            version: 1,
            routes: cfg.routes,
        });
        for line in [
            "#0: path prefix /old → redirect 308 (scheme https, prefix /new)",
            "#1: any request → redirect 301 (port 8443)\n",
            "#2: path = /gone → respond 410",
            "#3: any request → a 100%\n      cors origins: = https://a.example, ~ https://.*\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }

    #[test]
    fn mutation_lines() {
        let resp = api::SetWeightsResponse {
            version: 7,
            route: "reviews".into(),
            rule: 1,
        };
        let w = [("v1".to_owned(), 90), ("v2".to_owned(), 10)];
        assert_eq!(
            set_weight(&resp, &w),
            "route reviews rule #1: v1=90 v2=10 → version 7"
        );
        let a = api::ApplyResponse {
            version: 4,
            unchanged: true,
        };
        assert_eq!(apply(&a), "unchanged (version 4)");
    }
}

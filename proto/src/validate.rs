//! Validation of a [`MeshConfig`]: every rule the data plane relies on, checked before a
//! configuration is accepted by the control plane or applied by a proxy.
//!
//! Errors name the offending node by path (`routes[0].rules[1].backends[0]`) and, when the
//! configuration came from text, by `file:line` (see [`crate::locate`]).

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use crate::locate::{self, Seg};
use crate::model::{MeshConfig, NamedMatch, RetryPolicy, Rule, StringMatch};

/// Limits that differ between who validates: a proxy may compile regexes with a smaller budget
/// than the control plane allows, and then NACKs what it cannot afford.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Upper bound, in bytes, on one compiled regex (see `regex::RegexBuilder::size_limit`).
    pub regex_size_limit: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            regex_size_limit: 1 << 20,
        }
    }
}

/// Retry conditions a route may name; numeric HTTP statuses (`503`) are accepted too.
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// One problem in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub path: Vec<Seg>,
    pub reason: String,
    /// 1-based line in the source text, once located.
    pub line: Option<usize>,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        write!(f, "{}: {}", locate::display_path(&self.path), self.reason)
    }
}

/// Why a configuration was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    #[error("{source_name}:{line}:{column}: {message}")]
    Syntax {
        source_name: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{source_name}: {message}")]
    Unreadable {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: invalid configuration: {}", join(source_name, issues))]
    Invalid {
        source_name: String,
        issues: Vec<Issue>,
    },
}

fn join(source_name: &str, issues: &[Issue]) -> String {
    let mut out = String::new();
    for (i, issue) in issues.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        match issue.line {
            Some(line) => out.push_str(&format!(
                "{source_name}:{line}: {}: {}",
                locate::display_path(&issue.path),
                issue.reason
            )),
            None => out.push_str(&issue.to_string()),
        }
    }
    out
}

/// Parses YAML text into a validated configuration; errors carry `source_name:line`.
pub fn parse_yaml(
    source_name: &str,
    text: &str,
    limits: &Limits,
) -> Result<MeshConfig, ConfigError> {
    let cfg: MeshConfig = match serde_yaml_ng::from_str(text) {
        Ok(cfg) => cfg,
        Err(e) => {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            return Err(ConfigError::Syntax {
                source_name: source_name.to_owned(),
                line,
                column,
                message: e.to_string(),
            });
        }
    };
    validate(&cfg, limits).map_err(|mut issues| {
        for issue in &mut issues {
            issue.line = locate::line_of(text, &issue.path);
        }
        ConfigError::Invalid {
            source_name: source_name.to_owned(),
            issues,
        }
    })?;
    Ok(cfg)
}

/// Checks a configuration; returns every problem found, not just the first.
pub fn validate(cfg: &MeshConfig, limits: &Limits) -> Result<(), Vec<Issue>> {
    let mut v = Validator {
        issues: Vec::new(),
        limits,
    };
    v.config(cfg);
    v.issues.extend(crate::security::validate(cfg));
    if v.issues.is_empty() {
        Ok(())
    } else {
        Err(v.issues)
    }
}

struct Validator<'a> {
    issues: Vec<Issue>,
    limits: &'a Limits,
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_owned())
}

fn at(base: &[Seg], more: impl IntoIterator<Item = Seg>) -> Vec<Seg> {
    let mut p = base.to_vec();
    p.extend(more);
    p
}

impl Validator<'_> {
    fn fail(&mut self, path: Vec<Seg>, reason: impl Into<String>) {
        self.issues.push(Issue {
            path,
            reason: reason.into(),
            line: None,
        });
    }

    fn config(&mut self, cfg: &MeshConfig) {
        let mut services: HashMap<&str, BTreeSet<&str>> = HashMap::new();
        let mut vips: HashMap<(std::net::IpAddr, u16), &str> = HashMap::new();
        for (i, svc) in cfg.services.iter().enumerate() {
            let p = vec![key("services"), Seg::Index(i)];
            for (j, vip) in svc.virtual_ips.iter().enumerate() {
                let vp = at(&p, [key("virtual_ips"), Seg::Index(j)]);
                let Ok(ip) = vip.parse::<std::net::IpAddr>() else {
                    self.fail(
                        vp,
                        format!("invalid virtual IP {vip:?}: give an IP address"),
                    );
                    continue;
                };
                if svc.ports.is_empty() {
                    self.fail(vp, "a virtual IP needs the service's ports");
                }
                for port in &svc.ports {
                    if let Some(other) = vips.insert((ip, *port), &svc.name) {
                        self.fail(
                            at(&p, [key("virtual_ips"), Seg::Index(j)]),
                            format!("{vip} port {port} already stands for service {other:?}"),
                        );
                    }
                }
            }
            if !is_dns_name(&svc.name) {
                self.fail(
                    at(&p, [key("name")]),
                    format!(
                        "invalid service name {:?}: use lower-case letters, digits, '-' and '.'",
                        svc.name
                    ),
                );
            }
            let subsets = svc.subsets.keys().map(String::as_str).collect();
            if services.insert(&svc.name, subsets).is_some() {
                self.fail(
                    at(&p, [key("name")]),
                    format!("duplicate service {:?}", svc.name),
                );
            }
            for (j, port) in svc.ports.iter().enumerate() {
                if *port == 0 {
                    self.fail(
                        at(&p, [key("ports"), Seg::Index(j)]),
                        "port 0 is not a port",
                    );
                }
            }
            let mut seen = BTreeSet::new();
            for (j, ep) in svc.endpoints.iter().enumerate() {
                let ep_path = at(&p, [key("endpoints"), Seg::Index(j)]);
                if let Err(reason) = check_address(&ep.address) {
                    self.fail(at(&ep_path, [key("address")]), reason);
                }
                if !seen.insert(ep.address.as_str()) {
                    self.fail(
                        at(&ep_path, [key("address")]),
                        format!("duplicate endpoint {:?}", ep.address),
                    );
                }
                if ep.weight == Some(0) {
                    self.fail(
                        at(&ep_path, [key("weight")]),
                        "endpoint weight must be at least 1 (remove the endpoint to drain it)",
                    );
                }
            }
            for name in svc.subsets.keys() {
                if name.is_empty() || name.contains('/') || name.contains('=') {
                    self.fail(
                        at(&p, [key("subsets"), key(name)]),
                        format!("invalid subset name {name:?}"),
                    );
                }
            }
            for (field, value) in [
                ("connect_timeout", svc.policy.connect_timeout),
                ("idle_timeout", svc.policy.idle_timeout),
            ] {
                if value.is_some_and(|m| m.0 == 0) {
                    self.fail(
                        at(&p, [key("policy"), key(field)]),
                        format!("{field} must be positive"),
                    );
                }
            }
            let pp = at(&p, [key("policy")]);
            for (path, reason) in crate::policy::check_cluster_policy(&pp, &svc.policy) {
                self.fail(path, reason);
            }
            for (path, reason) in crate::upstream_tls::check(&p, svc) {
                self.fail(path, reason);
            }
        }

        let mut hosts: HashMap<String, &str> = HashMap::new();
        let mut route_names = BTreeSet::new();
        for (i, route) in cfg.routes.iter().enumerate() {
            let p = vec![key("routes"), Seg::Index(i)];
            if route.name.is_empty() {
                self.fail(at(&p, [key("name")]), "route name is empty");
            } else if !route_names.insert(route.name.as_str()) {
                self.fail(
                    at(&p, [key("name")]),
                    format!("duplicate route {:?}", route.name),
                );
            }
            if route.hosts.is_empty() {
                self.fail(
                    at(&p, [key("hosts")]),
                    "a route needs at least one host (use \"*\" for any)",
                );
            }
            for (j, host) in route.hosts.iter().enumerate() {
                let hp = at(&p, [key("hosts"), Seg::Index(j)]);
                if let Err(reason) = check_host(host) {
                    self.fail(hp, reason);
                } else if let Some(other) = hosts.insert(host.to_ascii_lowercase(), &route.name) {
                    self.fail(
                        hp,
                        format!("host {host:?} is already served by route {other:?}"),
                    );
                }
            }
            if route.rules.is_empty() {
                self.fail(at(&p, [key("rules")]), "a route needs at least one rule");
            }
            for (j, rule) in route.rules.iter().enumerate() {
                self.rule(&at(&p, [key("rules"), Seg::Index(j)]), rule, &services);
            }
        }
        for (path, reason) in crate::experiment::check(cfg) {
            self.fail(path, reason);
        }
    }

    fn rule(&mut self, p: &[Seg], rule: &Rule, services: &HashMap<&str, BTreeSet<&str>>) {
        let m = &rule.matches;
        let mp = at(p, [key("match")]);
        if let Some(path) = &m.path {
            let pp = at(&mp, [key("path")]);
            if path.present.is_some() {
                self.fail(
                    pp.clone(),
                    "a path match takes exact, prefix or regex, not present",
                );
            }
            self.string_match(&pp, path);
            for s in [&path.exact, &path.prefix].into_iter().flatten() {
                if !s.starts_with('/') {
                    self.fail(pp.clone(), format!("path {s:?} must start with '/'"));
                }
            }
        }
        for (i, method) in m.methods.iter().enumerate() {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                self.fail(
                    at(&mp, [key("methods"), Seg::Index(i)]),
                    format!("invalid method {method:?}: use upper case, e.g. GET"),
                );
            }
        }
        for (field, list) in [("headers", &m.headers), ("query", &m.query)] {
            for (i, nm) in list.iter().enumerate() {
                self.named_match(
                    &at(&mp, [key(field), Seg::Index(i)]),
                    nm,
                    field == "headers",
                );
            }
        }

        let bp = at(p, [key("backends")]);
        if rule.backends.is_empty() && !crate::answer::answers_itself(rule) {
            self.fail(bp.clone(), "a rule needs at least one backend");
        }
        let mut total: u64 = 0;
        let mut seen = BTreeSet::new();
        for (i, b) in rule.backends.iter().enumerate() {
            let ip = at(&bp, [Seg::Index(i)]);
            total += u64::from(b.weight());
            if !seen.insert((b.service.as_str(), b.subset.as_str())) {
                self.fail(ip.clone(), format!("backend {} is listed twice", b.label()));
            }
            match services.get(b.service.as_str()) {
                None => self.fail(
                    at(&ip, [key("service")]),
                    format!("unknown backend service {:?}", b.service),
                ),
                Some(subsets) if !b.subset.is_empty() && !subsets.contains(b.subset.as_str()) => {
                    let known: Vec<_> = subsets.iter().copied().collect();
                    self.fail(
                        at(&ip, [key("subset")]),
                        format!(
                            "unknown subset {:?} of service {:?} (known: {})",
                            b.subset,
                            b.service,
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        if !rule.backends.is_empty() && total == 0 {
            self.fail(
                bp,
                "backend weights sum to 0: at least one backend needs a positive weight",
            );
        }
        if rule.timeout.is_some_and(|t| t.0 == 0) {
            self.fail(at(p, [key("timeout")]), "timeout must be positive");
        }
        if let Some(r) = &rule.retries {
            self.retries(&at(p, [key("retries")]), r);
        }
        if let Some(cors) = &rule.cors {
            for (i, m) in cors.allow_origins.iter().enumerate() {
                let op = at(p, [key("cors"), key("allow_origins"), Seg::Index(i)]);
                match crate::cors::origin_match_problem(m) {
                    Some(reason) => self.fail(op, reason),
                    None => self.string_match(&op, m),
                }
            }
        }
        for (path, reason) in crate::policy::check_rule(p, rule, services) {
            self.fail(path, reason);
        }
    }

    fn retries(&mut self, p: &[Seg], r: &RetryPolicy) {
        if r.attempts > 10 {
            self.fail(
                at(p, [key("attempts")]),
                format!("{} attempts is more than the maximum of 10", r.attempts),
            );
        }
        for (i, cond) in r.retry_on.iter().enumerate() {
            let numeric = cond.parse::<u16>().is_ok_and(|c| (100..600).contains(&c));
            if !numeric && !RETRY_ON.contains(&cond.as_str()) {
                self.fail(
                    at(p, [key("retry_on"), Seg::Index(i)]),
                    format!(
                        "unknown retry condition {cond:?} (known: {}, or an HTTP status)",
                        RETRY_ON.join(", ")
                    ),
                );
            }
        }
        if let (Some(base), Some(max)) = (r.backoff_base, r.backoff_max)
            && base > max
        {
            self.fail(
                at(p, [key("backoff_max")]),
                format!("backoff_max {max} is below backoff_base {base}"),
            );
        }
    }

    fn named_match(&mut self, p: &[Seg], nm: &NamedMatch, is_header: bool) {
        let valid_name = if is_header {
            !nm.name.is_empty()
                && nm
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b))
        } else {
            !nm.name.is_empty()
        };
        if !valid_name {
            self.fail(at(p, [key("name")]), format!("invalid name {:?}", nm.name));
        }
        if !is_header && nm.invert {
            self.fail(
                at(p, [key("invert")]),
                "invert applies to header matches only",
            );
        }
        self.string_match(p, &nm.value);
    }

    fn string_match(&mut self, p: &[Seg], m: &StringMatch) {
        let set = [
            m.exact.is_some(),
            m.prefix.is_some(),
            m.regex.is_some(),
            m.present.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if set != 1 {
            self.fail(
                p.to_vec(),
                format!("exactly one of exact, prefix, regex or present must be set, found {set}"),
            );
        }
        if m.present == Some(false) {
            self.fail(
                p.to_vec(),
                "present: false never matches; use a header match with invert instead",
            );
        }
        if let Some(re) = &m.regex
            && let Err(e) = compile_regex(re, self.limits)
        {
            self.fail(at(p, [key("regex")]), e);
        }
    }
}

/// Compiles a match regex the way the proxy will use it: anchored on the whole value.
pub fn compile_regex(re: &str, limits: &Limits) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(limits.regex_size_limit)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(limit) => {
                format!("regex {re:?} compiles to more than the {limit}-byte limit")
            }
            other => format!(
                "invalid regex {re:?}: {}",
                other.to_string().lines().last().unwrap_or("")
            ),
        })
}

/// A lower-case DNS name: labels of 1–63 letters, digits and inner hyphens, 253 bytes at most.
pub(crate) fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn check_host(host: &str) -> Result<(), String> {
    if host == "*" {
        return Ok(());
    }
    let (name, port) = match host.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    if name.is_empty()
        || name
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b == b'/' || b == b':')
    {
        return Err(format!(
            "invalid host {host:?}: give a name, or name:port, without scheme or path"
        ));
    }
    if let Some(port) = port
        && !(port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p != 0))
    {
        return Err(format!(
            "invalid host {host:?}: the port must be a number from 1 to 65535"
        ));
    }
    Ok(())
}

fn check_address(addr: &str) -> Result<(), String> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("invalid address {addr:?}: expected host:port"));
    };
    // The proxy turns this into a URI authority: the host must be a DNS name, an IPv4 literal
    // or a bracketed IPv6 literal, nothing a URI would refuse (found by the fuzzer).
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        }
    };
    if !host_ok {
        return Err(format!(
            "invalid address {addr:?}: the host must be a DNS name, an IPv4 address or [IPv6]"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(format!("invalid address {addr:?}: port must be 1-65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
services:
  - name: reviews
    endpoints:
      - {address: "127.0.0.1:9001", labels: {version: v1}}
      - {address: "127.0.0.1:9002", labels: {version: v2}}
    subsets:
      v1: {version: v1}
      v2: {version: v2}
routes:
  - name: reviews
    hosts: [reviews]
    rules:
      - match:
          headers: [{name: x-user-group, exact: beta}]
        backends: [{service: reviews, subset: v2}]
      - backends:
          - {service: reviews, subset: v1, weight: 90}
          - {service: reviews, subset: v2, weight: 10}
"#;

    fn errors(yaml: &str) -> String {
        parse_yaml("mesh.yaml", yaml, &Limits::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn good_config_passes() {
        let cfg = parse_yaml("mesh.yaml", GOOD, &Limits::default()).unwrap();
        assert_eq!(cfg.routes[0].rules.len(), 2);
    }

    #[test]
    fn unknown_subset_is_located() {
        let bad = GOOD.replace("subset: v2, weight: 10", "subset: v3, weight: 10");
        let err = errors(&bad);
        assert!(
            err.contains(
                "mesh.yaml:19: routes[0].rules[1].backends[1].subset: unknown subset \"v3\""
            ),
            "{err}"
        );
        assert!(err.contains("known: v1, v2"), "{err}");
    }

    #[test]
    fn zero_weights_and_bad_regex_and_unknown_service() {
        let bad = GOOD
            .replace("weight: 90", "weight: 0")
            .replace("weight: 10", "weight: 0")
            .replace("exact: beta", "regex: \"(unclosed\"")
            .replace("[{service: reviews, subset: v2}]", "[{service: ratings}]");
        let err = errors(&bad);
        assert!(err.contains("weights sum to 0"), "{err}");
        assert!(err.contains("invalid regex \"(unclosed\""), "{err}");
        assert!(err.contains("mesh.yaml:16: routes[0].rules[0].backends[0].service: unknown backend service \"ratings\""), "{err}");
    }

    #[test]
    fn syntax_and_unknown_field_errors_have_lines() {
        let err = errors("routes:\n  - name: r\n    hostz: [a]\n");
        assert!(err.starts_with("mesh.yaml:3:"), "{err}");
        assert!(err.contains("hostz"), "{err}");
        let err = errors(&GOOD.replace("exact: beta", "exakt: beta"));
        assert!(err.contains("exakt"), "{err}");
    }

    #[test]
    fn regex_budget_is_a_limit() {
        let small = Limits {
            regex_size_limit: 64,
        };
        assert!(compile_regex("[a-z]{50}", &Limits::default()).is_ok());
        assert!(
            compile_regex("[a-z]{50}", &small)
                .unwrap_err()
                .contains("limit")
        );
    }

    #[test]
    fn duplicate_hosts_and_bad_addresses() {
        let bad = format!(
            "{GOOD}  - name: other\n    hosts: [reviews]\n    rules: [{{backends: [{{service: reviews}}]}}]\n"
        )
        .replace("127.0.0.1:9002", "127.0.0.1");
        let err = errors(&bad);
        assert!(err.contains("already served by route \"reviews\""), "{err}");
        assert!(err.contains("expected host:port"), "{err}");
        for bad in [
            "a:0", "a:65536", "a:+80", "a:", ":80", "a:b:80", "a/b", "a b",
        ] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
        for good in ["reviews", "reviews.bookinfo:9090", "*"] {
            assert!(check_host(good).is_ok(), "{good}");
        }
        let vips = GOOD.replace(
            "routes:\n",
            "  - {name: a, ports: [80], virtual_ips: [10.0.0.1, nope], endpoints: []}\n  - {name: b, ports: [80, 81], virtual_ips: [10.0.0.1], endpoints: []}\n  - {name: c, virtual_ips: [10.0.0.2], endpoints: []}\nroutes:\n",
        );
        let err = errors(&vips);
        assert!(err.contains("invalid virtual IP \"nope\""), "{err}");
        assert!(
            err.contains("10.0.0.1 port 80 already stands for service \"a\""),
            "{err}"
        );
        assert!(
            err.contains("a virtual IP needs the service's ports"),
            "{err}"
        );
        for bad in ["127.0 .0.1:80", "[::1:80", "[zz]:80", "a(b):80", ":80"] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
        for good in [
            "127.0.0.1:80",
            "[::1]:9002",
            "reviews.default.svc:8080",
            "my_host:1",
        ] {
            assert!(check_address(good).is_ok(), "{good}");
        }
    }
}

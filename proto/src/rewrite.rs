//! URL rewrite of a route rule: the path and the host the upstream sees, changed after routing
//! (Istio's `rewrite: {uri, authority}`, the Gateway API's `URLRewrite` filter). Types,
//! validation and wire form.
//!
//! ```yaml
//! match: {path: {prefix: /api/v1}}
//! rewrite: {prefix: /v1, host: reviews-internal}   # /api/v1/x?q → /v1/x?q, Host reviews-internal
//! ```
//!
//! `prefix` replaces the path prefix the rule matched (so the rule must match a path prefix),
//! `path` replaces the whole path; the query string is kept either way.

use serde::{Deserialize, Serialize};

use crate::locate::Seg;
use crate::model::Rule;
use crate::pb;
use crate::policy::Problems;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replaces the path prefix the rule matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Replaces the whole path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replaces the Host (the `:authority` over HTTP/2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

fn path_problem(path: &str) -> Option<String> {
    // RFC 3986 path characters; `?` and `#` would start a query or a fragment.
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b);
    if !path.starts_with('/') {
        Some(format!("{path:?} must start with /"))
    } else if !path.bytes().all(ok) {
        Some(format!("{path:?} is not a URL path"))
    } else {
        None
    }
}

pub(crate) fn host_problem(host: &str) -> Option<String> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b);
    if host.is_empty() || host.len() > 253 || !host.bytes().all(ok) {
        Some(format!("{host:?} is not a host name"))
    } else {
        None
    }
}

/// Checks a path change of `rule` (a rewrite's or a redirect's): `prefix` replaces the prefix
/// the rule matched, `path` the whole path; `at` names the field.
pub(crate) fn check_path_edit(
    out: &mut Problems,
    at: &dyn Fn(&str) -> Vec<Seg>,
    rule: &Rule,
    prefix: Option<&str>,
    path: Option<&str>,
) {
    if prefix.is_some() && path.is_some() {
        out.push((
            at("path"),
            "give prefix or path, not both (prefix replaces the matched prefix, path the whole path)"
                .into(),
        ));
    }
    if let Some(prefix) = prefix {
        if rule
            .matches
            .path
            .as_ref()
            .is_none_or(|m| m.prefix.is_none())
        {
            out.push((
                at("prefix"),
                "replacing the matched prefix needs a rule that matches a path prefix (match.path.prefix)".into(),
            ));
        }
        out.extend(path_problem(prefix).map(|e| (at("prefix"), e)));
    }
    if let Some(path) = path {
        out.extend(path_problem(path).map(|e| (at("path"), e)));
    }
}

/// Checks a rule's `rewrite` (`p` is the rule's path).
pub fn check(p: &[Seg], rule: &Rule, r: &Rewrite) -> Problems {
    let mut out = Problems::new();
    let at = |field: &str| {
        let mut v = p.to_vec();
        v.extend([Seg::Key("rewrite".into()), Seg::Key(field.into())]);
        v
    };
    check_path_edit(&mut out, &at, rule, r.prefix.as_deref(), r.path.as_deref());
    if let Some(host) = &r.host {
        out.extend(host_problem(host).map(|e| (at("host"), e)));
    }
    if r.prefix.is_none() && r.path.is_none() && r.host.is_none() {
        out.push((
            at("prefix"),
            "a rewrite needs a prefix, a path or a host".into(),
        ));
    }
    out
}

pub fn to_pb(r: &Rewrite) -> pb::Rewrite {
    pb::Rewrite {
        prefix: r.prefix.clone().unwrap_or_default(),
        path: r.path.clone().unwrap_or_default(),
        host: r.host.clone().unwrap_or_default(),
    }
}

pub fn from_pb(r: &pb::Rewrite) -> Rewrite {
    let opt = |s: &String| (!s.is_empty()).then(|| s.clone());
    Rewrite {
        prefix: opt(&r.prefix),
        path: opt(&r.path),
        host: opt(&r.host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{Limits, parse_yaml};

    fn mesh(rule: &str) -> String {
        crate::test_support::one_rule_mesh(rule)
    }

    #[test]
    fn a_rewrite_parses_and_survives_the_wire() {
        let cfg = parse_yaml(
            "t",
            &mesh("        match: {path: {prefix: /api}}\n        rewrite: {prefix: /v1, host: internal}"),
            &Limits::default(),
        )
        .unwrap();
        let r = cfg.routes[0].rules[0].rewrite.as_ref().unwrap();
        assert_eq!(r.prefix.as_deref(), Some("/v1"));
        assert_eq!(&from_pb(&to_pb(r)), r);
    }

    #[test]
    fn bad_rewrites_are_refused_by_name() {
        for (rule, expect) in [
            (
                "        rewrite: {prefix: /v1}",
                "needs a rule that matches a path prefix",
            ),
            (
                "        match: {path: {prefix: /a}}\n        rewrite: {prefix: /b, path: /c}",
                "give prefix or path, not both",
            ),
            ("        rewrite: {path: v1}", "\"v1\" must start with /"),
            ("        rewrite: {path: \"/a?b\"}", "is not a URL path"),
            ("        rewrite: {host: \"a b\"}", "is not a host name"),
            ("        rewrite: {}", "needs a prefix, a path or a host"),
        ] {
            let err = parse_yaml("t", &mesh(rule), &Limits::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{rule}: {err}");
            assert!(err.contains("routes[0].rules[0].rewrite"), "{err}");
        }
    }
}

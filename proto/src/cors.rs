//! Cross-origin resource sharing per route rule (Istio's `corsPolicy`, the Gateway API's
//! `CORS` filter): the proxy answers a browser's preflight for an allowed origin itself and
//! marks the responses to that origin's requests as readable by it. Types, validation and wire
//! form; the proxy's side is `weft_proxy::cors`.
//!
//! ```yaml
//! cors:
//!   allow_origins: [{exact: "https://shop.example"}, {regex: "https://.*\\.shop\\.example"}]
//!   allow_methods: [GET, POST]
//!   allow_headers: [content-type, x-user]
//!   expose_headers: [x-request-id]
//!   max_age: 60m
//!   allow_credentials: true
//! ```
//!
//! A request whose `Origin` matches none of `allow_origins` is left alone, its preflight
//! included (it goes to the upstream, as Istio's default `unmatchedPreflights: FORWARD`).

use serde::{Deserialize, Serialize};

use crate::headers::is_token;
use crate::locate::Seg;
use crate::model::{Millis, StringMatch};
use crate::pb;
use crate::policy::Problems;

/// The most entries in one of the lists: each preflight answer carries them.
pub const MAX_ENTRIES: usize = 64;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cors {
    /// Origins (`scheme://host[:port]`) that may read responses; exact, prefix or regex.
    pub allow_origins: Vec<StringMatch>,
    /// Methods a preflight allows; `*` allows the one asked for. Empty: only the methods
    /// browsers send without asking (GET, HEAD, POST).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    /// Request header fields a preflight allows; `*` allows the ones asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    /// Response header fields the page may read beyond the always-readable ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    /// How long a browser may cache a preflight's answer (sent in whole seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Millis>,
    /// Whether the page may send cookies and read the responses to such requests.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_credentials: bool,
}

/// Checks a rule's `cors` (`p` is its path) apart from the origin matches, which the
/// validator checks as the string matches they are.
pub fn check(p: &[Seg], cors: &Cors) -> Problems {
    let mut out = Problems::new();
    let at = |field: &str| {
        let mut v = p.to_vec();
        v.extend([Seg::Key("cors".into()), Seg::Key(field.into())]);
        v
    };
    if cors.allow_origins.is_empty() {
        out.push((
            at("allow_origins"),
            "list the origins that may call (a regex \".*\" allows any)".into(),
        ));
    }
    for (field, list) in [
        ("allow_origins", cors.allow_origins.len()),
        ("allow_methods", cors.allow_methods.len()),
        ("allow_headers", cors.allow_headers.len()),
        ("expose_headers", cors.expose_headers.len()),
    ] {
        if list > MAX_ENTRIES {
            out.push((at(field), format!("{list} entries (at most {MAX_ENTRIES})")));
        }
    }
    for (i, m) in cors.allow_methods.iter().enumerate() {
        if m != "*" && !(is_token(m) && m.bytes().all(|b| !b.is_ascii_lowercase())) {
            let mut path = at("allow_methods");
            path.push(Seg::Index(i));
            out.push((
                path,
                format!("{m:?} is not a method: use upper case, e.g. PUT"),
            ));
        }
    }
    for (field, list) in [
        ("allow_headers", &cors.allow_headers),
        ("expose_headers", &cors.expose_headers),
    ] {
        for (i, h) in list.iter().enumerate() {
            if !is_token(h) || (h.contains('*') && h != "*") {
                let mut path = at(field);
                path.push(Seg::Index(i));
                out.push((path, format!("{h:?} is not a header field name or *")));
            }
        }
    }
    if cors.allow_credentials && cors.expose_headers.iter().any(|h| h == "*") {
        out.push((
            at("expose_headers"),
            "browsers read * literally on requests with credentials: list the fields".into(),
        ));
    }
    out
}

/// The `present` kind means nothing for an origin; the validator refuses it with this reason.
pub fn origin_match_problem(m: &StringMatch) -> Option<&'static str> {
    m.present
        .is_some()
        .then_some("an origin is matched by exact, prefix or regex, not present")
}

pub fn to_pb(c: &Cors) -> pb::Cors {
    pb::Cors {
        allow_origins: c
            .allow_origins
            .iter()
            .map(crate::convert::string_match_to_pb)
            .collect(),
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age_ms: c.max_age.map_or(0, |m| m.0),
        allow_credentials: c.allow_credentials,
    }
}

pub fn from_pb(c: &pb::Cors) -> Cors {
    Cors {
        allow_origins: c
            .allow_origins
            .iter()
            .map(crate::convert::string_match_from_pb)
            .collect(),
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age: (c.max_age_ms != 0).then_some(Millis(c.max_age_ms)),
        allow_credentials: c.allow_credentials,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{Limits, parse_yaml};

    fn mesh(cors: &str) -> String {
        crate::test_support::one_rule_mesh(&format!(
            "      - backends: [{{service: reviews}}]\n        cors: {cors}"
        ))
    }

    #[test]
    fn a_policy_parses_and_survives_the_wire() {
        let cfg = parse_yaml(
            "t",
            &mesh(
                "{allow_origins: [{exact: \"https://a.example\"}, {regex: \"https://.*\\\\.b\\\\.example\"}], \
                 allow_methods: [GET, PUT], allow_headers: [content-type, \"*\"], \
                 expose_headers: [x-request-id], max_age: 60m, allow_credentials: true}",
            ),
            &Limits::default(),
        )
        .unwrap();
        let rule = &cfg.routes[0].rules[1];
        let c = rule.cors.as_ref().unwrap();
        assert_eq!(
            c.allow_origins[1].regex.as_deref(),
            Some("https://.*\\.b\\.example")
        );
        assert_eq!(c.max_age, Some(Millis(3_600_000)));
        assert_eq!(&from_pb(&to_pb(c)), c);
        let back = crate::from_resources(&crate::to_resources(&cfg)).unwrap();
        assert_eq!(back.routes[0].rules[1].cors, rule.cors);
    }

    #[test]
    fn bad_policies_are_refused_by_name() {
        for (cors, at, expect) in [
            (
                "{allow_origins: []}",
                "cors.allow_origins",
                "list the origins",
            ),
            (
                "{allow_origins: [{present: true}]}",
                "cors.allow_origins[0]",
                "not present",
            ),
            (
                "{allow_origins: [{regex: \"(\"}]}",
                "cors.allow_origins[0].regex",
                "invalid regex",
            ),
            (
                "{allow_origins: [{exact: a}], allow_methods: [get]}",
                "cors.allow_methods[0]",
                "\"get\" is not a method",
            ),
            (
                "{allow_origins: [{exact: a}], allow_headers: [\"x y\"]}",
                "cors.allow_headers[0]",
                "is not a header field name",
            ),
            (
                "{allow_origins: [{exact: a}], expose_headers: [\"x-*\"]}",
                "cors.expose_headers[0]",
                "is not a header field name or *",
            ),
            (
                "{allow_origins: [{exact: a}], expose_headers: [\"*\"], allow_credentials: true}",
                "cors.expose_headers",
                "browsers read * literally",
            ),
        ] {
            let err = parse_yaml("t", &mesh(cors), &Limits::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{cors}: {err}");
            assert!(
                err.contains(&format!("routes[0].rules[1].{at}")),
                "{cors}: {err}"
            );
        }
    }
}

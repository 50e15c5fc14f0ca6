//! Header edits of a route rule: fields the proxy sets, adds or removes on the request it
//! forwards and on the upstream's response (Istio's `headers`, the Gateway API's
//! `RequestHeaderModifier` and `ResponseHeaderModifier`). Types, validation and wire form.
//!
//! ```yaml
//! headers:
//!   request:  {set: {x-env: prod}, add: {x-via: weft}, remove: [x-debug]}
//!   response: {remove: [server]}
//! ```
//!
//! On each side the edits apply in the order remove, set, add. Fields the mesh relies on are
//! refused: hop-by-hop and framing fields, `host`, and `x-weft-*` (a rule must not be able to
//! forge the caller identity a sidecar vouches for).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::locate::Seg;
use crate::pb;
use crate::policy::Problems;

/// The most edits on one side of a rule.
pub const MAX_EDITS: usize = 32;
/// The longest value a rule may set or add.
pub const MAX_VALUE_LEN: usize = 4096;

/// A rule's edits, to the request and to the response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRules {
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub request: HeaderEdits,
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub response: HeaderEdits,
}

/// Edits on one message's header fields; names are case-insensitive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    /// Replaces every value of the field (adds it when absent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Appends a value; the field's other values stay.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    fn len(&self) -> usize {
        self.set.len() + self.add.len() + self.remove.len()
    }
}

/// Fields no rule may edit: hop-by-hop and framing fields belong to each connection, `host`
/// is the route's own key (and the upstream's virtual host).
const RESERVED: &[&str] = &[
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// An HTTP token (RFC 9110 §5.6.2): what a field name or a method is made of.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b))
}

fn name_problem(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    if !is_token(name) {
        Some(format!("{name:?} is not a header field name"))
    } else if RESERVED.contains(&lower.as_str()) {
        Some(format!(
            "{lower} cannot be edited (the proxy manages it per connection)"
        ))
    } else if lower.starts_with("x-weft-") {
        Some(format!(
            "{lower} cannot be edited (x-weft-* fields are the mesh's own, e.g. the caller's verified identity)"
        ))
    } else {
        None
    }
}

fn value_problem(name: &str, value: &str) -> Option<String> {
    if value.len() > MAX_VALUE_LEN {
        Some(format!(
            "the value of {name} is {} bytes (at most {MAX_VALUE_LEN})",
            value.len()
        ))
    } else if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        Some(format!(
            "the value of {name} has a control character (CR, LF, NUL…)"
        ))
    } else {
        None
    }
}

/// Checks a rule's `headers` (`p` is its path).
pub fn check(p: &[Seg], rules: &HeaderRules) -> Problems {
    let mut out = Problems::new();
    for (side, edits) in [("request", &rules.request), ("response", &rules.response)] {
        let at = |op: &str, name: &str| -> Vec<Seg> {
            let mut v = p.to_vec();
            v.extend([
                Seg::Key("headers".into()),
                Seg::Key(side.into()),
                Seg::Key(op.into()),
                Seg::Key(name.into()),
            ]);
            v
        };
        if edits.len() > MAX_EDITS {
            let mut v = p.to_vec();
            v.extend([Seg::Key("headers".into()), Seg::Key(side.into())]);
            out.push((v, format!("{} edits (at most {MAX_EDITS})", edits.len())));
        }
        let mut seen: HashMap<String, &str> = HashMap::new();
        let names = (edits.set.iter().map(|(n, v)| ("set", n, Some(v))))
            .chain(edits.add.iter().map(|(n, v)| ("add", n, Some(v))))
            .chain(edits.remove.iter().map(|n| ("remove", n, None)));
        for (op, name, value) in names {
            if let Some(reason) = name_problem(name) {
                out.push((at(op, name), reason));
            }
            if let Some(reason) = value.and_then(|v| value_problem(name, v)) {
                out.push((at(op, name), reason));
            }
            if let Some(first) = seen.insert(name.to_ascii_lowercase(), op) {
                out.push((
                    at(op, name),
                    format!("{name} is edited twice (under {first} and {op}); give it one edit"),
                ));
            }
        }
    }
    out
}

fn edits_to_pb(e: &HeaderEdits) -> pb::HeaderEdits {
    let lower = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            .collect()
    };
    pb::HeaderEdits {
        set: lower(&e.set),
        add: lower(&e.add),
        remove: e.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
    }
}

fn edits_from_pb(e: Option<&pb::HeaderEdits>) -> HeaderEdits {
    let Some(e) = e else {
        return HeaderEdits::default();
    };
    HeaderEdits {
        set: e.set.iter().map(|(n, v)| (n.clone(), v.clone())).collect(),
        add: e.add.iter().map(|(n, v)| (n.clone(), v.clone())).collect(),
        remove: e.remove.clone(),
    }
}

pub fn to_pb(h: &HeaderRules) -> pb::HeaderRules {
    pb::HeaderRules {
        request: Some(edits_to_pb(&h.request)),
        response: Some(edits_to_pb(&h.response)),
    }
}

pub fn from_pb(h: &pb::HeaderRules) -> HeaderRules {
    HeaderRules {
        request: edits_from_pb(h.request.as_ref()),
        response: edits_from_pb(h.response.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{Limits, parse_yaml};

    fn mesh(headers: &str) -> String {
        crate::test_support::one_rule_mesh(&format!("        headers: {headers}"))
    }

    #[test]
    fn edits_parse_and_survive_the_wire() {
        let cfg = parse_yaml(
            "t",
            &mesh("{request: {set: {X-Env: prod}, add: {x-via: weft}, remove: [x-debug]}, response: {remove: [server]}}"),
            &Limits::default(),
        )
        .unwrap();
        let rule = &cfg.routes[0].rules[0];
        let h = rule.headers.as_ref().unwrap();
        assert_eq!(h.request.set["X-Env"], "prod");
        assert_eq!(h.response.remove, ["server"]);
        let back = from_pb(&to_pb(h));
        // Names go on the wire in lower case (they are case-insensitive).
        assert_eq!(back.request.set["x-env"], "prod");
        assert_eq!(back.request.add["x-via"], "weft");
        assert_eq!(back.request.remove, ["x-debug"]);
        assert_eq!(back.response, h.response);
    }

    #[test]
    fn fields_the_mesh_relies_on_and_bad_values_are_refused_by_name() {
        for (headers, expect) in [
            (
                "{request: {set: {x-weft-peer-identity: spiffe://evil}}}",
                "x-weft-peer-identity cannot be edited",
            ),
            ("{request: {remove: [Host]}}", "host cannot be edited"),
            (
                "{response: {set: {transfer-encoding: chunked}}}",
                "transfer-encoding cannot be edited",
            ),
            (
                "{request: {add: {\"bad name\": x}}}",
                "is not a header field name",
            ),
            (
                "{request: {set: {x-a: \"one\\r\\nx-b: two\"}}}",
                "the value of x-a has a control character",
            ),
            (
                "{request: {set: {x-a: one}, remove: [X-A]}}",
                "X-A is edited twice (under set and remove)",
            ),
            ("{request: {sett: {x-a: one}}}", "unknown field `sett`"),
        ] {
            let err = parse_yaml("t", &mesh(headers), &Limits::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{headers}: {err}");
            if !expect.starts_with("unknown") {
                assert!(err.contains("routes[0].rules[0].headers"), "{err}");
            }
        }
        let long = "v".repeat(MAX_VALUE_LEN + 1);
        let err = parse_yaml(
            "t",
            &mesh(&format!("{{response: {{add: {{x-long: {long}}}}}}}")),
            &Limits::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("x-long is 4097 bytes"), "{err}");
    }
}

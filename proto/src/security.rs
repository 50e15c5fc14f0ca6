//! The security part of the mesh model: a service's workload identity, how its sidecar
//! accepts peers (mTLS mode), who may call it (authorization policies) and how end users
//! authenticate (JWT) — plus its validation and its wire form.
//!
//! ```yaml
//! services:
//!   - name: reviews
//!     security:
//!       identity: spiffe://weft.local/ns/default/sa/reviews
//!       peer_authentication: {mode: strict, ports: {15006: strict}}
//!       authorization:
//!         - {name: no-admin-from-other, action: deny, rules: [{namespaces: [other], paths: [{prefix: /admin}]}]}
//!         - {name: frontends, action: allow, rules: [{principals: [{prefix: "spiffe://weft.local/ns/default/"}]}]}
//!       jwt: {issuer: https://issuer.example, audiences: [reviews], jwks_uri: "http://127.0.0.1:8080/jwks"}
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::locate::Seg;
use crate::model::{MeshConfig, StringMatch};
use crate::pb;
use crate::validate::Issue;

/// `services[].security`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSecurity {
    /// The SPIFFE ID the service's sidecars present. Callers that have an identity talk to
    /// the service over mTLS and refuse any other ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_authentication: Option<PeerAuthentication>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization: Vec<AuthorizationPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtRule>,
    /// Requests the service's sidecars admit (inbound, after authorization); with
    /// `per: {header: x-weft-peer-identity}` one bucket per calling workload (the sidecar sets
    /// that header from the verified certificate, so callers cannot pick their bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<crate::policy::RateLimit>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerAuthMode {
    /// mTLS and plaintext on the same port (TLS detected by its first byte).
    #[default]
    Permissive,
    /// mTLS only: plaintext connections are closed.
    Strict,
    /// Plaintext only.
    Disable,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAuthentication {
    #[serde(default)]
    pub mode: PeerAuthMode,
    /// Overrides per inbound listener port.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, PeerAuthMode>,
}

impl PeerAuthentication {
    pub fn mode_for(&self, port: u16) -> PeerAuthMode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzAction {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub name: String,
    #[serde(default)]
    pub action: AuthzAction,
    /// The policy applies when any rule matches; no rule matches nothing.
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
}

/// Every non-empty field must match (any of its values). `{}` matches every request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// The caller's SPIFFE ID: `{exact: ...}` or `{prefix: ...}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    /// The caller's namespace (from its SPIFFE ID).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// The inbound listener port the request arrived on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Verified JWT claims (`request.auth.claims[name]`): claim name → accepted values. A list
    /// claim matches when any element is accepted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtRule {
    pub issuer: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Inline JWKS document (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Where to fetch the JWKS: `http://` on a loopback address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
}

/// Namespace of a SPIFFE ID of the form `spiffe://td/ns/<ns>/sa/<sa>`.
pub fn spiffe_namespace(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    let (_, path) = rest.split_once('/')?;
    let mut parts = path.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("ns"), Some(ns), Some("sa")) => Some(ns),
        _ => None,
    }
}

/// Checks the `security` of every service.
pub fn validate(cfg: &MeshConfig) -> Vec<Issue> {
    let mut issues = Vec::new();
    for (i, svc) in cfg.services.iter().enumerate() {
        let Some(sec) = &svc.security else { continue };
        let p = vec![
            Seg::Key("services".into()),
            Seg::Index(i),
            Seg::Key("security".into()),
        ];
        let mut fail = |more: &[Seg], reason: String| {
            let mut path = p.clone();
            path.extend_from_slice(more);
            issues.push(Issue {
                path,
                reason,
                line: None,
            });
        };
        let k = |s: &str| Seg::Key(s.to_owned());
        if let Some(id) = &sec.identity
            && !is_spiffe_id(id)
        {
            fail(
                &[k("identity")],
                format!("invalid identity {id:?}: expected spiffe://<trust-domain>/<path>"),
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (j, pol) in sec.authorization.iter().enumerate() {
            let pp = [k("authorization"), Seg::Index(j)];
            if pol.name.is_empty() {
                fail(
                    &[pp[0].clone(), pp[1].clone(), k("name")],
                    "policy name is empty".into(),
                );
            } else if !names.insert(pol.name.as_str()) {
                fail(
                    &[pp[0].clone(), pp[1].clone(), k("name")],
                    format!("duplicate policy {:?}", pol.name),
                );
            }
            for (r, rule) in pol.rules.iter().enumerate() {
                let rp = |f: &str, x: usize| {
                    vec![
                        k("authorization"),
                        Seg::Index(j),
                        k("rules"),
                        Seg::Index(r),
                        k(f),
                        Seg::Index(x),
                    ]
                };
                for (field, list) in [("principals", &rule.principals), ("paths", &rule.paths)] {
                    for (x, m) in list.iter().enumerate() {
                        let set = [&m.exact, &m.prefix].iter().filter(|v| v.is_some()).count();
                        if set != 1 || m.regex.is_some() || m.present.is_some() {
                            fail(
                                &rp(field, x),
                                "exactly one of exact or prefix must be set".into(),
                            );
                        }
                    }
                }
                for (x, m) in rule.methods.iter().enumerate() {
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                        fail(
                            &rp("methods", x),
                            format!("invalid method {m:?}: use upper case, e.g. GET"),
                        );
                    }
                }
                for (x, port) in rule.ports.iter().enumerate() {
                    if *port == 0 {
                        fail(&rp("ports", x), "port 0 is not a port".into());
                    }
                }
                for (name, values) in &rule.claims {
                    if name.is_empty() || values.is_empty() {
                        fail(
                            &[
                                k("authorization"),
                                Seg::Index(j),
                                k("rules"),
                                Seg::Index(r),
                                k("claims"),
                            ],
                            format!("claim {name:?} needs a name and at least one value"),
                        );
                    }
                }
            }
        }
        if let Some(rl) = &sec.rate_limit {
            for (path, reason) in crate::policy::check_rate_limit(&[k("rate_limit")], rl) {
                fail(&path, reason);
            }
        }
        if let Some(jwt) = &sec.jwt {
            if jwt.issuer.is_empty() {
                fail(&[k("jwt"), k("issuer")], "issuer is empty".into());
            }
            match (&jwt.jwks, &jwt.jwks_uri) {
                (Some(_), None) => {}
                (None, Some(uri)) => {
                    if let Err(reason) = check_jwks_uri(uri) {
                        fail(&[k("jwt"), k("jwks_uri")], reason);
                    }
                }
                _ => fail(
                    &[k("jwt")],
                    "exactly one of jwks or jwks_uri must be set".into(),
                ),
            }
        }
    }
    issues
}

fn is_spiffe_id(id: &str) -> bool {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(td, path)| {
            !td.is_empty()
                && !path.is_empty()
                && td
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        })
}

/// JWKS are fetched over plain HTTP, so only from loopback (where a local agent serves them).
fn check_jwks_uri(uri: &str) -> Result<(), String> {
    let rest = uri
        .strip_prefix("http://")
        .ok_or_else(|| format!("jwks_uri {uri:?} must be http:// on a loopback address"))?;
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!("jwks_uri {uri:?} must be on a loopback address"))
    }
}

// ---- wire form ----

fn mode_to_pb(m: PeerAuthMode) -> i32 {
    (match m {
        PeerAuthMode::Permissive => pb::PeerAuthMode::Permissive,
        PeerAuthMode::Strict => pb::PeerAuthMode::Strict,
        PeerAuthMode::Disable => pb::PeerAuthMode::Disable,
    }) as i32
}

fn mode_from_pb(v: i32) -> Result<PeerAuthMode, String> {
    match pb::PeerAuthMode::try_from(v) {
        Ok(pb::PeerAuthMode::Permissive) => Ok(PeerAuthMode::Permissive),
        Ok(pb::PeerAuthMode::Strict) => Ok(PeerAuthMode::Strict),
        Ok(pb::PeerAuthMode::Disable) => Ok(PeerAuthMode::Disable),
        Err(_) => Err(format!("unknown peer authentication mode {v}")),
    }
}

fn sm_to_pb(m: &StringMatch) -> pb::StringMatch {
    use pb::string_match::Kind;
    let kind = match (&m.exact, &m.prefix) {
        (Some(s), _) => Some(Kind::Exact(s.clone())),
        (None, Some(s)) => Some(Kind::Prefix(s.clone())),
        (None, None) => None,
    };
    pb::StringMatch { kind }
}

fn sm_from_pb(m: &pb::StringMatch) -> StringMatch {
    use pb::string_match::Kind;
    match &m.kind {
        Some(Kind::Exact(s)) => StringMatch::exact(s.clone()),
        Some(Kind::Prefix(s)) => StringMatch::prefix(s.clone()),
        Some(Kind::Regex(s)) => StringMatch::regex(s.clone()),
        Some(Kind::Present(b)) => StringMatch {
            present: Some(*b),
            ..StringMatch::default()
        },
        None => StringMatch::default(),
    }
}

pub fn to_pb(s: &ServiceSecurity) -> pb::ClusterSecurity {
    pb::ClusterSecurity {
        identity: s.identity.clone().unwrap_or_default(),
        peer_authentication: s
            .peer_authentication
            .as_ref()
            .map(|pa| pb::PeerAuthentication {
                mode: mode_to_pb(pa.mode),
                ports: pa
                    .ports
                    .iter()
                    .map(|(p, m)| (u32::from(*p), mode_to_pb(*m)))
                    .collect(),
            }),
        authorization: s
            .authorization
            .iter()
            .map(|p| pb::AuthorizationPolicy {
                name: p.name.clone(),
                action: match p.action {
                    AuthzAction::Allow => pb::AuthzAction::Allow,
                    AuthzAction::Deny => pb::AuthzAction::Deny,
                } as i32,
                rules: p
                    .rules
                    .iter()
                    .map(|r| pb::AuthzRule {
                        principals: r.principals.iter().map(sm_to_pb).collect(),
                        namespaces: r.namespaces.clone(),
                        paths: r.paths.iter().map(sm_to_pb).collect(),
                        methods: r.methods.clone(),
                        ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
                        claims: r
                            .claims
                            .iter()
                            .map(|(name, values)| pb::ClaimMatch {
                                name: name.clone(),
                                values: values.clone(),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
        jwt: s.jwt.as_ref().map(|j| pb::JwtRule {
            issuer: j.issuer.clone(),
            audiences: j.audiences.clone(),
            jwks: j.jwks.clone().unwrap_or_default(),
            jwks_uri: j.jwks_uri.clone().unwrap_or_default(),
        }),
        rate_limit: s.rate_limit.as_ref().map(crate::policy::rate_limit_to_pb),
    }
}

fn port(p: u32) -> Result<u16, String> {
    u16::try_from(p).map_err(|_| format!("port {p} is out of range"))
}

pub fn from_pb(s: &pb::ClusterSecurity) -> Result<ServiceSecurity, String> {
    let non_empty = |v: &str| (!v.is_empty()).then(|| v.to_owned());
    let peer_authentication = match &s.peer_authentication {
        None => None,
        Some(pa) => Some(PeerAuthentication {
            mode: mode_from_pb(pa.mode)?,
            ports: pa
                .ports
                .iter()
                .map(|(p, m)| Ok((port(*p)?, mode_from_pb(*m)?)))
                .collect::<Result<_, String>>()?,
        }),
    };
    let mut authorization = Vec::new();
    for p in &s.authorization {
        let action = match pb::AuthzAction::try_from(p.action) {
            Ok(pb::AuthzAction::Allow) => AuthzAction::Allow,
            Ok(pb::AuthzAction::Deny) => AuthzAction::Deny,
            Err(_) => return Err(format!("policy {:?}: unknown action {}", p.name, p.action)),
        };
        let mut rules = Vec::new();
        for r in &p.rules {
            rules.push(AuthzRule {
                principals: r.principals.iter().map(sm_from_pb).collect(),
                namespaces: r.namespaces.clone(),
                paths: r.paths.iter().map(sm_from_pb).collect(),
                methods: r.methods.clone(),
                ports: r.ports.iter().map(|p| port(*p)).collect::<Result<_, _>>()?,
                claims: r
                    .claims
                    .iter()
                    .map(|c| (c.name.clone(), c.values.clone()))
                    .collect(),
            });
        }
        authorization.push(AuthorizationPolicy {
            name: p.name.clone(),
            action,
            rules,
        });
    }
    Ok(ServiceSecurity {
        identity: non_empty(&s.identity),
        peer_authentication,
        authorization,
        jwt: s.jwt.as_ref().map(|j| JwtRule {
            issuer: j.issuer.clone(),
            audiences: j.audiences.clone(),
            jwks: non_empty(&j.jwks),
            jwks_uri: non_empty(&j.jwks_uri),
        }),
        rate_limit: s.rate_limit.as_ref().map(crate::policy::rate_limit_from_pb),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::Limits;
    use crate::{from_resources, parse_yaml, to_resources};

    const MESH: &str = r#"
services:
  - name: reviews
    endpoints: [{address: "127.0.0.1:1"}]
    security:
      identity: spiffe://weft.local/ns/default/sa/reviews
      peer_authentication: {mode: strict, ports: {15006: permissive}}
      authorization:
        - name: no-admin
          action: deny
          rules: [{namespaces: [other], paths: [{prefix: /admin}]}]
        - name: by-group
          rules: [{claims: {group: [admins]}, methods: [GET], ports: [15006]}]
      jwt: {issuer: me, audiences: [reviews], jwks_uri: "http://127.0.0.1:9/jwks"}
      rate_limit: {requests: 100, interval: 1s, per: {header: x-weft-peer-identity}}
routes: []
"#;

    #[test]
    fn round_trips_through_the_wire() {
        let cfg = parse_yaml("m", MESH, &Limits::default()).unwrap();
        let sec = cfg.services[0].security.as_ref().unwrap();
        assert_eq!(
            sec.peer_authentication.as_ref().unwrap().mode_for(15006),
            PeerAuthMode::Permissive
        );
        assert_eq!(
            sec.peer_authentication.as_ref().unwrap().mode_for(1),
            PeerAuthMode::Strict
        );
        assert_eq!(
            sec.rate_limit
                .as_ref()
                .and_then(|r| r.per.as_ref())
                .unwrap()
                .header,
            "x-weft-peer-identity"
        );
        assert_eq!(from_resources(&to_resources(&cfg)).unwrap(), cfg);
    }

    #[test]
    fn bad_security_is_refused_with_its_line() {
        let bad = MESH
            .replace("spiffe://weft.local/ns/default/sa/reviews", "reviews")
            .replace("http://127.0.0.1:9/jwks", "https://example.com/jwks")
            .replace("action: deny", "action: deny\n          name: no-admin");
        assert!(parse_yaml("m", &bad, &Limits::default()).is_err());
        let bad = MESH
            .replace("spiffe://weft.local/ns/default/sa/reviews", "reviews")
            .replace("http://127.0.0.1:9/jwks", "http://10.0.0.1/jwks")
            .replace("{prefix: /admin}", "{regex: /admin}");
        let err = parse_yaml("m", &bad, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m:6: services[0].security.identity: invalid identity"),
            "{err}"
        );
        assert!(err.contains("must be on a loopback address"), "{err}");
        assert!(err.contains("exactly one of exact or prefix"), "{err}");
        let bad = MESH
            .replace("requests: 100", "requests: 0")
            .replace("header: x-weft-peer-identity", "header: \"x weft\"");
        let err = parse_yaml("m", &bad, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("services[0].security.rate_limit.requests"),
            "{err}"
        );
        assert!(
            err.contains("services[0].security.rate_limit.per.header: invalid header name"),
            "{err}"
        );
    }

    #[test]
    fn namespace_of_a_spiffe_id() {
        assert_eq!(spiffe_namespace("spiffe://td/ns/other/sa/x"), Some("other"));
        assert_eq!(spiffe_namespace("spiffe://td/x"), None);
    }
}

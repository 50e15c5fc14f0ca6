//! The compiled security table: per service, the identity its sidecars must present
//! (outbound mTLS), its peer-authentication mode, its authorization policies and its JWT
//! verifier (inbound). Built with the routing table when a configuration is applied.
//!
//! Authorization: DENY policies first (any match denies), then ALLOW policies (when there is
//! at least one, a request none of them matches is denied), else allow. Every decision is
//! counted in [`AuthzStats`] — the hook for the metrics work.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::Method;
use serde_json::{Map, Value, json};
use weft_proto::MeshConfig;
use weft_proto::model::StringMatch;
use weft_proto::security::{
    AuthorizationPolicy, AuthzAction, AuthzRule, PeerAuthMode, PeerAuthentication, spiffe_namespace,
};

use crate::jwt::{JwtError, JwtVerifier};
use crate::resilience::Registry;
use crate::resilience::ratelimit::{RateConfig, TokenBucket};
use crate::resilience::registry::inbound_key;

/// Per-service security, by service name.
#[derive(Debug, Default)]
pub struct SecurityTable {
    services: HashMap<String, Arc<ServicePolicy>>,
}

#[derive(Debug)]
pub struct ServicePolicy {
    pub identity: Option<Arc<str>>,
    peer_authentication: Option<PeerAuthentication>,
    deny: Vec<AuthorizationPolicy>,
    allow: Vec<AuthorizationPolicy>,
    pub jwt: Option<Arc<JwtVerifier>>,
    /// The inbound rate limit (kept across configuration swaps in the registry).
    pub rate_limit: Option<Arc<TokenBucket>>,
}

impl SecurityTable {
    /// `registry` keeps inbound rate-limit buckets across swaps (a push must not refill them).
    pub fn compile(cfg: &MeshConfig, registry: &Registry) -> Result<Self, JwtError> {
        let mut services = HashMap::new();
        for svc in &cfg.services {
            let Some(sec) = &svc.security else { continue };
            let (deny, allow) = sec
                .authorization
                .iter()
                .cloned()
                .partition(|p| p.action == AuthzAction::Deny);
            let jwt = sec
                .jwt
                .as_ref()
                .map(|j| JwtVerifier::new(j).map(Arc::new))
                .transpose()
                .map_err(|e| JwtError::Config(format!("service {:?}: {e}", svc.name)))?;
            services.insert(
                svc.name.clone(),
                Arc::new(ServicePolicy {
                    identity: sec.identity.as_deref().map(Arc::from),
                    peer_authentication: sec.peer_authentication.clone(),
                    deny,
                    allow,
                    jwt,
                    rate_limit: sec.rate_limit.as_ref().map(|r| {
                        registry.bucket(&inbound_key(&svc.name), RateConfig::from_model(r))
                    }),
                }),
            );
        }
        Ok(Self { services })
    }

    /// The identity the sidecars of `service` must present, when it has one.
    pub fn identity(&self, service: &str) -> Option<Arc<str>> {
        self.services.get(service)?.identity.clone()
    }

    pub fn service(&self, service: &str) -> Option<Arc<ServicePolicy>> {
        self.services.get(service).cloned()
    }
}

/// What a request is authorized on.
#[derive(Debug)]
pub struct RequestAttrs<'a> {
    pub principal: Option<&'a str>,
    pub path: &'a str,
    pub method: &'a Method,
    pub port: u16,
    pub claims: Option<&'a Map<String, Value>>,
}

/// A refusal, naming the policy (or that no ALLOW policy matched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub policy: String,
}

impl ServicePolicy {
    pub fn peer_mode(&self, port: u16) -> PeerAuthMode {
        self.peer_authentication
            .as_ref()
            .map_or(PeerAuthMode::Permissive, |p| p.mode_for(port))
    }

    pub fn authorize(&self, req: &RequestAttrs<'_>) -> Result<(), Denied> {
        let matches = |r: &AuthzRule| rule_matches(r, req);
        self.decide(matches, matches)
    }

    /// Authorization of an opaque TCP stream from a sidecar (no request to look at), as Istio
    /// does for TCP: a rule with HTTP-only fields (paths, methods, claims) never matches in an
    /// ALLOW policy, and is matched without them in a DENY policy (which so denies more).
    pub fn authorize_connection(&self, principal: Option<&str>, port: u16) -> Result<(), Denied> {
        let peer = |r: &AuthzRule| peer_matches(r, principal, port);
        self.decide(peer, |r| !has_http_fields(r) && peer(r))
    }

    /// DENY policies first (a rule of one matching by `deny_rule` denies), then ALLOW ones
    /// (when there is at least one, something no rule matches by `allow_rule` is denied).
    fn decide(
        &self,
        deny_rule: impl Fn(&AuthzRule) -> bool,
        allow_rule: impl Fn(&AuthzRule) -> bool,
    ) -> Result<(), Denied> {
        if let Some(p) = self.deny.iter().find(|p| p.rules.iter().any(&deny_rule)) {
            return Err(Denied {
                policy: p.name.clone(),
            });
        }
        if self.allow.is_empty() || self.allow.iter().any(|p| p.rules.iter().any(&allow_rule)) {
            Ok(())
        } else {
            Err(Denied {
                policy: "no ALLOW policy matched".into(),
            })
        }
    }
}

fn string_matches(m: &StringMatch, s: &str) -> bool {
    match (&m.exact, &m.prefix) {
        (Some(e), _) => e == s,
        (None, Some(p)) => s.starts_with(p.as_str()),
        // Validation refuses other kinds.
        _ => false,
    }
}

fn rule_matches(r: &AuthzRule, req: &RequestAttrs<'_>) -> bool {
    peer_matches(r, req.principal, req.port)
        && (r.paths.is_empty() || r.paths.iter().any(|m| string_matches(m, req.path)))
        && (r.methods.is_empty() || r.methods.iter().any(|m| m == req.method.as_str()))
        && r.claims.iter().all(|(name, accepted)| {
            req.claims
                .and_then(|c| c.get(name))
                .is_some_and(|v| claim_matches(v, accepted))
        })
}

/// The fields of a rule that a connection has too: who calls, and on which port.
fn peer_matches(r: &AuthzRule, principal: Option<&str>, port: u16) -> bool {
    let id = principal.unwrap_or("");
    (r.principals.is_empty()
        || (principal.is_some() && r.principals.iter().any(|m| string_matches(m, id))))
        && (r.namespaces.is_empty()
            || spiffe_namespace(id).is_some_and(|ns| r.namespaces.iter().any(|n| n == ns)))
        && (r.ports.is_empty() || r.ports.contains(&port))
}

fn has_http_fields(r: &AuthzRule) -> bool {
    !r.paths.is_empty() || !r.methods.is_empty() || !r.claims.is_empty()
}

fn claim_matches(v: &Value, accepted: &[String]) -> bool {
    match v {
        Value::String(s) => accepted.iter().any(|a| a == s),
        Value::Array(items) => items.iter().any(|i| claim_matches(i, accepted)),
        Value::Bool(_) | Value::Number(_) => {
            let s = v.to_string();
            accepted.contains(&s)
        }
        _ => false,
    }
}

/// What the admin port and readiness need from the security side; lives in the
/// [`crate::state::ProxyState`].
#[derive(Debug, Default)]
pub struct SecurityState {
    /// Set once at start when the proxy has an identity (`--service-account`).
    pub identity: std::sync::OnceLock<Arc<crate::identity::Identity>>,
    pub authz: AuthzStats,
}

impl SecurityState {
    /// Without an identity there is nothing to wait for; with one, its first certificate.
    pub fn is_ready(&self) -> bool {
        self.identity.get().is_none_or(|i| i.is_ready())
    }

    pub fn to_json(&self) -> Value {
        let mut v =
            json!({"enabled": self.identity.get().is_some(), "authz": self.authz.to_json()});
        if let Some(id) = self.identity.get() {
            v["certificate"] = id.to_json();
        }
        v
    }
}

/// Inbound decisions since start; `/config` shows them under `identity.authz`.
#[derive(Debug, Default)]
pub struct AuthzStats {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub plaintext_refused: AtomicU64,
}

impl AuthzStats {
    pub fn to_json(&self) -> Value {
        json!({
            "allowed": self.allowed.load(Ordering::Relaxed),
            "denied": self.denied.load(Ordering::Relaxed),
            "unauthenticated": self.unauthenticated.load(Ordering::Relaxed),
            "plaintext_refused": self.plaintext_refused.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::validate::Limits;

    fn table(yaml_security: &str) -> Arc<ServicePolicy> {
        let yaml = format!(
            "services:\n  - name: s\n    endpoints: [{{address: \"127.0.0.1:1\"}}]\n    security:\n{yaml_security}\nroutes: []\n"
        );
        let cfg = weft_proto::parse_yaml("m", &yaml, &Limits::default()).unwrap();
        SecurityTable::compile(&cfg, &Registry::default())
            .unwrap()
            .service("s")
            .unwrap()
    }

    fn attrs<'a>(
        principal: Option<&'a str>,
        path: &'a str,
        claims: Option<&'a Map<String, Value>>,
    ) -> RequestAttrs<'a> {
        RequestAttrs {
            principal,
            path,
            method: &Method::GET,
            port: 15006,
            claims,
        }
    }

    #[test]
    fn deny_first_then_allow_then_default_deny() {
        let p = table(
            r#"      authorization:
        - {name: no-admin, action: deny, rules: [{namespaces: [other], paths: [{prefix: /admin}]}]}
        - {name: friends, rules: [{principals: [{prefix: "spiffe://td/ns/other/"}, {exact: "spiffe://td/ns/default/sa/a"}]}]}
        - {name: admins, rules: [{claims: {group: [admins]}}]}"#,
        );
        let other = Some("spiffe://td/ns/other/sa/x");
        assert_eq!(
            p.authorize(&attrs(other, "/admin/x", None))
                .unwrap_err()
                .policy,
            "no-admin"
        );
        assert!(p.authorize(&attrs(other, "/public", None)).is_ok());
        assert!(
            p.authorize(&attrs(Some("spiffe://td/ns/default/sa/a"), "/admin", None))
                .is_ok()
        );
        let err = p
            .authorize(&attrs(Some("spiffe://td/ns/default/sa/b"), "/", None))
            .unwrap_err();
        assert_eq!(err.policy, "no ALLOW policy matched");
        assert!(p.authorize(&attrs(None, "/", None)).is_err());
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"group": ["users", "admins"]}"#).unwrap();
        assert!(p.authorize(&attrs(None, "/", Some(&claims))).is_ok());
    }

    #[test]
    fn connections_match_only_peer_fields() {
        let p = table(
            r#"      authorization:
        - {name: no-other-on-9000, action: deny, rules: [{namespaces: [other], ports: [9000], paths: [{prefix: /x}]}]}
        - {name: db-clients, rules: [{principals: [{exact: "spiffe://td/ns/default/sa/a"}]}]}
        - {name: http-only, rules: [{principals: [{exact: "spiffe://td/ns/default/sa/b"}], methods: [GET]}]}"#,
        );
        let (a, b, other) = (
            Some("spiffe://td/ns/default/sa/a"),
            Some("spiffe://td/ns/default/sa/b"),
            Some("spiffe://td/ns/other/sa/a"),
        );
        assert!(p.authorize_connection(a, 3306).is_ok());
        // b is allowed for GET requests only: a connection has no method, so no.
        assert!(p.authorize(&attrs(b, "/", None)).is_ok());
        assert_eq!(
            p.authorize_connection(b, 3306).unwrap_err().policy,
            "no ALLOW policy matched"
        );
        assert!(p.authorize_connection(None, 3306).is_err());
        // The DENY rule's path is left out for a connection: all of port 9000 is denied to
        // `other`, while its requests are denied only under /x.
        assert_eq!(
            p.authorize_connection(other, 9000).unwrap_err().policy,
            "no-other-on-9000"
        );
        let on_9000 = |path| RequestAttrs {
            port: 9000,
            ..attrs(other, path, None)
        };
        assert_eq!(
            p.authorize(&on_9000("/x")).unwrap_err().policy,
            "no-other-on-9000"
        );
        assert_eq!(
            p.authorize(&on_9000("/y")).unwrap_err().policy,
            "no ALLOW policy matched"
        );
    }

    #[test]
    fn no_policy_allows_and_modes_default_to_permissive() {
        let p = table("      identity: spiffe://td/ns/default/sa/s");
        assert!(p.authorize(&attrs(None, "/", None)).is_ok());
        assert_eq!(p.peer_mode(1), PeerAuthMode::Permissive);
        assert_eq!(p.identity.as_deref(), Some("spiffe://td/ns/default/sa/s"));
    }
}

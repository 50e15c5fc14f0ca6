//! TLS origination: the proxy speaks TLS to a service's endpoints itself while the app speaks
//! plain HTTP to the proxy (Istio's DestinationRule `tls: {mode: SIMPLE}`), so calls to an
//! external HTTPS API get the mesh's routing, retries, metrics and traces. Types, validation
//! and wire form; the proxy's side is `weft_proxy::origination`.
//!
//! ```yaml
//! services:
//!   - name: payments
//!     endpoints: [{address: "api.payments.example:443"}]
//!     policy:
//!       tls: {sni: api.payments.example, ca_file: /etc/weft/payments-ca.pem}
//! ```
//!
//! The server's certificate is verified for `sni` (default: the endpoint's host) against the
//! CAs in `ca_file`, a PEM file on the proxy's host (default: Debian's system bundle). The file
//! is read when the proxy applies the configuration, so a proxy that cannot read it refuses the
//! version (NACK) and keeps the last good one.

use serde::{Deserialize, Serialize};

use crate::locate::Seg;
use crate::model::Service;
use crate::pb;
use crate::policy::Problems;

/// Where the CAs are read from when `ca_file` is not given.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// The server name sent (SNI) and verified; the endpoint's host when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// PEM file of the CAs that may sign the server's certificate, on the proxy's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

impl UpstreamTls {
    pub fn ca_file_or_default(&self) -> &str {
        self.ca_file.as_deref().unwrap_or(SYSTEM_CA_FILE)
    }
}

/// Checks `services[i].policy.tls` of `svc` (`p` is the service's path).
pub fn check(p: &[Seg], svc: &Service) -> Problems {
    let mut out = Problems::new();
    let Some(tls) = &svc.policy.tls else {
        return out;
    };
    let at = |field: &str| {
        let mut v = p.to_vec();
        v.extend(["policy", "tls", field].map(|k| Seg::Key(k.into())));
        v
    };
    if let Some(sni) = &tls.sni
        && !is_server_name(sni)
    {
        out.push((
            at("sni"),
            format!("{sni:?} is not a DNS name or an IP address (DNS names in lower case)"),
        ));
    }
    if let Some(f) = &tls.ca_file
        && !f.starts_with('/')
    {
        out.push((
            at("ca_file"),
            format!("{f:?}: give an absolute path on the proxy's host"),
        ));
    }
    if svc.security.as_ref().is_some_and(|s| s.identity.is_some()) {
        out.push((
            at("sni"),
            "a service with a mesh identity is reached over mesh mTLS: remove tls or security.identity".into(),
        ));
    }
    if svc.policy.health_check.is_some() {
        out.push((
            at("sni"),
            "active health checks speak plain HTTP: use outlier_detection with tls".into(),
        ));
    }
    if tls.sni.is_none() {
        for (i, ep) in svc.endpoints.iter().enumerate() {
            let host = ep.address.rsplit_once(':').map_or("", |(h, _)| h);
            if !is_server_name(host.trim_start_matches('[').trim_end_matches(']')) {
                let mut path = p.to_vec();
                path.extend([
                    Seg::Key("endpoints".into()),
                    Seg::Index(i),
                    Seg::Key("address".into()),
                ]);
                out.push((
                    path,
                    format!("{host:?} cannot be verified: set policy.tls.sni"),
                ));
            }
        }
    }
    out
}

/// What a certificate can be verified for: a DNS name or an IP address.
fn is_server_name(s: &str) -> bool {
    s.parse::<std::net::IpAddr>().is_ok() || crate::validate::is_dns_name(s)
}

pub fn to_pb(t: &UpstreamTls) -> pb::UpstreamTls {
    pb::UpstreamTls {
        sni: t.sni.clone().unwrap_or_default(),
        ca_file: t.ca_file.clone().unwrap_or_default(),
    }
}

pub fn from_pb(t: &pb::UpstreamTls) -> UpstreamTls {
    let opt = |s: &String| (!s.is_empty()).then(|| s.clone());
    UpstreamTls {
        sni: opt(&t.sni),
        ca_file: opt(&t.ca_file),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{Limits, parse_yaml};

    fn mesh(address: &str, service_extra: &str) -> String {
        format!(
            "services:\n  - name: payments\n    endpoints: [{{address: \"{address}\"}}]\n{service_extra}\
             routes:\n  - name: payments\n    hosts: [payments]\n    rules:\n      - backends: [{{service: payments}}]\n"
        )
    }

    #[test]
    fn a_policy_parses_and_survives_the_wire() {
        let cfg = parse_yaml(
            "t",
            &mesh(
                "api.payments.example:443",
                "    policy: {tls: {sni: api.payments.example, ca_file: /etc/weft/ca.pem}}\n",
            ),
            &Limits::default(),
        )
        .unwrap();
        let svc = &cfg.services[0];
        let tls = svc.policy.tls.as_ref().unwrap();
        assert_eq!(tls.ca_file_or_default(), "/etc/weft/ca.pem");
        assert_eq!(&from_pb(&to_pb(tls)), tls);
        let back = crate::from_resources(&crate::to_resources(&cfg)).unwrap();
        assert_eq!(back.services[0].policy.tls, svc.policy.tls);
        // Without sni the endpoint's host is verified: a name or an IP will do.
        for address in ["api.payments.example:443", "127.0.0.1:8443", "[::1]:8443"] {
            parse_yaml(
                "t",
                &mesh(address, "    policy: {tls: {}}\n"),
                &Limits::default(),
            )
            .unwrap_or_else(|e| panic!("{address}: {e}"));
        }
        let empty = parse_yaml(
            "t",
            &mesh("a.example:443", "    policy: {tls: {}}\n"),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(
            empty.services[0]
                .policy
                .tls
                .as_ref()
                .unwrap()
                .ca_file_or_default(),
            SYSTEM_CA_FILE
        );
    }

    #[test]
    fn bad_policies_are_refused_by_name() {
        for (extra, at, expect) in [
            (
                "    policy: {tls: {sni: \"bad name\"}}\n",
                "services[0].policy.tls.sni",
                "is not a DNS name or an IP address",
            ),
            (
                "    policy: {tls: {ca_file: certs/ca.pem}}\n",
                "services[0].policy.tls.ca_file",
                "give an absolute path",
            ),
            (
                "    policy: {tls: {}, health_check: {path: /health}}\n",
                "services[0].policy.tls.sni",
                "active health checks speak plain HTTP",
            ),
            (
                "    policy: {tls: {}}\n    security: {identity: \"spiffe://weft.local/ns/default/sa/payments\"}\n",
                "services[0].policy.tls.sni",
                "reached over mesh mTLS",
            ),
        ] {
            let err = parse_yaml("t", &mesh("a.example:443", extra), &Limits::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect) && err.contains(at), "{extra}: {err}");
        }
    }
}

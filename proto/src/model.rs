//! The declarative mesh model: what an operator writes in YAML, what the control plane stores
//! and what the proxy shows in `/config`.
//!
//! The wire form ([`crate::pb`]) is derived from it by [`crate::convert`]; both sides validate
//! it with [`crate::validate`], so an error reads the same wherever it is found.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::policy;

/// The whole mesh: services (with their endpoints and subsets) and the routes over them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Traffic-shifting experiments the control plane drives (never sent to proxies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experiments: Vec<crate::experiment::ExperimentSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// IP addresses that stand for the service (a Kubernetes Service's cluster IPs): a captured
    /// connection to one of them, on one of `ports`, goes to one of its endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_ips: Vec<String>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Named subsets, each a label selector over the endpoints (all labels must match).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subsets: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "ClusterPolicy::is_default")]
    pub policy: ClusterPolicy,
    /// Identity, peer authentication, authorization and JWT (see [`crate::security`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<crate::security::ServiceSecurity>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Talk to the upstream in the protocol the downstream used.
    #[default]
    Auto,
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    Grpc,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Millis>,
    // Resilience (see crate::policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<policy::LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<policy::OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<policy::ConnectionLimits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<policy::HealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<policy::RetryBudget>,
    /// Speak TLS to the endpoints (TLS origination), verifying them against these CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::upstream_tls::UpstreamTls>,
}

impl ClusterPolicy {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    /// Hosts this route answers to: `name` on any port, `name:port` on that port only (it wins
    /// over `name`; a request without a port is for its scheme's default, or for the port a
    /// captured connection was made to); `*` matches any host.
    pub hosts: Vec<String>,
    /// Evaluated in order; the first rule that matches wins.
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, rename = "match", skip_serializing_if = "RouteMatch::is_any")]
    pub matches: RouteMatch,
    /// Empty only on a rule that answers itself (`redirect`, `direct_response`).
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    // Resilience (see crate::policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<policy::RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<policy::Fault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<policy::Mirror>,
    /// A response body (or a stream) that sends nothing for this long is cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout: Option<Millis>,
    /// Pick the backend by a hash of a cookie or header instead of at random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<crate::experiment::StickySplit>,
    /// Header fields set, added or removed on the request and on the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<crate::headers::HeaderRules>,
    /// The path and host the upstream sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<crate::rewrite::Rewrite>,
    /// Answer with a redirect instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<crate::answer::Redirect>,
    /// Answer with a fixed response instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<crate::answer::DirectResponse>,
    /// Cross-origin requests from browsers: which origins may call, and how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<crate::cors::Cors>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatch>,
    /// Any of these methods; empty means any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NamedMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<NamedMatch>,
}

impl RouteMatch {
    pub fn is_any(&self) -> bool {
        *self == Self::default()
    }
}

/// How a string is compared. Exactly one field must be set; validation says so otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

impl StringMatch {
    pub fn exact(s: impl Into<String>) -> Self {
        Self {
            exact: Some(s.into()),
            ..Self::default()
        }
    }
    pub fn prefix(s: impl Into<String>) -> Self {
        Self {
            prefix: Some(s.into()),
            ..Self::default()
        }
    }
    pub fn regex(s: impl Into<String>) -> Self {
        Self {
            regex: Some(s.into()),
            ..Self::default()
        }
    }
}

/// A header or query-parameter match: `{name: x-user-group, exact: beta}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "FlatNamedMatch", into = "FlatNamedMatch")]
pub struct NamedMatch {
    pub name: String,
    pub value: StringMatch,
    /// Headers only: match when the value does not match.
    pub invert: bool,
}

/// The YAML shape of [`NamedMatch`]: written flat, with unknown keys refused (serde cannot
/// refuse unknown keys on a struct that uses `flatten`).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlatNamedMatch {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    present: Option<bool>,
    #[serde(default, skip_serializing_if = "is_false")]
    invert: bool,
}

impl From<FlatNamedMatch> for NamedMatch {
    fn from(f: FlatNamedMatch) -> Self {
        let value = StringMatch {
            exact: f.exact,
            prefix: f.prefix,
            regex: f.regex,
            present: f.present,
        };
        NamedMatch {
            name: f.name,
            value,
            invert: f.invert,
        }
    }
}

impl From<NamedMatch> for FlatNamedMatch {
    fn from(n: NamedMatch) -> Self {
        let v = n.value;
        FlatNamedMatch {
            name: n.name,
            exact: v.exact,
            prefix: v.prefix,
            regex: v.regex,
            present: v.present,
            invert: n.invert,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub service: String,
    /// A subset name of `service`; absent means all its endpoints.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subset: String,
    /// Relative weight; absent means 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

impl Backend {
    pub fn weight(&self) -> u32 {
        self.weight.unwrap_or(1)
    }

    /// The name `set-weight` uses: the subset, or the service when there is none.
    pub fn label(&self) -> String {
        if self.subset.is_empty() {
            self.service.clone()
        } else {
            format!("{}/{}", self.service, self.subset)
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Millis>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_base: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_max: Option<Millis>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_non_idempotent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u32>,
}

/// A duration in milliseconds, written `250ms`, `2s`, `1m`, `1h`, a sum of those (`1m30s`, as Go
/// and the Gateway API write durations) or a bare number of milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u32);

impl Millis {
    pub fn as_duration(self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.0))
    }

    /// A Gateway API duration, which is stricter (GEP-2257: `^([0-9]{1,5}(h|m|s|ms)){1,4}$`).
    pub fn parse_gep2257(s: &str) -> Result<Self, String> {
        Self::from_parts(s, 4, 5)
    }

    /// Numbers each followed by a unit (`h`, `m`, `s`, `ms`), summed: at most `max_parts` of
    /// them, of at most `max_digits` digits each.
    fn from_parts(s: &str, max_parts: usize, max_digits: usize) -> Result<Self, String> {
        let bad = || format!("invalid duration {s:?}: expected e.g. 250ms, 2s, 1m30s or 1h");
        let mut rest = s;
        let (mut total, mut parts) = (0u64, 0);
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || digits > max_digits {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| too_long(s))?;
            rest = &rest[digits..];
            let (unit, len) = if rest.starts_with("ms") {
                (1, 2)
            } else if rest.starts_with('h') {
                (3_600_000, 1)
            } else if rest.starts_with('m') {
                (60_000, 1)
            } else if rest.starts_with('s') {
                (1000, 1)
            } else {
                return Err(format!(
                    "invalid duration {s:?}: each number needs a unit: h, m, s or ms"
                ));
            };
            rest = &rest[len..];
            total = total.saturating_add(n.saturating_mul(unit));
            parts += 1;
        }
        if parts == 0 || parts > max_parts {
            return Err(bad());
        }
        u32::try_from(total).map(Millis).map_err(|_| too_long(s))
    }
}

fn too_long(s: &str) -> String {
    format!("duration {s:?} is too long (the limit is 49 days)")
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms != 0 && ms.is_multiple_of(3_600_000) {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms != 0 && ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else if ms != 0 && ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl std::str::FromStr for Millis {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse::<u32>().map(Millis).map_err(|_| too_long(s));
        }
        Self::from_parts(s, usize::MAX, usize::MAX)
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Millis(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        assert_eq!("250ms".parse::<Millis>().unwrap(), Millis(250));
        assert_eq!("2s".parse::<Millis>().unwrap(), Millis(2000));
        assert_eq!("1m".parse::<Millis>().unwrap(), Millis(60_000));
        assert_eq!("40".parse::<Millis>().unwrap(), Millis(40));
        assert_eq!("2h".parse::<Millis>().unwrap(), Millis(7_200_000));
        assert_eq!("1m30s".parse::<Millis>().unwrap(), Millis(90_000));
        assert_eq!(" 1h1m1s1ms ".parse::<Millis>().unwrap(), Millis(3_661_001));
        assert!(
            "2d".parse::<Millis>()
                .unwrap_err()
                .contains("h, m, s or ms")
        );
        assert!("1m30".parse::<Millis>().unwrap_err().contains("unit"));
        for bad in ["s", "", "1.5s", "-1s", "1 s"] {
            assert!(bad.parse::<Millis>().is_err(), "{bad:?} was accepted");
        }
        assert!(
            "5000000000"
                .parse::<Millis>()
                .unwrap_err()
                .contains("too long")
        );
        assert!("2000h".parse::<Millis>().unwrap_err().contains("49 days"));
        assert!(
            "99999999m"
                .parse::<Millis>()
                .unwrap_err()
                .contains("too long")
        );
        assert_eq!(Millis(1500).to_string(), "1500ms");
        assert_eq!(Millis(3000).to_string(), "3s");
        assert_eq!(Millis(90_000).to_string(), "90s");
        assert_eq!(Millis(7_200_000).to_string(), "2h");
        for ms in [0, 1, 999, 1000, 61_000, 3_600_000, 3_660_000, u32::MAX] {
            let printed = Millis(ms).to_string();
            assert_eq!(printed.parse::<Millis>(), Ok(Millis(ms)), "{printed}");
        }
    }

    #[test]
    fn yaml_shape_round_trips() {
        let yaml = r#"
services:
  - name: reviews
    protocol: http1
    endpoints:
      - {address: "127.0.0.1:9001", labels: {version: v1}}
    subsets: {v1: {version: v1}}
routes:
  - name: reviews
    hosts: [reviews]
    rules:
      - match:
          path: {prefix: /api}
          headers: [{name: x-user-group, exact: beta}]
        backends: [{service: reviews, subset: v1, weight: 90}]
        timeout: 2s
"#;
        let cfg: MeshConfig = serde_yaml_ng::from_str(yaml).unwrap();
        let rule = &cfg.routes[0].rules[0];
        assert_eq!(rule.matches.path, Some(StringMatch::prefix("/api")));
        assert_eq!(rule.matches.headers[0].value, StringMatch::exact("beta"));
        assert_eq!(rule.timeout, Some(Millis(2000)));
        let back: MeshConfig =
            serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }
}

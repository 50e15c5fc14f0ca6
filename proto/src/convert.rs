//! Conversion between the declarative model and the wire form.
//!
//! `model → wire` cannot fail (the model is validated first); `wire → model` can, when a
//! control plane sends something this proxy does not understand (an enum value from a newer
//! version, a match with no kind): that becomes a NACK, never a panic.

use std::collections::BTreeMap;

use crate::model::{self, MeshConfig};
use crate::pb;

/// A wire message this side cannot represent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {reason}")]
pub struct ConvertError {
    pub resource: String,
    pub reason: String,
}

/// The wire resources of a configuration, clusters and routes sorted by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub clusters: Vec<pb::Cluster>,
    pub routes: Vec<pb::Route>,
}

fn ms(m: Option<model::Millis>) -> u32 {
    m.map_or(0, |m| m.0)
}

fn opt_ms(v: u32) -> Option<model::Millis> {
    (v != 0).then_some(model::Millis(v))
}

pub fn to_resources(cfg: &MeshConfig) -> Resources {
    let mut clusters: Vec<_> = cfg.services.iter().map(cluster_to_pb).collect();
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    let mut routes: Vec<_> = cfg.routes.iter().map(route_to_pb).collect();
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    Resources { clusters, routes }
}

fn cluster_to_pb(s: &model::Service) -> pb::Cluster {
    pb::Cluster {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        protocol: match s.protocol {
            model::Protocol::Auto => pb::Protocol::Auto,
            model::Protocol::Http1 => pb::Protocol::Http1,
            model::Protocol::Http2 => pb::Protocol::Http2,
            model::Protocol::Grpc => pb::Protocol::Grpc,
        } as i32,
        ports: s.ports.iter().map(|p| u32::from(*p)).collect(),
        virtual_ips: s.virtual_ips.clone(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| pb::Endpoint {
                address: e.address.clone(),
                labels: e.labels.clone().into_iter().collect(),
                weight: e.weight.unwrap_or(0),
            })
            .collect(),
        subsets: s
            .subsets
            .iter()
            .map(|(name, labels)| pb::Subset {
                name: name.clone(),
                labels: labels.clone().into_iter().collect(),
            })
            .collect(),
        policy: Some({
            let mut p = pb::ClusterPolicy {
                connect_timeout_ms: ms(s.policy.connect_timeout),
                idle_timeout_ms: ms(s.policy.idle_timeout),
                ..Default::default()
            };
            crate::policy::cluster_policy_to_pb(&s.policy, &mut p);
            p
        }),
        security: s.security.as_ref().map(crate::security::to_pb),
    }
}

pub(crate) fn string_match_to_pb(m: &model::StringMatch) -> pb::StringMatch {
    use pb::string_match::Kind;
    let kind = if let Some(s) = &m.exact {
        Some(Kind::Exact(s.clone()))
    } else if let Some(s) = &m.prefix {
        Some(Kind::Prefix(s.clone()))
    } else if let Some(s) = &m.regex {
        Some(Kind::Regex(s.clone()))
    } else {
        m.present.map(Kind::Present)
    };
    pb::StringMatch { kind }
}

fn route_to_pb(r: &model::Route) -> pb::Route {
    pb::Route {
        name: r.name.clone(),
        hosts: r.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        rules: r.rules.iter().map(rule_to_pb).collect(),
    }
}

fn rule_to_pb(rule: &model::Rule) -> pb::Rule {
    let m = &rule.matches;
    pb::Rule {
        name: rule.name.clone(),
        r#match: Some(pb::RouteMatch {
            path: m.path.as_ref().map(string_match_to_pb),
            methods: m.methods.clone(),
            headers: m
                .headers
                .iter()
                .map(|h| pb::HeaderMatch {
                    name: h.name.to_ascii_lowercase(),
                    value: Some(string_match_to_pb(&h.value)),
                    invert: h.invert,
                })
                .collect(),
            query: m
                .query
                .iter()
                .map(|q| pb::QueryMatch {
                    name: q.name.clone(),
                    value: Some(string_match_to_pb(&q.value)),
                })
                .collect(),
        }),
        backends: rule
            .backends
            .iter()
            .map(|b| pb::WeightedBackend {
                service: b.service.clone(),
                subset: b.subset.clone(),
                weight: b.weight(),
            })
            .collect(),
        policy: Some({
            let mut p = pb::RoutePolicy {
                timeout_ms: ms(rule.timeout),
                retries: rule.retries.as_ref().map(|r| pb::RetryPolicy {
                    attempts: r.attempts,
                    per_try_timeout_ms: ms(r.per_try_timeout),
                    retry_on: r.retry_on.clone(),
                    backoff_base_ms: ms(r.backoff_base),
                    backoff_max_ms: ms(r.backoff_max),
                    allow_non_idempotent: r.allow_non_idempotent,
                    max_body_bytes: r.max_body_bytes.unwrap_or(0),
                }),
                ..Default::default()
            };
            crate::policy::route_policy_to_pb(rule, &mut p);
            p
        }),
        sticky: rule.sticky.as_ref().map(|s| pb::StickySplit {
            cookie: s.cookie.clone().unwrap_or_default(),
            header: s.header.clone().unwrap_or_default(),
        }),
    }
}

/// Rebuilds the model from wire resources (the proxy's view of what it was sent).
pub fn from_resources(res: &Resources) -> Result<MeshConfig, ConvertError> {
    let services = res
        .clusters
        .iter()
        .map(cluster_from_pb)
        .collect::<Result<_, _>>()?;
    let routes = res
        .routes
        .iter()
        .map(route_from_pb)
        .collect::<Result<_, _>>()?;
    Ok(MeshConfig {
        services,
        routes,
        ..MeshConfig::default()
    })
}

fn cluster_from_pb(c: &pb::Cluster) -> Result<model::Service, ConvertError> {
    let err = |reason: String| ConvertError {
        resource: format!("cluster {:?}", c.name),
        reason,
    };
    let protocol = match pb::Protocol::try_from(c.protocol) {
        Ok(pb::Protocol::Auto) => model::Protocol::Auto,
        Ok(pb::Protocol::Http1) => model::Protocol::Http1,
        Ok(pb::Protocol::Http2) => model::Protocol::Http2,
        Ok(pb::Protocol::Grpc) => model::Protocol::Grpc,
        Err(_) => {
            return Err(err(format!(
                "unknown protocol value {} (is the control plane newer than this proxy?)",
                c.protocol
            )));
        }
    };
    let ports = c
        .ports
        .iter()
        .map(|p| u16::try_from(*p).map_err(|_| err(format!("port {p} is out of range"))))
        .collect::<Result<_, _>>()?;
    let policy = c.policy.clone().unwrap_or_default();
    let mut model_policy = model::ClusterPolicy {
        connect_timeout: opt_ms(policy.connect_timeout_ms),
        idle_timeout: opt_ms(policy.idle_timeout_ms),
        ..Default::default()
    };
    crate::policy::cluster_policy_from_pb(&policy, &mut model_policy).map_err(err)?;
    Ok(model::Service {
        name: c.name.clone(),
        namespace: c.namespace.clone(),
        protocol,
        ports,
        virtual_ips: c.virtual_ips.clone(),
        endpoints: c
            .endpoints
            .iter()
            .map(|e| model::Endpoint {
                address: e.address.clone(),
                labels: e.labels.clone().into_iter().collect(),
                weight: (e.weight != 0).then_some(e.weight),
            })
            .collect(),
        subsets: c
            .subsets
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.labels.clone().into_iter().collect::<BTreeMap<_, _>>(),
                )
            })
            .collect(),
        policy: model_policy,
        security: c
            .security
            .as_ref()
            .map(crate::security::from_pb)
            .transpose()
            .map_err(err)?,
    })
}

pub(crate) fn string_match_from_pb(m: &pb::StringMatch) -> model::StringMatch {
    use pb::string_match::Kind;
    let mut out = model::StringMatch::default();
    match &m.kind {
        Some(Kind::Exact(s)) => out.exact = Some(s.clone()),
        Some(Kind::Prefix(s)) => out.prefix = Some(s.clone()),
        Some(Kind::Regex(s)) => out.regex = Some(s.clone()),
        Some(Kind::Present(b)) => out.present = Some(*b),
        // Left empty: validation reports "exactly one of … must be set".
        None => {}
    }
    out
}

fn route_from_pb(r: &pb::Route) -> Result<model::Route, ConvertError> {
    Ok(model::Route {
        name: r.name.clone(),
        hosts: r.hosts.clone(),
        rules: r
            .rules
            .iter()
            .map(|rule| {
                let m = rule.r#match.clone().unwrap_or_default();
                let policy = rule.policy.clone().unwrap_or_default();
                let mut out = model::Rule {
                    name: rule.name.clone(),
                    matches: model::RouteMatch {
                        path: m.path.as_ref().map(string_match_from_pb),
                        methods: m.methods.clone(),
                        headers: m
                            .headers
                            .iter()
                            .map(|h| model::NamedMatch {
                                name: h.name.clone(),
                                value: h
                                    .value
                                    .as_ref()
                                    .map(string_match_from_pb)
                                    .unwrap_or_default(),
                                invert: h.invert,
                            })
                            .collect(),
                        query: m
                            .query
                            .iter()
                            .map(|q| model::NamedMatch {
                                name: q.name.clone(),
                                value: q
                                    .value
                                    .as_ref()
                                    .map(string_match_from_pb)
                                    .unwrap_or_default(),
                                invert: false,
                            })
                            .collect(),
                    },
                    backends: rule
                        .backends
                        .iter()
                        .map(|b| model::Backend {
                            service: b.service.clone(),
                            subset: b.subset.clone(),
                            weight: Some(b.weight),
                        })
                        .collect(),
                    timeout: opt_ms(policy.timeout_ms),
                    retries: policy.retries.clone().map(|r| model::RetryPolicy {
                        attempts: r.attempts,
                        per_try_timeout: opt_ms(r.per_try_timeout_ms),
                        retry_on: r.retry_on,
                        backoff_base: opt_ms(r.backoff_base_ms),
                        backoff_max: opt_ms(r.backoff_max_ms),
                        allow_non_idempotent: r.allow_non_idempotent,
                        max_body_bytes: (r.max_body_bytes != 0).then_some(r.max_body_bytes),
                    }),
                    sticky: rule
                        .sticky
                        .as_ref()
                        .map(|s| crate::experiment::StickySplit {
                            cookie: (!s.cookie.is_empty()).then(|| s.cookie.clone()),
                            header: (!s.header.is_empty()).then(|| s.header.clone()),
                        }),
                    ..Default::default()
                };
                crate::policy::route_policy_from_pb(&policy, &mut out);
                out
            })
            .collect(),
    })
}

impl Resources {
    /// Applies a delta: upserts by name, then removals by name. Order stays sorted by name.
    pub fn apply_delta(&self, resp: &pb::ConfigResponse) -> Resources {
        if resp.full {
            let mut out = Resources {
                clusters: resp.clusters.clone(),
                routes: resp.routes.clone(),
            };
            out.clusters.sort_by(|a, b| a.name.cmp(&b.name));
            out.routes.sort_by(|a, b| a.name.cmp(&b.name));
            return out;
        }
        Resources {
            clusters: merge(
                &self.clusters,
                &resp.clusters,
                &resp.removed_clusters,
                |c| &c.name,
            ),
            routes: merge(&self.routes, &resp.routes, &resp.removed_routes, |r| {
                &r.name
            }),
        }
    }

    /// The delta that turns `self` (what the peer has) into `to`; empty when they are equal.
    pub fn delta_to(&self, to: &Resources) -> Delta {
        let (clusters, removed_clusters) = diff(&self.clusters, &to.clusters, |c| &c.name);
        let (routes, removed_routes) = diff(&self.routes, &to.routes, |r| &r.name);
        Delta {
            clusters,
            removed_clusters,
            routes,
            removed_routes,
        }
    }
}

/// The resources that changed between two states: upserts and removals by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    pub clusters: Vec<pb::Cluster>,
    pub removed_clusters: Vec<String>,
    pub routes: Vec<pb::Route>,
    pub removed_routes: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
            && self.removed_clusters.is_empty()
            && self.routes.is_empty()
            && self.removed_routes.is_empty()
    }

    /// A non-full response carrying this delta.
    pub fn into_response(self, version: u64, nonce: String) -> pb::ConfigResponse {
        pb::ConfigResponse {
            version,
            nonce,
            full: false,
            clusters: self.clusters,
            removed_clusters: self.removed_clusters,
            routes: self.routes,
            removed_routes: self.removed_routes,
        }
    }
}

fn merge<T: Clone>(
    base: &[T],
    upserts: &[T],
    removed: &[String],
    name: impl Fn(&T) -> &String,
) -> Vec<T> {
    let mut map: BTreeMap<String, T> = base.iter().map(|t| (name(t).clone(), t.clone())).collect();
    for t in upserts {
        map.insert(name(t).clone(), t.clone());
    }
    for r in removed {
        map.remove(r);
    }
    map.into_values().collect()
}

fn diff<T: Clone + PartialEq>(
    from: &[T],
    to: &[T],
    name: impl Fn(&T) -> &String,
) -> (Vec<T>, Vec<String>) {
    let old: BTreeMap<&String, &T> = from.iter().map(|t| (name(t), t)).collect();
    let new: BTreeMap<&String, &T> = to.iter().map(|t| (name(t), t)).collect();
    let upserts = to
        .iter()
        .filter(|t| old.get(name(t)) != Some(t))
        .cloned()
        .collect();
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|k| (*k).clone())
        .collect();
    (upserts, removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{Limits, parse_yaml};

    const YAML: &str = r#"
services:
  - name: a
    protocol: grpc
    endpoints: [{address: "127.0.0.1:1", labels: {v: "1"}}]
    subsets: {one: {v: "1"}}
  - name: b
    ports: [80]
    virtual_ips: ["10.96.0.1", "fd00::1"]
    endpoints: [{address: "127.0.0.1:2", weight: 3}]
routes:
  - name: a
    hosts: [A, "a.ns:9090"]
    rules:
      - match: {path: {regex: "/x.*"}, methods: [GET], headers: [{name: X-H, present: true}], query: [{name: q, exact: "1"}]}
        backends: [{service: a, subset: one, weight: 5}, {service: b}]
        timeout: 3s
        retries: {attempts: 2, retry_on: [5xx], per_try_timeout: 100ms}
"#;

    #[test]
    fn round_trip_through_the_wire() {
        let cfg = parse_yaml("t", YAML, &Limits::default()).unwrap();
        let res = to_resources(&cfg);
        let back = from_resources(&res).unwrap();
        // The wire lower-cases hosts and header names and makes default weights explicit.
        assert_eq!(back.routes[0].hosts, vec!["a", "a.ns:9090"]);
        assert_eq!(back.routes[0].rules[0].matches.headers[0].name, "x-h");
        assert_eq!(back.routes[0].rules[0].backends[1].weight, Some(1));
        assert_eq!(back.services, cfg.services);
        assert_eq!(to_resources(&back), res);
    }

    #[test]
    fn unknown_enum_is_an_error_not_a_panic() {
        let mut res = to_resources(&parse_yaml("t", YAML, &Limits::default()).unwrap());
        res.clusters[0].protocol = 42;
        let err = from_resources(&res).unwrap_err();
        assert!(
            err.to_string().contains("unknown protocol value 42"),
            "{err}"
        );
    }

    #[test]
    fn deltas_apply_back_to_the_target() {
        let cfg = parse_yaml("t", YAML, &Limits::default()).unwrap();
        let from = to_resources(&cfg);
        let mut changed = cfg.clone();
        changed.routes[0].rules[0].backends[0].weight = Some(7);
        changed.services.remove(1);
        changed.routes[0].rules[0].backends.remove(1);
        let to = to_resources(&changed);
        let delta = from.delta_to(&to);
        assert!(delta.clusters.is_empty(), "cluster a did not change");
        assert_eq!(delta.removed_clusters, vec!["b".to_owned()]);
        assert_eq!(delta.routes.len(), 1);
        assert!(delta.removed_routes.is_empty());
        let resp = delta.into_response(2, "n".into());
        assert_eq!(from.apply_delta(&resp), to);
        assert!(to.delta_to(&to).is_empty());
    }
}

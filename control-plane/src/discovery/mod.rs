//! Kubernetes discovery: Services, EndpointSlices and Gateway API HTTPRoutes (GAMMA: a route
//! whose parentRef is a Service) translated into weft's mesh model.
//!
//! The translation is a pure function over real Kubernetes types (`k8s-openapi`,
//! `gateway-api`), so it is tested with the objects a cluster would return. Watching the API
//! server is I/O behind [`ClusterSource`]; the translation never fails as a whole: what weft
//! cannot express (ExtensionRef filters, a rule's second mirror, redirects, rewrites and CORS
//! policies weft refuses, unknown backends, all-zero weights) is left out with a warning that
//! names the object, and the result is validated like any other configuration.
//!
//! Mapping:
//! - Service `reviews` in `bookinfo` → weft service `reviews.bookinfo` for its first TCP port
//!   and `reviews.bookinfo.<port>` for each other one (each port's `appProtocol` picks its
//!   upstream protocol), with the ready addresses of its EndpointSlices for that port and its
//!   cluster IPs as virtual IPs (so captured connections to `clusterIP:port` are meshed).
//! - Each such port gets a route: the first answers `reviews.bookinfo[.svc[.cluster.local]]`
//!   (and `reviews` when no other namespace has a Service of that name) on any port, the others
//!   the same hosts as `host:port`, which win on their port. With no HTTPRoute attached a route
//!   sends everything to its own port; otherwise its rules come from the HTTPRoutes attached to
//!   it (a parentRef without `port` attaches to every port) in Gateway API precedence order,
//!   one weft rule per HTTPRoute match (matches are OR'ed there, AND'ed in weft), with
//!   weighted `backendRefs` (to the port they name) as weighted backends, the
//!   `RequestHeaderModifier`/`ResponseHeaderModifier` filters as the rule's `headers`,
//!   `URLRewrite` as its `rewrite`, the first `RequestMirror` as its `mirror` (to the
//!   Service port its backendRef names; a `fraction` becomes the nearest whole percent), `CORS`
//!   as its `cors`, and `timeouts` as its `timeout` and per-try timeout ([`timeouts`]).
//! - A rule with a `RequestRedirect` filter becomes a rule that answers with its `redirect`
//!   (status 302 unless given, the Gateway API's default): it has no backends (its
//!   `backendRefs`, timeouts, mirror, rewrite and request header edits are ignored with a warning; its
//!   response header edits apply), and one weft refuses is left out rather than forwarded.
//!
//! Layering ([`merge`]): the registry serves `merge(base, discovered)`, where `base` is the
//! mesh file plus API changes and `discovered` the latest translation. On a name clash the base
//! wins — a service or route written in mesh.yaml replaces the discovered one of that name —
//! because the operator's explicit policy beats what was inferred from the cluster, and it is
//! the one way to take over (and then `set-weight`) a route an HTTPRoute would own. A host a
//! base route answers is removed from discovered routes, so inference never makes the
//! operator's config invalid by answering the same name twice.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};

use futures_util::future::BoxFuture;
use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteRules, HttpRouteRulesMatches, HttpRouteRulesMatchesHeadersType,
    HttpRouteRulesMatchesPathType, HttpRouteRulesMatchesQueryParamsType,
};
use k8s_openapi::api::core::v1::Service as K8sService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use weft_proto::model::{self, MeshConfig, NamedMatch, Protocol, StringMatch};

mod filters;
use filters::{
    cors, header_filters, ignored_by_redirect, redirect_filter, request_mirror, request_redirect,
    url_rewrite,
};
mod timeouts;

/// Everything discovery reads from a cluster at one moment.
#[derive(Debug, Clone, Default)]
pub struct ClusterSnapshot {
    pub services: Vec<K8sService>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub http_routes: Vec<HttpRoute>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("watching {resource} failed: {reason}")]
    Watch {
        resource: &'static str,
        reason: String,
    },
}

/// Where cluster snapshots come from (the API server in production). Each call resolves when
/// the cluster changed.
pub trait ClusterSource: Send {
    fn next(&mut self) -> BoxFuture<'_, Result<ClusterSnapshot, DiscoveryError>>;
}

/// The model derived from a cluster, with what could not be translated.
#[derive(Debug, Clone, Default)]
pub struct Translation {
    pub config: MeshConfig,
    pub warnings: Vec<String>,
}

/// weft's name for a Kubernetes Service.
pub fn service_name(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}")
}

fn meta_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    let ns = meta
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    (meta.name.clone().unwrap_or_default(), ns)
}

pub fn translate(snapshot: &ClusterSnapshot) -> Translation {
    let mut warnings = Vec::new();
    let mut name_count: HashMap<String, usize> = HashMap::new();
    for svc in &snapshot.services {
        *name_count.entry(meta_name(&svc.metadata).0).or_default() += 1;
    }
    let mut services = Vec::new();
    let mut routes = Vec::new();
    // Service (weft name) → its meshed ports: number, weft service, index of its route.
    let mut ports_of: HashMap<String, Vec<MeshedPort>> = HashMap::new();
    for svc in &snapshot.services {
        let (name, ns) = meta_name(&svc.metadata);
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            warnings.push(format!(
                "Service {ns}/{name}: ExternalName services are not meshed"
            ));
            continue;
        }
        let weft_name = service_name(&name, &ns);
        let mut hosts = vec![
            weft_name.clone(),
            format!("{weft_name}.svc"),
            format!("{weft_name}.svc.cluster.local"),
        ];
        if name_count.get(&name) == Some(&1) {
            hosts.insert(0, name.clone());
        }
        // Cluster IPs ("None" for a headless Service, whose clients use endpoint addresses).
        let virtual_ips: Vec<String> = spec
            .cluster_ips
            .clone()
            .filter(|ips| !ips.is_empty())
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default()
            .into_iter()
            .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
            .collect();
        let mut meshed: Vec<MeshedPort> = Vec::new();
        for port in spec.ports.iter().flatten() {
            if !matches!(port.protocol.as_deref(), None | Some("TCP")) {
                warnings.push(format!(
                    "Service {ns}/{name}: port {} is {}, not meshed (TCP only)",
                    port.port,
                    port.protocol.as_deref().unwrap_or_default()
                ));
                continue;
            }
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            if meshed.iter().any(|m| m.port == number) {
                continue;
            }
            // The first port keeps the Service's name and answers its hosts on any port; the
            // others are `name.ns.port` (no Kubernetes name holds a dot, so that never clashes)
            // and answer `host:port`.
            let first = meshed.is_empty();
            let this = if first {
                weft_name.clone()
            } else {
                format!("{weft_name}.{number}")
            };
            services.push(model::Service {
                name: this.clone(),
                namespace: ns.clone(),
                protocol: match port.app_protocol.as_deref() {
                    Some("kubernetes.io/h2c" | "http2") => Protocol::Http2,
                    Some("grpc") => Protocol::Grpc,
                    Some("http") => Protocol::Http1,
                    _ => Protocol::Auto,
                },
                ports: vec![number],
                virtual_ips: virtual_ips.clone(),
                endpoints: endpoints_of(snapshot, &name, &ns, port.name.as_deref()),
                subsets: BTreeMap::new(),
                policy: model::ClusterPolicy::default(),
                security: None,
            });
            meshed.push(MeshedPort {
                port: number,
                service: this.clone(),
                route: routes.len(),
            });
            routes.push(model::Route {
                name: this.clone(),
                hosts: if first {
                    hosts.clone()
                } else {
                    hosts.iter().map(|h| format!("{h}:{number}")).collect()
                },
                rules: vec![model::Rule {
                    backends: vec![backend(&this, 1)],
                    ..model::Rule::default()
                }],
            });
        }
        if meshed.is_empty() {
            warnings.push(format!("Service {ns}/{name}: no TCP ports, not meshed"));
            continue;
        }
        ports_of.insert(weft_name, meshed);
    }

    // Attach HTTPRoutes to the routes of their parent Services (of one port, or all of them).
    let mut attached: BTreeMap<usize, Vec<(RuleKey, model::Rule)>> = BTreeMap::new();
    let mut ordered: Vec<&HttpRoute> = snapshot.http_routes.iter().collect();
    // Precedence ties go to the oldest route, then to namespace/name.
    ordered.sort_by_key(|r| {
        (
            r.metadata.creation_timestamp.clone().map(|t| t.0),
            meta_name(&r.metadata),
        )
    });
    for (route_rank, hr) in ordered.into_iter().enumerate() {
        let (rname, rns) = meta_name(&hr.metadata);
        for parent in hr.spec.parent_refs.iter().flatten() {
            if parent.kind.as_deref() != Some("Service")
                || !matches!(parent.group.as_deref(), None | Some("") | Some("core"))
            {
                continue; // A Gateway parent: not for the mesh.
            }
            let pns = parent.namespace.clone().unwrap_or_else(|| rns.clone());
            let Some(meshed) = ports_of.get(&service_name(&parent.name, &pns)) else {
                warnings.push(format!(
                    "HTTPRoute {rns}/{rname}: parent Service {pns}/{} not found",
                    parent.name
                ));
                continue;
            };
            let parents: Vec<usize> = meshed
                .iter()
                .filter(|m| parent.port.is_none_or(|p| i32::from(m.port) == p))
                .map(|m| m.route)
                .collect();
            if parents.is_empty() {
                warnings.push(format!(
                    "HTTPRoute {rns}/{rname}: parent Service {pns}/{} has no meshed port {}",
                    parent.name,
                    parent.port.unwrap_or_default()
                ));
                continue;
            }
            for (rule_index, rule) in hr.spec.rules.iter().flatten().enumerate() {
                let what = format!("HTTPRoute {rns}/{rname} rule {rule_index}");
                let rule_filters = rule.filters.as_deref().unwrap_or_default();
                // A redirect answers the request: the rule needs (and gets) no backends.
                let redirect = redirect_filter(rule_filters);
                let (backends, mirror, (timeout, retries)) = if redirect.is_some() {
                    ignored_by_redirect(rule, &what, &mut warnings);
                    (Vec::new(), None, (None, None))
                } else {
                    let Some(backends) = backends_of(rule, &rns, &rname, &ports_of, &mut warnings)
                    else {
                        continue;
                    };
                    let mirror =
                        request_mirror(rule_filters, &rns, &ports_of, &what, &mut warnings);
                    let timeouts = timeouts::timeouts(rule.timeouts.as_ref(), &what, &mut warnings);
                    (backends, mirror, timeouts)
                };
                let headers = header_filters(rule, redirect.is_some(), &what, &mut warnings);
                let cors = cors(rule_filters, &what, &mut warnings);
                let matches = rule
                    .matches
                    .clone()
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| vec![HttpRouteRulesMatches::default()]);
                for (match_index, m) in matches.iter().enumerate() {
                    let key = RuleKey::of(m, route_rank, rule_index, match_index);
                    let mut rule = model::Rule {
                        name: format!("{rns}/{rname}#{rule_index}.{match_index}"),
                        matches: route_match(m),
                        backends: backends.clone(),
                        headers: headers.clone(),
                        mirror: mirror.clone(),
                        cors: cors.clone(),
                        timeout,
                        retries: retries.clone(),
                        ..model::Rule::default()
                    };
                    match redirect {
                        Some(f) => {
                            if !request_redirect(f, &mut rule, &what, &mut warnings) {
                                continue;
                            }
                        }
                        None => url_rewrite(rule_filters, &mut rule, &what, &mut warnings),
                    }
                    for &index in &parents {
                        attached
                            .entry(index)
                            .or_default()
                            .push((key.clone(), rule.clone()));
                    }
                }
            }
        }
    }
    for (index, mut rules) in attached {
        rules.sort_by(|a, b| a.0.cmp(&b.0));
        routes[index].rules = rules.into_iter().map(|(_, r)| r).collect();
    }
    Translation {
        config: MeshConfig {
            services,
            routes,
            ..MeshConfig::default()
        },
        warnings,
    }
}

/// One Service port as weft meshes it.
#[derive(Debug)]
struct MeshedPort {
    port: u16,
    /// The weft service (and route) name for this port.
    service: String,
    route: usize,
}

/// The ready endpoints of Service `name` in `ns` for its port called `port_name` (unnamed when
/// the Service has one port), from the EndpointSlices labelled with the Service.
fn endpoints_of(
    snapshot: &ClusterSnapshot,
    name: &str,
    ns: &str,
    port_name: Option<&str>,
) -> Vec<model::Endpoint> {
    let mut endpoints = BTreeMap::new();
    for slice in snapshot.endpoint_slices.iter().filter(|s| {
        s.metadata.namespace.as_deref().unwrap_or("default") == ns
            && s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                .is_some_and(|n| n == name)
    }) {
        let Some(target) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref() == port_name
                    || (port_name.is_none() && p.name.as_deref() == Some(""))
            })
            .and_then(|p| p.port)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            // Unset `ready` means ready (the API's documented default).
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for addr in &ep.addresses {
                let address = if addr.contains(':') {
                    format!("[{addr}]:{target}")
                } else {
                    format!("{addr}:{target}")
                };
                let mut labels = BTreeMap::new();
                if let Some(zone) = &ep.zone {
                    labels.insert("zone".to_owned(), zone.clone());
                }
                endpoints.insert(
                    address.clone(),
                    model::Endpoint {
                        address,
                        labels,
                        weight: None,
                    },
                );
            }
        }
    }
    endpoints.into_values().collect()
}

/// The configuration the registry serves: `base` with the discovered services and routes
/// whose names `base` does not define (see the module docs for why the base wins).
/// Experiments only ever come from the base.
pub fn merge(base: &MeshConfig, discovered: &MeshConfig) -> MeshConfig {
    let mut out = base.clone();
    let services: HashSet<&str> = base.services.iter().map(|s| s.name.as_str()).collect();
    out.services.extend(
        discovered
            .services
            .iter()
            .filter(|s| !services.contains(s.name.as_str()))
            .cloned(),
    );
    let routes: HashSet<&str> = base.routes.iter().map(|r| r.name.as_str()).collect();
    let hosts: HashSet<&str> = base
        .routes
        .iter()
        .flat_map(|r| r.hosts.iter().map(String::as_str))
        .collect();
    for route in discovered
        .routes
        .iter()
        .filter(|r| !routes.contains(r.name.as_str()))
    {
        let mut route = route.clone();
        route.hosts.retain(|h| !hosts.contains(h.as_str()));
        if !route.hosts.is_empty() {
            out.routes.push(route);
        }
    }
    out
}

/// Who owns a discovered route, for errors: the HTTPRoutes its rules came from, or else the
/// Service it was made for. `None` when `discovered` has no route of that name.
pub fn route_owner(discovered: &MeshConfig, route: &str) -> Option<String> {
    let r = discovered.routes.iter().find(|r| r.name == route)?;
    let mut owners: Vec<&str> = r
        .rules
        .iter()
        .filter_map(|rule| rule.name.split_once('#').map(|(owner, _)| owner))
        .collect();
    // Rules are in precedence order, which may interleave HTTPRoutes.
    owners.sort_unstable();
    owners.dedup();
    Some(if owners.is_empty() {
        let mut parts = route.splitn(3, '.');
        let (name, ns) = (parts.next().unwrap_or(route), parts.next().unwrap_or(""));
        let port = parts
            .next()
            .map(|p| format!(" port {p}"))
            .unwrap_or_default();
        format!("Service {ns}/{name}{port} (no HTTPRoute attached)")
    } else {
        format!("HTTPRoute {}", owners.join(", HTTPRoute "))
    })
}

fn backend(service: &str, weight: u32) -> model::Backend {
    model::Backend {
        service: service.to_owned(),
        subset: String::new(),
        weight: Some(weight),
    }
}

/// The fields of a backendRef that name a Service port (a rule's backendRefs and a mirror's
/// backendRef are distinct generated types of this shape: see [`service_ref!`]).
struct ServiceRef<'a> {
    group: Option<&'a str>,
    kind: Option<&'a str>,
    name: &'a str,
    namespace: Option<&'a str>,
    port: Option<i32>,
}

/// The [`ServiceRef`] of any generated backendRef type: they share field names, not a trait.
macro_rules! service_ref {
    ($b:expr) => {{
        let b = $b;
        ServiceRef {
            group: b.group.as_deref(),
            kind: b.kind.as_deref(),
            name: &b.name,
            namespace: b.namespace.as_deref(),
            port: b.port,
        }
    }};
}
use service_ref;

/// The meshed Service port a backendRef of an HTTPRoute in `rns` names: its `port` (the API
/// requires one for a Service), else the Service's first. `Err` says why there is none.
fn meshed_port<'a>(
    b: &ServiceRef,
    rns: &str,
    ports_of: &'a HashMap<String, Vec<MeshedPort>>,
) -> Result<&'a MeshedPort, String> {
    if !matches!(b.kind, None | Some("Service"))
        || !matches!(b.group, None | Some("") | Some("core"))
    {
        return Err(format!(
            "backend {} of kind {:?} is not supported",
            b.name, b.kind
        ));
    }
    let svc = service_name(b.name, b.namespace.unwrap_or(rns));
    let Some(meshed) = ports_of.get(&svc) else {
        return Err(format!("backend Service {svc} not found"));
    };
    meshed
        .iter()
        .find(|m| b.port.is_none_or(|p| i32::from(m.port) == p))
        .ok_or_else(|| {
            format!(
                "backend Service {svc} has no meshed port {}",
                b.port.unwrap_or_default()
            )
        })
}

/// The weighted backends of one HTTPRoute rule; `None` (with a warning) when it has none usable.
fn backends_of(
    rule: &HttpRouteRules,
    rns: &str,
    rname: &str,
    ports_of: &HashMap<String, Vec<MeshedPort>>,
    warnings: &mut Vec<String>,
) -> Option<Vec<model::Backend>> {
    let mut out = Vec::new();
    for b in rule.backend_refs.iter().flatten() {
        let port = match meshed_port(&service_ref!(b), rns, ports_of) {
            Ok(port) => port,
            Err(e) => {
                warnings.push(format!("HTTPRoute {rns}/{rname}: {e}, left out"));
                continue;
            }
        };
        out.push(backend(
            &port.service,
            u32::try_from(b.weight.unwrap_or(1)).unwrap_or(0),
        ));
    }
    if out.iter().all(|b| b.weight() == 0) {
        // The Gateway API answers 500 here; weft has no such backend, so the rule is skipped.
        warnings.push(format!(
            "HTTPRoute {rns}/{rname}: a rule has no backend with a positive weight, skipped"
        ));
        return None;
    }
    Some(out)
}

fn route_match(m: &HttpRouteRulesMatches) -> model::RouteMatch {
    let path = m.path.as_ref().and_then(|p| {
        let value = p.value.clone().unwrap_or_else(|| "/".to_owned());
        match p
            .r#type
            .clone()
            .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix)
        {
            HttpRouteRulesMatchesPathType::Exact => Some(StringMatch::exact(value)),
            // Prefix "/" matches everything: no condition at all.
            HttpRouteRulesMatchesPathType::PathPrefix if value == "/" => None,
            HttpRouteRulesMatchesPathType::PathPrefix => Some(StringMatch::prefix(value)),
            HttpRouteRulesMatchesPathType::RegularExpression => Some(StringMatch::regex(value)),
        }
    });
    let headers = m
        .headers
        .iter()
        .flatten()
        .map(|h| NamedMatch {
            name: h.name.to_ascii_lowercase(),
            value: match h.r#type {
                Some(HttpRouteRulesMatchesHeadersType::RegularExpression) => {
                    StringMatch::regex(h.value.clone())
                }
                _ => StringMatch::exact(h.value.clone()),
            },
            invert: false,
        })
        .collect();
    let query = m
        .query_params
        .iter()
        .flatten()
        .map(|q| NamedMatch {
            name: q.name.clone(),
            value: match q.r#type {
                Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression) => {
                    StringMatch::regex(q.value.clone())
                }
                _ => StringMatch::exact(q.value.clone()),
            },
            invert: false,
        })
        .collect();
    let methods = m
        .method
        .as_ref()
        .map(|method| {
            vec![
                serde_json::to_value(method)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            ]
        })
        .unwrap_or_default();
    model::RouteMatch {
        path,
        methods,
        headers,
        query,
    }
}

/// Gateway API match precedence: exact path, then the longest prefix, then a method, then more
/// header matches, then more query matches; ties keep route, rule and match order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RuleKey {
    path_kind: u8,
    prefix_len: Reverse<usize>,
    no_method: bool,
    headers: Reverse<usize>,
    query: Reverse<usize>,
    route_rank: usize,
    rule: usize,
    matched: usize,
}

impl RuleKey {
    fn of(m: &HttpRouteRulesMatches, route_rank: usize, rule: usize, matched: usize) -> Self {
        let (path_kind, len) = match m.path.as_ref() {
            Some(p) => match p
                .r#type
                .clone()
                .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix)
            {
                HttpRouteRulesMatchesPathType::Exact => (0, 0),
                HttpRouteRulesMatchesPathType::RegularExpression => (1, 0),
                HttpRouteRulesMatchesPathType::PathPrefix => {
                    (2, p.value.as_deref().unwrap_or("/").len())
                }
            },
            None => (2, 1),
        };
        RuleKey {
            path_kind,
            prefix_len: Reverse(len),
            no_method: m.method.is_none(),
            headers: Reverse(m.headers.as_ref().map_or(0, Vec::len)),
            query: Reverse(m.query_params.as_ref().map_or(0, Vec::len)),
            route_rank,
            rule,
            matched,
        }
    }
}

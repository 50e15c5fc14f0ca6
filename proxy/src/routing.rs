//! The routing table: a validated [`MeshConfig`] compiled into the structure the request path
//! walks.
//!
//! Compiling does all the work that does not depend on a request (regexes, header names, method
//! lists, weighted indexes, the endpoints of every `(service, subset)`), so that routing a
//! request is a hash lookup, a few comparisons and two random picks.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use http::header::{HOST, HeaderName};
use http::{HeaderMap, Method, Request};
use regex::Regex;
use weft_proto::model::{self, MeshConfig, NamedMatch, StringMatch};
use weft_proto::validate::{Issue, Limits, compile_regex, validate};

use crate::balance::{BalanceError, Endpoint, EndpointSet, WeightedIndex};
use crate::metrics::TargetLabels;
use crate::resilience::Registry;
use crate::resilience::call::{RulePolicy, ServiceRuntime};

/// Why a configuration could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("invalid configuration: {}", join_issues(.0))]
    Invalid(Vec<Issue>),
    #[error(transparent)]
    Endpoints(#[from] BalanceError),
    #[error("{path}: {reason}")]
    Match { path: String, reason: String },
}

fn join_issues(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a request could not be routed. Built only on the error path, so it may allocate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no route for host {host:?} path {path:?}")]
    NoRoute { host: String, path: String },
    #[error("no endpoints for service {service:?} subset {subset:?}")]
    NoEndpoints { service: String, subset: String },
}

/// The compiled routes of one configuration version. Immutable; replaced whole on a change.
#[derive(Debug, Default)]
pub struct Table {
    /// Lower-case host (without port) → the routes answering it.
    hosts: HashMap<String, HostRoutes>,
    /// The route that serves host `*`, tried when no exact host matches.
    wildcard: Option<usize>,
    /// Every service endpoint address → its service and that service's route if it has one:
    /// transparent mode treats these as mesh destinations, routes requests whose `Host` names
    /// no route (e.g. an IP) by original destination, and sends opaque TCP over mTLS when the
    /// service has an identity.
    by_addr: HashMap<std::net::SocketAddr, ByAddr>,
    /// Every service's virtual IP on each of its ports → the service (its endpoints) and its
    /// route: a captured connection there is meshed like one to an endpoint.
    by_vip: HashMap<std::net::SocketAddr, ByVip>,
    routes: Vec<Route>,
}

#[derive(Debug)]
struct Route {
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    path: Option<Matcher>,
    /// Empty: any method.
    methods: Vec<Method>,
    headers: Vec<HeaderMatch>,
    query: Vec<QueryMatch>,
    backends: Vec<Arc<EndpointSet>>,
    /// Metric labels of each backend (route, service, subset), parallel to `backends`; for a
    /// rule that answers itself, one with the route alone.
    labels: Vec<Arc<TargetLabels>>,
    /// The redirect or fixed response of a rule that answers itself (it has no backends).
    answer: Option<Arc<crate::answer::Compiled>>,
    /// `None` only if every backend weighs 0, which validation refuses.
    weights: Option<WeightedIndex>,
    /// Timeouts, retries, rate limit, fault, mirror.
    policy: Arc<RulePolicy>,
    /// Pick the backend by a hash of this cookie or header (experiments' sticky splits).
    sticky: Option<crate::sticky::Key>,
}

#[derive(Debug)]
pub(crate) enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Present,
}

#[derive(Debug)]
struct HeaderMatch {
    name: HeaderName,
    value: Matcher,
    invert: bool,
}

#[derive(Debug)]
struct QueryMatch {
    name: String,
    value: Matcher,
}

impl Table {
    /// Validates `cfg` with `limits`, then compiles it. Validation runs here, not only in the
    /// callers, so that an unvalidated configuration can never reach the request path.
    pub fn compile(cfg: &MeshConfig, limits: &Limits) -> Result<Self, CompileError> {
        Self::compile_shared(cfg, limits, &Registry::default())
    }

    /// [`Table::compile`] with resilience state (endpoint stats, pools, buckets) taken from
    /// `registry`, so that it survives the swap.
    pub fn compile_shared(
        cfg: &MeshConfig,
        limits: &Limits,
        registry: &Registry,
    ) -> Result<Self, CompileError> {
        validate(cfg, limits).map_err(CompileError::Invalid)?;
        let mut compiler = Compiler {
            limits,
            services: cfg.services.iter().map(|s| (s.name.as_str(), s)).collect(),
            sets: HashMap::new(),
            registry,
            runtimes: HashMap::new(),
        };
        let mut table = Table::default();
        for (ri, route) in cfg.routes.iter().enumerate() {
            let rules = route
                .rules
                .iter()
                .enumerate()
                .map(|(i, rule)| {
                    compiler.rule(rule, &format!("routes[{ri}].rules[{i}]"), &route.name, i)
                })
                .collect::<Result<_, _>>()?;
            let index = table.routes.len();
            table.routes.push(Route { rules });
            for host in &route.hosts {
                if host == "*" {
                    table.wildcard = Some(index);
                    continue;
                }
                let (name, port) = split_port(host);
                let entry = table.hosts.entry(name.to_ascii_lowercase()).or_default();
                match port {
                    Some(port) => entry.ports.push((port, index)),
                    None => entry.any = Some(index),
                }
            }
        }
        table.by_addr = routes_by_address(cfg, &table.hosts);
        for svc in cfg.services.iter().filter(|s| !s.virtual_ips.is_empty()) {
            let set = compiler.endpoint_set(&svc.name, "", "virtual_ips")?;
            let vip = ByVip {
                route: service_route(cfg, &table.hosts, svc),
                set,
            };
            for ip in svc.virtual_ips.iter().filter_map(|ip| ip.parse().ok()) {
                for port in &svc.ports {
                    let addr = std::net::SocketAddr::new(ip, *port);
                    table.by_vip.insert(addr, vip.clone());
                }
            }
        }
        Ok(table)
    }

    /// Whether a captured connection to `addr` goes to a mesh service (else it passes
    /// through to `addr` as it is).
    pub fn knows_address(&self, addr: &std::net::SocketAddr) -> bool {
        self.by_addr.contains_key(addr) || self.by_vip.contains_key(addr)
    }

    /// For a virtual IP and port: the endpoint a connection goes to, by the service's load
    /// balancer. `None` for any other address, or when the service has no endpoint with an IP
    /// address.
    pub fn endpoint_behind(&self, vip: &std::net::SocketAddr) -> Option<std::net::SocketAddr> {
        let set = &self.by_vip.get(vip)?.set;
        let index = set.choose(&http::HeaderMap::new(), None)?;
        set.endpoint(index).authority.as_str().parse().ok()
    }

    /// The route of the service at a captured connection's destination (an endpoint or a
    /// virtual IP).
    fn route_at(&self, addr: &std::net::SocketAddr) -> Option<usize> {
        match self.by_addr.get(addr) {
            Some(a) => a.route,
            None => self.by_vip.get(addr)?.route,
        }
    }

    /// The service that has `addr` as an endpoint (the first one, when several do).
    pub fn service_at(&self, addr: &std::net::SocketAddr) -> Option<&str> {
        self.by_addr.get(addr).map(|a| &*a.service)
    }

    /// [`Table::resolve`] for a captured connection whose original destination was `orig`:
    /// a `Host` naming a route wins, else the route of the service at `orig`.
    pub fn resolve_at<B>(
        &self,
        req: &Request<B>,
        orig: Option<std::net::SocketAddr>,
    ) -> Result<Resolved, RouteError> {
        let rule = self.rule_for(req, orig)?;
        if let Some(answer) = &rule.answer {
            return Ok(Resolved::Answer {
                answer: answer.clone(),
                policy: rule.policy.clone(),
                labels: rule.labels[0].clone(),
            });
        }
        let i = self.backend_of(rule, req)?;
        let set = &rule.backends[i];
        if set.endpoints().is_empty() {
            return Err(RouteError::NoEndpoints {
                service: set.service.clone(),
                subset: set.subset.clone(),
            });
        }
        Ok(Resolved::Forward {
            set: set.clone(),
            policy: rule.policy.clone(),
            labels: rule.labels[i].clone(),
        })
    }

    /// Routes a request to one endpoint: route by host, first matching rule, backend by weight,
    /// endpoint by weight.
    pub fn route<B>(&self, req: &Request<B>) -> Result<Target<'_>, RouteError> {
        let rule = self.rule_for(req, None)?;
        let i = self.backend_of(rule, req)?;
        let (set, labels) = (&rule.backends[i], &rule.labels[i]);
        let endpoint = set
            .choose(req.headers(), None)
            .map(|i| set.endpoint(i))
            .ok_or_else(|| RouteError::NoEndpoints {
                service: set.service.clone(),
                subset: set.subset.clone(),
            })?;
        Ok(Target {
            set,
            endpoint,
            labels,
        })
    }

    /// The backend set, the rule's policy and the metric labels for a request; the endpoint is
    /// chosen per attempt.
    pub fn resolve<B>(&self, req: &Request<B>) -> Result<Resolved, RouteError> {
        self.resolve_at(req, None)
    }

    fn no_route<B>(&self, req: &Request<B>) -> RouteError {
        RouteError::NoRoute {
            host: request_host(req).into_owned(),
            path: req.uri().path().to_owned(),
        }
    }

    /// Route by host, then the first matching rule.
    fn rule_for<B>(
        &self,
        req: &Request<B>,
        orig: Option<std::net::SocketAddr>,
    ) -> Result<&Rule, RouteError> {
        let host = request_host(req);
        let index = self
            .hosts
            .get(host.as_ref())
            .and_then(|routes| routes.pick(|| request_port(req, orig)))
            .or_else(|| orig.and_then(|a| self.route_at(&a)))
            .or(self.wildcard)
            .ok_or_else(|| self.no_route(req))?;
        self.routes[index]
            .rules
            .iter()
            .find(|rule| rule.matches(req))
            .ok_or_else(|| self.no_route(req))
    }

    /// The rule's backend for this request, by weight (or its sticky hash). A rule without
    /// backends (one that answers itself) has none.
    fn backend_of<B>(&self, rule: &Rule, req: &Request<B>) -> Result<usize, RouteError> {
        let weights = rule.weights.as_ref().ok_or_else(|| self.no_route(req))?;
        let hash = rule.sticky.as_ref().and_then(|k| k.hash(req.headers()));
        Ok(hash.map_or_else(|| weights.pick(), |h| weights.pick_hashed(h)))
    }
}

/// The routes answering one host: on any port, and on one port (hosts written `name:port`,
/// e.g. the second port of a Kubernetes Service), which win.
#[derive(Debug, Default)]
struct HostRoutes {
    any: Option<usize>,
    ports: Vec<(u16, usize)>,
}

impl HostRoutes {
    /// The route for a request to `port` (computed only when some route names a port).
    fn pick(&self, port: impl FnOnce() -> u16) -> Option<usize> {
        if !self.ports.is_empty() {
            let port = port();
            if let Some(&(_, index)) = self.ports.iter().find(|(p, _)| *p == port) {
                return Some(index);
            }
        }
        self.any
    }
}

/// What a captured connection's original destination tells about it.
#[derive(Debug)]
struct ByAddr {
    /// The route of its service, when one leads there.
    route: Option<usize>,
    service: Arc<str>,
}

/// A virtual IP's service: its endpoints, and its route if it has one.
#[derive(Debug, Clone)]
struct ByVip {
    route: Option<usize>,
    set: Arc<EndpointSet>,
}

/// The route named after `svc` (its `hosts` hold the service name), else the first route with
/// a backend in it, else none.
fn service_route(
    cfg: &MeshConfig,
    hosts: &HashMap<String, HostRoutes>,
    svc: &model::Service,
) -> Option<usize> {
    hosts
        .get(&svc.name.to_ascii_lowercase())
        .and_then(|h| h.any)
        .or_else(|| {
            cfg.routes.iter().position(|r| {
                r.rules
                    .iter()
                    .any(|rule| rule.backends.iter().any(|b| b.service == svc.name))
            })
        })
}

/// For every service endpoint with an IP address: its service and its route
/// ([`service_route`]).
fn routes_by_address(
    cfg: &MeshConfig,
    hosts: &HashMap<String, HostRoutes>,
) -> HashMap<std::net::SocketAddr, ByAddr> {
    let mut out = HashMap::new();
    for svc in &cfg.services {
        let route = service_route(cfg, hosts, svc);
        let service: Arc<str> = Arc::from(svc.name.as_str());
        for ep in &svc.endpoints {
            if let Ok(addr) = ep.address.parse() {
                out.entry(addr).or_insert_with(|| ByAddr {
                    route,
                    service: service.clone(),
                });
            }
        }
    }
    out
}

/// What [`Table::resolve`] gives a request: its rule's policy and metric labels, and either the
/// backend set to forward to or the rule's own answer.
#[derive(Debug)]
pub enum Resolved {
    Forward {
        set: Arc<EndpointSet>,
        policy: Arc<RulePolicy>,
        labels: Arc<TargetLabels>,
    },
    Answer {
        answer: Arc<crate::answer::Compiled>,
        policy: Arc<RulePolicy>,
        labels: Arc<TargetLabels>,
    },
}

impl Resolved {
    pub fn policy(&self) -> &Arc<RulePolicy> {
        match self {
            Resolved::Forward { policy, .. } | Resolved::Answer { policy, .. } => policy,
        }
    }

    /// The backend set, when the request is forwarded.
    pub fn set(&self) -> Option<&Arc<EndpointSet>> {
        match self {
            Resolved::Forward { set, .. } => Some(set),
            Resolved::Answer { .. } => None,
        }
    }
}

/// Where a request goes: the chosen endpoint and the set (service, subset, protocol) it is in.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub set: &'a EndpointSet,
    pub endpoint: &'a Endpoint,
    /// Route, service and subset as metric labels.
    pub labels: &'a Arc<TargetLabels>,
}

/// State shared while compiling one configuration.
struct Compiler<'a> {
    limits: &'a Limits,
    services: HashMap<&'a str, &'a model::Service>,
    /// One endpoint set per (service, subset), shared by every rule that names it.
    sets: HashMap<(&'a str, &'a str), Arc<EndpointSet>>,
    registry: &'a Registry,
    /// One runtime per service, shared by its subsets.
    runtimes: HashMap<&'a str, Arc<ServiceRuntime>>,
}

impl<'a> Compiler<'a> {
    fn rule(
        &mut self,
        rule: &'a model::Rule,
        at: &str,
        route: &str,
        index: usize,
    ) -> Result<Rule, CompileError> {
        let backends = rule
            .backends
            .iter()
            .map(|b| self.endpoint_set(&b.service, &b.subset, at))
            .collect::<Result<_, _>>()?;
        let mirror = rule
            .mirror
            .as_ref()
            .map(|m| {
                let identity = self
                    .services
                    .get(m.service.as_str())
                    .and_then(|s| s.security.as_ref()?.identity.as_deref())
                    .map(Arc::from);
                Ok::<_, CompileError>((self.endpoint_set(&m.service, &m.subset, at)?, identity))
            })
            .transpose()?;
        let mut policy = RulePolicy::build(route, index, rule, self.registry, mirror);
        policy.headers = rule
            .headers
            .as_ref()
            .map(|h| {
                crate::header_edits::Compiled::compile(h).map_err(|reason| CompileError::Match {
                    path: format!("{at}.headers"),
                    reason,
                })
            })
            .transpose()?
            .map(Arc::new);
        policy.rewrite =
            crate::rewrite::Compiled::compile(rule).map_err(|reason| CompileError::Match {
                path: format!("{at}.rewrite"),
                reason,
            })?;
        policy.cors = rule
            .cors
            .as_ref()
            .map(|c| crate::cors::Cors::compile(c, route, self.limits, &format!("{at}.cors")))
            .transpose()?;
        let policy = Arc::new(policy);
        let answer = crate::answer::Compiled::compile(rule)
            .map_err(|(field, reason)| CompileError::Match {
                path: format!("{at}.{field}"),
                reason,
            })?
            .map(Arc::new);
        let m = &rule.matches;
        let limits = self.limits;
        Ok(Rule {
            path: m
                .path
                .as_ref()
                .map(|p| matcher(p, limits, &format!("{at}.match.path")))
                .transpose()?,
            methods: m
                .methods
                .iter()
                .map(|name| {
                    Method::from_bytes(name.as_bytes()).map_err(|e| CompileError::Match {
                        path: format!("{at}.match.methods"),
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<_, _>>()?,
            headers: m
                .headers
                .iter()
                .map(|h| header_match(h, limits, &format!("{at}.match.headers")))
                .collect::<Result<_, _>>()?,
            query: m
                .query
                .iter()
                .map(|q| {
                    Ok(QueryMatch {
                        name: q.name.clone(),
                        value: matcher(&q.value, limits, &format!("{at}.match.query"))?,
                    })
                })
                .collect::<Result<_, CompileError>>()?,
            weights: WeightedIndex::new(rule.backends.iter().map(model::Backend::weight)),
            labels: if answer.is_some() {
                vec![Arc::new(TargetLabels::new(route, "", ""))]
            } else {
                rule.backends
                    .iter()
                    .map(|b| Arc::new(TargetLabels::new(route, &b.service, &b.subset)))
                    .collect()
            },
            answer,
            sticky: rule.sticky.as_ref().map(crate::sticky::Key::compile),
            backends,
            policy,
        })
    }

    fn endpoint_set(
        &mut self,
        service: &'a str,
        subset: &'a str,
        at: &str,
    ) -> Result<Arc<EndpointSet>, CompileError> {
        let key = (service, subset);
        if let Some(set) = self.sets.get(&key) {
            return Ok(set.clone());
        }
        // Validation has checked both names; an error here means a bug, not a panic.
        let unknown = |what: String| CompileError::Match {
            path: format!("{at}.backends"),
            reason: format!("unknown {what}"),
        };
        let svc = *self
            .services
            .get(key.0)
            .ok_or_else(|| unknown(format!("service {service:?}")))?;
        let no_selector = BTreeMap::new();
        let selector = if subset.is_empty() {
            &no_selector
        } else {
            svc.subsets
                .get(subset)
                .ok_or_else(|| unknown(format!("subset {subset:?}")))?
        };
        let registry = self.registry;
        let runtime = match self.runtimes.get(service) {
            Some(rt) => rt.clone(),
            None => {
                let rt = Arc::new(ServiceRuntime::build(svc, registry)?);
                self.runtimes.insert(service, rt.clone());
                rt
            }
        };
        let set = Arc::new(EndpointSet::build_shared(
            svc, subset, selector, registry, runtime,
        )?);
        self.sets.insert(key, set.clone());
        Ok(set)
    }
}

pub(crate) fn matcher(
    m: &StringMatch,
    limits: &Limits,
    path: &str,
) -> Result<Matcher, CompileError> {
    // Validation guarantees exactly one kind is set.
    Ok(if let Some(s) = &m.exact {
        Matcher::Exact(s.clone())
    } else if let Some(s) = &m.prefix {
        Matcher::Prefix(s.clone())
    } else if let Some(re) = &m.regex {
        Matcher::Regex(
            compile_regex(re, limits).map_err(|reason| CompileError::Match {
                path: path.to_owned(),
                reason,
            })?,
        )
    } else {
        Matcher::Present
    })
}

fn header_match(h: &NamedMatch, limits: &Limits, path: &str) -> Result<HeaderMatch, CompileError> {
    // HeaderName::from_bytes lower-cases, so a model written `X-User` still matches.
    let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| CompileError::Match {
        path: path.to_owned(),
        reason: format!("header name {:?}: {e}", h.name),
    })?;
    Ok(HeaderMatch {
        name,
        value: matcher(&h.value, limits, path)?,
        invert: h.invert,
    })
}

impl Matcher {
    pub(crate) fn matches(&self, value: &[u8]) -> bool {
        match self {
            Matcher::Exact(s) => value == s.as_bytes(),
            Matcher::Prefix(s) => value.starts_with(s.as_bytes()),
            // Regexes match text; a value that is not UTF-8 cannot match one.
            Matcher::Regex(re) => std::str::from_utf8(value).is_ok_and(|v| re.is_match(v)),
            Matcher::Present => true,
        }
    }
}

impl Rule {
    fn matches<B>(&self, req: &Request<B>) -> bool {
        let uri = req.uri();
        self.path
            .as_ref()
            .is_none_or(|p| p.matches(uri.path().as_bytes()))
            && (self.methods.is_empty() || self.methods.contains(req.method()))
            && self.headers.iter().all(|h| h.matches(req.headers()))
            && self.query.iter().all(|q| q.matches(uri.query()))
    }
}

impl HeaderMatch {
    /// A header that appears several times matches when any of its values does; `invert`
    /// negates the whole answer, so an absent header matches an inverted rule.
    fn matches(&self, headers: &HeaderMap) -> bool {
        let hit = headers
            .get_all(&self.name)
            .iter()
            .any(|v| self.value.matches(v.as_bytes()));
        hit != self.invert
    }
}

impl QueryMatch {
    /// A parameter that appears several times matches when any of its values does. Names and
    /// values are compared after percent-decoding (`+` is a space, as in forms).
    fn matches(&self, query: Option<&str>) -> bool {
        let Some(query) = query else {
            return false;
        };
        query.split('&').any(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            !name.is_empty()
                && decode(name).as_ref() == self.name.as_bytes()
                && self.value.matches(&decode(value))
        })
    }
}

/// Percent-decodes a query component; allocates only when there is something to decode.
fn decode(s: &str) -> Cow<'_, [u8]> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s.as_bytes());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let hex = |c: u8| (c as char).to_digit(16);
        match b {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    // A stray '%' stays as it is.
                    _ => out.push(b),
                }
            }
            _ => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

/// The authority a request names: the URI's (HTTP/2 `:authority`, HTTP/1 absolute-form), else
/// the `Host` header.
pub(crate) fn authority<B>(req: &Request<B>) -> &str {
    match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req
            .headers()
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    }
}

/// The host a request is for, lower-case and without port.
pub fn request_host<B>(req: &Request<B>) -> Cow<'_, str> {
    let host = strip_port(authority(req));
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// The port a request is for: the authority's, else the one a captured connection was made to,
/// else the scheme's default.
fn request_port<B>(req: &Request<B>, orig: Option<std::net::SocketAddr>) -> u16 {
    split_port(authority(req))
        .1
        .or(orig.map(|a| a.port()))
        .unwrap_or(if req.uri().scheme() == Some(&http::uri::Scheme::HTTPS) {
            443
        } else {
            80
        })
}

fn strip_port(authority: &str) -> &str {
    split_port(authority).0
}

/// An authority's host (userinfo dropped, IPv6 brackets kept) and port, if it names one.
pub(crate) fn split_port(authority: &str) -> (&str, Option<u16>) {
    // Byte scans: this runs on every request.
    let bytes = authority.as_bytes();
    // Drop userinfo, which is never part of a host.
    let start = bytes.iter().rposition(|&b| b == b'@').map_or(0, |i| i + 1);
    let authority = &authority[start..];
    let bytes = authority.as_bytes();
    let colon = if bytes.first() == Some(&b'[') {
        // IPv6 literal: the port, if any, follows `]`.
        match bytes.iter().position(|&b| b == b']') {
            Some(end) if bytes.get(end + 1) == Some(&b':') => end + 1,
            Some(end) => return (&authority[..=end], None),
            None => return (authority, None),
        }
    } else {
        match bytes.iter().rposition(|&b| b == b':') {
            Some(colon) => colon,
            None => return (authority, None),
        }
    };
    let digits = &bytes[colon + 1..];
    if !digits.iter().all(u8::is_ascii_digit) {
        return (authority, None);
    }
    let port = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok());
    (&authority[..colon], port)
}

#[cfg(test)]
#[path = "routing_tests.rs"]
mod tests;

//! Weighted choice: which backend of a rule, then which endpoint of that backend's subset, by
//! the service's load-balancing algorithm: power of two choices over peak-EWMA latency
//! (default), least-request, round-robin, weighted random, or a consistent-hash ring on a
//! header or cookie. Ejected and unhealthy endpoints are skipped while any other is available.
//! A service may prefer the endpoints in the proxy's zone ([`crate::locality`]).
//!
//! Everything here is built when a configuration is compiled (indexes, the hash ring); the
//! per-endpoint state the algorithms read lives in [`EndpointStats`] atomics that survive
//! configuration swaps. The request path takes no lock and allocates nothing.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use http::HeaderMap;
use http::header::{COOKIE, HeaderName};
use http::uri::Authority;
use weft_proto::model::{self, Protocol};
use weft_proto::policy::LbAlgorithm;

use crate::resilience::stats::{EndpointStats, now_ms};
use crate::resilience::{Registry, call::ServiceRuntime};

/// Why a set of endpoints could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    #[error("service {service:?}: endpoint address {address:?} is not a valid authority: {source}")]
    InvalidAddress {
        service: String,
        address: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    /// TLS origination cannot be set up (the proxy NACKs the version).
    #[error("service {service:?}: policy.tls: {reason}")]
    Tls { service: String, reason: String },
}

/// A weighted index over `n` items: `pick` returns `i` with probability `w[i] / sum(w)`.
///
/// Stored as cumulative sums so a pick is one `fastrand` call and a binary search. Items with
/// weight 0 occupy an empty interval and so are never picked.
#[derive(Debug, Clone)]
pub struct WeightedIndex {
    cumulative: Box<[u64]>,
}

impl WeightedIndex {
    /// `None` when there are no items or every weight is 0: nothing can ever be picked.
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Option<Self> {
        let mut total = 0u64;
        let cumulative: Box<[u64]> = weights
            .into_iter()
            .map(|w| {
                total += u64::from(w);
                total
            })
            .collect();
        (total > 0).then_some(Self { cumulative })
    }

    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }

    pub fn total(&self) -> u64 {
        // `new` refuses empty and all-zero inputs, so there is a last element and it is > 0.
        self.cumulative[self.cumulative.len() - 1]
    }

    /// The index for a hash: `hash % total` placed on the weights, so equal hashes always
    /// pick the same item (sticky splits).
    pub fn pick_hashed(&self, hash: u64) -> usize {
        self.index_of(hash % self.total())
    }

    /// A random index, distributed by weight.
    pub fn pick(&self) -> usize {
        if self.cumulative.len() == 1 {
            return 0;
        }
        self.index_of(fastrand::u64(0..self.total()))
    }

    /// The index whose interval contains `r` (`0 <= r < total`); deterministic, for tests.
    pub fn index_of(&self, r: u64) -> usize {
        // First item whose cumulative sum exceeds r; zero-weight items share their
        // predecessor's sum and are skipped.
        self.cumulative.partition_point(|&c| c <= r)
    }
}

/// One endpoint, with its address pre-parsed into the form the request URI needs.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub authority: Authority,
}

/// The endpoints of one `(service, subset)`, shared by every rule that names it.
#[derive(Debug)]
pub struct EndpointSet {
    pub service: String,
    /// Empty: all endpoints of the service.
    pub subset: String,
    pub protocol: Protocol,
    endpoints: Box<[Endpoint]>,
    /// `None` when the subset selects no endpoint.
    index: Option<WeightedIndex>,
    /// Per endpoint, same order; shared across versions through the registry.
    pub stats: Box<[Arc<EndpointStats>]>,
    /// The service's policy and shared state (bulkhead, budget, pools).
    pub runtime: Arc<ServiceRuntime>,
    ring: Option<Ring>,
    /// The endpoints in this proxy's zone, when the service prefers them.
    local: Option<crate::locality::LocalZone>,
    next: AtomicUsize,
    /// Outbound counters of this (service, subset) for experiments, kept across config swaps.
    pub subset_stats: Arc<crate::stats::Counters>,
}

impl EndpointSet {
    /// Selects the endpoints of `service` that carry every label of `selector`, with fresh
    /// state (tests; the proxy uses [`EndpointSet::build_shared`]).
    pub fn build(
        service: &model::Service,
        subset: &str,
        selector: &BTreeMap<String, String>,
    ) -> Result<Self, BalanceError> {
        let registry = Registry::default();
        let runtime = Arc::new(ServiceRuntime::build(service, &registry)?);
        Self::build_shared(service, subset, selector, &registry, runtime)
    }

    /// Like [`EndpointSet::build`], with endpoint state from `registry`.
    pub fn build_shared(
        service: &model::Service,
        subset: &str,
        selector: &BTreeMap<String, String>,
        registry: &Registry,
        runtime: Arc<ServiceRuntime>,
    ) -> Result<Self, BalanceError> {
        let mut endpoints = Vec::new();
        let mut weights = Vec::new();
        let mut stats = Vec::new();
        let mut zones = Vec::new();
        for ep in &service.endpoints {
            let selected = selector
                .iter()
                .all(|(k, v)| ep.labels.get(k).is_some_and(|have| have == v));
            if !selected {
                continue;
            }
            let authority = Authority::from_str(&ep.address).map_err(|source| {
                BalanceError::InvalidAddress {
                    service: service.name.clone(),
                    address: ep.address.clone(),
                    source,
                }
            })?;
            endpoints.push(Endpoint { authority });
            zones.push(ep.labels.get("zone").map(String::as_str));
            stats.push(registry.endpoint(&service.name, &ep.address));
            // The wire says 0 means 1; validation refuses an explicit 0 in the model.
            weights.push(ep.weight.unwrap_or(1).max(1));
        }
        let ring = (runtime.lb.algorithm == LbAlgorithm::ConsistentHash)
            .then(|| Ring::build(&endpoints, &weights));
        let local = runtime
            .lb
            .local_zone
            .as_deref()
            .and_then(|zone| crate::locality::LocalZone::build(zone, zones, &weights));
        Ok(Self {
            service: service.name.clone(),
            subset: subset.to_owned(),
            protocol: service.protocol,
            endpoints: endpoints.into_boxed_slice(),
            index: WeightedIndex::new(weights),
            stats: stats.into_boxed_slice(),
            runtime,
            ring,
            local,
            next: AtomicUsize::new(fastrand::usize(..)),
            subset_stats: crate::stats::global().handle(&service.name, subset),
        })
    }

    /// An endpoint for a request without headers; `None` when the subset is empty.
    pub fn pick(&self) -> Option<&Endpoint> {
        self.endpoints.get(self.choose(&HeaderMap::new(), None)?)
    }

    pub fn endpoint(&self, i: usize) -> &Endpoint {
        &self.endpoints[i]
    }

    /// The index of the endpoint for a request with `headers`, by the service's algorithm,
    /// avoiding `exclude` (the endpoint a retry just failed on) when there is another choice.
    /// Unavailable (ejected, unhealthy) endpoints are used only when nothing else is left
    /// ("panic mode", like Envoy), so an outage of the checks never becomes an outage.
    pub fn choose(&self, headers: &HeaderMap, exclude: Option<usize>) -> Option<usize> {
        let index = self.index.as_ref()?;
        let n = self.endpoints.len();
        if n == 1 {
            return Some(0);
        }
        let now = now_ms();
        let ok = |i: usize| Some(i) != exclude && self.stats[i].available(now);
        let lb = &self.runtime.lb;
        if let Some(ring) = &self.ring
            && let Some(key) = hash_key(headers, lb.hash_header.as_ref(), lb.hash_cookie.as_deref())
            && let Some(i) = ring.lookup(hash(key), ok)
        {
            return Some(i);
        }
        if let Some(local) = &self.local {
            // Kept requests go to the zone, the spilled share to the other zones only (as
            // Envoy's priority levels do), so the zone's load falls as its endpoints fail.
            let keep = local.keep(|i| self.stats[i].available(now));
            let side = if keep { &local.index } else { index };
            if let Some(i) = self.pick_in(side, &|i| local.contains(i) == keep && ok(i)) {
                return Some(i);
            }
        }
        self.pick_in(index, &ok)
            .or_else(|| self.pick_in(index, &|i| Some(i) != exclude))
            .or_else(|| Some(index.pick()))
    }

    /// An endpoint by the service's algorithm among those `index` can pick and `ok` allows.
    fn pick_in(&self, index: &WeightedIndex, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let lb = &self.runtime.lb;
        let n = self.endpoints.len();
        match lb.algorithm {
            LbAlgorithm::RoundRobin => (0..n).find_map(|_| {
                let r = self.next.fetch_add(1, Relaxed) as u64 % index.total();
                let i = index.index_of(r);
                ok(i).then_some(i)
            }),
            LbAlgorithm::Random => random_available(index, ok),
            LbAlgorithm::P2cEwma | LbAlgorithm::LeastRequest | LbAlgorithm::ConsistentHash => {
                let a = random_available(index, ok)?;
                let b = (0..3)
                    .map(|_| index.pick())
                    .find(|&b| b != a && ok(b))
                    .unwrap_or(a);
                let cost = |i: usize| {
                    if lb.algorithm == LbAlgorithm::LeastRequest {
                        f64::from(self.stats[i].inflight())
                    } else {
                        self.stats[i].cost()
                    }
                };
                Some(if cost(b) < cost(a) { b } else { a })
            }
        }
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }
}

/// A weighted random available endpoint: a few random tries, then a scan from a random start.
fn random_available(index: &WeightedIndex, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
    if let Some(i) = (0..4).map(|_| index.pick()).find(|&i| ok(i)) {
        return Some(i);
    }
    let n = index.len();
    let start = fastrand::usize(..n);
    (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
}

/// The value a consistent-hash balancer hashes: the header, else the cookie.
fn hash_key<'h>(
    headers: &'h HeaderMap,
    header: Option<&HeaderName>,
    cookie: Option<&str>,
) -> Option<&'h [u8]> {
    if let Some(v) = header.and_then(|h| headers.get(h)) {
        return Some(v.as_bytes());
    }
    let cookie = cookie?;
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == cookie).then_some(value.as_bytes())
        })
}

/// FNV-1a with a final mix: stable across processes and versions (unlike `DefaultHasher`),
/// which is what keeps a user on the same endpoint across proxies and restarts.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // murmur3 fmix64
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A consistent-hash ring (ketama-style): 100 points per unit of weight (up to 10) per
/// endpoint, placed by hashing the endpoint's address, so adding or removing one endpoint
/// moves only the keys next to its points.
#[derive(Debug)]
struct Ring {
    points: Box<[(u64, u32)]>,
}

impl Ring {
    fn build(endpoints: &[Endpoint], weights: &[u32]) -> Self {
        let mut points = Vec::new();
        for (i, (ep, w)) in endpoints.iter().zip(weights).enumerate() {
            for v in 0..100 * (*w).clamp(1, 10) {
                let key = format!("{}#{v}", ep.authority);
                points.push((hash(key.as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        Self {
            points: points.into_boxed_slice(),
        }
    }

    /// The first point at or after `h` (wrapping) whose endpoint is `ok`.
    fn lookup(&self, h: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.points.len();
        let start = self.points.partition_point(|p| p.0 < h);
        (0..n)
            .map(|k| self.points[(start + k) % n].1 as usize)
            .find(|&i| ok(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(index: &WeightedIndex, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; index.len()];
        for _ in 0..picks {
            counts[index.pick()] += 1;
        }
        counts
    }

    #[test]
    fn ninety_ten_split_is_within_two_points() {
        let index = WeightedIndex::new([90, 10]).unwrap();
        let c = counts(&index, 10_000);
        let share = c[0] as f64 / 100.0;
        assert!((88.0..=92.0).contains(&share), "v1 got {share}%");
    }

    #[test]
    fn zero_weight_is_never_picked() {
        let index = WeightedIndex::new([0, 5, 0, 5, 0]).unwrap();
        let c = counts(&index, 10_000);
        assert_eq!(c[0] + c[2] + c[4], 0, "{c:?}");
        assert!(c[1] > 0 && c[3] > 0, "{c:?}");
        // Interval boundaries, exactly.
        assert_eq!(index.index_of(0), 1);
        assert_eq!(index.index_of(4), 1);
        assert_eq!(index.index_of(5), 3);
        assert_eq!(index.index_of(9), 3);
    }

    #[test]
    fn nothing_to_pick_is_none() {
        assert!(WeightedIndex::new([]).is_none());
        assert!(WeightedIndex::new([0, 0]).is_none());
    }

    fn service() -> model::Service {
        let ep = |addr: &str, version: &str, weight| model::Endpoint {
            address: addr.into(),
            labels: [("version".to_owned(), version.to_owned())].into(),
            weight,
        };
        model::Service {
            name: "reviews".into(),
            namespace: String::new(),
            protocol: Protocol::Http1,
            ports: vec![],
            virtual_ips: vec![],
            endpoints: vec![
                ep("10.0.0.1:80", "v1", None),
                ep("10.0.0.2:80", "v2", Some(3)),
                ep("10.0.0.3:80", "v2", Some(1)),
            ],
            subsets: BTreeMap::new(),
            policy: model::ClusterPolicy::default(),
            security: None,
        }
    }

    #[test]
    fn subsets_select_by_label_and_weight_endpoints() {
        let svc = service();
        let v2 = EndpointSet::build(&svc, "v2", &[("version".into(), "v2".into())].into()).unwrap();
        let addrs: Vec<_> = v2
            .endpoints()
            .iter()
            .map(|e| e.authority.as_str())
            .collect();
        assert_eq!(addrs, ["10.0.0.2:80", "10.0.0.3:80"]);
        let mut heavy = 0;
        for _ in 0..4000 {
            let ep = v2.pick().unwrap();
            assert_ne!(ep.authority.as_str(), "10.0.0.1:80");
            heavy += usize::from(ep.authority.as_str() == "10.0.0.2:80");
        }
        assert!(
            (2800..=3200).contains(&heavy),
            "3:1 split gave {heavy}/4000"
        );

        let all = EndpointSet::build(&svc, "", &BTreeMap::new()).unwrap();
        assert_eq!(all.endpoints().len(), 3);

        let none =
            EndpointSet::build(&svc, "v9", &[("version".into(), "v9".into())].into()).unwrap();
        assert!(none.pick().is_none());
    }

    fn hashed_service(addrs: &[&str]) -> model::Service {
        let mut svc = service();
        svc.endpoints = addrs
            .iter()
            .map(|a| model::Endpoint {
                address: (*a).into(),
                labels: BTreeMap::new(),
                weight: None,
            })
            .collect();
        svc.policy.load_balancer = Some(weft_proto::policy::LoadBalancer {
            algorithm: LbAlgorithm::ConsistentHash,
            hash_header: Some("x-user".into()),
            hash_cookie: Some("user".into()),
            prefer_local_zone: false,
        });
        svc
    }

    fn owner(set: &EndpointSet, user: &str, cookie: bool) -> String {
        let mut h = HeaderMap::new();
        if cookie {
            h.insert(COOKIE, format!("a=b; user={user}").parse().unwrap());
        } else {
            h.insert("x-user", user.parse().unwrap());
        }
        set.endpoint(set.choose(&h, None).unwrap())
            .authority
            .to_string()
    }

    #[test]
    fn consistent_hash_is_stable_and_moves_few_keys() {
        let three = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];
        let a = EndpointSet::build(&hashed_service(&three), "", &BTreeMap::new()).unwrap();
        let again = EndpointSet::build(&hashed_service(&three), "", &BTreeMap::new()).unwrap();
        let four = [three[0], three[1], three[2], "10.0.0.4:80"];
        let more = EndpointSet::build(&hashed_service(&four), "", &BTreeMap::new()).unwrap();
        let mut moved = 0;
        let mut seen = std::collections::BTreeSet::new();
        for u in 0..1000 {
            let user = format!("user-{u}");
            let first = owner(&a, &user, false);
            assert_eq!(first, owner(&a, &user, false), "same key, same endpoint");
            assert_eq!(first, owner(&again, &user, false), "stable across rebuilds");
            assert_eq!(
                first,
                owner(&a, &user, true),
                "cookie and header hash alike"
            );
            seen.insert(first.clone());
            if owner(&more, &user, false) != first {
                moved += 1;
            }
        }
        assert_eq!(seen.len(), 3, "keys spread over every endpoint");
        // Ideal: 1/4 of the keys move to the new endpoint, none between the old ones.
        assert!((150..=350).contains(&moved), "{moved} of 1000 keys moved");
    }

    #[test]
    fn p2c_ewma_prefers_the_fast_endpoint_and_skips_ejected_ones() {
        let svc = hashed_service(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let mut svc = svc;
        svc.policy.load_balancer = None;
        let set = EndpointSet::build(&svc, "", &BTreeMap::new()).unwrap();
        set.stats[0].observe_latency(std::time::Duration::from_millis(1));
        set.stats[1].observe_latency(std::time::Duration::from_millis(1));
        set.stats[2].observe_latency(std::time::Duration::from_millis(50));
        let mut slow = 0;
        for _ in 0..3000 {
            slow += usize::from(set.choose(&HeaderMap::new(), None) == Some(2));
        }
        assert!(slow < 100, "slow endpoint picked {slow}/3000");
        // An ejected endpoint is skipped; with all ejected, traffic still flows (panic mode).
        set.stats[0]
            .ejected_until_ms
            .store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        for _ in 0..200 {
            assert_ne!(set.choose(&HeaderMap::new(), None), Some(0));
        }
        for s in set.stats.iter() {
            s.ejected_until_ms
                .store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        }
        assert!(set.choose(&HeaderMap::new(), None).is_some());
        // A retry avoids the endpoint that just failed.
        for s in set.stats.iter() {
            s.ejected_until_ms
                .store(0, std::sync::atomic::Ordering::Relaxed);
        }
        for _ in 0..200 {
            assert_ne!(set.choose(&HeaderMap::new(), Some(1)), Some(1));
        }
    }
}

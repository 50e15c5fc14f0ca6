//! Zone-aware balancing. A service whose load balancer sets `prefer_local_zone` keeps this
//! proxy's requests on its endpoints in the proxy's zone (`--zone`; endpoints labelled `zone`,
//! which discovery takes from EndpointSlices) while enough of them are available, and spills
//! the rest over to the other zones as they fail — Envoy's priority levels with its overprovisioning
//! factor of 1.4: the local share is `min(1, 1.4 × available / total)`, so losing up to 28% of
//! the zone's endpoints moves nothing, losing half moves 30% of requests, losing all moves all.
//! Cross-zone traffic costs money and latency; an overloaded zone costs an outage, which is why
//! the spill starts before the last local endpoint is gone.

use crate::balance::WeightedIndex;

/// Overprovisioning factor ×10, so the share is computed in integers.
const OVERPROVISION_X10: usize = 14;

/// The endpoints of a set that are in this proxy's zone.
#[derive(Debug)]
pub struct LocalZone {
    /// The set's weights with every other zone's at 0: indexes are the set's own.
    pub index: WeightedIndex,
    /// The set's indexes of the local endpoints.
    local: Box<[usize]>,
    is_local: Box<[bool]>,
}

impl LocalZone {
    /// `None` when no endpoint (with a positive weight) is in `zone`: nothing to prefer.
    pub fn build<'a>(
        zone: &str,
        zones: impl IntoIterator<Item = Option<&'a str>>,
        weights: &[u32],
    ) -> Option<Self> {
        let is_local: Box<[bool]> = zones.into_iter().map(|z| z == Some(zone)).collect();
        let index = WeightedIndex::new(
            weights
                .iter()
                .zip(&is_local)
                .map(|(&w, &local)| if local { w } else { 0 }),
        )?;
        let local = (0..is_local.len()).filter(|&i| is_local[i]).collect();
        Some(Self {
            index,
            local,
            is_local,
        })
    }

    pub fn contains(&self, i: usize) -> bool {
        self.is_local.get(i).copied().unwrap_or(false)
    }

    /// Whether one request stays in the zone, given which endpoints are `available`.
    pub fn keep(&self, available: impl Fn(usize) -> bool) -> bool {
        let total = self.local.len();
        let up = self.local.iter().filter(|&&i| available(i)).count();
        if up * OVERPROVISION_X10 >= total * 10 {
            return true;
        }
        up > 0 && fastrand::usize(..total * 10) < up * OVERPROVISION_X10
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::EndpointSet;
    use crate::resilience::call::ServiceRuntime;
    use crate::resilience::registry::Registry;
    use http::HeaderMap;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use weft_proto::model;
    use weft_proto::policy::{LbAlgorithm, LoadBalancer};

    /// Endpoints 10.0.0.1–2 in zone `a`, .3–5 in `b`, .6 without a zone, balanced by
    /// `algorithm` with `prefer` set, as seen by a proxy in `zone`.
    fn set(zone: Option<&str>, algorithm: LbAlgorithm, prefer: bool) -> EndpointSet {
        let ep = |n: u8, zone: Option<&str>| model::Endpoint {
            address: format!("10.0.0.{n}:80"),
            labels: zone
                .map(|z| [("zone".to_owned(), z.to_owned())].into())
                .unwrap_or_default(),
            weight: None,
        };
        let svc = model::Service {
            name: "reviews".into(),
            endpoints: vec![
                ep(1, Some("a")),
                ep(2, Some("a")),
                ep(3, Some("b")),
                ep(4, Some("b")),
                ep(5, Some("b")),
                ep(6, None),
            ],
            policy: model::ClusterPolicy {
                load_balancer: Some(LoadBalancer {
                    algorithm,
                    prefer_local_zone: prefer,
                    ..LoadBalancer::default()
                }),
                ..model::ClusterPolicy::default()
            },
            namespace: String::new(),
            protocol: model::Protocol::Http1,
            ports: vec![],
            virtual_ips: vec![],
            subsets: BTreeMap::new(),
            security: None,
        };
        let mut registry = Registry::default();
        registry.set_zone(zone);
        let runtime = Arc::new(ServiceRuntime::build(&svc, &registry).unwrap());
        EndpointSet::build_shared(&svc, "", &BTreeMap::new(), &registry, runtime).unwrap()
    }

    /// Picks per endpoint over `n` requests.
    fn spread(set: &EndpointSet, n: usize) -> Vec<usize> {
        let mut c = vec![0; set.endpoints().len()];
        for _ in 0..n {
            c[set.choose(&HeaderMap::new(), None).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn requests_stay_in_the_zone_with_every_algorithm() {
        for algorithm in [
            LbAlgorithm::P2cEwma,
            LbAlgorithm::LeastRequest,
            LbAlgorithm::RoundRobin,
            LbAlgorithm::Random,
        ] {
            let c = spread(&set(Some("a"), algorithm, true), 2000);
            assert_eq!(c[2..].iter().sum::<usize>(), 0, "{algorithm:?}: {c:?}");
            assert!(
                c[0] > 500 && c[1] > 500,
                "{algorithm:?} spreads in the zone: {c:?}"
            );
        }
        // Without the policy, without a zone, or in a zone with no endpoint: every zone.
        for s in [
            set(Some("a"), LbAlgorithm::RoundRobin, false),
            set(None, LbAlgorithm::RoundRobin, true),
            set(Some("c"), LbAlgorithm::RoundRobin, true),
        ] {
            let c = spread(&s, 600);
            assert!(c.iter().all(|&n| n > 50), "{c:?}");
        }
    }

    #[test]
    fn failing_local_endpoints_spill_over_and_retries_leave_the_zone() {
        let s = set(Some("a"), LbAlgorithm::P2cEwma, true);
        // One of two local endpoints down: 1.4 × 50% = 70% stay (on the one left).
        s.stats[0].set_unhealthy(true);
        let c = spread(&s, 10_000);
        assert_eq!(c[0], 0, "{c:?}");
        assert!((6_500..=7_500).contains(&c[1]), "70% stay local: {c:?}");
        // Both down: everything goes to the other zones.
        s.stats[1].set_unhealthy(true);
        let c = spread(&s, 2000);
        assert_eq!(c[0] + c[1], 0, "{c:?}");
        // Healthy again: back home.
        s.stats[0].set_unhealthy(false);
        s.stats[1].set_unhealthy(false);
        let c = spread(&s, 2000);
        assert_eq!(c[0] + c[1], 2000, "{c:?}");
        // A retry that excludes the zone's only usable endpoint leaves the zone.
        s.stats[1].set_unhealthy(true);
        for _ in 0..200 {
            let i = s.choose(&HeaderMap::new(), Some(0)).unwrap();
            assert!(i >= 2, "{i}");
        }
    }

    #[test]
    fn only_local_endpoints_are_in_the_index() {
        let z =
            LocalZone::build("a", [Some("a"), Some("b"), None, Some("a")], &[1, 5, 5, 3]).unwrap();
        for _ in 0..1000 {
            let i = z.index.pick();
            assert!(i == 0 || i == 3, "{i}");
        }
        assert!(z.contains(3) && !z.contains(1) && !z.contains(2) && !z.contains(9));
        assert!(LocalZone::build("c", [Some("a"), Some("b")], &[1, 1]).is_none());
        // A local endpoint of weight 0 cannot be picked: nothing to prefer.
        assert!(LocalZone::build("a", [Some("a"), Some("b")], &[0, 1]).is_none());
    }

    #[test]
    fn the_local_share_follows_the_available_endpoints() {
        let z = LocalZone::build("a", [Some("a"); 10], &[1; 10]).unwrap();
        let share = |up: usize| {
            let kept = (0..10_000).filter(|_| z.keep(|i| i < up)).count();
            kept as f64 / 10_000.0
        };
        assert_eq!(share(10), 1.0);
        assert_eq!(share(8), 1.0, "1.4 × 80% ≥ 100%: nothing moves");
        let half = share(5);
        assert!(
            (0.66..=0.74).contains(&half),
            "1.4 × 50% = 70% stays: {half}"
        );
        let one = share(1);
        assert!((0.11..=0.17).contains(&one), "1.4 × 10% = 14% stays: {one}");
        assert_eq!(share(0), 0.0);
    }
}

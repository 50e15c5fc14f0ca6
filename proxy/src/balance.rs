//! Weighted choice: which backend of a rule, then which endpoint of that backend's subset.
//!
//! Everything here is built when a configuration is compiled, so that the request path is a
//! random number and a binary search over a small array: no locks, no allocation.

use std::collections::BTreeMap;
use std::str::FromStr;

use http::uri::Authority;
use weft_proto::model::{self, Protocol};

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

    fn total(&self) -> u64 {
        // `new` refuses empty and all-zero inputs, so there is a last element and it is > 0.
        self.cumulative[self.cumulative.len() - 1]
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
}

impl EndpointSet {
    /// Selects the endpoints of `service` that carry every label of `selector`.
    pub fn build(
        service: &model::Service,
        subset: &str,
        selector: &BTreeMap<String, String>,
    ) -> Result<Self, BalanceError> {
        let mut endpoints = Vec::new();
        let mut weights = Vec::new();
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
            // The wire says 0 means 1; validation refuses an explicit 0 in the model.
            weights.push(ep.weight.unwrap_or(1).max(1));
        }
        Ok(Self {
            service: service.name.clone(),
            subset: subset.to_owned(),
            protocol: service.protocol,
            endpoints: endpoints.into_boxed_slice(),
            index: WeightedIndex::new(weights),
        })
    }

    /// A random endpoint by weight; `None` when the subset is empty.
    pub fn pick(&self) -> Option<&Endpoint> {
        let index = self.index.as_ref()?;
        self.endpoints.get(index.pick())
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
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
}

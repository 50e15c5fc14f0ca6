//! State that outlives one configuration version: per-endpoint stats (keyed by service and
//! address), per-service bulkhead, retry budget and connection pools, per-rule token buckets,
//! and the active health-check tasks. Compiling a configuration looks entries up here (creating
//! the missing ones); after a successful swap, [`Registry::commit`] drops what the new
//! configuration no longer names and (re)starts health checks.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use weft_proto::MeshConfig;
use weft_proto::policy::HealthCheck;

use super::budget::Budget;
use super::bulkhead::Bulkhead;
use super::health;
use super::ratelimit::{RateConfig, TokenBucket};
use super::stats::EndpointStats;
use crate::metrics::ProxyMetrics;
use crate::upstream::Upstream;

/// Default connect timeout and idle time of pooled connections (no policy set).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Per upstream service, across versions.
#[derive(Debug, Default)]
pub struct ServiceShared {
    pub bulkhead: Arc<Bulkhead>,
    pub budget: Budget,
    /// Outlier ejections of this service's endpoints (`weft_proxy_outlier_ejections`).
    pub ejections: Counter,
    /// The pools, rebuilt when the connection policy changes.
    pools: Mutex<Option<(PoolKey, Upstream)>>,
}

/// What a connection pool is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: Option<u32>,
    /// TLS origination, with its CA file's contents (a rotated file makes new pools).
    pub tls: Option<Arc<crate::origination::TlsKey>>,
}

impl ServiceShared {
    /// The pools for `key`: the existing ones when the policy did not change, so a config push
    /// keeps warm connections.
    pub fn upstream(&self, key: PoolKey) -> Upstream {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        match &*pools {
            Some((k, up)) if *k == key => up.clone(),
            _ => {
                let up = Upstream::with_policy(key.clone());
                *pools = Some((key, up.clone()));
                up
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    endpoints: Mutex<HashMap<(String, String), Arc<EndpointStats>>>,
    services: Mutex<HashMap<String, Arc<ServiceShared>>>,
    buckets: Mutex<HashMap<String, Arc<TokenBucket>>>,
    health: Mutex<HashMap<String, HealthTask>>,
    /// Where per-service counters live; `None` in tests that compile tables alone.
    metrics: Option<Arc<ProxyMetrics>>,
    /// This proxy's zone, for services that prefer local endpoints.
    zone: Option<Arc<str>>,
}

#[derive(Debug)]
struct HealthTask {
    config: HealthCheck,
    addresses: Vec<String>,
    task: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain maps: a panicking writer cannot leave them inconsistent in a way that matters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    pub fn with_metrics(metrics: Arc<ProxyMetrics>) -> Self {
        let mut registry = Self::default();
        registry.metrics = Some(metrics);
        registry
    }

    /// Sets this proxy's zone (empty: none).
    pub fn set_zone(&mut self, zone: Option<&str>) {
        self.zone = zone.filter(|z| !z.is_empty()).map(Arc::from);
    }

    pub fn zone(&self) -> Option<&Arc<str>> {
        self.zone.as_ref()
    }

    pub fn endpoint(&self, service: &str, address: &str) -> Arc<EndpointStats> {
        lock(&self.endpoints)
            .entry((service.to_owned(), address.to_owned()))
            .or_default()
            .clone()
    }

    pub fn service(&self, service: &str) -> Arc<ServiceShared> {
        lock(&self.services)
            .entry(service.to_owned())
            .or_insert_with(|| {
                Arc::new(ServiceShared {
                    ejections: self
                        .metrics
                        .as_ref()
                        .map_or_else(Counter::default, |m| m.ejections(service)),
                    ..ServiceShared::default()
                })
            })
            .clone()
    }

    /// The bucket of `key` (route and rule); a new one when the rate changed.
    pub fn bucket(&self, key: &str, config: RateConfig) -> Arc<TokenBucket> {
        let mut buckets = lock(&self.buckets);
        match buckets.get(key) {
            Some(b) if b.config == config => b.clone(),
            _ => {
                let b = Arc::new(TokenBucket::new(config));
                buckets.insert(key.to_owned(), b.clone());
                b
            }
        }
    }

    /// Called after `cfg` was swapped in: forget what it no longer names, run its health
    /// checks.
    pub fn commit(&self, cfg: &MeshConfig) {
        let names: HashSet<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
        let eps: HashSet<(&str, &str)> = cfg
            .services
            .iter()
            .flat_map(|s| {
                s.endpoints
                    .iter()
                    .map(move |e| (s.name.as_str(), e.address.as_str()))
            })
            .collect();
        lock(&self.endpoints).retain(|(s, a), _| eps.contains(&(s.as_str(), a.as_str())));
        lock(&self.services).retain(|s, _| names.contains(s.as_str()));
        let rules: HashSet<String> = cfg
            .routes
            .iter()
            .flat_map(|r| (0..r.rules.len()).map(move |i| rule_key(&r.name, i)))
            .chain(
                cfg.services
                    .iter()
                    .filter(|s| s.security.as_ref().is_some_and(|s| s.rate_limit.is_some()))
                    .map(|s| inbound_key(&s.name)),
            )
            .collect();
        lock(&self.buckets).retain(|k, _| rules.contains(k));

        let mut health = lock(&self.health);
        let mut wanted = HashSet::new();
        for svc in &cfg.services {
            let Some(hc) = &svc.policy.health_check else {
                continue;
            };
            wanted.insert(svc.name.as_str());
            let addresses: Vec<String> = svc.endpoints.iter().map(|e| e.address.clone()).collect();
            if let Some(t) = health.get(&svc.name)
                && t.config == *hc
                && t.addresses == addresses
            {
                continue;
            }
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                continue;
            };
            let targets = addresses
                .iter()
                .map(|a| (a.clone(), self.endpoint(&svc.name, a)))
                .collect();
            let task = rt.spawn(health::run(svc.name.clone(), hc.clone(), targets));
            if let Some(old) = health.insert(
                svc.name.clone(),
                HealthTask {
                    config: hc.clone(),
                    addresses,
                    task,
                },
            ) {
                old.task.abort();
            }
        }
        health.retain(|name, t| {
            let keep = wanted.contains(name.as_str());
            if !keep {
                t.task.abort();
                // No checker any more: passive ejection alone decides.
                for a in &t.addresses {
                    if let Some(ep) = lock(&self.endpoints).get(&(name.clone(), a.clone())) {
                        ep.set_unhealthy(false);
                    }
                }
            }
            keep
        });
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for t in lock(&self.health).values() {
            t.task.abort();
        }
    }
}

/// The key of a rule's token bucket.
pub fn rule_key(route: &str, index: usize) -> String {
    format!("{route}#{index}")
}

/// The bucket key of a service's inbound rate limit (`#` cannot start a route name).
pub fn inbound_key(service: &str) -> String {
    format!("#inbound/{service}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Table;
    use std::time::Duration as D;
    use weft_proto::validate::{Limits, parse_yaml};

    fn cfg(extra_endpoint: bool, rate: u32) -> MeshConfig {
        let extra = if extra_endpoint {
            ", {address: \"127.0.0.1:3\"}"
        } else {
            ""
        };
        let yaml = format!(
            "services:\n  - {{name: a, endpoints: [{{address: \"127.0.0.1:1\"}}, {{address: \"127.0.0.1:2\"}}{extra}]}}\n\
             routes:\n  - name: a\n    hosts: [a]\n    rules:\n      - {{backends: [{{service: a}}], rate_limit: {{requests: {rate}}}}}\n"
        );
        parse_yaml("m", &yaml, &Limits::default()).unwrap()
    }

    #[test]
    fn endpoint_state_survives_a_swap_and_is_dropped_with_the_endpoint() {
        let reg = Registry::default();
        let v1 = cfg(true, 10);
        let _t1 = Table::compile_shared(&v1, &Limits::default(), &reg).unwrap();
        reg.commit(&v1);
        let stats = reg.endpoint("a", "127.0.0.1:1");
        stats.observe_latency(D::from_millis(7));
        let bucket = reg.bucket(
            &rule_key("a", 0),
            RateConfig::from_model(&weft_proto::policy::RateLimit {
                requests: 10,
                interval: None,
                burst: None,
                per: None,
            }),
        );

        // Same endpoints and rate, one endpoint fewer: state is kept for those that stay.
        let v2 = cfg(false, 10);
        let _t2 = Table::compile_shared(&v2, &Limits::default(), &reg).unwrap();
        reg.commit(&v2);
        let again = reg.endpoint("a", "127.0.0.1:1");
        assert!(
            Arc::ptr_eq(&stats, &again),
            "EWMA and in-flight survive the swap"
        );
        assert!(again.ewma_ns() > 6e6);
        let gone = lock(&reg.endpoints).contains_key(&("a".into(), "127.0.0.1:3".into()));
        assert!(!gone, "a removed endpoint's state is dropped");
        let b2 = lock(&reg.buckets).get(&rule_key("a", 0)).cloned().unwrap();
        assert!(
            Arc::ptr_eq(&bucket, &b2),
            "an unchanged rate keeps its bucket"
        );

        // A changed rate gets a fresh bucket.
        let v3 = cfg(false, 20);
        let _t3 = Table::compile_shared(&v3, &Limits::default(), &reg).unwrap();
        let b3 = lock(&reg.buckets).get(&rule_key("a", 0)).cloned().unwrap();
        assert!(!Arc::ptr_eq(&bucket, &b3));
    }
}

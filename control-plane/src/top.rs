//! `weftctl top`: live request rate, success rate and p99 latency per destination service
//! and subset, computed from the proxies' own `/metrics`.
//!
//! The control plane knows every connected proxy and the admin address it announced
//! (`Node.admin_addr`). `top` asks for that list, scrapes every proxy's `/metrics` twice one
//! interval apart, and reports the difference: rates from `weft_proxy_requests_total`,
//! success = answers that are not 5xx, p99 from the `weft_proxy_request_duration_ms`
//! buckets summed over proxies. Only the outbound side is counted, so a request through
//! two sidecars is counted once, by its caller.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::api;

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// One row of `top`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub service: String,
    pub subset: String,
    pub requests: u64,
    pub rps: f64,
    /// Share of answers that were not 5xx, in percent; `None` without requests.
    pub success_percent: Option<f64>,
    /// `None` without requests; the bucket bound that holds the 99th percentile.
    pub p99_ms: Option<f64>,
}

/// What one scrape of all proxies summed to, per (service, subset).
#[derive(Debug, Default, Clone)]
pub struct Totals {
    groups: BTreeMap<(String, String), Group>,
    /// Proxies that could not be scraped, with the reason.
    pub errors: Vec<String>,
}

#[derive(Debug, Default, Clone)]
struct Group {
    requests: f64,
    failures: f64,
    /// `le` bound (as text, to key exactly) → cumulative count.
    buckets: HashMap<String, f64>,
}

/// One sample line: metric name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Parses the samples of a Prometheus/OpenMetrics text exposition (comments skipped).
pub fn parse_samples(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).ok_or_else(|| format!("line {}: cannot parse {line:?}", n + 1))?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    rest = &body[i + 1..];
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                c => value.push(c),
                            },
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                c => key.push(c),
            }
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> &'a str {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map_or("", |(_, v)| v.as_str())
}

impl Totals {
    /// Adds one proxy's exposition.
    pub fn add(&mut self, text: &str) -> Result<(), String> {
        for (name, labels, value) in parse_samples(text)? {
            if label(&labels, "direction") != "outbound" {
                continue;
            }
            let key = (
                label(&labels, "service").to_owned(),
                label(&labels, "subset").to_owned(),
            );
            if key.0.is_empty() {
                continue; // no route: no service to report it under
            }
            match name.as_str() {
                "weft_proxy_requests_total" => {
                    let g = self.groups.entry(key).or_default();
                    g.requests += value;
                    if label(&labels, "class") == "5xx" {
                        g.failures += value;
                    }
                }
                "weft_proxy_request_duration_ms_bucket" => {
                    let g = self.groups.entry(key).or_default();
                    *g.buckets
                        .entry(label(&labels, "le").to_owned())
                        .or_default() += value;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Rows for what happened between `before` and `self`, `elapsed` apart.
    pub fn rows_since(&self, before: &Totals, elapsed: Duration) -> Vec<Row> {
        let secs = elapsed.as_secs_f64().max(1e-3);
        self.groups
            .iter()
            .map(|(key, now)| {
                let then = before.groups.get(key).cloned().unwrap_or_default();
                let requests = (now.requests - then.requests).max(0.0);
                let failures = (now.failures - then.failures).max(0.0);
                let mut buckets: Vec<(f64, f64)> = now
                    .buckets
                    .iter()
                    .filter_map(|(le, c)| {
                        let bound = if le == "+Inf" {
                            f64::INFINITY
                        } else {
                            le.parse().ok()?
                        };
                        Some((bound, c - then.buckets.get(le).copied().unwrap_or(0.0)))
                    })
                    .collect();
                buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                let total = buckets.last().map_or(0.0, |b| b.1);
                let p99 = (total > 0.0)
                    .then(|| {
                        buckets
                            .iter()
                            .find(|(_, c)| *c >= 0.99 * total)
                            .map(|b| b.0)
                    })
                    .flatten();
                Row {
                    service: key.0.clone(),
                    subset: key.1.clone(),
                    requests: requests as u64,
                    rps: requests / secs,
                    success_percent: (requests > 0.0)
                        .then(|| 100.0 * (requests - failures) / requests),
                    p99_ms: p99,
                }
            })
            .collect()
    }
}

/// The `top` table.
pub fn render(rows: &[Row], proxies: usize, errors: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "proxies scraped: {proxies}");
    for e in errors {
        let _ = writeln!(out, "  {e}");
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "{:<20} {:<10} {:>10} {:>9} {:>10}",
        "SERVICE", "SUBSET", "RPS", "SUCCESS", "P99(ms)"
    );
    for r in rows {
        let success = r
            .success_percent
            .map_or_else(|| "-".to_owned(), |s| format!("{s:.1}%"));
        let p99 = match r.p99_ms {
            None => "-".to_owned(),
            Some(p) if p.is_infinite() => "> max".to_owned(),
            Some(p) => format!("{p}"),
        };
        let subset = if r.subset.is_empty() { "-" } else { &r.subset };
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>10.1} {:>9} {:>10}",
            r.service, subset, r.rps, success, p99
        );
    }
    out
}

/// Scrapes the admin `/metrics` of every connected proxy that announced its address.
pub struct Scraper {
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Scraper {
    fn default() -> Self {
        Self::new()
    }
}

impl Scraper {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(SCRAPE_TIMEOUT));
        Self {
            http: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Admin addresses of the connected proxies in `status`.
    pub fn targets(status: &api::Status) -> Vec<String> {
        status
            .proxies
            .iter()
            .filter(|p| p.connected)
            .filter_map(|p| p.admin_addr.clone())
            .collect()
    }

    pub async fn scrape(&self, targets: &[String]) -> Totals {
        let mut totals = Totals::default();
        let answers = futures_util::future::join_all(targets.iter().map(|t| self.get(t))).await;
        for (target, answer) in targets.iter().zip(answers) {
            if let Err(e) = answer.and_then(|text| totals.add(&text)) {
                totals.errors.push(format!("{target}: {e}"));
            }
        }
        totals
    }

    async fn get(&self, addr: &str) -> Result<String, String> {
        let uri: Uri = format!("http://{addr}/metrics")
            .parse()
            .map_err(|e| format!("{e}"))?;
        let req = Request::get(uri)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let fetch = async {
            let resp = self.http.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("/metrics answered {status}"));
            }
            String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
        };
        tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
            .await
            .map_err(|_| format!("no answer within {SCRAPE_TIMEOUT:?}"))?
    }
}

/// One measurement: scrape, wait `interval`, scrape again.
pub async fn measure(
    scraper: &Scraper,
    targets: &[String],
    interval: Duration,
) -> (Vec<Row>, Vec<String>) {
    let t0 = Instant::now();
    let before = scraper.scrape(targets).await;
    tokio::time::sleep(interval.saturating_sub(t0.elapsed())).await;
    let after = scraper.scrape(targets).await;
    let mut errors = before.errors.clone();
    errors.extend(
        after
            .errors
            .iter()
            .filter(|e| !before.errors.contains(e))
            .cloned(),
    );
    (after.rows_since(&before, t0.elapsed()), errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP weft_proxy_requests Requests.
# TYPE weft_proxy_requests counter
weft_proxy_requests_total{direction="outbound",route="reviews",service="reviews",subset="v1",code="200",class="2xx",reason=""} 90
weft_proxy_requests_total{direction="outbound",route="reviews",service="reviews",subset="v2",code="503",class="5xx",reason="upstream_connect_failed"} 5
weft_proxy_requests_total{direction="outbound",route="reviews",service="reviews",subset="v2",code="200",class="2xx",reason=""} 5
weft_proxy_requests_total{direction="inbound",route="",service="reviews",subset="v1",code="200",class="2xx",reason=""} 1000
weft_proxy_request_duration_ms_bucket{direction="outbound",route="reviews",service="reviews",subset="v1",le="0.5"} 80
weft_proxy_request_duration_ms_bucket{direction="outbound",route="reviews",service="reviews",subset="v1",le="1.0"} 89
weft_proxy_request_duration_ms_bucket{direction="outbound",route="reviews",service="reviews",subset="v1",le="2.5"} 90
weft_proxy_request_duration_ms_bucket{direction="outbound",route="reviews",service="reviews",subset="v1",le="+Inf"} 90
# EOF
"#;

    #[test]
    fn rows_are_deltas_per_subset_of_outbound_traffic() {
        let before = Totals::default();
        let mut now = Totals::default();
        now.add(SCRAPE).unwrap();
        let rows = now.rows_since(&before, Duration::from_secs(2));
        assert_eq!(rows.len(), 2);
        let v1 = &rows[0];
        assert_eq!((v1.subset.as_str(), v1.requests, v1.rps), ("v1", 90, 45.0));
        assert_eq!(v1.success_percent, Some(100.0));
        assert_eq!(v1.p99_ms, Some(2.5));
        let v2 = &rows[1];
        assert_eq!(v2.success_percent, Some(50.0));
        assert_eq!(v2.p99_ms, None);
        let text = render(&rows, 1, &[]);
        assert!(
            text.contains("reviews              v1               45.0    100.0%        2.5"),
            "{text}"
        );
    }

    #[test]
    fn label_values_with_escapes_parse() {
        let (name, labels, v) = parse_line(r#"m{a="x\"y",b="z"} 3"#).unwrap();
        assert_eq!((name.as_str(), v), ("m", 3.0));
        assert_eq!(
            labels,
            [("a".into(), "x\"y".into()), ("b".into(), "z".into())]
        );
        assert!(parse_samples("garbage here").is_err());
    }
}

//! Gate evaluation: one check of an experiment over one interval's traffic, as a pure
//! function of the counters measured for the candidate and the stable subset.

use serde::{Deserialize, Serialize};
use weft_proto::experiment::Analysis;
use weft_proto::stats::Counts;

/// What one subset did during a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub requests: u64,
    pub failures: u64,
    /// Requests per second over the window.
    pub rate: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

impl Window {
    pub fn of(c: &Counts, seconds: f64) -> Self {
        Self {
            requests: c.requests,
            failures: c.failures,
            rate: if seconds > 0.0 {
                c.requests as f64 / seconds
            } else {
                0.0
            },
            success_rate: c.success_rate(),
            p99_ms: c.p99_ms(),
        }
    }
}

/// One gate's verdict, with the value that decided it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// `min_requests`, `success_rate` or `p99`.
    pub gate: String,
    /// The bound: at least (requests, success rate) or at most (p99).
    pub threshold: f64,
    /// `None`: nothing measured.
    pub value: Option<f64>,
    pub pass: bool,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub pass: bool,
    pub gates: Vec<Gate>,
    pub candidate: Window,
    pub stable: Window,
    /// Why it failed, with the measured values; `None` when it passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Judges the candidate's window against the gates. Too few requests fail the check (no
/// traffic is no evidence), and then the other gates are not judged: they have no data.
pub fn evaluate(a: &Analysis, candidate: &Counts, stable: &Counts, seconds: f64) -> Check {
    let cand = Window::of(candidate, seconds);
    let mut gates = vec![Gate {
        gate: "min_requests".into(),
        threshold: a.min_requests as f64,
        value: Some(candidate.requests as f64),
        pass: candidate.requests >= a.min_requests,
    }];
    let mut reasons = Vec::new();
    if !gates[0].pass {
        reasons.push(format!(
            "candidate got {} requests, fewer than the minimum {}",
            candidate.requests, a.min_requests
        ));
    } else {
        if let Some(min) = a.success_rate {
            let value = cand.success_rate;
            let pass = value.is_some_and(|v| v >= min.0);
            if !pass {
                reasons.push(format!(
                    "success rate {:.2}% < {}% ({} of {} requests failed)",
                    value.unwrap_or(0.0),
                    min.0,
                    candidate.failures,
                    candidate.requests
                ));
            }
            gates.push(Gate {
                gate: "success_rate".into(),
                threshold: min.0,
                value,
                pass,
            });
        }
        if let Some(max) = a.max_p99 {
            let value = cand.p99_ms;
            let pass = value.is_some_and(|v| v <= f64::from(max.0));
            if !pass {
                reasons.push(format!(
                    "p99 latency {:.1}ms > {}ms",
                    value.unwrap_or(f64::INFINITY),
                    max.0
                ));
            }
            gates.push(Gate {
                gate: "p99".into(),
                threshold: f64::from(max.0),
                value,
                pass,
            });
        }
    }
    Check {
        pass: reasons.is_empty(),
        gates,
        candidate: cand,
        stable: Window::of(stable, seconds),
        reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::experiment::Percent;
    use weft_proto::model::Millis;
    use weft_proto::stats::bucket_of;

    fn counts(ok: u64, failed: u64, ms: u64) -> Counts {
        let mut c = Counts {
            requests: ok + failed,
            failures: failed,
            ..Counts::default()
        };
        c.buckets[bucket_of(ms)] = ok + failed;
        c
    }

    fn gates() -> Analysis {
        Analysis {
            success_rate: Some(Percent(99.0)),
            max_p99: Some(Millis(100)),
            min_requests: 20,
            failure_threshold: 2,
        }
    }

    #[test]
    fn healthy_candidate_passes() {
        let c = evaluate(&gates(), &counts(50, 0, 2), &counts(400, 0, 2), 0.5);
        assert!(c.pass, "{c:?}");
        assert_eq!(c.gates.len(), 3);
        assert_eq!(c.candidate.rate, 100.0);
    }

    #[test]
    fn errors_and_latency_fail_with_their_values() {
        let c = evaluate(&gates(), &counts(95, 5, 2), &Counts::default(), 1.0);
        assert!(!c.pass);
        let reason = c.reason.unwrap();
        assert!(reason.contains("success rate 95.00% < 99%"), "{reason}");
        let c = evaluate(&gates(), &counts(100, 0, 200), &Counts::default(), 1.0);
        assert!(c.reason.unwrap().contains("p99 latency"));
        assert!(!c.gates[2].pass);
    }

    #[test]
    fn no_traffic_is_not_success() {
        let c = evaluate(&gates(), &Counts::default(), &counts(100, 0, 1), 1.0);
        assert!(!c.pass);
        assert_eq!(c.gates.len(), 1, "other gates not judged without data");
        assert!(c.reason.unwrap().contains("fewer than the minimum 20"));
    }
}

//! The persisted state of one experiment and its transitions, as pure functions: what a
//! check, an operator command or a webhook answer does to it. The engine only sequences them.

use serde::{Deserialize, Serialize};
use weft_proto::experiment::{ExperimentSpec, Step};

use super::analysis::Check;

/// Events kept per experiment (oldest dropped first), so state stays bounded.
pub const MAX_EVENTS: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Progressing,
    Paused,
    /// Promoted: all traffic on the candidate.
    Succeeded,
    /// All traffic back on stable; `reason` says why.
    RolledBack,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::RolledBack)
    }
}

/// Where an experiment came from: the mesh YAML or the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Config,
    Api,
}

/// Something that happened, with the values that decided it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at_unix_ms: u64,
    /// `started`, `step`, `check`, `webhook`, `paused`, `resumed`, `promoted`,
    /// `rolled_back`, `resumed_after_restart` (engine restarted).
    pub kind: String,
    pub step: usize,
    /// Candidate weight in percent at that moment.
    pub weight: u32,
    /// The config version that carried a routing change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
}

/// One experiment's state; persisted with the config, so a restart resumes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub spec: ExperimentSpec,
    pub origin: Origin,
    pub phase: Phase,
    /// Index into the plan.
    pub step: usize,
    /// The step whose routing is in the config (`None` before the first is applied).
    pub applied_step: Option<usize>,
    /// Passing checks in the current step.
    pub passed_checks: u32,
    /// Failed checks since the start.
    pub failed_checks: u32,
    pub started_at_unix_ms: u64,
    pub updated_at_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_unix_ms: Option<u64>,
    /// Why it rolled back or was promoted by hand; why it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<Check>,
    #[serde(default)]
    pub events: Vec<Event>,
}

/// What the engine does after a check.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Keep running this step.
    Stay,
    /// Go to this step (its pre-step webhooks run first).
    Advance(usize),
    /// The last step passed: promote (after the confirm-promotion webhooks).
    Promote,
    RollBack(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("experiment {name:?} is {phase:?}: it cannot be {action}")]
    Invalid {
        name: String,
        phase: Phase,
        action: &'static str,
    },
}

impl Record {
    pub fn new(spec: ExperimentSpec, origin: Origin, now: u64) -> Self {
        let mut r = Self {
            spec,
            origin,
            phase: Phase::Progressing,
            step: 0,
            applied_step: None,
            passed_checks: 0,
            failed_checks: 0,
            started_at_unix_ms: now,
            updated_at_unix_ms: now,
            finished_at_unix_ms: None,
            reason: None,
            last_check: None,
            events: Vec::new(),
        };
        r.event(
            now,
            "started",
            None,
            format!("{} experiment", r.spec.strategy()),
        );
        r
    }

    pub fn plan(&self) -> Vec<Step> {
        self.spec.plan()
    }

    /// The candidate weight of the current step.
    pub fn weight(&self) -> u32 {
        match self.phase {
            Phase::Succeeded => 100,
            Phase::RolledBack => 0,
            _ => self.plan().get(self.step).map_or(0, |s| s.weight),
        }
    }

    pub fn event(&mut self, now: u64, kind: &str, version: Option<u64>, message: String) {
        self.push(Event {
            at_unix_ms: now,
            kind: kind.to_owned(),
            step: self.step,
            weight: self.weight(),
            version,
            message,
            check: None,
        });
    }

    fn push(&mut self, e: Event) {
        self.updated_at_unix_ms = e.at_unix_ms;
        self.events.push(e);
        if self.events.len() > MAX_EVENTS {
            let extra = self.events.len() - MAX_EVENTS;
            self.events.drain(..extra);
        }
    }

    /// Records a check and decides what follows.
    pub fn after_check(&mut self, now: u64, check: Check) -> Next {
        let plan = self.plan();
        let pass = check.pass;
        let reason = check.reason.clone();
        self.push(Event {
            at_unix_ms: now,
            kind: "check".into(),
            step: self.step,
            weight: self.weight(),
            version: None,
            message: reason.clone().unwrap_or_else(|| "passed".into()),
            check: Some(check.clone()),
        });
        self.last_check = Some(check);
        if pass {
            self.passed_checks += 1;
            let needed = plan.get(self.step).map_or(1, |s| s.checks);
            if self.passed_checks < needed {
                Next::Stay
            } else if self.step + 1 < plan.len() {
                Next::Advance(self.step + 1)
            } else {
                Next::Promote
            }
        } else {
            self.failure(reason.unwrap_or_default())
        }
    }

    /// A failed check or refused pre-step webhook: rolls back at the threshold.
    pub fn failure(&mut self, reason: String) -> Next {
        self.failed_checks += 1;
        if self.failed_checks >= self.spec.analysis.failure_threshold {
            Next::RollBack(format!(
                "{} failed checks (threshold {}); last: {reason}",
                self.failed_checks, self.spec.analysis.failure_threshold
            ))
        } else {
            Next::Stay
        }
    }

    /// Moves to `step`; its routing is applied by the engine afterwards.
    pub fn advance(&mut self, step: usize) {
        self.step = step;
        self.passed_checks = 0;
        self.reason = None;
    }

    pub fn finish(&mut self, now: u64, phase: Phase, version: Option<u64>, reason: String) {
        self.phase = phase;
        self.finished_at_unix_ms = Some(now);
        self.reason = Some(reason.clone());
        let kind = if phase == Phase::Succeeded {
            "promoted"
        } else {
            "rolled_back"
        };
        self.event(now, kind, version, reason);
    }

    /// `pause`, `resume`, `abort` or `promote` from an operator. Returns the phase to finish
    /// in for abort/promote (the caller applies the routing in the same change).
    pub fn command(&mut self, now: u64, action: &str) -> Result<Option<Phase>, CommandError> {
        let invalid = |r: &Record, action| CommandError::Invalid {
            name: r.spec.name.clone(),
            phase: r.phase,
            action,
        };
        match (action, self.phase) {
            (_, p) if p.is_terminal() => Err(invalid(self, past(action))),
            ("pause", Phase::Progressing) => {
                self.phase = Phase::Paused;
                self.event(now, "paused", None, "paused by operator".into());
                Ok(None)
            }
            ("resume", Phase::Paused) => {
                self.phase = Phase::Progressing;
                self.event(now, "resumed", None, "resumed by operator".into());
                Ok(None)
            }
            ("abort", _) => Ok(Some(Phase::RolledBack)),
            ("promote", _) => Ok(Some(Phase::Succeeded)),
            _ => Err(invalid(self, past(action))),
        }
    }
}

fn past(action: &str) -> &'static str {
    match action {
        "pause" => "paused",
        "resume" => "resumed",
        "abort" => "aborted",
        "promote" => "promoted",
        _ => "changed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::analysis::{Check, Window};
    use weft_proto::experiment::{Analysis, Canary};
    use weft_proto::model::Millis;

    fn spec() -> ExperimentSpec {
        ExperimentSpec {
            name: "e".into(),
            route: "r".into(),
            service: "s".into(),
            stable: "v1".into(),
            candidate: "v2".into(),
            canary: Some(Canary {
                steps: vec![10, 50, 100],
                ..Canary::default()
            }),
            blue_green: None,
            ab: None,
            interval: Millis(100),
            analysis: Analysis::default(),
            webhooks: vec![],
        }
    }

    fn check(pass: bool) -> Check {
        let w = Window {
            requests: 1,
            failures: 0,
            rate: 1.0,
            success_rate: None,
            p99_ms: None,
        };
        Check {
            pass,
            gates: vec![],
            candidate: w.clone(),
            stable: w,
            reason: (!pass).then(|| "bad".to_owned()),
        }
    }

    #[test]
    fn passing_checks_walk_the_plan_then_promote() {
        let mut r = Record::new(spec(), Origin::Api, 1);
        assert_eq!(r.weight(), 10);
        assert_eq!(r.after_check(2, check(true)), Next::Advance(1));
        r.advance(1);
        assert_eq!(r.weight(), 50);
        assert_eq!(r.after_check(3, check(true)), Next::Advance(2));
        r.advance(2);
        assert_eq!(r.after_check(4, check(true)), Next::Promote);
        r.finish(5, Phase::Succeeded, Some(9), "all checks passed".into());
        assert_eq!(r.weight(), 100);
        assert_eq!(r.events.last().unwrap().version, Some(9));
    }

    #[test]
    fn failures_count_up_to_the_threshold() {
        let mut r = Record::new(spec(), Origin::Api, 1);
        assert_eq!(r.after_check(2, check(false)), Next::Stay);
        assert_eq!(r.after_check(3, check(true)), Next::Advance(1));
        r.advance(1);
        let Next::RollBack(reason) = r.after_check(4, check(false)) else {
            panic!("expected a rollback")
        };
        assert!(
            reason.contains("2 failed checks (threshold 2); last: bad"),
            "{reason}"
        );
    }

    #[test]
    fn commands_follow_the_phase() {
        let mut r = Record::new(spec(), Origin::Api, 1);
        assert!(r.command(2, "resume").is_err());
        assert_eq!(r.command(2, "pause"), Ok(None));
        assert_eq!(r.phase, Phase::Paused);
        assert_eq!(r.command(3, "resume"), Ok(None));
        assert_eq!(r.command(4, "abort"), Ok(Some(Phase::RolledBack)));
        r.finish(4, Phase::RolledBack, None, "aborted by operator".into());
        let err = r.command(5, "promote").unwrap_err();
        assert!(err.to_string().contains("cannot be promoted"), "{err}");
    }
}

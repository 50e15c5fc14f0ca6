//! The experiments engine: drives canary, blue/green and A/B experiments step by step through
//! the registry, judging each interval by the traffic the proxies report ([`stats`]).
//!
//! One task per running experiment loops: apply the current step's routing (pre-step
//! webhooks first, when the step is new) → wait one interval → evaluate the gates on the
//! candidate's traffic of that interval ([`analysis`]) → advance, hold, promote (after the
//! confirm-promotion webhooks) or roll back ([`state`]). Every routing change is a new config
//! version, saved together with the experiment's record in one registry update, so a restart
//! resumes at the same step. Operator commands change the record under the same lock and
//! wake the task.
//!
//! Exactly one engine drives an experiment: the one of the replica that holds the
//! [`Leadership`] (a single control plane always does; with etcd, [`crate::leader`] elects
//! one). Records live in the shared store, so a replica that takes over continues each
//! experiment at its stored step; tasks of a replica that loses leadership end.

pub mod analysis;
pub mod state;
pub mod stats;
pub mod webhook;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use weft_proto::experiment::{ExperimentSpec, Stage, Step, WebhookKind};
use weft_proto::stats::Counts;

use crate::leader::Leadership;
use crate::registry::{Registry, RegistryError};
use crate::shutdown::Shutdown;
pub use analysis::{Check, Window};
pub use state::{Event, Next, Origin, Phase, Record};

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("no experiment named {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// An experiment as the API shows it: the record, its plan, and the traffic of the current
/// interval so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    #[serde(flatten)]
    pub record: Record,
    pub strategy: String,
    /// Candidate weight now, in percent.
    pub weight: u32,
    pub plan: Vec<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<Live>,
}

/// Traffic since the last check (or since the step began).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Live {
    pub seconds: f64,
    pub candidate: Window,
    pub stable: Window,
}

/// An experiment's engine task and the bell that wakes it for a command.
type Task = (JoinHandle<()>, Arc<Notify>);

#[derive(Debug, Clone, Copy)]
struct Baseline {
    candidate: Counts,
    stable: Counts,
    since: Instant,
    step: usize,
}

/// Handle on the engine; cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    stats: stats::Aggregator,
    hooks: webhook::Caller,
    leadership: Leadership,
    shutdown: Shutdown,
    tasks: Mutex<HashMap<String, Task>>,
    baselines: Mutex<HashMap<String, Baseline>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn find<'a>(recs: &'a mut [Record], name: &str) -> Result<&'a mut Record, RegistryError> {
    recs.iter_mut()
        .find(|r| r.spec.name == name)
        .ok_or_else(|| RegistryError::Invalid(format!("experiment {name:?} vanished")))
}

impl Engine {
    pub fn new(
        registry: Registry,
        stats: stats::Aggregator,
        leadership: Leadership,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry,
                stats,
                hooks: webhook::Caller::new(),
                leadership,
                shutdown,
                tasks: Mutex::default(),
                baselines: Mutex::default(),
            }),
        }
    }

    /// Runs until shutdown: while this replica leads, starts the experiments of the config
    /// (also after each change) and resumes stored ones — also when it becomes the leader,
    /// and when another replica changed the records (an API call there).
    pub async fn run(self) {
        let mut rx = self.inner.registry.subscribe();
        let mut records = self.inner.registry.subscribe_experiments();
        let mut leader = self.inner.leadership.subscribe();
        loop {
            if self.inner.leadership.is_leader() {
                self.reconcile().await;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                r = records.changed() => {
                    if r.is_err() { break }
                    // A command given on another replica: the task waiting on it re-reads.
                    for (_, wake) in lock(&self.inner.tasks).values() {
                        wake.notify_one();
                    }
                }
                r = leader.changed() => if r.is_err() { break },
                () = self.inner.shutdown.wait() => break,
            }
        }
        for (_, (task, _)) in lock(&self.inner.tasks).drain() {
            task.abort();
        }
    }

    /// Creates records for experiments declared in the config that have none (or whose
    /// finished run had another spec), then makes sure every running one has its task.
    async fn reconcile(&self) {
        let specs = self.inner.registry.current().config.experiments.clone();
        let now = now_ms();
        let res = self
            .inner
            .registry
            .update_experiments("experiment", |_, recs, _| {
                for spec in &specs {
                    match recs.iter_mut().find(|r| r.spec.name == spec.name) {
                        None => recs.push(Record::new(spec.clone(), Origin::Config, now)),
                        Some(r) if r.phase.is_terminal() && r.spec != *spec => {
                            *r = Record::new(spec.clone(), Origin::Config, now);
                        }
                        Some(r) if r.spec != *spec => warn!(
                            experiment = %spec.name,
                            "the config changed a running experiment; it continues with its old spec"
                        ),
                        Some(_) => {}
                    }
                }
                Ok(())
            })
            .await;
        if let Err(e) = res {
            warn!(error = %e, "cannot start the experiments of the config");
        }
        self.spawn_missing();
    }

    fn spawn_missing(&self) {
        let mut tasks = lock(&self.inner.tasks);
        for rec in self.inner.registry.experiments() {
            let name = rec.spec.name.clone();
            if rec.phase.is_terminal() || tasks.get(&name).is_some_and(|(t, _)| !t.is_finished()) {
                continue;
            }
            let wake = Arc::new(Notify::new());
            let task = tokio::spawn(self.clone().drive(name.clone(), wake.clone()));
            tasks.insert(name, (task, wake));
        }
    }

    fn wake(&self, name: &str) {
        if let Some((_, wake)) = lock(&self.inner.tasks).get(name) {
            wake.notify_one();
        }
    }

    /// Starts an experiment given through the API (replacing a finished one of that name).
    pub async fn start(&self, spec: ExperimentSpec) -> Result<Status, ExperimentError> {
        if let Some(owner) = self.inner.registry.discovered_owner(&spec.route) {
            // Its HTTPRoute sets its weights; see the registry docs.
            return Err(RegistryError::Discovered {
                route: spec.route.clone(),
                owner,
            }
            .into());
        }
        let cfg = self.inner.registry.current().config.clone();
        let issues = weft_proto::experiment::check_spec(&spec, &cfg, &[]);
        if !issues.is_empty() {
            let text: Vec<String> = issues
                .iter()
                .map(|(p, r)| {
                    let p = weft_proto::locate::display_path(p);
                    if p.is_empty() {
                        r.clone()
                    } else {
                        format!("{p}: {r}")
                    }
                })
                .collect();
            return Err(ExperimentError::Invalid(format!(
                "invalid experiment {:?}: {}",
                spec.name,
                text.join("; ")
            )));
        }
        let now = now_ms();
        let name = spec.name.clone();
        self.inner
            .registry
            .update_experiments("experiment", |_, recs, _| {
                match recs.iter_mut().find(|r| r.spec.name == spec.name) {
                    Some(r) if !r.phase.is_terminal() => {
                        return Err(RegistryError::Invalid(format!(
                            "experiment {:?} is already running ({:?})",
                            spec.name, r.phase
                        )));
                    }
                    Some(r) => *r = Record::new(spec.clone(), Origin::Api, now),
                    None => recs.push(Record::new(spec.clone(), Origin::Api, now)),
                }
                Ok(())
            })
            .await?;
        info!(experiment = %name, "experiment started");
        self.spawn_missing();
        self.status(&name)
    }

    /// `pause`, `resume`, `abort` (→ rolled back) or `promote` (→ 100 % candidate).
    pub async fn command(&self, name: &str, action: &str) -> Result<Status, ExperimentError> {
        if !matches!(action, "pause" | "resume" | "abort" | "promote") {
            return Err(ExperimentError::NotFound(format!("{name}/{action}")));
        }
        if !self
            .inner
            .registry
            .experiments()
            .iter()
            .any(|r| r.spec.name == name)
        {
            return Err(ExperimentError::NotFound(name.to_owned()));
        }
        let now = now_ms();
        self.inner
            .registry
            .update_experiments("experiment", |cfg, recs, version| {
                let r = find(recs, name)?;
                let finish = r
                    .command(now, action)
                    .map_err(|e| RegistryError::Invalid(e.to_string()))?;
                if let Some(phase) = finish {
                    let (stage, why) = match phase {
                        Phase::Succeeded => (Stage::Promoted, "promoted by operator"),
                        _ => (Stage::RolledBack, "aborted by operator"),
                    };
                    let before = cfg.routes.clone();
                    r.spec.apply(cfg, stage).map_err(RegistryError::Invalid)?;
                    let v = (cfg.routes != before).then_some(version);
                    r.finish(now, phase, v, why.to_owned());
                }
                Ok(())
            })
            .await?;
        self.wake(name);
        self.status(name)
    }

    /// One experiment with its live window.
    pub fn status(&self, name: &str) -> Result<Status, ExperimentError> {
        self.list()
            .into_iter()
            .find(|s| s.record.spec.name == name)
            .ok_or_else(|| ExperimentError::NotFound(name.to_owned()))
    }

    pub fn list(&self) -> Vec<Status> {
        let baselines = lock(&self.inner.baselines).clone();
        self.inner
            .registry
            .experiments()
            .into_iter()
            .map(|record| {
                let live = (!record.phase.is_terminal())
                    .then(|| baselines.get(&record.spec.name))
                    .flatten()
                    .map(|b| {
                        let seconds = b.since.elapsed().as_secs_f64();
                        let (c, s) = self.totals(&record.spec);
                        Live {
                            seconds,
                            candidate: Window::of(&c.delta_since(&b.candidate), seconds),
                            stable: Window::of(&s.delta_since(&b.stable), seconds),
                        }
                    });
                Status {
                    strategy: record.spec.strategy().to_owned(),
                    weight: record.weight(),
                    plan: record.plan(),
                    live,
                    record,
                }
            })
            .collect()
    }

    fn totals(&self, spec: &ExperimentSpec) -> (Counts, Counts) {
        let s = &self.inner.stats;
        (
            s.totals(&spec.service, &spec.candidate),
            s.totals(&spec.service, &spec.stable),
        )
    }

    fn record(&self, name: &str) -> Option<Record> {
        self.inner
            .registry
            .experiments()
            .into_iter()
            .find(|r| r.spec.name == name)
    }

    /// Calls the webhooks of `kind`; the first refusal is the answer.
    async fn hooks(&self, rec: &Record, kind: WebhookKind) -> Result<(), String> {
        let payload = serde_json::json!({
            "experiment": rec.spec.name,
            "type": kind,
            "phase": rec.phase,
            "step": rec.step,
            "weight": rec.weight(),
            "route": rec.spec.route,
            "service": rec.spec.service,
            "stable": rec.spec.stable,
            "candidate": rec.spec.candidate,
        });
        for hook in rec.spec.webhooks.iter().filter(|h| h.kind == kind) {
            self.inner.hooks.call(hook, &payload).await?;
        }
        Ok(())
    }

    /// Waits `d`, or less when woken by a command; false on shutdown.
    async fn pause(&self, d: Duration, wake: &Notify) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = wake.notified() => true,
            () = self.inner.shutdown.wait() => false,
        }
    }

    /// The task of one experiment; ends when it finishes (or on shutdown).
    async fn drive(self, name: String, wake: Arc<Notify>) {
        let registry = self.inner.registry.clone();
        if !self.inner.leadership.is_leader() {
            return;
        }
        if self.record(&name).is_some_and(|r| r.applied_step.is_some()) {
            let _ = registry
                .update_experiments("experiment", |_, recs, _| {
                    let r = find(recs, &name)?;
                    let msg = format!(
                        "engine resumed at step {} (interval timer restarted)",
                        r.step
                    );
                    r.event(now_ms(), "resumed_after_restart", None, msg);
                    Ok(())
                })
                .await;
        }
        loop {
            if !self.inner.leadership.is_leader() {
                // The new leader continues from the stored record.
                info!(experiment = %name, "no longer the leader; handing the experiment over");
                lock(&self.inner.baselines).remove(&name);
                return;
            }
            let Some(rec) = self.record(&name) else {
                return;
            };
            let interval = rec.spec.interval.as_duration();
            match rec.phase {
                p if p.is_terminal() => {
                    lock(&self.inner.baselines).remove(&name);
                    return;
                }
                Phase::Paused => {
                    lock(&self.inner.baselines).remove(&name);
                    if !self.pause(Duration::from_secs(3600), &wake).await {
                        return;
                    }
                    continue;
                }
                _ => {}
            }
            if let Err(e) = self.step_once(&rec, &wake, interval).await {
                warn!(experiment = %name, error = %e, "experiment step failed; retrying next interval");
                if !self.pause(interval, &wake).await {
                    return;
                }
            }
            if self.inner.shutdown.is_triggered() {
                return;
            }
        }
    }

    /// Applies the current step, waits an interval, judges it and moves on.
    async fn step_once(
        &self,
        rec: &Record,
        wake: &Notify,
        interval: Duration,
    ) -> Result<(), RegistryError> {
        let name = rec.spec.name.as_str();
        let registry = &self.inner.registry;
        let step = rec.step;
        let weight = rec.weight();
        let same = |r: &Record| r.phase == Phase::Progressing && r.step == step;
        if rec.applied_step != Some(step)
            && let Err(why) = self.hooks(rec, WebhookKind::PreStep).await
        {
            let now = now_ms();
            registry
                .update_experiments("experiment", |cfg, recs, version| {
                    let r = find(recs, name)?;
                    if same(r) {
                        r.event(now, "webhook", None, format!("pre-step refused: {why}"));
                        let next = r.failure(why.clone());
                        settle(r, cfg, next, now, version)?;
                    }
                    Ok(())
                })
                .await?;
            self.pause(interval, wake).await;
            return Ok(());
        }
        let now = now_ms();
        registry
            .update_experiments("experiment", |cfg, recs, version| {
                let r = find(recs, name)?;
                if !same(r) {
                    return Ok(());
                }
                let before = cfg.routes.clone();
                r.spec
                    .apply(cfg, Stage::Step(weight))
                    .map_err(RegistryError::Invalid)?;
                let v = (cfg.routes != before).then_some(version);
                if r.applied_step != Some(step) {
                    r.applied_step = Some(step);
                    r.event(now, "step", v, format!("candidate weight {weight}%"));
                } else if v.is_some() {
                    let msg = "the route was changed; the step's weights were restored".into();
                    r.event(now, "step", v, msg);
                }
                Ok(())
            })
            .await?;
        let base = {
            let mut b = lock(&self.inner.baselines);
            let entry = b.entry(name.to_owned());
            let (c, s) = self.totals(&rec.spec);
            let fresh = Baseline {
                candidate: c,
                stable: s,
                since: Instant::now(),
                step,
            };
            let e = entry.or_insert(fresh);
            if e.step != step {
                *e = fresh;
            }
            *e
        };
        let wait = interval.saturating_sub(base.since.elapsed());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = wake.notified() => return Ok(()),
            () = self.inner.shutdown.wait() => return Ok(()),
        }
        if !self.inner.leadership.is_leader() {
            return Ok(());
        }
        let (c, s) = self.totals(&rec.spec);
        let seconds = base.since.elapsed().as_secs_f64();
        let check = analysis::evaluate(
            &rec.spec.analysis,
            &c.delta_since(&base.candidate),
            &s.delta_since(&base.stable),
            seconds,
        );
        lock(&self.inner.baselines).insert(
            name.to_owned(),
            Baseline {
                candidate: c,
                stable: s,
                since: Instant::now(),
                step,
            },
        );
        let now = now_ms();
        let (_, promote) = registry
            .update_experiments("experiment", |cfg, recs, version| {
                let r = find(recs, name)?;
                if !same(r) {
                    return Ok(false);
                }
                let next = r.after_check(now, check.clone());
                Ok(matches!(next, Next::Promote) || {
                    settle(r, cfg, next, now, version)?;
                    false
                })
            })
            .await?;
        if promote {
            let confirmed = self.hooks(rec, WebhookKind::ConfirmPromotion).await;
            let now = now_ms();
            registry
                .update_experiments("experiment", |cfg, recs, version| {
                    let r = find(recs, name)?;
                    if !same(r) {
                        return Ok(());
                    }
                    match &confirmed {
                        Ok(()) => settle(r, cfg, Next::Promote, now, version)?,
                        Err(why) => {
                            let msg = format!("promotion not confirmed: {why}");
                            r.reason = Some(msg.clone());
                            r.event(now, "webhook", None, msg);
                        }
                    }
                    Ok(())
                })
                .await?;
        }
        Ok(())
    }
}

/// Carries out `next` on the record and the config (inside one registry update).
fn settle(
    r: &mut Record,
    cfg: &mut weft_proto::MeshConfig,
    next: Next,
    now: u64,
    version: u64,
) -> Result<(), RegistryError> {
    let (stage, phase, reason) = match next {
        Next::Stay => return Ok(()),
        Next::Advance(n) => {
            r.advance(n);
            return Ok(());
        }
        Next::Promote => (
            Stage::Promoted,
            Phase::Succeeded,
            "all steps passed their checks".to_owned(),
        ),
        Next::RollBack(reason) => (Stage::RolledBack, Phase::RolledBack, reason),
    };
    let before = cfg.routes.clone();
    r.spec.apply(cfg, stage).map_err(RegistryError::Invalid)?;
    let v = (cfg.routes != before).then_some(version);
    info!(experiment = %r.spec.name, ?phase, %reason, "experiment finished");
    r.finish(now, phase, v, reason);
    Ok(())
}

//! Traffic-shifting experiments: the declarative spec (`experiments:` in the mesh YAML, or
//! `weftctl experiment start -f`), its validation, the step plan each strategy follows, and
//! the pure edit that puts a stage of an experiment into a route.
//!
//! The control plane's engine decides *when* to move; this module decides *what* the route
//! looks like at each stage, so the rule is unit-tested and shared with nothing else.

use serde::{Deserialize, Serialize};

use crate::locate::Seg;
use crate::model::{Backend, MeshConfig, Millis, NamedMatch, Route, StringMatch};
use crate::policy::Mirror;

/// One experiment: move traffic of `route` from subset `stable` to `candidate` of `service`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    pub name: String,
    /// The route whose split the experiment drives.
    pub route: String,
    pub service: String,
    pub stable: String,
    pub candidate: String,
    /// Exactly one of `canary`, `blue_green`, `ab`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue_green: Option<BlueGreen>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ab: Option<AbTest>,
    /// Time between two analyses (checks).
    pub interval: Millis,
    #[serde(default)]
    pub analysis: Analysis,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<Webhook>,
}

/// Canary: the candidate's share grows step by step, one passing check per step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    /// Candidate weights in percent, increasing, e.g. `[10, 20, 50, 100]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<u32>,
    /// Instead of `steps`: `step_weight`, 2×, 3×… up to `max_weight` (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_weight: Option<u32>,
}

/// Blue/green: the candidate gets no share of the split (only requests matching `headers` /
/// `cookies`, e.g. testers) for `iterations` passing checks, then takes 100 % at once.
/// With `mirror`, that percentage of the stable traffic is copied to the candidate meanwhile
/// (responses dropped), so the checks judge it on real traffic before anyone is switched.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlueGreen {
    #[serde(default = "one")]
    pub iterations: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NamedMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cookies: Vec<CookieMatch>,
    /// Percent of the stable traffic mirrored to the candidate until the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<u32>,
}

/// A/B: requests matching any of `headers` / `cookies` go to the candidate; with
/// `sticky_cookie`, users carrying that cookie are split by its hash: `hash % 100 < weight`
/// goes to the candidate, so one user always lands on the same side. Everyone else stays on
/// stable. Promotes after `iterations` passing checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbTest {
    #[serde(default = "one")]
    pub iterations: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NamedMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cookies: Vec<CookieMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_cookie: Option<String>,
    /// Percent of sticky users sent to the candidate.
    #[serde(default)]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// `{name: beta, value: "1"}`: the cookie `beta` has exactly this value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CookieMatch {
    pub name: String,
    pub value: String,
}

/// The gates a check must pass, measured on the candidate over one interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    /// Minimum success rate in percent (non-5xx, no proxy error), e.g. 99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<Percent>,
    /// Maximum p99 latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99: Option<Millis>,
    /// Fewer candidate requests than this in a check fail it: no traffic is no evidence.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Failed checks (in total) that roll the experiment back.
    #[serde(default = "default_threshold")]
    pub failure_threshold: u32,
}

fn default_min_requests() -> u64 {
    10
}

fn default_threshold() -> u32 {
    2
}

impl Default for Analysis {
    fn default() -> Self {
        Self {
            success_rate: None,
            max_p99: None,
            min_requests: default_min_requests(),
            failure_threshold: default_threshold(),
        }
    }
}

/// A percentage; validation refuses anything outside 0..=100 (so never NaN, hence `Eq`).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Percent(pub f64);

impl Eq for Percent {}

/// Called over HTTP: `POST` of a JSON document describing the experiment; 2xx means go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: WebhookKind,
    /// `http://host:port/path`.
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Millis>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WebhookKind {
    /// Before each step's weights are applied; a refusal counts as a failed check.
    PreStep,
    /// Before promotion; a refusal holds the experiment at its last step until it says yes.
    ConfirmPromotion,
}

/// Sticky backend choice on a rule: exactly one of `cookie` and `header`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickySplit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

/// One step of an experiment's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The candidate's share in percent (A/B: of the sticky users).
    pub weight: u32,
    /// Passing checks needed before moving on.
    pub checks: u32,
}

/// Where an experiment puts its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Running the step with this candidate weight.
    Step(u32),
    /// All traffic on the candidate, experiment rules removed.
    Promoted,
    /// All traffic on stable, experiment rules removed.
    RolledBack,
}

impl ExperimentSpec {
    pub fn strategy(&self) -> &'static str {
        if self.blue_green.is_some() {
            "blue-green"
        } else if self.ab.is_some() {
            "ab"
        } else {
            "canary"
        }
    }

    /// The steps in order; promotion follows the last one.
    pub fn plan(&self) -> Vec<Step> {
        if let Some(bg) = &self.blue_green {
            return vec![Step {
                weight: 0,
                checks: bg.iterations.max(1),
            }];
        }
        if let Some(ab) = &self.ab {
            return vec![Step {
                weight: ab.weight,
                checks: ab.iterations.max(1),
            }];
        }
        let c = self.canary.clone().unwrap_or_default();
        let weights: Vec<u32> = if !c.steps.is_empty() {
            c.steps
        } else {
            let step = c.step_weight.unwrap_or(10).clamp(1, 100);
            let max = c.max_weight.unwrap_or(100).clamp(step, 100);
            (1..).map(|i| i * step).take_while(|w| *w <= max).collect()
        };
        weights
            .into_iter()
            .map(|weight| Step { weight, checks: 1 })
            .collect()
    }

    fn rule_prefix(&self) -> String {
        format!("experiment-{}-", self.name)
    }

    fn is_backend(&self, b: &Backend, subset: &str) -> bool {
        b.service == self.service && b.subset == subset
    }

    /// Index of the rule the experiment splits: the first rule not added by an experiment
    /// whose backends include `stable` and are all `stable` or `candidate`.
    pub fn target_rule(&self, route: &Route) -> Option<usize> {
        route.rules.iter().position(|r| {
            !r.name.starts_with("experiment-")
                && r.backends.iter().any(|b| self.is_backend(b, &self.stable))
                && r.backends.iter().all(|b| {
                    self.is_backend(b, &self.stable) || self.is_backend(b, &self.candidate)
                })
        })
    }

    /// The candidate weight the route of `cfg` currently gives (target rule, in percent).
    pub fn live_weight(&self, cfg: &MeshConfig) -> Option<u32> {
        let route = cfg.routes.iter().find(|r| r.name == self.route)?;
        let rule = &route.rules[self.target_rule(route)?];
        let total: u32 = rule.backends.iter().map(Backend::weight).sum();
        let cand: u32 = rule
            .backends
            .iter()
            .filter(|b| self.is_backend(b, &self.candidate))
            .map(Backend::weight)
            .sum();
        (total > 0).then(|| cand * 100 / total)
    }

    /// The mirror a blue/green experiment puts on its rule while it runs.
    fn mirror(&self) -> Option<Mirror> {
        let percent = self.blue_green.as_ref()?.mirror?;
        Some(Mirror {
            service: self.service.clone(),
            subset: self.candidate.clone(),
            percent: Some(percent),
        })
    }

    fn is_own_mirror(&self, m: &Mirror) -> bool {
        m.service == self.service && m.subset == self.candidate
    }

    fn backend(&self, subset: &str, weight: u32) -> Backend {
        Backend {
            service: self.service.clone(),
            subset: subset.to_owned(),
            weight: Some(weight),
        }
    }

    /// Rewrites the route for `stage`: the target rule's split, plus (A/B, blue/green while
    /// running) rules just before it that send its matching requests to the candidate.
    pub fn apply(&self, cfg: &mut MeshConfig, stage: Stage) -> Result<(), String> {
        let route = cfg
            .routes
            .iter_mut()
            .find(|r| r.name == self.route)
            .ok_or_else(|| format!("route {:?} does not exist", self.route))?;
        let prefix = self.rule_prefix();
        route.rules.retain(|r| !r.name.starts_with(&prefix));
        let target = self.target_rule(route).ok_or_else(|| {
            format!(
                "route {:?} has no rule splitting {}/{} (and {}/{})",
                self.route, self.service, self.stable, self.service, self.candidate
            )
        })?;
        let split_weight = match stage {
            Stage::Step(w) if self.ab.is_none() && self.blue_green.is_none() => w,
            Stage::Step(_) | Stage::RolledBack => 0,
            Stage::Promoted => 100,
        };
        route.rules[target].backends = vec![
            self.backend(&self.stable, 100 - split_weight.min(100)),
            self.backend(&self.candidate, split_weight.min(100)),
        ];
        if let Some(mirror) = self.mirror() {
            let rule = &mut route.rules[target];
            match stage {
                Stage::Step(_) => rule.mirror = Some(mirror),
                // Only the experiment's own mirror goes (validation refuses another).
                Stage::Promoted | Stage::RolledBack => {
                    if rule.mirror.as_ref().is_some_and(|m| self.is_own_mirror(m)) {
                        rule.mirror = None;
                    }
                }
            }
        }
        let Stage::Step(w) = stage else {
            return Ok(());
        };
        let (headers, cookies, sticky) = match (&self.ab, &self.blue_green) {
            (Some(ab), _) => (&ab.headers, &ab.cookies, ab.sticky_cookie.as_ref()),
            (None, Some(bg)) => (&bg.headers, &bg.cookies, None),
            (None, None) => return Ok(()),
        };
        // The testers' rules are the split rule itself (its matches, timeouts, retries, header
        // edits, rewrite…) narrowed by one more header match, just before it: requests an
        // earlier rule takes stay there, and a tester's request is handled like any other.
        let base = {
            let mut rule = route.rules[target].clone();
            if rule.mirror.as_ref().is_some_and(|m| self.is_own_mirror(m)) {
                rule.mirror = None;
            }
            rule.sticky = None;
            rule
        };
        let narrowed = |name: String, header: NamedMatch, backends: Vec<Backend>| {
            let mut rule = base.clone();
            rule.name = name;
            rule.matches.headers.push(header);
            rule.backends = backends;
            rule
        };
        let mut added = Vec::new();
        for (i, h) in headers.iter().enumerate() {
            let to_candidate = vec![self.backend(&self.candidate, 100)];
            added.push(narrowed(
                format!("{prefix}header-{i}"),
                h.clone(),
                to_candidate,
            ));
        }
        for (i, c) in cookies.iter().enumerate() {
            let header = cookie_header_match(&c.name, Some(&c.value));
            let to_candidate = vec![self.backend(&self.candidate, 100)];
            added.push(narrowed(
                format!("{prefix}cookie-{i}"),
                header,
                to_candidate,
            ));
        }
        if let Some(cookie) = sticky {
            let mut rule = narrowed(
                format!("{prefix}sticky"),
                cookie_header_match(cookie, None),
                // Candidate first: `hash % 100 < weight` lands on it, and raising the
                // weight only ever moves users from stable to candidate.
                vec![
                    self.backend(&self.candidate, w.min(100)),
                    self.backend(&self.stable, 100 - w.min(100)),
                ],
            );
            rule.sticky = Some(StickySplit {
                cookie: Some(cookie.clone()),
                header: None,
            });
            added.push(rule);
        }
        route.rules.splice(target..target, added);
        Ok(())
    }
}

/// A `cookie` header match for cookie `name` (with `value`, or just present).
fn cookie_header_match(name: &str, value: Option<&str>) -> NamedMatch {
    let value = value.map_or_else(|| "[^;]*".to_owned(), regex_escape);
    NamedMatch {
        name: "cookie".into(),
        value: StringMatch::regex(format!(
            // Header regexes match the whole value (see `validate::compile_regex`).
            "(.*;)?\\s*{}=({value})\\s*(;.*)?",
            regex_escape(name)
        )),
        invert: false,
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_owned())
}

fn at(base: &[Seg], more: impl IntoIterator<Item = Seg>) -> Vec<Seg> {
    let mut p = base.to_vec();
    p.extend(more);
    p
}

/// Checks sticky splits on rules and every experiment of `cfg` against the routes and
/// services; returns `(path, reason)` for each problem.
pub fn check(cfg: &MeshConfig) -> Vec<(Vec<Seg>, String)> {
    let mut out = Vec::new();
    for (ri, route) in cfg.routes.iter().enumerate() {
        for (j, rule) in route.rules.iter().enumerate() {
            if let Some(s) = &rule.sticky {
                let p = vec![
                    key("routes"),
                    Seg::Index(ri),
                    key("rules"),
                    Seg::Index(j),
                    key("sticky"),
                ];
                match (&s.cookie, &s.header) {
                    (Some(n), None) | (None, Some(n)) if is_token(n) => {}
                    (Some(_), None) | (None, Some(_)) => {
                        out.push((p, "the sticky key must be a cookie/header name".into()));
                    }
                    _ => out.push((p, "sticky needs exactly one of cookie and header".into())),
                }
            }
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, spec) in cfg.experiments.iter().enumerate() {
        let p = vec![key("experiments"), Seg::Index(i)];
        if !names.insert(spec.name.as_str()) {
            out.push((
                at(&p, [key("name")]),
                format!("duplicate experiment {:?}", spec.name),
            ));
        }
        out.extend(check_spec(spec, cfg, &p));
    }
    out
}

/// Checks one experiment against `cfg`; paths start at `base`.
pub fn check_spec(
    spec: &ExperimentSpec,
    cfg: &MeshConfig,
    base: &[Seg],
) -> Vec<(Vec<Seg>, String)> {
    let mut out = Vec::new();
    let mut fail = |path: Vec<Seg>, reason: String| out.push((path, reason));
    if spec.name.is_empty()
        || spec.name.len() > 63
        || !spec
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        fail(
            at(base, [key("name")]),
            format!(
                "invalid experiment name {:?}: use lower-case letters, digits and '-'",
                spec.name
            ),
        );
    }
    match cfg.services.iter().find(|s| s.name == spec.service) {
        None => fail(
            at(base, [key("service")]),
            format!("unknown service {:?}", spec.service),
        ),
        Some(svc) => {
            for (field, subset) in [("stable", &spec.stable), ("candidate", &spec.candidate)] {
                if !svc.subsets.contains_key(subset) {
                    fail(
                        at(base, [key(field)]),
                        format!("service {:?} has no subset {subset:?}", spec.service),
                    );
                }
            }
        }
    }
    if spec.stable == spec.candidate {
        fail(
            at(base, [key("candidate")]),
            "candidate and stable must differ".into(),
        );
    }
    match cfg.routes.iter().find(|r| r.name == spec.route) {
        None => fail(
            at(base, [key("route")]),
            format!("unknown route {:?}", spec.route),
        ),
        Some(route) if spec.target_rule(route).is_none() => fail(
            at(base, [key("route")]),
            format!(
                "route {:?} has no rule whose backends are {}/{} (and optionally {}/{})",
                spec.route, spec.service, spec.stable, spec.service, spec.candidate
            ),
        ),
        Some(_) => {}
    }
    let strategies = [
        spec.canary.is_some(),
        spec.blue_green.is_some(),
        spec.ab.is_some(),
    ];
    if strategies.iter().filter(|s| **s).count() != 1 {
        fail(
            base.to_vec(),
            "an experiment needs exactly one strategy: canary, blue_green or ab".into(),
        );
    }
    if let Some(c) = &spec.canary {
        let p = at(base, [key("canary")]);
        match (&c.steps[..], c.step_weight) {
            ([], None) => fail(p, "canary needs steps or step_weight".into()),
            ([_, ..], Some(_)) => fail(p, "canary takes steps or step_weight, not both".into()),
            (steps, None) => {
                let increasing = steps.windows(2).all(|w| w[0] < w[1]);
                if !increasing || steps.iter().any(|w| *w == 0 || *w > 100) {
                    fail(
                        at(&p, [key("steps")]),
                        "steps must increase, each from 1 to 100".into(),
                    );
                }
            }
            ([], Some(step)) => {
                let max = c.max_weight.unwrap_or(100);
                if step == 0 || step > 100 || max > 100 || max < step {
                    fail(p, "need 1 <= step_weight <= max_weight <= 100".into());
                }
            }
        }
    }
    if let Some(bg) = &spec.blue_green {
        if bg.iterations == 0 {
            fail(
                at(base, [key("blue_green"), key("iterations")]),
                "iterations must be at least 1".into(),
            );
        }
        if bg.mirror.is_some_and(|p| p == 0 || p > 100) {
            fail(
                at(base, [key("blue_green"), key("mirror")]),
                "mirror is a percentage from 1 to 100".into(),
            );
        }
        // The rule's own mirror would be replaced while the experiment runs, then lost.
        let route = cfg.routes.iter().find(|r| r.name == spec.route);
        let other = route
            .and_then(|r| Some(&r.rules[spec.target_rule(r)?]))
            .and_then(|rule| rule.mirror.as_ref())
            .filter(|m| !spec.is_own_mirror(m));
        if let (Some(_), Some(m)) = (bg.mirror, other) {
            fail(
                at(base, [key("blue_green"), key("mirror")]),
                format!(
                    "the rule it splits already mirrors to {}/{}; remove that mirror or this one",
                    m.service, m.subset
                ),
            );
        }
    }
    if let Some(ab) = &spec.ab {
        let p = at(base, [key("ab")]);
        if ab.iterations == 0 {
            fail(
                at(&p, [key("iterations")]),
                "iterations must be at least 1".into(),
            );
        }
        if ab.weight > 100 {
            fail(at(&p, [key("weight")]), "weight is a percentage".into());
        }
        if ab.headers.is_empty() && ab.cookies.is_empty() && ab.sticky_cookie.is_none() {
            fail(
                p.clone(),
                "an A/B test needs headers, cookies or sticky_cookie to pick its users".into(),
            );
        }
        if ab.sticky_cookie.as_ref().is_some_and(|c| !is_token(c)) {
            fail(at(&p, [key("sticky_cookie")]), "invalid cookie name".into());
        }
    }
    for (field, cookies) in [
        ("ab", spec.ab.as_ref().map(|a| &a.cookies)),
        ("blue_green", spec.blue_green.as_ref().map(|b| &b.cookies)),
    ] {
        for (i, c) in cookies.into_iter().flatten().enumerate() {
            if !is_token(&c.name) {
                fail(
                    at(base, [key(field), key("cookies"), Seg::Index(i)]),
                    format!("invalid cookie name {:?}", c.name),
                );
            }
        }
    }
    if spec.interval.0 < 50 {
        fail(
            at(base, [key("interval")]),
            "interval must be at least 50ms".into(),
        );
    }
    let a = &spec.analysis;
    if a.success_rate
        .is_some_and(|r| !(0.0..=100.0).contains(&r.0))
    {
        fail(
            at(base, [key("analysis"), key("success_rate")]),
            "success_rate is a percentage from 0 to 100".into(),
        );
    }
    if a.failure_threshold == 0 {
        fail(
            at(base, [key("analysis"), key("failure_threshold")]),
            "failure_threshold must be at least 1".into(),
        );
    }
    for (i, w) in spec.webhooks.iter().enumerate() {
        let ok = w
            .url
            .strip_prefix("http://")
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
        if !ok {
            fail(
                at(base, [key("webhooks"), Seg::Index(i), key("url")]),
                format!("webhook url {:?} must be http://host:port/path", w.url),
            );
        }
    }
    out
}

/// A cookie or header name: visible ASCII without separators.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{Limits, parse_yaml};

    const MESH: &str = r#"
services:
  - name: reviews
    endpoints: [{address: "127.0.0.1:1", labels: {version: v1}}, {address: "127.0.0.1:2", labels: {version: v2}}]
    subsets: {v1: {version: v1}, v2: {version: v2}}
routes:
  - name: reviews
    hosts: [reviews]
    rules:
      - match: {headers: [{name: x-user-group, exact: beta}]}
        backends: [{service: reviews, subset: v2}]
      - backends: [{service: reviews, subset: v1}]
experiments:
  - name: canary
    route: reviews
    service: reviews
    stable: v1
    candidate: v2
    canary: {steps: [10, 50, 100]}
    interval: 500ms
    analysis: {success_rate: 99, max_p99: 250ms, min_requests: 20}
"#;

    #[test]
    fn plans_follow_the_strategy() {
        let cfg = parse_yaml("t", MESH, &Limits::default()).unwrap();
        let spec = &cfg.experiments[0];
        let w: Vec<_> = spec.plan().iter().map(|s| s.weight).collect();
        assert_eq!(w, [10, 50, 100]);
        let mut s = spec.clone();
        s.canary = Some(Canary {
            step_weight: Some(20),
            max_weight: Some(70),
            ..Canary::default()
        });
        let w: Vec<_> = s.plan().iter().map(|s| s.weight).collect();
        assert_eq!(w, [20, 40, 60]);
        assert_eq!(spec.analysis.failure_threshold, 2, "default");
    }

    #[test]
    fn stages_rewrite_the_target_rule() {
        let mut cfg = parse_yaml("t", MESH, &Limits::default()).unwrap();
        let spec = cfg.experiments[0].clone();
        spec.apply(&mut cfg, Stage::Step(10)).unwrap();
        assert_eq!(spec.live_weight(&cfg), Some(10));
        let b = &cfg.routes[0].rules[1].backends;
        assert_eq!((b[0].weight, b[1].weight), (Some(90), Some(10)));
        assert_eq!(
            cfg.routes[0].rules[0].backends.len(),
            1,
            "header rule untouched"
        );
        crate::validate(&cfg, &Limits::default()).unwrap();
        spec.apply(&mut cfg, Stage::Promoted).unwrap();
        assert_eq!(spec.live_weight(&cfg), Some(100));
        spec.apply(&mut cfg, Stage::RolledBack).unwrap();
        assert_eq!(spec.live_weight(&cfg), Some(0));
    }

    #[test]
    fn ab_adds_match_and_sticky_rules_and_removes_them() {
        let mut cfg = parse_yaml("t", MESH, &Limits::default()).unwrap();
        let mut spec = cfg.experiments[0].clone();
        spec.canary = None;
        spec.ab = Some(AbTest {
            iterations: 2,
            headers: vec![NamedMatch {
                name: "x-beta".into(),
                value: StringMatch::exact("1"),
                invert: false,
            }],
            cookies: vec![],
            sticky_cookie: Some("user".into()),
            weight: 30,
        });
        // The split rule matches a path and has a timeout: the testers' rules keep both.
        let split = &mut cfg.routes[0].rules[1];
        split.matches.path = Some(StringMatch::prefix("/api"));
        split.timeout = Some(Millis(1500));
        spec.apply(&mut cfg, Stage::Step(30)).unwrap();
        let rules = &cfg.routes[0].rules;
        assert_eq!(rules.len(), 4, "{rules:#?}");
        // An earlier rule still comes first; the testers' rules sit just before the split.
        assert!(
            rules[0].matches.headers[0].name == "x-user-group",
            "{rules:#?}"
        );
        assert_eq!(rules[1].matches.headers[0].name, "x-beta");
        assert_eq!(rules[1].backends, [spec.backend("v2", 100)]);
        for tester in &rules[1..3] {
            assert_eq!(tester.matches.path, Some(StringMatch::prefix("/api")));
            assert_eq!(tester.timeout, Some(Millis(1500)));
        }
        assert_eq!(
            rules[2].sticky.as_ref().unwrap().cookie.as_deref(),
            Some("user")
        );
        assert_eq!(rules[2].backends[0].weight, Some(30));
        assert_eq!(spec.live_weight(&cfg), Some(0), "others stay on stable");
        crate::validate(&cfg, &Limits::default()).unwrap();
        let re = crate::validate::compile_regex(
            rules[2].matches.headers[0].value.regex.as_ref().unwrap(),
            &Limits::default(),
        )
        .unwrap();
        assert!(re.is_match("a=b; user=alice"));
        assert!(re.is_match("user=alice; a=b"));
        assert!(!re.is_match("notuser=alice"));
        assert!(!re.is_match("a=user=x"));
        spec.apply(&mut cfg, Stage::Promoted).unwrap();
        assert_eq!(cfg.routes[0].rules.len(), 2);
        assert_eq!(spec.live_weight(&cfg), Some(100));
    }

    #[test]
    fn blue_green_mirrors_to_the_candidate_until_it_finishes() {
        let bg = MESH.replace(
            "canary: {steps: [10, 50, 100]}",
            "blue_green: {iterations: 2, mirror: 50}",
        );
        let mut cfg = parse_yaml("t", &bg, &Limits::default()).unwrap();
        let spec = cfg.experiments[0].clone();
        spec.apply(&mut cfg, Stage::Step(0)).unwrap();
        let mirror = cfg.routes[0].rules[1].mirror.clone().expect("mirrored");
        assert_eq!(
            (
                mirror.service.as_str(),
                mirror.subset.as_str(),
                mirror.percent
            ),
            ("reviews", "v2", Some(50))
        );
        assert_eq!(spec.live_weight(&cfg), Some(0), "nobody switched");
        assert!(
            cfg.routes[0].rules[0].mirror.is_none(),
            "other rules untouched"
        );
        crate::validate(&cfg, &Limits::default()).unwrap();
        for end in [Stage::Promoted, Stage::RolledBack] {
            let mut done = cfg.clone();
            spec.apply(&mut done, end).unwrap();
            assert!(done.routes[0].rules[1].mirror.is_none(), "{end:?}");
        }

        // A rule that mirrors elsewhere already is refused, naming the mirror.
        let mut shadow = bg.replace(
            "      - backends: [{service: reviews, subset: v1}]",
            "      - backends: [{service: reviews, subset: v1}]\n        mirror: {service: reviews}",
        );
        let err = parse_yaml("t", &shadow, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("already mirrors to reviews/"), "{err}");
        assert!(err.contains("experiments[0].blue_green.mirror"), "{err}");
        shadow = bg.replace("mirror: 50", "mirror: 0");
        let err = parse_yaml("t", &shadow, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mirror is a percentage from 1 to 100"),
            "{err}"
        );
    }

    #[test]
    fn bad_specs_are_explained() {
        let bad = MESH
            .replace("candidate: v2", "candidate: v9")
            .replace("[10, 50, 100]", "[50, 10]");
        let err = parse_yaml("t", &bad, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no subset \"v9\""), "{err}");
        assert!(err.contains("steps must increase"), "{err}");
        assert!(err.contains("experiments[0].candidate"), "{err}");
        let none = MESH.replace("    canary: {steps: [10, 50, 100]}\n", "");
        let err = parse_yaml("t", &none, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly one strategy"), "{err}");
    }
}

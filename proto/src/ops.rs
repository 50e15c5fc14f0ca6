//! Mutations operators make on a live configuration (`weftctl set-weight`), as pure functions
//! over the model so the control plane, its tests and the experiments engine share one rule.

use crate::model::MeshConfig;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("no route named {0:?}")]
    UnknownRoute(String),
    #[error("route {route:?} has no rule {index} (it has {count})")]
    UnknownRule {
        route: String,
        index: usize,
        count: usize,
    },
    #[error(
        "route {route:?} has no rule whose backends are exactly {{{wanted}}}; its rules have: {have}"
    )]
    NoMatchingRule {
        route: String,
        wanted: String,
        have: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Sets backend weights on one rule of a route.
///
/// Backends are named by subset (`v1`), by service when they have no subset (`reviews`), or
/// as `service/subset`. Without `rule`, the rule chosen is the one whose backends are exactly
/// the names given, so a header rule that pins `v2` is left alone by `set-weight r v1=90 v2=10`.
pub fn set_weights(
    cfg: &mut MeshConfig,
    route: &str,
    rule: Option<usize>,
    weights: &[(String, u32)],
) -> Result<usize, OpError> {
    if weights.is_empty() {
        return Err(OpError::Invalid("no weights given".into()));
    }
    if weights.iter().map(|(_, w)| u64::from(*w)).sum::<u64>() == 0 {
        return Err(OpError::Invalid(
            "weights sum to 0: at least one backend needs a positive weight".into(),
        ));
    }
    let r = cfg
        .routes
        .iter_mut()
        .find(|r| r.name == route)
        .ok_or_else(|| OpError::UnknownRoute(route.to_owned()))?;
    let names_match = |b: &crate::model::Backend, n: &str| {
        n == b.label()
            || (!b.subset.is_empty() && n == b.subset)
            || (b.subset.is_empty() && n == b.service)
    };
    let fits = |rule: &crate::model::Rule| {
        rule.backends.len() == weights.len()
            && rule
                .backends
                .iter()
                .all(|b| weights.iter().any(|(n, _)| names_match(b, n)))
    };
    let index = match rule {
        Some(i) if i >= r.rules.len() => {
            return Err(OpError::UnknownRule {
                route: route.to_owned(),
                index: i,
                count: r.rules.len(),
            });
        }
        Some(i) => i,
        None => r
            .rules
            .iter()
            .position(fits)
            .ok_or_else(|| OpError::NoMatchingRule {
                route: route.to_owned(),
                wanted: weights
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                have: r
                    .rules
                    .iter()
                    .enumerate()
                    .map(|(i, rule)| {
                        format!(
                            "#{i} {{{}}}",
                            rule.backends
                                .iter()
                                .map(|b| b.label())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            })?,
    };
    let target = &mut r.rules[index];
    for (name, _) in weights {
        if !target.backends.iter().any(|b| names_match(b, name)) {
            return Err(OpError::Invalid(format!(
                "rule #{index} of route {route:?} has no backend {name:?}"
            )));
        }
    }
    for b in &mut target.backends {
        let w = weights
            .iter()
            .find(|(n, _)| names_match(b, n))
            .map(|(_, w)| *w);
        // Backends not named keep nothing: the split given is the whole split.
        b.weight = Some(w.unwrap_or(0));
    }
    Ok(index)
}

/// Parses `v1=90` into a name and a weight.
pub fn parse_weight(s: &str) -> Result<(String, u32), OpError> {
    let (name, w) = s
        .split_once('=')
        .ok_or_else(|| OpError::Invalid(format!("{s:?}: expected NAME=WEIGHT, e.g. v1=90")))?;
    let w = w
        .trim()
        .parse::<u32>()
        .map_err(|_| OpError::Invalid(format!("{s:?}: weight must be a whole number")))?;
    Ok((name.trim().to_owned(), w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{Limits, parse_yaml};

    fn cfg() -> MeshConfig {
        parse_yaml(
            "t",
            r#"
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
      - backends: [{service: reviews, subset: v1, weight: 100}, {service: reviews, subset: v2, weight: 0}]
"#,
            &Limits::default(),
        )
        .unwrap()
    }

    #[test]
    fn picks_the_rule_with_exactly_those_backends() {
        let mut c = cfg();
        let w = [
            parse_weight("v1=90").unwrap(),
            parse_weight("reviews/v2=10").unwrap(),
        ];
        assert_eq!(set_weights(&mut c, "reviews", None, &w).unwrap(), 1);
        let weights: Vec<_> = c.routes[0].rules[1]
            .backends
            .iter()
            .map(|b| b.weight)
            .collect();
        assert_eq!(weights, vec![Some(90), Some(10)]);
        assert_eq!(
            c.routes[0].rules[0].backends[0].weight, None,
            "header rule untouched"
        );
    }

    #[test]
    fn explains_what_is_wrong() {
        let mut c = cfg();
        let err = set_weights(&mut c, "reviews", None, &[("v3".into(), 1)]).unwrap_err();
        assert!(
            err.to_string().contains("#1 {reviews/v1, reviews/v2}"),
            "{err}"
        );
        let err = set_weights(&mut c, "nope", None, &[("v1".into(), 1)]).unwrap_err();
        assert_eq!(err, OpError::UnknownRoute("nope".into()));
        let err = set_weights(
            &mut c,
            "reviews",
            Some(1),
            &[("v1".into(), 0), ("v2".into(), 0)],
        )
        .unwrap_err();
        assert!(err.to_string().contains("sum to 0"), "{err}");
        assert!(parse_weight("v1").is_err());
        assert!(parse_weight("v1=x").is_err());
    }
}

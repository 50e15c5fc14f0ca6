//! Rules that answer a request themselves instead of sending it to a backend: redirects
//! (Istio's `redirect`, the Gateway API's `RequestRedirect` filter) and fixed responses
//! (Istio's `directResponse`). Types, validation and wire form.
//!
//! ```yaml
//! - match: {path: {prefix: /old}}
//!   redirect: {prefix: /new, code: 308}          # /old/x?q → Location: http://<host>/new/x?q
//! - match: {path: {prefix: /admin}}
//!   direct_response: {status: 404, body: "not here\n"}
//! ```
//!
//! Such a rule has no upstream, so everything about reaching one (backends, retries, timeouts,
//! mirror, rewrite, request header edits…) is refused on it with the reason; its response
//! header edits apply to the answer.

use serde::{Deserialize, Serialize};

use crate::locate::Seg;
use crate::model::Rule;
use crate::pb;
use crate::policy::Problems;

/// The largest fixed body: it travels to every proxy in each config push (Envoy's default
/// limit for a direct response body is the same).
pub const MAX_BODY: usize = 4096;

/// A redirect: `Location` is the request's URL with the given parts replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// `http` or `https`; the request's scheme when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The request's host when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// When absent: the scheme's default port if `scheme` changes it, else the request's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Replaces the whole path (the query stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replaces the path prefix the rule matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// 301 (the default), 302, 303, 307 or 308.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
}

impl Redirect {
    pub fn code_or_default(&self) -> u16 {
        self.code.unwrap_or(301)
    }
}

/// A fixed response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    /// Sent as `text/plain; charset=utf-8` (a response header edit can change the type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// What a rule that answers itself must not have: (field, is it set).
fn upstream_fields(rule: &Rule) -> [(&'static str, bool); 9] {
    [
        ("backends", !rule.backends.is_empty()),
        ("timeout", rule.timeout.is_some()),
        ("retries", rule.retries.is_some()),
        ("rate_limit", rule.rate_limit.is_some()),
        ("fault", rule.fault.is_some()),
        ("mirror", rule.mirror.is_some()),
        ("stream_idle_timeout", rule.stream_idle_timeout.is_some()),
        ("sticky", rule.sticky.is_some()),
        ("rewrite", rule.rewrite.is_some()),
    ]
}

/// True when the rule answers itself (it then needs no backends).
pub fn answers_itself(rule: &Rule) -> bool {
    rule.redirect.is_some() || rule.direct_response.is_some()
}

/// Checks a rule's `redirect` / `direct_response` (`p` is the rule's path).
pub fn check(p: &[Seg], rule: &Rule) -> Problems {
    let mut out = Problems::new();
    let at = |fields: &[&str]| {
        let mut v = p.to_vec();
        v.extend(fields.iter().map(|f| Seg::Key((*f).into())));
        v
    };
    let kind = match (&rule.redirect, &rule.direct_response) {
        (None, None) => return out,
        (Some(_), Some(_)) => {
            out.push((
                at(&["direct_response"]),
                "give redirect or direct_response, not both".into(),
            ));
            return out;
        }
        (Some(_), None) => "redirect",
        (None, Some(_)) => "direct_response",
    };
    for (field, set) in upstream_fields(rule) {
        if set {
            out.push((
                at(&[field]),
                format!("a rule with a {kind} answers itself and has no upstream: remove {field}"),
            ));
        }
    }
    if rule.headers.as_ref().is_some_and(|h| !h.request.is_empty()) {
        out.push((
            at(&["headers", "request"]),
            format!("a rule with a {kind} answers itself: request edits would reach no one"),
        ));
    }
    if let Some(r) = &rule.redirect {
        check_redirect(&mut out, &at, rule, r);
    }
    if let Some(d) = &rule.direct_response {
        if !(200..600).contains(&d.status) {
            out.push((
                at(&["direct_response", "status"]),
                format!("{} is not an HTTP status (200–599)", d.status),
            ));
        }
        if let Some(body) = &d.body {
            if body.len() > MAX_BODY {
                out.push((
                    at(&["direct_response", "body"]),
                    format!("{} bytes is over the {MAX_BODY}-byte limit", body.len()),
                ));
            }
            if !body.is_empty() && matches!(d.status, 204 | 304) {
                out.push((
                    at(&["direct_response", "body"]),
                    format!("a {} response has no body", d.status),
                ));
            }
        }
    }
    out
}

fn check_redirect(out: &mut Problems, at: &dyn Fn(&[&str]) -> Vec<Seg>, rule: &Rule, r: &Redirect) {
    let at = |field: &str| at(&["redirect", field]);
    if let Some(s) = &r.scheme
        && s != "http"
        && s != "https"
    {
        out.push((at("scheme"), format!("{s:?} is not http or https")));
    }
    if let Some(host) = &r.host {
        out.extend(crate::rewrite::host_problem(host).map(|e| (at("host"), e)));
        if host.contains(':') && !host.starts_with('[') {
            out.push((
                at("host"),
                format!("{host:?}: give the port as redirect.port"),
            ));
        }
    }
    if r.port == Some(0) {
        out.push((at("port"), "0 is not a port".into()));
    }
    crate::rewrite::check_path_edit(out, &at, rule, r.prefix.as_deref(), r.path.as_deref());
    if r.scheme.is_none()
        && r.host.is_none()
        && r.port.is_none()
        && r.path.is_none()
        && r.prefix.is_none()
    {
        out.push((
            at("path"),
            "a redirect needs a scheme, host, port, path or prefix (it would send clients back to the same URL)".into(),
        ));
    }
    if let Some(code) = r.code
        && ![301, 302, 303, 307, 308].contains(&code)
    {
        out.push((
            at("code"),
            format!("{code} is not a redirect status (301, 302, 303, 307 or 308)"),
        ));
    }
}

pub fn redirect_to_pb(r: &Redirect) -> pb::Redirect {
    pb::Redirect {
        scheme: r.scheme.clone().unwrap_or_default(),
        host: r.host.clone().unwrap_or_default(),
        port: r.port.map_or(0, u32::from),
        path: r.path.clone().unwrap_or_default(),
        prefix: r.prefix.clone().unwrap_or_default(),
        code: r.code.map_or(0, u32::from),
    }
}

/// Out-of-range numbers from the wire become values validation refuses (0), never a wrap.
pub fn redirect_from_pb(r: &pb::Redirect) -> Redirect {
    let opt = |s: &String| (!s.is_empty()).then(|| s.clone());
    let num = |n: u32| (n != 0).then(|| u16::try_from(n).unwrap_or(0));
    Redirect {
        scheme: opt(&r.scheme),
        host: opt(&r.host),
        port: num(r.port),
        path: opt(&r.path),
        prefix: opt(&r.prefix),
        code: num(r.code),
    }
}

pub fn direct_to_pb(d: &DirectResponse) -> pb::DirectResponse {
    pb::DirectResponse {
        status: u32::from(d.status),
        body: d.body.clone().unwrap_or_default(),
    }
}

pub fn direct_from_pb(d: &pb::DirectResponse) -> DirectResponse {
    DirectResponse {
        status: u16::try_from(d.status).unwrap_or(0),
        body: (!d.body.is_empty()).then(|| d.body.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{Limits, parse_yaml};

    /// A route whose second rule (after one to `reviews`) matches `/old` and has `rule` (YAML
    /// lines of that rule).
    fn mesh(rule: &str) -> String {
        crate::test_support::one_rule_mesh(&format!(
            "      - match: {{path: {{prefix: /old}}}}\n{rule}"
        ))
    }

    #[test]
    fn answers_parse_without_backends_and_survive_the_wire() {
        let cfg = parse_yaml(
            "t",
            &mesh("        redirect: {scheme: https, host: new.example, port: 8443, prefix: /new, code: 308}"),
            &Limits::default(),
        )
        .unwrap();
        let rule = &cfg.routes[0].rules[1];
        assert!(rule.backends.is_empty());
        let r = rule.redirect.as_ref().unwrap();
        assert_eq!(r.code_or_default(), 308);
        assert_eq!(&redirect_from_pb(&redirect_to_pb(r)), r);
        let back = crate::from_resources(&crate::to_resources(&cfg)).unwrap();
        assert_eq!(back.routes[0].rules[1], *rule);

        let cfg = parse_yaml(
            "t",
            &mesh("        direct_response: {status: 404, body: \"gone\\n\"}"),
            &Limits::default(),
        )
        .unwrap();
        let d = cfg.routes[0].rules[1].direct_response.as_ref().unwrap();
        assert_eq!((d.status, d.body.as_deref()), (404, Some("gone\n")));
        assert_eq!(&direct_from_pb(&direct_to_pb(d)), d);
    }

    #[test]
    fn bad_answers_are_refused_by_name() {
        let long = "x".repeat(MAX_BODY + 1);
        for (rule, at, expect) in [
            (
                "        redirect: {path: /a}\n        direct_response: {status: 200}".to_owned(),
                "direct_response",
                "give redirect or direct_response, not both",
            ),
            (
                "        redirect: {path: /a}\n        backends: [{service: reviews}]".into(),
                "backends",
                "a rule with a redirect answers itself and has no upstream: remove backends",
            ),
            (
                "        direct_response: {status: 503}\n        retries: {attempts: 2}".into(),
                "retries",
                "remove retries",
            ),
            (
                "        direct_response: {status: 503}\n        headers: {request: {set: {a: b}}}"
                    .into(),
                "headers.request",
                "request edits would reach no one",
            ),
            (
                "        redirect: {scheme: ftp}".into(),
                "redirect.scheme",
                "\"ftp\" is not http or https",
            ),
            (
                "        redirect: {code: 307}".into(),
                "redirect.path",
                "would send clients back to the same URL",
            ),
            (
                "        redirect: {path: /a, code: 200}".into(),
                "redirect.code",
                "200 is not a redirect status",
            ),
            (
                "        redirect: {port: 0}".into(),
                "redirect.port",
                "0 is not a port",
            ),
            (
                "        redirect: {host: \"new.example:8080\"}".into(),
                "redirect.host",
                "give the port as redirect.port",
            ),
            (
                "        redirect: {path: new}".into(),
                "redirect.path",
                "\"new\" must start with /",
            ),
            (
                "        direct_response: {status: 42}".into(),
                "direct_response.status",
                "42 is not an HTTP status",
            ),
            (
                "        direct_response: {status: 204, body: x}".into(),
                "direct_response.body",
                "a 204 response has no body",
            ),
            (
                format!("        direct_response: {{status: 200, body: {long}}}"),
                "direct_response.body",
                "over the 4096-byte limit",
            ),
        ] {
            let err = parse_yaml("t", &mesh(&rule), &Limits::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{rule}: {err}");
            assert!(err.contains(&format!("routes[0].rules[1].{at}")), "{err}");
        }
        // A prefix redirect needs a prefix match.
        let err = parse_yaml(
            "t",
            &crate::test_support::one_rule_mesh("      - redirect: {prefix: /b}"),
            &Limits::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("routes[0].rules[1].redirect.prefix"), "{err}");
        assert!(
            err.contains("needs a rule that matches a path prefix"),
            "{err}"
        );
    }

    #[test]
    fn a_rule_without_backends_or_answer_is_still_refused() {
        let err = parse_yaml("t", &mesh("        name: empty"), &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("a rule needs at least one backend"), "{err}");
    }
}

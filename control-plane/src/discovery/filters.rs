//! HTTPRoute rule filters translated into a weft rule's fields: header modifiers → `headers`,
//! `URLRewrite` → `rewrite`, `RequestRedirect` → `redirect` (the rule then answers itself),
//! the first `RequestMirror` → `mirror`, `CORS` → `cors`. What weft cannot express is left
//! out with a warning that names the route, the rule and the reason.

use std::collections::HashMap;

use gateway_api::apis::standard::httproutes::{
    HttpRouteRules, HttpRouteRulesFilters, HttpRouteRulesFiltersCors,
    HttpRouteRulesFiltersRequestMirror, HttpRouteRulesFiltersRequestRedirect,
    HttpRouteRulesFiltersRequestRedirectPathType, HttpRouteRulesFiltersRequestRedirectScheme,
    HttpRouteRulesFiltersType, HttpRouteRulesFiltersUrlRewritePathType,
};
use weft_proto::answer::Redirect;
use weft_proto::cors::Cors;
use weft_proto::headers::{HeaderEdits, HeaderRules};
use weft_proto::model::{self, StringMatch};
use weft_proto::policy::Mirror;
use weft_proto::rewrite::Rewrite;

use super::{MeshedPort, ServiceRef, meshed_port, service_ref};

/// The header edits of one HTTPRoute rule, from its `RequestHeaderModifier` and
/// `ResponseHeaderModifier` filters. Filters weft cannot express (ExtensionRef) are
/// left out with a warning, and so are edits weft refuses (e.g. of `x-weft-*` fields), with the
/// reason: one bad filter must not make the whole discovered layer invalid. On a rule that
/// `answers_itself` (a redirect) the request edits reach no one and are left out first.
pub(super) fn header_filters(
    rule: &HttpRouteRules,
    answers_itself: bool,
    what: &str,
    warnings: &mut Vec<String>,
) -> Option<HeaderRules> {
    let mut out = HeaderRules::default();
    let merge = |edits: &mut HeaderEdits,
                 set: Vec<(String, String)>,
                 add: Vec<(String, String)>,
                 remove: &Option<Vec<String>>| {
        edits.set.extend(set);
        edits.add.extend(add);
        edits.remove.extend(remove.iter().flatten().cloned());
    };
    // The request and response modifiers are distinct generated types of one shape.
    macro_rules! pairs {
        ($list:expr) => {
            $list
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect()
        };
    }
    for f in rule.filters.iter().flatten() {
        match (
            &f.r#type,
            &f.request_header_modifier,
            &f.response_header_modifier,
        ) {
            (HttpRouteRulesFiltersType::RequestHeaderModifier, Some(m), _) => {
                merge(&mut out.request, pairs!(m.set), pairs!(m.add), &m.remove);
            }
            (HttpRouteRulesFiltersType::ResponseHeaderModifier, _, Some(m)) => {
                merge(&mut out.response, pairs!(m.set), pairs!(m.add), &m.remove);
            }
            // Per match: see `url_rewrite` and `request_redirect`; per rule: `request_mirror`
            // and `cors`.
            (
                HttpRouteRulesFiltersType::UrlRewrite
                | HttpRouteRulesFiltersType::RequestRedirect
                | HttpRouteRulesFiltersType::RequestMirror
                | HttpRouteRulesFiltersType::Cors,
                _,
                _,
            ) => {}
            (other, _, _) => warnings.push(format!(
                "{what}: filter {other:?} is not supported yet and was ignored"
            )),
        }
    }
    if answers_itself {
        drop_request_edits(&mut out, what, warnings);
    }
    if out.request.is_empty() && out.response.is_empty() {
        return None;
    }
    let problems = weft_proto::headers::check(&[], &out);
    if !problems.is_empty() {
        let reasons: Vec<_> = problems.into_iter().map(|(_, reason)| reason).collect();
        warnings.push(format!(
            "{what}: header filters left out: {}",
            reasons.join("; ")
        ));
        return None;
    }
    Some(out)
}

/// Leaves out the request edits of a rule that answers itself (weft refuses them there: they
/// would reach no one), with a warning; its response edits apply to the answer.
fn drop_request_edits(headers: &mut HeaderRules, what: &str, warnings: &mut Vec<String>) {
    if !headers.request.is_empty() {
        headers.request = HeaderEdits::default();
        warnings.push(format!(
            "{what}: RequestHeaderModifier left out: a RequestRedirect answers the request itself"
        ));
    }
}

/// The rule's `rewrite` from a `URLRewrite` filter (the first; the API allows one). Its
/// `ReplacePrefixMatch` replaces the prefix this match matched: a match on the whole path
/// space (`PathPrefix /`, weft's "any path") becomes an explicit `/` prefix for it. A rewrite
/// weft refuses is left out with its reason.
pub(super) fn url_rewrite(
    filters: &[HttpRouteRulesFilters],
    rule: &mut model::Rule,
    what: &str,
    warnings: &mut Vec<String>,
) {
    let Some(f) = filters
        .iter()
        .filter(|f| f.r#type == HttpRouteRulesFiltersType::UrlRewrite)
        .find_map(|f| f.url_rewrite.as_ref())
    else {
        return;
    };
    let mut rewrite = Rewrite {
        host: f.hostname.clone(),
        ..Rewrite::default()
    };
    let matched = rule.matches.path.clone();
    match f.path.as_ref() {
        Some(p) if p.r#type == HttpRouteRulesFiltersUrlRewritePathType::ReplaceFullPath => {
            rewrite.path = p.replace_full_path.clone();
        }
        Some(p) => {
            rewrite.prefix = p.replace_prefix_match.clone();
            if rule.matches.path.is_none() {
                rule.matches.path = Some(StringMatch::prefix("/"));
            }
        }
        None => {}
    }
    let problems = weft_proto::rewrite::check(&[], rule, &rewrite);
    if problems.is_empty() {
        rule.rewrite = Some(rewrite);
    } else {
        rule.matches.path = matched;
        let reasons: Vec<_> = problems.into_iter().map(|(_, reason)| reason).collect();
        warnings.push(format!(
            "{what}: URLRewrite left out: {}",
            reasons.join("; ")
        ));
    }
}

/// The `RequestRedirect` filter of an HTTPRoute rule (the first; the API allows one), which
/// makes the rule answer requests itself.
pub(super) fn redirect_filter(
    filters: &[HttpRouteRulesFilters],
) -> Option<&HttpRouteRulesFiltersRequestRedirect> {
    filters
        .iter()
        .filter(|f| f.r#type == HttpRouteRulesFiltersType::RequestRedirect)
        .find_map(|f| f.request_redirect.as_ref())
}

/// Warns about what a rule with a `RequestRedirect` has that a redirect leaves unused: the
/// Gateway API's redirect answers the request, so its backendRefs, mirrors and URL rewrites
/// would reach no one.
pub(super) fn ignored_by_redirect(rule: &HttpRouteRules, what: &str, warnings: &mut Vec<String>) {
    let mut ignored = Vec::new();
    if rule.backend_refs.as_ref().is_some_and(|b| !b.is_empty()) {
        ignored.push("backendRefs");
    }
    if rule.timeouts.is_some() {
        ignored.push("timeouts");
    }
    for (kind, name) in [
        (HttpRouteRulesFiltersType::RequestMirror, "RequestMirror"),
        (HttpRouteRulesFiltersType::UrlRewrite, "URLRewrite"),
    ] {
        if rule.filters.iter().flatten().any(|f| f.r#type == kind) {
            ignored.push(name);
        }
    }
    if !ignored.is_empty() {
        warnings.push(format!(
            "{what}: a RequestRedirect answers the request itself, so its {} were ignored",
            ignored.join(", ")
        ));
    }
}

/// The rule's `redirect` from a `RequestRedirect` filter, per match like `url_rewrite`: its
/// `ReplacePrefixMatch` replaces the prefix this match matched (a match on the whole path space
/// becomes an explicit `/` prefix). The status is always explicit, 302 unless given (the
/// Gateway API's default; weft's is 301). `false`, with a warning naming the reasons, when weft
/// cannot express it: the rule must then be left out, never turned into one that forwards.
pub(super) fn request_redirect(
    f: &HttpRouteRulesFiltersRequestRedirect,
    rule: &mut model::Rule,
    what: &str,
    warnings: &mut Vec<String>,
) -> bool {
    let mut reasons = Vec::new();
    let port = f.port.and_then(|p| {
        let port = u16::try_from(p).ok();
        if port.is_none() {
            reasons.push(format!("{p} is not a port (1–65535)"));
        }
        port
    });
    let status = f.status_code.unwrap_or(302);
    let code = u16::try_from(status).ok();
    if code.is_none() {
        reasons.push(format!(
            "{status} is not a redirect status (301, 302, 303, 307 or 308)"
        ));
    }
    let mut redirect = Redirect {
        scheme: f.scheme.as_ref().map(|s| {
            match s {
                HttpRouteRulesFiltersRequestRedirectScheme::Http => "http",
                HttpRouteRulesFiltersRequestRedirectScheme::Https => "https",
            }
            .to_owned()
        }),
        host: f.hostname.clone(),
        port,
        code,
        ..Redirect::default()
    };
    match f.path.as_ref() {
        Some(p) if p.r#type == HttpRouteRulesFiltersRequestRedirectPathType::ReplaceFullPath => {
            redirect.path = p.replace_full_path.clone();
        }
        Some(p) => {
            redirect.prefix = p.replace_prefix_match.clone();
            if rule.matches.path.is_none() {
                rule.matches.path = Some(StringMatch::prefix("/"));
            }
        }
        None => {}
    }
    rule.redirect = Some(redirect);
    reasons.extend(
        weft_proto::answer::check(&[], rule)
            .into_iter()
            .map(|(_, reason)| reason),
    );
    if reasons.is_empty() {
        return true;
    }
    // Each of the rule's matches fails alike: say it once.
    let warning = format!(
        "{what}: RequestRedirect cannot be expressed, rule left out: {}",
        reasons.join("; ")
    );
    if !warnings.contains(&warning) {
        warnings.push(warning);
    }
    false
}

/// The rule's `mirror` from its first `RequestMirror` filter: weft mirrors a rule to one
/// service, so the others are left out with a warning, and so is a mirror to a Service port
/// weft does not mesh. The subset is empty (the Service port's whole service).
pub(super) fn request_mirror(
    filters: &[HttpRouteRulesFilters],
    rns: &str,
    ports_of: &HashMap<String, Vec<MeshedPort>>,
    what: &str,
    warnings: &mut Vec<String>,
) -> Option<Mirror> {
    let mut mirrors = filters
        .iter()
        .filter(|f| f.r#type == HttpRouteRulesFiltersType::RequestMirror)
        .filter_map(|f| f.request_mirror.as_ref());
    let first = mirrors.next()?;
    let more = mirrors.count();
    if more > 0 {
        warnings.push(format!(
            "{what}: weft mirrors a rule to one service: the first RequestMirror is kept, \
             {more} more left out"
        ));
    }
    let resolved = meshed_port(&service_ref!(&first.backend_ref), rns, ports_of)
        .and_then(|port| Ok((port, mirror_percent(first)?)));
    match resolved {
        Ok((port, percent)) => Some(Mirror {
            service: port.service.clone(),
            subset: String::new(),
            percent,
        }),
        Err(e) => {
            warnings.push(format!("{what}: RequestMirror left out: {e}"));
            None
        }
    }
}

/// The share of requests a `RequestMirror` filter copies, as weft's whole percent: `percent`,
/// else `fraction` rounded to the nearest percent (both clamped to 0–100), else `None` (all
/// of them). `Err` for a fraction without a positive denominator.
fn mirror_percent(f: &HttpRouteRulesFiltersRequestMirror) -> Result<Option<u32>, String> {
    if let Some(p) = f.percent {
        return Ok(Some(p.clamp(0, 100).unsigned_abs()));
    }
    let Some(fraction) = &f.fraction else {
        return Ok(None);
    };
    let d = i64::from(fraction.denominator.unwrap_or(100));
    if d <= 0 {
        return Err(format!(
            "fraction {}/{d} has no positive denominator",
            fraction.numerator
        ));
    }
    let n = i64::from(fraction.numerator).clamp(0, d);
    // Half up: (100·n/d + ½) without floating point; 0 ≤ result ≤ 100.
    Ok(Some(u32::try_from((200 * n + d) / (2 * d)).unwrap_or(100)))
}

/// The rule's `cors` from its `CORS` filter. Origins are the API's patterns: `*` alone
/// matches any origin, a `*` in the host matches any run of characters there
/// (`https://*.example.com`), anything else is exact. A wildcard `exposeHeaders` with
/// credentials is left out (browsers read it literally then), and a policy weft refuses is
/// left out whole, with the reason.
pub(super) fn cors(
    filters: &[HttpRouteRulesFilters],
    what: &str,
    warnings: &mut Vec<String>,
) -> Option<Cors> {
    let f: &HttpRouteRulesFiltersCors = filters
        .iter()
        .filter(|f| f.r#type == HttpRouteRulesFiltersType::Cors)
        .find_map(|f| f.cors.as_ref())?;
    let list = |l: &Option<Vec<String>>| l.clone().unwrap_or_default();
    let mut out = Cors {
        allow_origins: f
            .allow_origins
            .iter()
            .flatten()
            .map(|o| origin_match(o))
            .collect(),
        allow_methods: list(&f.allow_methods),
        allow_headers: list(&f.allow_headers),
        expose_headers: list(&f.expose_headers),
        max_age: f
            .max_age
            .filter(|s| *s > 0)
            .map(|s| model::Millis(u32::try_from(s).unwrap_or(0).saturating_mul(1000))),
        allow_credentials: f.allow_credentials.unwrap_or(false),
    };
    if out.allow_credentials && out.expose_headers.iter().any(|h| h == "*") {
        out.expose_headers.retain(|h| h != "*");
        warnings.push(format!(
            "{what}: CORS exposeHeaders \"*\" left out: with allowCredentials browsers read it \
             literally; list the fields"
        ));
    }
    let limits = weft_proto::validate::Limits::default();
    let mut reasons: Vec<String> = weft_proto::cors::check(&[], &out)
        .into_iter()
        .map(|(_, reason)| reason)
        .collect();
    reasons.extend(out.allow_origins.iter().filter_map(|m| {
        let re = m.regex.as_ref()?;
        weft_proto::validate::compile_regex(re, &limits).err()
    }));
    if !reasons.is_empty() {
        warnings.push(format!("{what}: CORS left out: {}", reasons.join("; ")));
        return None;
    }
    Some(out)
}

/// An origin pattern of the Gateway API as a weft string match.
fn origin_match(pattern: &str) -> StringMatch {
    if pattern == "*" {
        return StringMatch {
            regex: Some(".*".into()),
            ..StringMatch::default()
        };
    }
    if !pattern.contains('*') {
        return StringMatch::exact(pattern);
    }
    let re: Vec<String> = pattern.split('*').map(regex::escape).collect();
    StringMatch {
        regex: Some(re.join(".*")),
        ..StringMatch::default()
    }
}
